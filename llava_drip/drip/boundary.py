"""Boundary predictor, relaxed-Bernoulli sampling and the binomial prior loss.

Boundaries live in the 1-D raster order of the patch grid: b[i, l] = 1 closes the segment that
holds patch l, so patch l + 1 starts a new one (DTP / DRIP semantics).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .names import EVAL_MODES  # defined there, without torch, for the command line


class BoundaryPredictor(nn.Module):
    """Two-layer MLP giving one boundary logit per patch token.

    Runs in fp32 with autocast off: fp16 probabilities cannot represent 1 - 1e-4 and NaNs
    from low precision were the reference implementation's crash (spec P3).
    """

    def __init__(self, width: int, hidden_mult: int = 2, logit_clamp: float = 20.0, prob_clamp: float = 1e-4):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_mult * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_mult * width, 1)
        self.logit_clamp = logit_clamp
        self.prob_clamp = prob_clamp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, N, D] patch tokens -> clamped logits [B, N] in fp32."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            # weights may have been cast to bf16/fp16 with the rest of the model: compute in fp32 anyway
            y = F.linear(h.float(), self.fc1.weight.float(), self.fc1.bias.float())
            z = F.linear(self.act(y), self.fc2.weight.float(), self.fc2.bias.float()).squeeze(-1)
        return z.clamp(-self.logit_clamp, self.logit_clamp)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z).clamp(self.prob_clamp, 1.0 - self.prob_clamp)


def sample_boundaries(
    probs: torch.Tensor,
    temperature: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Relaxed-Bernoulli (Gumbel-sigmoid) sample with hard values and a straight-through gradient.

    The hard value 1[soft > 0.5] is exactly Bernoulli(probs) whatever the temperature; the
    temperature only shapes the surrogate gradient.
    """
    u = torch.rand(probs.shape, device=probs.device, dtype=probs.dtype, generator=generator)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    logits = torch.log(probs) - torch.log1p(-probs)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def deterministic_boundaries(
    logits: torch.Tensor,
    probs: torch.Tensor,
    mode: str,
    prior: float,
    temperature: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Eval-time boundaries: 'threshold' (each token's mode), 'topk' (round(p N) per image) or
    'sample' (relaxed Bernoulli from a caller-seeded generator)."""
    if mode == "threshold":
        return (logits > 0).to(torch.float32)
    if mode == "topk":
        # exactly G = round(p N) segments, as in the FLOP simulation: the last token always closes
        # one, the other G - 1 closings go to the highest logits among the rest
        n = logits.shape[1]
        g = max(1, min(n, int(round(prior * n))))
        hard = torch.zeros_like(logits, dtype=torch.float32)
        hard[:, -1] = 1.0
        if g > 1:
            idx = logits[:, :-1].topk(g - 1, dim=1).indices
            hard.scatter_(1, idx, 1.0)
        return hard
    if mode == "sample":
        return sample_boundaries(probs, temperature, generator).detach()
    if mode == "calibrated":
        raise ValueError("'calibrated' boundaries need the tower's calibration (DRIPVisionTransformer handles it)")
    raise ValueError(f"unknown eval_mode {mode!r}; expected one of {EVAL_MODES}")


def even_boundaries(batch: int, n: int, num_groups: int, device=None) -> torch.Tensor:
    """Evenly spaced boundaries giving exactly `num_groups` segments (the FLOP simulation)."""
    num_groups = max(1, min(n, int(num_groups)))
    b = torch.zeros(batch, n, device=device)
    # segment g closes at the last token of its share; the final segment ends at n-1 by coverage
    ends = torch.floor(torch.arange(1, num_groups, device=device, dtype=torch.float64) * n / num_groups).long() - 1
    if ends.numel():
        b[:, ends] = 1.0
    return b


def binomial_prior_loss(boundaries: torch.Tensor, prior: float) -> torch.Tensor:
    """-mean_b log Binomial(K_b; N, p) / N, with K_b the straight-through hard count.

    Written with lgamma so no validation runs on the (integer-valued but float) counts.
    """
    n = boundaries.shape[1]
    k = boundaries.sum(dim=1)
    log_binom = (
        math.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + k * math.log(prior)
        + (n - k) * math.log1p(-prior)
    )
    return -(log_binom / n).mean()


def check_prior(prior: float) -> float:
    if not 0.0 < prior < 1.0:
        raise ValueError(f"boundary prior must be in (0, 1), got {prior}")
    return float(prior)
