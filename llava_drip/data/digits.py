"""`llava-drip synth digits`: sklearn's 8x8 handwritten digits (1797, UCI) as train/val ImageFolders.

Real data nobody here made, for `llava-drip classify`: each 8x8 image (grey levels 0-16) is scaled to
0-255, upsampled to SIZE px (nearest, so every original pixel stays a crisp block) and saved as RGB
PNG under OUT/{train,val}/<digit>/. The split is stratified and seeded.

    llava-drip synth digits --csv ../shared/data/images/sklearn_digits.csv.gz --out data/digits --size 64
"""
import argparse
import csv
import gzip
import json
import os
import random
import sys
from typing import List, Tuple

from PIL import Image


def read_digits(path: str) -> List[Tuple[List[int], int]]:
    """Rows of 64 pixel values and a label (sklearn's load_digits layout, as CSV, optionally gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip().lstrip("-").isdigit():  # a header line
                continue
            if len(row) != 65:
                raise ValueError(f"{path} line {i}: expected 64 pixels and a label, got {len(row)} values")
            values = [int(float(v)) for v in row]
            if not 0 <= values[64] <= 9 or not all(0 <= v <= 16 for v in values[:64]):
                raise ValueError(f"{path} line {i}: pixel values must be 0-16 and the label 0-9")
            rows.append((values[:64], values[64]))
    if not rows:
        raise ValueError(f"{path}: no digit rows")
    return rows


def to_image(pixels: List[int], size: int) -> Image.Image:
    img = Image.new("L", (8, 8))
    img.putdata([round(v * 255 / 16) for v in pixels])
    return img.resize((size, size), Image.NEAREST).convert("RGB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip synth digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, help="sklearn digits as CSV (64 pixels + label per row, .gz ok)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 8 keeps blocks even)")
    p.add_argument("--val-frac", type=float, default=0.2, help="share of each digit held out for val")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.csv):
        raise FileNotFoundError(f"--csv not found: {args.csv}")
    if not 0 < args.val_frac < 1:
        p.error("--val-frac must be in (0, 1)")
    try:
        rows = read_digits(args.csv)
    except ValueError as e:
        print(f"llava-drip synth digits: {e}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    counts = {"train": {}, "val": {}}
    for digit in range(10):
        items = [r for r in rows if r[1] == digit]
        rng.shuffle(items)
        n_val = max(1, round(len(items) * args.val_frac))
        for split, part in (("val", items[:n_val]), ("train", items[n_val:])):
            folder = os.path.join(args.out, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for k, (pixels, _) in enumerate(part):
                to_image(pixels, args.size).save(os.path.join(folder, f"{digit}_{k:04d}.png"))
            counts[split][str(digit)] = len(part)
    meta = {"source": os.path.abspath(args.csv), "images": len(rows), "size": args.size, "seed": args.seed,
            "val_frac": args.val_frac, "counts": counts}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}: {sum(counts['train'].values())} train, {sum(counts['val'].values())} val images, "
          f"10 classes, {args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
