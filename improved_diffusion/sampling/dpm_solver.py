"""
DPM-Solver++ (Lu et al., arXiv 2211.01095): the multistep solver of the
diffusion ODE in data-prediction form, with the numerics of the official
code (LuChengTHU/dpm-solver, ``dpm_solver_pytorch.py`` at commit 8acf2bb:
``NoiseScheduleVP('discrete')``, ``DPM_Solver(algorithm_type='dpmsolver++')``,
``sample(method='multistep', lower_order_final=True)``, no denoise-to-zero),
and its stochastic variant SDE-DPM-Solver++ (the same paper's solver of the
reverse diffusion SDE, orders 1 and 2, with the update rule of diffusers'
``DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++',
solver_type='midpoint')``) over the same schedule and time steps.

:class:`DiscreteVPSchedule` is the continuous-time view of a discrete
schedule (alpha_t, sigma_t, lambda_t and the model's time), and
:func:`multistep_dpmpp` the solver over any data prediction ``x0(x, t)``.
The sampler that joins them to the guided denoiser is
``improved_diffusion.sampling.samplers.dpm_solver_pp``. docs/samplers.md explains the
choices (time map of cosine schedules, guidance window).
"""

import torch as th

# The official schedule drops the end of a discrete schedule whose half
# log-SNR is below this (cosine schedules; linear ones end above it).
CLIPPED_LAMBDA = -5.1
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
TIME_MAPS = ("official", "exact")


