"""
DPM-Solver++ against expectations computed without the solver.

- On Gaussian data, x_0 ~ N(MU, S^2), the exact noise prediction is linear
  in x_t and the probability-flow ODE is solved in closed form: it maps x_T
  to ``alpha_e MU + sqrt(v_e / v_T) (x_T - alpha_T MU)``, with
  ``v = alpha^2 S^2 + sigma^2`` at both ends (the ODE transports the
  marginal N(alpha MU, v) affinely). The solver, given that exact
  prediction, must converge to it, faster with higher order.
- SDE-DPM-Solver++ given the same prediction solves the reverse SDE, whose
  samples at the end are distributed as the data noised to that step,
  N(alpha_e MU, v_e): their mean and spread must approach it, the spread's
  error halving with the step at order 1 and falling faster at order 2.
- The solver's time steps for each skip type, from the official
  ``get_time_steps`` rules written out here in float64 numpy.

The schedule's numbers (alpha_bar of each step) come from numpy's cumprod
of the betas; the solver computes its own in float32 from log(1 - beta).
"""

import numpy as np
import pytest
import torch as th

from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
from improved_diffusion.guidance.denoiser import GuidedDenoiser
from improved_diffusion.sampling.dpm_solver import DiscreteVPSchedule
from improved_diffusion.sampling.samplers import Sampler

MU, S = 0.3, 0.5
N = 1000


def alphas_cumprod(name):
    """alpha_bar of each step from the float32 betas the solver starts from, in float64."""
    betas = get_named_beta_schedule(name, N)
    return betas, np.cumprod(1.0 - betas.astype(np.float32).astype(np.float64))


class ExactGaussianEps(th.nn.Module):
    """
    The exact noise prediction for N(MU, S^2) data at model time n
    (fractional): ``E[eps | x_t] = sigma (x - alpha MU) / (alpha^2 S^2 + sigma^2)``,
    with log alpha linear between the steps (the solver's continuous-time
    view of a discrete schedule), in float64 numpy.
    """

    def __init__(self, abar):
        super().__init__()
        self.log_alpha = 0.5 * np.log(abar)

    def forward(self, x, t):
        log_alpha = np.interp(t.double().numpy(), np.arange(N), self.log_alpha)[:, None, None, None]
        alpha = np.exp(log_alpha)
        var_noise = 1.0 - alpha**2
        eps = np.sqrt(var_noise) * (x.double().numpy() - alpha * MU) / (alpha**2 * S**2 + var_noise)
        return th.from_numpy(eps).to(x.dtype)


def ode_solution(x_T, abar):
    """The probability-flow ODE from step N-1 (t = 1) to step 0 (t = 1/N), in closed form."""
    a_T, a_e = np.sqrt(abar[-1]), np.sqrt(abar[0])
    v_T = a_T**2 * S**2 + 1 - a_T**2
    v_e = a_e**2 * S**2 + 1 - a_e**2
    return a_e * MU + np.sqrt(v_e / v_T) * (x_T.double().numpy() - a_T * MU)


@pytest.fixture(scope="module")
def solve():
    betas, abar = alphas_cumprod("linear")
    schedule = DiscreteVPSchedule(betas)
    x_T = th.randn(2048, 1, 1, 1, generator=th.Generator().manual_seed(0))
    want = ode_solution(x_T, abar)
    model = ExactGaussianEps(abar)

    def error(steps, order, skip_type):
        denoiser = GuidedDenoiser(model, learn_sigma=False, clip_denoised=False)
        got = Sampler.dpm_solver_pp(schedule, steps, order, skip_type).run(denoiser, x_T.clone())
        return float(np.abs(got.double().numpy() - want).max())

    return error


@pytest.mark.parametrize("skip_type", ["logSNR", "time_quadratic"])
def test_solver_converges_to_the_closed_form_faster_with_higher_order(solve, skip_type):
    errors = {(order, steps): solve(steps, order, skip_type) for order in (1, 2, 3) for steps in (20, 40, 80)}
    for steps in (20, 40, 80):
        assert errors[1, steps] > errors[2, steps] > errors[3, steps], errors
    for steps in (20, 40):
        # Halving the step: first order halves its error, second order
        # quarters it; third order does at least as well (log alpha is only
        # piecewise linear between the schedule's steps, which caps it).
        assert 1.8 < errors[1, steps] / errors[1, 2 * steps] < 2.2, errors
        assert errors[2, steps] / errors[2, 2 * steps] > 3.3, errors
        assert errors[3, steps] / errors[3, 2 * steps] > 3.3, errors
    assert errors[3, 80] < 2e-3 and errors[2, 80] < 3e-3, errors


