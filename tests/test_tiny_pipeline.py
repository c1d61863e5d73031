"""The built-in model's tower step: contrastive pretraining through clip-train, exported weights."""
import torch

from llava_drip.drip import create_model
from llava_drip.train.tiny_pipeline import pretrain_tower


def test_pretrain_tower_exports_loadable_weights(tmp_path):
    weights = pretrain_tower(str(tmp_path), "DRIP-4x-tiny", seed=0, n=128, epochs=1)
    assert weights.endswith(".safetensors")
    trained = create_model("DRIP-4x-tiny", pretrained=weights)  # strict: every key present, none extra
    fresh = create_model("DRIP-4x-tiny")
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any(k.startswith("visual.boundary_predictor") for k in changed)
    assert (tmp_path / "clip_runs" / "DRIP-4x-tiny" / "efficiency.json").is_file()
    # a second call reuses the exported file instead of training again
    mtime = (tmp_path / "DRIP-4x-tiny-clip.safetensors").stat().st_mtime_ns
    assert pretrain_tower(str(tmp_path), "DRIP-4x-tiny", seed=0, n=128, epochs=1) == weights
    assert (tmp_path / "DRIP-4x-tiny-clip.safetensors").stat().st_mtime_ns == mtime
