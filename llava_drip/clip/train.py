"""`llava-drip clip-train`: contrastive pretraining on open_clip_train's own main(), DRIP models included.

Every open_clip_train flag keeps its meaning; this layer parses DRIP's extra flags (params.py), then calls
`open_clip_train.main.main(rest)`. It changes no open_clip_train code. Instead it swaps, for the
duration of that call only, names that open_clip_train.main looks up when it runs:

  create_model_and_transforms  our factory (DRIP names -> DRIPCLIP, other names -> open_clip)
  create_loss                  open_clip's loss wrapped in DRIPLoss (+ boundary prior, non-finite guard)
  get_data                     CSV rows with missing/unreadable images filtered up front
  pt_load                      checks the file is tensors and plain data only (weights_only), then
                               remembers the LR schedule stored in the checkpoint being resumed
  get_latest_checkpoint        `--resume latest` takes the newest epoch_N.pt that loads, saying which it skipped
  torch.save                   atomic (tmp file + fsync + rename): a kill never leaves a truncated epoch_N.pt
  cosine_lr / const_lr / ...   refuses a resume that would change the schedule; stores the schedule
  train_one_epoch              per-epoch reseeding, per-step timing/memory/ratio, skip of non-finite steps

The schedule is kept in the checkpoint itself: open_clip_train saves `optimizer.state_dict()`,
which carries every key of each param group, so `param_groups[0]["drip_schedule"]` travels with
epoch_N.pt without touching how open_clip_train saves.
"""
import contextlib
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import open_clip_train.data as oc_data
import open_clip_train.main as oc_main
import open_clip_train.zero_shot as oc_zero_shot
import torch
import torch.distributed as dist
from open_clip_train.distributed import is_master
from open_clip_train.params import parse_args as oc_parse_args

import llava_drip.drip as drip
from llava_drip.checkpoints import (IncompleteCheckpointError, UnsafeCheckpointError, atomic_torch_save,
                                    check_torch_file, pick_clip_checkpoint)
from llava_drip.eval.io_utils import write_json

from .data import CheckedCsvDataset
from .loss import DRIPLoss
from .monitor import NonFiniteLossError, StepMonitor, instrument_optimizer
from .params import build_parser, print_help
from .zeroshot import count_class_folders, read_classnames, read_templates

_logger = logging.getLogger(__name__)

SCHEDULE_KEY = "drip_schedule"


class ScheduleMismatchError(RuntimeError):
    """A resume would change the LR schedule (lr, warmup, epochs, samples, batch or world size)."""


class DataError(RuntimeError):
    """The training or validation data cannot be used (missing CSV, wrong column, no usable row)."""


class _StopRun(Exception):
    """--stop-after-epoch reached: the checkpoint of that epoch is saved, end this invocation."""


def _is_drip_name(name: str) -> bool:
    try:
        return drip.is_drip(name)
    except RuntimeError:  # hf-hub:, local-dir: or an unknown name: open_clip decides
        return False


def _seed_epoch(seed: int, epoch: int, rank: int):
    """Make an epoch's randomness (data order, augmentation, boundary samples) a function of
    (seed, epoch, rank) alone, so a resumed run replays exactly what an uninterrupted one does."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def schedule_changes(saved: Dict, current: Dict) -> List[str]:
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items() if k in saved and not _same(saved[k], v)]


class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
    """open_clip_train passes device_ids=[device] even on CPU, which DDP rejects for CPU modules."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


