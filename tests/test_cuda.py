"""
The GPU paths: fused attention in every layer but the captured one, float16
sampling with SAG, and the seed contract across devices. Skipped without
CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import pytest
import torch as th

from conftest import draw, tiny_model
from test_perf_attention import check_captured_layer_once_others_sdpa
from improved_diffusion import unet
from improved_diffusion.sampling.random_util import BatchGenerator
from improved_diffusion.guidance.sag import SelfAttentionGuidance
from improved_diffusion.script_util import half_dtype_for, prepare_model_for_sampling
from improved_diffusion.unet import QKVAttentionLegacy, einsum_attention, sdpa_attention

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")

DEV = "cuda"


def _to8(x):
    return ((x + 1) * 127.5).clamp(0, 255).to(th.uint8).long()


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("dtype,atol", [(th.float32, 1e-4), (th.float16, 2e-3), (th.bfloat16, 2e-2)])
def test_sdpa_matches_einsum_on_cuda(legacy, dtype, atol):
    g = th.Generator().manual_seed(0)
    qkv = th.randn(3, 3 * 4 * 64, 1024, generator=g).to(DEV)
    want = einsum_attention(qkv, 4, legacy=legacy)
    got = sdpa_attention(qkv.to(dtype), 4, legacy=legacy)
    assert got.dtype == dtype and got.shape == want.shape
    assert th.allclose(got.float(), want, atol=atol), (got.float() - want).abs().max()


def test_auto_backend_is_sdpa_on_cuda(monkeypatch):
    monkeypatch.delenv(unet.ATTENTION_BACKEND_ENV, raising=False)
    op = QKVAttentionLegacy(2)
    assert op.uses_sdpa(th.zeros(1, 12, 4, device=DEV))


def test_captured_layer_computes_once_others_fused(monkeypatch):
    """Every uncaptured layer takes sdpa; the captured one computes its weights once (float16)."""
    model, _ = tiny_model()
    model.to(DEV)
    prepare_model_for_sampling(model, DEV, use_fp16=True)
    assert model.dtype == th.float16
    check_captured_layer_once_others_sdpa(model, DEV, monkeypatch, atol=5e-3)


@pytest.mark.parametrize("ddim", [False, True])
def test_fp16_sag_sampling_on_cuda_close_to_cpu_fp32(ddim):
    model, diffusion = tiny_model()
    sag = SelfAttentionGuidance(model, scale=1.5, depth=0, num_heads=2, blur_sigma=1.0)
    want = draw(diffusion, model, sag=sag, ddim=ddim, seeds=(0, 1, 2, 3))
    other = draw(diffusion, model, sag=sag, ddim=ddim, seeds=(4, 5, 6, 7))
    model.to(DEV)
    got32 = draw(diffusion, model, sag=sag, ddim=ddim, seeds=(0, 1, 2, 3), device=DEV)
    model.convert_to_fp16(half_dtype_for(DEV, True))
    got16 = draw(diffusion, model, sag=sag, ddim=ddim, seeds=(0, 1, 2, 3), device=DEV)
    apart = (_to8(other) - _to8(want)).abs().float().mean()
    for got, limit in ((got32, 1.0), (got16, 4.0)):
        assert got.device.type == "cuda" and got.dtype == th.float32 and th.isfinite(got).all()
        d = (_to8(got.cpu()) - _to8(want)).abs().float().mean()
        assert d < limit and d < 0.1 * apart, (d, apart)


def test_generator_draws_on_cuda_equal_cpu_draws():
    """Drawn ahead into pinned memory and copied without waiting: the same numbers."""
    cpu, gpu = BatchGenerator([0, 1, 2]), BatchGenerator([0, 1, 2])
    for step in range(4):
        want = cpu.randn((3, 3, 8, 8))
        got = gpu.randn((3, 3, 8, 8), device=DEV)
        assert got.device.type == "cuda" and th.equal(got.cpu(), want)
        if step == 1:
            assert th.equal(gpu.randint(10, device=DEV).cpu(), cpu.randint(10))
    assert gpu._executor is not None
