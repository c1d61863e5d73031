"""The built-in model that ships in the repository (llava_drip/assets/tiny-llava): how it is made,
checked and measured. `llava-drip demo`, `chat` and `serve-api` load it when no --model-path is given.

    python -m llava_drip.train.builtin_model build    (scripts/tiny/build_builtin.sh runs build + eval)
        1. DRIP-4x-tiny tower: `llava-drip clip-train` with the mini reproduction's recipe and data
           (llava_drip/clip/repro.py; an existing run under --clip-out with the same flags is reused)
        2. tiny Llama, stage 1 and stage 2 on synthetic scenes (llava_drip/train/tiny_pipeline.py)
        3. copies the inference files to --dest with MANIFEST.json: the recipe and a sha256 per file
    python -m llava_drip.train.builtin_model eval      held-out colour / shape / count / position accuracy
    python -m llava_drip.train.builtin_model verify    the shipped files against MANIFEST.json
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "llava_drip" / "assets" / "tiny-llava"
MANIFEST = "MANIFEST.json"
TOWER = "DRIP-4x-tiny"
# what inference reads; training state (optimizer, training_args.bin: a pickle) stays behind
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
         "tokenizer_config.json", "train_summary.json")
EVAL_SEED = 7  # held-out scenes: a data seed no training run uses (they use 0)
KINDS = ("colour", "shape", "count", "position")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def verify(folder: Path = SHIPPED) -> Dict:
    """The manifest, after checking every listed file's size and sha256 (ValueError naming the file)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest, so this is not a shipped built-in model folder")
    manifest = json.loads(path.read_text())
    for name, want in manifest["files"].items():
        f = Path(folder) / name
        if not f.is_file():
            raise ValueError(f"{f}: listed in {MANIFEST} but missing")
        if f.stat().st_size != want["bytes"] or sha256(f) != want["sha256"]:
            raise ValueError(f"{f}: size or sha256 differs from {MANIFEST} (a Git LFS pointer, a partial "
                             "checkout or an edit); rebuild with scripts/tiny/build_builtin.sh")
    return manifest


