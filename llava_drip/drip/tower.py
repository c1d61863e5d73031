"""DRIP vision tower: a ViT that pools its patch tokens into learned segments after `pre_layers` blocks.

Forward (batch first):
  image -> conv1 patches [B, N, D] -> CLS + position embedding -> ln_pre (absent with ln_pre=False)
  -> pre_blocks at full length [B, 1+N, D]
  -> boundary predictor on the patch tokens -> boundaries [B, N] (sampled in train, deterministic in eval)
  -> group-mean pooling [B, S, D] + valid mask -> CLS re-attached -> ln_short
  -> post_blocks on [B, 1+S, D] with a key-padding mask -> ln_post -> pool -> proj (+ proj_bias)

attn_impl='packed' runs the same post-pooling stack on every image's rows stacked into one
[sum_b (1+G_b), D] tensor: token-wise layers see no padding, and only the attention core is laid
out as [B, 1+S] with a key mask (its cost is ~1 % of a block at these lengths). Outputs match the
padded path; it needs the masked semantics (pad_mask on, reference_mean off), since the reference
lets pad rows take part in attention and the mean. The default, 'auto', runs packed whenever those
semantics hold and the batch has 2+ images, padded otherwise (reference parity, a single image).

Parameter names follow open_clip's VisionTransformer (conv1, class_embedding, positional_embedding,
ln_pre, resblock ln_1/attn/ln_2/mlp.c_fc/mlp.c_proj, ln_post, proj) so ViT weights map one to one.
Two options exist for the reference's layout (convert_reference.py), both off by default so the saved
keys are open_clip's: ln_pre=False builds no ln_pre at all (no ln_pre.* keys), and proj_bias=True adds
a `proj_bias` [output_dim] parameter, added after `@ proj` and before any normalisation (the
reference's Linear head).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import logging

import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .boundary import (EVAL_MODES, BoundaryPredictor, binomial_prior_loss, check_prior,
                       deterministic_boundaries, sample_boundaries)
from .budget import NUM_QUANTILES, Budget, as_budget_list, budget_boundaries, logit_quantiles
from .pooling import PackedGroups, group_centroids, group_mean_pool, pack_groups
from .varlen import varlen_kernel

_logger = logging.getLogger(__name__)

POOL_TYPES = ("mean_incl_cls", "mean_excl_cls", "cls", "last")
ATTN_IMPLS = ("padded", "packed", "auto")


class Block(nn.Module):
    """Pre-norm transformer block with open_clip's parameter names and an optional padding mask.

    Attention goes through F.scaled_dot_product_attention so a boolean key mask costs nothing extra.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)  # holds in_proj / out_proj weights
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def attention(self, x: torch.Tensor, attend: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, hd]
        mask = None if attend is None else attend[:, None, None, :]  # [B, 1, 1, L], True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.attn.out_proj(out)

    def forward(self, x: torch.Tensor, attend: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))

    def attention_packed(self, x: torch.Tensor, layout: PackedGroups) -> torch.Tensor:
        T, D = x.shape
        B, L = layout.attend.shape
        kernel = varlen_kernel(x, D // self.heads)
        if kernel is not None:  # rows attend within their image straight from the packed tensor
            qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
            q, k, v = qkv.view(T, 3, self.heads, D // self.heads).unbind(1)  # 3 x [T, H, hd]
            out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), layout.cu_seqlens, L)
            return self.attn.out_proj(out.reshape(T, D))
        qkv = layout.to_padded(F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias))  # [B, L, 3D]
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if layout.dense else layout.attend[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = layout.from_padded(out.transpose(1, 2).reshape(B, L, D))
        return self.attn.out_proj(out)

    def forward_packed(self, x: torch.Tensor, layout: PackedGroups) -> torch.Tensor:
        """x: [T, D] packed rows of every image (see pooling.PackedGroups)."""
        x = x + self.attention_packed(self.ln_1(x), layout)
        return x + self.mlp(self.ln_2(x))


@dataclass
class DRIPFeatures:
    """Everything one tower forward produces. `tokens` rows where `valid` is False are padding."""
    hidden: torch.Tensor  # [B, 1+S, D] selected layer output (ln_post applied when select_layer == -1)
    valid: torch.Tensor  # [B, 1+S] bool, column 0 is CLS (always valid)
    boundaries: torch.Tensor  # [B, N] hard values (with an ST gradient in training)
    boundary_loss: torch.Tensor  # scalar binomial prior loss
    num_patches: int

    @property
    def num_groups(self) -> torch.Tensor:
        """Visual tokens per image after pooling, CLS excluded: [B] long."""
        return self.valid[:, 1:].sum(dim=1)

    @property
    def boundary_ratio(self) -> torch.Tensor:
        """Realised K/N averaged over the batch (the quantity the prior targets)."""
        return self.boundaries.detach().sum(dim=1).mean() / self.num_patches

    @property
    def group_ratio(self) -> torch.Tensor:
        """Kept tokens per patch, G/N, averaged over the batch."""
        return self.num_groups.float().mean() / self.num_patches


class DRIPVisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 32,
        width: int = 768,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        pre_layers: int = 2,
        post_layers: int = 10,
        output_dim: int = 512,
        prior: float = 0.25,
        temperature: float = 0.5,
        predictor_hidden_mult: int = 2,
        logit_clamp: float = 20.0,
        prob_clamp: float = 1e-4,
        eval_mode: str = "calibrated",
        eval_seed: int = 0,
        pool_type: str = "mean_incl_cls",
        pad_mask: bool = True,
        reference_mean: bool = False,
        cover_tail: bool = True,
        shared_norm: bool = False,
        attn_impl: str = "auto",
        ln_pre: bool = True,
        proj_bias: bool = False,
        act_layer=nn.GELU,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if pool_type not in POOL_TYPES:
            raise ValueError(f"unknown pool_type {pool_type!r}; expected one of {POOL_TYPES}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"unknown eval_mode {eval_mode!r}; expected one of {EVAL_MODES}")
        if post_layers < 1:
            raise ValueError("DRIP needs at least one post-pooling block")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {ATTN_IMPLS}")
        if attn_impl == "packed" and (not pad_mask or reference_mean):
            raise ValueError("attn_impl='packed' needs pad_mask=True and reference_mean=False "
                             "(the reference semantics let padded rows into attention and the mean)")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.width = width
        self.output_dim = output_dim
        self.prior = check_prior(prior)
        self.temperature = temperature
        self.eval_mode = eval_mode
        self.eval_seed = eval_seed
        self.pool_type = pool_type
        self.pad_mask = pad_mask
        self.reference_mean = reference_mean
        self.cover_tail = cover_tail
        self.shared_norm = shared_norm
        self.attn_impl = attn_impl
        self.grad_checkpointing = False

        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))  # 1-D: kept out of weight decay
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        # ln_pre=False: no module (and no keys) at all, as the reference's tower
        self.ln_pre = nn.LayerNorm(width) if ln_pre else None
        self.pre_blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act_layer) for _ in range(pre_layers)])
        self.boundary_predictor = BoundaryPredictor(width, predictor_hidden_mult, logit_clamp, prob_clamp)
        # the reference shares one LayerNorm before the post blocks and at the end (P15); kept as a flag
        self.ln_short = None if shared_norm else nn.LayerNorm(width)
        self.post_blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act_layer) for _ in range(post_layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        # proj_bias=True: the reference's head is a Linear with a bias; None (no key) by default
        self.proj_bias = nn.Parameter(torch.zeros(output_dim)) if proj_bias else None
        # FLOP simulation hook: when set, replaces predicted boundaries (the predictor still runs)
        self.boundary_override: Optional[torch.Tensor] = None
        # calibration (budget.py): quantiles of the predictor's logits over held-out images, NaN until
        # calibrated, and the mean tokens-per-patch that 'calibrated' eval boundaries aim at
        self.register_buffer("calib_quantiles", torch.full((NUM_QUANTILES,), float("nan")))
        self.register_buffer("calib_target", torch.tensor(float(prior)))
        self._warned_uncalibrated = False
        # open_clip's transforms read these
        self.preprocess_cfg = {"size": image_size, "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
                               "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic",
                               "resize_mode": "shortest", "fill_color": 0}

    # ---- calibration ------------------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.calib_quantiles).all())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints from before calibration existed hold no calib_* buffers: keep them uncalibrated
        names = [prefix + "calib_quantiles", prefix + "calib_target"]
        if any(k.startswith(prefix) for k in state_dict) and not any(n in state_dict for n in names):
            state_dict[names[0]] = torch.full_like(self.calib_quantiles, float("nan"))
            state_dict[names[1]] = torch.tensor(float(self.prior))
            _logger.info("DRIP checkpoint without calibration: 'calibrated' boundaries fall back to 'threshold' "
                         "(logit > 0) until `llava-drip calibrate` is run")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def boundary_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The predictor's logits [B, N] for images (eval semantics: no sampling involved)."""
        return self.boundary_predictor(self.forward_pre(images)[:, 1:])

    @torch.no_grad()
    def calibrate(self, image_batches, target: Optional[float] = None) -> dict:
        """Fit the 'calibrated' cut on held-out images: store the quantiles of the predictor's logits and
        the target mean tokens-per-patch (default: the prior p). Returns the counts it gives on them."""
        was_training = self.training
        self.eval()
        logits = [self.boundary_logits(x) for x in image_batches]
        self.calib_quantiles.copy_(logit_quantiles(logits).to(self.calib_quantiles))
        if target is not None:
            self.calib_target.fill_(Budget("mean", float(target)).value)
        self.train(was_training)
        counts = torch.cat([budget_boundaries(z, [self.default_budget] * z.shape[0], self.calib_quantiles).sum(1)
                            for z in logits])
        return {"target": float(self.calib_target), "images": int(counts.numel()), "counts": counts.long().tolist()}

    @property
    def default_budget(self) -> Optional[Budget]:
        """The eval-mode rule as a budget ('calibrated' and 'topk'); None for 'threshold' / 'sample'."""
        if self.eval_mode == "calibrated":
            if self.is_calibrated:
                return Budget("mean", float(self.calib_target))
            if not self._warned_uncalibrated:
                _logger.warning("DRIP tower is not calibrated: using 'threshold' boundaries (logit > 0); "
                                "run `llava-drip calibrate` for counts that hit the target mean")
                self._warned_uncalibrated = True
            return None
        if self.eval_mode == "topk":
            return Budget("ratio", self.prior)
        return None

    # ---- open_clip tower interface -------------------------------------------------------------
    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        if unlocked_groups:
            raise ValueError("partial unlocking is not supported for the DRIP tower")
        for p in self.parameters():
            p.requires_grad = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"positional_embedding", "class_embedding"}

    # ---- forward pieces --------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        expected = (3, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DRIP tower expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(x.shape)}; resize with the model's preprocess transform")

    def _run_blocks(self, blocks, x, attend=None, upto: Optional[int] = None):
        """attend: a [B, L] key mask or None for [B, L, D] input; a PackedGroups layout for packed [T, D] rows."""
        packed = isinstance(attend, PackedGroups)
        for blk in blocks[:upto]:
            fn = blk.forward_packed if packed else blk
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(fn, x, attend, use_reentrant=False)
            else:
                x = fn(x, attend)
        return x

    @property
    def uses_packed(self) -> bool:
        """Whether forward runs the packed path ('auto' picks it whenever the semantics allow)."""
        masked = self.pad_mask and not self.reference_mean
        if self.attn_impl == "packed" and not masked:
            raise ValueError("attn_impl='packed' needs pad_mask=True and reference_mean=False")
        return self.attn_impl == "packed" or (self.attn_impl == "auto" and masked)

    def packed_for(self, batch: int) -> bool:
        """Whether a forward on `batch` images runs packed: 'packed' always; 'auto' when the semantics
        allow and there are 2+ images (a single image has no padding to skip, and the padded path
        runs it unmasked, which is never slower)."""
        return self.uses_packed and (self.attn_impl == "packed" or batch > 1)

    def pool_groups(self, x: torch.Tensor, b: torch.Tensor):
        """Pre-block output [B, 1+N, D] + boundaries -> post-block input and its layout.

        Padded: ([B, 1+S, D], valid [B, 1+S]); packed: ([T, D], PackedGroups). A separate method
        so benchmarks can time the pooling step on its own.
        """
        cls, h = x[:, :1], x[:, 1:]
        if self.packed_for(x.shape[0]):
            layout = pack_groups(cls[:, 0], h, b, cover_tail=self.cover_tail)
            return layout.tokens, layout
        pooled = group_mean_pool(h, b, cover_tail=self.cover_tail)
        x = torch.cat([cls, pooled.groups], dim=1)
        # CLS is always valid (new_ones, not ones_like(valid[:, :1]): with no group at all, valid is [B, 0])
        valid = torch.cat([pooled.valid.new_ones(pooled.valid.shape[0], 1), pooled.valid], dim=1)
        return x, valid

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> ln_pre(CLS + patches + position) [B, 1+N, D] (no ln_pre with ln_pre=False)."""
        self._check_input(x)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return x if self.ln_pre is None else self.ln_pre(x)

    def forward_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-pooling activations [B, 1+N, D] (identical to an open_clip ViT's first blocks)."""
        return self._run_blocks(self.pre_blocks, self.embed(x))

    def predict_boundaries(self, h: torch.Tensor, generator: Optional[torch.Generator] = None,
                           budget=None) -> torch.Tensor:
        """Hard boundaries [B, N]: sampled in training; in eval by `budget` (one spec or one per image,
        see budget.py) or else the eval_mode."""
        z = self.boundary_predictor(h)
        if self.boundary_override is not None:
            # FLOP simulation / forced pattern: keeps the predictor in the traced graph
            return self.boundary_override.to(z.dtype).expand_as(z) + 0.0 * z
        probs = self.boundary_predictor.probs(z)
        if self.training and budget is None:
            return sample_boundaries(probs, self.temperature, generator)
        budgets = as_budget_list(budget, z.shape[0])
        if budgets is None and self.eval_mode in ("calibrated", "topk"):
            default = self.default_budget
            budgets = None if default is None else [default] * z.shape[0]
        if budgets is not None:
            if any(b is None for b in budgets):
                raise ValueError("a per-image budget list needs a budget for every image")
            return budget_boundaries(z.detach(), budgets, self.calib_quantiles)
        mode = "threshold" if self.eval_mode == "calibrated" else self.eval_mode
        if mode == "sample" and generator is None:
            # each image draws from its own stream seeded with eval_seed: its boundaries do not depend on
            # its position in the batch or on its batch mates
            rows = [deterministic_boundaries(z[i:i + 1], probs[i:i + 1], mode, self.prior, self.temperature,
                                             torch.Generator(device=h.device).manual_seed(self.eval_seed))
                    for i in range(z.shape[0])]
            return torch.cat(rows)
        return deterministic_boundaries(z, probs, mode, self.prior, self.temperature, generator)

    def forward_features(self, x: torch.Tensor, select_layer: int = -1,
                         generator: Optional[torch.Generator] = None, budget=None) -> DRIPFeatures:
        """Run the tower up to `select_layer` of the post-pooling stack.

        select_layer -1: the last block's output after ln_post; -k (k >= 2) or 0..M: the raw output of
        that post-pooling state (0 = pooled tokens before any post block), like HF hidden_states.
        budget: tokens to keep per image (budget.py: '0.25', 16, 'mean:0.25', or one per image);
        None follows the eval_mode.
        """
        M = len(self.post_blocks)
        idx = select_layer if select_layer >= 0 else M + 1 + select_layer
        if not 0 <= idx <= M:
            raise ValueError(f"select_layer {select_layer} out of range for {M} post-pooling blocks")
        x = self.forward_pre(x)
        b = self.predict_boundaries(x[:, 1:], generator, budget)
        x, layout = self.pool_groups(x, b)
        norm_short = self.ln_post if self.ln_short is None else self.ln_short
        if isinstance(layout, PackedGroups):
            x = self._run_blocks(self.post_blocks, norm_short(x), layout, upto=idx)
            if select_layer == -1:
                x = self.ln_post(x)
            x, valid = layout.to_padded(x), layout.attend
        else:
            valid = layout
            # an all-valid batch needs no mask, and unmasked SDPA picks faster kernels
            attend = valid if self.pad_mask and not bool(valid.all()) else None
            x = self._run_blocks(self.post_blocks, norm_short(x), attend, upto=idx)
            if select_layer == -1:
                x = self.ln_post(x)
        return DRIPFeatures(x, valid, b, binomial_prior_loss(b, self.prior), self.num_patches)

    def pool(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, 1+S, D] tokens -> [B, D] by the configured pool_type."""
        if self.pool_type == "cls":
            return x[:, 0]
        if self.pool_type == "last":
            last = valid.long().sum(dim=1) - 1  # valid groups are a prefix after CLS
            return x[torch.arange(x.shape[0], device=x.device), last]
        # reference parity: a plain mean over every row, padded slots included
        w = torch.ones_like(valid, dtype=x.dtype) if self.reference_mean else valid.to(x.dtype)
        if self.pool_type == "mean_excl_cls":
            w = torch.cat([torch.zeros_like(w[:, :1]), w[:, 1:]], dim=1)
        return (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled [B, D] -> image embedding [B, E] (unnormalised): `@ proj`, then `+ proj_bias` if present."""
        out = pooled @ self.proj
        return out if self.proj_bias is None else out + self.proj_bias.to(out.dtype)

    def forward_with_aux(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        feats = self.forward_features(x, generator=generator)
        return self.project(self.pool(feats.hidden, feats.valid)), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x)[0]

    def encode_tokens(self, images: torch.Tensor, select_layer: int = -1, drop_cls: bool = True,
                      budget=None, with_positions: bool = False):
        """The tokens LLaVA receives: one [G_b, D] tensor per image, padding (and CLS) removed.

        budget: '0.25' / 0.25 (exactly round(0.25 N) per image), 16 (exactly 16), 'mean:0.25' (the
        calibrated cut: 0.25 N on average, image-dependent), a list with one per image, or None (eval_mode).
        Callers decide on autograd (LLaVA's tower wrapper builds a graph only when the tower trains).
        with_positions: also return each token's [G_b, 2] (row, col) centroid in [0, 1] (CLS: the centre).
        """
        feats = self.forward_features(images, select_layer=select_layer, budget=budget)
        keep = feats.valid.clone()
        if drop_cls:
            keep[:, 0] = False
        tokens = [feats.hidden[i][keep[i]] for i in range(images.shape[0])]
        if not with_positions:
            return tokens
        pos = group_centroids(feats.boundaries, feats.hidden.shape[1] - 1, self.grid_size)
        pos = torch.cat([pos.new_full((pos.shape[0], 1, 2), 0.5), pos], dim=1)
        return tokens, [pos[i][keep[i]] for i in range(images.shape[0])]
