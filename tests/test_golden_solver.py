"""
DPM-Solver++ against the official solver (LuChengTHU/dpm-solver at 8acf2bb):
the cases of tests/golden/solver_cases.json drawn by
tests/golden/make_solver_cases.py, through the scripts: the npz within the
stated tolerance of tests/golden/README, and the float samples before the
uint8 cast equal to the official ones up to float rounding (atol 1e-5). The
two visible solver cases of cases.json (uint8 only) are here too. Then
SDE-DPM-Solver++ against diffusers' implementation of it, update by update.
"""

import os

import numpy as np
import pytest
import torch as th

from golden.make_sde_cases import fake_eps
from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
from improved_diffusion.guidance.denoiser import GuidedDenoiser
from improved_diffusion.sampling.dpm_solver import DiscreteVPSchedule
from improved_diffusion.sampling.samplers import Sampler
from golden_cases import (
    CASES,
    SOLVER_CASES,
    check_golden_case,
    golden_path,
)

SOLVER_GOLDEN = sorted(SOLVER_CASES) + sorted(n for n in CASES if "dpmpp" in n)


@pytest.mark.parametrize("name", SOLVER_GOLDEN)
def test_golden_case(name, tmp_path):
    check_golden_case(name, tmp_path)


def test_solver_cases_cover_orders_steps_and_guidance():
    """What the official solver's cases exercise (besides the two golden ones)."""
    flags = {name: case["sample_flags"] + " " + case["sag_flags"] for name, case in SOLVER_CASES.items()}
    for name, case in SOLVER_CASES.items():
        assert "--sampler dpmsolver++" in flags[name] and "timestep_respacing" not in case["model_flags"]
        assert os.path.isfile(golden_path(case["expected"]))
    text = " | ".join(flags.values())
    for needed in ("--solver_order 1", "--solver_order 3", "--skip_type logSNR", "--solver_steps 12",
                   "--solver_steps 7", "--classifier_guidance True"):
        assert needed in text, needed


# ---------------------------------------------------------------------------
# SDE-DPM-Solver++ against diffusers' (tests/golden/make_sde_cases.py)
# ---------------------------------------------------------------------------

SDE_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "sde_dpmpp_diffusers.npz")


class _ListedNoise:
    """A generator that hands out the fixture's noises, one per update."""

    def __init__(self, noises):
        self.noises = list(noises)

    def randn_like(self, x):
        return self.noises.pop(0)


class _FakeEps(th.nn.Module):
    def forward(self, x, t):
        return fake_eps(x, t[:, None, None, None])


@pytest.mark.parametrize("case", ["order2_9steps", "order2_27steps", "order1_9steps"])
def test_sde_solver_equals_diffusers_every_update(case):
    with np.load(SDE_FIXTURE) as z:
        data = {key.split("/")[1]: z[key] for key in z.files if key.startswith(case + "/")}
    steps = len(data["noises"])
    order = 1 if case.startswith("order1") else 2
    schedule = DiscreteVPSchedule(get_named_beta_schedule("linear", 1000))
    sampler = Sampler.dpm_solver_pp(schedule, steps, order, "time_uniform", stochastic=True)
    # The solver's times sit on the schedule's steps, as the fixture's timesteps do.
    assert sampler.model_timesteps() == {steps - 1 - k: int(n) for k, n in enumerate(data["timesteps"][:-1])}
    denoiser = GuidedDenoiser(_FakeEps(), learn_sigma=False, clip_denoised=False)
    noise = _ListedNoise(th.from_numpy(n) for n in data["noises"])
    got = [step["sample"].numpy() for _, step in sampler(denoiser, th.from_numpy(data["x_T"]), {}, noise)]
    assert not noise.noises
    # float32 both sides; the schedules' alpha_t differ in the last bits (log-cumsum vs cumprod).
    np.testing.assert_allclose(np.stack(got), data["samples"], atol=2e-5, rtol=1e-5)
