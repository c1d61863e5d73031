"""The packed post-pooling path ([sum G, D] rows, attention per image) against the padded one."""
import pytest
import torch

from llava_drip.drip import create_model, group_mean_pool
from llava_drip.drip.boundary import sample_boundaries
from llava_drip.drip.pooling import pack_groups


def _model(impl="padded", **kw):
    torch.manual_seed(0)
    m = create_model("DRIP-4x-tiny", attn_impl=impl, **kw).eval()
    with torch.no_grad():  # a predictor that gives each image a different group count
        m.visual.boundary_predictor.fc2.bias.fill_(-0.2)
    return m


def _images(b=6, seed=1):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _run(m, impl, x, **kw):
    m.visual.attn_impl = impl
    with torch.no_grad():
        return (m.visual.forward_features(x, **kw), m.visual.encode_tokens(x, **{k: v for k, v in kw.items()
                                                                                  if k == "select_layer"}),
                m.encode_image(x))


@pytest.mark.parametrize("cover_tail", [True, False])
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_packed_matches_padded(cover_tail, select_layer):
    m = _model(cover_tail=cover_tail)
    x = _images()
    fa, ta, ea = _run(m, "padded", x, select_layer=select_layer)
    fb, tb, eb = _run(m, "packed", x, select_layer=select_layer)
    assert len(set(fa.num_groups.tolist())) > 1, "test needs varied group counts"
    assert fa.hidden.shape == fb.hidden.shape and torch.equal(fa.valid, fb.valid)
    keep = fa.valid.unsqueeze(-1)
    torch.testing.assert_close(fa.hidden * keep, fb.hidden * keep, atol=1e-5, rtol=1e-5)
    assert [t.shape for t in ta] == [t.shape for t in tb]
    for a, b in zip(ta, tb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ea, eb, atol=1e-5, rtol=1e-5)


def test_packed_batch_invariant_and_auto():
    m = _model("auto")
    assert m.visual.uses_packed
    x = _images(4)
    with torch.no_grad():
        together = m.visual.encode_tokens(x)
        for i in range(4):
            torch.testing.assert_close(m.visual.encode_tokens(x[i:i + 1])[0], together[i], atol=1e-5, rtol=1e-5)
    ref = create_model("DRIP-4x-tiny", attn_impl="auto", pad_mask=False, reference_mean=True)
    assert not ref.visual.uses_packed  # reference semantics need the pad rows: auto falls back
    with pytest.raises(ValueError, match="packed"):
        create_model("DRIP-4x-tiny", attn_impl="packed", pad_mask=False)
    with pytest.raises(ValueError, match="attn_impl"):
        create_model("DRIP-4x-tiny", attn_impl="nested")


def test_packed_training_gradients_match_padded():
    torch.manual_seed(0)
    m = create_model("DRIP-4x-tiny").train()
    x = _images(4)
    grads = {}
    for impl in ("padded", "packed"):
        m.visual.attn_impl = impl
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # same sampled boundaries for both
        emb, feats = m.visual.forward_with_aux(x)
        (emb.square().sum() + feats.boundary_loss).backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.visual.named_parameters() if p.grad is not None}
    assert grads["padded"].keys() == grads["packed"].keys()
    pred = grads["packed"]["boundary_predictor.fc1.weight"]
    assert pred.abs().sum() > 0
    for k, g in grads["padded"].items():
        torch.testing.assert_close(grads["packed"][k], g, atol=1e-5, rtol=1e-3, msg=k)


def test_packed_with_grad_checkpointing_and_edge_patterns():
    m = _model("packed")
    m.train()
    m.visual.set_grad_checkpointing(True)
    emb, feats = m.visual.forward_with_aux(_images(3))
    emb.sum().backward()
    assert m.visual.post_blocks[0].mlp.c_fc.weight.grad is not None
    m.eval()
    x = _images(2)
    for pattern, groups in ((torch.zeros(2, 64), 1), (torch.ones(2, 64), 64)):
        m.visual.boundary_override = pattern
        with torch.no_grad():
            toks = m.visual.encode_tokens(x)
        assert [t.shape[0] for t in toks] == [groups, groups]
    m.visual.boundary_override = None


