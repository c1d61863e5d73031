"""`llava-drip convert-reference`: a checkpoint laid out like the reference code's (Yusen-Peng/DRIP, v1
DTPViT inside open_clip's CLIP) converts without --allow-unmapped, loads strictly and runs; weights land
where they belong; the converted model computes exactly what the reference computes (no ln_pre, head
bias included); truly unmapped or missing keys are refused.

`RefTower` below rebuilds the reference tower's module layout (names and shapes of its state dict) and
its v1 forward at DRIP-4x-tiny's sizes; it is written here from the spec, not imported from anywhere.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llava_drip.drip import create_model, create_model_and_transforms, get_model_config, list_models, load_checkpoint
from llava_drip.drip.convert_reference import (REFERENCE_FLAGS, ConversionError, convert_reference, convert_state_dict,
                                               converted_metadata, load_converted, read_reference_checkpoint)

NAME = "DRIP-4x-tiny"  # 64 px, patch 8, width 128, 4 heads, 2 + 4 blocks, embed 128


class RefBlock(nn.Module):
    """The reference's TransformerBlock: pre-norm, sequence-first nn.MultiheadAttention, MLP in a Sequential."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=False)
        self.drop_path = nn.Dropout(0.0)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * d, d), nn.Dropout(0.0))

    def forward(self, x):  # [L, B, D]
        h = self.norm1(x)
        x = x + self.attn(h, h, h)[0]
        return x + self.mlp(self.norm2(x))


class RefPredictor(nn.Module):
    def __init__(self, d, mult):
        super().__init__()
        self.boundary_predictor = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, 1))


class RefPatchEmbed(nn.Module):
    def __init__(self, d, p):
        super().__init__()
        self.proj = nn.Conv2d(3, d, kernel_size=p, stride=p)  # with bias, unlike open_clip's conv1


class RefTower(nn.Module):
    def __init__(self, image=64, patch=8, d=128, heads=4, depth=(2, 4), embed=128, mult=2):
        super().__init__()
        n = (image // patch) ** 2
        self.patch_embed = RefPatchEmbed(d, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + n, d))
        self.pos_drop = nn.Dropout(0.0)
        self.pre_blocks = nn.Sequential(*[RefBlock(d, heads) for _ in range(depth[0])])
        self.shorten_blocks = nn.Sequential(*[RefBlock(d, heads) for _ in range(depth[1])])
        self.boundary_predictor = RefPredictor(d, mult)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, embed)
        self.null_group = nn.Parameter(torch.randn(1, 1, d))
        with torch.no_grad():  # LayerNorms away from 1 / 0, so a misplaced one shows
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def features(self, img, boundaries):
        """v1 up to the final norm, with given hard boundaries [B, N]: no LayerNorm before the pre blocks,
        S = max K, exclusive-cumsum groups, tail tokens of the max-K images dropped, pads as zero rows,
        one norm twice. Returns [B, 1+S, D], pad rows included."""
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.pre_blocks(x.transpose(0, 1))  # [1+N, B, D]
        cls, h = x[:1], x[1:]
        s = int(boundaries.sum(1).max())
        sigma = boundaries.cumsum(1) - boundaries  # [B, N]
        member = (sigma.unsqueeze(-1) == torch.arange(s)).float()  # [B, N, S]
        w = member / (member.sum(1, keepdim=True) + 1e-9)
        groups = torch.einsum("lbd,bls->sbd", h, w)
        x = self.norm(torch.cat([cls, groups], 0))
        return self.norm(self.shorten_blocks(x).transpose(0, 1))

    def forward(self, img, boundaries):
        """The image embedding before CLIP's normalisation: plain mean over every row, then the biased head."""
        return self.head(self.features(img, boundaries).mean(1))


def _reference_clip(seed=0, zero_head_bias=False, **tower_kw):
    """A full reference CLIP state dict: the tower as above, the text side open_clip's names (DRIP keeps
    open_clip's CLIP text tower unchanged), randomised so every value is distinguishable."""
    torch.manual_seed(seed)
    tower = RefTower(**tower_kw).eval()
    if zero_head_bias:
        nn.init.zeros_(tower.head.bias)
    text = {k: torch.randn_like(v) for k, v in create_model(NAME).state_dict().items() if not k.startswith("visual.")}
    sd = {"visual." + k: v.detach().clone() for k, v in tower.state_dict().items()}
    sd.update(text)
    return tower, sd


