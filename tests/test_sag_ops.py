"""The pure SAG pieces: mask, blur, degrade, combine."""

import math

import numpy as np
import pytest
import torch as th

from improved_diffusion.guidance import sag_ops
from sag_reference import attention_mask


def _reference_blur(x, sigma, pad_mode):
    """Direct 2-D convolution by the formula of docs/sag.md, step 6, in float64 numpy."""
    k = 31
    xs = np.arange(k) - 15
    w = np.exp(-0.5 * (xs / float(np.float32(sigma))) ** 2)
    w /= w.sum()
    kernel = np.outer(w, w)
    arr = x.double().numpy()
    padded = np.pad(arr, ((0, 0), (0, 0), (15, 15), (15, 15)), mode="reflect" if pad_mode == "reflect" else "edge")
    n, c, h, wd = arr.shape
    out = np.zeros_like(arr)
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = (padded[:, :, i : i + k, j : j + k] * kernel).sum(axis=(-1, -2))
    return th.from_numpy(out)


def test_kernel_formula():
    k = sag_ops.gaussian_kernel1d(3.0)
    assert k.shape == (31,)
    assert math.isclose(float(k.sum()), 1.0, rel_tol=1e-6)
    x = th.arange(-15, 16, dtype=th.float64)
    want = th.exp(-0.5 * (x / 3.0) ** 2)
    assert th.allclose(k.double(), want / want.sum(), atol=1e-7)


@pytest.mark.parametrize("size,mode", [(32, "reflect"), (16, "reflect"), (8, "replicate"), (5, "replicate")])
def test_blur_matches_formula(size, mode):
    g = th.Generator().manual_seed(0)
    x = th.randn(2, 3, size, size, generator=g)
    got = sag_ops.gaussian_blur(x, 9.0)
    assert got.shape == x.shape and got.dtype == x.dtype
    want = _reference_blur(x, 9.0, mode)
    assert th.allclose(got.double(), want, atol=1e-5)


def test_blur_separable_matches_2d():
    x = th.randn(1, 3, 64, 64)
    assert th.allclose(
        sag_ops.gaussian_blur(x, 3.0), sag_ops.gaussian_blur(x, 3.0, separable=True), atol=1e-5
    )


def test_blur_consumes_no_randomness():
    x = th.randn(1, 3, 32, 32)
    state = th.random.get_rng_state()
    sag_ops.gaussian_blur(x, 9.0)
    sag_ops.degrade(x, th.ones_like(x), 9.0)
    assert th.equal(state, th.random.get_rng_state())


def test_blur_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        sag_ops.gaussian_blur(th.zeros(1, 3, 8, 8), 0.0)


def test_mask_threshold_and_upsampling():
    # 2 samples, 2 heads, 4 tokens (2x2 map). Key mass = mean over heads of column sums.
    b, h, t = 2, 2, 4
    attn = th.full((b * h, t, t), 1.0 / t)  # uniform: every key mass is exactly 1 -> not > 1
    mask = attention_mask(attn, b, (3, 4, 4))
    assert mask.shape == (2, 3, 4, 4) and mask.sum() == 0
    attn = th.zeros(b * h, t, t)
    attn[:, :, 1] = 1.0  # every query attends to key 1 only -> key 1 mass 4
    attn[2:, :, 1] = 0.0
    attn[2:, :, 3] = 1.0  # sample 1 attends to key 3
    mask = attention_mask(attn, b, (3, 4, 4))
    expected0 = th.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=th.float32)
    expected1 = th.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=th.float32)
    assert th.equal(mask[0], expected0.expand(3, 4, 4))
    assert th.equal(mask[1], expected1.expand(3, 4, 4))


def test_mask_averages_heads():
    # head 0 puts mass 1.5 on key 0, head 1 puts 0.4 -> mean 0.95 -> not masked
    attn = th.zeros(2, 4, 4)
    attn[0, :, 0] = 1.5 / 4
    attn[0, :, 1] = 1 - 1.5 / 4
    attn[1, :, 0] = 0.4 / 4
    attn[1, :, 1] = 1 - 0.4 / 4
    mask = attention_mask(attn, 1, (1, 2, 2))
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == 1


def test_mask_rejects_non_square():
    with pytest.raises(AssertionError, match="not a square map"):
        sag_ops.key_mass_mask(th.rand(1, 6), (3, 6, 6))


def test_degrade_and_combine():
    x = th.randn(1, 3, 32, 32)
    mask = th.zeros_like(x)
    mask[..., :16] = 1
    out = sag_ops.degrade(x, mask, 3.0)
    blurred = sag_ops.gaussian_blur(x, 3.0)
    assert th.equal(out[..., 16:], x[..., 16:])
    assert th.allclose(out[..., :16], blurred[..., :16])
    eps, eps_bar = th.randn(4), th.randn(4)
    assert th.allclose(sag_ops.combine(eps, eps_bar, 1.5), eps_bar + 1.5 * (eps - eps_bar))
    assert th.allclose(sag_ops.combine(eps, eps_bar, 1.0), eps)
