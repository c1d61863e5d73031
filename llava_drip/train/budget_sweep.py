"""Does LLaVA stage 2 trained on variable visual-token counts let ONE model serve any budget? (issue 10, item 3)

Tiny and synthetic, on CPU:

1. the shared base, made once by `tiny_pipeline.build` in OUT/base: synthetic data, the tiny Llama, the
   DRIP-4x-tiny tower (clip-train pretrained, calibrated boundaries) and the stage-1 projector. build also
   trains stage 2 with the tower's default budget and seed 0 (OUT/base/stage2): the `calibrated` scheme's
   seed-0 model;
2. stage 2 for every other (scheme, seed) from that same base, with build's stage-2 flags plus the scheme's
   (`stage2_argv`), in OUT/stage2/<scheme>-seed<S>:
   - random:     `--drip_train_budgets 1.0,0.5,0.25,0.1` (each image sample draws one per fetch),
   - fixed:      `--drip_budget 0.25` (every sample exactly round(0.25 N) tokens),
   - calibrated: neither (the tower's calibrated cut, mean:0.25; counts follow the image);
3. held-out questions: the ScienceQA-format problems with an image of `synth llava` with another seed,
   checked to share no image with OUT/base, asked as open questions (`make_heldout`);
4. every model answers every question at every eval budget (greedy; the budget is set on the loaded tower,
   the default `generate(budget=...)` falls back to), each answer mapped to the option it names
   (`option_letter`) and scored by `eval_science_qa.score`; each image's visual-token count is recorded;
5. the markdown table (docs/results/llava_budgets.md) and its JSON twin (`--render` rewrites the first
   from the second).

    python -m llava_drip.train.budget_sweep --out runs/llava_budgets --seeds 0,1,2
"""
import argparse
import hashlib
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llava_drip.drip.budget import parse_budget
from llava_drip.eval.io_utils import read_json, write_json, write_jsonl
from llava_drip.utils import cpu_name

logger = logging.getLogger(__name__)

SCHEMES = ("random", "fixed", "calibrated")
DEFAULT_TRAIN_BUDGETS = "1.0,0.5,0.25,0.1"
DEFAULT_FIXED_BUDGET = "0.25"
DEFAULT_EVAL_BUDGETS = "1.0,0.5,0.25,0.1,mean:0.25,1"  # '1': ONE token per image, a near-blind control
CONV_MODE = "vicuna_v1"  # the template stage 2 trains with (--version v1)


# ---- configuration -----------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    out: str = "runs/llava_budgets"  # base, stage-2 runs, held-out data, answers (git-ignored)
    doc: str = "docs/results/llava_budgets.md"  # markdown table; the JSON twin has the same stem
    schemes: Sequence[str] = SCHEMES
    seeds: Sequence[int] = (0,)  # stage-2 training seeds; the base is always built with seed 0
    calibrated_seeds: Optional[Sequence[int]] = None  # the optional baseline's seeds (None: `seeds`)
    train_budgets: str = DEFAULT_TRAIN_BUDGETS  # the random scheme's --drip_train_budgets
    fixed_budget: str = DEFAULT_FIXED_BUDGET  # the fixed scheme's --drip_budget
    eval_budgets: Sequence[str] = tuple(DEFAULT_EVAL_BUDGETS.split(","))
    n: int = 1500  # training images of the base (tiny_pipeline.build's default)
    lm_steps: int = 150
    clip_epochs: int = 3
    stage1_epochs: int = 1
    stage2_epochs: int = 3
    eval_seed: int = 1  # synth llava seed of the held-out questions (the base uses 0)
    n_eval: int = 400  # ScienceQA-format problems generated; about 3 in 4 have an image and are kept
    prompt: str = "short"  # open | short | mc: how the held-out questions are asked (make_heldout)
    batch_size: int = 32  # questions per generate call
    max_new_tokens: int = 12  # room for an open answer ('The circles are on the left side.')
    command: str = ""  # how the sweep was launched, for the doc


def scheme_flags(scheme: str, cfg: SweepConfig) -> Dict[str, str]:
    """The stage-2 ModelArguments a scheme adds to build's flags."""
    if scheme == "random":
        return {"drip_train_budgets": cfg.train_budgets}
    if scheme == "fixed":
        return {"drip_budget": cfg.fixed_budget}
    if scheme == "calibrated":
        return {}
    raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")


def describe_scheme(scheme: str, flags: Dict[str, str]) -> str:
    """One line for the doc, naming the flags the runs really got."""
    return {"random": f"`--drip_train_budgets {flags.get('drip_train_budgets')}`: each image sample draws one "
                      "budget per fetch",
            "fixed": f"`--drip_budget {flags.get('drip_budget')}`: every sample exactly that budget",
            "calibrated": "neither flag: the tower's calibrated cut (mean:0.25, image-dependent counts); "
                          "tiny_pipeline's default"}[scheme]


