"""The benchmarks' outputs (structure and token/FLOP bookkeeping), never their timings."""
import json

import pytest

from llava_drip.inspect import bench_encoder, bench_prefill


def test_bench_encoder_json_rows(capsys, tmp_path):
    out = tmp_path / "enc.json"
    assert bench_encoder.main(["--model", "DRIP-4x-tiny", "--batch-sizes", "2,3", "--warmup", "0", "--iters", "1",
                               "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["rows"] == res["rows"]
    rows = res["rows"]
    # the ViT-tiny baseline is added; 2 boundary modes x 2 layouts per DRIP model and batch size
    assert {r["model"] for r in rows} == {"ViT-tiny", "DRIP-4x-tiny"}
    assert len(rows) == 2 * (1 + 4)
    for r in rows:
        assert r["img_s"] > 0 and r["latency_ms"] > 0
        if r["model"] == "ViT-tiny":
            assert r["padded_len"] == 65 and r["flop_ratio"] == 1.0
            continue
        assert r["baseline"] == "ViT-tiny" and 0 <= r["pool_share"] <= 1
        assert r["flop_ratio"] > 1
        assert r["achieved"] == pytest.approx(r["speedup"] / r["flop_ratio"])
        if r["boundaries"] == "topk":  # exactly round(0.25 * 64) groups per image
            assert r["groups_per_image"] == 16 and r["groups_min"] == r["groups_max"] == 16
        if r["impl"] == "packed":
            assert r["computed_len"] == pytest.approx(1 + r["groups_per_image"])
        else:
            assert r["computed_len"] == r["padded_len"] == 1 + r["groups_max"]


def test_bench_encoder_rejects_unknown_model(capsys):
    assert bench_encoder.main(["--model", "DRIP-3x-nope"]) == 2
    assert "DRIP-3x-nope" in capsys.readouterr().err


def test_bench_prefill_counts_visual_tokens():
    rows = bench_prefill.run(["ViT-tiny", "DRIP-4x-tiny", "DRIP-10x-tiny"], "tiny", batch=2, text_tokens=8, iters=1,
                             device="cpu", isolate=False)
    by = {r["tower"]: r for r in rows}
    # ViT: every patch (CLS dropped); DRIP 'topk': exactly round(p * 64)
    assert by["ViT-tiny"]["visual_tokens"] == 64
    assert by["DRIP-4x-tiny"]["visual_tokens"] == 16 and by["DRIP-10x-tiny"]["visual_tokens"] == 6
    for r in rows:
        assert r["seq_len"] == 8 + r["visual_tokens"]  # 8 text tokens (BOS included) + image tokens
        assert r["token_ratio"] == pytest.approx(64 / r["visual_tokens"])
        assert r["seq_ratio"] == pytest.approx(72 / r["seq_len"])
        assert r["prefill_ms"] > 0 and r["peak_mem_mb"] > 0
    assert "| DRIP-4x-tiny | 16.0 |" in bench_prefill.format_table(rows)
