"""`llava-drip zeroshot`: zero-shot top-1 / top-5 of a CLIP checkpoint on an ImageFolder.

The classifier comes from open_clip's `build_zero_shot_classifier` (mean of normalised prompt
embeddings per class). Class i is the i-th class folder in sorted order, as torchvision's
ImageFolder numbers them, so a class-name file must list names in that order.
torch, open_clip and torchvision are imported inside the functions that use them, so `--help` answers
without them.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import llava_drip.drip as drip
from llava_drip.drip.names import EVAL_MODES, list_models

_logger = logging.getLogger(__name__)


def _lines(path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def read_classnames(path) -> List[str]:
    names = _lines(path)
    if not names:
        raise ValueError(f"{path}: no class names (expected one per line)")
    return names


def plural(classname: str) -> str:
    """English plural of a class name's last word ('red cross' -> 'red crosses'); regular nouns only."""
    head, _, last = classname.rpartition(" ")
    last = last + ("es" if last.endswith(("s", "x", "z", "ch", "sh")) else "s")
    return f"{head} {last}" if head else last


class PluralTemplate:
    """A prompt template with {plural}: open_clip's zero-shot builder calls it with each class name."""

    def __init__(self, text: str):
        self.text = text

    def __call__(self, classname: str) -> str:
        return self.text.replace("{plural}", plural(classname)).replace("{}", classname)

    def __repr__(self) -> str:
        return repr(self.text)


def read_templates(path) -> List:
    """Prompt templates, one per line, each with one {} (the class name) or one {plural} (its plural, for
    images that show several objects). All-{} files give open_clip's plain format strings; a file with any
    {plural} gives callables for every line (open_clip wants one kind)."""
    templates = _lines(path)
    if not templates:
        raise ValueError(f"{path}: no templates (expected one per line, each with {{}})")
    for i, t in enumerate(templates, 1):
        if t.count("{}") + t.count("{plural}") != 1:
            raise ValueError(f"{path}: template {i} {t!r} must contain exactly one {{}} for the class name "
                             "(or one {plural} for its plural)")
    if any("{plural}" in t for t in templates):
        return [PluralTemplate(t) for t in templates]
    return templates


def check_model_name(name: str) -> None:
    """ValueError in the project's wording (`llava-drip tokens`, `flops`) for a name nothing can build.

    The registered names are checked without open_clip; any other name is asked of open_clip's registry
    (it builds more ViTs than the project lists), so only a name neither knows is refused."""
    if name in list_models():
        return
    import open_clip
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown model {name!r}. Available: {list_models()}")


def image_loader(path: str):
    """ImageFolder's loader: the project's reader (llava_drip.image_io), so every path sees the same pixels."""
    from llava_drip.image_io import open_image
    return open_image(path)


def count_class_folders(root) -> int:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder not found: {root}")
    return sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def zero_shot_accuracy(model, preprocess, tokenizer, data_dir, classnames: Sequence[str], templates: Sequence,
                       batch_size: int = 64, workers: int = 0, device="cpu", predictions: bool = False) -> Dict:
    """Top-1 / top-5 (fractions) over an ImageFolder, plus DRIP's realised ratios when the model reports them.

    With `predictions`, also the per-image top-1 class index and label ("pred", "target")."""
    import torch
    from open_clip import build_zero_shot_classifier
    from open_clip_train.zero_shot import accuracy
    from torchvision.datasets import ImageFolder

    with torch.no_grad():
        dataset = ImageFolder(str(data_dir), transform=preprocess, loader=image_loader)
        if len(dataset.classes) != len(classnames):
            raise ValueError(f"{data_dir}: {len(dataset.classes)} class folders but {len(classnames)} class names; "
                             "pass a class-name file with one name per folder, in sorted folder order")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        model.eval()
        classifier = build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=list(classnames),
                                                templates=list(templates), num_classes_per_batch=10, device=device)
        top1 = top5 = n = 0.0
        ratio_sums = {"boundary_ratio": 0.0, "group_ratio": 0.0}
        has_ratio = False
        k5 = min(5, len(classnames))
        preds, targets = [], []
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            out = model(image=images)
            logits = 100.0 * out["image_features"] @ classifier
            a1, a5 = accuracy(logits, target, topk=(1, k5))
            if predictions:
                preds += logits.argmax(dim=1).tolist()
                targets += target.tolist()
            top1, top5, n = top1 + a1, top5 + a5, n + images.shape[0]
            for key in ratio_sums:
                if key in out:
                    has_ratio = True
                    ratio_sums[key] += float(out[key]) * images.shape[0]
        result = {"top1": top1 / n, "top5": top5 / n, "num_images": int(n), "num_classes": len(classnames)}
        if has_ratio:
            result.update({k: v / n for k, v in ratio_sums.items()})
        if predictions:
            result.update(pred=preds, target=targets)
        return result


