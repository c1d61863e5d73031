"""Small pieces several stages share: atomic tensor files, peak-memory measurement, the CPU name.

Kept free of transformers/open_clip imports so any module can use them cheaply.
"""
import os
import platform
import resource
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def atomic_save_tensors(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike], torch_format: bool = False,
                        metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write tensors so a reader never sees a half-written file (tmp file in the same folder + os.replace):
    safetensors, or torch.save for LLaVA's `.bin` names. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if torch_format:
            torch.save(clean, tmp)
        else:
            from safetensors.torch import save_file
            save_file(clean, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def cpu_name() -> str:
    """The CPU model for benchmark tables (/proc/cpuinfo on Linux, else platform's best guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM): Linux's counterpart of reset_peak_memory_stats."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory: CUDA allocator peak on GPU, peak resident set size on CPU.

    On Linux the RSS high-water mark can be reset per step (VmHWM via /proc/self/clear_refs).
    Elsewhere only getrusage's ru_maxrss is available, a process-lifetime mark that cannot be reset.
    """

    DESCRIPTIONS = {
        "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated, reset every step",
        "cpu_peak_rss_per_step": "peak resident set size of the process, reset every step (VmHWM)",
        "cpu_peak_rss_since_start": "ru_maxrss: peak resident set size since the process started (cannot be reset)",
    }

    def __init__(self, device: Union[str, torch.device]):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif _reset_rss_peak() and _proc_status_kb("VmHWM") is not None:
            self.kind = "cpu_peak_rss_per_step"
        else:
            self.kind = "cpu_peak_rss_since_start"

    def describe(self) -> str:
        return self.DESCRIPTIONS[self.kind]

    def reset(self):
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_per_step":
            _reset_rss_peak()

    def current_mb(self) -> Optional[float]:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.memory_allocated(self.device) / 2**20
        kb = _proc_status_kb("VmRSS")
        return None if kb is None else kb / 1024

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss_per_step":
            return _proc_status_kb("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def measure(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak growth (MiB) while fn runs; None where the peak cannot be reset."""
        if self.kind == "cpu_peak_rss_since_start":
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset()
        before = self.current_mb()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.peak_mb() - before
