"""Token budgets for DRIP at inference, and the calibration that makes the learned cut hit a mean.

One trained tower serves any budget:
- `Budget("ratio", r)`: exactly round(r N) visual tokens per image (top-k by predictor score);
- `Budget("count", k)`: exactly k tokens per image;
- `Budget("mean", r)`: a cut on the predictor's logits chosen so that the mean over a calibration set
  is r tokens per patch; counts follow the image (a plain sky fewer, a busy street more).

Calibration stores quantiles of the predictor's logits over held-out images (a [Q] curve), so the cut
for any mean is read off the curve without data at inference. The last patch always closes a segment,
so an image keeps G = 1 + #(logits of its first N-1 patches above the cut) tokens.
"""
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch

KINDS = ("ratio", "count", "mean")
NUM_QUANTILES = 1001  # cut resolution: 0.1 % of the calibration logits
_MAX_QUANTILE_INPUT = 1 << 24  # torch.quantile's input limit


@dataclass(frozen=True)
class Budget:
    kind: str  # ratio | count | mean
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "count":
            if self.value != int(self.value) or self.value < 1:
                raise ValueError(f"a token count budget must be a whole number >= 1, got {self.value}")
        elif not 0.0 < self.value <= 1.0:
            raise ValueError(f"a {self.kind} budget must be in (0, 1] (tokens per patch), got {self.value}")

    def count(self, num_patches: int) -> int:
        """Tokens per image for the fixed-count kinds."""
        if self.kind == "count":
            return max(1, min(num_patches, int(self.value)))
        if self.kind == "ratio":
            return max(1, min(num_patches, int(round(self.value * num_patches))))
        raise ValueError("a mean budget has no fixed count per image")

    def __str__(self) -> str:
        """The spec parse_budget reads back: a ratio always keeps its decimal point ('1.0' is every
        patch, '1' one token)."""
        if self.kind == "count":
            return str(int(self.value))
        text = repr(float(self.value))
        return f"mean:{text}" if self.kind == "mean" else text


BudgetLike = Union[None, str, float, int, Budget]


def parse_budget(spec: BudgetLike) -> Optional[Budget]:
    """'0.25' or 0.25 -> ratio; '16' or 16 -> count; 'mean:0.25' -> mean; None / '' / 'none' -> None."""
    if spec is None or isinstance(spec, Budget):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"invalid budget {spec!r}")
    if isinstance(spec, int):
        return Budget("count", spec)
    if isinstance(spec, float):
        return Budget("ratio", spec)
    text = str(spec).strip().lower()
    if text in ("", "none", "default"):
        return None
    try:
        if text.startswith("mean:"):
            return Budget("mean", float(text[len("mean:"):]))
        if text.isdigit():
            return Budget("count", int(text))
        return Budget("ratio", float(text))
    except ValueError as e:
        if "budget" in str(e):
            raise
        raise ValueError(f"invalid budget {spec!r}: use a ratio (0.25), a count (16) or a mean (mean:0.25)") from None


def topk_boundaries(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boundaries giving exactly counts[b] segments per row: the last patch closes one, the other
    counts[b] - 1 go to the highest logits among the rest. logits [B, N], counts [B] long."""
    B, n = logits.shape
    counts = counts.to(logits.device).clamp(1, n)
    order = logits[:, :-1].argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n - 1, device=logits.device).expand(B, -1))
    hard = (rank < (counts - 1)[:, None]).to(torch.float32)
    return torch.cat([hard, torch.ones(B, 1, device=logits.device)], dim=1)


def cut_for_mean(quantiles: torch.Tensor, mean: float, num_patches: int) -> float:
    """The logit cut whose mean segment count over the calibration set is mean * N."""
    if not bool(torch.isfinite(quantiles).all()):
        raise ValueError("this DRIP tower is not calibrated: run `llava-drip calibrate` (or use a ratio / count budget)")
    n = num_patches
    above = min(1.0, max(0.0, (mean * n - 1) / (n - 1)))  # share of the first N-1 logits above the cut
    level = 1.0 - above
    q = quantiles.double()
    pos = level * (q.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, q.numel() - 1)
    cut = q[lo] + (q[hi] - q[lo]) * (pos - lo)
    if above >= 1.0:
        return float("-inf")
    if above <= 0.0:
        return float("inf")
    return float(cut)


def threshold_boundaries(logits: torch.Tensor, cut: float) -> torch.Tensor:
    hard = (logits[:, :-1] > cut).to(torch.float32)
    return torch.cat([hard, torch.ones_like(hard[:, :1])], dim=1)


def budget_boundaries(logits: torch.Tensor, budgets: Sequence[Optional[Budget]], quantiles: torch.Tensor) -> torch.Tensor:
    """Per-row budgets (one Budget per image) -> hard boundaries [B, N]. Rows are independent."""
    B, n = logits.shape
    if len(budgets) != B:
        raise ValueError(f"got {len(budgets)} budgets for {B} images")
    out = torch.empty(B, n, device=logits.device)
    fixed = [i for i, b in enumerate(budgets) if b.kind != "mean"]
    if fixed:
        counts = torch.tensor([budgets[i].count(n) for i in fixed], device=logits.device)
        out[fixed] = topk_boundaries(logits[fixed], counts)
    for value in {b.value for b in budgets if b.kind == "mean"}:
        rows = [i for i, b in enumerate(budgets) if b.kind == "mean" and b.value == value]
        out[rows] = threshold_boundaries(logits[rows], cut_for_mean(quantiles, value, n))
    return out


def logit_quantiles(logit_batches: Iterable[torch.Tensor], num_quantiles: int = NUM_QUANTILES) -> torch.Tensor:
    """Quantiles of the logits of every image's first N-1 patches (the ones a cut decides)."""
    parts = [z[:, :-1].reshape(-1).float().cpu() for z in logit_batches]
    if not parts or sum(p.numel() for p in parts) == 0:
        raise ValueError("no calibration images could be read")
    flat = torch.cat(parts)
    if flat.numel() > _MAX_QUANTILE_INPUT:  # an even subsample keeps the quantiles to within its resolution
        flat = flat[torch.linspace(0, flat.numel() - 1, _MAX_QUANTILE_INPUT).long()]
    levels = torch.linspace(0, 1, num_quantiles, dtype=torch.float64)
    return torch.quantile(flat.double(), levels).float()


def as_budget_list(budget, batch: int) -> Optional[List[Optional[Budget]]]:
    """One Budget (or None) per image from a single spec or a per-image sequence."""
    if budget is None:
        return None
    if isinstance(budget, (list, tuple)):
        if len(budget) != batch:
            raise ValueError(f"got {len(budget)} budgets for {batch} images")
        return [parse_budget(b) for b in budget]
    return [parse_budget(budget)] * batch
