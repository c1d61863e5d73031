"""`llava-drip classify`: linear probe or finetune of a CLIP / DRIP image tower on an ImageFolder.

linear    the tower is frozen; features are computed once (eval transform, eval-mode boundaries)
          and a linear head is trained on them. Writes OUT/head.safetensors (head.*).
finetune  tower + head are trained end to end with the training transform; DRIP's boundary
          prior is added to the cross-entropy. Writes OUT/model.safetensors (visual.*, head.*).

The head standardises each feature with a parameter-free BatchNorm (batch statistics in
training, running statistics at eval, as in MAE's linear probe): raw CLIP features share a
large common component, and without it one learning rate would not suit every tower.
Files are written atomically; OUT/metrics.json holds the per-epoch log and the final top-1/top-5.
torch, open_clip_train and torchvision are imported inside the functions that use them, so `--help`
answers without them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

from llava_drip.clip.zeroshot import check_model_name, image_loader, load_model_and_transforms
from llava_drip.drip.names import EVAL_MODES
from llava_drip.eval.io_utils import write_json

DEFAULT_LR = {"linear": 1e-2, "finetune": 1e-4}


def __getattr__(name: str):
    if name == "ClassifierHead":  # defined with torch in head.py; reachable here as before
        from .head import ClassifierHead
        return ClassifierHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _topk(logits: torch.Tensor, target: torch.Tensor) -> List[float]:
    """Correct counts at top-1 and top-5 (top-k capped at the class count), as open_clip_train counts them."""
    from open_clip_train.zero_shot import accuracy
    return accuracy(logits, target, topk=(1, min(5, logits.shape[1])))


def _image_features(visual, images: torch.Tensor, with_aux: bool):
    """Projected, pooled tower output; with DRIP also the boundary loss and ratio."""
    if hasattr(visual, "forward_with_aux"):
        feats, aux = visual.forward_with_aux(images)
        return feats, (aux.boundary_loss if with_aux else None), aux.group_ratio
    return visual(images), None, None


def extract(visual, loader, device) -> Dict[str, torch.Tensor]:
    import torch
    visual.eval()
    xs, ys, ratios = [], [], []
    with torch.no_grad():
        for images, target in loader:
            f, _, ratio = _image_features(visual, images.to(device), with_aux=False)
            xs.append(f.float().cpu())
            ys.append(target)
            if ratio is not None:
                ratios.append(float(ratio) * images.shape[0])
        out = {"x": torch.cat(xs), "y": torch.cat(ys)}
    if ratios:
        out["group_ratio"] = sum(ratios) / out["y"].shape[0]
    return out


def evaluate(visual, head, loader, device) -> Dict:
    import torch
    visual.eval()
    head.eval()
    top1 = top5 = n = 0.0
    with torch.no_grad():
        for images, target in loader:
            f, _, _ = _image_features(visual, images.to(device), with_aux=False)
            a1, a5 = _topk(head(f.float()), target.to(device))
            top1, top5, n = top1 + a1, top5 + a5, n + target.shape[0]
    return {"top1": top1 / n, "top5": top5 / n}


def _check_folders(train: ImageFolder, val: ImageFolder, train_dir, val_dir):
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:5]
        only_v = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(f"class folders differ: {train_dir} has {len(train.classes)}, {val_dir} has "
                         f"{len(val.classes)} (only in train: {only_t}, only in val: {only_v})")


def run(args) -> Dict:
    import torch
    import torch.nn.functional as F
    from open_clip_train.scheduler import cosine_lr
    from torchvision.datasets import ImageFolder

    from llava_drip.utils import atomic_save_tensors

    from .head import ClassifierHead

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.mode]
    model, preprocess_train, preprocess_val = load_model_and_transforms(args.model, args.checkpoint, args.eval_mode)
    visual = model.visual.to(device)
    del model  # the text tower is not needed

    for d in (args.train, args.val):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"ImageFolder not found: {d}")
    train_tf = preprocess_train if args.mode == "finetune" else preprocess_val
    train_set = ImageFolder(args.train, transform=train_tf, loader=image_loader)
    val_set = ImageFolder(args.val, transform=preprocess_val, loader=image_loader)
    _check_folders(train_set, val_set, args.train, args.val)
    classes = train_set.classes
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                                               num_workers=args.workers, drop_last=len(train_set) > args.batch_size)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)
    dim = visual.output_dim
    head = ClassifierHead(dim, len(classes)).to(device)
    history = []

    if args.mode == "linear":
        for p in visual.parameters():
            p.requires_grad_(False)
        tr, va = extract(visual, train_loader, device), extract(visual, val_loader, device)
        params = list(head.parameters())
        steps_per_epoch = math.ceil(tr["y"].shape[0] / args.batch_size)
    else:
        params = list(visual.parameters()) + list(head.parameters())
        steps_per_epoch = len(train_loader)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.wd)
    total = steps_per_epoch * args.epochs
    scheduler = cosine_lr(optimizer, lr, min(args.warmup, max(total - 1, 0)), total)
    skipped = 0
    step = 0
    for epoch in range(args.epochs):
        losses = []
        if args.mode == "linear":
            head.train()
            order = torch.randperm(tr["y"].shape[0], generator=gen)
            # BatchNorm needs two samples: a trailing batch of one is dropped
            batches = [(tr["x"][idx], tr["y"][idx]) for idx in order.split(args.batch_size) if idx.numel() > 1]
        else:
            visual.train()
            head.train()
            batches = train_loader
        for x, y in batches:
            scheduler(step)
            step += 1
            x, y = x.to(device), y.to(device)
            if args.mode == "linear":
                loss = F.cross_entropy(head(x), y)
            else:
                f, bl, _ = _image_features(visual, x, with_aux=True)
                loss = F.cross_entropy(head(f), y)
                if bl is not None:
                    loss = loss + args.drip_loss_weight * bl
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                skipped += 1  # a non-finite loss would poison the weights: drop the step
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm)
            optimizer.step()
            losses.append(loss.item())
        if args.mode == "linear":
            head.eval()
            with torch.no_grad():
                a1, a5 = _topk(head(va["x"].to(device)), va["y"].to(device))
            metrics = {"top1": a1 / va["y"].shape[0], "top5": a5 / va["y"].shape[0]}
        else:
            metrics = evaluate(visual, head, val_loader, device)
        history.append({"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1), **metrics})
        if not args.json:
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, val top-1 {100 * metrics['top1']:.2f}%, "
                  f"top-5 {100 * metrics['top5']:.2f}%", flush=True)

    out = Path(args.out or os.path.join("runs", "classify", f"{args.model}-{args.mode}"))
    meta = {"model": args.model, "mode": args.mode, "classes": json.dumps(classes),
            "checkpoint": os.path.abspath(args.checkpoint)}
    if args.mode == "linear":
        weights = atomic_save_tensors({f"head.{k}": v for k, v in head.state_dict().items()},
                                      out / "head.safetensors", metadata=meta)
    else:
        sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
        sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
        weights = atomic_save_tensors(sd, out / "model.safetensors", metadata=meta)
    result = {"model": args.model, "mode": args.mode, "checkpoint": os.path.abspath(args.checkpoint),
              "train": os.path.abspath(args.train), "val": os.path.abspath(args.val), "num_classes": len(classes),
              "num_train": len(train_set), "num_val": len(val_set), "epochs": args.epochs, "lr": lr,
              "top1": history[-1]["top1"], "top5": history[-1]["top5"], "skipped_steps": skipped,
              "weights": str(weights), "history": history}
    if args.mode == "linear" and "group_ratio" in va:
        result["val_group_ratio"] = va["group_ratio"]
    write_json(out / "metrics.json", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-drip classify",
                                description="Linear probe or finetune of a CLIP/DRIP image tower on ImageFolder data.")
    p.add_argument("--model", required=True, help="model name, e.g. DRIP-4x-tiny")
    p.add_argument("--checkpoint", required=True, help="CLIP weights: open_clip_train epoch_N.pt or .safetensors")
    p.add_argument("--train", required=True, help="training ImageFolder (one sub-folder per class)")
    p.add_argument("--val", required=True, help="validation ImageFolder with the same class folders")
    p.add_argument("--mode", choices=("linear", "finetune"), default="linear")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-2 linear, 1e-4 finetune), cosine decay")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-clip-norm", type=float, default=1.0)
    p.add_argument("--drip-loss-weight", type=float, default=1.0, help="boundary prior weight (finetune, DRIP)")
    p.add_argument("--eval-mode", choices=EVAL_MODES, default=None, help="DRIP eval-time boundaries")
    p.add_argument("--out", default=None, help="output folder (default runs/classify/<model>-<mode>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        print("llava-drip classify: --epochs and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        check_model_name(args.model)  # before the folders and the weights are read
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"llava-drip classify: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.mode} {args.model}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
              f"({result['num_val']} val images, {result['num_classes']} classes); weights: {result['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
