"""`llava-drip tokens`: per image, patch tokens in, visual tokens out (what the LLM receives), ratio,
and optionally a boundary map: the model's input crop with each segment coloured.

Images go through the model's own eval transform (resize shortest side, centre crop, normalise), so
the counts and maps are for exactly what the tower sees. Any PIL-readable file of any mode works;
an unreadable one is reported by name and the run goes on (exit status 1 at the end).
torch and the model load inside the functions that need them, so `--help` answers without them.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .. import image_io
from ..drip.names import EVAL_MODES, list_models

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- inputs ------------------------------------------------------------------------------------------
def _image_extensions() -> set:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def expand_folders(paths: Iterable[str]) -> Tuple[List[Path], int, bool, List[str]]:
    """Like expand_paths, plus the folders given that hold no image file at all (named to the user:
    a folder is searched, so one with nothing to count is a mistake worth a line, not silence)."""
    exts = _image_extensions()
    files, skipped, any_dir, empty = [], 0, False, []
    for p in map(Path, paths):
        if p.is_dir():
            any_dir = True
            found = 0
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                if f.suffix.lower() in exts:
                    files.append(f)
                    found += 1
                else:
                    skipped += 1
            if not found:
                empty.append(str(p))
        else:
            files.append(p)  # missing or unreadable files are reported when loaded
    return files, skipped, any_dir, empty


def expand_paths(paths: Iterable[str]) -> Tuple[List[Path], int, bool]:
    """Files to process: explicit files as given; folders searched recursively for image extensions.
    Returns (files, non-image files skipped in folders, whether any folder was given)."""
    files, skipped, any_dir, _ = expand_folders(paths)
    return files, skipped, any_dir


# one conversion for the whole project (llava_drip.image_io); kept importable here for older callers
to_rgb = image_io.to_rgb


def load_image(path: Path) -> Tuple[Image.Image, dict]:
    """(RGB image read by llava_drip.image_io, {width, height, mode} of the file as stored).

    Raises image_io.ImageError (a ValueError naming the file) for a missing, unreadable or too large one."""
    img = image_io.open_image(path)
    with Image.open(path) as im:  # header only, already known to decode: the stored size and mode
        info = {"width": im.width, "height": im.height, "mode": im.mode}
    return img, info


# ---- boundary maps ----------------------------------------------------------------------------------
def segment_colours(n: int) -> List[Tuple[int, int, int]]:
    """Golden-ratio hue steps: consecutive segments (neighbours in raster order) get far-apart hues."""
    out = []
    for g in range(n):
        h = (g * 0.6180339887) % 1.0
        s = 0.85 if g % 2 == 0 else 0.6
        r, gg, b = colorsys.hsv_to_rgb(h, s, 0.95)
        out.append((int(r * 255), int(gg * 255), int(b * 255)))
    return out


def denormalise(x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> Image.Image:
    """[3, H, W] normalised tensor -> the RGB crop the model saw."""
    import torch
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    arr = ((x.float().cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def draw_boundary_map(crop: Image.Image, segments: np.ndarray, grid: Tuple[int, int], size: int = 448,
                      alpha: float = 0.45, label: Optional[str] = None) -> Image.Image:
    """Colour each patch by its segment over the upscaled crop; thin lines on the patch grid,
    thick dark lines where neighbouring patches belong to different segments. segments: [N] ints in
    raster order, -1 for tokens the model dropped (reference tail semantics), drawn greyed out."""
    gh, gw = grid
    seg = segments.reshape(gh, gw)
    base = crop.resize((size, size), Image.BICUBIC).convert("RGBA")
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    xs = [round(i * size / gw) for i in range(gw + 1)]
    ys = [round(j * size / gh) for j in range(gh + 1)]
    colours = segment_colours(int(seg.max()) + 1 if seg.size and seg.max() >= 0 else 1)
    a = int(round(alpha * 255))
    for j in range(gh):
        for i in range(gw):
            s = int(seg[j, i])
            fill = (40, 40, 40, 200) if s < 0 else colours[s] + (a,)
            draw.rectangle([xs[i], ys[j], xs[i + 1] - 1, ys[j + 1] - 1], fill=fill)
    out = Image.alpha_composite(base, overlay)
    draw = ImageDraw.Draw(out)
    for x in xs[1:-1]:
        draw.line([(x, 0), (x, size)], fill=(255, 255, 255, 90), width=1)
    for y in ys[1:-1]:
        draw.line([(0, y), (size, y)], fill=(255, 255, 255, 90), width=1)
    thick = max(2, size // 160)
    for j in range(gh):
        for i in range(gw):
            if i + 1 < gw and seg[j, i] != seg[j, i + 1]:
                draw.line([(xs[i + 1], ys[j]), (xs[i + 1], ys[j + 1])], fill=(0, 0, 0, 255), width=thick)
            if j + 1 < gh and seg[j, i] != seg[j + 1, i]:
                draw.line([(xs[i], ys[j + 1]), (xs[i + 1], ys[j + 1])], fill=(0, 0, 0, 255), width=thick)
    if label:
        box = draw.textbbox((4, 4), label)
        draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=(0, 0, 0, 170))
        draw.text((4, 4), label, fill=(255, 255, 255, 255))
    return out.convert("RGB")


def _unique_path(outdir: Path, stem: str, used: set) -> Path:
    name, k = f"{stem}.png", 1
    while name in used:
        name, k = f"{stem}-{k}.png", k + 1
    used.add(name)
    return outdir / name


# ---- model --------------------------------------------------------------------------------------------
class TokenCounter:
    """Loads a registered model once and reports per-image token counts and segment maps."""

    def __init__(self, model_name: str, checkpoint: Optional[str] = None, eval_mode: Optional[str] = None,
                 device: str = "cpu", budget=None):
        from ..drip.budget import parse_budget
        from ..drip.factory import create_model_and_transforms, is_drip
        from ..drip.tower import DRIPVisionTransformer
        self.budget = parse_budget(budget)
        if self.budget is not None and not is_drip(model_name):
            raise ValueError(f"--budget applies to DRIP models; {model_name} is a plain ViT")
        kwargs = {}
        if eval_mode is not None:
            if not is_drip(model_name):
                raise ValueError(f"--eval-mode applies to DRIP models; {model_name} is a plain ViT")
            kwargs["eval_mode"] = eval_mode
        model, _, self.preprocess = create_model_and_transforms(model_name, pretrained=checkpoint, device=device, **kwargs)
        self.tower = model.visual.eval()
        self.model_name = model_name
        self.device = device
        self.is_drip = isinstance(self.tower, DRIPVisionTransformer)
        cfg = getattr(self.tower, "preprocess_cfg", None) or {}
        self.mean, self.std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
        grid = self.tower.grid_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]

    def count(self, pixels: torch.Tensor) -> List[dict]:
        """pixels [B, 3, H, W] -> per image {visual_tokens, boundaries, segments [N] (-1 = dropped)}."""
        import torch
        x = pixels.to(self.device, dtype=next(self.tower.parameters()).dtype)
        if not self.is_drip:
            return [{"visual_tokens": self.num_patches, "boundaries": None,
                     "segments": np.arange(self.num_patches)} for _ in range(x.shape[0])]
        with torch.no_grad():
            feats = self.tower.forward_features(x, budget=self.budget)
        groups = feats.num_groups.cpu()
        b = feats.boundaries.detach().float().cpu()
        sigma = (torch.cumsum(b, 1) - b).round().long()
        out = []
        for i in range(x.shape[0]):
            seg = sigma[i].clone()
            seg[seg >= groups[i]] = -1  # tokens after the last boundary that the reference semantics drop
            out.append({"visual_tokens": int(groups[i]), "boundaries": int(b[i].round().sum()),
                        "segments": seg.numpy()})
        return out


# ---- CLI ----------------------------------------------------------------------------------------------
def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-drip tokens",
        description="Per image: patch tokens in, visual tokens out (what the LLM receives), ratio; "
                    "optional boundary maps. PATHs are images or folders (searched recursively).")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--model", required=True, help=f"registered model name, e.g. DRIP-4x-32 ({len(list_models())} known)")
    parser.add_argument("--checkpoint", default=None, help="weights for the model (safetensors or torch); "
                        "without one the weights are random and the boundaries mean nothing")
    parser.add_argument("--eval-mode", choices=EVAL_MODES, default=None,
                        help="DRIP boundary rule in eval (default: the model's, 'calibrated'; an uncalibrated "
                        "checkpoint falls back to 'threshold')")
    parser.add_argument("--budget", default=None,
                        help="DRIP tokens per image: 0.25 (exactly round(0.25 N)), 16 (exactly 16), mean:0.25 (the "
                        "calibrated cut: 0.25 N on average, each image its own count); default: the eval mode")
    parser.add_argument("--viz", default=None, metavar="OUTDIR", help="write one boundary-map PNG per image here")
    parser.add_argument("--viz-size", type=int, default=448, help="side of the boundary-map PNG in pixels")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (per image, errors included)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.model not in list_models():
        print(f"llava-drip tokens: unknown model {args.model!r}. Available: {list_models()}", file=sys.stderr)
        return 2
    files, skipped, any_dir, empty_dirs = expand_folders(args.paths)
    if not files:
        print("llava-drip tokens: no image files found in " + " ".join(args.paths), file=sys.stderr)
        return 2
    for d in empty_dirs:  # beside other inputs it would otherwise vanish from the report
        print(f"error: {d}: a folder with no image files (searched recursively)", file=sys.stderr)
        if args.json:
            print(json.dumps({"path": d, "error": "a folder with no image files"}), flush=True)
    if args.checkpoint is None:
        print(f"note: no --checkpoint, {args.model} has random weights; counts show the mechanics only",
              file=sys.stderr)
    try:
        counter = TokenCounter(args.model, args.checkpoint, args.eval_mode, args.device, args.budget)
    except ValueError as e:
        print(f"llava-drip tokens: {e}", file=sys.stderr)
        return 2
    outdir = Path(args.viz) if args.viz else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)

    import torch
    from tqdm import tqdm
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.no_progress or not any_dir,
               desc=f"tokens {args.model}")
    used_names: set = set()
    n_ok, errors, counts = 0, [], []

    def emit(obj: dict, text: str):
        if args.json:
            print(json.dumps(obj), flush=True)
        else:
            bar.write(text, file=sys.stdout)

    for chunk in _batches(files, max(1, args.batch_size)):
        loaded = []
        for path in chunk:
            try:
                img, info = load_image(path)
                loaded.append((path, img, info, counter.preprocess(img)))
            except image_io.ImageError as e:  # missing, unreadable, too large: the message names the file
                msg = str(e)
                errors.append(str(path))
                bar.write(f"error: {msg}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"path": str(path), "error": msg}), flush=True)
                bar.update(1)
                continue
            except Exception as e:  # anything else the transform trips on: report it and keep going
                msg = f"{type(e).__name__}: {e}"
                errors.append(str(path))
                bar.write(f"error: {path}: {msg}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"path": str(path), "error": msg}), flush=True)
                bar.update(1)
        if not loaded:
            continue
        results = counter.count(torch.stack([t for _, _, _, t in loaded]))
        for (path, img, info, pixels), res in zip(loaded, results):
            n, g = counter.num_patches, res["visual_tokens"]
            row = {"path": str(path), "model": args.model, **info, "patch_tokens": n, "visual_tokens": g,
                   "ratio": g / n, "boundaries": res["boundaries"], "budget": str(counter.budget) if counter.budget
                   else None, "viz": None}
            if outdir:
                crop = denormalise(pixels, counter.mean, counter.std)
                label = f"{args.model}: {g} / {n} tokens"
                png = draw_boundary_map(crop, res["segments"], counter.grid, args.viz_size, label=label)
                target = _unique_path(outdir, path.stem, used_names)
                png.save(target)
                row["viz"] = str(target)
            emit(row, f"{str(path):<48} {info['width']}x{info['height']} {info['mode']:<5} "
                      f"{n:>4} -> {g:>4} tokens  ratio {g / n:.3f}" + (f"  {row['viz']}" if row["viz"] else ""))
            n_ok += 1
            counts.append(g)
            bar.update(1)
    bar.close()
    if counts:
        from ..clip.calibrate import count_distribution
        d = count_distribution(counts, counter.num_patches)
        spread = f" (std {d['std']:.1f}, min {d['min']}, max {d['max']})"
    summary = (f"{n_ok} image(s): mean {sum(counts) / max(n_ok, 1):.1f} visual tokens of {counter.num_patches} "
               f"patches" + (spread if counts else "") + f"; {len(errors)} unreadable"
               + (f" ({', '.join(errors)})" if errors else "")
               + (f"; {skipped} non-image file(s) in folders skipped" if skipped else "")
               + (f"; {len(empty_dirs)} folder(s) with no image files ({', '.join(empty_dirs)})" if empty_dirs else ""))
    print(summary, file=sys.stderr)
    return 1 if errors or empty_dirs else 0


if __name__ == "__main__":
    sys.exit(main())
