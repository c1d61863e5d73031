"""The mini reproduction's report: seed aggregation, the trade-off plot and the table (no training here;
tests/test_tiny_scripts.py runs the script end to end)."""
import pytest

from llava_drip.clip import repro


def _run(model, seed, top1, prior=None, gflops=0.08):
    return {"model": model, "seed": seed, "prior": prior, "top1": top1, "top5": min(1.0, top1 + 0.2),
            "colour_acc": 1.0, "shape_acc": top1, "eval_group_ratio": 1.0 if prior is None else prior,
            "gflops_realised": gflops, "gflops_target": gflops, "target_groups": 64 if prior is None else 16,
            "avg_step_time_s": 0.5, "avg_peak_memory_mb": 900.0, "train_boundary_ratio": prior,
            "train_group_ratio": prior, "curve": [{"epoch": 1, "top1": top1 / 2, "top5": top1}],
            "interleaved_step_s": 0.4, **({} if prior is None else {"topk": {"top1": top1, "top5": top1, "group_ratio": prior}})}


def test_aggregate_means_and_ranges_over_seeds():
    runs = [_run("ViT-tiny", 0, 0.90), _run("ViT-tiny", 1, 0.94), _run("DRIP-4x-tiny", 0, 0.70, 0.25, 0.045),
            _run("DRIP-4x-tiny", 1, 0.74, 0.25, 0.045)]
    rows = repro.aggregate(runs)
    assert [r["model"] for r in rows] == ["ViT-tiny", "DRIP-4x-tiny"]
    vit, d4 = rows
    assert vit["seeds"] == [0, 1] and vit["top1"] == pytest.approx(0.92)
    assert (vit["top1_min"], vit["top1_max"]) == (0.90, 0.94)
    assert d4["train_group_ratio"] == pytest.approx(0.25)  # None for ViT: left out, not averaged as 0
    assert "train_group_ratio_all" not in vit
    assert d4["curve"][0]["top1"] == pytest.approx(0.36)
    assert repro._spread(vit, "top1") == "92.0 (90.0-94.0)"


def test_report_and_plot(tmp_path):
    runs = [_run("ViT-tiny", s, 0.90 + 0.02 * s) for s in (0, 1)] + \
           [_run("DRIP-10x-tiny", s, 0.60 + 0.01 * s, 0.1, 0.037) for s in (0, 1)]
    rows = repro.aggregate(runs)
    meta = {"command": "scripts/tiny/clip_repro.sh --seeds 0,1", "n": 100, "image_size": 64, "val_images": 48,
            "num_classes": 48, "num_templates": 5, "num_colours": 8, "num_shapes": 6, "epochs": 1,
            "steps_per_epoch": 1, "steps": 1, "batch_size": 100, "lr": 0.002, "warmup": 1, "seeds": [0, 1],
            "wd": 0.1, "cpu": "cpu", "cores": 2, "train_wall_s": {"ViT-tiny seed 0": 60.0}, "torch": "x",
            "threads": 2, "workers": 1, "reps": 1, "load_min": 1.0, "load_max": 2.0,
            "gflops_source": repro.GFLOPS_SOURCE, "notes": repro.NOTES}
    png, doc = tmp_path / "fig" / "tradeoff.png", tmp_path / "doc.md"
    repro.plot_tradeoff(tmp_path / "one.png", repro.aggregate(runs[::2]), meta)  # one seed: binomial bars
    repro.plot_tradeoff(png, rows, meta)
    assert png.read_bytes()[:4] == b"\x89PNG"
    meta["plot"] = "fig/tradeoff.png"
    repro.write_markdown(doc, rows, meta)
    text = doc.read_text()
    assert "![zero-shot top-1 against GFLOPs](fig/tradeoff.png)" in text
    assert "| 91.0 (90.0-92.0) |" in text
    assert "*Zero-shot top-1 % per seed*: ViT-tiny 0: 90.0, 1: 92.0; DRIP-10x-tiny 0: 60.0, 1: 61.0." in text
    # a 30.5-point gap against a 2-point seed range is called larger than the noise
    assert "DRIP-10x-tiny** loses top-1" in text and "larger than the noise" in text
