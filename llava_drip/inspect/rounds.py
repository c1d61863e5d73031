"""What the benchmarks share: interleaved rounds in a shuffled order, and one measurement in a fresh
process (its memory is its own, not the benchmark's)."""
import multiprocessing as mp
import random
from typing import Callable, Dict, Hashable, List, Sequence


def interleaved(names: Sequence[Hashable], rounds: int, seed: int, measure: Callable) -> Dict[Hashable, List]:
    """measure(name) for every name once per round, in a new shuffled order each round; name -> results."""
    out = {n: [] for n in names}
    order = random.Random(seed)
    for _ in range(rounds):
        shuffled = list(names)
        order.shuffle(shuffled)
        for n in shuffled:
            out[n].append(measure(n))
    return out


def _child(q, target, kwargs):
    try:
        q.put(target(**kwargs))
    except Exception as e:  # noqa: BLE001  (the parent says what failed)
        q.put({"error": f"{type(e).__name__}: {e}"})


def in_fresh_processes(target: Callable[..., dict], calls: Sequence[tuple], concurrent: bool = False) -> List[dict]:
    """target(**kwargs) for each (what, kwargs) in its own spawned process (target: a module-level function
    returning a dict); RuntimeError naming `what` if one raised. concurrent: start them all at once
    (right for per-process figures such as a CPU process's peak RSS; not for processes sharing a GPU)."""
    ctx = mp.get_context("spawn")
    results: List[dict] = [None] * len(calls)
    groups = [list(range(len(calls)))] if concurrent else [[i] for i in range(len(calls))]
    for group in groups:
        running = []
        for i in group:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(q, target, calls[i][1]))
            p.start()
            running.append((i, q, p))
        for i, q, p in running:
            results[i] = q.get()
            p.join()
    for (what, _), got in zip(calls, results):
        if "error" in got:
            raise RuntimeError(f"{what} failed: {got['error']}")
    return results