# ---- training ------------------------------------------------------------------------------------------
def build_base(cfg: SweepConfig) -> Tuple[str, List[str]]:
    """tiny_pipeline.build into OUT/base (skips finished steps); returns the base folder and the steps that
    were already there (reused, so their time is not in this run's wall time)."""
    from llava_drip.train.tiny_pipeline import build
    base = os.path.join(cfg.out, "base")
    marks = {"data": "data/finetune.json", "LLM": "llm/config.json", "tower": "clip_runs",
             "stage 1": "stage1/mm_projector.bin", "calibrated seed-0 stage 2": "stage2/llava_drip_train.json"}
    reused = [step for step, mark in marks.items() if os.path.exists(os.path.join(base, mark))]
    meta = os.path.join(base, "data", "meta.json")
    if os.path.isfile(meta) and read_json(meta)["n"] != cfg.n:
        raise ValueError(f"{base} holds a base of {read_json(meta)['n']} images, not --n {cfg.n}: use another --out")
    _check_epochs(os.path.join(base, "stage2"), cfg.stage2_epochs)
    build(base, n=cfg.n, seed=0, lm_steps=cfg.lm_steps, stage1_epochs=cfg.stage1_epochs,
          stage2_epochs=cfg.stage2_epochs, clip_epochs=cfg.clip_epochs)
    return base, reused


# the ModelArguments tiny_pipeline.build sets for stage 2; read back from its record so every run uses the
# very LLM, tower checkpoint and stage-1 projector of the base
_BUILD_MODEL_ARGS = ("model_name_or_path", "version", "vision_tower", "vision_tower_pretrained",
                     "mm_projector_type", "drip_eval_mode", "pretrain_mm_mlp_adapter")


def stage2_argv(base: str, out: str, seed: int, epochs: int, flags: Dict[str, str]) -> List[str]:
    """train.py flags of build's stage 2 (same base, same hyperparameters) with `flags` and `seed`."""
    from llava_drip.train.tiny_pipeline import _train_args
    record = read_json(os.path.join(base, "stage2", "llava_drip_train.json"))
    model_args = record["model_args"]
    if model_args.get("drip_budget") or model_args.get("drip_train_budgets"):
        raise ValueError(f"{base}/stage2 was trained with budget flags; the base must use the tower's default")
    kw = {k: model_args[k] for k in _BUILD_MODEL_ARGS}
    # the rest as in tiny_pipeline.build's stage 2
    kw.update(data_path=record["data_path"], image_folder=os.path.join(base, "data"), image_aspect_ratio="pad",
              group_by_modality_length=True, num_train_epochs=epochs, learning_rate=1e-3,
              per_device_train_batch_size=16, model_max_length=384, **flags)
    argv = _train_args(out, **kw)
    argv[argv.index("--seed") + 1] = str(seed)
    return argv


def _check_epochs(run: str, epochs: int) -> None:
    """A finished stage-2 run is reused only if it ran the epochs asked for."""
    state = os.path.join(run, "trainer_state.json")
    if os.path.isfile(state) and read_json(state)["num_train_epochs"] != epochs:
        raise ValueError(f"{run} ran {read_json(state)['num_train_epochs']} epochs, not --stage2-epochs {epochs}: "
                         "use another --out")


def train_models(cfg: SweepConfig, base: str, base_stage2_reused: bool) -> Dict[str, Dict]:
    """Stage 2 of every (scheme, seed) not already finished; returns {run name: info}.

    base_stage2_reused: build's own stage 2 (calibrated, seed 0) was there before this call."""
    from llava_drip.train.train import train
    runs = {}
    for scheme in cfg.schemes:
        seeds = cfg.calibrated_seeds if scheme == "calibrated" and cfg.calibrated_seeds is not None else cfg.seeds
        for seed in seeds:
            name, flags = f"{scheme}-seed{seed}", scheme_flags(scheme, cfg)
            if scheme == "calibrated" and seed == 0:  # build's own stage 2 is exactly this run
                path, reused = os.path.join(base, "stage2"), base_stage2_reused
            else:
                path = os.path.join(cfg.out, "stage2", name)
                reused = os.path.isfile(os.path.join(path, "llava_drip_train.json"))
                _check_epochs(path, cfg.stage2_epochs)
                if not reused:
                    train(stage2_argv(base, path, seed, cfg.stage2_epochs, flags))
            summary = read_json(os.path.join(path, "train_summary.json"))
            state = read_json(os.path.join(path, "trainer_state.json"))
            runtime = [h["train_runtime"] for h in state["log_history"] if "train_runtime" in h]
            runs[name] = {"scheme": scheme, "seed": seed, "path": path, "flags": flags,
                          "reused": reused, "train_runtime_s": runtime[-1],
                          "steps": state["global_step"],
                          "loss_first": summary["losses"][0] if summary["losses"] else None,
                          "loss_last": summary["losses"][-1] if summary["losses"] else None,
                          "train_samples": summary["train_samples"]}
            logger.info("stage 2 %s: %s", name, path)
    return runs