def interpolate(x, xp, fp):
    """
    The piecewise-linear function through (xp, fp) at x, extended past both
    ends by its outermost pieces, as the official ``interpolate_fn`` computes
    it (a point equal to a keypoint uses the piece that ends there).

    :param x: a 1-D tensor.
    :param xp: increasing keypoints, 1-D; fp: their values.
    """
    k = xp.shape[0]
    piece = (th.searchsorted(xp, x.contiguous(), side="left") - 1).clamp(0, k - 2)
    x0, x1, y0, y1 = xp[piece], xp[piece + 1], fp[piece], fp[piece + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule:
    """
    A discrete-time diffusion (model steps n = 0..N-1, betas) seen in
    continuous time t in (0, 1]: step n sits at t = (n + 1) / N, and log
    alpha_t is interpolated linearly in t between steps. Everything is
    float32, from float32 betas, as the official code computes it.

    The steps at the end of the schedule whose half log-SNR is below -5.1
    are dropped (cosine schedules: a handful; linear: none). `time_map` says
    where the kept steps sit:

    - "official" (the official code): the kept N' steps are spread over
      (0, 1] as if there were only N', and the model is asked at time
      ``1000 * (t - 1/N')``; so step n is queried as model time
      ``1000 * n / N'`` instead of n (up to 4 timesteps late for a 1000-step
      cosine model, which loses 4 steps).
    - "exact": each kept step keeps its own time (n + 1) / N, the solver
      starts at T = N' / N, and the model time of step n is n.

    With no step dropped (every linear schedule) both are the same.

    :param betas: the model's betas (its full --diffusion_steps schedule).
    :param rescale_timesteps: the model takes times scaled to 0..1000.
    """

    def __init__(self, betas, time_map="official", rescale_timesteps=False):
        if time_map not in TIME_MAPS:
            raise ValueError(f"time_map must be one of {TIME_MAPS}, got {time_map!r}")
        betas = th.as_tensor(betas).to(th.float32)
        log_alphas = 0.5 * th.log(1 - betas).cumsum(dim=0)
        lambdas = log_alphas - 0.5 * th.log(1.0 - th.exp(2.0 * log_alphas))
        dropped = int(th.searchsorted(th.flip(lambdas, [0]), CLIPPED_LAMBDA))
        num_steps = len(betas)
        kept = num_steps - dropped
        self.log_alpha_array = log_alphas[:kept]
        self.num_dropped = dropped
        self.time_map = time_map
        if time_map == "official":
            self.total_n = kept
            self.t_array = th.linspace(0.0, 1.0, kept + 1)[1:]
            self.T = 1.0
        else:
            self.total_n = num_steps
            self.t_array = th.linspace(0.0, 1.0, num_steps + 1)[1 : kept + 1]
            self.T = kept / num_steps
        self.t_end = 1.0 / self.total_n
        # What the model's time embedding expects for step n: n, or n scaled
        # to 0..1000. The official code always scales by 1000 (the same for
        # the 1000-step models it is written for).
        self.time_scale = 1000.0 if (rescale_timesteps or num_steps == 1000) else float(num_steps)

    def log_alpha(self, t):
        return interpolate(t.reshape(-1), self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def alpha(self, t):
        return th.exp(self.log_alpha(t))

    def sigma(self, t):
        return th.sqrt(1.0 - th.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t):
        """Half log-SNR: log alpha_t - log sigma_t."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * th.log(1.0 - th.exp(2.0 * log_alpha))

    def inverse_lambda(self, lam):
        """The time t whose half log-SNR is `lam`."""
        log_alpha = -0.5 * th.logaddexp(th.zeros((1,), device=lam.device), -2.0 * lam)
        xp = th.flip(self.log_alpha_array.to(lam.device), [0])
        fp = th.flip(self.t_array.to(lam.device), [0])
        return interpolate(log_alpha.reshape(-1), xp, fp)

    def model_time(self, t):
        """The time the network is given at solver time t (fractional)."""
        return (t - 1.0 / self.total_n) * self.time_scale

    def time_steps(self, skip_type, steps, device=None):
        """The `steps` + 1 solver times from T down to 1/N (official ``get_time_steps``)."""
        t_start, t_end = self.T, self.t_end
        if skip_type == "logSNR":
            lambda_start = self.lambda_(th.tensor(t_start)).item()
            lambda_end = self.lambda_(th.tensor(t_end)).item()
            return self.inverse_lambda(th.linspace(lambda_start, lambda_end, steps + 1)).to(device)
        if skip_type == "time_uniform":
            return th.linspace(t_start, t_end, steps + 1).to(device)
        if skip_type == "time_quadratic":
            return th.linspace(t_start**0.5, t_end**0.5, steps + 1).pow(2).to(device)
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")


def step_orders(steps, order, lower_order_final=True):
    """
    The order of each of the `steps` multistep updates: 1, 2, ... while the
    history fills, then `order`; with `lower_order_final` and fewer than 10
    steps, the last updates drop to the orders their remaining steps allow
    (the official rule: only below 10 steps).
    """
    orders = []
    for step in range(1, steps + 1):
        if step < order:
            orders.append(step)
        elif lower_order_final and steps < 10:
            orders.append(min(order, steps + 1 - step))
        else:
            orders.append(order)
    return orders


def multistep_update(schedule, x, x0_history, t_history, t, order):
    """
    One DPM-Solver++ multistep update of `order` (1, 2 or 3) from
    ``t_history[-1]`` to `t`, with the data predictions `x0_history` made at
    the times `t_history` (latest last). In half log-SNR lambda with
    h = lambda_t - lambda_s, the first-order update is DDIM,
    ``x_t = sigma_t / sigma_s * x - alpha_t * expm1(-h) * x0_s``, and higher
    orders add finite differences of the history.
    """
    s = t_history[-1]
    lambda_s, lambda_t = schedule.lambda_(s), schedule.lambda_(t)
    sigma_s, sigma_t = schedule.sigma(s), schedule.sigma(t)
    alpha_t = th.exp(schedule.log_alpha(t))
    h = lambda_t - lambda_s
    phi_1 = th.expm1(-h)
    m0 = x0_history[-1]
    if order == 1:
        return sigma_t / sigma_s * x - alpha_t * phi_1 * m0
    m1 = x0_history[-2]
    r0 = (lambda_s - schedule.lambda_(t_history[-2])) / h
    d1_0 = (1.0 / r0) * (m0 - m1)
    if order == 2:
        return (sigma_t / sigma_s) * x - (alpha_t * phi_1) * m0 - 0.5 * (alpha_t * phi_1) * d1_0
    if order != 3:
        raise ValueError(f"solver order must be 1, 2 or 3, got {order}")
    m2 = x0_history[-3]
    r1 = (schedule.lambda_(t_history[-2]) - schedule.lambda_(t_history[-3])) / h
    d1_1 = (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return (
        (sigma_t / sigma_s) * x
        - (alpha_t * phi_1) * m0
        + (alpha_t * phi_2) * d1
        - (alpha_t * phi_3) * d2
    )


def sde_multistep_update(schedule, x, x0_history, t_history, t, order, noise):
    """
    One SDE-DPM-Solver++ multistep update of `order` (1 or 2) from
    ``t_history[-1]`` to `t`, with `noise` a standard normal draw shaped like
    x. With h = lambda_t - lambda_s it is
    ``sigma_t / sigma_s * exp(-h) * x + alpha_t * (1 - exp(-2h)) * (m0 + D1 / 2)
    + sigma_t * sqrt(1 - exp(-2h)) * noise``, D1 the scaled difference of the
    last two data predictions (order 2; 0 at order 1): the reverse SDE's
    exponential integrator, whose first order is DDPM's posterior step with
    the predicted x_0.
    """
    s = t_history[-1]
    lambda_s, lambda_t = schedule.lambda_(s), schedule.lambda_(t)
    sigma_s, sigma_t = schedule.sigma(s), schedule.sigma(t)
    alpha_t = th.exp(schedule.log_alpha(t))
    h = lambda_t - lambda_s
    keep = -th.expm1(-2.0 * h)  # 1 - exp(-2h)
    x0 = x0_history[-1]
    if order == 2:
        r0 = (lambda_s - schedule.lambda_(t_history[-2])) / h
        x0 = x0 + 0.5 * (1.0 / r0) * (x0_history[-1] - x0_history[-2])
    elif order != 1:
        raise ValueError(f"SDE solver order must be 1 or 2, got {order}")
    return (sigma_t / sigma_s * th.exp(-h)) * x + (alpha_t * keep) * x0 + sigma_t * th.sqrt(keep) * noise


def multistep_dpmpp(x0_fn, schedule, x, times, order=2, lower_order_final=True, noise_fn=None):
    """
    Solve from x_T (`x`) at ``times[0]`` down to ``times[-1]`` in
    ``len(times) - 1`` multistep updates, one data prediction per update but
    the last (NFE = steps).

    :param x0_fn: ``x0_fn(x, t, j)`` -> the data prediction at solver time
        `t` (a 0-dim tensor), the j-th of the run (0 at T).
    :param times: the solver's times, :meth:`DiscreteVPSchedule.time_steps`.
    :param noise_fn: None for DPM-Solver++ (the ODE); for SDE-DPM-Solver++,
        ``noise_fn(x)`` -> the standard normal draw of one update (orders 1
        and 2), called once per update after its data prediction.
    :return: an iterator over ``(j, x)``: after update j + 1 (j = 0 ..
        steps - 1), the sample at the next time; the last one is the result.
    """
    steps = len(times) - 1
    max_order = 3 if noise_fn is None else 2
    if not 1 <= order <= max_order:
        raise ValueError(f"solver order must be 1 to {max_order}, got {order}")
    if steps < order:
        raise ValueError(f"the solver needs at least as many steps as its order ({order}), got {steps}")
    t_history = [times[0]]
    x0_history = [x0_fn(x, times[0], 0)]
    for step, step_order in enumerate(step_orders(steps, order, lower_order_final), start=1):
        t = times[step]
        if noise_fn is None:
            x = multistep_update(schedule, x, x0_history, t_history, t, step_order)
        else:
            x = sde_multistep_update(schedule, x, x0_history, t_history, t, step_order, noise_fn(x))
        yield step - 1, x
        t_history = (t_history + [t])[-order:]
        if step < steps:  # no evaluation after the last update
            x0_history = (x0_history + [x0_fn(x, t, step)])[-order:]
