"""Per-step bookkeeping for `clip-train`: step time, peak memory, DRIP ratios, non-finite skips.

The monitor never touches open_clip_train's loop code. `instrument_optimizer` wraps the two
optimizer calls the loop makes every step (zero_grad at the start, step at the end) and, with
AMP, `scaler.update` (the last call of a step, made even when the scaler skips the step).
The loss wrapper reports its values through `observe_loss`.

Outputs in the run's log folder (rank 0):
  steps.jsonl      one line per optimizer step: epoch, step, lr, loss terms, ratios, time, memory
  efficiency.json  one entry per epoch: average step time, average peak memory, ratios, skips
"""
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from llava_drip.eval.io_utils import write_json
from llava_drip.utils import PeakMemory

_logger = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive optimizer steps were skipped for a non-finite loss."""


def _mean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class StepMonitor:
    def __init__(self, max_consecutive_skips: int = 10):
        if max_consecutive_skips < 1:
            raise ValueError("--max-skipped-steps must be >= 1")
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.total_skips = 0
        self.memory: Optional[PeakMemory] = None
        self.log_dir: Optional[Path] = None
        self.is_master = True
        self.run_info: Dict = {}
        self.device = torch.device("cpu")
        self.log_every = 1
        self._epoch = None
        self._steps_per_epoch = 0
        self._i = 0
        self._records: List[Dict] = []
        self._steps_file = None
        self._tb = None
        self._reset_step()

    # ---- set-up --------------------------------------------------------------------------------
    def configure(self, args, log_dir: Optional[str], is_master: bool):
        """Called once the training args are final (device, rank, log folder)."""
        self.device = torch.device(args.device)
        if self.memory is None:
            self.memory = PeakMemory(self.device)
        self.is_master = is_master
        self.log_dir = Path(log_dir) if (log_dir and is_master) else None
        self.log_every = max(1, args.log_every_n_steps)
        self.run_info = {
            "model": args.model, "device": str(self.device), "world_size": args.world_size,
            "precision": args.precision, "batch_size_per_rank": args.batch_size,
            "accum_freq": args.accum_freq, "memory_metric": self.memory.kind,
            "memory_metric_description": self.memory.describe(),
            "step_time_definition": "batch on device -> optimizer step done (data loading excluded); rank 0",
        }

    # ---- epoch -----------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, steps_per_epoch: int, tb_writer=None):
        self._epoch = epoch
        self._steps_per_epoch = steps_per_epoch
        self._tb = tb_writer
        self._i = 0
        self._records: List[Dict] = []
        self._epoch_t0 = time.perf_counter()
        self._reset_step()
        if self.log_dir is not None:
            path = self.log_dir / "steps.jsonl"
            if path.exists():
                # a resumed run redoes this epoch: drop lines an interrupted attempt left behind
                keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                        if ln.strip() and json.loads(ln)["epoch"] < epoch]
                path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
            self._steps_file = open(path, "a", encoding="utf-8")
        else:
            self._steps_file = None

    def end_epoch(self, stopped: Optional[str] = None) -> Dict:
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None
        recs = self._records
        wall = time.perf_counter() - self._epoch_t0
        summary = {
            "epoch": self._epoch,
            "steps": len(recs),
            "skipped_steps": sum(r["skipped"] for r in recs),
            "avg_step_time_s": _mean([r["step_time_s"] for r in recs]),
            "avg_peak_memory_mb": _mean([r["peak_memory_mb"] for r in recs]),
            "max_peak_memory_mb": max((r["peak_memory_mb"] for r in recs), default=None),
            "avg_boundary_ratio": _mean([r.get("boundary_ratio") for r in recs]),
            "avg_group_ratio": _mean([r.get("group_ratio") for r in recs]),
            "avg_loss": _mean([r.get("loss") for r in recs if not r["skipped"]]),
            "epoch_time_s": wall,
        }
        if stopped:
            summary["stopped"] = stopped
        if self.is_master:
            ratio = "" if summary["avg_boundary_ratio"] is None else (
                f", boundary ratio {summary['avg_boundary_ratio']:.3f}, group ratio {summary['avg_group_ratio']:.3f}")
            step_t = summary["avg_step_time_s"]
            mem = summary["avg_peak_memory_mb"]
            _logger.info(
                f"Efficiency epoch {self._epoch}: {summary['steps']} steps, avg step time "
                f"{'n/a' if step_t is None else f'{step_t:.4f} s'}, avg peak memory "
                f"{'n/a' if mem is None else f'{mem:.1f} MB'} ({self.memory.kind}){ratio}, "
                f"skipped {summary['skipped_steps']}")
        if self.log_dir is not None:
            path = self.log_dir / "efficiency.json"
            doc = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            epochs = [e for e in doc.get("epochs", []) if e["epoch"] != self._epoch]
            epochs.append(summary)
            doc = {**self.run_info, "epochs": sorted(epochs, key=lambda e: e["epoch"])}
            write_json(path, doc)
        self._epoch = None
        return summary

    # ---- step ------------------------------------------------------------------------------------
    def _reset_step(self):
        self._in_step = False
        self._t0 = None
        self._losses: Dict[str, float] = {}
        self._ratios: Dict[str, float] = {}
        self.nonfinite = False

    def begin_step(self):
        if self._in_step:  # with --accum-freq > 1 zero_grad runs more than once per step
            return
        self._in_step = True
        if self.memory is not None:
            self.memory.reset()
        self._t0 = time.perf_counter()

    def observe_loss(self, losses: Dict[str, torch.Tensor], boundary_ratio=None, group_ratio=None):
        total = sum(v.detach().float() for v in losses.values())
        bad = ~torch.isfinite(total)
        if dist.is_available() and dist.is_initialized():
            # every rank must agree to skip, or their weights drift apart
            flag = bad.to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag[0] > 0
        self.nonfinite = self.nonfinite or bool(bad)
        self._losses = {k: float(v.detach()) for k, v in losses.items()}
        self._losses["loss"] = float(total)
        for key, val in (("boundary_ratio", boundary_ratio), ("group_ratio", group_ratio)):
            if val is not None:
                self._ratios[key] = float(val.detach().float().mean())

    def end_step(self, optimizer):
        if self._t0 is None:  # step() outside a zero_grad-opened step (not from the loop)
            self._reset_step()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rec = {
            "epoch": self._epoch,
            "step": None if self._epoch is None else self._steps_per_epoch * self._epoch + self._i,
            "lr": optimizer.param_groups[0]["lr"],
            **self._losses, **self._ratios,
            "step_time_s": time.perf_counter() - self._t0,
            "peak_memory_mb": self.memory.peak_mb() if self.memory is not None else None,
            "skipped": self.nonfinite,
        }
        skipped = self.nonfinite
        self._reset_step()
        self._i += 1
        self._records.append(rec)
        if self._steps_file is not None:
            self._steps_file.write(json.dumps(rec) + "\n")
            self._steps_file.flush()
        if self.is_master and (rec["step"] is not None and (self._i - 1) % self.log_every == 0):
            if self._tb is not None:
                for key in ("boundary_ratio", "group_ratio", "step_time_s", "peak_memory_mb"):
                    if rec.get(key) is not None:
                        self._tb.add_scalar(f"train/{key}", rec[key], rec["step"])
            if "boundary_ratio" in rec:
                _logger.info(f"DRIP step {rec['step']}: boundary ratio {rec['boundary_ratio']:.3f}, "
                             f"group ratio {rec['group_ratio']:.3f}, step {rec['step_time_s']:.3f} s")
        if skipped:
            self.consecutive_skips += 1
            self.total_skips += 1
            terms = ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if k.endswith("loss"))
            _logger.warning(f"step {rec['step']}: non-finite loss ({terms}); optimizer step skipped "
                            f"({self.consecutive_skips} in a row, limit {self.max_consecutive_skips})")
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"stopping: {self.consecutive_skips} consecutive steps had a non-finite loss "
                    f"(last at epoch {rec['epoch']}, step {rec['step']}: {terms}). The weights are those of the "
                    f"last finite step. Lower --lr, keep --grad-clip-norm, use --precision fp32 or amp_bf16, "
                    f"or raise --max-skipped-steps.")
        else:
            self.consecutive_skips = 0


@contextlib.contextmanager
def instrument_optimizer(optimizer, scaler, monitor: StepMonitor):
    """Route the loop's per-step optimizer calls through the monitor; skip steps with a non-finite loss.

    Skipping the optimizer step itself (not zeroing the loss) leaves weights, AdamW moments and
    weight decay exactly as they were.
    """
    real_zero_grad, real_step = optimizer.zero_grad, optimizer.step

    def zero_grad(*args, **kwargs):
        monitor.begin_step()
        return real_zero_grad(*args, **kwargs)

    def step(*args, **kwargs):
        result = None if monitor.nonfinite else real_step(*args, **kwargs)
        if scaler is None:
            monitor.end_step(optimizer)
        return result

    optimizer.zero_grad, optimizer.step = zero_grad, step
    real_update = None
    if scaler is not None:
        real_update = scaler.update

        def update(*args, **kwargs):
            result = real_update(*args, **kwargs)
            monitor.end_step(optimizer)
            return result

        scaler.update = update
    try:
        yield
    finally:
        # instance attributes shadow the class methods; deleting them restores the originals
        del optimizer.zero_grad, optimizer.step
        if real_update is not None:
            del scaler.update
