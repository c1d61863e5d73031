"""GFLOPs per image for every registered model: fvcore (one multiply-add = one flop), attention counted.

Plain fvcore undercounts ViTs: PyTorch runs eval/no_grad attention through fused kernels
(`aten::_native_multi_head_attention`, `aten::scaled_dot_product_attention`) that fvcore has no
handler for, so they count as zero (ViT-B/32 2.95 G instead of 4.41 G). Handlers for those ops
make the count independent of the kernel PyTorch picks. DRIP is traced with its boundary
predictor running and the boundaries replaced by evenly spaced ones giving the target group count
(the DynamicViT-style simulation), or any measured ratio (`--at-ratio`).

`analytic_macs` counts the same thing from the config alone; the two agree for every registered
model (tests/test_flops.py). `--seed-compat` re-applies the reference repository's counting
rules to our towers and itemises how each rule moves the number.

torch and the towers are imported inside the functions that use them, so `--help` answers without them.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import warnings
from typing import Dict, List, Optional, Sequence

from ..drip.names import list_models

LN_FLOPS_PER_ELEMENT = 5  # fvcore's estimate for an affine layer norm


# ---- fvcore handlers for attention kernels ---------------------------------------------------------
def _shape(val) -> List[int]:
    from fvcore.nn.jit_handles import get_shape
    return list(get_shape(val))


def _sdpa_flops(inputs, outputs) -> int:
    """q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev]: q @ k^T and attn @ v."""
    q, k, v = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _native_mha_flops(inputs, outputs) -> int:
    """PyTorch's fused nn.MultiheadAttention: in-projections, both attention matmuls, out-projection."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    d = q[-1]
    batch = math.prod(q[:-2])
    lq, lk = q[-2], k[-2]
    return batch * (lq * d * d + 2 * lk * d * d + 2 * lq * lk * d + lq * d * d)


ATTENTION_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
    "aten::_scaled_dot_product_flash_attention": _sdpa_flops,
    "aten::_scaled_dot_product_efficient_attention": _sdpa_flops,
    "aten::_scaled_dot_product_cudnn_attention": _sdpa_flops,
    "aten::_native_multi_head_attention": _native_mha_flops,
}


# ---- building towers ---------------------------------------------------------------------------------
def build_tower(name: str, image_size: Optional[int] = None, random_init: bool = False, **drip_overrides) -> nn.Module:
    """The image tower of a registered model (no text tower: it is not counted and costs init time).

    FLOPs do not depend on weight values (boundaries are always overridden when counting), so by
    default the tower is built on the meta device and zero-filled: seconds faster per model.
    """
    import torch
    from ..drip.factory import get_model_config, is_drip
    from ..drip.model import build_drip_tower
    if not random_init:
        with torch.device("meta"):
            tower = build_tower(name, image_size, random_init=True, **drip_overrides)
        tower = tower.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(tower.parameters()) + list(tower.buffers()):
                t.zero_()
        return tower
    cfg = get_model_config(name)
    vision_cfg = dict(cfg["vision_cfg"])
    if image_size is not None:
        vision_cfg["image_size"] = image_size
    if is_drip(name):
        return build_drip_tower(cfg["embed_dim"], vision_cfg, {**cfg["drip_cfg"], **drip_overrides})
    if drip_overrides:
        raise ValueError(f"{name} is not a DRIP model; DRIP options {sorted(drip_overrides)} do not apply")
    from open_clip.model import _build_vision_tower
    return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))


def _image_size(tower: nn.Module) -> int:
    size = tower.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def target_groups(prior: float, num_patches: int) -> int:
    """Groups per image at the target ratio: round(p N), the count `eval_mode='topk'` aims for."""
    return max(1, min(num_patches, int(round(prior * num_patches))))


def groups_for_ratio(ratio: float, num_patches: int) -> int:
    """A measured ratio -> whole groups. ratio <= 1 is kept tokens per patch (G/N); ratio > 1 a compression rate."""
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    keep = ratio if ratio <= 1 else 1.0 / ratio
    return max(1, min(num_patches, int(round(keep * num_patches))))