def _save_train_ckpt(sd, path):
    """As open_clip_train saves it under DDP: {'epoch', 'name', 'state_dict': {'module.' + key}, 'optimizer'}."""
    torch.save({"epoch": 10, "name": "drip", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llava_drip.cli", "convert-reference", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_converts_without_allow_unmapped_and_the_result_loads_strictly(tmp_path):
    _, sd = _reference_clip()
    ckpt, out = tmp_path / "epoch_10.pt", tmp_path / "conv" / "model.safetensors"

    # a key with no place still stops the CLI, and nothing is written
    _save_train_ckpt({**sd, "visual.extra_adapter.weight": torch.zeros(3)}, ckpt)
    r = _cli(ckpt, "--model", NAME, "--out", out)
    assert r.returncode == 2, r.stderr
    assert "visual.extra_adapter.weight" in r.stderr and "--allow-unmapped" in r.stderr
    assert "ln_pre" not in r.stderr and "head.bias" not in r.stderr  # those two have a place now
    assert not out.exists() and not list(tmp_path.glob("conv/.*tmp*"))

    # a real checkpoint converts as it is
    _save_train_ckpt(sd, ckpt)
    r = _cli(ckpt, "--model", NAME, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" not in r.stderr
    report = json.loads(r.stdout)
    assert report["kind"] == "clip" and report["missing"] == {} and report["unmapped"] == {}
    assert report["mapped"]["visual.proj_bias"] == "visual.head.bias"
    assert set(report["ignored"]) == {"visual.null_group"}
    meta = converted_metadata(out)
    assert meta["model"] == NAME
    assert meta["drip_cfg"] == {**REFERENCE_FLAGS, "predictor_hidden_mult": 2, "proj_bias": True}
    assert meta["drip_cfg"]["ln_pre"] is False
    assert json.loads(meta["missing"]) == [] and json.loads(meta["unmapped"]) == []

    # the project's loaders, strictly: by name with the flags, load_checkpoint, load_converted
    model, _, _ = create_model_and_transforms(NAME, pretrained=str(out), **meta["drip_cfg"])
    load_checkpoint(create_model(NAME, **meta["drip_cfg"]), out, strict=True)
    again = load_converted(out).eval()
    assert again.visual.ln_pre is None and torch.equal(again.visual.proj_bias, sd["visual.head.bias"])
    model.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.encode_image(img), again.encode_image(img)
    assert a.shape == (2, 128) and torch.isfinite(a).all() and torch.allclose(a, b)
    # the flags matter: the defaults want ln_pre and ln_short and have no proj_bias; the error says so
    with pytest.raises(RuntimeError, match="(?s)missing.*unexpected.*ln_pre=False, proj_bias=True, shared_norm=True"):
        create_model(NAME, pretrained=str(out))


def test_weights_land_in_place():
    _, sd = _reference_clip()
    sd["visual.patch_embed.proj.bias"] = torch.randn(128)
    out, report = convert_state_dict(sd, NAME)  # no allow_unmapped: nothing is left over
    def v(k):
        return sd["visual." + k]
    assert torch.equal(out["visual.conv1.weight"], v("patch_embed.proj.weight"))
    assert torch.equal(out["visual.class_embedding"], v("cls_token")[0, 0])
    assert torch.equal(out["visual.positional_embedding"][0], v("pos_embed")[0, 0])
    assert torch.allclose(out["visual.positional_embedding"][1:], v("pos_embed")[0, 1:] + v("patch_embed.proj.bias"))
    assert torch.equal(out["visual.pre_blocks.1.ln_1.weight"], v("pre_blocks.1.norm1.weight"))
    assert torch.equal(out["visual.pre_blocks.0.attn.in_proj_weight"], v("pre_blocks.0.attn.in_proj_weight"))
    assert torch.equal(out["visual.post_blocks.3.mlp.c_proj.weight"], v("shorten_blocks.3.mlp.3.weight"))
    assert torch.equal(out["visual.post_blocks.0.mlp.c_fc.bias"], v("shorten_blocks.0.mlp.0.bias"))
    assert torch.equal(out["visual.post_blocks.2.ln_2.bias"], v("shorten_blocks.2.norm2.bias"))
    assert torch.equal(out["visual.boundary_predictor.fc1.weight"], v("boundary_predictor.boundary_predictor.0.weight"))
    assert torch.equal(out["visual.boundary_predictor.fc2.bias"], v("boundary_predictor.boundary_predictor.2.bias"))
    assert torch.equal(out["visual.ln_post.weight"], v("norm.weight"))
    assert torch.equal(out["visual.proj"], v("head.weight").t())
    assert torch.equal(out["visual.proj_bias"], v("head.bias")) and v("head.bias").abs().sum() > 0
    for k in ("token_embedding.weight", "transformer.resblocks.1.mlp.c_fc.weight", "text_projection", "logit_scale"):
        assert torch.equal(out[k], sd[k])
    assert not any(k.startswith(("visual.ln_pre.", "visual.ln_short.")) for k in out)  # ln_pre=False, shared_norm
    assert report.drip_cfg["ln_pre"] is False and report.drip_cfg["proj_bias"] is True
    assert torch.isnan(out["visual.calib_quantiles"]).all()  # uncalibrated
    assert report.mapped["visual.proj"] == "visual.head.weight"
    assert report.missing == {} and report.unmapped == {} and set(report.new) == {
        "visual.calib_quantiles", "visual.calib_target"}
    # every reference tensor is accounted for, every key of ours comes from the checkpoint
    sources = {part for src in report.mapped.values() for part in src.split(" + ")}
    assert set(sd) == sources | set(report.ignored)
    assert set(out) == set(report.mapped) | set(report.new)


def test_head_bias_zero_or_absent():
    _, sd = _reference_clip(zero_head_bias=True)
    out, report = convert_state_dict(sd, NAME)  # a zero bias is still the reference's head: kept
    assert report.drip_cfg["proj_bias"] is True and not out["visual.proj_bias"].any()
    del sd["visual.head.bias"]  # a head without bias maps onto the plain proj
    out, report = convert_state_dict(sd, NAME)
    assert report.drip_cfg["proj_bias"] is False and "visual.proj_bias" not in out
    assert report.missing == {} and report.unmapped == {}


def test_converted_model_computes_the_reference_forward(tmp_path):
    """Converted, written, read back by load_converted, and run as it is (nothing stripped): the model
    gives the reference's image embedding (head bias included), its CLIP image features and its tokens
    for the same boundaries (no ln_pre, padding, the dropped tail, the shared norm and the plain mean)."""
    ref, sd = _reference_clip(seed=1)
    with torch.no_grad():
        ref.patch_embed.proj.bias.normal_(0, 0.5)
        ref.head.bias.normal_(0, 0.5)
    sd["visual.patch_embed.proj.bias"] = ref.patch_embed.proj.bias.detach().clone()
    sd["visual.head.bias"] = ref.head.bias.detach().clone()
    ckpt, path = tmp_path / "epoch_10.pt", tmp_path / "model.safetensors"
    _save_train_ckpt(sd, ckpt)
    report = convert_reference(ckpt, NAME, path)
    assert report.missing == {} and report.unmapped == {}
    model = load_converted(path).eval()
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 3, 64, 64, generator=g)
    b = (torch.rand(3, 64, generator=g) < torch.tensor([[0.1], [0.3], [0.05]])).float()
    b[1, -1] = 1.0  # image 1 closes on its last patch; the max-K image loses its tail
    assert len(set(b.sum(1).tolist())) == 3  # different counts: pads in the batch
    model.visual.boundary_override = b
    with torch.no_grad():
        theirs = ref(img, b)
        theirs_tokens = ref.features(img, b)
        ours = model.visual(img)
        clip_ours = model.encode_image(img, normalize=True)
        out = model(img)
        tokens = model.visual.encode_tokens(img, drop_cls=False)
        feats = model.visual.forward_features(img)
    assert ref.head.bias.abs().max() > 0.1  # the bias matters at this tolerance
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.allclose(clip_ours, F.normalize(theirs, dim=-1), atol=1e-5)
    assert torch.allclose(out["image_features"], F.normalize(theirs, dim=-1), atol=1e-5)
    # LLaVA's tokens: the reference's rows after its final norm, its pad (empty-group) rows removed
    assert feats.hidden.shape == theirs_tokens.shape
    assert torch.allclose(feats.hidden, theirs_tokens, atol=1e-5)
    s = theirs_tokens.shape[1] - 1
    sigma = b.cumsum(1) - b
    filled = (sigma.unsqueeze(-1) == torch.arange(s)).any(1)  # [B, S]: groups holding a patch
    rows = torch.cat([torch.ones(3, 1, dtype=torch.bool), filled], 1)
    assert not rows.all()  # pads present
    assert torch.equal(feats.valid, rows)
    for i, t in enumerate(tokens):
        assert torch.allclose(t, theirs_tokens[i][rows[i]], atol=1e-5)


def test_unmapped_or_missing_keys_are_reported_and_refused():
    _, sd = _reference_clip()
    sd["visual.extra_adapter.weight"] = torch.zeros(3)
    del sd["ln_final.weight"]  # a text-side key the model needs
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, NAME)
    msg = str(e.value)
    assert "visual.extra_adapter.weight" in msg and "ln_final.weight" in msg and "--allow-unmapped" in msg
    assert "head.bias" not in msg and "ln_pre" not in msg
    assert set(e.value.report.unmapped) == {"visual.extra_adapter.weight"}
    assert set(e.value.report.missing) == {"ln_final.weight"}
    out, report = convert_state_dict(sd, NAME, allow_unmapped=True)
    assert set(report.unmapped) == {"visual.extra_adapter.weight"} and set(report.missing) == {"ln_final.weight"}
    assert not any("extra_adapter" in k for k in out) and "ln_final.weight" in out  # fresh initialisation
    assert any("differ from the reference" in n for n in report.notes)


def test_shape_and_depth_mismatches_are_hard_errors():
    _, sd = _reference_clip(depth=(3, 3))
    with pytest.raises(ConversionError, match=r"3 pre \+ 3 shorten blocks, DRIP-4x-tiny has 2 \+ 4"):
        convert_state_dict(sd, NAME, allow_unmapped=True)
    xl = dict(sd, **{"visual.shorten_blocks.0.attn.qkv_net.weight": torch.zeros(384, 128)})
    with pytest.raises(ConversionError, match="Transformer-XL"):
        convert_state_dict(xl, NAME, allow_unmapped=True)
    _, sd = _reference_clip(image=32)
    with pytest.raises(ConversionError, match="(?s)shape mismatch.*positional_embedding"):
        convert_state_dict(sd, NAME, allow_unmapped=True)


def test_predictor_width_is_read_from_the_weights():
    _, sd = _reference_clip(mult=4)  # later reference versions use D -> 4D
    out, report = convert_state_dict(sd, NAME)
    assert report.drip_cfg["predictor_hidden_mult"] == 4
    assert out["visual.boundary_predictor.fc1.weight"].shape == (512, 128)


class _NotAWeight:
    pass


def test_checkpoint_reading(tmp_path):
    _, sd = _reference_clip()
    bad = tmp_path / "pickled.pt"
    torch.save({"state_dict": sd, "args": _NotAWeight()}, bad)
    with pytest.raises(ConversionError, match="weights_only=True"):
        read_reference_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        read_reference_checkpoint(tmp_path / "nope.pt")
    for i, wrapped in enumerate([sd, {"model": sd}, {"state_dict": {"module.module." + k: v for k, v in sd.items()}}]):
        torch.save(wrapped, tmp_path / f"{i}.pt")
        got = read_reference_checkpoint(tmp_path / f"{i}.pt")
        assert set(got) == set(sd) and torch.equal(got["visual.cls_token"], sd["visual.cls_token"])
    assert issubclass(ConversionError, ValueError)


def test_tower_only_checkpoint(tmp_path):
    ref, _ = _reference_clip()
    ckpt, out = tmp_path / "tower.pt", tmp_path / "tower.safetensors"
    torch.save(ref.state_dict(), ckpt)
    r = _cli(ckpt, "--model", NAME, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "image tower only" in r.stdout and "WARNING" not in r.stdout + r.stderr
    meta = converted_metadata(out)
    assert meta["kind"] == "tower"
    model = load_converted(out).eval()
    assert torch.equal(model.visual.conv1.weight, ref.patch_embed.proj.weight)
    assert torch.equal(model.visual.proj_bias, ref.head.bias) and model.visual.ln_pre is None
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(1, 3, 64, 64))).all()