def load_model_and_transforms(model_name: str, checkpoint: Optional[str], eval_mode: Optional[str] = None):
    """(model, preprocess_train, preprocess_val); checkpoint weights are loaded strictly."""
    check_model_name(model_name)
    kwargs = {}
    if eval_mode:
        if not drip.is_drip(model_name):
            raise ValueError(f"--eval-mode applies only to DRIP models, not {model_name}")
        kwargs["eval_mode"] = eval_mode
    model, preprocess_train, preprocess_val = drip.create_model_and_transforms(model_name, output_dict=True, **kwargs)
    if checkpoint:
        try:
            drip.load_checkpoint(model, checkpoint, strict=True)
        except RuntimeError as e:  # key mismatch: a checkpoint of another model
            raise ValueError(f"{e} (is --model {model_name} the model this checkpoint was trained as?)") from e
    return model, preprocess_train, preprocess_val


def load_model(model_name: str, checkpoint: Optional[str], device="cpu", eval_mode: Optional[str] = None):
    """(model in eval mode, preprocess_val, tokenizer)."""
    model, _, preprocess = load_model_and_transforms(model_name, checkpoint, eval_mode)
    model.to(device).eval()
    return model, preprocess, drip.get_tokenizer(model_name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-drip zeroshot",
                                description="Zero-shot top-1/top-5 of a CLIP or DRIP checkpoint on an ImageFolder.")
    p.add_argument("--model", required=True, help="model name, e.g. DRIP-4x-tiny or ViT-tiny")
    p.add_argument("--checkpoint", required=True,
                   help="weights: open_clip_train epoch_N.pt or a .safetensors state dict")
    p.add_argument("--data", required=True, help="ImageFolder root: one sub-folder per class")
    p.add_argument("--classnames", default=None,
                   help="class names, one per line in sorted folder order (default: ImageNet's 1000)")
    p.add_argument("--templates", default=None,
                   help="prompt templates, one per line with {} or {plural} (default: OpenAI's 80 ImageNet templates)")
    p.add_argument("--eval-mode", choices=EVAL_MODES, default=None,
                   help="DRIP boundaries at eval time (default: the model config's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:  # a typo in --model fails before the data and the weights are read
        check_model_name(args.model)
    except ValueError as e:
        print(f"llava-drip zeroshot: {e}", file=sys.stderr)
        return 2
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    try:
        classnames = read_classnames(args.classnames) if args.classnames else list(IMAGENET_CLASSNAMES)
        templates = read_templates(args.templates) if args.templates else list(OPENAI_IMAGENET_TEMPLATES)
        model, preprocess, tokenizer = load_model(args.model, args.checkpoint, args.device, args.eval_mode)
        result = zero_shot_accuracy(model, preprocess, tokenizer, args.data, classnames, templates,
                                    batch_size=args.batch_size, workers=args.workers, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"llava-drip zeroshot: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, "checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data),
              "eval_mode": getattr(model.visual, "eval_mode", None), **result}
    if args.json:
        print(json.dumps(result))
    else:
        ratio = (f", boundary ratio {result['boundary_ratio']:.3f}, group ratio {result['group_ratio']:.3f}"
                 if "boundary_ratio" in result else "")
        print(f"{args.model}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
              f"({result['num_images']} images, {result['num_classes']} classes{ratio})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
