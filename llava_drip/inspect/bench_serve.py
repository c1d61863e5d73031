"""`llava-drip bench serve`: the chat engine's throughput and latency under concurrent requests.

The workload is held-out synthetic scenes (`builtin_model.heldout_questions`) with stage 2's open
questions, answered greedily: short ones (colour, shape, count, position) and, for a `--describe`
fraction of the requests (default half), a request for a detailed description of the same scene. At each concurrency c, c client threads send the
requests through one ChatEngine (each thread sends its next request when its last one is answered);
c=1 is the same engine run serially, the baseline of the speedup. Levels are run interleaved, round
after round, in a shuffled order per round; the table gives the median over rounds and the spread
(max/min - 1) of the wall time. Every answer is compared with the c=1 answer to the same request.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

from llava_drip.inspect.rounds import interleaved
from llava_drip.serve.builtin import DEFAULT_MAX_BATCH_SIZE, add_dtype_arg


def _percentile(values, q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_level(engine, requests, concurrency: int, max_new_tokens: int):
    """Answer every request with `concurrency` client threads. (wall_s, latencies_s, answers, tokens)."""
    answers, latencies, tokens = [None] * len(requests), [0.0] * len(requests), [0] * len(requests)
    todo = iter(range(len(requests)))
    lock = threading.Lock()
    errors = []

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            image, question = requests[i]
            t = time.perf_counter()
            try:
                text, stats = engine.chat([{"role": "user", "content": question}], image, temperature=0,
                                          max_new_tokens=max_new_tokens)
            except Exception as e:  # noqa: BLE001  (reported after the level)
                errors.append(f"request {i}: {e}")
                return
            latencies[i], answers[i], tokens[i] = time.perf_counter() - t, text, stats.generated_tokens

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed at concurrency {concurrency}: {errors[0]}")
    return wall, latencies, answers, tokens


def workload(n_requests: int, describe: float, seed: int = 0):
    """[(image, question)]: held-out scenes, every kind of short question in turn, and `describe` of them
    (spread evenly) asking for a detailed description instead."""
    import numpy as np

    from llava_drip.data.synth_llava import qa_detail
    from llava_drip.train.builtin_model import KINDS, heldout_questions
    per_kind = -(-n_requests // len(KINDS))
    items = heldout_questions(per_kind)
    items = [items[k * per_kind + i] for i in range(per_kind) for k in range(len(KINDS))][:n_requests]
    rng = np.random.default_rng(seed)
    out = []
    for i, (_, scene, image, question, _) in enumerate(items):
        if int((i + 1) * describe) > int(i * describe):
            question = qa_detail(scene, rng)[0]
        out.append((image, question))
    return out


def run_bench(engine, n_requests: int, levels=(1, 8, 32), rounds: int = 3, max_new_tokens: int = 64,
              seed: int = 0, describe: float = 0.5) -> dict:
    requests = workload(n_requests, describe, seed)
    if 1 not in levels:
        levels = (1, *levels)
    run_level(engine, requests[:4], 4, max_new_tokens)  # warm-up: first-call costs (the shared prefix) out
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    got = interleaved(levels, rounds, seed, lambda c: run_level(engine, requests, c, max_new_tokens))
    walls = {c: [g[0] for g in got[c]] for c in levels}
    lat = {c: [x for g in got[c] for x in g[1]] for c in levels}
    answers = {c: [g[2] for g in got[c]] for c in levels}
    gen_tokens = got[1][0][3]
    serial = answers[1][0]
    rows = []
    base = statistics.median(walls[1])
    for c in levels:
        wall = statistics.median(walls[c])
        differ = sum(a != s for got in answers[c] for a, s in zip(got, serial))
        rows.append({"concurrency": c, "requests": len(requests), "rounds": rounds,
                     "wall_s": wall, "wall_s_rounds": walls[c],
                     "spread": max(walls[c]) / min(walls[c]) - 1,
                     "requests_per_s": len(requests) / wall,
                     "p50_latency_s": _percentile(lat[c], 0.5), "p95_latency_s": _percentile(lat[c], 0.95),
                     "fraction_of_serial_time": wall / base, "speedup": base / wall,
                     "answers_differing_from_serial": differ})
    return {"rows": rows, "model": engine.model_path, "describe_fraction": describe, "max_batch_size": engine.max_batch_size,
            "largest_batch": engine.max_rows_seen,
            "max_new_tokens": max_new_tokens, "mean_generated_tokens": statistics.mean(gen_tokens),
            "cpu_count": os.cpu_count(), "device": str(engine.device),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None}


def markdown_table(result: dict) -> str:
    lines = ["| concurrency | requests/s | p50 latency s | p95 latency s | wall s (median) | spread | "
             "time / serial | answers unlike serial |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_latency_s']:.3f} | "
                     f"{r['p95_latency_s']:.3f} | {r['wall_s']:.2f} | {100 * r['spread']:.0f} % | "
                     f"{r['fraction_of_serial_time']:.2f} | {r['answers_differing_from_serial']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="a LLaVA-DRIP folder (default: the built-in model)")
    p.add_argument("--model-base", default=None)
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    p.add_argument("--requests", type=int, default=64, help="requests per level and round")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (1 is always run)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table gives medians")
    p.add_argument("--describe", type=float, default=0.5,
                   help="fraction of the requests that ask for a detailed description (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="the engine's batch bound")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        levels = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if min(levels) < 1 or args.requests < 1 or args.rounds < 1:
        p.error("--concurrency, --requests and --rounds must be >= 1")
    if not 0 <= args.describe <= 1:
        p.error(f"--describe must be in [0, 1], got {args.describe}")
    from llava_drip.serve.builtin import resolve_model_path
    from llava_drip.serve.engine import ChatEngine
    engine = ChatEngine(resolve_model_path(args.model_path), model_base=args.model_base, device=args.device,
                        max_batch_size=args.max_batch_size, dtype=args.dtype)
    result = run_bench(engine, args.requests, levels, args.rounds, args.max_new_tokens, describe=args.describe)
    engine.close()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"serving, {engine.model_path} on {args.device}, {args.requests} greedy requests per level "
          f"({100 * args.describe:.0f} % descriptions), {args.rounds} rounds, engine max batch {args.max_batch_size}, "
          f"mean answer {result['mean_generated_tokens']:.1f} tokens")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
