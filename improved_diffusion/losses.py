"""
Likelihood helpers, following the original DDPM codebase (Ho et al.,
diffusion_tf/utils.py) as used by guided-diffusion.
"""

import math

import torch as th


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise.

    Shapes broadcast, so batches can be compared to scalars.  At least one
    argument must be a Tensor.
    """
    tensor = next(
        (x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, th.Tensor)),
        None,
    )
    if tensor is None:
        raise TypeError("at least one argument must be a Tensor")

    # th.exp() needs Tensors; broadcasting alone does not convert scalars.
    logvar1, logvar2 = [
        x if isinstance(x, th.Tensor) else th.tensor(x).to(tensor)
        for x in (logvar1, logvar2)
    ]

    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """A fast (tanh-based) approximation of the standard normal CDF."""
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood of a Gaussian discretized to 8-bit image bins.

    :param x: target images, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian mean Tensor.
    :param log_scales: the Gaussian log stddev Tensor.
    :return: a tensor like x of log probabilities (in nats).
    """
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, th.log(cdf_delta.clamp(min=1e-12))),
    )
    assert log_probs.shape == x.shape
    return log_probs
