"""`llava-drip bench prefill`: LLM prefill time, peak memory and visual tokens per vision tower.

One randomly initialised Llama (a small one on CPU, a 7B-shaped one on CUDA) is built once, with the
real LLaVA model class; each tower (with its own projector) is swapped in front of the same LLM
weights, or `--visual-tokens N` feeds N random visual tokens without a tower (576: LLaVA-1.5's
ViT-L/14-336 grid). A prefill is one forward over [BOS + visual + text] with the KV cache on, as the
first step of generate. DRIP towers use 'topk' boundaries, i.e. exactly the target rate. All
configurations are timed in interleaved rounds (a shuffled order per round); the table gives the
median and the spread (max/min - 1 over the rounds' medians). Peak memory comes from a fresh process
per configuration (CUDA max_memory_allocated, or the process's peak RSS on CPU).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

from llava_drip.inspect.rounds import in_fresh_processes, interleaved

LLM_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),  # tests
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Bench:
    """The LLM (one set of weights) and, per configuration, its tower, projector and prefill inputs."""

    def __init__(self, llm: str, batch: int, text_tokens: int, device: str, seed: int):
        import torch

        from llava_drip.model import LlavaConfig, LlavaLlamaForCausalLM
        torch.manual_seed(seed)
        self.device, self.batch, self.llm = device, batch, llm
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.cfg = LlavaConfig(**LLM_SHAPES[llm], max_position_embeddings=4096)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # built in place: a 7B model never exists in fp32 on the host
        try:
            with torch.device(device):
                self.model = LlavaLlamaForCausalLM(self.cfg).eval()
        finally:
            torch.set_default_dtype(default)
        self.text_tokens = text_tokens
        self.configs = {}

    def add(self, name: str, seed: int = 0):
        """A tower name ('DRIP-4x-16') or a visual-token count ('576')."""
        import torch

        from llava_drip.constants import IMAGE_TOKEN_INDEX
        B, model = self.batch, self.model
        ids = torch.randint(3, self.cfg.vocab_size, (B, self.text_tokens + 1),
                            generator=torch.Generator().manual_seed(seed)).to(self.device)
        ids[:, 1] = IMAGE_TOKEN_INDEX  # BOS, image, then the question
        mask = torch.ones_like(ids)
        with torch.no_grad():
            if name.isdigit():
                feats = [torch.randn(int(name), self.cfg.hidden_size, device=self.device, dtype=self.dtype)] * B
                tower, images = None, None
            else:
                from llava_drip.model.multimodal_encoder.builder import build_vision_tower, resolve_tower_type
                from llava_drip.model.multimodal_projector.builder import build_vision_projector
                kind = resolve_tower_type(name)
                cfg = type(self.cfg)(**LLM_SHAPES[self.llm], mm_vision_tower=name, mm_vision_tower_type=kind,
                                     mm_vision_select_layer=-1 if kind == "drip" else -2,
                                     mm_drip_eval_mode="topk", mm_projector_type="mlp2x_gelu")
                tower = build_vision_tower(cfg, load_weights=False).to(device=self.device, dtype=self.dtype).eval()
                cfg.mm_hidden_size = tower.hidden_size
                proj = build_vision_projector(cfg).to(device=self.device, dtype=self.dtype)
                size = tower.image_processor.crop_size["height"]
                images = torch.randn(B, 3, size, size, device=self.device, dtype=self.dtype)
                model.get_model().vision_tower, model.get_model().mm_projector = tower, proj
                feats = model.encode_images(images)
            embeds, emask, _, _ = model.prepare_inputs_labels_for_multimodal(ids, mask, None, None, padding_side="left",
                                                                             image_features=feats)
        self.configs[name] = dict(tower=tower, images=images, embeds=embeds, mask=emask,
                                  visual=statistics.mean(f.shape[0] for f in feats))

    def sync(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def time_once(self, name: str):
        """(tower s or None, prefill s) of one pass."""
        import torch
        c = self.configs[name]
        with torch.no_grad():
            self.sync()
            t0 = time.perf_counter()
            if c["tower"] is not None:
                c["tower"](c["images"])
            self.sync()
            t1 = time.perf_counter()
            self.model(inputs_embeds=c["embeds"], attention_mask=c["mask"], use_cache=True, logits_to_keep=1)
            self.sync()
            t2 = time.perf_counter()
        return (t1 - t0) if c["tower"] is not None else None, t2 - t1


def _peak(name: str, llm: str, batch: int, text_tokens: int, device: str, seed: int) -> dict:
    from llava_drip.utils import PeakMemory
    bench = _Bench(llm, batch, text_tokens, device, seed)
    bench.add(name, seed)
    memory = PeakMemory(device)
    memory.reset()  # after building: the peak of the pass itself, weights resident (not init's transients)
    bench.time_once(name)
    return {"peak_mem_mb": memory.peak_mb(), "memory_kind": memory.describe()}


def peak_memory(names, llm: str, batch: int, text_tokens: int, device: str, seed: int) -> list:
    """{"peak_mem_mb", "memory_kind"} of one tower + prefill pass of each configuration, each alone in a
    fresh process with its weights resident (the peak is reset after building where the platform allows);
    at the same time on CPU, where the figure is per process; one after another on a GPU."""
    return in_fresh_processes(_peak, [(f"memory run of {n}", dict(name=n, llm=llm, batch=batch,
                                                                  text_tokens=text_tokens, device=device, seed=seed))
                                      for n in names], concurrent=device != "cuda")


def run(towers, llm, batch, text_tokens, iters, device, seed=0, isolate=True, rounds=3):
    """Rows per configuration (a tower name, or a visual-token count as a string); the first is the
    baseline. isolate: peak memory from a fresh process per configuration (else this process's peak)."""
    bench = _Bench(llm, batch, text_tokens, device, seed)
    for name in towers:
        bench.add(name, seed)
        bench.time_once(name)  # warm-up
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def measure(name):
        runs = [bench.time_once(name) for _ in range(iters)]
        tower = statistics.median(r[0] for r in runs) if runs[0][0] is not None else None
        return tower, statistics.median(r[1] for r in runs)

    got = interleaved(towers, rounds, seed, measure)
    tower_t = {n: [t for t, _ in got[n] if t is not None] for n in towers}
    prefill_t = {n: [p for _, p in got[n]] for n in towers}
    rows = []
    for name in towers:
        c = bench.configs[name]
        rows.append({"tower": name if not name.isdigit() else f"{name} visual tokens", "llm": llm, "device": device,
                     "batch": batch, "text_tokens": text_tokens, "visual_tokens": c["visual"],
                     "seq_len": int(c["embeds"].shape[1]),
                     "tower_ms": 1e3 * statistics.median(tower_t[name]) if tower_t[name] else None,
                     "prefill_ms": 1e3 * statistics.median(prefill_t[name]),
                     "prefill_ms_rounds": [1e3 * t for t in prefill_t[name]],
                     "prefill_spread": max(prefill_t[name]) / min(prefill_t[name]) - 1,
                     "rounds": rounds, "iters": iters, "loadavg_before": load_before})
    del bench
    if isolate:
        for row, peak in zip(rows, peak_memory(towers, llm, batch, text_tokens, device, seed)):
            row.update(peak)
    else:
        for row in rows:
            row.update(peak_mem_mb=_rss_mb(), memory_kind="peak RSS of the benchmark's own process")
    base = rows[0]
    for r in rows:
        r["token_ratio"] = base["visual_tokens"] / r["visual_tokens"]
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["speedup_over_token_ratio"] = r["prefill_speedup"] / r["token_ratio"]
        # text tokens do not shrink: the sequence ratio bounds what any prefill can gain
        r["seq_ratio"] = base["seq_len"] / r["seq_len"]
        r["speedup_over_seq_ratio"] = r["prefill_speedup"] / r["seq_ratio"]
    return rows


def format_table(rows) -> str:
    head = ("| tower | visual tokens | seq len | tower ms | prefill ms (median) | spread | visual-token ratio | "
            "seq ratio | prefill speedup | speedup / token ratio | speedup / seq ratio | peak MB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        tower = "-" if r["tower_ms"] is None else f"{r['tower_ms']:.1f}"
        lines.append(f"| {r['tower']} | {r['visual_tokens']:.1f} | {r['seq_len']} | {tower} | "
                     f"{r['prefill_ms']:.1f} | {100 * r['prefill_spread']:.0f} % | {r['token_ratio']:.2f}x | "
                     f"{r['seq_ratio']:.2f}x | "
                     f"{r['prefill_speedup']:.2f}x | {r['speedup_over_token_ratio']:.2f} | "
                     f"{r['speedup_over_seq_ratio']:.2f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip bench prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", default="ViT-B-16,DRIP-2x-16,DRIP-4x-16,DRIP-10x-16",
                   help="comma-separated; the first is the baseline")
    p.add_argument("--visual-tokens", default=None,
                   help="comma-separated visual-token counts fed without a tower, instead of --towers "
                        "(e.g. 576,288,144,58: LLaVA-1.5's grid and DRIP's 2x/4x/10x of it)")
    p.add_argument("--llm", choices=sorted(LLM_SHAPES), default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=32, help="prompt tokens besides the image")
    p.add_argument("--iters", type=int, default=3, help="passes per configuration and round (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--no-isolate", action="store_true", help="peak memory of this process, not a fresh one each")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    configs = args.visual_tokens.split(",") if args.visual_tokens else args.towers.split(",")
    if args.visual_tokens and not all(c.isdigit() and int(c) > 0 for c in configs):
        p.error(f"--visual-tokens must be positive integers, got {args.visual_tokens!r}")
    if min(args.iters, args.rounds, args.batch_size) < 1:
        p.error("--iters, --rounds and --batch-size must be >= 1")
    if args.device is None:  # torch only now: --help answers without it
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = args.llm or ("7b" if args.device == "cuda" else "small")
    rows = run(configs, llm, args.batch_size, args.text_tokens, args.iters, args.device,
               isolate=not args.no_isolate, rounds=args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"prefill, {llm} Llama on {args.device}, batch {args.batch_size}, {args.text_tokens} text tokens, "
              f"{args.rounds} interleaved rounds of {args.iters}")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
