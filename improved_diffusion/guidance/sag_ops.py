"""
The pure pieces of Self-Attention Guidance: the attention mask, the Gaussian
blur, the degradation and the guidance combine (docs/sag.md, steps 5, 6 and 8).

Nothing here touches a model or any random number generator.
"""

import math

import torch as th
import torch.nn.functional as F

BLUR_KERNEL_SIZE = 31
MASK_THRESHOLD = 1.0


def key_mass(attn_map, batch_size):
    """
    The per-key attention mass of a map: averaged over heads, then summed
    over queries (in that order, as the published sampler reduces it).

    :param attn_map: [N*H x T x T] attention weights, query by key.
    :param batch_size: N.
    :return: an [N x T] float32 tensor.
    """
    bh, tq, tk = attn_map.shape
    assert bh % batch_size == 0, f"map batch {bh} is not a multiple of {batch_size}"
    return attn_map.float().reshape(batch_size, bh // batch_size, tq, tk).mean(1).sum(1)


def key_mass_mask(mass, image_shape):
    """
    The SAG mask from the per-key attention mass, as the published sampler
    builds it (docs/sag.md, step 5): 1 where the mass is > 1.0, reshaped to
    the map's square resolution, repeated over the image channels and
    upsampled with nearest-neighbour interpolation.

    :param mass: [N x T] head-averaged attention summed over queries (key_mass()).
    :param image_shape: (C, H, W) of the images the mask applies to.
    :return: an [N x C x H x W] float32 tensor of zeros and ones (the same
             values over channels: a view that expands one channel).
    """
    n, tokens = mass.shape
    res = math.isqrt(tokens)
    assert res * res == tokens, f"attention over {tokens} tokens is not a square map"
    channels, height, width = image_shape
    mask = (mass > MASK_THRESHOLD).reshape(n, 1, res, res).float()
    # Nearest-neighbour upsampling acts per channel: upsample one, expand.
    return F.interpolate(mask, (height, width)).expand(n, channels, height, width)


def gaussian_kernel1d(sigma, kernel_size=BLUR_KERNEL_SIZE, dtype=th.float32, device=None):
    """
    1-D Gaussian weights exp(-0.5 * (x / sigma)^2) for x = -(k-1)/2 .. (k-1)/2,
    normalised to sum 1 (the published blur's weights).

    Sigma is rounded to float32 first, as the published code's draw of it is.
    """
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    sigma = float(th.tensor(sigma, dtype=th.float32))
    half = (kernel_size - 1) * 0.5
    x = th.linspace(-half, half, steps=kernel_size, dtype=dtype, device=device)
    pdf = th.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def blur_matrix(size, kernel1d, mode):
    """
    The [size x size] matrix of a 1-D blur along one axis, padding included:
    ``out[i] = sum_j kernel1d[j] * x[pad(i + j - r)]`` with r the kernel
    radius and pad() reflecting (``mode="reflect"``, no edge repeat, as
    F.pad's reflect) or clamping (``"replicate"``) indices outside the image.
    Weights that land on the same pixel are summed in float64.
    """
    radius = (kernel1d.shape[0] - 1) // 2
    i = th.arange(size, device=kernel1d.device)[:, None]
    src = i + th.arange(-radius, radius + 1, device=kernel1d.device)[None, :]
    if mode == "reflect":
        assert size > radius, f"reflect padding of {radius} needs more than {radius} pixels"
        src = src.abs()
        src = th.where(src > size - 1, 2 * (size - 1) - src, src)
    else:
        src = src.clamp(0, size - 1)
    matrix = th.zeros(size, size, dtype=th.float64, device=kernel1d.device)
    matrix.index_put_(
        (i.expand_as(src), src), kernel1d.double().expand_as(src), accumulate=True
    )
    return matrix.to(kernel1d.dtype)


def gaussian_blur(x, sigma, kernel_size=BLUR_KERNEL_SIZE, separable=True):
    """
    Blur each channel of a batch of images with a Gaussian.

    The kernel is the outer product of gaussian_kernel1d() with itself,
    applied after reflect padding of kernel_size // 2 pixels on each side, as
    the published sampler's blur does (without its random draw).

    Reflect padding needs more pixels than the padding along each side. For
    smaller images (under 16 pixels with the default kernel) this falls back
    to replicate padding (edge pixels repeated) with the same kernel; the
    fallback is chosen per call, for both axes together.

    :param x: an [N x C x H x W] tensor.
    :param sigma: the Gaussian's standard deviation in pixels (> 0).
    :param separable: True (default): two 1-D passes, each one matrix
        product with blur_matrix() (padding folded in), tens to hundreds of
        times faster than the 2-D convolution on CPU. False: the published
        form, padding then one 31 x 31 convolution per channel. The two
        agree to float rounding (about 1e-6).
    :return: the blurred tensor, same shape and dtype.
    """
    n, c, h, w = x.shape
    pad = kernel_size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    compute_dtype = x.dtype if x.dtype in (th.float32, th.float64) else th.float32
    kernel1d = gaussian_kernel1d(sigma, kernel_size, dtype=compute_dtype, device=x.device)
    x_c = x.to(compute_dtype)
    if separable:
        rows = blur_matrix(h, kernel1d, mode)
        cols = blur_matrix(w, kernel1d, mode)
        out = th.matmul(th.matmul(rows, x_c), cols.t())
    else:
        padded = F.pad(x_c, [pad, pad, pad, pad], mode=mode)
        kernel2d = th.mm(kernel1d[:, None], kernel1d[None, :])
        out = F.conv2d(padded, kernel2d.expand(c, 1, kernel_size, kernel_size), groups=c)
    return out.to(x.dtype)


def degrade(pred_xstart, mask, sigma, separable_blur=True):
    """
    Blur `pred_xstart` where `mask` is 1 and keep it where `mask` is 0:
    ``blurred * mask + pred_xstart * (1 - mask)``.
    """
    blurred = gaussian_blur(pred_xstart, sigma, separable=separable_blur)
    return blurred * mask + pred_xstart * (1 - mask)


def combine(eps, eps_bar, scale):
    """The guided epsilon: ``eps_bar + scale * (eps - eps_bar)``."""
    return eps_bar + scale * (eps - eps_bar)
