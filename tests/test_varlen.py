"""The varlen attention path of the packed layout (drip/varlen.py) against SDPA on the padded grid.

On CPU the Flash kernels do not run, so the CPU tests drive the `reference` backend (the kernels'
contract, one SDPA per image) through the tower's real call site; the CUDA test compares torch's
kernel in bf16 and checks the post-pooling blocks make no host sync."""
import pytest
import torch

from llava_drip.drip import create_model
from llava_drip.drip.pooling import pack_groups
from llava_drip.drip.varlen import get_varlen_backend, set_varlen_backend, varlen_kernel


@pytest.fixture
def backend():
    prev = get_varlen_backend()
    yield set_varlen_backend
    set_varlen_backend(prev)


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    m = create_model("DRIP-4x-tiny", attn_impl="packed").eval()
    with torch.no_grad():  # a predictor that gives each image a different group count
        m.visual.boundary_predictor.fc2.bias.fill_(-0.2)
    return m.to(device=device, dtype=dtype)


def _images(b=6, device="cpu", dtype=torch.float32):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def test_cu_seqlens_are_the_row_offsets():
    h = torch.randn(3, 8, 4)
    b = torch.zeros(3, 8)
    b[0, [1, 5]] = 1  # 3 groups
    b[2, :] = 1  # 8 groups; image 1 has no boundary: 1 group
    layout = pack_groups(torch.randn(3, 4), h, b)
    assert layout.lengths.tolist() == [4, 2, 9]
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == [0, 4, 6, 15]


def test_reference_backend_matches_grid_forward_and_backward(backend):
    m = _model()
    x = _images()
    out = {}
    for name in ("off", "reference"):
        backend(name)
        m.zero_grad(set_to_none=True)
        feats = m.visual.forward_features(x)
        emb = m.visual.project(m.visual.pool(feats.hidden, feats.valid))
        emb.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in m.visual.post_blocks.named_parameters()}
        out[name] = (feats, emb.detach(), grads)
    (fa, ea, ga), (fb, eb, gb) = out["off"], out["reference"]
    assert len(set(fa.num_groups.tolist())) > 1, "test needs varied group counts"
    keep = fa.valid.unsqueeze(-1)
    torch.testing.assert_close(fb.hidden * keep, fa.hidden * keep, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eb, ea, atol=1e-5, rtol=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-5, rtol=1e-4, msg=k)


def test_auto_keeps_sdpa_where_flash_cannot_run(backend):
    x = torch.randn(5, 64)
    backend("auto")
    assert varlen_kernel(x, 32) is None  # CPU fp32: SDPA on the grid
    assert varlen_kernel(x.bfloat16(), 32) is None  # still CPU
    backend("off")
    assert varlen_kernel(x, 32) is None
    backend("torch")
    with pytest.raises(RuntimeError, match="needs CUDA fp16/bf16"):
        varlen_kernel(x, 32)
    with pytest.raises(ValueError, match="varlen backend 'nested' is not one of"):
        set_varlen_backend("nested")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Flash varlen kernels need CUDA")
def test_cuda_varlen_bf16_matches_masked_sdpa_without_host_sync(backend):
    m = _model("cuda", torch.bfloat16)
    x = _images(64, "cuda", torch.bfloat16)
    res = {}
    with torch.no_grad():
        for name in ("off", "torch"):
            backend(name)
            res[name] = m.visual.forward_features(x)
        pre = m.visual.forward_pre(x)
        b = m.visual.predict_boundaries(pre[:, 1:])
        tokens, layout = m.visual.pool_groups(pre, b)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # every post-pooling block, varlen attention included, without one host sync
            norm = m.visual.ln_post if m.visual.ln_short is None else m.visual.ln_short
            m.visual._run_blocks(m.visual.post_blocks, norm(tokens), layout)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    keep = res["off"].valid.unsqueeze(-1)
    a, c = (res["off"].hidden * keep).float(), (res["torch"].hidden * keep).float()
    assert (a - c).abs().mean().item() <= 1e-3
    torch.testing.assert_close(c, a, atol=3e-2, rtol=3e-2)