# ---- held-out questions ----------------------------------------------------------------------------
@dataclass
class HeldOut:
    folder: str
    question_file: str  # the problems in LLaVA's CQM-A layout: the scorer's questions and gold letters
    questions: list  # answering.Question, as the model is asked them
    sqa: dict  # eval_science_qa SqaQuestions by id
    prompt: str  # open | short | mc
    kinds: Dict[str, str]  # question id -> colour | shape | count | position | yes/no
    choices: Dict[str, List[str]]  # question id -> the options (for short answers)
    chance: float  # mean 1 / options: a uniform guess among the options (mc; short answers can miss all)
    overlap_with_base: int  # held-out PNGs byte-identical to some image under OUT/base


PROMPTS = ("open", "short", "mc")
KINDS = {"shapes": "shape", "colors": "colour", "counting": "count", "position": "position"}


def _png_hashes(root: str) -> set:
    return {hashlib.sha1(p.read_bytes()).hexdigest() for p in Path(root).rglob("*.png")}


def make_heldout(cfg: SweepConfig, base: str) -> HeldOut:
    """The problems with an image from `synth llava --seed eval_seed`, asked as cfg.prompt says.

    open: the bare question, as stage 2's open-ended Q&A asks (answers are sentences); short: the question
    plus mix665k's "Answer the question using a single word or phrase."; for both, no options are shown
    and the answer is mapped to the option it names (option_letter). mc: LLaVA's ScienceQA prompt
    (context, lettered options, single-pred suffix), answered with a letter.
    """
    from llava_drip.data import synth_llava
    from llava_drip.eval.answering import Question
    from llava_drip.eval.convert_sqa import convert
    from llava_drip.eval.eval_science_qa import questions_from_records
    from llava_drip.eval.model_vqa_science import load_questions
    if cfg.eval_seed == 0:
        raise ValueError("--eval-seed 0 is the base's data seed: its ScienceQA images calibrated the tower")
    if cfg.prompt not in PROMPTS:
        raise ValueError(f"unknown prompt style {cfg.prompt!r}; expected one of {PROMPTS}")
    folder = os.path.join(cfg.out, f"heldout-seed{cfg.eval_seed}-n{cfg.n_eval}")
    sqa_dir = os.path.join(folder, "sqa")
    if not os.path.isfile(os.path.join(sqa_dir, "problems.json")):
        synth_llava.main(["--out", folder, "--n", "1", "--seed", str(cfg.eval_seed), "--n-sqa", str(cfg.n_eval),
                          "--n-bench-images", "0", "--quiet"])
    problems = read_json(os.path.join(sqa_dir, "problems.json"))
    pids = [pid for pid, p in problems.items() if p.get("image")]  # a budget means nothing without an image
    records = convert(problems, pids)
    qfile = os.path.join(folder, "questions_with_image.json")
    write_json(qfile, records)
    images = os.path.join(sqa_dir, "images", "test")
    if cfg.prompt == "mc":
        questions = load_questions(qfile, images, single_pred_prompt=True)
    else:
        questions = []
        for pid in pids:
            text = problems[pid]["question"] + (synth_llava.SHORT_SUFFIX if cfg.prompt == "short" else "")
            questions.append(Question(pid, text, f"<image>\n{text}", os.path.join(images, pid, problems[pid]["image"])))
    kinds = {pid: "yes/no" if problems[pid]["task"] == "yes or no" else KINDS[problems[pid]["topic"]] for pid in pids}
    chance = sum(1 / len(problems[pid]["choices"]) for pid in pids) / max(1, len(pids))
    overlap = len(_png_hashes(os.path.join(sqa_dir, "images")) & _png_hashes(base))
    return HeldOut(folder, qfile, questions, questions_from_records(records, qfile), cfg.prompt, kinds,
                   {pid: problems[pid]["choices"] for pid in pids}, chance, overlap)


def _words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def option_letter(answer: str, choices: Sequence[str]) -> str:
    """The letter of the one option a short answer names, else FAILED (counted wrong by the scorer).

    An option is named when its short form (the words stage 2 answers with: 'left' for 'the left side',
    '2' or 'two' for '2') appears in the answer as whole words; an answer naming two options, or none,
    is FAILED. The letter then goes through eval_science_qa.score like any ScienceQA answer.
    """
    from llava_drip.data.shapes import NUMBER_WORDS, PLURALS
    from llava_drip.data.synth_llava import POS_WORD
    from llava_drip.eval.eval_science_qa import FAILED, OPTIONS
    short = {v: k for k, v in POS_WORD.items()}
    canon = {w: str(k) for k, w in NUMBER_WORDS.items()} | {p: s for s, p in PLURALS.items()} | {"middle": "center"}
    words = [canon.get(w, w) for w in _words(answer)]
    named = []
    for i, choice in enumerate(choices):
        want = _words(short.get(choice, choice))
        if any(words[k:k + len(want)] == want for k in range(len(words) - len(want) + 1)):
            named.append(i)
    return OPTIONS[named[0]] if len(named) == 1 else FAILED
