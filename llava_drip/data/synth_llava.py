"""`llava-drip synth llava`: synthetic LLaVA training data and evaluation files.

Writes, under --out:
  images/NNNNNN.png                 shared by both training stages
  pretrain.json                     stage 1, LCS-558K style: brief instruction -> caption
  finetune.json                     stage 2, llava_v1_5_mix665k style: multi-turn Q&A,
                                    ScienceQA-style multiple choice, ~5% text-only records
  sqa/problems.json, pid_splits.json, images/test/<pid>/image.png
                                    held-out ScienceQA-format test problems (some text-only)
  bench/questions.jsonl, answers_ref.jsonl, context.jsonl, images/
                                    held-out LLaVA-Bench-in-the-Wild-format items
  meta.json                         arguments and counts
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .shapes import (
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIDES,
    STREAM_BENCH,
    STREAM_SQA,
    STREAM_TEXT,
    STREAM_TRAIN,
    Scene,
    article,
    caption,
    choice,
    describe,
    png_bytes,
    render,
    rng_for,
    sample_scene,
)

STREAM_ORDER = 5  # shuffles the finetune records
IMAGE_TOKEN = "<image>"
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."  # mix665k's VQA-style suffix
MC_SUFFIX = "Answer with the option's letter from the given choices directly."  # LLaVA's ScienceQA prompt
LETTERS = "ABCDE"
TEXT_ONLY_FRACTION = 0.05

# LLaVA's stage-1 brief-description instructions (llava/.../blip_laion_cc_sbu_558k prompts).
BRIEF_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
BG_ADJ = {"plain": "plain", "stripes": "striped", "dots": "dotted", "noise": "noisy"}
POS_WORD = {"left": "the left side", "right": "the right side", "top": "the top", "bottom": "the bottom", "center": "the center"}


def _be(scene: Scene) -> str:
    return "is" if scene.count == 1 else "are"


def _the_noun(scene: Scene) -> str:
    return f"the {scene.noun}"


def _pronoun(scene: Scene) -> str:
    return "It is" if scene.count == 1 else "They are"


def _others(rng: np.random.Generator, options, truth, k: int) -> list:
    """k distinct options other than `truth`, drawn from `rng`."""
    pool = [o for o in options if o != truth]
    idx = rng.permutation(len(pool))[:k]
    return [pool[int(i)] for i in idx]


# ---------------------------------------------------------------------------------------------
# open-ended questions: each returns (question, long answer, short answer)

def qa_count(s: Scene, rng):
    q = choice(rng, ("How many shapes are there in the image?", f"How many {PLURALS[s.shape]} can you see?",
                     "How many objects are in the picture?"))
    return q, f"There {_be(s)} {NUMBER_WORDS[s.count]} {s.color} {s.noun} in the image.", str(s.count)


def qa_color(s: Scene, rng):
    q = choice(rng, (f"What color {_be(s)} {_the_noun(s)}?", "What color are the shapes in the image?"))
    return q, f"{_the_noun(s).capitalize()} {_be(s)} {s.color}.", s.color


def qa_shape(s: Scene, rng):
    q = choice(rng, ("What shape is shown in the image?", f"What kind of {'shape is' if s.count == 1 else 'shapes are'} drawn here?"))
    long = f"It is {article(s.shape)} {s.shape}." if s.count == 1 else f"They are {PLURALS[s.shape]}."
    return q, long, s.shape


def qa_position(s: Scene, rng):
    q = choice(rng, (f"Where {_be(s)} {_the_noun(s)} located?", "In which part of the image are the shapes?"))
    return q, f"{_the_noun(s).capitalize()} {_be(s)} {POSITION_PHRASES[s.position][0]} of the image.", s.position


def _is_position_question(text: str) -> bool:
    """A question qa_position asks (whatever the record's prefix or suffix)."""
    return " located?" in text or "In which part of the image" in text


def qa_size(s: Scene, rng):
    q = f"{'Is' if s.count == 1 else 'Are'} {_the_noun(s)} large or small?"
    return q, f"{_pronoun(s)} {s.size}.", s.size


def qa_background(s: Scene, rng):
    q = choice(rng, ("What does the background look like?", "Describe the background of the image."))
    return q, f"The background is {BG_ADJ[s.background]}.", BG_ADJ[s.background]


def qa_yesno(s: Scene, rng):
    truth = bool(rng.random() < 0.5)
    kind = choice(rng, ("color", "shape", "count", "position"))
    if kind == "color":
        c = s.color if truth else _others(rng, tuple(COLORS), s.color, 1)[0]
        q = f"{'Is' if s.count == 1 else 'Are'} {_the_noun(s)} {c}?"
        long = f"Yes, {_the_noun(s)} {_be(s)} {c}." if truth else f"No, {_the_noun(s)} {_be(s)} {s.color}, not {c}."
    elif kind == "shape":
        sh = s.shape if truth else _others(rng, SHAPES, s.shape, 1)[0]
        q = f"Is there {article(sh)} {sh} in the image?"
        long = f"Yes, there is {article(sh)} {s.color} {sh}." if truth else f"No, the image shows {PLURALS[s.shape] if s.count > 1 else article(s.shape) + ' ' + s.shape}, not {article(sh)} {sh}."
    elif kind == "count":
        k = s.count if truth else _others(rng, (1, 2, 3), s.count, 1)[0]
        q = f"{'Is there exactly one shape' if k == 1 else f'Are there exactly {NUMBER_WORDS[k]} shapes'} in the image?"
        long = f"{'Yes' if truth else 'No'}, there {_be(s)} {NUMBER_WORDS[s.count]}."
    else:
        p = s.position if truth else _others(rng, POSITIONS, s.position, 1)[0]
        q = f"{'Is' if s.count == 1 else 'Are'} {_the_noun(s)} {POSITION_PHRASES[p][0]}?"
        long = f"Yes, {_the_noun(s)} {_be(s)} {POSITION_PHRASES[p][0]}." if truth else f"No, {_the_noun(s)} {_be(s)} {POSITION_PHRASES[s.position][0]}."
    return q, long, "Yes" if truth else "No"


def qa_detail(s: Scene, rng):
    q = choice(rng, ("Describe the image in detail.", "What do you see in this picture? Please be thorough.",
                     "Give a detailed description of the image."))
    return q, describe(s), None  # no short form: never asked in short-answer records


QA_FUNCS = (qa_count, qa_color, qa_shape, qa_position, qa_size, qa_background, qa_yesno, qa_detail)


def qa_record(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """2-4 distinct questions about one image; ~35% of records use short VQA-style answers."""
    short = bool(rng.random() < 0.35)
    funcs = [f for f in QA_FUNCS if not (short and f is qa_detail)]
    k = int(rng.integers(2, 5))
    picked = [funcs[int(i)] for i in rng.permutation(len(funcs))[:k]]
    turns = []
    for j, f in enumerate(picked):
        q, long, short_a = f(scene, rng)
        human = q + SHORT_SUFFIX if short else q
        if j == 0:
            human = IMAGE_TOKEN + "\n" + human
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": short_a if short else long}]
    return turns


# ---------------------------------------------------------------------------------------------
# multiple choice (finetune records and ScienceQA-format problems)

def mc_problem(s: Scene, rng: np.random.Generator) -> dict:
    """A closed-choice or yes/no question about an image, with ScienceQA's metadata fields."""
    kind = choice(rng, ("shape", "color", "count", "position", "yesno"))
    num = NUMBER_WORDS[s.count]
    objects = "object" if s.count == 1 else "objects"
    n_choices = int(rng.integers(2, 5))
    if kind == "shape":
        hint = f"The picture shows {num} {s.color} {objects} on a {BG_ADJ[s.background]} background."
        question, truth, options = "What shape is shown?", s.shape, SHAPES
        topic, category, skill = "shapes", "Identify shapes", "Identify two-dimensional shapes"
        lecture = "A shape is named by its outline: count its sides and corners, or see if it is round."
        solution = f"Look at the outline: it matches {article(s.shape)} {s.shape}."
    elif kind == "color":
        hint = f"The picture shows {num} {s.noun}."
        question, truth, options = f"What color {_be(s)} the {s.noun}?", s.color, tuple(COLORS)
        topic, category, skill = "colors", "Identify colors", "Identify colors"
        lecture = "The color of an object is what you see when light bounces off it."
        solution = f"The {s.noun} {_be(s)} {s.color}."
    elif kind == "count":
        hint = f"Each object in the picture is {article(s.size)} {s.size} {s.color} {s.shape}."
        question, truth, options = "How many shapes are in the picture?", str(s.count), ("1", "2", "3")
        n_choices = min(n_choices, 3)
        topic, category, skill = "counting", "Count objects", "Count objects up to three"
        lecture = "To count objects, point to each one once and say the next number."
        solution = f"There {_be(s)} {num} {s.noun}."
    elif kind == "position":
        hint = f"The picture shows {num} {s.color} {s.noun}."
        question, truth, options = f"Where {_be(s)} the {s.noun}?", POS_WORD[s.position], tuple(POS_WORD.values())
        topic, category, skill = "position", "Describe position", "Describe where objects are"
        lecture = "Words like left, right, top, bottom and center tell where something is in a picture."
        solution = f"The {s.noun} {_be(s)} at {POS_WORD[s.position]} of the picture."
    else:
        k = int(rng.integers(1, 4))
        hint = f"The picture shows some {s.color} {PLURALS[s.shape]}."
        question = f"Are there more than {NUMBER_WORDS[k]} shapes in the picture?"
        truth = "yes" if s.count > k else "no"
        topic, category, skill = "counting", "Compare numbers", "Compare numbers up to three"
        lecture = "More than means a bigger number."
        solution = f"There {_be(s)} {num} {s.noun}, which is {'more' if s.count > k else 'not more'} than {NUMBER_WORDS[k]}."
        return _problem(question, ["yes", "no"], int(truth == "no"), hint, "yes or no", topic, category, skill, lecture, solution, rng)
    choices = [truth] + _others(rng, options, truth, n_choices - 1)
    order = rng.permutation(len(choices))
    choices = [choices[int(i)] for i in order]
    return _problem(question, choices, choices.index(truth), hint, "closed choice", topic, category, skill, lecture, solution, rng)


def _problem(question, choices, answer, hint, task, topic, category, skill, lecture, solution, rng, subject="natural science"):
    return {
        "question": question, "choices": list(choices), "answer": int(answer), "hint": hint, "image": "image.png",
        "task": task, "grade": f"grade{int(rng.integers(1, 5))}", "subject": subject, "topic": topic,
        "category": category, "skill": skill, "lecture": lecture, "solution": solution, "split": "test",
    }


def text_problem(rng: np.random.Generator) -> dict:
    """A ScienceQA-format question with no image."""
    kind = choice(rng, ("sides", "corners", "word"))
    if kind == "sides":
        shape = choice(rng, tuple(SIDES))
        sides = NUMBER_WORDS[SIDES[shape]]
        truth, options = shape, tuple(SIDES) + ("circle",)
        question = f"Which shape has {sides} sides?"
        p = dict(topic="shapes", category="Identify shapes", skill="Count sides of shapes",
                 lecture="A polygon is named by its number of straight sides.",
                 solution=f"{article(shape).capitalize()} {shape} has {sides} sides.", subject="natural science")
    elif kind == "corners":
        truth, options = "circle", SHAPES
        question = "Which shape has no corners?"
        p = dict(topic="shapes", category="Identify shapes", skill="Identify round shapes",
                 lecture="A corner is where two straight sides meet. Round shapes have no corners.",
                 solution="A circle is round, so it has no corners.", subject="natural science")
    else:
        color = choice(rng, tuple(COLORS))
        truth, options = color, (color,) + SHAPES + ("jump", "quickly", "table")
        question = "Which word names a color?"
        p = dict(topic="vocabulary", category="Categories", skill="Sort words into categories",
                 lecture="Some words name colors, some name shapes, and some name actions or things.",
                 solution=f"{color.capitalize()} is a color.", subject="language science")
    n_choices = int(rng.integers(2, 5))
    choices = [truth] + _others(rng, options, truth, n_choices - 1)
    choices = [choices[int(i)] for i in rng.permutation(len(choices))]
    prob = _problem(question, choices, choices.index(truth), "", "closed choice", p["topic"], p["category"],
                    p["skill"], p["lecture"], p["solution"], rng, subject=p["subject"])
    prob["image"] = None
    return prob


def mc_prompt(prob: dict, with_image: bool) -> str:
    """LLaVA's ScienceQA prompt: context, question, lettered options, answer instruction."""
    lines = []
    if prob["hint"]:
        lines.append(f"Context: {prob['hint']}")
    lines.append(prob["question"])
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(prob["choices"])]
    lines.append(MC_SUFFIX)
    text = "\n".join(lines)
    return IMAGE_TOKEN + "\n" + text if with_image else text


# ---------------------------------------------------------------------------------------------
# text-only conversations (no image key, no <image> token)

COLOR_MIX = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple",
             ("red", "white"): "pink", ("black", "white"): "gray"}