@contextlib.contextmanager
def _patch(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield old
    finally:
        setattr(obj, name, old)


class _Run:
    """State shared by the hooks of one clip-train invocation."""

    def __init__(self, opts, classnames=None, templates=None):
        self.opts = opts
        self.classnames = classnames
        self.templates = templates
        self.monitor = StepMonitor(opts.max_skipped_steps)
        self.args = None
        self.log_dir: Optional[str] = None
        self.samples_per_epoch = None
        self.resumed_from = None
        self.resumed_schedule = None
        self.bad_rows: Dict[str, Dict] = {}
        self.orig: Dict = {}

    # ---- replacements for names in open_clip_train.main ------------------------------------------------
    def create_model_and_transforms(self, model_name, pretrained=None, **kwargs):
        if self.opts.drip_eval_mode and _is_drip_name(model_name):
            kwargs["eval_mode"] = self.opts.drip_eval_mode
        return drip.create_model_and_transforms(model_name, pretrained, **kwargs)

    def create_loss(self, args):
        return DRIPLoss(self.orig["create_loss"](args), self.opts.drip_loss_weight, self.monitor)

    def pt_load(self, path, map_location=None):
        if not str(path).startswith(("s3://", "gs://", "http://", "https://")):
            check_torch_file(path)  # open_clip_train's pt_load relies on torch's default weights_only
        ckpt = self.orig["pt_load"](path, map_location=map_location)
        if isinstance(ckpt, dict) and "epoch" in ckpt:
            self.resumed_from = path
            groups = ckpt.get("optimizer", {}).get("param_groups") or [{}]
            self.resumed_schedule = groups[0].get(SCHEDULE_KEY)
        return ckpt

    def get_latest_checkpoint(self, path: str, remote: bool):
        if remote:
            return self.orig["get_latest_checkpoint"](path, remote)
        found, skipped = pick_clip_checkpoint(path)
        for p, why in skipped:
            _logger.warning(f"resume: skipping {p}: {why}")
        return found

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        self.args = args
        logs_on = bool(args.logs) and str(args.logs).lower() != "none"
        self.log_dir = os.path.join(args.logs, args.name) if logs_on and is_master(args) else None
        self.monitor.configure(args, self.log_dir, is_master(args))
        try:
            if self.opts.no_csv_check:
                data = self.orig["get_data"](args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
            else:
                # get_csv_dataset looks CsvDataset up in its module at call time
                with _patch(oc_data, "CsvDataset", CheckedCsvDataset):
                    data = self.orig["get_data"](args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from e
        for split, info in data.items():
            ds = getattr(info.dataloader, "dataset", None)
            if isinstance(ds, CheckedCsvDataset):
                self.bad_rows[split] = {"csv": ds.source, "rows": ds.num_rows, "skipped": ds.bad_rows}
        if "train" in data:
            self.samples_per_epoch = data["train"].dataloader.num_samples
        if self.log_dir and any(v["skipped"] for v in self.bad_rows.values()):
            write_json(Path(self.log_dir) / "skipped_rows.json", self.bad_rows)
        return data

    def scheduler(self, kind: str):
        def make(optimizer, base_lr, warmup_length, steps, *extra):
            args = self.args
            current = {"lr_scheduler": args.lr_scheduler, "lr": float(base_lr), "warmup": int(warmup_length),
                       "epochs": int(args.epochs), "total_steps": int(steps),
                       "samples_per_epoch": self.samples_per_epoch, "batch_size": int(args.batch_size),
                       "world_size": int(args.world_size), "accum_freq": int(args.accum_freq)}
            if args.lr_scheduler == "const-cooldown":
                current.update(epochs_cooldown=args.epochs_cooldown, lr_cooldown_power=float(args.lr_cooldown_power),
                               lr_cooldown_end=float(args.lr_cooldown_end))
            self.check_schedule(current)
            optimizer.param_groups[0][SCHEDULE_KEY] = current
            return self.orig[kind](optimizer, base_lr, warmup_length, steps, *extra)

        return make

    def check_schedule(self, current: Dict):
        if self.resumed_from is None:
            return
        if self.resumed_schedule is None:
            _logger.warning(f"{self.resumed_from} stores no LR schedule (not written by llava-drip clip-train): "
                            "cannot check that the resumed run continues it")
            return
        changes = schedule_changes(self.resumed_schedule, current)
        if not changes:
            _logger.info(f"resume: LR schedule matches the checkpoint ({current})")
            return
        msg = (f"resuming {self.resumed_from} would change the LR schedule: {', '.join(changes)}. "
               "The LR of every step is a function of these values, so the run would not continue the "
               "schedule it started. Rerun with the original flags, or pass --force-schedule-change to "
               "accept the new schedule.")
        if not self.opts.force_schedule_change:
            raise ScheduleMismatchError(msg)
        _logger.warning(msg + " Continuing because of --force-schedule-change.")

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        if self.opts.stop_after_epoch is not None and epoch >= self.opts.stop_after_epoch:
            raise _StopRun(epoch)
        _seed_epoch(args.seed, epoch, args.rank)
        self.monitor.start_epoch(epoch, data["train"].dataloader.num_batches // args.accum_freq, tb_writer)
        stopped = None
        try:
            with instrument_optimizer(optimizer, scaler, self.monitor):
                return self.orig["train_one_epoch"](model, data, loss, epoch, optimizer, scaler, scheduler,
                                                    dist_model, args, tb_writer=tb_writer)
        except BaseException as e:
            stopped = type(e).__name__
            raise
        finally:
            self.monitor.end_epoch(stopped)

    # ---- scope -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def patched(self):
        """Swap the names only while open_clip_train runs, and put them back afterwards: the process
        (a test session, the repro script) may run open_clip_train again, with or without these hooks."""
        names = {
            "create_model_and_transforms": self.create_model_and_transforms,
            "create_loss": self.create_loss,
            "get_data": self.get_data,
            "pt_load": self.pt_load,
            "get_latest_checkpoint": self.get_latest_checkpoint,
            "train_one_epoch": self.train_one_epoch,
            "cosine_lr": self.scheduler("cosine_lr"),
            "const_lr": self.scheduler("const_lr"),
            "const_lr_cooldown": self.scheduler("const_lr_cooldown"),
        }
        handlers = list(logging.root.handlers)
        # open_clip_train's setup_logging sets every existing logger's level; put them all back after
        # (placeholder names become loggers there: they go back to NOTSET, as if created later)
        levels = {name: lg.level if isinstance(lg, logging.Logger) else logging.NOTSET
                  for name, lg in logging.root.manager.loggerDict.items()}
        levels[None] = logging.root.level
        with contextlib.ExitStack() as stack:
            for name, fn in names.items():
                self.orig[name] = getattr(oc_main, name)
            for name, fn in names.items():
                stack.enter_context(_patch(oc_main, name, fn))
            stack.enter_context(_patch(torch.nn.parallel, "DistributedDataParallel", _CpuDDP))
            stack.enter_context(_patch(torch, "save", atomic_torch_save))
            if self.classnames is not None:
                stack.enter_context(_patch(oc_zero_shot, "IMAGENET_CLASSNAMES", self.classnames))
            if self.templates is not None:
                stack.enter_context(_patch(oc_zero_shot, "OPENAI_IMAGENET_TEMPLATES", self.templates))
            try:
                yield
            finally:
                # open_clip_train's setup_logging adds root handlers on every call; drop this run's
                self.report_bad_rows()
                for h in list(logging.root.handlers):
                    if h not in handlers:
                        logging.root.removeHandler(h)
                        h.close()
                for name, lvl in levels.items():  # else torch's INFO-level exit reports flood the output
                    logging.getLogger(name).setLevel(lvl)

    def report_bad_rows(self):
        if not (self.args is None or is_master(self.args)):
            return
        for split, info in self.bad_rows.items():
            bad = info["skipped"]
            if not bad:
                continue
            where = f" (all of them in {os.path.join(self.log_dir, 'skipped_rows.json')})" if self.log_dir else ""
            names = "; ".join(f"line {r['line']} {r['image']}: {r['reason']}" for r in bad[:20])
            _logger.warning(f"{split} data {info['csv']}: skipped {len(bad)} of {info['rows']} rows{where}: {names}"
                            + (" ..." if len(bad) > 20 else ""))


def final_checkpoints(log_dir: str) -> List[str]:
    """The newest epoch_N.pt and epoch_latest.pt of a run (what resume and users pick up)."""
    folder = Path(log_dir) / "checkpoints"
    numbered = sorted((p for p in folder.glob("epoch_*.pt") if p.stem[len("epoch_"):].isdigit()),
                      key=lambda p: int(p.stem[len("epoch_"):]))
    out = [str(numbered[-1])] if numbered else []
    latest = folder / "epoch_latest.pt"
    return out + ([str(latest)] if latest.is_file() else [])


def calibrate_run(run: "_Run", opts, oc_args, model_name: str):
    """Fit the final checkpoint's calibrated boundaries on held-out images (rank 0, after training)."""
    from .calibrate import calibrate_checkpoint, format_distribution
    images = opts.drip_calibration_data or ([oc_args.imagenet_val] if oc_args.imagenet_val else None) \
        or ([oc_args.val_data] if oc_args.val_data else None)
    ckpts = final_checkpoints(run.log_dir) if run.log_dir else []
    if not ckpts:
        _logger.warning("no checkpoint written (--save-frequency 0 or no --logs): nothing to calibrate")
        return
    if not images:
        _logger.warning("no held-out images (--drip-calibration-data, --imagenet-val or --val-data): the checkpoint "
                        "stays uncalibrated and 'calibrated' boundaries fall back to 'threshold'; "
                        "run `llava-drip calibrate` later")
        return
    reports = [calibrate_checkpoint(model_name, c, images, opts.drip_calibration_target) for c in ckpts]
    write_json(Path(run.log_dir) / "calibration.json", reports[0])
    _logger.info("calibrated %s on %s\n%s", ", ".join(ckpts), " ".join(images),
                 format_distribution(reports[0]["calibration"], "held-out images"))


def _known_model(name: str) -> bool:
    import open_clip
    if name.startswith(("hf-hub:", "local-dir:")):
        return True
    return name in set(drip.list_models()) | set(open_clip.list_models())


def _fail(msg: str):
    raise SystemExit(f"llava-drip clip-train: {msg}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()  # ours, then open_clip_train's own; exits
    opts, rest = build_parser().parse_known_args(argv)
    oc_args = oc_parse_args(rest)  # the parser open_clip_train will use: a bad flag fails here, before any work

    if not _known_model(oc_args.model):
        _fail(f"unknown model {oc_args.model!r}. Available: {drip.list_models()} "
              "(and every name in open_clip.list_models())")
    if _is_drip_name(oc_args.model):
        if oc_args.grad_clip_norm is None:
            # DRIP's reference added clipping at 1.0 after fp16 NaN blow-ups (spec 7.4)
            rest += ["--grad-clip-norm", "1.0"]
        if oc_args.accum_freq > 1:
            _fail("--accum-freq > 1 is not supported for DRIP models: open_clip_train's accumulation "
                  "concatenates every model output, and DRIP's boundary loss is a scalar")
        if oc_args.siglip:
            _fail("--siglip is not supported for DRIP models (the DRIP factory takes no logit init kwargs)")
    elif opts.drip_eval_mode:
        _fail(f"--drip-eval-mode applies only to DRIP models, not {oc_args.model}")
    if opts.max_skipped_steps < 1:
        _fail("--max-skipped-steps must be >= 1")

    classnames = read_classnames(opts.zeroshot_classnames) if opts.zeroshot_classnames else None
    templates = read_templates(opts.zeroshot_templates) if opts.zeroshot_templates else None
    if oc_args.imagenet_val and classnames is not None:
        n = count_class_folders(oc_args.imagenet_val)
        if n < 5:
            _fail(f"--imagenet-val {oc_args.imagenet_val} has {n} classes; open_clip_train's zero-shot reports "
                  "top-5 and needs at least 5")
        if n != len(classnames):
            _fail(f"--imagenet-val {oc_args.imagenet_val} has {n} class folders but "
                  f"--zeroshot-classnames {opts.zeroshot_classnames} has {len(classnames)} names")
    if "cpu" in oc_args.device and oc_args.precision in ("amp", "fp16", "pure_fp16"):
        print(f"llava-drip clip-train: --precision {oc_args.precision} on CPU is slow or unsupported; "
              "use --precision fp32 or amp_bf16", file=sys.stderr)

    run = _Run(opts, classnames, templates)
    rc = 1
    try:
        with run.patched():
            try:
                result = oc_main.main(rest)
                rc = 0 if result is None or result == 0 else 1
                if rc == 0 and _is_drip_name(oc_args.model) and (run.args is None or is_master(run.args)):
                    calibrate_run(run, opts, oc_args, oc_args.model)
            except _StopRun as e:
                _logger.info(f"--stop-after-epoch {opts.stop_after_epoch}: stopping before epoch {e.args[0]}; "
                             "continue with the same flags and --resume latest")
                rc = 0
            except NonFiniteLossError as e:
                _logger.error(str(e))
                rc = 1
            except (ScheduleMismatchError, DataError, UnsafeCheckpointError, IncompleteCheckpointError) as e:
                _logger.error(str(e))
                rc = 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
