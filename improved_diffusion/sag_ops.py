"""
The pure pieces of Self-Attention Guidance: the attention mask, the Gaussian
blur, the degradation and the guidance combine (SAG-NOTES items 5, 6, 8).

Nothing here touches a model or any random number generator.
"""

import math

import torch as th
import torch.nn.functional as F

BLUR_KERNEL_SIZE = 31
MASK_THRESHOLD = 1.0


def attention_mask(attn_map, batch_size, image_shape):
    """
    The SAG mask from an attention map, as the published sampler builds it.

    The map is averaged over heads, then summed over queries: one number per
    key position. The mask is 1 where that number is > 1.0. It is reshaped to
    the map's square resolution (from its token count), repeated over the
    image channels and upsampled with nearest-neighbour interpolation.

    :param attn_map: [N*H x T x T] attention weights, query by key (softmax
                     over keys), N the batch size and H the number of heads.
    :param batch_size: N.
    :param image_shape: (C, H, W) of the images the mask applies to.
    :return: an [N x C x H x W] float32 tensor of zeros and ones.
    """
    bh, tq, tk = attn_map.shape
    assert bh % batch_size == 0, f"map batch {bh} is not a multiple of {batch_size}"
    key_mass = (
        attn_map.float().reshape(batch_size, bh // batch_size, tq, tk).mean(1).sum(1)
    )
    return key_mass_mask(key_mass, image_shape)


def key_mass_mask(key_mass, image_shape):
    """
    The SAG mask from the per-key attention mass (see attention_mask()).

    :param key_mass: [N x T] head-averaged attention summed over queries.
    :param image_shape: (C, H, W) of the images the mask applies to.
    :return: an [N x C x H x W] float32 tensor of zeros and ones.
    """
    n, tokens = key_mass.shape
    res = math.isqrt(tokens)
    assert res * res == tokens, f"attention over {tokens} tokens is not a square map"
    channels, height, width = image_shape
    mask = (key_mass > MASK_THRESHOLD).reshape(n, 1, res, res)
    mask = mask.repeat(1, channels, 1, 1).float()
    return F.interpolate(mask, (height, width))


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


def gaussian_blur(x, sigma, kernel_size=BLUR_KERNEL_SIZE, separable=False):
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
    :param separable: if True, apply the kernel as two 1-D passes (faster for
        large images; equal up to float rounding).
    :return: the blurred tensor, same shape and dtype.
    """
    n, c, h, w = x.shape
    pad = kernel_size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    compute_dtype = x.dtype if x.dtype in (th.float32, th.float64) else th.float32
    kernel1d = gaussian_kernel1d(sigma, kernel_size, dtype=compute_dtype, device=x.device)
    padded = F.pad(x.to(compute_dtype), [pad, pad, pad, pad], mode=mode)
    if separable:
        out = F.conv2d(padded, kernel1d.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
        out = F.conv2d(out, kernel1d.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
    else:
        kernel2d = th.mm(kernel1d[:, None], kernel1d[None, :])
        out = F.conv2d(padded, kernel2d.expand(c, 1, kernel_size, kernel_size), groups=c)
    return out.to(x.dtype)


def degrade(pred_xstart, mask, sigma, separable_blur=False):
    """
    Blur `pred_xstart` where `mask` is 1 and keep it where `mask` is 0:
    ``blurred * mask + pred_xstart * (1 - mask)``.
    """
    blurred = gaussian_blur(pred_xstart, sigma, separable=separable_blur)
    return blurred * mask + pred_xstart * (1 - mask)


def combine(eps, eps_bar, scale):
    """The guided epsilon: ``eps_bar + scale * (eps - eps_bar)``."""
    return eps_bar + scale * (eps - eps_bar)
