"""The chat engine's batching on the built-in model: concurrent requests decode together with a shared
KV cache, and each still gets the answer it would get alone (greedy), its own stopping, streaming and
seeded sampling; the line is bounded (EngineBusy, 503 from the API); `llava-drip bench serve` runs."""
import json
import os
import threading
import time

import pytest
import torch
from tiny_model import tiny_model_path

from llava_drip.serve.builtin import SHIPPED
from llava_drip.serve.engine import ChatEngine, EngineBusy
from llava_drip.train.builtin_model import heldout_questions


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return SHIPPED if os.path.isfile(os.path.join(SHIPPED, "config.json")) else tiny_model_path(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(model_path):
    e = ChatEngine(model_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def serial(model_path):
    """The same model answering one request at a time (the reference)."""
    e = ChatEngine(model_path, max_batch_size=1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def requests():
    """Held-out scenes with each kind of question, a budget now and then, and two text-only turns."""
    items = [(image, q) for _, _, image, q, _ in heldout_questions(3)]
    reqs = [dict(messages=[{"role": "user", "content": q}], image=image,
                 budget=("0.5" if i % 5 == 1 else 8 if i % 5 == 3 else None)) for i, (image, q) in enumerate(items)]
    reqs += [dict(messages=[{"role": "user", "content": "Hello, who are you?"}], image=None, budget=None),
             dict(messages=[{"role": "user", "content": "What is in the image?"}, {"role": "assistant",
                  "content": "Shapes."}, {"role": "user", "content": "What color?"}], image=items[0][0], budget=None)]
    return reqs


def _together(engine, reqs, **kw):
    """Send every request at once from its own thread; answers in request order."""
    out = [None] * len(reqs)

    def worker(i):
        out[i] = engine.chat(**reqs[i], **kw)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_batched_greedy_answers_equal_answers_alone(engine, serial, requests):
    alone = [serial.chat(**r, temperature=0, max_new_tokens=24) for r in requests]
    batched = _together(engine, requests, temperature=0, max_new_tokens=24)
    assert [t for t, _ in batched] == [t for t, _ in alone]
    for (_, a), (_, b) in zip(alone, batched):
        assert (a.generated_tokens, a.prompt_tokens, a.visual_tokens_out, a.finish_reason, a.budget) == \
            (b.generated_tokens, b.prompt_tokens, b.visual_tokens_out, b.finish_reason, b.budget)
    assert len({s.generated_tokens for _, s in alone}) > 1  # rows finished at different steps


def test_answers_alone_equal_hf_generate(serial, requests):
    """The engine's own decoding loop (shared-prefix cache, its greedy pick) against transformers' generate."""
    for r in requests[:6]:
        text, _ = serial.chat(**r, temperature=0, max_new_tokens=24)
        tokens, _, req = serial._prepare(r["messages"], r["image"], 0, 0.7, 24, r["budget"])
        kwargs = dict(images=tokens.pixel_values, budget=tokens.budget) if tokens is not None else {}
        ids = serial.model.generate(req.ids[None], attention_mask=torch.ones_like(req.ids[None]), max_new_tokens=24,
                                    do_sample=False, temperature=None, top_p=None, top_k=None,
                                    pad_token_id=serial.tokenizer.pad_token_id, **kwargs)[0]
        assert serial._decode(ids) == text


def test_rows_join_a_running_batch_and_stop_on_their_own(engine, serial, requests, monkeypatch):
    """A long answer is decoding when short ones arrive: they join it, finish first at their own
    lengths, and every answer is what it is alone."""
    for e in (engine, serial):
        monkeypatch.setattr(e, "_suppress_ids", tuple(e._eos_ids))  # every answer runs to its max_new_tokens
    lengths = [40, 3, 7, 12]
    alone = [serial.chat(**requests[i], temperature=0, max_new_tokens=n)[0] for i, n in enumerate(lengths)]
    got = {}

    def ask(i):
        got[i] = engine.chat(**requests[i], temperature=0, max_new_tokens=lengths[i])

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    while not engine._running:  # the long one is in the batch
        time.sleep(0.001)
    rest = [threading.Thread(target=ask, args=(i,)) for i in range(1, 4)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join(timeout=120)
    assert [got[i][0] for i in range(4)] == alone
    assert [got[i][1].generated_tokens for i in range(4)] == lengths
    assert {got[i][1].finish_reason for i in range(4)} == {"length"}
    assert engine.max_rows_seen >= 2


def test_streams_in_one_batch_each_get_their_own_text(engine, requests):
    expected = [engine.chat(**r, temperature=0, max_new_tokens=16)[0] for r in requests[:5]]
    streams = [engine.stream(**r, temperature=0, max_new_tokens=16) for r in requests[:5]]  # all queued first
    pieces = [[] for _ in streams]

    def read(i):
        pieces[i] = list(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert ["".join(p).strip() for p in pieces] == expected
    assert [s.text for s in streams] == expected and all(len(p) >= 1 for p in pieces)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine, serial, requests):
    r = dict(requests[0], temperature=2.0, top_p=1.0, max_new_tokens=16)
    alone = [serial.chat(**r, seed=s)[0] for s in (1, 2, 3)]
    assert serial.chat(**r, seed=1)[0] == alone[0]
    mixed = [dict(r, seed=s) for s in (1, 2, 3)] + [dict(q, temperature=0, max_new_tokens=16) for q in requests[1:6]]
    out = [None] * len(mixed)

    def worker(i):
        out[i] = engine.chat(**mixed[i])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(mixed))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out[:3] == alone
    assert len(set(alone)) > 1  # the seeds matter: sampling really sampled


def test_top_p_keeps_the_smallest_set_holding_p(engine):
    """top_p close to 0 keeps only the most likely token: sampling becomes greedy."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    req = engine._request(torch.zeros(1, 1, dtype=torch.long), None, 1.0, 1e-6, 1, 0, False)
    assert [int(engine._pick(logits.clone(), [req])[0]) for _ in range(20)] == [1] * 20
    req = engine._request(torch.zeros(1, 1, dtype=torch.long), None, 1.0, 0.8, 1, 0, False)  # 0.64+0.24 >= 0.8
    assert {int(engine._pick(logits.clone(), [req])[0]) for _ in range(200)} == {1, 3}


def test_a_full_line_raises_engine_busy_and_frees_up(model_path):
    e = ChatEngine(model_path, max_batch_size=1, max_queue=2)
    msgs = [{"role": "user", "content": "Hello"}]
    with e._lock:  # the worker cannot take anything: the line fills
        streams = [e.stream(msgs, None, max_new_tokens=2) for _ in range(2)]
        with pytest.raises(EngineBusy, match="max_queue=2"):
            e.chat(msgs, None, max_new_tokens=2)
    assert all(len(list(s)) >= 0 and s.stats.generated_tokens >= 1 for s in streams)
    assert e.chat(msgs, None, max_new_tokens=2)[1].generated_tokens >= 1  # room again
    e.close()
    assert not e._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        e.chat(msgs, None, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        ChatEngine(model_path, max_batch_size=0)


def test_api_answers_503_when_the_engine_line_is_full(model_path):
    from fastapi.testclient import TestClient

    from llava_drip.serve.api import create_app
    e = ChatEngine(model_path, max_batch_size=1, max_queue=1)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    with TestClient(create_app(e, "m")) as client:
        with e._lock:
            held = e.stream(body["messages"], None, max_new_tokens=2)  # the one place in the line
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy" and "max_queue=1" in r.json()["error"]["message"]
        list(held)
        r = client.post("/v1/chat/completions", json=dict(body, temperature=0.9, seed=7))
        assert r.status_code == 200
        again = client.post("/v1/chat/completions", json=dict(body, temperature=0.9, seed=7))
        assert again.json()["choices"][0]["message"] == r.json()["choices"][0]["message"]
        bad = client.post("/v1/chat/completions", json=dict(body, seed="x"))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
    e.close()


def test_bench_serve_command(model_path, tmp_path, capsys):
    from llava_drip.cli import main
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model-path", model_path, "--requests", "8", "--concurrency", "1,4",
                 "--rounds", "2", "--max-new-tokens", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["concurrency"]: r for r in result["rows"]}
    assert sorted(rows) == [1, 4]
    for r in rows.values():
        assert r["requests"] == 8 and len(r["wall_s_rounds"]) == 2 and r["answers_differing_from_serial"] == 0
        assert r["p50_latency_s"] <= r["p95_latency_s"] and r["requests_per_s"] > 0
    assert rows[1]["fraction_of_serial_time"] == 1.0
    table = capsys.readouterr().out
    assert "| concurrency | requests/s" in table and "| 4 |" in table


def test_bench_serve_refuses_bad_flags(capsys):
    from llava_drip.inspect.bench_serve import main
    for argv in (["--concurrency", "1,x"], ["--requests", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--concurrency" in capsys.readouterr().err


def test_roomy_cache_layer_matches_dynamic_layer_and_writes_in_place():
    """The engine's KV cache layer holds the same keys/values as transformers' DynamicLayer through prefill,
    decode steps, row selection and outside assignment (a merge, a trimmed prefix), and a decode step within
    its room writes one column in place instead of copying the cache."""
    from transformers.cache_utils import DynamicLayer

    from llava_drip.serve.engine import _RoomyLayer
    g = torch.Generator().manual_seed(0)
    ref, mine = DynamicLayer(), _RoomyLayer()

    def step(t, b=3):
        k, v = torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)
        rk, rv = ref.update(k, v)
        mk, mv = mine.update(k, v)
        assert torch.equal(rk, mk) and torch.equal(rv, mv)

    step(5)  # prefill
    ptr = mine._kbuf.data_ptr()
    for _ in range(20):
        step(1)
    assert mine._kbuf.data_ptr() == ptr  # 25 columns fit the first buffer's room: no copy
    for _ in range(40):  # past the room: a bigger buffer, still the same contents
        step(1)
    assert mine._kbuf.data_ptr() != ptr and mine._kbuf.shape[-2] >= 65
    idx = torch.tensor([2, 0])
    ref.batch_select_indices(idx)
    mine.batch_select_indices(idx)
    step(1, b=2)
    for layer in (ref, mine):  # what _Batch.select does to columns no row reads any more
        layer.keys, layer.values = layer.keys[:, :, 7:], layer.values[:, :, 7:]
    step(2, b=2)
    step(1, b=2)
    assert mine.get_seq_length() == ref.get_seq_length() == 62


def test_finished_rows_wait_in_the_batch_until_a_quarter_has_finished(engine, serial, requests, monkeypatch):
    """A row that finishes early stays in the batch (its tokens ignored) while fewer than a quarter of the rows
    have finished, so the cache is not copied at every exit; every answer is still what it is alone and nobody
    gets tokens after finishing."""
    import llava_drip.serve.engine as eng
    for e in (engine, serial):
        monkeypatch.setattr(e, "_suppress_ids", tuple(e._eos_ids))
    # the short one's image is encoded at once (no waiting for batch mates), so it joins while the long ones run
    monkeypatch.setattr(eng, "_ENCODE_WAIT_S", 0.0)
    lengths = [60] * 7 + [2]  # the short one joins seven long ones: 1 of 8 finished < 1/4, it stays
    steps = []
    step = eng.ChatEngine._step

    def spy(self, batch):
        steps.append((len(batch.reqs), batch.dead))
        return step(self, batch)

    monkeypatch.setattr(eng.ChatEngine, "_step", spy)
    reqs = [dict(requests[i % len(requests)], max_new_tokens=n) for i, n in enumerate(lengths)]
    alone = [serial.chat(**r, temperature=0)[0] for r in reqs]
    got = {}

    def ask(i):
        got[i] = engine.chat(**reqs[i], temperature=0)

    long = [threading.Thread(target=ask, args=(i,)) for i in range(7)]
    for t in long:
        t.start()
    while engine._running < 7:
        time.sleep(0.001)
    short = threading.Thread(target=ask, args=(7,))
    short.start()
    for t in [*long, short]:
        t.join(timeout=120)
    assert [got[i][0] for i in range(8)] == alone
    assert [got[i][1].generated_tokens for i in range(8)] == lengths
    assert (8, 1) in steps  # the finished row rode along