# ---- evaluation ---------------------------------------------------------------------------------------
def evaluate_model(model_dir: str, held: HeldOut, budgets: Sequence[str], batch_size: int, max_new_tokens: int,
                   answers_dir: str) -> List[Dict]:
    """Accuracy and visual tokens per image of one model at each budget; answers go to answers_dir."""
    from llava_drip.eval.answering import Answerer, GenerationSettings
    answerer = Answerer(model_dir, conv_mode=CONV_MODE, device="cpu", dtype="float32")
    tower = answerer.model.get_vision_tower()
    num_patches, default = tower.num_patches, tower.budget
    settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens)
    rows = []
    for spec in budgets:  # labelled by the spec as given
        budget = parse_budget(spec)
        tower.budget = budget  # the default generate() falls back to; same path as generate(budget=spec)
        answers = []
        for k in range(0, len(held.questions), batch_size):
            answers += answerer.answer(held.questions[k:k + batch_size], settings)
        rows.append(score_answers(held, answers, spec, num_patches,
                                  os.path.join(answers_dir, f"budget-{spec.replace(':', '_')}.jsonl")))
        logger.info("%s at %s: %d/%d", model_dir, spec, rows[-1]["correct"], rows[-1]["n"])
    tower.budget = default
    return rows


def score_answers(held: HeldOut, answers: Sequence[Tuple[str, int]], spec: str, num_patches: int,
                  answers_file: str) -> Dict:
    """One (model, budget) cell: eval_science_qa.score on the answers (short ones mapped to a letter first),
    per question kind, and the visual tokens each image got. The answers go to answers_file (LLaVA's schema)."""
    from llava_drip.eval.eval_science_qa import score
    rows = []
    for q, (text, g) in zip(held.questions, answers):
        letter = text if held.prompt == "mc" else option_letter(text, held.choices[str(q.qid)])
        rows.append({"question_id": q.qid, "prompt": q.prompt, "text": letter, "answer": text,
                     "metadata": {"visual_tokens": g, "budget": spec, "kind": held.kinds[str(q.qid)]}})
    write_jsonl(answers_file, rows)
    res = score(held.sqa, {str(r["question_id"]): r for r in rows})
    right = {a["question_id"] for a in res["analysis"]["correct"]}
    by_kind = {}
    for qid, kind in held.kinds.items():
        hit = by_kind.setdefault(kind, {"correct": 0, "n": 0})
        hit["correct"] += qid in right
        hit["n"] += 1
    budget, tokens = parse_budget(spec), [g for _, g in answers]
    return {"budget": spec, "kind": budget.kind if budget else "default", "value": budget.value if budget else None,
            "correct": res["correct"], "n": res["total"],
            "accuracy": res["correct"] / res["total"] if res["total"] else None, "failed": res["failed"],
            "by_kind": dict(sorted(by_kind.items())), "num_patches": num_patches,
            "expected_tokens": None if budget is None or budget.kind == "mean" else budget.count(num_patches),
            "tokens_per_image": dict(sorted(Counter(tokens).items())),
            "tokens_mean": sum(tokens) / len(tokens) if tokens else None}


# ---- aggregation ----------------------------------------------------------------------------------------
def _cell_stats(accs: Dict[int, float], n: int) -> Dict:
    """One table cell over the seeds: {mean, sd, min, max, per_seed, n, seeds}."""
    values = list(accs.values())
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "per_seed": accs, "n": n, "seeds": len(values)}


def aggregate(evals: Dict[str, List[Dict]], runs: Dict[str, Dict], schemes: Sequence[str],
              budgets: Sequence[str]) -> Dict[str, Dict[str, Dict]]:
    """{scheme: {budget: cell + {by_kind: {kind: cell}}}} over the seeds (cells: _cell_stats)."""
    table = {}
    for scheme in schemes:
        names = [name for name, r in runs.items() if r["scheme"] == scheme]
        table[scheme] = {}
        for j, spec in enumerate(budgets):
            rows = {runs[name]["seed"]: evals[name][j] for name in names}
            first = next(iter(rows.values()))
            cell = _cell_stats({seed: r["accuracy"] for seed, r in rows.items()}, first["n"])
            cell["by_kind"] = {kind: _cell_stats({seed: r["by_kind"][kind]["correct"] / r["by_kind"][kind]["n"]
                                                  for seed, r in rows.items()}, hit["n"])
                               for kind, hit in first["by_kind"].items()}
            table[scheme][spec] = cell
    return table


