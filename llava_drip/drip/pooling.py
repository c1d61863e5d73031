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
    slots = torch.arange(S, device=h.device)
    # membership from the rounded count: straight-through values can sit one ulp off an integer
    # (hard + soft - soft is not always exact), and an exact == test would drop those tokens
    member = slots.view(1, 1, S) == sigma_hard.unsqueeze(-1)  # [B, N, S]
    A = member * (1.0 + sigma - sigma.detach()).unsqueeze(-1)  # value 1 on members, gradient +1 w.r.t. sigma
    counts = member.sum(dim=1)  # [B, S] integer counts
    W = A / (counts.unsqueeze(1).to(A.dtype) + 1e-9)
    groups = torch.einsum("bnd,bns->bsd", h.to(W.dtype), W).to(h.dtype)
    return Pooled(groups, counts > 0, sigma_hard)


class PackedGroups(NamedTuple):
    """Every image's [CLS, group_0, ..., group_{G_b-1}] rows stacked into one [T, D] tensor.

    Token-wise layers (norms, QKV, MLP) run on `tokens` with no padding at all; attention scatters
    its q/k/v into the [B, L] grid given by `index` and masks with `attend` (L = 1 + S).
    """
    tokens: torch.Tensor  # [T, D], T = sum_b lengths[b]
    lengths: torch.Tensor  # [B] long, 1 + G_b
    offsets: torch.Tensor  # [B] long, row of each image's CLS in `tokens`
    index: torch.Tensor  # [T] long, position b * L + j of each row in the padded [B, L] grid
    attend: torch.Tensor  # [B, L] bool, True for real rows (the padded path's `valid`)
    dense: bool  # every image has L rows, so the grid is `tokens` itself (no scatter needed)
    cu_seqlens: torch.Tensor  # [B + 1] int32, row where each image starts (and T at the end): varlen kernels' input

    @property
    def max_len(self) -> int:
        return self.attend.shape[1]

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] packed rows -> [B, L, ...] with zero rows at padding."""
        B, L = self.attend.shape
        if self.dense:
            return x.reshape(B, L, *x.shape[1:])
        grid = x.new_zeros(B * L, *x.shape[1:]).index_copy(0, self.index, x)
        return grid.view(B, L, *x.shape[1:])

    def from_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...], dropping padding rows."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.dense else flat.index_select(0, self.index)


def pack_groups(cls: torch.Tensor, h: torch.Tensor, boundaries: torch.Tensor, cover_tail: bool = True) -> PackedGroups:
    """Group-mean pooling straight into the packed layout: same groups and values as
    `group_mean_pool` (plus CLS in front of each image), without any [B, N, S] tensor.

    cls: [B, D] class tokens; h: [B, N, D] patch tokens; boundaries: [B, N] (may carry an ST gradient).
    With autograd on, each token is scaled by 1 + sigma - sigma.detach() (value 1), which gives the
    boundaries exactly the gradient the membership matrix of `group_mean_pool` gives them.
    """
    B, N, D = h.shape
    b = boundaries.to(h.dtype) if h.dtype in (torch.float32, torch.float64) else boundaries.float()
    sigma = torch.cumsum(b, dim=1) - b
    sigma_hard = sigma.detach().round().long()
    last = sigma_hard[:, -1] + 1  # groups each image would have with its tail covered
    if cover_tail:
        n_groups = last
    else:
        # DTP semantics: S = max K_b slots; an image with K_b == S loses its tail tokens
        S = int(boundaries.detach().sum(dim=1).round().max().item())
        n_groups = last.clamp(max=S)
    lengths = 1 + n_groups
    offsets = torch.cumsum(lengths, 0) - lengths
    lengths_host = lengths.tolist()  # one host sync: sizes of everything below
    T, L = sum(lengths_host), max(lengths_host)

    # destination row of every patch token; dropped tail tokens go to a spare row T
    dest = offsets[:, None] + 1 + sigma_hard
    dest = torch.where(sigma_hard < n_groups[:, None], dest, torch.full_like(dest, T))
    acc_dtype = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    src = h.to(acc_dtype)
    if torch.is_grad_enabled() and sigma.requires_grad:
        src = src * (1.0 + sigma - sigma.detach()).to(acc_dtype).unsqueeze(-1)
    all_dest = torch.cat([offsets, dest.reshape(-1)])
    all_src = torch.cat([cls.to(acc_dtype), src.reshape(B * N, D)])
    sums = all_src.new_zeros(T + 1, D).index_add(0, all_dest, all_src)[:T]
    counts = torch.bincount(all_dest, minlength=T + 1)[:T].to(acc_dtype)
    tokens = (sums / counts.unsqueeze(1)).to(h.dtype)

    img = torch.repeat_interleave(torch.arange(B, device=h.device), lengths, output_size=T)
    pos = torch.arange(T, device=h.device) - offsets[img]
    index = img * L + pos
    attend = torch.arange(L, device=h.device).unsqueeze(0) < lengths.unsqueeze(1)
    cu_seqlens = torch.cat([offsets, offsets.new_full((1,), T)]).to(torch.int32)
    return PackedGroups(tokens, lengths, offsets, index, attend, T == B * L, cu_seqlens)


def group_centroids(boundaries: torch.Tensor, n_slots: int, grid) -> torch.Tensor:
    """Where each group lies: [B, N] boundaries -> [B, n_slots, 2] mean (row, col) of its patches, both in
    [0, 1] (raster order, row-major grid (h, w)); empty slots and dropped tail tokens give 0. No host sync.

    The pooled features lose most of the patch position embedding's signal by the last block, so LLaVA can
    hand the LLM each token's place explicitly (--mm_vision_token_pos centroid)."""
    B, N = boundaries.shape
    gh, gw = grid
    b = boundaries.detach().float()
    slot = (torch.cumsum(b, dim=1) - b).round().long()  # each patch's group, as group_mean_pool counts it
    idx = torch.arange(N, device=b.device)
    coords = torch.stack([(idx // gw).float() / max(gh - 1, 1), (idx % gw).float() / max(gw - 1, 1)], dim=-1)
    keep = (slot < n_slots).float()  # cover_tail=False drops the tokens after the last boundary
    slot = slot.clamp(max=max(n_slots - 1, 0))
    if n_slots == 0:
        return b.new_zeros(B, 0, 2)
    sums = b.new_zeros(B, n_slots, 2).scatter_add_(1, slot[..., None].expand(B, N, 2), coords * keep[..., None])
    counts = b.new_zeros(B, n_slots).scatter_add_(1, slot, keep)
    return sums / counts.clamp(min=1)[..., None]
