"""`llava-drip bench encoder`: images/s, latency and peak memory of the image encoder, baseline ViT
vs DRIP configs, with the FLOP ratio each row should reach and the fraction of it achieved.

Rows per DRIP model and batch size: boundaries x attention layout.
  boundaries 'topk'      eval_mode='topk': round(p N) boundaries per image (the target rate)
             'bernoulli' independent Bernoulli(p) boundaries per image, the spread a trained
                         predictor sampling at its prior produces (groups vary image to image)
             'full'      a boundary after every patch: the same DRIP code kept at full length, the
                         same-implementation control (each row then also gets `achieved_vs_full`:
                         its speedup over that control / their FLOP ratio)
  impl       'padded'    every image padded to the batch's largest group count (the reference)
             'packed'    token-wise layers on the packed [sum G, D] rows, attention per image

Timing is round-robin (every config once per round, median over rounds), so a slow drift in
machine load hits baseline and DRIP rows alike. The FLOP ratio of a row is the baseline's GFLOPs
over the mean per-image DRIP GFLOPs at the groups it actually realised (analytic count, which
matches fvcore); achieved = measured speedup / FLOP ratio.
torch is imported inside the functions that use it, so `--help` answers without it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Optional

from ..drip.names import list_models
from .flops import analytic_macs, build_tower

DEFAULT_MODELS = ("ViT-B-32", "DRIP-2x-32", "DRIP-4x-32", "DRIP-10x-32")


def baseline_for(name: str) -> str:
    """The registered plain ViT with the same patch size, width and resolution as a DRIP model."""
    from ..drip.factory import get_model_config, is_drip
    v = get_model_config(name)["vision_cfg"]
    for cand in list_models():
        if is_drip(cand):
            continue
        c = get_model_config(cand)["vision_cfg"]
        if all(c.get(k) == v.get(k) for k in ("patch_size", "width", "image_size")):
            return cand
    raise ValueError(f"no registered ViT matches {name}'s patch size, width and image size")


# ---- measurement helpers ---------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


class PoolTimer:
    """Wraps a DRIP tower's pool_groups to time it and keep the last layout it produced."""

    def __init__(self, tower: DRIPVisionTransformer, device: torch.device):
        self.tower, self.device = tower, device
        self.inner = tower.pool_groups
        self.seconds, self.active, self.last = 0.0, False, None
        tower.pool_groups = self  # instance attribute shadows the method

    def __call__(self, x, b):
        if self.active:
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.inner(x, b)
            _sync(self.device)
            self.seconds += time.perf_counter() - t0
        else:
            out = self.inner(x, b)
        self.last = out
        return out

    def layout_stats(self) -> dict:
        from ..drip.pooling import PackedGroups
        x, layout = self.last
        if isinstance(layout, PackedGroups):
            groups = (layout.lengths - 1).float()
            padded_len = layout.max_len
            computed = float(layout.lengths.float().mean())  # token-wise layers see no padding
        else:
            groups = layout[:, 1:].sum(1).float()
            padded_len = layout.shape[1]
            computed = float(padded_len)
        return {"groups": groups.cpu().tolist(), "padded_len": int(padded_len), "computed_len": computed}

    def remove(self):
        del self.tower.pool_groups


# ---- configurations -------------------------------------------------------------------------------------
class Config:
    def __init__(self, model: str, tower: torch.nn.Module, boundaries: Optional[str] = None,
                 impl: Optional[str] = None, baseline: Optional[str] = None):
        self.model, self.tower, self.boundaries, self.impl, self.baseline = model, tower, boundaries, impl, baseline
        self.times: List[float] = []
        self.pool_seconds = 0.0
        self.row: dict = {}

    @property
    def key(self) -> str:
        return self.model if self.boundaries is None else f"{self.model}/{self.boundaries}/{self.impl}"

    def prepare(self, override: Optional[torch.Tensor]):
        from ..drip.tower import DRIPVisionTransformer
        if isinstance(self.tower, DRIPVisionTransformer):
            self.tower.attn_impl = self.impl
            if self.boundaries == "full":
                self.tower.boundary_override = self.tower.proj.new_ones(self.tower.num_patches)
            else:
                self.tower.boundary_override = override if self.boundaries == "bernoulli" else None