@pytest.mark.parametrize("cover_tail", [True, False])
def test_pack_groups_equals_group_mean_pool_with_straight_through_values(cover_tail):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 40, 8, generator=g)
    probs = torch.rand(5, 40, generator=g).clamp(0.05, 0.95)
    b = sample_boundaries(probs, 0.5, g)  # hard + soft - soft: values can sit an ulp off 0/1
    cls = torch.randn(5, 8, generator=g)
    pad = group_mean_pool(h, b, cover_tail=cover_tail)
    packed = pack_groups(cls, h, b, cover_tail=cover_tail)
    grid = packed.to_padded(packed.tokens)
    assert torch.equal(packed.attend[:, 1:], pad.valid)
    torch.testing.assert_close(grid[:, 1:] * pad.valid.unsqueeze(-1), pad.groups, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grid[:, 0], cls)
    if cover_tail:  # every token lands in exactly one group: group sums add up to the token sum
        counts = torch.stack([(torch.cumsum(b.detach(), 1) - b.detach()).round().long()[i].bincount(minlength=pad.groups.shape[1])
                              for i in range(5)]).float()
        torch.testing.assert_close((pad.groups * counts.unsqueeze(-1)).sum(1), h.sum(1), atol=1e-4, rtol=1e-5)


def test_auto_is_the_default_and_picks_the_layout_per_call(monkeypatch):
    """'auto' packs batches of 2+ images and runs a single image padded (no mask, never slower)."""
    m = create_model("DRIP-4x-tiny").eval()
    assert m.visual.attn_impl == "auto"
    assert (m.visual.packed_for(1), m.visual.packed_for(2)) == (False, True)
    m.visual.attn_impl = "packed"
    assert m.visual.packed_for(1)
    from llava_drip.drip import tower as tower_module
    calls = []
    plain = tower_module.pack_groups
    monkeypatch.setattr(tower_module, "pack_groups", lambda *a, **k: calls.append(a[1].shape[0]) or plain(*a, **k))
    m.visual.attn_impl = "auto"
    x = _images(3)
    with torch.no_grad():
        m.visual.encode_tokens(x[:1])
        m.visual.encode_tokens(x)
    assert calls == [3]


def test_parity_mode_without_any_boundary_returns_the_head_of_cls():
    """cover_tail=False with no boundary in the whole batch: S = 0 groups; CLS still carries the image
    (the reference's head(CLS)), never an all-zero embedding."""
    torch.manual_seed(0)
    ref = create_model("DRIP-4x-tiny", pad_mask=False, reference_mean=True, cover_tail=False).eval()
    v = ref.visual
    v.boundary_override = torch.zeros(v.num_patches)
    x = _images(2)
    with torch.no_grad():
        feats = v.forward_features(x)
        emb = v(x)
        cls = v.ln_post(v._run_blocks(v.post_blocks, v.ln_post(v.forward_pre(x)[:, :1]) if v.ln_short is None
                                      else v.ln_short(v.forward_pre(x)[:, :1])))
    assert feats.valid.shape == (2, 1) and feats.valid.all()
    torch.testing.assert_close(emb, cls[:, 0] @ v.proj)
    assert emb.abs().sum(dim=1).min() > 0
    masked = create_model("DRIP-4x-tiny", cover_tail=False).eval()  # the masked semantics, both layouts
    masked.visual.boundary_override = torch.zeros(masked.visual.num_patches)
    out = {}
    for impl in ("padded", "packed"):
        masked.visual.attn_impl = impl
        with torch.no_grad():
            out[impl] = masked.visual(x)
    torch.testing.assert_close(out["padded"], out["packed"], atol=1e-5, rtol=1e-5)
    assert out["padded"].abs().sum(dim=1).min() > 0
