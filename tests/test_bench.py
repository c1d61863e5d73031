"""The benchmarks' outputs (structure and token/FLOP bookkeeping), never their timings."""
import json
import os
from pathlib import Path

import pytest

from llava_drip.inspect import bench_encoder, bench_prefill


def test_bench_encoder_json_rows(capsys, tmp_path):
    out = tmp_path / "enc.json"
    assert bench_encoder.main(["--model", "DRIP-4x-tiny", "--batch-sizes", "2,3", "--warmup", "0", "--iters", "1",
                               "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["rows"] == res["rows"]
    rows = res["rows"]
    assert res["env"]["packed_attention"] == "sdpa on the padded grid"  # no Flash varlen kernel on CPU
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


def test_bench_prefill_interleaved_rounds_and_visual_token_counts(tmp_path, capsys):
    """--visual-tokens feeds N random visual tokens to the same LLM (no tower); every row has its rounds."""
    out = tmp_path / "prefill.json"
    assert bench_prefill.main(["--llm", "tiny", "--visual-tokens", "64,16", "--batch-size", "2", "--text-tokens", "8",
                               "--iters", "1", "--rounds", "2", "--device", "cpu", "--no-isolate",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["tower"] for r in rows] == ["64 visual tokens", "16 visual tokens"]
    assert [r["visual_tokens"] for r in rows] == [64, 16] and [r["seq_len"] for r in rows] == [72, 24]
    for r in rows:
        assert len(r["prefill_ms_rounds"]) == 2 and r["prefill_spread"] >= 0 and r["tower_ms"] is None
    assert "| 16 visual tokens | 16.0 | 24 | - |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_prefill.main(["--visual-tokens", "64,x"])


def test_bench_train_step_refuses_bad_flags(capsys):
    from llava_drip.inspect import bench_train
    for argv in (["--models", "DRIP-3x-nope"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            bench_train.main(argv)
    assert "DRIP-3x-nope" in capsys.readouterr().err


def test_bench_gpu_script_dry_run(tmp_path):
    """scripts/bench_gpu.sh --dry-run: the GPU run's three commands on CPU at tiny shapes, JSON for each."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["bash", str(repo / "scripts" / "bench_gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    encoder = json.loads((tmp_path / "bench_encoder_dryrun.json").read_text())
    assert {r["model"] for r in encoder["rows"]} >= {"ViT-tiny", "DRIP-4x-tiny"}
    train = json.loads((tmp_path / "bench_train_step_dryrun.json").read_text())  # bench train-step
    assert [r["model"] for r in train["rows"]] == ["ViT-tiny", "DRIP-4x-tiny"]
    for r in train["rows"]:  # time from interleaved rounds, memory from a fresh process per model
        assert r["step_ms"] > 0 and len(r["step_ms_rounds"]) == 3 and r["peak_mem_mb"] > 0
    assert train["rows"][0]["time_vs_first"] == 1.0 and "resident set size" in train["memory_kind"]
    assert "| DRIP-4x-tiny | 8 |" in proc.stdout
    prefill = json.loads((tmp_path / "bench_prefill_dryrun.json").read_text())
    assert [r["visual_tokens"] for r in prefill] == [64, 16] and all(r["peak_mem_mb"] > 0 for r in prefill)
    assert "bench_gpu.sh: wrote" in proc.stdout
    bad = subprocess.run(["bash", str(repo / "scripts" / "bench_gpu.sh"), "--nope"], cwd=repo, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert bad.returncode == 2 and "unknown argument --nope" in bad.stdout


def test_bench_encoder_rounds_until_the_spread_is_small(tmp_path):
    """--target-spread adds rounds (shuffled, paired with the baseline) up to --max-iters; spread reported."""
    out = tmp_path / "enc.json"
    assert bench_encoder.main(["--model", "DRIP-4x-tiny", "--batch-sizes", "2", "--warmup", "0", "--iters", "2",
                               "--impl", "packed", "--boundaries", "topk", "--target-spread", "0", "--max-iters", "4",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    drip = [r for r in rows if r["model"] == "DRIP-4x-tiny"]
    assert len(drip) == 1
    r = drip[0]
    assert r["rounds"] == 4 and len(r["speedup_rounds"]) == 4  # a spread of 0 is never reached: all 4 rounds
    assert r["achieved_spread"] == pytest.approx(max(r["speedup_rounds"]) / min(r["speedup_rounds"]) - 1)
    assert r["achieved_paired"] == pytest.approx(r["speedup_median"] / r["flop_ratio"])
    assert "| 4) |" not in bench_encoder.markdown_table({"rows": rows}) and "(4)" in bench_encoder.markdown_table({"rows": rows})


def test_bench_encoder_full_length_control(tmp_path):
    """boundaries 'full': the same DRIP code with a boundary after every patch; the other rows of that model,
    layout and batch get their achieved fraction against it."""
    out = tmp_path / "enc.json"
    assert bench_encoder.main(["--model", "DRIP-4x-tiny", "--batch-sizes", "2", "--warmup", "0", "--iters", "1",
                               "--impl", "packed", "--boundaries", "topk,full", "--out", str(out)]) == 0
    rows = {r["boundaries"]: r for r in json.loads(out.read_text())["rows"] if r["model"] == "DRIP-4x-tiny"}
    full, topk = rows["full"], rows["topk"]
    assert full["groups_per_image"] == 64 and full["flop_ratio"] < 1 and "achieved_vs_full" not in full
    expected = (topk["img_s"] / full["img_s"]) / (full["gflops_per_image"] / topk["gflops_per_image"])
    assert topk["achieved_vs_full"] == pytest.approx(expected)
    assert bench_encoder.main(["--boundaries", "nope"]) == 2
