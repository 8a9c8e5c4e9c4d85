"""The fast paths of SAG sampling: attention backends, chunking, capture once, blur, layout."""

import pytest
import torch as th

from conftest import tiny_model
from improved_diffusion import unet
from improved_diffusion.guidance import sag_ops
from improved_diffusion.guidance.attention_capture import AttentionCapture
from improved_diffusion.guidance.denoiser import DiffusionTimes, GuidedDenoiser
from improved_diffusion.guidance.sag import SelfAttentionGuidance
from improved_diffusion.script_util import prepare_model_for_sampling
from sag_reference import attention_mask, attention_weights
from improved_diffusion.unet import (
    QKVAttention,
    QKVAttentionLegacy,
    default_attention_backend,
    einsum_attention,
    sdpa_attention,
)


def _x(n=2, size=16, seed=0):
    return th.randn(n, 3, size, size, generator=th.Generator().manual_seed(seed))


def _forward(model):
    with th.no_grad():
        return model(_x(), th.tensor([10, 500]))


def _op_outputs(model):
    """Run the model once; return {attention op: its output}."""
    seen = {}
    handles = [
        m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, o))
        for m in model.modules()
        if isinstance(m, (QKVAttention, QKVAttentionLegacy))
    ]
    _forward(model)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("dtype,atol", [(th.float32, 2e-6), (th.bfloat16, 3e-2)])
def test_sdpa_matches_einsum(legacy, dtype, atol):
    g = th.Generator().manual_seed(0)
    qkv = th.randn(3, 3 * 4 * 8, 50, generator=g).to(dtype)
    want = einsum_attention(qkv.float(), 4, legacy=legacy)
    got = sdpa_attention(qkv, 4, legacy=legacy)
    assert got.shape == want.shape == (3, 32, 50) and got.dtype == dtype
    assert th.allclose(got.float(), want, atol=atol), (got.float() - want).abs().max()


@pytest.mark.parametrize("new_order", [False, True])
def test_model_sdpa_backend_matches_einsum(new_order):
    model, _ = tiny_model(use_new_attention_order=new_order, num_head_channels=16)
    unet.set_attention_backend(model, "einsum")
    want = _forward(model)
    unet.set_attention_backend(model, "sdpa")
    got = _forward(model)
    assert th.allclose(got, want, atol=1e-5), (got - want).abs().max()
    ops = [m for m in model.modules() if isinstance(m, (QKVAttention, QKVAttentionLegacy))]
    assert ops and all(op.backend == "sdpa" for op in ops)


def test_auto_backend_and_environment(monkeypatch):
    monkeypatch.delenv(unet.ATTENTION_BACKEND_ENV, raising=False)
    assert default_attention_backend() == "auto"
    op = QKVAttentionLegacy(2)
    assert not op.uses_sdpa(th.zeros(1, 12, 4))  # CPU: the explicit path
    op.backend = "sdpa"
    assert op.uses_sdpa(th.zeros(1, 12, 4))
    monkeypatch.setenv(unet.ATTENTION_BACKEND_ENV, "einsum")
    assert QKVAttention(2).backend == "einsum"
    monkeypatch.setenv(unet.ATTENTION_BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match="IMPROVED_DIFFUSION_ATTENTION"):
        QKVAttention(2)
    with pytest.raises(ValueError, match="backend"):
        unet.set_attention_backend(th.nn.Sequential(), "fast")


def test_einsum_chunks_are_bit_identical(monkeypatch):
    g = th.Generator().manual_seed(1)
    qkv = th.randn(4, 3 * 2 * 8, 64, generator=g)
    whole = einsum_attention(qkv, 2)
    for chunk in (1, 64 * 64, 3 * 64 * 64, 10**9):
        assert th.equal(einsum_attention(qkv, 2, chunk_elements=chunk), whole)
    # The model's chunking (ATTENTION_CHUNK_ELEMENTS on CPU) changes nothing either.
    model, _ = tiny_model()
    unet.set_attention_backend(model, "einsum")
    monkeypatch.setattr(unet, "ATTENTION_CHUNK_ELEMENTS", 10**9)
    want = _forward(model)
    monkeypatch.setattr(unet, "ATTENTION_CHUNK_ELEMENTS", 64 * 64)
    assert th.equal(_forward(model), want)


