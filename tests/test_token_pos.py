"""--mm_vision_token_pos centroid: every visual token carries a sin/cos code of where it lies, computed from
DRIP's boundaries (a group's mean patch position) or a ViT's patch grid."""
import pytest
import torch

from llava_drip.drip.pooling import group_centroids, group_mean_pool
from llava_drip.model.multimodal_encoder.towers import (POS_FREQS, DRIPVisionTower, OpenCLIPVisionTower,
                                                        grid_positions, position_code)


@pytest.mark.parametrize("cover_tail", [True, False])
def test_group_centroids_are_the_mean_patch_position_of_each_group(cover_tail):
    torch.manual_seed(0)
    b = (torch.rand(4, 12) < 0.3).float()
    b[0] = 0  # no boundary at all
    b[1, -1] = 1
    pooled = group_mean_pool(torch.randn(4, 12, 3), b, cover_tail=cover_tail)
    S = pooled.groups.shape[1]
    got = group_centroids(b, S, (3, 4))  # 3 rows of 4 patches
    cells = torch.tensor([[i // 4 / 2, i % 4 / 3] for i in range(12)])
    for i in range(4):
        for s in range(S):
            members = pooled.group_ids[i] == s
            want = cells[members].mean(0) if members.any() else torch.zeros(2)
            assert torch.allclose(got[i, s], want), (i, s)


def test_grid_positions_and_code():
    pos = grid_positions((2, 3), with_cls=True)
    assert pos.tolist() == [[0.5, 0.5], [0, 0], [0, 0.5], [0, 1], [1, 0], [1, 0.5], [1, 1]]
    code = position_code(pos)
    assert code.shape == (7, 4 * POS_FREQS)
    assert len({tuple(r) for r in code[1:].tolist()}) == 6  # every cell its own code


def test_drip_tower_appends_the_centroid_code_and_keeps_its_tokens():
    torch.manual_seed(0)
    plain = DRIPVisionTower("DRIP-4x-tiny", eval_mode="threshold")
    torch.manual_seed(0)
    placed = DRIPVisionTower("DRIP-4x-tiny", eval_mode="threshold", token_pos="centroid")
    assert placed.hidden_size == plain.hidden_size + 4 * POS_FREQS
    images = torch.randn(3, 3, 64, 64)
    a, b = plain(images), placed(images)
    tower = placed.vision_tower
    feats = tower.forward_features(images)
    cent = group_centroids(feats.boundaries, feats.hidden.shape[1] - 1, tower.grid_size)
    for i, (x, y) in enumerate(zip(a, b)):
        assert y.shape == (x.shape[0], x.shape[1] + 4 * POS_FREQS)
        assert torch.equal(y[:, :x.shape[1]], x)
        assert torch.allclose(y[:, x.shape[1]:], position_code(cent[i, :x.shape[0]]))
    with pytest.raises(ValueError, match="mm_vision_token_pos 'grid'"):
        DRIPVisionTower("DRIP-4x-tiny", token_pos="grid")


def test_vit_tower_codes_its_patch_grid():
    torch.manual_seed(0)
    tower = OpenCLIPVisionTower("ViT-tiny", select_layer=-1, select_feature="cls_patch", token_pos="centroid")
    out = tower(torch.randn(2, 3, 64, 64))
    assert out[0].shape[1] == tower.hidden_size
    code = out[0][:, -4 * POS_FREQS:]
    assert torch.allclose(code, position_code(grid_positions(tower.vision_tower.grid_size, with_cls=True)))
    assert torch.equal(code, out[1][:, -4 * POS_FREQS:])


def test_position_probe_command_on_the_shipped_model(tmp_path):
    import json

    from llava_drip.inspect import position_probe
    out = tmp_path / "probe.json"
    assert position_probe.main(["--n", "60", "--steps", "5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"tokens", "tokens + centroid code", "all patches"}
    assert res["all patches"]["tokens_mean"] == 64
    assert 0 < res["tokens"]["tokens_mean"] < 64  # DRIP pooled
    assert res["tokens"]["tokens_mean"] == res["tokens + centroid code"]["tokens_mean"]
    assert all(r["n_test"] == 10 and 0 <= r["held_out_accuracy"] <= 1 for r in res.values())


def test_hf_clip_tower_codes_its_patch_grid(tmp_path):
    from llava_drip.model.multimodal_encoder.towers import HFCLIPVisionTower
    from llava_drip.train.tiny import build_tiny_hf_clip
    folder = build_tiny_hf_clip(str(tmp_path / "clip"), image_size=32, patch_size=8)
    tower = HFCLIPVisionTower(folder, select_feature="patch", token_pos="centroid")
    out = tower(torch.randn(2, 3, 32, 32))
    assert out[0].shape == (16, tower.hidden_size) and tower.hidden_size == 64 + 4 * POS_FREQS
    assert torch.allclose(out[1][:, -4 * POS_FREQS:], position_code(grid_positions((4, 4), with_cls=False)))
