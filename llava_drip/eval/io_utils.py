"""JSON / JSONL helpers for the eval scripts: errors that name the file and line, atomic writes.

LLaVA's eval files are JSONL (answers, reviews, questions) or one JSON document (ScienceQA
question files, rule.json). A half-written output after a crash or Ctrl-C would be read back as
a shorter run, so every whole-file write goes through a temporary file and ``os.replace``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# mkstemp creates files 0600; give outputs the mode a plain open() would (read once at import).
_UMASK = os.umask(0)
os.umask(_UMASK)


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises:
        ValueError: a line is not valid JSON or not a JSON object (message: ``file:line: ...``).
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: PathLike) -> list[dict]:
    """All objects of a JSONL file, in file order."""
    return [obj for _, obj in iter_jsonl(path)]


def read_jsonl_by_id(path: PathLike, key: str = "question_id") -> dict[str, dict]:
    """Objects of a JSONL file keyed by ``str(obj[key])``, in file order.

    Keys are compared as strings because LLaVA-Bench uses ints and ScienceQA strings for the same
    field, and hand-edited files mix them.

    Raises:
        ValueError: a line lacks ``key`` or repeats an earlier one (message names file and line).
    """
    rows: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        if key not in obj:
            raise ValueError(f"{path}:{lineno}: no '{key}' field (keys: {sorted(obj)})")
        k = str(obj[key])
        if k in rows:
            raise ValueError(f"{path}:{lineno}: duplicate {key} {obj[key]!r} (first on line {first_line[k]})")
        rows[k] = obj
        first_line[k] = lineno
    return rows


def read_json(path: PathLike) -> Any:
    """One JSON document, with the file named in the error."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def _atomic_write_text(path: PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL, atomically (readers never see a partial file)."""
    _atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write one JSON document, atomically."""
    _atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def join_answers(question_path: PathLike, answer_paths: list[PathLike]) -> list[tuple[dict, list[dict]]]:
    """Pair each question with its answer from every answer file, by ``question_id``.

    LLaVA's review scripts zip the files line by line, which silently mis-pairs answers when one
    file is reordered or has a line missing; joining by id fails loudly instead.

    Returns:
        ``[(question, [answer from each file]), ...]`` in question-file order.

    Raises:
        ValueError: a question id is missing from an answer file, or a line is malformed.
    """
    questions = read_jsonl_by_id(question_path, "question_id")
    joined: list[tuple[dict, list[dict]]] = [(q, []) for q in questions.values()]
    for path in answer_paths:
        answers = read_jsonl_by_id(path, "question_id")
        missing = [k for k in questions if k not in answers]
        if missing:
            raise ValueError(f"{path}: no answer for {len(missing)} of {len(questions)} questions of "
                             f"{question_path}, e.g. question_id {missing[:5]}")
        extra = len(answers) - len(questions)
        if extra:
            logger.warning("%s: %d answers to questions not in %s (ignored)", path, extra, question_path)
        for (q, row), key in zip(joined, questions):
            if "text" not in answers[key]:
                raise ValueError(f"{path}: answer to question_id {answers[key]['question_id']!r} has no 'text'")
            row.append(answers[key])
    return joined
