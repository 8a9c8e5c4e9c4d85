"""
The samplers, each one function over the guided denoiser
(:class:`~improved_diffusion.guidance.denoiser.GuidedDenoiser`): ancestral
(DDPM), DDIM, DPM-Solver++ and SDE-DPM-Solver++. None of them knows about
SAG; each asks the denoiser for its prediction at ``(x_t, t)`` and steps.

Every sampler is a generator ``sampler(denoiser, x_T, ...)`` of
``(index, step)``: the index counts the model evaluations still to come
(the published SAG window compares ``--guide_start`` with it), and `step`
holds the new 'sample' and, on SAG-guided evaluations, the SAG pictures
('sag_xstart', 'sag_mask', 'sag_degraded_xstart'). The last step's sample
is the result.

:class:`Sampler` is the sampler the flags choose (``--sampler``,
``--use_ddim``, ``--eta``, ``--solver_*``), fixed once per run;
docs/samplers.md describes the flags and docs/ARCHITECTURE.md shows how to
add a sampler.
"""

import dataclasses
from typing import Any, Optional

import torch as th

from .dpm_solver import SKIP_TYPES, TIME_MAPS, DiscreteVPSchedule, multistep_dpmpp
from ..gaussian_diffusion import get_named_beta_schedule
from ..guidance.denoiser import DiffusionTimes

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
# The samplers that take --solver_steps, --solver_order and --skip_type over the full schedule.
SOLVERS = ("dpmsolver++", "sde-dpmsolver++")


def _step(sample, pictures):
    """What a sampler yields for one step: the new sample, and the SAG pictures if guided."""
    step = {"sample": sample}
    if pictures is not None:
        step.update(sag_xstart=pictures["pred_xstart"], sag_mask=pictures["sag_mask"],
                    sag_degraded_xstart=pictures["sag_degraded_xstart"])
    return step


def _diffusion_steps(denoiser, x, diffusion, model_kwargs, take_step):
    """The loop of the discrete samplers: every step of `diffusion`, last index first."""
    times = DiffusionTimes(diffusion)
    kwargs = model_kwargs or {}
    for i in reversed(range(diffusion.num_timesteps)):
        t = th.full((x.shape[0],), i, device=x.device, dtype=th.long)
        with th.no_grad():
            denoised = denoiser(x, t, times, kwargs)
            x = take_step(denoised.as_model(), x, t, kwargs)["sample"]
        yield i, _step(x, denoised.pictures)


def ddpm(denoiser, x, *, diffusion, model_kwargs=None, generator=None):
    """
    Ancestral sampling over every step of `diffusion` (respaced or not):
    upstream's ``p_sample`` on the denoiser's prediction, classifier guidance
    as its mean shift (``condition_mean``), then the step's noise from
    `generator`.
    """
    def take_step(model, x, t, kwargs):
        return diffusion.p_sample(model, x, t, clip_denoised=denoiser.clip_denoised,
                                  cond_fn=denoiser.classifier, model_kwargs=kwargs, generator=generator)

    return _diffusion_steps(denoiser, x, diffusion, model_kwargs, take_step)


def ddim(denoiser, x, *, diffusion, eta=0.0, model_kwargs=None, generator=None):
    """
    DDIM over every step of `diffusion`: upstream's ``ddim_sample`` on the
    denoiser's prediction, classifier guidance as its score correction
    (``condition_score``); a noise draw per step whatever `eta` is.
    """
    def take_step(model, x, t, kwargs):
        return diffusion.ddim_sample(model, x, t, clip_denoised=denoiser.clip_denoised,
                                     cond_fn=denoiser.classifier, model_kwargs=kwargs, eta=eta,
                                     generator=generator)

    return _diffusion_steps(denoiser, x, diffusion, model_kwargs, take_step)


