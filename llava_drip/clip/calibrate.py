"""`llava-drip calibrate`: fit a DRIP tower's 'calibrated' boundaries on held-out images.

The cut on the predictor's logits is chosen so that the mean visual tokens per patch over the images
equals the target (the prior p by default); each image still keeps its own count. The calibration (a
curve of logit quantiles, so any mean budget can be served later) is written into the checkpoint,
which then loads everywhere as before: clip-train resume, zeroshot, tokens, LLaVA's tower.

    llava-drip calibrate --model DRIP-4x-32 --checkpoint runs/clip/checkpoints/epoch_32.pt held_out/ \
        [--target 0.25] [--out calibrated.pt] [--eval more_images/] [--json report.json]

clip-train calls `calibrate_checkpoint` on its final checkpoint when held-out images are at hand.
torch is imported inside the functions that use it, so `--help` answers without it.
"""
import argparse
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_logger = logging.getLogger(__name__)

CALIB_KEYS = ("visual.calib_quantiles", "visual.calib_target")


def count_distribution(counts: Sequence[int], num_patches: int, bins: int = 10) -> Dict:
    """mean / std / min / max of per-image token counts, as counts and as a share of the patches,
    plus a histogram over [0, N] in `bins` equal bins."""
    import torch
    t = torch.tensor(list(counts), dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no images")
    edges = torch.linspace(0, num_patches, bins + 1)
    hist = torch.histc(t, bins=bins, min=0, max=num_patches).long().tolist()
    return {"images": int(t.numel()), "patches": num_patches, "mean": float(t.mean()),
            "std": float(t.std(unbiased=False)), "min": int(t.min()), "max": int(t.max()),
            "mean_ratio": float(t.mean()) / num_patches, "distinct": int(t.unique().numel()),
            "hist_edges": [round(float(e), 2) for e in edges], "hist": hist}


def format_distribution(d: Dict, label: str) -> str:
    lines = [f"{label}: {d['images']} images, tokens per image mean {d['mean']:.2f} (ratio {d['mean_ratio']:.4f}), "
             f"std {d['std']:.2f}, min {d['min']}, max {d['max']}, {d['distinct']} distinct counts (of {d['patches']} patches)"]
    peak = max(d["hist"]) or 1
    for lo, hi, n in zip(d["hist_edges"][:-1], d["hist_edges"][1:], d["hist"]):
        lines.append(f"  [{lo:6.1f}, {hi:6.1f}) {n:5d} {'#' * round(40 * n / peak)}")
    return "\n".join(lines)


def image_files(paths: Sequence[str]) -> List[Path]:
    """Files from image paths, folders (recursive) and CSV files (open_clip's `filepath` column)."""
    from llava_drip.inspect.tokens import expand_paths
    out, plain = [], []
    for p in paths:
        if str(p).endswith((".csv", ".tsv")):
            with open(p, newline="") as f:
                rows = csv.DictReader(f, delimiter="\t")
                if "filepath" not in (rows.fieldnames or []):
                    raise ValueError(f"{p}: no 'filepath' column (tab-separated, as open_clip_train reads it)")
                out += [Path(r["filepath"]) for r in rows]
        else:
            plain.append(p)
    files, _, _ = expand_paths(plain)
    return out + files


def _batches(files: Sequence[Path], preprocess, batch_size: int, skipped: List[str]):
    import torch
    from llava_drip.inspect.tokens import load_image
    chunk = []
    for f in files:
        try:
            chunk.append(preprocess(load_image(f)[0]))
        except Exception as e:  # a bad file is named and counted, the rest goes on
            skipped.append(f"{f}: {type(e).__name__}: {e}")
            continue
        if len(chunk) == batch_size:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


def token_counts(tower, files: Sequence[Path], preprocess, budget=None, batch_size: int = 32,
                 skipped: Optional[List[str]] = None) -> List[int]:
    """Visual tokens per readable image; unreadable ones are appended to `skipped`."""
    import torch
    skipped = [] if skipped is None else skipped
    counts = []
    with torch.no_grad():
        for x in _batches(files, preprocess, batch_size, skipped):
            counts += [t.shape[0] for t in tower.encode_tokens(x.to(next(tower.parameters()).dtype), budget=budget)]
    return counts


def _write_calibration(path: str, tower, out: Optional[str]):
    """Put the tower's calibration buffers into the checkpoint file (torch or safetensors), atomically."""
    import torch
    from llava_drip.utils import atomic_save_tensors
    target = out or path
    values = {"visual.calib_quantiles": tower.calib_quantiles.detach().cpu().clone(),
              "visual.calib_target": tower.calib_target.detach().cpu().clone()}
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
        if not any(k.startswith("visual.") for k in sd):  # a tower-only file
            values = {k[len("visual."):]: v for k, v in values.items()}
        sd.update(values)
        atomic_save_tensors(sd, target)
        return target
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    prefix = "module." if sd and all(k.startswith("module.") for k in sd) else ""
    for k, v in values.items():
        sd[prefix + k] = v
    tmp = f"{target}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, target)
    return target


def calibrate_checkpoint(model_name: str, checkpoint: str, images: Sequence[str], target: Optional[float] = None,
                         out: Optional[str] = None, batch_size: int = 32, device: str = "cpu") -> Dict:
    """Calibrate `checkpoint` on `images` and write it (to `out`, or in place). Returns the report."""
    from .zeroshot import load_model_and_transforms
    model, _, preprocess = load_model_and_transforms(model_name, checkpoint)
    tower = model.visual.to(device).eval()
    if not hasattr(tower, "calibrate"):
        raise ValueError(f"{model_name} is not a DRIP model: nothing to calibrate")
    files = image_files(images)
    if not files:
        raise ValueError(f"no images found in {' '.join(map(str, images))}")
    skipped: List[str] = []
    stats = tower.calibrate(_batches(files, preprocess, batch_size, skipped), target=target)
    written = _write_calibration(checkpoint, tower, out)
    report = {"model": model_name, "checkpoint": written, "target": stats["target"], "skipped": skipped,
              "calibration": count_distribution(stats["counts"], tower.num_patches)}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="held-out images: files, folders (recursive) or open_clip CSVs")
    p.add_argument("--model", required=True, help="registered DRIP model name, e.g. DRIP-4x-32")
    p.add_argument("--checkpoint", required=True, help="clip-train checkpoint (.pt) or safetensors")
    p.add_argument("--target", type=float, default=None, help="mean visual tokens per patch (default: the prior p)")
    p.add_argument("--out", default=None, help="write the calibrated checkpoint here (default: in place)")
    p.add_argument("--eval", nargs="*", default=None, metavar="IMAGES",
                   help="more held-out images to report the calibrated counts on")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.target is not None and not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    try:
        report = calibrate_checkpoint(args.model, args.checkpoint, args.images, args.target, args.out,
                                      args.batch_size, args.device)
    except ValueError as e:
        print(f"llava-drip calibrate: {e}", file=sys.stderr)
        return 2
    n = report["calibration"]["patches"]
    print(f"calibrated {args.model} to a mean of {report['target']:.4f} tokens per patch "
          f"({report['target'] * n:.1f} of {n}); wrote {report['checkpoint']}")
    print(format_distribution(report["calibration"], "calibration images"))
    if args.eval:
        from .zeroshot import load_model_and_transforms
        model, _, preprocess = load_model_and_transforms(args.model, report["checkpoint"])
        counts = token_counts(model.visual.to(args.device).eval(), image_files(args.eval), preprocess,
                              batch_size=args.batch_size, skipped=report["skipped"])
        report["eval"] = count_distribution(counts, n)
        print(format_distribution(report["eval"], "held-out images"))
    for s in report["skipped"]:
        print(f"skipped {s}", file=sys.stderr)
    if args.json:
        from llava_drip.eval.io_utils import write_json
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