def noise_band(a: Dict, b: Dict, pooled_sd: Optional[float] = None) -> float:
    """Two standard errors of a difference of two cells: seed spread plus question sampling (binomial).

    A one-seed cell borrows pooled_sd, the seed spread of the multi-seed cells at that budget."""
    var = 0.0
    for c in (a, b):
        sd = c["sd"] if c["sd"] is not None else pooled_sd
        var += (sd ** 2 / c["seeds"] if sd is not None else 0.0) + c["mean"] * (1 - c["mean"]) / c["n"]
    return 2 * math.sqrt(var)


def pooled_sd(table: Dict[str, Dict[str, Dict]], budget: str, kind: Optional[str] = None) -> Optional[float]:
    cells = [c[budget] if kind is None else c[budget]["by_kind"][kind] for c in table.values()]
    sds = [c["sd"] for c in cells if c["sd"] is not None]
    return math.sqrt(statistics.fmean(sd ** 2 for sd in sds)) if sds else None


# ---- the document ----------------------------------------------------------------------------------------
def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _budget_label(spec: str, num_patches: int) -> str:
    b = parse_budget(spec)
    tokens = f"mean {round(b.value * num_patches)}" if b.kind == "mean" else str(b.count(num_patches))
    return f"{spec} ({tokens} tok)"


def _cell(c: Dict) -> str:
    spread = "" if c["sd"] is None else f" ± {_pct(c['sd'])}"
    n = f"{c['seeds']}×{c['n']}" if c["seeds"] > 1 else str(c["n"])
    return f"{_pct(c['mean'])}{spread}, n={n}"


def _clear_differences(table: Dict[str, Dict[str, Dict]], a: str, b: str, kind: Optional[str]) -> Tuple[list, list]:
    """(budgets where a beats b beyond the noise band, budgets where it loses), as 'budget +d±band' strings."""
    wins, losses = [], []
    for budget in table[a]:
        ca, cb = table[a][budget], table[b][budget]
        if kind is not None:
            ca, cb = ca["by_kind"][kind], cb["by_kind"][kind]
        d, band = ca["mean"] - cb["mean"], noise_band(ca, cb, pooled_sd(table, budget, kind))
        if abs(d) > band:
            (wins if d > 0 else losses).append(f"{budget} {100 * d:+.1f}±{100 * band:.1f}")
    return wins, losses


def reading(table: Dict[str, Dict[str, Dict]], chance: float) -> List[str]:
    """Statements the numbers support, each difference against its noise band (noise_band)."""
    lines = []
    kinds = list(next(iter(next(iter(table.values())).values()))["by_kind"])
    for kind in kinds:
        accs = {(s, b): cells[b]["by_kind"][kind]["mean"] for s, cells in table.items() for b in cells}
        lo, hi = min(accs, key=accs.get), max(accs, key=accs.get)
        lines.append(f"- {kind} questions: {_pct(accs[lo])} % ({lo[0]} at {lo[1]}) to {_pct(accs[hi])} % "
                     f"({hi[0]} at {hi[1]}) over every scheme and budget.")
    for scheme, cells in table.items():
        best = max(cells, key=lambda b: cells[b]["mean"])
        worst = min(cells, key=lambda b: cells[b]["mean"])
        sd = max((x for x in (pooled_sd(table, best), pooled_sd(table, worst)) if x is not None), default=None)
        gap, band = cells[best]["mean"] - cells[worst]["mean"], noise_band(cells[best], cells[worst], sd)
        lines.append(f"- **{scheme}**, all questions: from {_pct(cells[best]['mean'])} % (at {best}) to "
                     f"{_pct(cells[worst]['mean'])} % (at {worst}) across budgets, a spread of {100 * gap:.1f} points, "
                     f"{'beyond' if gap > band else 'within'} the noise band (±{100 * band:.1f}).")
    for a, b in [(a, b) for a, b in (("random", "fixed"), ("random", "calibrated"), ("fixed", "calibrated"))
                 if a in table and b in table]:
        found = []
        for kind in (None, *kinds):
            wins, losses = _clear_differences(table, a, b, kind)
            if wins or losses:
                found.append(f"{kind or 'all questions'}: better at [{'; '.join(wins) or 'none'}], "
                             f"worse at [{'; '.join(losses) or 'none'}]")
        lines.append(f"- **{a} − {b}**, differences beyond the noise band (points ± band): "
                     + ("; ".join(found) if found else "none") + "; everything else within noise.")
    above = sum(c["mean"] - 2 * math.sqrt(c["mean"] * (1 - c["mean"]) / c["n"]) > chance
                for cells in table.values() for c in cells.values())
    lines.append(f"- For reference, a uniform guess among each question's options (which the model is not shown) "
                 f"would score {_pct(chance)} % over all questions; {above} of "
                 f"{sum(len(c) for c in table.values())} cells are more than two standard errors above that.")
    return lines