@pytest.mark.parametrize("chunk", [None, 1])
def test_capture_once_same_output_and_one_weight_computation(monkeypatch, chunk):
    """A captured true-attention layer computes its weights once, for its output and the map."""
    model, _ = tiny_model()
    unet.set_attention_backend(model, "einsum")
    block = model.attention_blocks()[("output", 0)]
    if chunk is not None:
        monkeypatch.setattr(unet, "ATTENTION_CHUNK_ELEMENTS", chunk)
    plain = _op_outputs(model)
    calls = []
    real = unet._softmax_weights
    monkeypatch.setattr(unet, "_softmax_weights", lambda *a: calls.append(1) or real(*a))
    with AttentionCapture(block, keep="weights") as cap:
        captured = _op_outputs(model)
    assert cap.is_true_attention and cap.calls == 1
    for op, out in plain.items():
        assert th.equal(captured[op], out)  # every layer, the captured one included
    if chunk == 1:  # one head per chunk; the captured layer: one sample (batch of 2)
        others = [op for op in plain if op is not block.attention]
        assert len(calls) == sum(2 * op.n_heads for op in others) + 2
    else:  # the tiny maps fit one chunk
        assert len(calls) == len(plain)
    # And the map is the one rebuilt from qkv (the published definition).
    qkv = {}
    h = block.attention.register_forward_hook(lambda m, i, o: qkv.update(x=i[0]))
    _forward(model)
    h.remove()
    want, _ = attention_weights(qkv["x"], 2, legacy=True, float32=True)
    assert th.equal(cap.weights, want)


def test_published_map_is_rebuilt_when_it_is_not_the_true_attention(monkeypatch):
    model, _ = tiny_model(num_heads=4, num_head_channels=16)  # blocks run 2 heads
    block = model.attention_blocks()[("output", 0)]
    calls = []
    real = unet._softmax_weights
    monkeypatch.setattr(unet, "_softmax_weights", lambda *a: calls.append(1) or real(*a))
    with AttentionCapture(block, num_heads=4, legacy=True, keep="weights") as cap:
        _forward(model)
    n_ops = sum(isinstance(m, (QKVAttention, QKVAttentionLegacy)) for m in model.modules())
    assert not cap.is_true_attention and len(calls) == n_ops + 1
    assert cap.weights.shape == (2 * 4, 64, 64)


@pytest.mark.parametrize("true_attention", [False, True])
def test_key_mass_capture_equals_full_map_reduction(true_attention, monkeypatch):
    model, _ = tiny_model(num_heads=4, num_head_channels=16)
    block = model.attention_blocks()[("output", 1)]
    kwargs = {} if true_attention else dict(num_heads=4, legacy=True)
    with AttentionCapture(block, keep="weights", **kwargs) as full:
        _forward(model)
    monkeypatch.setattr(unet, "ATTENTION_CHUNK_ELEMENTS", 1)  # one sample per chunk
    with AttentionCapture(block, keep="key_mass", **kwargs) as small:
        _forward(model)
    assert small.weights is None and small.key_mass.shape == (2, 64)
    assert th.equal(small.key_mass, full.key_mass)
    assert th.equal(full.key_mass, sag_ops.key_mass(full.weights, 2))
    mask = sag_ops.key_mass_mask(small.key_mass, (3, 16, 16))
    assert th.equal(mask, attention_mask(full.weights, 2, (3, 16, 16)))


