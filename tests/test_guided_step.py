"""
The guided step against its formulas written out here, with a fake model
whose output is linear in its input, a fixed SAG mask and a fake classifier:
the denoiser's eps, then one ancestral step, DDIM steps with eta 0 and 0.5,
each with and without classifier guidance, and the solver's guided noise.
The noise schedule comes from numpy (float64), the blur from
scipy.ndimage; nothing is taken from the code under test.
"""

import contextlib

import numpy as np
import pytest
import scipy.ndimage
import torch as th

from improved_diffusion.sampling.dpm_solver import DiscreteVPSchedule
from improved_diffusion.guidance.denoiser import DiffusionTimes, GuidedDenoiser
from improved_diffusion.sampling.samplers import SolverTimes
from improved_diffusion.script_util import create_gaussian_diffusion

SCALE, SIGMA, CG_SCALE = 1.7, 2.0, 0.4
STEPS = 4  # respaced from 1000 linear steps
MAPPED = [0, 333, 666, 999]  # upstream's even spacing of 4 out of 1000


class FakeSAG:
    """A SAG setting with a fixed mask (the left half of the image) and no capture."""

    scale, blur_sigma, separable_blur, start = SCALE, SIGMA, True, 1000

    def applies(self, index):
        return self.start > index

    def capture(self):
        return contextlib.nullcontext()

    def mask(self, _capture, shape):
        mask = th.zeros(shape)
        mask[..., : shape[-1] // 2] = 1
        return mask


def fake_model(x, t, **_):
    """eps = 0.3 x + 0.001 t (t the model's timestep); variance channels 0.5."""
    eps = 0.3 * x + 0.001 * t.to(x.dtype)[:, None, None, None]
    return th.cat([eps, th.full_like(x, 0.5)], dim=1)


class FakeClassifier:
    """Classifier guidance whose gradient of log p(y | x) is 0.2 x + 0.05."""

    scale = CG_SCALE

    def gradient(self, x, t, **_):
        return 0.2 * x + 0.05

    def __call__(self, x, t, **kwargs):
        return self.gradient(x, t) * self.scale


def schedule():
    """alpha_bar of the base schedule and of the 4 respaced steps, float64 numpy."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    return abar, abar[MAPPED]


def blur(x0):
    """The published 31-tap Gaussian with reflect padding (scipy's 'mirror'), per channel."""
    out = np.empty_like(x0)
    for n in range(x0.shape[0]):
        for c in range(x0.shape[1]):
            out[n, c] = scipy.ndimage.gaussian_filter(x0[n, c], SIGMA, mode="mirror",
                                                      truncate=15 / SIGMA)
    return out


def guided_eps_by_hand(x, model_t, alpha, sigma):
    """The published SAG step (docs/sag.md, steps 2-8) on the fake model, in numpy."""
    eps = 0.3 * x + 0.001 * model_t
    x0 = np.clip((x - sigma * eps) / alpha, -1, 1)
    mask = np.zeros_like(x)
    mask[..., : x.shape[-1] // 2] = 1
    degraded = blur(x0) * mask + x0 * (1 - mask)
    x_hat = alpha * degraded + sigma * eps
    eps_hat = 0.3 * x_hat + 0.001 * model_t
    return eps_hat + SCALE * (eps - eps_hat)


@pytest.fixture
def setup():
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing=str(STEPS))
    assert diffusion.timestep_map == MAPPED
    x = th.randn(2, 3, 20, 20, generator=th.Generator().manual_seed(0), dtype=th.float64) * 0.8
    return diffusion, x


class FixedNoise:
    """A generator that hands out one fixed noise tensor."""

    def __init__(self, noise):
        self.noise = noise

    def randn_like(self, x):
        return self.noise


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
@pytest.mark.parametrize("with_classifier", [False, True])
def test_one_guided_step_by_hand(setup, sampler, eta, with_classifier):
    diffusion, x = setup
    i = 2
    abar_all, abar = schedule()
    a, a_prev = abar[i], abar[i - 1]
    alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
    xn = x.numpy()
    eps_g = guided_eps_by_hand(xn, MAPPED[i], alpha, sigma)

    classifier = FakeClassifier() if with_classifier else None
    denoiser = GuidedDenoiser(fake_model, learn_sigma=True, sag=FakeSAG(), classifier=classifier)
    t = th.full((2,), i)
    with th.no_grad():
        denoised = denoiser(x, t, DiffusionTimes(diffusion))
    np.testing.assert_allclose(denoised.eps.numpy(), eps_g, atol=1e-5)
    np.testing.assert_array_equal(denoised.output[:, 3:].numpy(), 0.5)  # the first pass's

    noise = th.randn(x.shape, generator=th.Generator().manual_seed(1), dtype=th.float64)
    x0 = np.clip((xn - sigma * eps_g) / alpha, -1, 1)
    grad = 0.2 * xn + 0.05
    if sampler == "ddpm":
        out = diffusion.p_sample(denoised.as_model(), x, t, cond_fn=denoiser.classifier,
                                 model_kwargs={}, generator=FixedNoise(noise))
        beta = 1 - a / a_prev  # the respaced step's beta
        coef1 = beta * np.sqrt(a_prev) / (1 - a)
        coef2 = (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
        mean = coef1 * x0 + coef2 * xn
        # learned range: model value 0.5 is 3/4 of the way from the clipped posterior log variance to log beta
        post_var = beta * (1 - a_prev) / (1 - a)
        log_var = 0.75 * np.log(beta) + 0.25 * np.log(post_var)
        if with_classifier:
            mean = mean + np.exp(log_var) * CG_SCALE * grad
        want = mean + np.exp(0.5 * log_var) * noise.numpy()
    else:
        out = diffusion.ddim_sample(denoised.as_model(), x, t, cond_fn=denoiser.classifier,
                                    model_kwargs={}, eta=eta, generator=FixedNoise(noise))
        eps = (xn - alpha * x0) / sigma
        if with_classifier:  # the score correction of x0's eps; x0 then follows it, unclipped
            eps = eps - sigma * CG_SCALE * grad
            x0 = (xn - sigma * eps) / alpha
        sd = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        want = x0 * np.sqrt(a_prev) + np.sqrt(1 - a_prev - sd**2) * eps + sd * noise.numpy()
    np.testing.assert_allclose(out["sample"].numpy(), want, atol=1e-5)


def test_solver_guided_noise_by_hand():
    """DPM-Solver++'s eps at a fractional time: SAG with alpha_t, sigma_t of its schedule, then CG."""
    betas = np.linspace(1e-4, 0.02, 1000)
    solver_schedule = DiscreteVPSchedule(betas)
    t = th.tensor([0.4567, 0.4567], dtype=th.float32)
    # alpha_t by hand: log alpha linear in t between steps n = 455 and 456 (t = (n + 1) / 1000)
    log_alpha = 0.5 * np.cumsum(np.log(1 - betas))
    w = (0.4567 - 0.456) / 0.001
    alpha = np.exp((1 - w) * log_alpha[455] + w * log_alpha[456])
    sigma = np.sqrt(1 - alpha**2)
    model_t = 1000 * (0.4567 - 0.001)
    x = th.randn(2, 3, 20, 20, generator=th.Generator().manual_seed(2)) * 0.8
    xn = x.double().numpy()
    want = guided_eps_by_hand(xn, model_t, alpha, sigma) - CG_SCALE * sigma * (0.2 * xn + 0.05)

    times = SolverTimes(solver_schedule, th.tensor([0.9, 0.4567, 0.1]))
    denoiser = GuidedDenoiser(fake_model, learn_sigma=True, sag=FakeSAG(), classifier=FakeClassifier())
    with th.no_grad():
        eps, pictures = denoiser.guided_eps(x, t, times)
    assert pictures is not None and times.steps_left(t) == 1
    np.testing.assert_allclose(eps.double().numpy(), want, atol=2e-4)
