"""Vectorised group-mean pooling of patch tokens into segments (no loop over images or groups).

Token l belongs to group sigma(l) = sum_{j<l} b_j (exclusive cumulative count), so a boundary
closes its group. The membership matrix A[b, l, s] is one-hot in value but carries d A / d sigma = +1
on members, which is how the task loss reaches the boundary predictor through the straight-through
boundaries (spec 5.1; casting boundaries to long would cut that gradient, pitfall P5).
"""
from typing import NamedTuple

import torch


class Pooled(NamedTuple):
    groups: torch.Tensor  # [B, S, D] group means; rows of empty slots are zeros
    valid: torch.Tensor  # [B, S] bool, True where the slot holds at least one token
    group_ids: torch.Tensor  # [B, N] long, each token's group (>= S means dropped, reference tail case)


def group_mean_pool(h: torch.Tensor, boundaries: torch.Tensor, cover_tail: bool = True) -> Pooled:
    """Pool h [B, N, D] into segments given boundaries [B, N] (float, may carry an ST gradient).

    cover_tail=True: S = max_b (groups of image b), every token is in exactly one group.
    cover_tail=False (DTP / reference parity): S = max_b K_b, so an image with K_b == S loses the
    tokens after its last boundary, and a batch with no boundary at all yields S = 0.
    """
    B, N, D = h.shape
    b = boundaries.to(h.dtype) if h.dtype in (torch.float32, torch.float64) else boundaries.float()
    sigma = torch.cumsum(b, dim=1) - b  # [B, N] exclusive count, keeps the ST gradient
    sigma_hard = sigma.detach().round().long()
    if cover_tail:
        S = int(sigma_hard[:, -1].max().item()) + 1
    else:
        S = int(boundaries.detach().sum(dim=1).round().max().item())
    if S == 0:
        return Pooled(h.new_zeros(B, 0, D), torch.zeros(B, 0, dtype=torch.bool, device=h.device), sigma_hard)
    slots = torch.arange(S, device=h.device, dtype=b.dtype)
    delta = slots.view(1, 1, S) - sigma.unsqueeze(-1)  # [B, N, S]
    member = delta.detach() == 0
    A = (1.0 - delta) * member  # value 1 on members, gradient +1 w.r.t. sigma
    counts = member.sum(dim=1)  # [B, S] integer counts
    W = A / (counts.unsqueeze(1).to(A.dtype) + 1e-9)
    groups = torch.einsum("bnd,bns->bsd", h.to(W.dtype), W).to(h.dtype)
    return Pooled(groups, counts > 0, sigma_hard)
