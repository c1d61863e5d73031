"""Projectors with LLaVA's names and state-dict keys: linear, mlp{N}x_gelu, identity."""
import re

import torch.nn as nn


def build_vision_projector(config) -> nn.Module:
    kind = getattr(config, "mm_projector_type", "linear")
    d_in, d_out = config.mm_hidden_size, config.hidden_size
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m:
        layers = [nn.Linear(d_in, d_out)]
        for _ in range(int(m.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        return nn.Sequential(*layers)
    if kind == "identity":
        if d_in != d_out:
            raise ValueError(f"identity projector needs mm_hidden_size == hidden_size, got {d_in} vs {d_out}")
        return nn.Identity()
    raise ValueError(f"Unknown projector type: {kind!r} (linear, mlp<N>x_gelu, identity)")