PROMPT_TEXT = {
    "open": "asked as bare open questions (the form of stage 2's open-ended Q&A; no options shown), each answer "
            "mapped to the one option it names (`option_letter`; none or several = unparsed)",
    "short": "asked with mix665k's single-word suffix (no options shown), each answer mapped to the one option it "
             "names (`option_letter`; none or several = unparsed)",
    "mc": "asked with LLaVA's ScienceQA prompt (context, lettered options, single-pred suffix)",
}


def _setup_lines(result: Dict) -> List[str]:
    meta, cfg, runs = result["meta"], result["config"], result["runs"]
    w, held = meta["wall_s"], meta["heldout"]
    steps = sorted({r["steps"] for r in runs.values()})
    return [
        f"- Shared base (`tiny_pipeline.build`, seed 0, in `{cfg['out']}/base`): {cfg['n']} synthetic training images "
        f"(64 px), the tiny Llama ({cfg['lm_steps']} text steps), DRIP-4x-tiny pretrained by `clip-train` "
        f"({cfg['clip_epochs']} epochs) with calibrated boundaries, stage 1 ({cfg['stage1_epochs']} epoch, projector). "
        "Every model below starts from this same LLM, tower and projector.",
        f"- Stage 2: build's flags (full finetune, lr 1e-3, batch 16, {cfg['stage2_epochs']} epoch(s) = "
        f"{'/'.join(map(str, steps))} steps, vicuna_v1); the training seed changes data order and budget draws only. "
        "Schemes:",
        *[f"  - `{s}` (seeds {', '.join(str(r['seed']) for r in runs.values() if r['scheme'] == s)}): {text}"
          for s, text in meta["schemes"].items()],
        *_renamed_budget_note(cfg, runs),
        f"- Held-out eval: the {held['n']} ScienceQA-format problems with an image from `synth llava --seed "
        f"{cfg['eval_seed']} --n-sqa {cfg['n_eval']}` (colour / shape / count / position / yes-no about the scene), "
        f"{PROMPT_TEXT[cfg['prompt']]}; greedy, vicuna_v1, scored by `llava_drip.eval.eval_science_qa.score` "
        f"(unparsed = wrong). {held['overlap_with_base']} of these images are byte-identical to an image under the "
        "base (stage 1/2 data, calibration images, tower pretraining).",
        f"- Budgets: a ratio r keeps exactly round(r N) visual tokens per image (N = {meta['num_patches']} patches), "
        "top-k by the predictor's score; `mean:0.25` is the calibrated cut (each image its own count, N/4 on average "
        "over the calibration images). The last table shows the counts each image really got.",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores shared with other jobs (1-min load average "
        f"{meta['load_min']:.1f}-{meta['load_max']:.1f}), torch {meta['torch']}, {meta['threads']} compute thread(s).",
        f"- Wall time of this call: {w['total'] / 60:.1f} min (base {w['base'] / 60:.1f}, stage-2 runs "
        f"{w['stage2'] / 60:.1f}, eval {w['eval'] / 60:.1f}). Finished steps in `{cfg['out']}` are reused: "
        f"{', '.join(meta['reused_base_steps']) or 'no base step'} of the base{_reused_runs(runs)}. Stage-2 "
        f"training time of all {len(runs)} models, whenever they ran (HF Trainer's train_runtime): "
        f"{meta['stage2_train_runtime_s'] / 60:.1f} min.",
    ]


def _table_lines(result: Dict) -> List[str]:
    meta, table, cfg = result["meta"], result["table"], result["config"]
    budgets, npatch = list(cfg["eval_budgets"]), meta["num_patches"]
    kinds = list(next(iter(next(iter(table.values())).values()))["by_kind"])
    return [
        "## Accuracy % (mean ± sd over training seeds; n = seeds × questions)", "",
        "| training scheme | " + " | ".join(_budget_label(b, npatch) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
        *[f"| {s} | " + " | ".join(_cell(table[s][b]) for b in budgets) + " |" for s in table],
        "",
        f"A uniform guess among each question's options would score {_pct(meta['heldout']['chance'])} %. The "
        "question-sampling standard error of one cell is at most "
        f"{_pct(math.sqrt(0.25 / meta['heldout']['n']))} points.",
        "", "## By question kind (accuracy %, mean ± sd over seeds)", "",
        "| scheme | kind (questions) | " + " | ".join(budgets) + " |", "|---|---|" + "---|" * len(budgets),
        *[f"| {s} | {k} ({result['evals'][next(iter(result['evals']))][0]['by_kind'][k]['n']}) | "
          + " | ".join(_kind_cell(table[s][b]["by_kind"][k]) for b in budgets) + " |" for s in table for k in kinds],
        "", "## Per run", "",
        "| run | stage-2 loss first → last | " + " | ".join(budgets) + " | unparsed answers |",
        "|---|---|" + "---|" * len(budgets) + "---|",
        *[f"| {name} | {_loss(r['loss_first'])} → {_loss(r['loss_last'])} | "
          + " | ".join(_pct(e["accuracy"]) for e in result["evals"][name])
          + f" | {sum(e['failed'] for e in result['evals'][name])} of {sum(e['n'] for e in result['evals'][name])} |"
          for name, r in result["runs"].items()],
        "", "## Visual tokens per image the models saw", "",
        "| budget | expected per image | seen (min-max over all images and models) | mean |", "|---|---|---|---|",
        *[_token_row(result["evals"], j, b) for j, b in enumerate(budgets)],
    ]


def write_markdown(path: str, result: Dict) -> None:
    lines = [
        "# One LLaVA model for any visual-token budget? (tiny, synthetic, CPU)", "",
        "LLaVA stage 2 trained with a random DRIP budget per sample against stage 2 trained at one fixed budget "
        "(and the tower's calibrated default), every model scored at every budget on the same held-out questions. "
        "It checks the mechanism at toy scale; the numbers say nothing about real benchmarks.", "",
        "Made by:", "", "```", result["meta"]["command"], "```", "",
        *_setup_lines(result), "",
        *_table_lines(result), "",
        *(["## Reading", "", result["notes"], ""] if result.get("notes") else []),
        "## What the numbers say", "",
        "Generated from the tables: a difference counts only beyond its noise band, two standard errors of the "
        "difference (the seed spread of both cells, or the pooled spread at that budget for a one-seed cell, plus "
        "binomial question sampling of both: conservative, since every cell has the same questions).", "",
        *reading(result["table"], result["meta"]["heldout"]["chance"]), "",
        "Caveats: a 2-layer, 128-wide Llama on a few thousand synthetic Q&A, one base (data, LLM, tower, projector) "
        "for every run, so the seed spread is stage-2 noise only. Only the direction of a clear difference may "
        "carry over to real scale.", "",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def _renamed_budget_note(cfg: Dict, runs: Dict[str, Dict]) -> List[str]:
    asked = {"drip_train_budgets": cfg["train_budgets"], "drip_budget": cfg["fixed_budget"]}
    given = {k: v for r in runs.values() for k, v in r["flags"].items()}
    changed = [f"`--{k} {asked[k]}` went as `{v}`" for k, v in given.items() if _csv(v) != _csv(asked[k])]
    if not changed:
        return []
    return [f"  - {', '.join(changed)}: the same tokens per image (N = 64). Before commit bb74827, "
            "`str(Budget('ratio', 1.0))` was `'1'`, which train.py passed on and parse_budget read back as ONE "
            "token, so the sweep then wrote ratio 1.0 as the count it means."]


def _kind_cell(c: Dict) -> str:
    return _pct(c["mean"]) + ("" if c["sd"] is None else f" ± {_pct(c['sd'])}")


def _reused_runs(runs: Dict[str, Dict]) -> str:
    names = [n for n, r in runs.items() if r["reused"] and Path(r["path"]).parent.name != "base"]  # base: listed
    return f"; stage-2 runs {', '.join(names)} from an earlier call" if names else ""


def _loss(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _token_row(evals: Dict[str, List[Dict]], j: int, budget: str) -> str:
    cells = [e[j] for e in evals.values()]
    seen = sorted({int(g) for c in cells for g in c["tokens_per_image"]})
    mean = statistics.fmean(c["tokens_mean"] for c in cells)
    expected = cells[0]["expected_tokens"]
    return f"| {budget} | {expected if expected is not None else 'varies'} | {seen[0]}-{seen[-1]} | {mean:.2f} |"


# ---- main --------------------------------------------------------------------------------------------
def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_sweep(cfg: SweepConfig) -> Dict:
    """Everything but the files: base, stage-2 runs, held-out set, evals; returns the result dict."""
    loads, wall, t0 = [_loadavg()], {}, time.time()
    base, reused = build_base(cfg)
    wall["base"] = time.time() - t0
    t1 = time.time()
    runs = train_models(cfg, base, "calibrated seed-0 stage 2" in reused)
    wall["stage2"], t2 = time.time() - t1, time.time()
    loads.append(_loadavg())
    held = make_heldout(cfg, base)
    evals = {}
    for name, r in runs.items():
        evals[name] = evaluate_model(r["path"], held, cfg.eval_budgets, cfg.batch_size, cfg.max_new_tokens,
                                     os.path.join(cfg.out, "answers", name))
        loads.append(_loadavg())
    wall["eval"], wall["total"] = time.time() - t2, time.time() - t0
    loads = [x for x in loads if x is not None] or [0.0]
    num_patches = next(iter(evals.values()))[0]["num_patches"]
    meta = {"command": cfg.command, "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_min": min(loads), "load_max": max(loads), "wall_s": {k: round(v, 1) for k, v in wall.items()},
            "reused_base_steps": reused,
            "stage2_train_runtime_s": round(sum(r["train_runtime_s"] for r in runs.values()), 1),
            "num_patches": num_patches,
            "schemes": {r["scheme"]: describe_scheme(r["scheme"], r["flags"]) for r in runs.values()},
            "heldout": {"folder": held.folder, "question_file": held.question_file, "n": len(held.questions),
                        "chance": held.chance, "overlap_with_base": held.overlap_with_base}}
    return {"meta": meta, "config": asdict(cfg), "runs": runs, "evals": evals,
            "table": aggregate(evals, runs, cfg.schemes, cfg.eval_budgets)}


def _csv(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    d = SweepConfig()
    p = argparse.ArgumentParser(prog="python -m llava_drip.train.budget_sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=d.out, help=f"work folder (default {d.out}); finished steps are reused")
    p.add_argument("--doc", default=d.doc, help="markdown to write; the JSON twin gets the same stem")
    p.add_argument("--schemes", default=",".join(d.schemes), help=f"comma-separated, of {','.join(SCHEMES)}")
    p.add_argument("--seeds", default="0", help="stage-2 training seeds, comma-separated (default 0)")
    p.add_argument("--calibrated-seeds", default=None, help="seeds of the calibrated baseline (default: --seeds)")
    p.add_argument("--train-budgets", default=d.train_budgets, help="the random scheme's --drip_train_budgets")
    p.add_argument("--fixed-budget", default=d.fixed_budget, help="the fixed scheme's --drip_budget")
    p.add_argument("--eval-budgets", default=DEFAULT_EVAL_BUDGETS, help=f"default {DEFAULT_EVAL_BUDGETS}")
    p.add_argument("--n", type=int, default=d.n, help="training images of the base")
    p.add_argument("--lm-steps", type=int, default=d.lm_steps)
    p.add_argument("--clip-epochs", type=int, default=d.clip_epochs, help="0: a seeded random tower (tests)")
    p.add_argument("--stage1-epochs", type=int, default=d.stage1_epochs)
    p.add_argument("--stage2-epochs", type=int, default=d.stage2_epochs)
    p.add_argument("--eval-seed", type=int, default=d.eval_seed, help="synth llava seed of the held-out questions")
    p.add_argument("--n-eval", type=int, default=d.n_eval,
                   help="ScienceQA-format problems to generate (about 3 in 4 have an image)")
    p.add_argument("--prompt", default=d.prompt, choices=PROMPTS, help="how the questions are asked (make_heldout)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite --doc from a sweep's JSON (no training, no eval)")
    p.add_argument("--notes", default=None, metavar="MD",
                   help="a markdown file: the hand-written reading, kept in the JSON and put in the doc")
    p.add_argument("--threads", type=int, default=1,
                   help="torch compute threads (default 1: on a 2-core machine shared with other jobs, 2 threads "
                        "made a stage-2 step 5x slower, 2.5 s against 0.5 s)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.render:  # the table is recomputed from the per-run evals, so the JSON is rewritten too
        result = read_json(a.render)
        if a.notes:
            result["notes"] = Path(a.notes).read_text(encoding="utf-8").strip()
        result["table"] = aggregate(result["evals"], result["runs"], result["config"]["schemes"],
                                    result["config"]["eval_budgets"])
        write_json(a.render, result)
        write_markdown(a.doc, read_json(a.render))
        print(f"wrote {a.doc} and {a.render} from {a.render}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    schemes = _csv(a.schemes)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"budget_sweep: unknown scheme(s) {unknown}; expected some of {list(SCHEMES)}")
    eval_budgets = _csv(a.eval_budgets)
    for spec in [*eval_budgets, *_csv(a.train_budgets), a.fixed_budget]:
        parse_budget(spec)  # a bad spec fails before any training
    cfg = SweepConfig(out=a.out, doc=a.doc, schemes=schemes, seeds=[int(s) for s in _csv(a.seeds)],
                      calibrated_seeds=(None if a.calibrated_seeds is None
                                        else [int(x) for x in _csv(a.calibrated_seeds)]),
                      prompt=a.prompt,
                      train_budgets=a.train_budgets, fixed_budget=a.fixed_budget, eval_budgets=eval_budgets,
                      n=a.n, lm_steps=a.lm_steps, clip_epochs=a.clip_epochs, stage1_epochs=a.stage1_epochs,
                      stage2_epochs=a.stage2_epochs, eval_seed=a.eval_seed, n_eval=a.n_eval,
                      batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                      command="scripts/tiny/budget_sweep.sh" + (" " + " ".join(argv) if argv else ""))
    result = run_sweep(cfg)
    if a.notes:
        result["notes"] = Path(a.notes).read_text(encoding="utf-8").strip()
    write_json(str(Path(cfg.doc).with_suffix(".json")), result)
    write_markdown(cfg.doc, read_json(str(Path(cfg.doc).with_suffix(".json"))))  # as --render would
    minutes = result["meta"]["wall_s"]["total"] / 60
    print(f"wrote {cfg.doc} and {Path(cfg.doc).with_suffix('.json')} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