def check_captured_layer_once_others_sdpa(model, device, monkeypatch, atol):
    """
    Every attention layer runs sdpa in a plain forward; under a capture all
    but the captured one still do, and the captured one computes its weights
    once (for its output and the capture). Also run on CUDA in float16
    (test_cuda.py).
    """
    block = model.attention_blocks()[("output", 0)]
    ops = [m for m in model.modules() if isinstance(m, (QKVAttention, QKVAttentionLegacy))]
    sdpa_calls, softmax_calls = [], []
    real_sdpa, real_softmax = unet.sdpa_attention, unet._softmax_weights
    monkeypatch.setattr(unet, "sdpa_attention", lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    monkeypatch.setattr(unet, "_softmax_weights", lambda *a: softmax_calls.append(1) or real_softmax(*a))
    x = th.randn(2, 3, 16, 16, device=device)
    t = th.tensor([10, 500], device=device)
    with th.no_grad():
        plain = model(x, t)
        n_plain = len(sdpa_calls)
        assert not softmax_calls  # no explicit attention anywhere
        with AttentionCapture(block, keep="key_mass") as cap:
            guided = model(x, t)
    assert n_plain == len(ops)
    assert len(sdpa_calls) - n_plain == len(ops) - 1  # all but the captured layer
    assert len(softmax_calls) == 1 and cap.calls == 1
    assert cap.key_mass.dtype == th.float32 and th.isfinite(cap.key_mass).all()
    assert th.allclose(guided.float(), plain.float(), atol=atol)


def test_captured_layer_computes_once_others_fused_on_cpu(monkeypatch):
    """The sdpa backend chosen on the CPU (the default on CUDA): the same split of the work."""
    monkeypatch.setenv(unet.ATTENTION_BACKEND_ENV, "sdpa")
    model, _ = tiny_model()
    check_captured_layer_once_others_sdpa(model, "cpu", monkeypatch, atol=1e-5)


def test_capture_recovers_after_a_failed_forward(monkeypatch):
    model, _ = tiny_model()
    block = model.attention_blocks()[("output", 0)]
    monkeypatch.setattr(unet, "ATTENTION_CHUNK_ELEMENTS", 1)
    with AttentionCapture(block, keep="key_mass") as cap:
        state = {"n": 0}

        def boom(module, start, weight):
            state["n"] += 1
            if state["n"] == 2:
                raise RuntimeError("boom")

        handle = block.attention.register_weights_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            _forward(model)
        handle.remove()
        _forward(model)
    assert cap.key_mass.shape == (2, 64) and cap.calls == 1
    assert not block.attention._weights_hooks and not block.attention._forward_hooks


def test_sag_step_mask_unchanged_by_fast_paths(tiny):
    model, diffusion = tiny
    sag = SelfAttentionGuidance(model, scale=2.0, depth=0, num_heads=2)
    x = _x()
    t = th.tensor([2, 2])
    with sag.capture(keep="weights") as cap:
        diffusion.p_mean_variance(model, x, t)
    want = attention_mask(cap.weights, 2, (3, 16, 16))
    denoiser = GuidedDenoiser.for_diffusion(model, diffusion, sag=sag)
    with th.no_grad():
        out = denoiser(x, t, DiffusionTimes(diffusion))
    assert th.equal(out.pictures["sag_mask"], want)


@pytest.mark.parametrize("size", [5, 15, 16, 17, 40])
def test_blur_matrix_is_the_padded_kernel(size):
    k = sag_ops.gaussian_kernel1d(2.0)
    mode = "reflect" if size > 15 else "replicate"
    m = sag_ops.blur_matrix(size, k, mode)
    assert th.allclose(m.sum(1), th.ones(size), atol=1e-6)
    # One row of the matrix times a signal = padding then the 1-D kernel.
    x = th.randn(1, 1, size)
    padded = th.nn.functional.pad(x, [15, 15], mode=mode)
    want = th.nn.functional.conv1d(padded, k.view(1, 1, -1)).view(-1)
    assert th.allclose(m @ x.view(-1), want, atol=1e-6)


def test_separable_blur_is_default_and_close_to_2d():
    x = _x(2, 40)
    fast = sag_ops.gaussian_blur(x, 3.0)
    assert th.equal(fast, sag_ops.gaussian_blur(x, 3.0, separable=True))
    assert th.allclose(fast, sag_ops.gaussian_blur(x, 3.0, separable=False), atol=2e-6)
    mask = th.zeros_like(x)
    mask[..., :20] = 1
    assert th.allclose(sag_ops.degrade(x, mask, 3.0), sag_ops.degrade(x, mask, 3.0, separable_blur=False), atol=2e-6)


def test_channels_last_model_keeps_callers_layout():
    model, _ = tiny_model()
    want = _forward(model)
    prepare_model_for_sampling(model, "cpu", use_fp16=False, channels_last=True, attention="sdpa")
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=th.channels_last)
    got = _forward(model)
    assert got.is_contiguous()
    assert th.allclose(got, want, atol=1e-5)
    prepare_model_for_sampling(model, "cpu", use_fp16=False, channels_last=False, attention="einsum")
    assert model.input_blocks[0][0].weight.is_contiguous()
    assert th.allclose(_forward(model), want, atol=1e-6)
