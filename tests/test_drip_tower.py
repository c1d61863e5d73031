"""The DRIP tower: construction, gradients, batch invariance, reference parity, edge cases, training."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from llava_drip.drip import (binomial_prior_loss, create_model, create_model_and_transforms, get_tokenizer,
                             group_mean_pool, init_from_vit, is_drip, list_models)

TINY = [n for n in list_models() if n.endswith("-tiny")]
FULL = [n for n in list_models() if not n.endswith("-tiny")]


def _batch(model_name, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = 64 if model_name.endswith("tiny") else 224
    return torch.randn(b, 3, size, size, generator=g)


def test_registry_lists_issue_names():
    names = set(list_models())
    for n in ["ViT-B-32", "ViT-B-16", "DRIP-2x-32", "DRIP-4x-32", "DRIP-10x-32", "DRIP-2x-16", "DRIP-4x-16",
              "DRIP-10x-16", "DRIP-2x-32-2+11", "DRIP-4x-32-2+12", "DRIP-4x-32-2+16", "DRIP-4x-32-2+18",
              "DRIP-4x-32-2+20", "DRIP-10x-32-2+24", "ViT-tiny", "DRIP-2x-tiny", "DRIP-4x-tiny", "DRIP-10x-tiny"]:
        assert n in names
    with pytest.raises(RuntimeError, match="Available"):
        create_model("DRIP-3x-nope")


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name)
    tok = get_tokenizer(name)
    out = model(_batch(name), tok(["a red circle", "two blue stars", "a green square", "a star"]))
    loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    if is_drip(name):
        loss = loss + out["boundary_loss"]
        assert 0.0 <= float(out["boundary_ratio"]) <= 1.0
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", FULL)
def test_full_size_eval_forward(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        feats = model.encode_image(_batch(name, b=2), normalize=True)
    assert feats.shape == (2, 512)
    assert torch.isfinite(feats).all()


def test_create_model_and_transforms_matches_open_clip_shape():
    model, pre_train, pre_val = create_model_and_transforms("DRIP-4x-tiny")
    from PIL import Image
    img = Image.new("RGB", (100, 80), (200, 10, 10))
    assert pre_val(img).shape == (3, 64, 64)
    assert pre_train(img).shape == (3, 64, 64)
    model.eval()
    e = model.encode_image(pre_val(img)[None], normalize=True)
    assert torch.allclose(e.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_gradients_reach_predictor_from_each_loss():
    torch.manual_seed(0)
    model = create_model("DRIP-4x-tiny")
    tok = get_tokenizer("DRIP-4x-tiny")
    images, texts = _batch("DRIP-4x-tiny"), tok(["a", "b", "c", "d"])
    pred = model.visual.boundary_predictor.fc1.weight

    out = model(images, texts)
    open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0, "contrastive loss must reach the predictor"

    model.zero_grad(set_to_none=True)
    out = model(images, texts)
    out["boundary_loss"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0, "prior loss must reach the predictor"


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_batch_invariance(mode):
    torch.manual_seed(0)
    model = create_model("DRIP-4x-tiny", eval_mode=mode).eval()
    # make the predictor produce varied group counts per image
    with torch.no_grad():
        model.visual.boundary_predictor.fc2.bias.fill_(0.3)
    images = _batch("DRIP-4x-tiny", b=5, seed=1)
    with torch.no_grad():
        together = model.encode_image(images)
        toks_together = model.visual.encode_tokens(images)
        counts = {t.shape[0] for t in toks_together}
        for i in range(images.shape[0]):
            alone = model.encode_image(images[i:i + 1])
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)
            tok_alone = model.visual.encode_tokens(images[i:i + 1])[0]
            torch.testing.assert_close(tok_alone, toks_together[i], atol=1e-5, rtol=1e-5)
    if mode == "threshold":
        assert len(counts) > 1, "test needs images with different group counts"


def _dtp_downsample(boundaries, hidden):
    """The reference (DTP / DRIP v1) downsample, written from the spec: time-major hidden [L, B, D],
    S = max K, null group prepended then dropped."""
    b = boundaries
    n_segments = int(b.sum(-1).max().item())
    if n_segments == 0:
        return hidden.new_zeros(0, hidden.shape[1], hidden.shape[2])
    seg = torch.arange(n_segments).view(1, 1, -1)
    c = (b.cumsum(-1) - b).unsqueeze(-1)  # [B, L, 1] exclusive count
    foo = seg - c  # [B, L, S]
    final = (1 - foo) * (foo == 0)
    final = final / (final.sum(dim=1, keepdim=True) + 1e-9)
    return torch.einsum("lbd,bls->sbd", hidden, final)  # [S, B, D]


def test_pooling_matches_reference_tail_drop_example():
    # the spec's example: image 0 loses token 5, image 1 keeps its tail as its second group
    b = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    h = torch.randn(2, 6, 3)
    pooled = group_mean_pool(h, b, cover_tail=False)
    assert pooled.groups.shape == (2, 2, 3)
    torch.testing.assert_close(pooled.groups[0, 0], h[0, 0:2].mean(0))
    torch.testing.assert_close(pooled.groups[0, 1], h[0, 2:5].mean(0))
    torch.testing.assert_close(pooled.groups[1, 0], h[1, 0:3].mean(0))
    torch.testing.assert_close(pooled.groups[1, 1], h[1, 3:6].mean(0))
    ref = _dtp_downsample(b, h.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(pooled.groups, ref)
    # recommended default covers the tail: image 0 gets a third group {5}, image 1 a zero pad row
    cov = group_mean_pool(h, b, cover_tail=True)
    assert cov.groups.shape == (2, 3, 3)
    torch.testing.assert_close(cov.groups[0, 2], h[0, 5])
    assert cov.valid.tolist() == [[True, True, True], [True, True, False]]
    assert torch.all(cov.groups[1, 2] == 0)


@pytest.mark.parametrize("seed", range(5))
def test_pooling_matches_reference_random_patterns(seed):
    g = torch.Generator().manual_seed(seed)
    b = (torch.rand(4, 16, generator=g) < 0.3).float()
    b[0] = 0  # one image with no boundary at all
    h = torch.randn(4, 16, 8, generator=g)
    ref = _dtp_downsample(b, h.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(group_mean_pool(h, b, cover_tail=False).groups, ref)


def test_reference_parity_flags_in_tower():
    """pad_mask off + plain mean: padded rows take part, as in v1; the default masks them."""
    torch.manual_seed(0)
    ref = create_model("DRIP-4x-tiny", pad_mask=False, reference_mean=True, cover_tail=False).eval()
    x = _batch("DRIP-4x-tiny", b=2)
    # image 0: 3 boundaries, image 1: 1 boundary -> image 1 has padded slots in the reference
    pattern = torch.zeros(2, 64)
    pattern[0, [10, 20, 30]] = 1
    pattern[1, [40]] = 1
    ref.visual.boundary_override = pattern
    with torch.no_grad():
        feats = ref.visual.forward_features(x)
    assert feats.hidden.shape[1] == 1 + 3
    assert feats.valid[1].tolist() == [True, True, True, False]
    with torch.no_grad():
        emb = ref.visual(x)
        manual = feats.hidden.mean(dim=1) @ ref.visual.proj  # plain mean over CLS + all slots
    torch.testing.assert_close(emb, manual)
    # image 0 has K == S: the reference drops its tail tokens 31..63; group 3 mean covers 21..30
    with torch.no_grad():
        h = ref.visual.forward_pre(x)[:, 1:]
    torch.testing.assert_close(group_mean_pool(h, pattern, cover_tail=False).groups[0, 2], h[0, 21:31].mean(0))


def test_edge_cases_no_and_all_boundaries_and_batch_of_one():
    torch.manual_seed(0)
    model = create_model("DRIP-4x-tiny").eval()
    x = _batch("DRIP-4x-tiny", b=1)
    with torch.no_grad():
        h = model.visual.forward_pre(x)[:, 1:]
        model.visual.boundary_override = torch.zeros(1, 64)
        toks = model.visual.encode_tokens(x)
        assert toks[0].shape[0] == 1  # one group: the mean of all patches
        pooled = group_mean_pool(h, torch.zeros(1, 64))
        torch.testing.assert_close(pooled.groups[0, 0], h[0].mean(0))
        model.visual.boundary_override = torch.ones(1, 64)
        toks = model.visual.encode_tokens(x)
        assert toks[0].shape[0] == 64  # every patch its own group
        pooled = group_mean_pool(h, torch.ones(1, 64))
        torch.testing.assert_close(pooled.groups[0], h[0])
        model.visual.boundary_override = None
        assert torch.isfinite(model.encode_image(x)).all()
    # the reference semantics with no boundary anywhere leave only CLS
    ref = create_model("DRIP-4x-tiny", cover_tail=False, pad_mask=False, reference_mean=True).eval()
    ref.visual.boundary_override = torch.zeros(1, 64)
    with torch.no_grad():
        assert ref.visual.forward_features(x).hidden.shape[1] == 1
        assert torch.isfinite(ref.encode_image(x)).all()


def test_wrong_input_size_is_a_clear_error():
    model = create_model("DRIP-4x-tiny")
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 3, 64, 64\], got \[2, 3, 32, 32\]"):
        model.encode_image(torch.randn(2, 3, 32, 32))


def test_select_layer_and_pool_types():
    torch.manual_seed(0)
    x = _batch("DRIP-4x-tiny", b=2)
    for pool in ("mean_incl_cls", "mean_excl_cls", "cls", "last"):
        m = create_model("DRIP-4x-tiny", pool_type=pool).eval()
        with torch.no_grad():
            assert m.encode_image(x).shape == (2, 128)
    m = create_model("DRIP-4x-tiny").eval()
    last = m.visual.encode_tokens(x, select_layer=-1)
    penult = m.visual.encode_tokens(x, select_layer=-2)
    with_cls = m.visual.encode_tokens(x, drop_cls=False)
    assert [t.shape for t in last] == [t.shape for t in penult]
    assert [t.shape[0] + 1 for t in last] == [t.shape[0] for t in with_cls]
    assert not torch.allclose(last[0], penult[0])
    with pytest.raises(ValueError, match="select_layer"):
        m.visual.encode_tokens(x, select_layer=-9)
    with pytest.raises(ValueError, match="pool_type"):
        create_model("DRIP-4x-tiny", pool_type="max")


def test_prior_loss_values_match_binomial():
    # spec 6: N=49, p=0.25
    for k, expected in [(0, 0.288), (12, 0.042), (49, 1.386)]:
        b = torch.zeros(1, 49)
        b[0, :k] = 1
        assert abs(float(binomial_prior_loss(b, 0.25)) - expected) < 1e-3
    b = torch.zeros(2, 49)
    b[:, :12] = 1
    ref = -torch.distributions.Binomial(49, probs=torch.tensor(0.25)).log_prob(b.sum(1)).mean() / 49
    torch.testing.assert_close(binomial_prior_loss(b, 0.25), ref)


def _train_steps(model, steps, lr, autocast_dtype=None, seed=0, batch=8):
    torch.manual_seed(seed)
    tok = get_tokenizer("DRIP-4x-tiny")
    texts = tok([f"shape {i}" for i in range(batch)])
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, 64, 64, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    clip_loss = open_clip.ClipLoss()
    ratios, losses = [], []
    for _ in range(steps):
        images = base + 0.1 * torch.randn(base.shape, generator=g)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(images, texts)
            loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"]) + out["boundary_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        ratios.append(float(out["boundary_ratio"]))
    return losses, ratios


@pytest.mark.slow
def test_tiny_drip4x_learns_target_ratio():
    model = create_model("DRIP-4x-tiny")
    losses, ratios = _train_steps(model, steps=300, lr=1e-3)
    final = sum(ratios[-30:]) / 30
    assert abs(final - 0.25) < 0.05, f"realised ratio {final:.3f} after 300 steps"
    assert ratios[0] > 0.4  # starts near pi = 0.5 (pitfall P14), so the prior did the work


@pytest.mark.slow
def test_no_nan_under_bf16_autocast_at_10x_lr():
    model = create_model("DRIP-4x-tiny")
    # open_clip_train's default lr is 5e-4; bf16 matmuls are slow on CPU, hence the small batch
    losses, ratios = _train_steps(model, steps=200, lr=5e-3, autocast_dtype=torch.bfloat16, batch=4)
    assert all(math.isfinite(l) for l in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_from_vit_matches_pre_pooling_activations():
    torch.manual_seed(0)
    vit = open_clip.create_model("ViT-tiny").eval()
    drip = create_model("DRIP-4x-tiny").eval()
    report = init_from_vit(drip, vit)
    assert report["unused"] == []
    # new: the predictor, ln_short and the (uncalibrated) calibration buffers
    assert {k.split(".")[1] for k in report["new"]} == {"boundary_predictor", "ln_short", "calib_quantiles", "calib_target"}
    assert "visual.pre_blocks.1.attn.in_proj_weight" in report["mapped"]
    assert "visual.post_blocks.3.mlp.c_proj.weight" in report["mapped"]
    captured = {}
    vit.visual.transformer.resblocks[1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    x = _batch("ViT-tiny", b=3)
    with torch.no_grad():
        vit.encode_image(x)
        ours = drip.visual.forward_pre(x)
    torch.testing.assert_close(ours, captured["x"], atol=1e-5, rtol=1e-5)


def test_init_from_vit_refuses_shape_mismatch():
    vit = open_clip.create_model("ViT-tiny")
    drip = create_model("DRIP-4x-32")
    with pytest.raises(ValueError, match="shape mismatch"):
        init_from_vit(drip, vit)


def test_strict_checkpoint_loading(tmp_path):
    from safetensors.torch import save_file
    from llava_drip.drip import load_checkpoint
    model = create_model("DRIP-4x-tiny")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "ok.safetensors")
    model2 = create_model("DRIP-4x-tiny", pretrained=str(tmp_path / "ok.safetensors"))
    torch.testing.assert_close(model2.state_dict()["visual.proj"], sd["visual.proj"])
    del sd["visual.proj"]
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(RuntimeError, match="1 missing keys.*visual.proj.*1 unexpected keys.*extra.weight"):
        load_checkpoint(model, tmp_path / "bad.safetensors")
    res = load_checkpoint(model, tmp_path / "bad.safetensors", strict=False)
    assert res.missing_keys == ["visual.proj"]


# ---- ln_pre / proj_bias: the reference's layout as options, off by default ------------------------------
_TOP_KEYS = ["class_embedding", "positional_embedding", "proj", "calib_quantiles", "calib_target", "conv1.weight",
             "ln_pre.weight", "ln_pre.bias", "boundary_predictor.fc1.weight", "boundary_predictor.fc1.bias",
             "boundary_predictor.fc2.weight", "boundary_predictor.fc2.bias", "ln_short.weight", "ln_short.bias",
             "ln_post.weight", "ln_post.bias"]
_BLOCK_KEYS = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
               "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias"]


def _tower_keys(pre=2, post=4):
    blocks = [f"{s}.{i}.{k}" for s, n in (("pre_blocks", pre), ("post_blocks", post)) for i in range(n)
              for k in _BLOCK_KEYS]
    return set(_TOP_KEYS) | set(blocks)


def test_default_keys_unchanged_and_layout_options_change_only_their_own():
    default = create_model("DRIP-4x-tiny")
    assert set(default.visual.state_dict()) == _tower_keys()  # the key set every saved checkpoint has
    assert default.visual.ln_pre is not None and default.visual.proj_bias is None
    assert set(create_model("DRIP-4x-32").visual.state_dict()) == _tower_keys(2, 10)
    no_ln = create_model("DRIP-4x-tiny", ln_pre=False).visual
    assert no_ln.ln_pre is None and not any("ln_pre" in n for n, _ in no_ln.named_modules())
    assert set(no_ln.state_dict()) == _tower_keys() - {"ln_pre.weight", "ln_pre.bias"}
    biased = create_model("DRIP-4x-tiny", proj_bias=True)
    assert set(biased.visual.state_dict()) == _tower_keys() | {"proj_bias"}
    assert biased.visual.proj_bias.shape == (128,) and not biased.visual.proj_bias.any()  # starts at zero
    both = create_model("DRIP-4x-tiny", ln_pre=False, proj_bias=True, shared_norm=True).visual
    assert set(both.state_dict()) == (_tower_keys() | {"proj_bias"}) - {
        "ln_pre.weight", "ln_pre.bias", "ln_short.weight", "ln_short.bias"}
    # the text side is untouched
    text = {k for k in default.state_dict() if not k.startswith("visual.")}
    assert text == {k for k in biased.state_dict() if not k.startswith("visual.")}


def test_layout_options_round_trip_and_load_strictly(tmp_path):
    from safetensors.torch import save_file
    from llava_drip.drip import load_checkpoint
    torch.manual_seed(0)
    model = create_model("DRIP-4x-tiny", ln_pre=False, proj_bias=True)
    with torch.no_grad():
        model.visual.proj_bias.normal_()
    path = tmp_path / "layout.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    again = create_model("DRIP-4x-tiny", pretrained=str(path), ln_pre=False, proj_bias=True)
    torch.testing.assert_close(again.visual.proj_bias, model.visual.proj_bias, rtol=0, atol=0)
    # without the flags a strict load refuses, names both keys and says which flags fit
    with pytest.raises(RuntimeError, match=r"(?s)missing.*ln_pre.*unexpected.*proj_bias.*ln_pre=False, proj_bias=True"):
        create_model("DRIP-4x-tiny", pretrained=str(path))
    default_path = tmp_path / "default.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("DRIP-4x-tiny").state_dict().items()}, default_path)
    with pytest.raises(RuntimeError, match=r"(?s)missing.*proj_bias.*unexpected.*ln_pre.*ln_pre=True, proj_bias=False"):
        load_checkpoint(create_model("DRIP-4x-tiny", ln_pre=False, proj_bias=True), default_path)


@pytest.mark.parametrize("impl", ["padded", "packed"])
def test_layout_options_reach_every_output(impl):
    """ln_pre=False is the default tower with its ln_pre taken out, on the tokens LLaVA reads and on the
    embedding; proj_bias is added after `@ proj`, before the normalisation, and only there."""
    torch.manual_seed(0)
    base = create_model("DRIP-4x-tiny", attn_impl=impl, eval_mode="topk").eval()
    opt = create_model("DRIP-4x-tiny", attn_impl=impl, eval_mode="topk", ln_pre=False, proj_bias=True).eval()
    sd = {k: v for k, v in base.state_dict().items() if ".ln_pre." not in k}
    opt.load_state_dict({**sd, "visual.proj_bias": torch.randn(128)}, strict=True)
    bias = opt.visual.proj_bias.detach()
    base.visual.ln_pre = torch.nn.Identity()  # the only difference left
    assert opt.visual.uses_packed == (impl == "packed")
    x = _batch("DRIP-4x-tiny", b=3)
    with torch.no_grad():
        torch.testing.assert_close(opt.visual.embed(x), base.visual.embed(x))
        for layer in (-1, -2):
            ours, theirs = (m.visual.encode_tokens(x, select_layer=layer) for m in (opt, base))
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        raw, raw_base = opt.visual(x), base.visual(x)
        torch.testing.assert_close(raw, raw_base + bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(opt.encode_image(x, normalize=True), F.normalize(raw_base + bias, dim=-1),
                                   atol=1e-5, rtol=1e-5)
        out = opt(x)
        torch.testing.assert_close(out["image_features"], F.normalize(raw_base + bias, dim=-1), atol=1e-5, rtol=1e-5)
    # a true ln_pre is not the identity LayerNorm: the option really removes the normalisation
    with torch.no_grad():
        plain = create_model("DRIP-4x-tiny", attn_impl=impl).eval()
        plain.load_state_dict({**base.state_dict(), "visual.ln_pre.weight": torch.ones(128),
                               "visual.ln_pre.bias": torch.zeros(128)}, strict=True)
        assert not torch.allclose(plain.visual.embed(x), opt.visual.embed(x), atol=1e-3)
    # trained like every other parameter
    opt.train()
    opt.visual(x).sum().backward()
    assert opt.visual.proj_bias.grad is not None and torch.allclose(opt.visual.proj_bias.grad, torch.full((128,), 3.0))


def test_flops_without_ln_pre():
    from llava_drip.inspect import flops
    full = flops.count_model("DRIP-4x-tiny")
    lean = flops.count_model("DRIP-4x-tiny", ln_pre=False, proj_bias=True)
    ln_pre = flops.LN_FLOPS_PER_ELEMENT * 65 * 128  # 1 + N rows of width 128
    assert abs((full["gflops"] - lean["gflops"]) * 1e9 - ln_pre) < 1
    assert abs((full["analytic_gflops"] - lean["analytic_gflops"]) * 1e9 - ln_pre) < 1
    assert abs(lean["gflops"] - lean["analytic_gflops"]) <= 0.01 * lean["analytic_gflops"]
