"""`llava-drip clip-train`'s own flags, apart from the training code so that `--help` loads neither torch
nor open_clip_train's training modules (as open_clip_train keeps its flags in params.py). The run is
llava_drip/clip/train.py; every other flag passes through to open_clip_train unchanged.
"""
import argparse

from llava_drip.drip.names import EVAL_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-drip clip-train", add_help=False, allow_abbrev=False,
        description="Contrastive pretraining with open_clip_train's own training loop. Any open_clip_train "
        "flag (--train-data, --dataset-type, --batch-size, --epochs, --lr, --warmup, --precision, "
        "--grad-clip-norm, --resume latest, --logs, --name, --zeroshot-frequency, --imagenet-val, "
        "--report-to, --workers, ...) is passed through unchanged. DRIP flags:")
    p.add_argument("--drip-loss-weight", type=float, default=1.0,
                   help="weight of the boundary (binomial prior) loss added to the contrastive loss (default 1.0)")
    p.add_argument("--drip-eval-mode", choices=EVAL_MODES, default=None,
                   help="boundaries at eval time (zero-shot): calibrated (falls back to threshold until the run's "
                   "end calibrates the checkpoint), threshold, topk or sample; default: the model config's")
    p.add_argument("--force-schedule-change", action="store_true",
                   help="allow --resume with different lr/warmup/epochs/samples/batch size/world size")
    p.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss (default 10)")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="end this invocation once epoch E is trained and saved; the LR schedule still spans "
                   "--epochs, so `--resume latest` continues it exactly")
    p.add_argument("--zeroshot-classnames", default=None,
                   help="class names for the in-training zero-shot on --imagenet-val (one per line, sorted folder "
                   "order); default: ImageNet's 1000")
    p.add_argument("--zeroshot-templates", default=None,
                   help="prompt templates with {} for the in-training zero-shot; default: OpenAI's ImageNet templates")
    p.add_argument("--drip-calibration-data", nargs="+", default=None, metavar="IMAGES",
                   help="held-out images (files, folders or an open_clip CSV) on which the final checkpoint's "
                   "'calibrated' boundaries are fitted; default: --imagenet-val, else --val-data")
    p.add_argument("--drip-calibration-target", type=float, default=None,
                   help="mean visual tokens per patch the calibration aims at (default: the model's prior p)")
    p.add_argument("--no-csv-check", action="store_true",
                   help="skip the up-front image check of CSV rows (open_clip_train's behaviour: a bad row crashes)")
    return p


def print_help():
    """Our flags, then open_clip_train's own help (its params module is light too); exits with status 0."""
    from open_clip_train.params import parse_args as oc_parse_args
    build_parser().print_help()
    print("\nopen_clip_train flags (passed through unchanged):\n")
    oc_parse_args(["--help"])  # prints open_clip_train's own help and exits