class SolverTimes:
    """
    The time of DPM-Solver++: t in (0, 1] of a :class:`DiscreteVPSchedule`.
    `evaluated` are the solver times the model is evaluated at, first (T)
    to last; an evaluation at t has as many after it as there are smaller
    ones (the index --guide_start is compared with).
    """

    def __init__(self, schedule, evaluated):
        self.schedule = schedule
        self.evaluated = evaluated

    def model_time(self, t):
        return self.schedule.model_time(t)

    def _coefficients(self, t):
        return self.schedule.alpha(t)[:, None, None, None], self.schedule.sigma(t)[:, None, None, None]

    def x0_from_eps(self, x, t, eps):
        alpha, sigma = self._coefficients(t)
        return (x - sigma * eps) / alpha

    def eps_from_x0(self, x, t, x0):
        alpha, sigma = self._coefficients(t)
        return (x - alpha * x0) / sigma

    def renoise(self, x0, t, eps):
        alpha, sigma = self._coefficients(t)
        return alpha * x0 + sigma * eps

    def sigma(self, t):
        return self._coefficients(t)[1]

    def steps_left(self, t):
        return int((self.evaluated < t[0]).sum())


def dpm_solver_pp(denoiser, x, *, schedule, steps, order=2, skip_type="time_uniform",
                  stochastic=False, model_kwargs=None, generator=None):
    """
    DPM-Solver++ (multistep, lower-order final steps below 10 steps, no
    denoise-to-zero: the official defaults) over `schedule`, the model's
    full schedule. At each evaluation the data prediction is
    ``(x - sigma_t * eps) / alpha_t`` from the denoiser's eps (SAG, then
    classifier guidance in noise form), clamped to [-1, 1] with
    clip_denoised (the official ``correcting_x0_fn``).

    Deterministic by default (`generator` is not drawn from). `stochastic`
    solves the reverse SDE instead (SDE-DPM-Solver++, orders 1 and 2): the
    same evaluations and step orders, and each update adds a noise draw
    from `generator`, one per update, after its evaluation.
    """
    noise_fn = generator.randn_like if stochastic else None
    kwargs = model_kwargs or {}
    solver_times = schedule.time_steps(skip_type, steps, device=x.device)
    times = SolverTimes(schedule, solver_times[:-1])
    evaluations = {}

    def x0_fn(x_t, t, _j):
        batch_t = t.expand(x_t.shape[0])
        eps, pictures = denoiser.guided_eps(x_t, batch_t, times, kwargs)
        x0 = (x_t - schedule.sigma(t) * eps) / schedule.alpha(t)
        evaluations["pictures"] = pictures
        return x0.clamp(-1, 1) if denoiser.clip_denoised else x0

    with th.no_grad():
        for j, x in multistep_dpmpp(x0_fn, schedule, x, solver_times, order, noise_fn=noise_fn):
            # Update j used the evaluation made at the j-th time: report its pictures.
            yield steps - 1 - j, _step(x, evaluations.pop("pictures", None))


def solver_schedule(args):
    """The DPM-Solver schedule of a model's flags: its full --diffusion_steps schedule."""
    betas = get_named_beta_schedule(args.noise_schedule, args.diffusion_steps)
    return DiscreteVPSchedule(betas, time_map=getattr(args, "solver_time_map", "official"),
                              rescale_timesteps=getattr(args, "rescale_timesteps", False))


def sampler_name(args):
    """--sampler, with --use_ddim True meaning ddim (refused with another sampler)."""
    name = getattr(args, "sampler", "ddpm")
    if getattr(args, "use_ddim", False):
        if name in SOLVERS:
            raise ValueError(f"--use_ddim True and --sampler {name} disagree; drop --use_ddim "
                             "(or pass --sampler ddim)")
        return "ddim"
    return name


