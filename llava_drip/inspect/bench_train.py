"""`llava-drip bench train-step`: one contrastive training step (forward, open_clip's ClipLoss plus DRIP's
boundary prior, backward, AdamW) per model: time and peak memory.

Time: every model is built once in this process and timed in interleaved rounds (a shuffled order per
round, `--iters` steps each); the table gives the median step time and its spread (max/min - 1 over
the rounds' medians). Memory: each model is run again in a fresh process (spawn) for its peak alone:
`torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS on CPU. bf16 autocast on CUDA (the
weights and AdamW states stay fp32, as open_clip_train's `--precision amp_bf16`), fp32 on CPU.
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import List

from llava_drip.inspect.rounds import in_fresh_processes, interleaved

DEFAULT_MODELS = ("ViT-B-32", "DRIP-4x-32")


def _setup(name: str, batch: int, device: str, seed: int):
    import torch
    from open_clip.loss import ClipLoss

    from llava_drip.clip.loss import DRIPLoss
    from llava_drip.drip.factory import create_model
    torch.manual_seed(seed)
    model = create_model(name, device=device).train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx = model.context_length if hasattr(model, "context_length") else 77
    vocab = model.vocab_size if hasattr(model, "vocab_size") else 49408
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    texts = torch.randint(1, vocab - 1, (batch, ctx), generator=gen).to(device)
    texts[:, -1] = vocab - 1  # an end token (the highest id) for argmax / eos pooling
    loss = DRIPLoss(ClipLoss())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, images, texts, loss, opt


def _step(model, images, texts, loss, opt, device: str, dtype):
    import torch
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype,
                        enabled=dtype is not None):
        out = loss(**model(images, texts), output_dict=True)
    total = sum(out.values())
    total.backward()
    opt.step()
    return float(total.detach())


def _sync(device: str):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(model: str, batch: int, device: str, dtype, seed: int) -> dict:
    from llava_drip.utils import PeakMemory
    parts = _setup(model, batch, device, seed)
    memory = PeakMemory(device)
    memory.reset()  # after building: the steps' peak, weights resident
    for _ in range(2):  # the first creates AdamW's states
        _step(*parts, device, dtype)
    _sync(device)
    return {"peak_mem_mb": memory.peak_mb(), "memory_kind": memory.describe()}


def peak_memory(models, batch: int, device: str, dtype, seed: int) -> List[dict]:
    """{"peak_mem_mb", "memory_kind"} of two training steps of each model, each alone in a fresh process
    (at the same time on CPU, where the figure is per process; one after another on a GPU)."""
    return in_fresh_processes(_peak, [(f"memory run of {m}", dict(model=m, batch=batch, device=device, dtype=dtype,
                                                                  seed=seed)) for m in models],
                              concurrent=not device.startswith("cuda"))


def run_bench(models=DEFAULT_MODELS, batch: int = 256, iters: int = 3, rounds: int = 3, device: str = "auto",
              dtype: str = "auto", seed: int = 0, memory: bool = True) -> dict:
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    setups = {m: _setup(m, batch, device, seed) for m in models}
    for m in models:  # warm-up: kernels, allocator, optimizer states
        _step(*setups[m], device, amp)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def measure(m):
        steps = []
        for _ in range(iters):
            _sync(device)
            t0 = time.perf_counter()
            _step(*setups[m], device, amp)
            _sync(device)
            steps.append(time.perf_counter() - t0)
        return statistics.median(steps)

    times = interleaved(models, rounds, seed, measure)
    del setups
    mem = peak_memory(models, batch, device, amp, seed) if memory else [{"peak_mem_mb": None}] * len(models)
    rows = []
    for m, peak in zip(models, mem):
        rows.append({"model": m, "batch": batch, "step_ms": 1e3 * statistics.median(times[m]),
                     "step_ms_rounds": [1e3 * t for t in times[m]],
                     "spread": max(times[m]) / min(times[m]) - 1, **peak})
    base = rows[0]
    for r in rows:
        r["time_vs_first"] = r["step_ms"] / base["step_ms"]
        r["memory_vs_first"] = (r["peak_mem_mb"] / base["peak_mem_mb"]) if memory else None
    return {"rows": rows, "device": device, "dtype": dtype, "iters": iters, "rounds": rounds,
            "memory_kind": rows[0].get("memory_kind"),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def markdown_table(result: dict) -> str:
    lines = ["| model | batch | step ms (median) | spread | time vs first | peak MB | memory vs first |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        ratio = "-" if r["memory_vs_first"] is None else f"{r['memory_vs_first']:.2f}x"
        lines.append(f"| {r['model']} | {r['batch']} | {r['step_ms']:.1f} | {100 * r['spread']:.0f} % | "
                     f"{r['time_vs_first']:.2f}x | {mem} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip bench train-step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated; ratios are against the first")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3, help="timed steps per model and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    from llava_drip.drip.names import list_models
    unknown = [m for m in models if m not in list_models()]
    if unknown or not models:
        p.error(f"unknown model(s) {unknown}; available: {list_models()}")
    if min(args.batch_size, args.iters, args.rounds) < 1:
        p.error("--batch-size, --iters and --rounds must be >= 1")
    result = run_bench(models, args.batch_size, args.iters, args.rounds, args.device, args.dtype, args.seed,
                       memory=not args.no_memory)
    result["command"] = "llava-drip bench train-step " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"contrastive train step on {result['device']} ({result['dtype']}), {args.rounds} interleaved rounds "
          f"of {args.iters} steps")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
