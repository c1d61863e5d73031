"""`llava-drip synth clip`: a synthetic image-text set for contrastive pretraining.

Writes, under --out:
  train/images/NNNNNN.png, train.csv     tab-separated `filepath` (absolute) and `title`, the
                                         layout open_clip_train's CsvDataset reads by default
  train-shards/NNNNNN.tar                with --webdataset: NNNNNN.png + NNNNNN.txt pairs
  val/<colour>_<shape>/NNNNN.png         zero-shot ImageFolder, one class per (colour, shape)
  classnames.txt, templates.txt          zero-shot class names (sorted-folder order) and prompts
  meta.json                              arguments, classes and counts
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

from tqdm import tqdm

from .shapes import COLORS, SHAPES, STREAM_TRAIN, STREAM_VAL, caption, png_bytes, render, rng_for, sample_scene

# Phrased like the captions ("one {size} {color} {shape} ..."), so zero-shot prompts sit in the
# text distribution the model was trained on; "one" sidesteps a/an before colour names. A val image
# shows one, two or three objects and the captions name the count, so the prompts cover every count:
# singular prompts alone score a 3-square image against "one red square." and "one red cross." alike.
TEMPLATES = tuple(
    phrase.format(n=n, x="{}" if n == "one" else "{plural}")
    for n in ("one", "two", "three")
    for phrase in ("{n} {x}.", "a picture of {n} {x}.", "an image showing {n} {x}.")
)


def class_folders() -> list[tuple[str, str, str]]:
    """(folder, colour, shape) sorted by folder name, the order torchvision's ImageFolder uses."""
    return sorted((f"{c}_{s}", c, s) for c in COLORS for s in SHAPES)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata so shards are byte-identical across runs and machines
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-drip synth clip",
        description="Write a deterministic synthetic image-caption set of coloured shapes "
        "(train CSV, optional webdataset shards, zero-shot ImageFolder val split).",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    p.add_argument("--n", type=int, default=5000, help="number of training image-caption pairs (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--val-per-class", type=int, default=20,
                   help=f"zero-shot val images per (colour, shape) class; {len(COLORS) * len(SHAPES)} classes (default 20)")
    p.add_argument("--webdataset", action="store_true", help="also write train-shards/NNNNNN.tar (webdataset layout)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard (default 1000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.image_size < 8 or args.val_per_class < 0 or args.shard_size < 1:
        raise SystemExit("synth clip: need --n >= 1, --image-size >= 8, --val-per-class >= 0, --shard-size >= 1")
    out = args.out.resolve()  # absolute paths in the CSV so it works from any cwd
    img_dir = out / "train" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    shard_dir = out / "train-shards"
    tar = None
    n_shards = 0
    if args.webdataset:
        shard_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    try:
        for i in tqdm(range(args.n), desc="train", disable=args.quiet):
            rng = rng_for(args.seed, STREAM_TRAIN, i)
            scene = sample_scene(rng)
            data = png_bytes(render(scene, rng, args.image_size))
            title = caption(scene, rng)
            path = img_dir / f"{i:06d}.png"
            path.write_bytes(data)
            rows.append((str(path), title))
            if args.webdataset:
                if i % args.shard_size == 0:
                    if tar is not None:
                        tar.close()
                    tar = tarfile.open(shard_dir / f"{n_shards:06d}.tar", "w", format=tarfile.USTAR_FORMAT)
                    n_shards += 1
                _tar_add(tar, f"{i:06d}.png", data)
                _tar_add(tar, f"{i:06d}.txt", title.encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()

    with open(out / "train.csv", "w", encoding="utf-8", newline="\n") as f:
        f.write("filepath\ttitle\n")
        for path, title in rows:
            f.write(f"{path}\t{title}\n")

    folders = class_folders()
    val_total = len(folders) * args.val_per_class
    with tqdm(total=val_total, desc="val", disable=args.quiet) as bar:
        for k, (folder, color, shape) in enumerate(folders):
            d = out / "val" / folder
            d.mkdir(parents=True, exist_ok=True)
            for j in range(args.val_per_class):
                rng = rng_for(args.seed, STREAM_VAL, k * args.val_per_class + j)
                scene = sample_scene(rng, shape=shape, color=color)
                (d / f"{j:05d}.png").write_bytes(png_bytes(render(scene, rng, args.image_size)))
                bar.update()

    classnames = [f"{c} {s}" for _, c, s in folders]
    (out / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    meta = {
        "generator": "llava_drip.data.synth_clip",
        "n": args.n,
        "seed": args.seed,
        "image_size": args.image_size,
        "val_per_class": args.val_per_class,
        "num_classes": len(classnames),
        "classes": classnames,
        "class_folders": [f for f, _, _ in folders],
        "counts": {"train": args.n, "val": val_total},
        "train_csv": "train.csv",
        "csv_separator": "\t",
        "csv_img_key": "filepath",
        "csv_caption_key": "title",
        "webdataset": (
            {"shards": f"train-shards/{{000000..{n_shards - 1:06d}}}.tar", "num_shards": n_shards,
             "shard_size": args.shard_size, "num_samples": args.n}
            if args.webdataset else None
        ),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        print(f"wrote {args.n} train pairs, {val_total} val images ({len(classnames)} classes) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
