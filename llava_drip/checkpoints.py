"""Checkpoints that survive kill -9 and never run pickled code on resume (both training paths).

- `atomic_torch_save`: torch.save to a temporary name in the same folder, fsync, then os.replace, so a
  checkpoint name only ever points at a complete file.
- `check_torch_file`: parse a torch file with weights_only=True (memory-mapped: the tensors are not
  read), allowing only the plain-data classes DeepSpeed stores. A pickled `__reduce__` payload fails
  here, before DeepSpeed or open_clip_train load the file with weights_only=False / their defaults.
  A truncated file fails too (its zip directory is at the end).
- `pick_llava_checkpoint` / `pick_clip_checkpoint`: the newest checkpoint that passes these checks, with
  the ones skipped and why.
"""
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import torch

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds pickled objects other than tensors and plain data."""


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint is missing files or has a file that cannot be read (e.g. truncated by a kill)."""


def atomic_torch_save(obj, f, *args, **kwargs):
    """torch.save with the same signature; file names are written atomically (tmp + fsync + rename)."""
    if not isinstance(f, (str, os.PathLike)):
        return _TORCH_SAVE(obj, f, *args, **kwargs)
    path = Path(f)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            _TORCH_SAVE(obj, fh, *args, **kwargs)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_TORCH_SAVE = torch.save


def _numpy_globals() -> list:
    """numpy arrays and dtypes (HF's rng_state.pth holds numpy's RNG state): the list HF itself allows."""
    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _deepspeed_globals() -> list:
    """Plain-data classes DeepSpeed writes into its checkpoint files (checked on real ZeRO 1-3 files)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    return out


def check_torch_file(path: PathLike, extra_globals: Iterable = ()) -> None:
    """Raise UnsafeCheckpointError / IncompleteCheckpointError unless `path` loads with weights_only=True."""
    allowed = list(extra_globals) + _numpy_globals() + _deepspeed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(e)
        if "Unsupported global" in text or "Unsupported operand" in text or "WeightsUnpickler" in text:
            first = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln), text.splitlines()[0])
            raise UnsafeCheckpointError(
                f"{path}: refusing to load it, it holds pickled code/objects that are not tensors or plain data "
                f"({first}). Only load checkpoints you wrote yourself; delete the file to start from the "
                f"previous checkpoint.") from None
        raise IncompleteCheckpointError(f"{path}: cannot be read ({type(e).__name__}: "
                                        f"{text.splitlines()[0] if text else ''})") from None


def check_safetensors_file(path: PathLike) -> None:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise IncompleteCheckpointError(f"{path}: cannot be read ({e})") from None


# ---- LLaVA (HF Trainer, optionally DeepSpeed) ---------------------------------------------------------
_STEP = re.compile(r"^checkpoint-(\d+)$")
_HF_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")


def llava_checkpoint_problem(folder: PathLike, world_size: int = 1) -> str:
    """'' if an HF Trainer checkpoint folder is complete and safe to resume from, else why not."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if "global_step" not in state:
            return "trainer_state.json has no global_step"
    except FileNotFoundError:
        return "no trainer_state.json (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({e})"
    try:
        weights = sorted(folder.glob("*.safetensors"))
        for w in weights:
            check_safetensors_file(w)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text())["weight_map"].values())
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return f"weight shards missing: {', '.join(missing)}"
        latest = folder / "latest"
        if latest.is_file():  # DeepSpeed: global_stepN/ holds the engine state of every rank
            tag = latest.read_text().strip()
            ds = folder / tag
            if not ds.is_dir():
                return f"DeepSpeed state {tag}/ missing"
            files = sorted(ds.glob("*.pt"))
            for r in range(world_size):
                if not any(f"zero_pp_rank_{r}_" in f.name or f.name == f"mp_rank_{r:02d}_model_states.pt"
                           for f in files):
                    return f"DeepSpeed state of rank {r} missing in {tag}/"
            for f in files:
                check_torch_file(f)
        elif not weights and not (folder / "adapter_model.safetensors").is_file():
            return "no model weights"
        for name in _HF_TORCH_FILES:
            if (folder / name).is_file():
                check_torch_file(folder / name)
        for rng in folder.glob("rng_state*.pth"):
            check_torch_file(rng)
    except UnsafeCheckpointError:
        raise
    except IncompleteCheckpointError as e:
        return str(e)
    return ""


def pick_llava_checkpoint(output_dir: PathLike, world_size: int = 1) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest complete checkpoint-N under output_dir and the newer ones skipped, as (path, why)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None, []
    found = sorted(((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP.match(p.name))),
                   reverse=True)
    skipped = []
    for _, p in found:
        why = llava_checkpoint_problem(p, world_size)
        if not why:
            return str(p), skipped
        skipped.append((str(p), why))
    return None, skipped


# ---- clip-train (open_clip_train's epoch_N.pt) --------------------------------------------------------
_EPOCH = re.compile(r"^epoch_(\d+)\.pt$")


def pick_clip_checkpoint(checkpoint_dir: PathLike) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest epoch_N.pt / epoch_latest.pt that loads, and the newer ones skipped as (path, why).

    open_clip_train's own pick sorts every *.pt by name, so a `tmp.pt` left by a kill would win."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None, []
    cands = []
    for p in folder.iterdir():
        m = _EPOCH.match(p.name)
        if m:
            cands.append((int(m.group(1)), 0, p))
        elif p.name == "epoch_latest.pt":
            cands.append((None, 1, p))
    skipped = []
    ordered = []
    for epoch, _, p in cands:
        if epoch is None:  # epoch_latest.pt: ranked by the epoch stored in it, once it loads
            try:
                check_torch_file(p)
                epoch = int(torch.load(p, map_location="cpu", weights_only=True, mmap=True).get("epoch", -1))
            except (UnsafeCheckpointError, IncompleteCheckpointError, AttributeError, ValueError, TypeError) as e:
                if isinstance(e, UnsafeCheckpointError):
                    raise
                skipped.append((str(p), str(e)))
                continue
            ordered.append((epoch, 1, p))
        else:
            ordered.append((epoch, 0, p))
    for epoch, _, p in sorted(ordered, key=lambda t: (t[0], t[1]), reverse=True):
        try:
            check_torch_file(p)
        except IncompleteCheckpointError as e:
            skipped.append((str(p), str(e)))
            continue
        return str(p), skipped
    return None, skipped