def run_bench(models=DEFAULT_MODELS, batch_sizes=(1, 16, 64), impls=("padded", "packed"),
              boundaries=("topk", "bernoulli"), warmup: int = 1, iters: int = 3, device: str = "auto",
              dtype: str = "auto", seed: int = 0, progress=None, target_spread: Optional[float] = None,
              max_iters: Optional[int] = None) -> dict:
    """Every configuration is timed once per round, in a shuffled order per round. With target_spread,
    rounds go on past `iters` (up to max_iters) until each DRIP row's per-round speedup over its
    baseline (paired within the round) varies by at most target_spread (max/min - 1)."""
    import torch
    from ..drip.factory import is_drip
    from ..drip.tower import DRIPVisionTransformer
    from ..utils import PeakMemory, cpu_name
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    models = list(models)
    for m in list(models):
        if is_drip(m):
            base = baseline_for(m)
            if base not in models:
                models.insert(0, base)
    towers = {}
    torch.manual_seed(seed)
    for m in models:
        kw = {"eval_mode": "topk"} if is_drip(m) else {}
        towers[m] = build_tower(m, random_init=True, **kw).to(dev, torch_dtype).eval()
    image_size = {m: getattr(t, "image_size") for m, t in towers.items()}
    image_size = {m: (s[0] if isinstance(s, (tuple, list)) else int(s)) for m, s in image_size.items()}
    timers = {m: PoolTimer(t, dev) for m, t in towers.items() if isinstance(t, DRIPVisionTransformer)}
    memory = PeakMemory(dev)
    analytic_cache: Dict[tuple, float] = {}

    def gflops(name, groups=None):
        key = (name, groups)
        if key not in analytic_cache:
            analytic_cache[key] = analytic_macs(name, groups=groups, image_size=image_size[name])["total"] / 1e9
        return analytic_cache[key]

    rows = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for bs in batch_sizes:
        configs = []
        for m in models:
            if is_drip(m):
                for bnd in boundaries:
                    for impl in impls:
                        configs.append(Config(m, towers[m], bnd, impl, baseline_for(m)))
            else:
                configs.append(Config(m, towers[m]))
        g = torch.Generator().manual_seed(seed + bs)
        inputs, overrides = {}, {}
        for m in models:
            s = image_size[m]
            inputs[m] = torch.randn(bs, 3, s, s, generator=g).to(dev, torch_dtype)
            t = towers[m]
            if isinstance(t, DRIPVisionTransformer):
                overrides[m] = (torch.rand(bs, t.num_patches, generator=g) < t.prior).float().to(dev)

        by_key = {c.key: c for c in configs}

        def spreads():
            out = {}
            for c in configs:
                if c.boundaries is not None:
                    ratios = [b / t for b, t in zip(by_key[c.baseline].times, c.times)]
                    out[c.key] = max(ratios) / min(ratios) - 1
            return out

        limit = max(iters, max_iters or iters) if target_spread is not None else iters
        order = random.Random(seed + bs)
        with torch.inference_mode():
            rnd = 0
            while rnd < warmup + iters or (rnd < warmup + limit and target_spread is not None and
                                           max(spreads().values(), default=0.0) > target_spread):
                shuffled = list(configs)
                order.shuffle(shuffled)
                for c in shuffled:
                    c.prepare(overrides.get(c.model))
                    timer = timers.get(c.model)
                    if timer:
                        timer.seconds, timer.active = 0.0, rnd >= warmup
                    _sync(dev)
                    t0 = time.perf_counter()
                    c.tower(inputs[c.model])
                    _sync(dev)
                    if rnd >= warmup:
                        c.times.append(time.perf_counter() - t0)
                        if timer:
                            c.pool_seconds += timer.seconds
                    if timer and rnd >= warmup:
                        c.row.update(timer.layout_stats())
                rnd += 1
                if progress:
                    progress(f"batch {bs}: round {rnd}/{warmup + iters}+")
            for c in configs:
                c.prepare(overrides.get(c.model))
                c.row["peak_mem_mib"] = memory.measure(lambda: c.tower(inputs[c.model]))

        base_rate = {}
        for c in configs:
            lat = statistics.median(c.times)
            row = {"model": c.model, "boundaries": c.boundaries or "-", "impl": c.impl or "-", "batch": bs,
                   "device": dev.type, "dtype": dtype, "img_s": bs / lat, "latency_ms": 1000 * lat,
                   "latency_ms_all": [1000 * t for t in c.times], "peak_mem_mib": c.row.get("peak_mem_mib")}
            if c.boundaries is None:
                n = math.prod(c.tower.grid_size)
                row.update(baseline=c.model, groups_per_image=None, groups_min=None, groups_max=None,
                           padded_len=1 + n, computed_len=float(1 + n), gflops_per_image=gflops(c.model),
                           flop_ratio=1.0, speedup=1.0, achieved=1.0, pool_share=0.0)
                base_rate[c.model] = row["img_s"]
            else:
                groups = c.row["groups"]
                per_image = statistics.fmean(gflops(c.model, int(gi)) for gi in groups)
                row.update(baseline=c.baseline, groups_per_image=statistics.fmean(groups), groups_min=int(min(groups)),
                           groups_max=int(max(groups)), padded_len=c.row["padded_len"], computed_len=c.row["computed_len"],
                           gflops_per_image=per_image, flop_ratio=gflops(c.baseline) / per_image,
                           pool_share=c.pool_seconds / sum(c.times))
                paired = [b / t for b, t in zip(by_key[c.baseline].times, c.times)]  # speedup within each round
                row.update(rounds=len(paired), speedup_rounds=paired, speedup_median=statistics.median(paired),
                           achieved_spread=max(paired) / min(paired) - 1)
            rows.append(row)
        for row in rows:
            if row["batch"] == bs and row["boundaries"] != "-":
                row["speedup"] = row["img_s"] / base_rate[row["baseline"]]
                row["achieved"] = row["speedup"] / row["flop_ratio"]
                row["achieved_paired"] = row["speedup_median"] / row["flop_ratio"]
        for row in rows:  # against the same code at full length, where it was run
            full = next((r for r in rows if r["batch"] == bs and r["model"] == row["model"] and
                         r["impl"] == row["impl"] and r["boundaries"] == "full"), None)
            if row["batch"] == bs and row["boundaries"] not in ("-", "full") and full is not None:
                row["achieved_vs_full"] = (row["img_s"] / full["img_s"]) / (full["gflops_per_image"] /
                                                                           row["gflops_per_image"])
    for t in timers.values():
        t.remove()
    env = {"device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
           "dtype": dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "warmup": warmup, "iters": iters, "seed": seed,
           "target_spread": target_spread, "max_iters": max_iters,
           # which attention core the packed rows ran: a Flash varlen kernel or SDPA on the padded grid
           "packed_attention": _packed_attention(dev, torch_dtype, towers),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return {"env": env, "rows": rows}


def _packed_attention(dev, torch_dtype, towers) -> str:
    import torch
    from ..drip.tower import DRIPVisionTransformer
    from ..drip.varlen import get_varlen_backend, varlen_kernel
    drip_towers = [t for t in towers.values() if isinstance(t, DRIPVisionTransformer) and len(t.post_blocks)]
    if not drip_towers:
        return "-"
    blk = drip_towers[0].post_blocks[0]
    probe = torch.empty(1, blk.ln_1.normalized_shape[0], device=dev, dtype=torch_dtype)
    kernel = varlen_kernel(probe, probe.shape[1] // blk.heads)
    return f"varlen ({get_varlen_backend()})" if kernel is not None else "sdpa on the padded grid"


# ---- output ----------------------------------------------------------------------------------------------
def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def _spread(r: dict) -> str:
    return "-" if r.get("achieved_spread") is None else f"{100 * r['achieved_spread']:.0f} % ({r['rounds']})"


def markdown_table(result: dict) -> str:
    head = ("| model | boundaries | impl | batch | img/s | latency ms | peak MiB | groups/img (min-max) | "
            "padded len | rows/img computed | GFLOPs/img | FLOP ratio | speedup | achieved | spread (rounds) | "
            "achieved vs full | pooling % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        groups = "-" if r["groups_per_image"] is None else f"{r['groups_per_image']:.1f} ({r['groups_min']}-{r['groups_max']})"
        lines.append(
            f"| {r['model']} | {r['boundaries']} | {r['impl']} | {r['batch']} | {r['img_s']:.1f} | {r['latency_ms']:.0f} | "
            f"{_fmt(r['peak_mem_mib'], '.0f')} | {groups} | {r['padded_len']} | {r['computed_len']:.1f} | "
            f"{r['gflops_per_image']:.2f} | {r['flop_ratio']:.2f}x | {r['speedup']:.2f}x | {r['achieved']:.2f} | "
            f"{_spread(r)} | {_fmt(r.get('achieved_vs_full'), '.2f')} | {100 * r['pool_share']:.1f} |")
    return "\n".join(lines)


def text_table(result: dict) -> str:
    out = [f"{'model':<14} {'bnd':<9} {'impl':<6} {'bs':>3} {'img/s':>7} {'lat ms':>8} {'MiB':>6} {'groups':>6} "
           f"{'pad':>4} {'rows':>5} {'ratio':>6} {'speedup':>7} {'achvd':>5} {'pool%':>5}"]
    for r in result["rows"]:
        groups = "-" if r["groups_per_image"] is None else f"{r['groups_per_image']:.1f}"
        out.append(f"{r['model']:<14} {r['boundaries']:<9} {r['impl']:<6} {r['batch']:>3} {r['img_s']:>7.1f} "
                   f"{r['latency_ms']:>8.1f} {_fmt(r['peak_mem_mib'], '6.0f'):>6} {groups:>6} {r['padded_len']:>4} "
                   f"{r['computed_len']:>5.1f} {r['flop_ratio']:>6.2f} {r['speedup']:>7.2f} {r['achieved']:>5.2f} "
                   f"{100 * r['pool_share']:>5.1f}")
    e = result["env"]
    out.append(f"# {e['device_name']} ({e['device']}, {e['dtype']}, {e['threads']} threads), torch {e['torch']}, "
               f"{e['iters']} timed rounds after {e['warmup']} warm-up; load average before {e['loadavg_before']}, "
               f"after {e['loadavg_after']}")
    return "\n".join(out)


def _csv(text: str, cast=str):
    return [cast(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-drip bench encoder",
        description="Encoder throughput, latency and peak memory: baseline ViT vs DRIP (padded vs packed), "
                    "with each row's FLOP ratio and the fraction of it achieved.")
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS),
                        help="registered models; each DRIP model's matching ViT baseline is added")
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    parser.add_argument("--impl", default="padded,packed", help="DRIP layouts to compare: padded,packed")
    parser.add_argument("--boundaries", default="topk,bernoulli",
                        help="topk (target rate, round(pN) per image), bernoulli (Bernoulli(p) per image), full "
                             "(every patch its own group: the same-implementation control)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--target-spread", type=float, default=None,
                        help="keep adding rounds until every DRIP row's per-round speedup varies by at most this "
                             "(0.05: 5 %%), up to --max-iters; the spread is reported either way")
    parser.add_argument("--max-iters", type=int, default=20, help="round limit with --target-spread")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (for docs/benchmarks.md)")
    args = parser.parse_args(argv)

    unknown = [m for m in args.model if m not in list_models()]
    if unknown:
        print(f"llava-drip bench encoder: unknown model(s) {unknown}. Available: {list_models()}", file=sys.stderr)
        return 2
    impls, bnds = _csv(args.impl), _csv(args.boundaries)
    bad = [i for i in impls if i not in ("padded", "packed")] + [b for b in bnds if b not in ("topk", "bernoulli", "full")]
    if bad:
        print(f"llava-drip bench encoder: unknown --impl/--boundaries value(s) {bad}", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = run_bench(args.model, _csv(args.batch_sizes, int), impls, bnds, args.warmup, args.iters,
                       args.device, args.dtype, args.seed, progress=lambda s: print(s, file=sys.stderr, flush=True),
                       target_spread=args.target_spread, max_iters=args.max_iters)
    result["command"] = "llava-drip bench encoder " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.markdown:
        print(markdown_table(result))
    else:
        print(text_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
