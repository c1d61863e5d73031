"""Names the command line offers, importable without torch or open_clip: registered model names, DRIP
eval modes, and `llava-drip models` itself. Parsers read these, so `llava-drip <command> --help` stays fast.

factory.py re-exports `list_models`, `CONFIG_DIR`, `BASELINES` and `cli_models`; boundary.py `EVAL_MODES`.
"""
import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
# open_clip's own configs that the project treats as its baselines
BASELINES = ("ViT-B-32", "ViT-B-16")

# calibrated: the cut on the logits whose mean count over held-out images is the tower's calibration
# target (budget.py); threshold: each token's mode (logit > 0); topk: round(p N) per image; sample: seeded
EVAL_MODES = ("calibrated", "threshold", "topk", "sample")


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def list_models():
    """Every model name this project registers: its JSON configs plus open_clip's ViT baselines."""
    names = {p.stem for p in CONFIG_DIR.glob("*.json")} | set(BASELINES)
    return sorted(names, key=_natural_key)


def cli_models(argv) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="llava-drip models", description="list registered model names")
    parser.add_argument("--json", action="store_true", help="print name, kind and key sizes as JSON")
    args = parser.parse_args(argv)
    from .factory import get_model_config  # open_clip: the baselines' configs are its own
    rows = []
    for name in list_models():
        cfg = get_model_config(name)
        v, d = cfg["vision_cfg"], cfg.get("drip_cfg")
        rows.append({"model": name, "kind": "drip" if d else "vit", "image_size": v["image_size"],
                     "patch_size": v["patch_size"], "width": v["width"], "layers": v["layers"],
                     "prior": d["prior"] if d else None,
                     "depth": f"{d['pre_layers']}+{d['post_layers']}" if d else str(v["layers"])})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'model':<20} {'kind':<5} {'img':>4} {'patch':>5} {'width':>5} {'depth':>6} {'prior':>6}")
        for r in rows:
            prior = "" if r["prior"] is None else f"{r['prior']:.2f}"
            print(f"{r['model']:<20} {r['kind']:<5} {r['image_size']:>4} {r['patch_size']:>5} {r['width']:>5} "
                  f"{r['depth']:>6} {prior:>6}")
    return 0
