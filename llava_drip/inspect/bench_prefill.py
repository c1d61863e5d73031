"""`llava-drip bench prefill`: LLM prefill time, peak memory and visual tokens per vision tower.

Each tower is attached to the same randomly initialised Llama (a small one on CPU, a 7B-shaped one on
CUDA) through the real LLaVA model class; a prefill is one forward over [prompt + visual tokens] with the
KV cache on, as the first step of generate. DRIP towers use 'topk' boundaries, i.e. exactly the target
rate. Each configuration runs in its own process so the CPU peak RSS belongs to it alone.
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

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


def _measure(tower: str, llm: str, batch: int, text_tokens: int, iters: int, device: str, seed: int) -> dict:
    import torch
    from llava_drip.constants import IMAGE_TOKEN_INDEX
    from llava_drip.model import LlavaConfig, LlavaLlamaForCausalLM
    from llava_drip.model.multimodal_encoder.builder import resolve_tower_type

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kind = resolve_tower_type(tower)
    cfg = LlavaConfig(**LLM_SHAPES[llm], max_position_embeddings=4096, mm_vision_tower=tower,
                      mm_vision_tower_type=kind, mm_vision_select_layer=-1 if kind == "drip" else -2,
                      mm_drip_eval_mode="topk", mm_projector_type="mlp2x_gelu")
    from llava_drip.model.multimodal_encoder.builder import build_vision_tower
    cfg.mm_hidden_size = build_vision_tower(cfg, load_weights=False).hidden_size
    model = LlavaLlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    vt = model.get_vision_tower()
    size = vt.image_processor.crop_size["height"]
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    ids = torch.randint(3, cfg.vocab_size, (batch, text_tokens + 1), device=device)
    ids[:, 1] = IMAGE_TOKEN_INDEX  # BOS, image, then the question
    mask = torch.ones_like(ids)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        feats = vt(images)
        visual = [f.shape[0] for f in feats]
        embeds, emask, _, _ = model.prepare_inputs_labels_for_multimodal(ids, mask, None, images, padding_side="left")
        tower_t, prefill_t = [], []
        base_rss = _rss_mb()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(iters + 1):  # first iteration warms up
            sync(); t0 = time.perf_counter()
            vt(images)
            sync(); t1 = time.perf_counter()
            model(inputs_embeds=embeds, attention_mask=emask, use_cache=True, logits_to_keep=1)
            sync(); t2 = time.perf_counter()
            if i:
                tower_t.append(t1 - t0)
                prefill_t.append(t2 - t1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb()
    return {"tower": tower, "llm": llm, "device": device, "batch": batch, "text_tokens": text_tokens,
            "visual_tokens": statistics.mean(visual), "seq_len": int(embeds.shape[1]),
            "tower_ms": 1e3 * statistics.median(tower_t), "prefill_ms": 1e3 * statistics.median(prefill_t),
            "peak_mem_mb": peak, "mem_before_prefill_mb": None if device == "cuda" else base_rss,
            "memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS"}


def _worker(q, kwargs):
    try:
        q.put(_measure(**kwargs))
    except Exception as e:  # report, the parent prints which tower failed
        q.put({"tower": kwargs["tower"], "error": f"{type(e).__name__}: {e}"})


def run(towers, llm, batch, text_tokens, iters, device, seed=0, isolate=True):
    rows = []
    for tower in towers:
        kw = dict(tower=tower, llm=llm, batch=batch, text_tokens=text_tokens, iters=iters, device=device, seed=seed)
        if isolate:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_worker, args=(q, kw))
            p.start()
            row = q.get()
            p.join()
        else:
            row = _measure(**kw)
        if "error" in row:
            raise RuntimeError(f"benchmark of {tower} failed: {row['error']}")
        rows.append(row)
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
    head = ("| tower | visual tokens | seq len | tower ms | prefill ms | visual-token ratio | seq ratio | "
            "prefill speedup | speedup / token ratio | speedup / seq ratio | peak MB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['tower']} | {r['visual_tokens']:.1f} | {r['seq_len']} | {r['tower_ms']:.1f} | "
                     f"{r['prefill_ms']:.1f} | {r['token_ratio']:.2f}x | {r['seq_ratio']:.2f}x | "
                     f"{r['prefill_speedup']:.2f}x | {r['speedup_over_token_ratio']:.2f} | "
                     f"{r['speedup_over_seq_ratio']:.2f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip bench prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", default="ViT-B-16,DRIP-2x-16,DRIP-4x-16,DRIP-10x-16",
                   help="comma-separated; the first is the baseline")
    p.add_argument("--llm", choices=sorted(LLM_SHAPES), default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=32, help="prompt tokens besides the image")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.device is None:  # torch only now: --help answers without it
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = args.llm or ("7b" if args.device == "cuda" else "small")
    rows = run(args.towers.split(","), llm, args.batch_size, args.text_tokens, args.iters, args.device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"prefill, {llm} Llama on {args.device}, batch {args.batch_size}, {args.text_tokens} text tokens")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