class _Normal:
    """A generator of the SDE solver's noise: one seeded stream for the whole batch."""

    def __init__(self, seed):
        self.generator = th.Generator().manual_seed(seed)

    def randn_like(self, x):
        return th.randn(x.shape, generator=self.generator)


def test_sde_solver_samples_the_noised_data_distribution():
    betas, abar = alphas_cumprod("linear")
    schedule = DiscreteVPSchedule(betas)
    a_e = np.sqrt(abar[0])
    want_mean, want_std = a_e * MU, np.sqrt(a_e**2 * S**2 + 1 - a_e**2)
    n = 1 << 17  # standard errors: 0.0014 for the mean, 0.001 for the spread
    errors = {}
    for order in (1, 2):
        for steps in (20, 40, 80):
            x_T = th.randn(n, 1, 1, 1, generator=th.Generator().manual_seed(1))
            denoiser = GuidedDenoiser(ExactGaussianEps(abar), learn_sigma=False, clip_denoised=False)
            sampler = Sampler.dpm_solver_pp(schedule, steps, order, "logSNR", stochastic=True)
            got = sampler.run(denoiser, x_T, {}, _Normal(2)).double().numpy()
            assert abs(got.mean() - want_mean) < 0.006, (order, steps, got.mean())
            errors[order, steps] = abs(got.std() - want_std)
    assert 1.6 < errors[1, 20] / errors[1, 40] < 2.3 and 1.6 < errors[1, 40] / errors[1, 80] < 2.3, errors
    for steps in (20, 40, 80):
        assert errors[2, steps] < errors[1, steps] / 4, errors
    assert errors[2, 80] < 0.005, errors


def official_time_steps(log_alpha, t_array, skip_type, steps):
    """
    The official ``get_time_steps`` from t_T = 1 to t_0 = 1 / len(t_array),
    in float64 from the steps' log alpha: logSNR steps uniform in the half
    log-SNR, mapped back to time through log alpha, linear in t between the
    kept steps.
    """
    t_T, t_0 = 1.0, 1.0 / len(t_array)
    if skip_type == "time_uniform":
        return np.linspace(t_T, t_0, steps + 1)
    if skip_type == "time_quadratic":
        return np.linspace(np.sqrt(t_T), np.sqrt(t_0), steps + 1) ** 2
    lam = log_alpha - 0.5 * np.log(1.0 - np.exp(2.0 * log_alpha))
    wanted = np.linspace(lam[-1], lam[0], steps + 1)
    log_alpha_wanted = -0.5 * np.logaddexp(0.0, -2.0 * wanted)
    return np.interp(log_alpha_wanted, log_alpha[::-1], t_array[::-1])


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
@pytest.mark.parametrize("steps", [5, 20])
def test_time_steps_follow_the_official_rules(name, skip_type, steps):
    betas, abar = alphas_cumprod(name)
    # The official schedule keeps the steps whose half log-SNR is >= -5.1
    # (all of a linear schedule) and spreads them over (0, 1].
    half_log_snr = 0.5 * np.log(abar / (1.0 - abar))
    kept = int((half_log_snr >= -5.1).sum())
    t_array = np.arange(1, kept + 1) / kept
    # The official code sums 0.5 log(1 - beta) in float32; that sum moves the
    # logSNR times by up to 1e-4 against float64, so it is taken here too.
    log_alpha = np.cumsum(0.5 * np.log(1.0 - betas.astype(np.float32)), dtype=np.float32)
    want = official_time_steps(log_alpha[:kept].astype(np.float64), t_array, skip_type, steps)
    got = DiscreteVPSchedule(betas, time_map="official").time_steps(skip_type, steps)
    assert got.dtype == th.float32 and got.shape == (steps + 1,)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-6, atol=1e-7)
    assert got[0] == 1.0 and float(got[-1]) == pytest.approx(1.0 / kept, rel=1e-6)
