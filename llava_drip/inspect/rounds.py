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


def in_fresh_process(target: Callable[..., dict], what: str, **kwargs) -> dict:
    """target(**kwargs) in a spawned process (a module-level function returning a dict); RuntimeError
    naming `what` if it raised."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, target, kwargs))
    p.start()
    got = q.get()
    p.join()
    if "error" in got:
        raise RuntimeError(f"{what} failed: {got['error']}")
    return got