# ---- fvcore counting ---------------------------------------------------------------------------------
def fvcore_analysis(tower: nn.Module, image_size: int, with_attention: bool = True):
    """FlopCountAnalysis of one image through `tower`, in eval mode under no_grad (the seed's setting)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore touches the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis
    tower.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about .item() / data-dependent shapes
        fa = FlopCountAnalysis(tower, x)
        if with_attention:
            fa.set_op_handle(**ATTENTION_HANDLES)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings("none")
        fa.total()  # run the trace inside the no_grad / warnings context
    return fa


def _drip_groups(tower: DRIPVisionTransformer, boundaries: torch.Tensor) -> int:
    """Groups the tower keeps for this boundary pattern under its tail semantics (no forward needed)."""
    import torch
    from ..drip.pooling import group_mean_pool
    pooled = group_mean_pool(torch.zeros(1, tower.num_patches, 1), boundaries, cover_tail=tower.cover_tail)
    return int(pooled.valid.sum())


def count_drip(tower: DRIPVisionTransformer, groups: int):
    """fvcore analysis of a DRIP tower with `groups` evenly spaced segments (predictor still runs)."""
    from ..drip import boundary as _boundary
    pattern = _boundary.even_boundaries(1, tower.num_patches, groups)
    tower.boundary_override = pattern
    try:
        return fvcore_analysis(tower, tower.image_size)
    finally:
        tower.boundary_override = None


# ---- analytic count ------------------------------------------------------------------------------------
def _block_macs(tokens: int, width: int, mlp_hidden: int) -> Dict[str, int]:
    return {
        "norms": 2 * LN_FLOPS_PER_ELEMENT * tokens * width,
        "attn_proj": tokens * width * 3 * width + tokens * width * width,
        "attn_core": 2 * tokens * tokens * width,  # q @ k^T and attn @ v, summed over heads
        "mlp": 2 * tokens * width * mlp_hidden,
    }


def _add(total: Dict[str, int], part: Dict[str, int], times: int = 1):
    for k, v in part.items():
        total[k] = total.get(k, 0) + times * v


def _drip_defaults() -> dict:
    from ..drip.tower import DRIPVisionTransformer
    return {k: p.default for k, p in inspect.signature(DRIPVisionTransformer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def analytic_macs(name: str, groups: Optional[int] = None, image_size: Optional[int] = None,
                  **drip_overrides) -> Dict[str, int]:
    """Multiply-adds per image from the config alone, by component (fvcore's conventions:
    linear/matmul/conv/einsum = MACs, layer norm = 5 per element, activations and adds free).

    DRIP: `groups` segments after pooling (default: the target round(p N)); ViT: open_clip's tower.
    """
    from ..drip.factory import get_model_config, is_drip
    cfg = get_model_config(name)
    v = dict(cfg["vision_cfg"])
    if image_size is not None:
        v["image_size"] = image_size
    out: Dict[str, int] = {}
    if is_drip(name):
        d = {**_drip_defaults(), **cfg["drip_cfg"], **drip_overrides}
        width, patch, size = v.get("width", 768), v.get("patch_size", 32), v.get("image_size", 224)
        hidden = int(width * v.get("mlp_ratio", 4.0))
        n = (size // patch) ** 2
        g = target_groups(d["prior"], n) if groups is None else int(groups)
        out["patch_embed"] = n * width * 3 * patch * patch
        out["norms"] = LN_FLOPS_PER_ELEMENT * (1 + n) * width if d["ln_pre"] else 0  # ln_pre (absent: ln_pre=False)
        _add(out, _block_macs(1 + n, width, hidden), d["pre_layers"])
        ph = d["predictor_hidden_mult"] * width
        out["predictor"] = n * width * ph + n * ph
        out["pooling"] = n * g * width  # einsum 'bnd,bns->bsd'
        out["norms"] += 2 * LN_FLOPS_PER_ELEMENT * (1 + g) * width  # ln_short (or the shared one) + ln_post
        _add(out, _block_macs(1 + g, width, hidden), d["post_layers"])
        out["head"] = width * cfg["embed_dim"]  # proj; a proj_bias add is free, as every add here
    else:
        from open_clip.model import CLIPVisionCfg
        vc = CLIPVisionCfg(**v)
        unsupported = [k for k in ("attentional_pool", "timm_model_name", "block_type", "qk_norm", "scale_attn",
                                   "scale_fc", "scale_heads", "scale_attn_inner", "scaled_cosine_attn")
                       if getattr(vc, k)]
        if unsupported:
            raise NotImplementedError(f"analytic count does not model {unsupported} ({name})")
        width, patch, size = vc.width, vc.patch_size, vc.image_size
        hidden = int(width * vc.mlp_ratio)
        n = (size // patch) ** 2
        out["patch_embed"] = n * width * 3 * patch * patch
        out["norms"] = 0 if vc.no_ln_pre else LN_FLOPS_PER_ELEMENT * (1 + n) * width
        _add(out, _block_macs(1 + n, width, hidden), vc.layers)
        post_rows = 1 if vc.final_ln_after_pool else 1 + n
        out["norms"] += LN_FLOPS_PER_ELEMENT * post_rows * width
        out["head"] = width * cfg["embed_dim"]
    out["total"] = sum(out.values())
    return out


# ---- one model -------------------------------------------------------------------------------------------
def _module_total(fa, prefix_test) -> int:
    return sum(v for k, v in fa.by_module().items() if prefix_test(k))


def seed_compat(name: str, tower: nn.Module, correct: int, analysis=None) -> dict:
    """The reference repository's number for this config, and what moves it away from `correct`.

    Its rules, applied to our tower: fvcore without attention handlers, so a ViT's fused attention
    (QKV + attention + out projection) is skipped; for DRIP, the interval simulation
    `b[:, ::int(1/p)] = 1` with DTP tail semantics (S = #boundaries, tail tokens dropped), the
    boundary predictor bypassed, no ln_pre, and norm1 applied three times per block (query, key
    and value were each normalised separately).
    """
    import torch
    from ..drip.tower import DRIPVisionTransformer
    diffs = []
    if isinstance(tower, DRIPVisionTransformer):
        n = tower.num_patches
        interval = max(1, int(1 / tower.prior))
        pattern = torch.zeros(1, n)
        pattern[:, ::interval] = 1.0
        old_tail = tower.cover_tail
        tower.cover_tail = False
        try:
            seed_groups = _drip_groups(tower, pattern)
            tower.boundary_override = pattern
            fa = fvcore_analysis(tower, tower.image_size)
        finally:
            tower.boundary_override = None
            tower.cover_tail = old_tail
        dropped = n - 1 - int(pattern[0].nonzero().max())
        raw = fa.total()
        diffs.append({"what": f"interval boundary simulation b[:, ::{interval}] = 1 with DTP tail drop "
                              f"({seed_groups} groups, {dropped} tail token(s) dropped) instead of evenly spaced "
                              f"target groups", "gflops": (raw - correct) / 1e9})
        pred = _module_total(fa, lambda k: k == "boundary_predictor")
        diffs.append({"what": "boundary predictor MLP bypassed (not counted)", "gflops": -pred / 1e9})
        ln_pre = _module_total(fa, lambda k: k == "ln_pre")  # 0 for a tower built with ln_pre=False
        if tower.ln_pre is not None:
            diffs.append({"what": "no ln_pre in the seed's tower", "gflops": -ln_pre / 1e9})
        ln1 = _module_total(fa, lambda k: k.endswith(".ln_1"))
        diffs.append({"what": "norm1 applied 3x per block (separately to query, key, value)",
                      "gflops": 2 * ln1 / 1e9})
        value = raw - pred - ln_pre + 2 * ln1
        extra = {"seed_groups": seed_groups}
    else:
        fa = analysis if analysis is not None else fvcore_analysis(tower, _image_size(tower))
        attn = _module_total(fa, lambda k: k.startswith("transformer.resblocks.") and k.endswith(".attn"))
        diffs.append({"what": "fused attention (aten::_native_multi_head_attention) has no fvcore handler: "
                              "QKV/out projections and attention matmuls skipped", "gflops": -attn / 1e9})
        value = fa.total() - attn
        extra = {}
    return {"seed_compat_gflops": value / 1e9, "seed_compat_diff": diffs, **extra}


def count_model(name: str, image_size: Optional[int] = None, groups: Optional[int] = None,
                ratio: Optional[float] = None, seed: bool = False, tower: Optional[nn.Module] = None,
                **drip_overrides) -> dict:
    """One row: fvcore GFLOPs (attention and predictor counted) plus the analytic count.

    DRIP runs at `groups`, else at `ratio` (G/N or a compression rate), else at its target.
    """
    from ..drip import boundary as _boundary
    from ..drip.tower import DRIPVisionTransformer
    tower = tower if tower is not None else build_tower(name, image_size, **drip_overrides)
    size = _image_size(tower)
    row = {"model": name, "image_size": size}
    if isinstance(tower, DRIPVisionTransformer):
        n = tower.num_patches
        if groups is None:
            groups = groups_for_ratio(ratio, n) if ratio is not None else target_groups(tower.prior, n)
        realised = _drip_groups(tower, _boundary.even_boundaries(1, n, groups))
        fa = count_drip(tower, groups)
        analytic = analytic_macs(name, groups=realised, image_size=size, **drip_overrides)
        pred = _module_total(fa, lambda k: k == "boundary_predictor")
        row.update(kind="drip", prior=tower.prior, num_patches=n, groups=realised, visual_tokens=realised,
                   ratio=realised / n, depth=f"{len(tower.pre_blocks)}+{len(tower.post_blocks)}",
                   predictor_gflops=pred / 1e9)
    else:
        if groups is not None or ratio is not None:
            raise ValueError(f"{name} is a plain ViT: --at-ratio applies to DRIP models only")
        fa = fvcore_analysis(tower, size)
        analytic = analytic_macs(name, image_size=size)
        n = math.prod(tower.grid_size)
        row.update(kind="vit", prior=None, num_patches=n, groups=None, visual_tokens=n, ratio=1.0,
                   depth=str(len(tower.transformer.resblocks)), predictor_gflops=0.0)
    total = fa.total()
    row["gflops"] = total / 1e9
    row["analytic_gflops"] = analytic["total"] / 1e9
    row["analytic_breakdown_gflops"] = {k: v / 1e9 for k, v in analytic.items() if k != "total"}
    row["by_operator_gflops"] = {k: v / 1e9 for k, v in sorted(fa.by_operator().items())}
    row["uncounted_ops"] = sorted(k for k in fa.unsupported_ops() if "attention" in k)
    if seed:
        row.update(seed_compat(name, tower, total, analysis=None if row["kind"] == "drip" else fa))
    return row


# ---- plot -----------------------------------------------------------------------------------------------
def plot_flops(path: str, rows: Optional[Sequence[dict]] = None, image_size: Optional[int] = None):
    """GFLOPs against compression rate (N/G), one curve per (patch, depth), fvcore points at each
    registered config's target, ViT baselines as horizontal lines (fair count, and the seed's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..drip.factory import get_model_config, is_drip

    names = [n for n in list_models() if not n.endswith("tiny")]
    if rows is None:
        rows = [count_model(n, image_size=image_size, seed=not is_drip(n)) for n in names]
    drip_rows = [r for r in rows if r["kind"] == "drip"]
    vit_rows = {r["model"]: r for r in rows if r["kind"] == "vit"}
    patches = sorted({get_model_config(r["model"])["vision_cfg"]["patch_size"] for r in drip_rows}, reverse=True)
    fig, axes = plt.subplots(1, len(patches), figsize=(6.2 * len(patches), 4.6), squeeze=False)
    for ax, patch in zip(axes[0], patches):
        mine = [r for r in drip_rows if get_model_config(r["model"])["vision_cfg"]["patch_size"] == patch]
        depths = sorted({r["depth"] for r in mine}, key=lambda s: tuple(int(x) for x in s.split("+")))
        cmap = plt.get_cmap("viridis", max(2, len(depths)))
        for i, depth in enumerate(depths):
            rep = next(r for r in mine if r["depth"] == depth)
            n = rep["num_patches"]
            gs = [g for g in range(1, n + 1) if 1.5 <= n / g <= 14]
            xs = [n / g for g in gs]
            ys = [analytic_macs(rep["model"], groups=g, image_size=rep["image_size"])["total"] / 1e9 for g in gs]
            ax.plot(xs, ys, color=cmap(i), lw=1.4, label=f"DRIP {depth} (analytic)")
            pts = [r for r in mine if r["depth"] == depth]
            ax.scatter([r["num_patches"] / r["groups"] for r in pts], [r["gflops"] for r in pts], color=cmap(i),
                       edgecolor="black", zorder=3, s=36, label="fvcore count at the target rate" if i == 0 else None)
            for r in pts:
                ax.annotate(f"{r['model'].split('-')[1]} {r['gflops']:.2f}", (r["num_patches"] / r["groups"], r["gflops"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = f"ViT-B-{patch}"
        if base in vit_rows:
            r = vit_rows[base]
            ax.axhline(r["gflops"], color="crimson", lw=1.6, label=f"{base} {r['gflops']:.2f} (attention counted)")
            if "seed_compat_gflops" in r:
                ax.axhline(r["seed_compat_gflops"], color="crimson", lw=1.0, ls=":",
                           label=f"{base} {r['seed_compat_gflops']:.2f} as the seed reported (fused attention skipped)")
        ax.set_xscale("log")
        ticks = [2, 3, 4, 6, 10]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t}x" for t in ticks])
        ax.set_xlabel("compression rate N / G (patch tokens per visual token)")
        ax.set_ylabel("GFLOPs per image (fvcore MACs)")
        ax.set_title(f"patch {patch}, {rows[0]['image_size']}px: DRIP vs ViT-B/{patch}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---- CLI --------------------------------------------------------------------------------------------------
def _parse_ratio(text: str) -> float:
    t = text.strip().lower()
    return float(t[:-1]) if t.endswith("x") else float(t)


def _print_table(rows: List[dict], seed: bool, out=None):
    out = out or sys.stdout
    head = f"{'model':<20} {'depth':>6} {'groups':>9} {'GFLOPs':>8} {'analytic':>9} {'predictor':>9}"
    if seed:
        head += f" {'seed-compat':>11}"
    print(head, file=out)
    for r in rows:
        groups = "-" if r["groups"] is None else f"{r['groups']}/{r['num_patches']}"
        line = (f"{r['model']:<20} {r['depth']:>6} {groups:>9} {r['gflops']:>8.2f} {r['analytic_gflops']:>9.2f} "
                f"{r['predictor_gflops']:>9.3f}")
        if seed:
            line += f" {r['seed_compat_gflops']:>11.2f}"
        print(line, file=out)
    if seed:
        print("\nseed-compat vs correct count (GFLOPs):", file=out)
        for r in rows:
            print(f"  {r['model']}: {r['gflops']:.3f} correct -> {r['seed_compat_gflops']:.3f} seed-compat", file=out)
            for d in r["seed_compat_diff"]:
                print(f"    {d['gflops']:+.4f}  {d['what']}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-drip flops",
        description="GFLOPs per image (fvcore multiply-adds; attention and the boundary predictor counted). "
                    "DRIP runs with evenly spaced boundaries at its target group count round(p*N).")
    parser.add_argument("--model", nargs="+", default=None,
                        help="registered model names (default: every non-tiny model); see `llava-drip models`")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the config's)")
    parser.add_argument("--at-ratio", nargs="+", type=_parse_ratio, default=None, metavar="R",
                        help="count DRIP at measured ratios instead of the target: kept tokens per patch G/N "
                             "(e.g. 0.27) or a compression rate (e.g. 3.7x); one row per value")
    parser.add_argument("--seed-compat", action="store_true",
                        help="also give the reference repository's number (its counting rules) and what differs")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="write the FLOP analysis figure (GFLOPs vs compression rate) to this path")
    args = parser.parse_args(argv)
    from ..drip.factory import is_drip

    # default: every non-tiny model, baselines first
    names = args.model or sorted((n for n in list_models() if not n.endswith("tiny")), key=is_drip)
    known = set(list_models())
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"llava-drip flops: unknown model(s) {unknown}. Available: {list_models()}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        tower = build_tower(name, args.image_size)
        ratios = args.at_ratio if (args.at_ratio and is_drip(name)) else [None]
        for ratio in ratios:
            rows.append(count_model(name, image_size=args.image_size, ratio=ratio, seed=args.seed_compat, tower=tower))
    if args.plot:
        plot_rows = rows
        if args.at_ratio or not any(r["kind"] == "drip" for r in rows):
            plot_rows = None  # the figure shows targets; recount them
        elif not args.seed_compat:
            plot_rows = [dict(r, **seed_compat(r["model"], build_tower(r["model"], args.image_size), 0))
                         if r["kind"] == "vit" else r for r in rows]
        plot_flops(args.plot, plot_rows, args.image_size)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, args.seed_compat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