def text_only_record(rng: np.random.Generator) -> list[dict]:
    turns = []
    for _ in range(int(rng.integers(1, 3))):
        kind = choice(rng, ("add", "sub", "mix", "sides"))
        if kind == "add":
            a, b = (int(x) for x in rng.integers(0, 20, 2))
            q, a_ = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == "sub":
            a, b = sorted(int(x) for x in rng.integers(0, 20, 2))[::-1]
            q, a_ = f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
        elif kind == "mix":
            (c1, c2), res = list(COLOR_MIX.items())[int(rng.integers(len(COLOR_MIX)))]
            q, a_ = f"What color do you get when you mix {c1} and {c2}?", f"Mixing {c1} and {c2} gives {res}."
        else:
            shape = choice(rng, tuple(SIDES))
            q, a_ = f"How many sides does {article(shape)} {shape} have?", f"{article(shape).capitalize()} {shape} has {NUMBER_WORDS[SIDES[shape]]} sides."
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a_}]
    return turns


# ---------------------------------------------------------------------------------------------
# LLaVA-Bench-style items

def bench_items(s: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(category, question, reference answer) for conv, detail and complex."""
    q, long, _ = choice(rng, (qa_count, qa_color, qa_shape, qa_position))(s, rng)
    items = [("conv", q, long), ("detail", "Describe this image in detail.", describe(s))]
    kind = choice(rng, ("add", "recolor", "space"))
    if kind == "add":
        q = f"If one more {s.color} {s.shape} were added to the picture, how many would there be, and what would stay the same?"
        a = (f"There would be {NUMBER_WORDS[s.count + 1]} {s.color} {PLURALS[s.shape]}. Their color and shape, "
             f"and the {BG_ADJ[s.background]} background, would stay the same; only the count changes.")
    elif kind == "recolor":
        other = _others(rng, tuple(COLORS), s.color, 1)[0]
        q = (f"Suppose the {s.noun} {'was' if s.count == 1 else 'were'} repainted {other}. Which answers about the image would change: "
             "the color, the shape, or the number of shapes?")
        a = (f"Only the color would change, from {s.color} to {other}. There would still be {NUMBER_WORDS[s.count]} "
             f"{s.noun}, {POSITION_PHRASES[s.position][0]}.")
    else:
        free = {"left": "right side", "right": "left side", "top": "bottom", "bottom": "top", "center": "corners"}[s.position]
        q = "Which part of the image is empty, and where could a new shape go without touching the existing ones?"
        a = (f"The {s.noun} {_be(s)} {POSITION_PHRASES[s.position][0]}, so the {free} of the image {'are' if free == 'corners' else 'is'} empty. "
             f"A new shape placed at the {free} would not touch the {s.noun}.")
    items.append(("complex", q, a))
    return items


def _answer_id(seed: int, qid: int) -> str:
    # stands in for LLaVA's shortuuid, but reproducible
    return hashlib.sha1(f"synth-bench-{seed}-{qid}".encode()).hexdigest()[:22]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-drip synth llava",
        description="Write deterministic synthetic LLaVA data on coloured-shape images: stage-1 captions, "
        "stage-2 instruction data, ScienceQA-format and LLaVA-Bench-format held-out eval files.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    p.add_argument("--n", type=int, default=2000, help="number of training images (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--n-sqa", type=int, default=60, help="held-out ScienceQA-format test problems (default 60)")
    p.add_argument("--n-bench-images", type=int, default=4,
                   help="held-out LLaVA-Bench images, three questions each (default 4 -> 12 questions)")
    p.add_argument("--mc-fraction", type=float, default=0.2,
                   help="share of image records in finetune.json that are multiple choice (default 0.2)")
    p.add_argument("--position-qa", type=float, default=0.0,
                   help="chance that a QA record without a position question gets one more turn asking where the "
                        "shapes are (default 0; the built-in model uses 1: position needs far more examples to learn)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.image_size < 8 or args.n_sqa < 0 or args.n_bench_images < 0 or not 0 <= args.mc_fraction <= 1 \
            or not 0 <= args.position_qa <= 1:
        raise SystemExit("synth llava: need --n >= 1, --image-size >= 8, --n-sqa >= 0, --n-bench-images >= 0, 0 <= --mc-fraction <= 1, 0 <= --position-qa <= 1")
    out = args.out.resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)

    pretrain, finetune = [], []
    n_mc = n_pos = 0
    for i in tqdm(range(args.n), desc="train images", disable=args.quiet):
        rng = rng_for(args.seed, STREAM_TRAIN, i)
        scene = sample_scene(rng)
        (out / "images" / f"{i:06d}.png").write_bytes(png_bytes(render(scene, rng, args.image_size)))
        rel = f"images/{i:06d}.png"  # relative to --image_folder = --out
        pretrain.append({"id": f"{i:06d}", "image": rel, "conversations": [
            {"from": "human", "value": IMAGE_TOKEN + "\n" + choice(rng, BRIEF_PROMPTS)},
            {"from": "gpt", "value": caption(scene, rng)},
        ]})
        if rng.random() < args.mc_fraction:
            prob = mc_problem(scene, rng)
            turns = [{"from": "human", "value": mc_prompt(prob, True)},
                     {"from": "gpt", "value": LETTERS[prob["answer"]]}]
            n_mc += 1
        else:
            turns = qa_record(scene, rng)
            asked = [t["value"] for t in turns if t["from"] == "human"]
            if args.position_qa and not any(_is_position_question(q) for q in asked) \
                    and rng.random() < args.position_qa:
                q, long, short_a = qa_position(scene, rng)  # drawn last: --position-qa 0 leaves the files as they were
                short = asked[0].endswith(SHORT_SUFFIX)
                turns += [{"from": "human", "value": q + SHORT_SUFFIX if short else q},
                          {"from": "gpt", "value": short_a if short else long}]
                n_pos += 1
        finetune.append({"id": f"{i:06d}", "image": rel, "conversations": turns})

    # text-only records make up TEXT_ONLY_FRACTION of the finished file
    n_text = max(1, round(args.n * TEXT_ONLY_FRACTION / (1 - TEXT_ONLY_FRACTION)))
    for j in range(n_text):
        finetune.append({"id": f"text-{j:06d}", "conversations": text_only_record(rng_for(args.seed, STREAM_TEXT, j))})
    order = np.random.default_rng([args.seed, STREAM_ORDER]).permutation(len(finetune))
    finetune = [finetune[int(k)] for k in order]
    _write_json(out / "pretrain.json", pretrain)
    _write_json(out / "finetune.json", finetune)

    # ScienceQA-format held-out test split; pids are "1", "2", ... as in ScienceQA
    sqa = out / "sqa"
    sqa.mkdir(parents=True, exist_ok=True)
    problems = {}
    n_sqa_img = 0
    for k in tqdm(range(args.n_sqa), desc="sqa", disable=args.quiet):
        pid = str(k + 1)
        rng = rng_for(args.seed, STREAM_SQA, k)
        if rng.random() < 0.75:
            scene = sample_scene(rng)
            d = sqa / "images" / "test" / pid
            d.mkdir(parents=True, exist_ok=True)
            (d / "image.png").write_bytes(png_bytes(render(scene, rng, args.image_size)))
            problems[pid] = mc_problem(scene, rng)
            n_sqa_img += 1
        else:
            problems[pid] = text_problem(rng)
    pids = list(problems)
    _write_json(sqa / "problems.json", problems)
    _write_json(sqa / "pid_splits.json", {"train": [], "val": [], "test": pids, "trainval": [],
                                          "minitrain": [], "minival": [], "minitest": pids[::10]})

    # LLaVA-Bench-in-the-Wild format
    bench = out / "bench"
    (bench / "images").mkdir(parents=True, exist_ok=True)
    questions, answers, contexts = [], [], []
    for b in range(args.n_bench_images):
        rng = rng_for(args.seed, STREAM_BENCH, b)
        scene = sample_scene(rng)
        name = f"{b + 1:03d}.png"
        (bench / "images" / name).write_bytes(png_bytes(render(scene, rng, args.image_size)))
        contexts.append({"id": f"{b + 1:03d}", "image": name, "caption": describe(scene)})
        for category, q, a in bench_items(scene, rng):
            qid = len(questions)
            questions.append({"image": name, "text": q, "category": category, "question_id": qid})
            answers.append({"question_id": qid, "prompt": q, "answer_id": _answer_id(args.seed, qid),
                            "model_id": "synthetic-reference", "metadata": {}, "text": a})
    _write_jsonl(bench / "questions.jsonl", questions)
    _write_jsonl(bench / "answers_ref.jsonl", answers)
    _write_jsonl(bench / "context.jsonl", contexts)

    meta = {
        "generator": "llava_drip.data.synth_llava",
        "n": args.n,
        "seed": args.seed,
        "image_size": args.image_size,
        "image_folder": ".",
        "counts": {
            "pretrain": len(pretrain),
            "finetune": len(finetune),
            "finetune_qa": args.n - n_mc,
            "finetune_multiple_choice": n_mc,
            "finetune_extra_position_turns": n_pos,
            "finetune_text_only": n_text,
            "sqa_test": len(problems),
            "sqa_with_image": n_sqa_img,
            "bench_images": args.n_bench_images,
            "bench_questions": len(questions),
        },
        "files": {
            "pretrain": "pretrain.json",
            "finetune": "finetune.json",
            "sqa_problems": "sqa/problems.json",
            "sqa_pid_splits": "sqa/pid_splits.json",
            "sqa_images": "sqa/images",
            "bench_questions": "bench/questions.jsonl",
            "bench_answers": "bench/answers_ref.jsonl",
            "bench_context": "bench/context.jsonl",
            "bench_images": "bench/images",
        },
    }
    _write_json(out / "meta.json", meta)
    if not args.quiet:
        print(f"wrote {len(pretrain)} pretrain and {len(finetune)} finetune records, {len(problems)} SQA problems, "
              f"{len(questions)} bench questions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