def _portable_config(src: Path, dst: Path) -> None:
    """config.json without this machine's paths: the tower's weights are inside model.safetensors."""
    cfg = json.loads(src.read_text())
    if cfg.get("mm_vision_tower_pretrained"):
        cfg["mm_vision_tower_pretrained"] = os.path.basename(cfg["mm_vision_tower_pretrained"])
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def ship(stage2: Path, dest: Path, recipe: Dict) -> Dict:
    """Copy the inference files of `stage2` into `dest` (replaced whole, via a temporary folder) with MANIFEST.json."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in FILES:
        src = Path(stage2) / name
        if not src.is_file():
            raise FileNotFoundError(f"{src}: the finished model lacks it")
        if name == "config.json":
            _portable_config(src, tmp / name)
        else:
            shutil.copyfile(src, tmp / name)
    manifest = {"name": "llava-drip-tiny",
                "about": "tiny LLaVA-DRIP trained on CPU on synthetic scenes of coloured shapes only",
                "made_by": "scripts/tiny/build_builtin.sh", "git_commit": _git_commit(),
                "date": time.strftime("%Y-%m-%d"), "recipe": recipe,
                "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256(tmp / n)} for n in FILES}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)  # a crash from here on leaves the previous model beside the new one, never neither
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def shipped_tower(model: Path, out: Path) -> Dict:
    """The shipped model's DRIP tower as a tower-only safetensors file (what `--tower-from` reuses), with
    where it came from: the tower part of that model's recipe."""
    from safetensors.torch import load_file, save_file
    manifest = verify(model)
    prefix = "model.vision_tower.vision_tower."
    sd = {k[len(prefix):]: v for k, v in load_file(str(Path(model) / "model.safetensors")).items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{model}/model.safetensors holds no {prefix}* weights")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"visual." + k: v.contiguous() for k, v in sd.items()}, str(tmp))  # clip-train export layout
    os.replace(tmp, out)
    tower = dict(manifest["recipe"]["tower"])
    # the model it was taken from this time (that model's own taken_from, if any, is one step further back)
    tower["taken_from"] = {"model": manifest["files"]["model.safetensors"]["sha256"],
                           "git_commit": manifest.get("git_commit")}
    return {"weights": str(out), "recipe": tower}


def build(work: Path, dest: Path, clip_out: Path, clip_args: List[str], n: int, stage2_epochs: int,
          lm_steps: int, seed: int = 0, stage1_epochs: int = 1, tower_from: Optional[Path] = None,
          tower_lr: Optional[float] = None, token_pos: Optional[str] = "centroid", position_qa: float = 1.0) -> Path:
    """tower_from: take the tower from this shipped model instead of training it (the recipe it records
    is carried over); tower_lr: stage 2 also trains the tower at this learning rate (LLaVA-NeXT's
    --mm_tunable_parts / --mm_vision_tower_lr); token_pos: --mm_vision_token_pos (centroid: each visual token
    carries where it lies); position_qa: synth llava's --position-qa (a tiny LLM needs several times the
    position questions of the default mix to learn to read that code)."""
    from llava_drip.train import tiny_pipeline

    if tower_from is not None:
        taken = shipped_tower(Path(tower_from), Path(work) / f"{TOWER}-tower.safetensors")
        weights, tower_recipe = taken["weights"], taken["recipe"]
    else:
        from llava_drip.clip import repro
        a = repro.build_parser().parse_args(clip_args)
        data = repro.make_data(Path(clip_out).resolve(), a.n, a.data_seed, a.val_per_class)
        info = repro.train(TOWER, data, Path(clip_out).resolve(), a, seed)  # reused when already trained
        weights = info["weights"]
        tower_recipe = {"model": TOWER, "command": "clip-train " + " ".join(repro.train_argv(TOWER, data, clip_out, a, seed)),
                        "train_wall_s": info.get("wall_s")}
    extra = None
    if tower_lr is not None:
        extra = {"mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_vision_tower_lr": tower_lr}
    t0 = time.time()
    stage2 = tiny_pipeline.build(str(work), n=n, seed=seed, tower=TOWER, tower_checkpoint=weights,
                                 lm_steps=lm_steps, stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs,
                                 stage2_extra=extra, token_pos=token_pos, position_qa=position_qa)
    recipe = {"tower": tower_recipe,
              "llava": {"n_images": n, "seed": seed, "lm_steps": lm_steps, "stage1_epochs": stage1_epochs,
                        "stage2_epochs": stage2_epochs, "stage2_tower_lr": tower_lr, "token_pos": token_pos,
                        "position_qa": position_qa,
                        "pipeline": "llava_drip.train.tiny_pipeline.build", "wall_s": round(time.time() - t0, 1)}}
    ship(Path(stage2), dest, recipe)
    print(f"built-in model written to {dest}", flush=True)
    return Path(dest)


# ---- held-out accuracy -------------------------------------------------------------------------------
SHIPPED_TOWER_RECIPE = "--epochs 8 --batch-size 128 --val-per-class 20"
AIMS = {"colour": 0.95, "shape": 0.85, "count": 0.85, "position": 0.85}  # issue 11
STREAM_HELDOUT = 6  # (seed, stream, index) generators no data writer uses


def _named(answer: str, kind: str) -> set:
    """The values of `kind` an answer names: colours, shapes (plurals folded), counts (words or digits),
    positions ('middle' is the center)."""
    from llava_drip.data.shapes import COLORS, NUMBER_WORDS, PLURALS, POSITIONS, SHAPES
    words = re.findall(r"[a-z0-9]+", answer.lower())
    if kind == "colour":
        return {w for w in words if w in COLORS}
    if kind == "shape":
        singular = {p: s for s, p in PLURALS.items()}
        return {singular.get(w, w) for w in words if w in SHAPES or w in singular}
    if kind == "count":
        digits = {str(k): k for k in NUMBER_WORDS} | {w: k for k, w in NUMBER_WORDS.items()}
        return {digits[w] for w in words if w in digits}
    return {"center" if w == "middle" else w for w in words if w in POSITIONS or w == "middle"}


def heldout_questions(n_per_kind: int, eval_seed: int = EVAL_SEED, image_size: int = 64):
    """[(kind, scene, image, question, truth)]: training's open question phrasings (synth llava's qa_*)
    about scenes drawn from generators no training run used."""
    from llava_drip.data import synth_llava
    from llava_drip.data.shapes import render, rng_for, sample_scene
    ask = {"colour": (synth_llava.qa_color, "color"), "shape": (synth_llava.qa_shape, "shape"),
           "count": (synth_llava.qa_count, "count"), "position": (synth_llava.qa_position, "position")}
    out = []
    for k, kind in enumerate(KINDS):
        fn, attr = ask[kind]
        for i in range(n_per_kind):
            rng = rng_for(eval_seed, STREAM_HELDOUT, k * n_per_kind + i)
            scene = sample_scene(rng)
            image = render(scene, rng, image_size)
            question = fn(scene, rng)[0]
            out.append((kind, scene, image, question, getattr(scene, attr)))
    return out


def evaluate(model: Path, out: Path, n_per_kind: int, eval_seed: int = EVAL_SEED) -> Dict:
    """Greedy answers to held-out open questions; an answer is right when it names the true value and no
    other value of that kind ('The stars are blue.' for blue stars; 'blue or red' is wrong)."""
    from tqdm import tqdm

    from llava_drip.data.shapes import COLORS, COUNTS, POSITIONS, SHAPES
    from llava_drip.serve.engine import ChatEngine
    engine = ChatEngine(str(model), device="cpu")
    options = {"colour": len(COLORS), "shape": len(SHAPES), "count": len(COUNTS), "position": len(POSITIONS)}
    rows, tokens = [], []
    for kind, scene, image, question, truth in tqdm(heldout_questions(n_per_kind, eval_seed), desc="held-out"):
        text, stats = engine.chat([{"role": "user", "content": question}], image, temperature=0.0, max_new_tokens=24)
        named = _named(text, kind)
        rows.append({"kind": kind, "question": question, "answer": text, "truth": truth, "scene": scene.__dict__,
                     "right": named == {truth}, "visual_tokens": stats.visual_tokens_out})
        tokens.append(stats.visual_tokens_out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    by_kind = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        right = sum(r["right"] for r in mine)
        by_kind[kind] = {"correct": right, "n": len(mine), "accuracy": right / len(mine) if mine else None,
                         "chance": 1 / options[kind]}
    return {"model": str(model), "n": len(rows), "eval_seed": eval_seed, "stream": STREAM_HELDOUT,
            "accuracy": sum(r["right"] for r in rows) / len(rows), "by_kind": by_kind,
            "tokens_mean": sum(tokens) / len(tokens), "tokens_min": min(tokens), "tokens_max": max(tokens),
            "answers": str(out / "answers.jsonl")}


def record_heldout(folder: Path, result: Dict) -> None:
    """Put the held-out accuracies into the folder's MANIFEST.json (outside the checksummed files), where
    the demo reads them, so the page never shows figures of another build."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    manifest["held_out"] = {"n_per_kind": result["n"] // len(KINDS), "eval_seed": result["eval_seed"],
                            "accuracy": {k: v["accuracy"] for k, v in result["by_kind"].items()},
                            "tokens_mean": result["tokens_mean"]}
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def write_report(doc: Path, result: Dict, command: str) -> None:
    kinds = result["by_kind"]
    lines = ["# The built-in model: held-out accuracy", "",
             "`llava-drip demo`, `chat` and `serve-api` load the model shipped in `llava_drip/assets/tiny-llava` "
             "when no `--model-path` is given. It is tiny (a 2-block Llama of width 128, the DRIP-4x-tiny tower) and "
             "knows synthetic scenes of coloured shapes only. How it was made: its `MANIFEST.json` and "
             "`scripts/tiny/build_builtin.sh`.", "", "Measured by:", "", "```", command, "```", "",
             f"- {result['n']} open questions, {result['n'] // len(KINDS)} per kind, phrased as stage 2's open "
             "questions are (synth llava's qa_color / qa_shape / qa_count / qa_position), about scenes drawn from "
             f"generators (seed {result['eval_seed']}, stream {result['stream']}, index) that no training run "
             "used (training: seed 0, streams 0-5). Greedy, 64 px, vicuna_v1.",
             "- An answer is right when it names the true value and no other value of that kind ('The stars are "
             "at the top of the image.'). Chance is a uniform guess among the kind's values.",
             f"- Visual tokens per image at the model's default budget (calibrated, mean:0.25): "
             f"{result['tokens_mean']:.1f} on average, {result['tokens_min']}-{result['tokens_max']} (64 patches).", "",
             "| question kind | right | asked | accuracy % | chance % |", "|---|---|---|---|---|"]
    for k in KINDS:
        v = kinds[k]
        lines.append(f"| {k} | {v['correct']} | {v['n']} | {100 * v['accuracy']:.1f} | {100 * v['chance']:.1f} |")
    lines += [f"| all | {round(result['accuracy'] * result['n'])} | {result['n']} | {100 * result['accuracy']:.1f} | |", ""]
    weak = [f"{k} ({100 * kinds[k]['accuracy']:.0f} % < {100 * AIMS[k]:.0f} %)" for k in KINDS
            if kinds[k]["accuracy"] < AIMS[k]]
    aims = ", ".join(f"{k} {100 * AIMS[k]:.0f} %" for k in KINDS)
    lines += [(f"Below the accuracy aimed at ({aims}): {', '.join(weak)}." if weak else
               f"Every kind meets the accuracy aimed at ({aims}).")
              + " The demo's page shows these figures (read from the model's MANIFEST.json) next to the chat.", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, doc)
    jtmp = doc.with_suffix(".json.tmp")
    jtmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(jtmp, doc.with_suffix(".json"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m llava_drip.train.builtin_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train and ship the built-in model")
    b.add_argument("--work", type=Path, default=REPO / "runs" / "builtin", help="training folders (git-ignored)")
    b.add_argument("--dest", type=Path, default=SHIPPED, help=f"where the model ships (default {SHIPPED})")
    b.add_argument("--clip-out", type=Path, default=REPO / "runs" / "clip_builtin_tower",
                   help="where the tower is trained (a DRIP-4x-tiny seed-0 run there is reused, so keep it apart "
                   "from the mini reproduction's runs, which follow another recipe)")
    # the shipped tower's recipe: the mini reproduction's before it moved to 9 x 400 steps of 64
    b.add_argument("--clip-args", default=SHIPPED_TOWER_RECIPE,
                   help=f"flags for llava_drip.clip.repro's recipe (default: {SHIPPED_TOWER_RECIPE!r})")
    b.add_argument("--n", type=int, default=3000, help="synthetic LLaVA training images")
    b.add_argument("--stage1-epochs", type=int, default=2)
    b.add_argument("--stage2-epochs", type=int, default=20)
    b.add_argument("--lm-steps", type=int, default=150)
    b.add_argument("--tower-from", type=Path, default=None,
                   help="reuse the DRIP tower of this shipped model (e.g. llava_drip/assets/tiny-llava) instead of "
                        "running clip-train; its recipe is carried into the new manifest")
    b.add_argument("--tower-lr", type=float, default=None,
                   help="stage 2 also trains the tower at this learning rate (--mm_tunable_parts with "
                        "mm_vision_tower, --mm_vision_tower_lr); default: frozen")
    b.add_argument("--token-pos", default="centroid", choices=["centroid", "none"],
                   help="--mm_vision_token_pos for LLaVA's stages (default centroid)")
    b.add_argument("--position-qa", type=float, default=1.0,
                   help="synth llava's --position-qa for the LLaVA data (default 1: every QA record asks where)")
    e = sub.add_parser("eval", help="held-out accuracy per question kind")
    e.add_argument("--model", type=Path, default=SHIPPED)
    e.add_argument("--out", type=Path, default=REPO / "runs" / "builtin_eval", help="held-out data and answers")
    e.add_argument("--n", type=int, default=100, help="questions per kind (colour, shape, count, position)")
    e.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    e.add_argument("--doc", type=Path, default=REPO / "docs" / "results" / "builtin_model.md")
    v = sub.add_parser("verify", help="check the shipped files against MANIFEST.json")
    v.add_argument("--model", type=Path, default=SHIPPED)
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.work, a.dest, a.clip_out, a.clip_args.split(), a.n, a.stage2_epochs, a.lm_steps,
              stage1_epochs=a.stage1_epochs, tower_from=a.tower_from, tower_lr=a.tower_lr,
              token_pos=None if a.token_pos == "none" else a.token_pos, position_qa=a.position_qa)
    elif a.cmd == "eval":
        result = evaluate(a.model, a.out, a.n, a.eval_seed)
        write_report(a.doc, result, "python -m llava_drip.train.builtin_model " + " ".join(argv))
        record_heldout(a.model, result)
        print(json.dumps({k: round(v["accuracy"], 3) for k, v in result["by_kind"].items()}))
    else:
        m = verify(a.model)
        print(f"{a.model}: {len(m['files'])} files match {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
