"""ScienceQA ``problems.json`` + ``pid_splits.json`` to a LLaVA question file (CQM-A layout).

The layout is the one of LLaVA-1.5's ``llava_test_CQM-A.json`` (checked line for line against it
on the problems available in ../shared/data): ``<image>\\n`` when the problem has an image, a
``Context: <hint>`` line only when the hint is non-empty, the question, then one ``A. choice`` line
per option. The answer (the "A" of CQM-A) is the option letter. ScienceQA: Lu et al., 2022
(lupantech/ScienceQA, CC BY-NC-SA 4.0).

    python -m llava_drip.eval.convert_sqa --base-dir DIR --split test --output llava_test_CQM-A.json
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.io_utils import read_json, write_json

logger = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDE"


def build_prompt(problem: dict) -> str:
    """The human turn of one CQM-A question (without the answer instruction model_vqa_science adds)."""
    choices = problem["choices"]
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{len(choices)} choices, at most {len(OPTION_LETTERS)} supported: {choices}")
    lines = []
    if problem.get("hint"):
        lines.append(f"Context: {problem['hint']}")
    lines.append(problem["question"])
    lines += [f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    text = "\n".join(lines)
    return f"<image>\n{text}" if problem.get("image") else text


def convert_problem(pid: str, problem: dict) -> dict:
    """One LLaVA question record: ``{id, image?, conversations}``."""
    record: dict = {"id": pid}
    if problem.get("image"):
        # ScienceQA keeps each problem's image in a folder named by its id.
        record["image"] = f"{pid}/{problem['image']}"
    record["conversations"] = [
        {"from": "human", "value": build_prompt(problem)},
        {"from": "gpt", "value": OPTION_LETTERS[problem["answer"]]},
    ]
    return record


def convert(problems: dict[str, dict], pids: list[str]) -> list[dict]:
    """Question records for ``pids`` in split order (LLaVA's file keeps that order).

    Raises:
        KeyError: some ids of the split are not in ``problems``.
    """
    missing = [p for p in pids if p not in problems]
    if missing:
        raise KeyError(f"{len(missing)} of {len(pids)} split ids are not in problems.json, e.g. {missing[:5]}")
    return [convert_problem(pid, problems[pid]) for pid in pids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", type=Path, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--problems", type=Path, help="problems.json (default: BASE_DIR/problems.json)")
    parser.add_argument("--pid-splits", type=Path, help="pid_splits.json (default: BASE_DIR/pid_splits.json)")
    parser.add_argument("--split", default="test", help="key of pid_splits.json (default: test)")
    parser.add_argument("--output", type=Path, required=True, help="question file to write (JSON list)")
    args = parser.parse_args(argv)

    problems_path = args.problems or (args.base_dir / "problems.json" if args.base_dir else None)
    splits_path = args.pid_splits or (args.base_dir / "pid_splits.json" if args.base_dir else None)
    if problems_path is None or splits_path is None:
        parser.error("give --base-dir, or both --problems and --pid-splits")
    problems = read_json(problems_path)
    splits = read_json(splits_path)
    if args.split not in splits:
        raise KeyError(f"split {args.split!r} not in {splits_path}; available: {sorted(splits)}")
    records = convert(problems, [str(p) for p in splits[args.split]])
    write_json(args.output, records)
    num_images = sum("image" in r for r in records)
    print(f"wrote {len(records)} questions ({num_images} with an image) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