def test_command_list_aligns_to_the_longest_name():
    from llava_drip import cli
    lines = [l for l in cli._usage().splitlines() if l.startswith("  ")]
    assert len(lines) == len(cli.COMMANDS)
    width = max(map(len, cli.COMMANDS))
    for line, (name, (_, help_)) in zip(lines, cli.COMMANDS.items()):
        assert line == f"  {name.ljust(width)}  {help_}"
    assert "  convert-reference  reference DRIP" in cli._usage()


@pytest.mark.parametrize("name,prior", [("DRIP-4x-32-4+8", 0.25), ("DRIP-10x-32-4+8", 0.1),
                                        ("DRIP-4x-16-4+8", 0.25), ("DRIP-10x-16-4+8", 0.1)])
def test_four_pre_block_configs(name, prior):
    assert name in list_models()
    cfg = get_model_config(name)
    assert cfg["drip_cfg"] == {"prior": prior, "pre_layers": 4, "post_layers": 8}
    tower = create_model(name).visual
    assert (len(tower.pre_blocks), len(tower.post_blocks)) == (4, 8)
    assert tower.width == 768 and tower.num_patches == (224 // cfg["vision_cfg"]["patch_size"]) ** 2


def test_four_pre_block_flops_match_the_reference_table():
    """Spec 7.2: the reference's interval-simulation GFLOPs for its v1 4+8 towers (8.820 and 7.144)."""
    from llava_drip.inspect import flops
    for name, published in (("DRIP-4x-16-4+8", 8.820), ("DRIP-10x-16-4+8", 7.144)):
        r = flops.count_model(name, seed=True)
        assert abs(r["seed_compat_gflops"] - published) < 0.005, (name, r["seed_compat_gflops"])
        assert abs(r["gflops"] - r["analytic_gflops"]) <= 0.01 * r["analytic_gflops"]


def test_converted_checkpoint_is_a_llava_tower(tmp_path):
    """--vision_tower_pretrained CONVERTED: LLaVA's tower takes the checkpoint's flags, loads it strictly, gives
    the converted model's tokens, and a saved LLaVA config rebuilds the same tower."""
    from types import SimpleNamespace
    from llava_drip.model.multimodal_encoder.builder import build_vision_tower
    from llava_drip.model.multimodal_encoder.towers import checkpoint_drip_flags
    _, sd = _reference_clip()
    ckpt, out = tmp_path / "epoch_10.pt", tmp_path / "model.safetensors"
    _save_train_ckpt(sd, ckpt)
    assert _cli(ckpt, "--model", NAME, "--out", out).returncode == 0
    flags = checkpoint_drip_flags(str(out))
    assert flags["ln_pre"] is False and flags["proj_bias"] is True and "eval_mode" not in flags
    cfg = SimpleNamespace(mm_vision_tower=NAME, mm_vision_tower_type="drip", mm_vision_tower_pretrained=str(out),
                          mm_vision_select_layer=-1, mm_vision_select_feature="patch", mm_drip_eval_mode="topk",
                          mm_drip_budget=None, mm_drip_arch=flags)
    tower = build_vision_tower(cfg, load_weights=True)  # strict load
    ref = load_converted(out, eval_mode="topk").eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = tower.vision_tower.encode_tokens(img)
        want = ref.visual.encode_tokens(img)
    assert len(got) == len(want) and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    rebuilt = build_vision_tower(cfg, load_weights=False)  # as from_pretrained builds it before loading weights
    assert set(rebuilt.state_dict()) == set(tower.state_dict())
    assert checkpoint_drip_flags(str(ckpt)) is None  # a plain torch checkpoint carries none
