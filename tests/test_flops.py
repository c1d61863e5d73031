"""FLOP accounting: fvcore with attention handlers == analytic count for every registered model, the
standard ViT values, the reference repository's published column under --seed-compat."""
import json

import pytest
import torch

from llava_drip.drip import list_models
from llava_drip.inspect import flops

# the seed's README column (interval simulation, predictor skipped, fused MHA skipped for the ViT)
SEED_PUBLISHED = {
    "ViT-B-32": 2.96, "DRIP-2x-32": 2.69, "DRIP-4x-32": 1.83, "DRIP-10x-32": 1.26,
    "DRIP-2x-16": 10.22, "DRIP-4x-16": 6.62, "DRIP-10x-16": 4.53,
    "DRIP-2x-32-2+11": 2.87, "DRIP-4x-32-2+12": 2.03, "DRIP-4x-32-2+16": 2.43, "DRIP-4x-32-2+18": 2.63,
    "DRIP-4x-32-2+20": 2.83, "DRIP-10x-32-2+24": 1.86,
}


@pytest.fixture(scope="module")
def rows():
    """Every registered model counted once (fvcore + analytic, seed-compat where published)."""
    return {n: flops.count_model(n, seed=n in SEED_PUBLISHED) for n in list_models()}


def test_vit_baselines_are_the_standard_values(rows):
    assert round(rows["ViT-B-32"]["gflops"], 2) == 4.41
    assert round(rows["ViT-B-16"]["gflops"], 2) == 17.58
    assert rows["ViT-B-32"]["uncounted_ops"] == []


@pytest.mark.parametrize("name", list_models())
def test_fvcore_matches_analytic(rows, name):
    r = rows[name]
    assert r["gflops"] > 0
    assert abs(r["gflops"] - r["analytic_gflops"]) <= 0.01 * r["analytic_gflops"], r
    if r["kind"] == "drip":
        # predictor counted; the target group count is round(p N)
        n, prior = r["num_patches"], r["prior"]
        assert r["groups"] == max(1, round(prior * n))
        assert r["predictor_gflops"] > 0
        assert abs(r["predictor_gflops"] - r["analytic_breakdown_gflops"]["predictor"]) < 1e-6


def test_seed_compat_reproduces_published_column(rows):
    for name, published in SEED_PUBLISHED.items():
        r = rows[name]
        assert abs(r["seed_compat_gflops"] - published) <= 0.01, (name, r["seed_compat_gflops"], published)
        # the itemised differences explain the whole gap to the correct count
        assert abs(r["gflops"] + sum(d["gflops"] for d in r["seed_compat_diff"]) - r["seed_compat_gflops"]) < 1e-6


def test_seed_compat_drip_uses_interval_groups(rows):
    assert rows["DRIP-2x-32"]["seed_groups"] == 25
    assert rows["DRIP-4x-32"]["seed_groups"] == 13
    assert rows["DRIP-10x-32"]["seed_groups"] == 5  # 8 tail tokens dropped
    assert rows["DRIP-10x-16"]["seed_groups"] == 20


def test_vit_b32_counted_in_every_mode():
    """Eval + no_grad takes the fused attention kernel; train mode with grad does not. Same count."""
    from fvcore.nn import FlopCountAnalysis
    tower = flops.build_tower("ViT-B-32")
    assert round(flops.fvcore_analysis(tower, 224).total() / 1e9, 2) == 4.41
    plain = flops.fvcore_analysis(tower, 224, with_attention=False)
    assert round(plain.total() / 1e9, 2) == 2.95  # what plain fvcore reports: the seed's undercount
    assert "aten::_native_multi_head_attention" in plain.unsupported_ops()
    tower.train()
    fa = FlopCountAnalysis(tower, torch.zeros(1, 3, 224, 224))
    fa.set_op_handle(**flops.ATTENTION_HANDLES)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    assert round(fa.total() / 1e9, 2) == 4.41


def test_at_ratio_counts_measured_groups():
    r = flops.count_model("DRIP-4x-32", ratio=0.3)
    assert r["groups"] == round(0.3 * 49)
    assert abs(r["gflops"] - flops.analytic_macs("DRIP-4x-32", groups=15)["total"] / 1e9) < 0.01 * r["gflops"]
    assert flops.groups_for_ratio(4.0, 196) == 49  # a compression rate
    assert flops.groups_for_ratio(0.25, 196) == 49  # a kept fraction
    with pytest.raises(ValueError):
        flops.count_model("ViT-tiny", ratio=0.5)


def test_cli_json_and_seed_text(capsys, tmp_path):
    assert flops.main(["--model", "ViT-tiny", "DRIP-4x-tiny", "--at-ratio", "0.5", "2x", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["ViT-tiny", "DRIP-4x-tiny", "DRIP-4x-tiny"]
    assert all({"model", "gflops"} <= set(r) for r in rows)
    assert rows[1]["groups"] == rows[2]["groups"] == 32
    assert flops.main(["--model", "ViT-tiny", "DRIP-4x-tiny", "--seed-compat"]) == 0
    out = capsys.readouterr().out
    assert "seed-compat" in out and "boundary predictor MLP bypassed" in out and "fused attention" in out
    assert flops.main(["--model", "nope"]) == 2


def test_plot_writes_png(tmp_path):
    rows = [flops.count_model(n) for n in ("ViT-tiny", "DRIP-2x-tiny", "DRIP-4x-tiny", "DRIP-10x-tiny")]
    path = flops.plot_flops(str(tmp_path / "f.png"), rows)
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300
