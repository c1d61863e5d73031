"""Variable-length attention for the packed layout: every image's rows attend among themselves,
read straight from the packed [T, H, hd] q/k/v with cumulative row offsets (cu_seqlens), so the
attention core neither scatters into a padded [B, L] grid nor computes masked pad rows.

Backends (`set_varlen_backend`, or $LLAVA_DRIP_VARLEN at import):
  auto        torch's varlen kernel (torch.nn.attention.varlen, Flash Attention) on CUDA in fp16 / bf16,
              else flash-attn's flash_attn_varlen_func when installed; otherwise none (SDPA on the grid)
  torch       torch's kernel, error when it cannot run
  flash_attn  flash-attn's kernel, error when it cannot run
  reference   one SDPA call per image on any device: slow, the contract's executable definition (tests)
  off         never (always SDPA on the padded grid)

None of the backends reads a tensor on the host: the row offsets stay on the device and the longest
row count is the layout's, already known when the packed tensor was sized.
"""
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

VARLEN_BACKENDS = ("auto", "torch", "flash_attn", "reference", "off")
_HALF = (torch.float16, torch.bfloat16)

Kernel = Callable[..., torch.Tensor]  # (q, k, v, cu_seqlens, max_len) -> [T, H, hd]


def _check(name: str) -> str:
    if name not in VARLEN_BACKENDS:
        raise ValueError(f"varlen backend {name!r} is not one of {', '.join(VARLEN_BACKENDS)}")
    return name


_backend = _check(os.environ.get("LLAVA_DRIP_VARLEN", "auto"))


def set_varlen_backend(name: str) -> str:
    """Pick the backend for every DRIP tower in the process; returns the previous one."""
    global _backend
    prev, _backend = _backend, _check(name)
    return prev


def get_varlen_backend() -> str:
    return _backend


def _torch_kernel() -> Optional[Kernel]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return lambda q, k, v, cu, max_len: varlen_attn(q, k, v, cu, cu, max_len, max_len)


def _flash_attn_kernel() -> Optional[Kernel]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)


def reference_varlen(q, k, v, cu_seqlens, max_len):
    """The contract, one image at a time: rows cu[i]:cu[i+1] attend among themselves. Reads the
    offsets on the host, so it is for checking, not speed."""
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # [H, n, hd]
        out[a:b] = F.scaled_dot_product_attention(*seg).transpose(0, 1)
    return out


def _fits(x: torch.Tensor, head_dim: int) -> bool:
    # what the Flash kernels accept: CUDA, half precision, head dim a multiple of 8 up to 256
    return x.is_cuda and x.dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256


def varlen_kernel(x: torch.Tensor, head_dim: int) -> Optional[Kernel]:
    """The kernel the packed attention should call for activations `x`, or None for SDPA on the grid."""
    name = _backend
    if name == "off":
        return None
    if name == "reference":
        return reference_varlen
    if name == "auto":
        if not _fits(x, head_dim):
            return None
        return _torch_kernel() or _flash_attn_kernel()
    kernel = _torch_kernel() if name == "torch" else _flash_attn_kernel()
    if kernel is None:
        raise RuntimeError(f"varlen backend {name!r} is not available in this install")
    if not _fits(x, head_dim):
        raise RuntimeError(f"varlen backend {name!r} needs CUDA fp16/bf16 activations with a head dim that is a "
                           f"multiple of 8 up to 256; got {x.device.type} {x.dtype}, head dim {head_dim}")
    return kernel