def check_sampler_flags(args):
    """A ValueError naming the flag if the sampler flags are invalid."""
    name = sampler_name(args)
    if name not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    if name not in SOLVERS:
        return
    if args.solver_order not in (1, 2, 3):
        raise ValueError(f"--solver_order must be 1, 2 or 3, got {args.solver_order}")
    if name == "sde-dpmsolver++" and args.solver_order == 3:
        raise ValueError("--solver_order must be 1 or 2 with --sampler sde-dpmsolver++, got 3")
    if args.solver_steps < args.solver_order:
        raise ValueError(f"--solver_steps must be at least --solver_order ({args.solver_order}), "
                         f"got {args.solver_steps}")
    if args.skip_type not in SKIP_TYPES:
        raise ValueError(f"--skip_type must be one of {', '.join(SKIP_TYPES)}, got {args.skip_type!r}")
    if args.solver_time_map not in TIME_MAPS:
        raise ValueError(f"--solver_time_map must be one of {', '.join(TIME_MAPS)}, "
                         f"got {args.solver_time_map!r}")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """
    The sampler a run uses, with its settings fixed:
    ``sampler(denoiser, x_T, model_kwargs, generator)`` iterates its steps.

    :param name: "ddpm", "ddim", "dpmsolver++" or "sde-dpmsolver++".
    :param diffusion: the (respaced) GaussianDiffusion of ddpm and ddim.
    :param schedule: the :class:`DiscreteVPSchedule` of the two solvers.
    """

    name: str
    diffusion: Any = None
    schedule: Optional[DiscreteVPSchedule] = None
    eta: float = 0.0
    steps: int = 0
    order: int = 2
    skip_type: str = "time_uniform"

    @classmethod
    def ddpm(cls, diffusion):
        return cls("ddpm", diffusion=diffusion, steps=diffusion.num_timesteps)

    @classmethod
    def ddim(cls, diffusion, eta=0.0):
        return cls("ddim", diffusion=diffusion, eta=eta, steps=diffusion.num_timesteps)

    @classmethod
    def dpm_solver_pp(cls, schedule, steps, order=2, skip_type="time_uniform", stochastic=False):
        name = "sde-dpmsolver++" if stochastic else "dpmsolver++"
        return cls(name, schedule=schedule, steps=steps, order=order, skip_type=skip_type)

    @classmethod
    def from_args(cls, args, diffusion):
        """The sampler of the flags (checked by :func:`check_sampler_flags`)."""
        name = sampler_name(args)
        if name in SOLVERS:
            return cls.dpm_solver_pp(solver_schedule(args), args.solver_steps, args.solver_order,
                                     args.skip_type, stochastic=name == "sde-dpmsolver++")
        if name == "ddim":
            return cls.ddim(diffusion, args.eta)
        return cls.ddpm(diffusion)

    def __call__(self, denoiser, x, model_kwargs=None, generator=None):
        if self.name == "ddpm":
            return ddpm(denoiser, x, diffusion=self.diffusion, model_kwargs=model_kwargs,
                        generator=generator)
        if self.name == "ddim":
            return ddim(denoiser, x, diffusion=self.diffusion, eta=self.eta,
                        model_kwargs=model_kwargs, generator=generator)
        return dpm_solver_pp(denoiser, x, schedule=self.schedule, steps=self.steps, order=self.order,
                             skip_type=self.skip_type, stochastic=self.name == "sde-dpmsolver++",
                             model_kwargs=model_kwargs, generator=generator)

    def run(self, denoiser, x, model_kwargs=None, generator=None):
        """Sample to the end: the final x (the loop without its steps)."""
        for _, step in self(denoiser, x, model_kwargs, generator):
            pass
        return step["sample"]

    def model_timesteps(self):
        """index -> the model time of that evaluation (rounded), for picture names."""
        if self.schedule is None:
            mapping = getattr(self.diffusion, "timestep_map", None) or list(range(self.steps))
            return {i: int(mapping[i]) for i in range(self.steps)}
        evaluated = self.schedule.time_steps(self.skip_type, self.steps)[:-1]
        model_t = self.schedule.model_time(evaluated)
        return {self.steps - 1 - j: int(round(float(model_t[j]))) for j in range(self.steps)}

    def describe(self):
        """One line for the log."""
        if self.name == "ddpm":
            return f"{self.steps} ancestral steps"
        if self.name == "ddim":
            return f"{self.steps} DDIM steps (eta {self.eta})"
        end = ""
        if self.schedule.num_dropped:
            end = (f"; its last {self.schedule.num_dropped} steps (half log-SNR < -5.1) dropped, "
                   f"--solver_time_map {self.schedule.time_map}")
        kind = "SDE-DPM-Solver++" if self.name == "sde-dpmsolver++" else "DPM-Solver++"
        return (f"{kind} {self.order}M, {self.steps} steps ({self.skip_type}) over the full "
                f"{len(self.schedule.log_alpha_array) + self.schedule.num_dropped}-step schedule{end}")
