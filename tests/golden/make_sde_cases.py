"""
Draw the SDE-DPM-Solver++ fixture of tests/golden (sde_dpmpp_diffusers.npz)
with diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
solver_type="midpoint"), the outside implementation whose update rule
``--sampler sde-dpmsolver++`` follows. diffusers is not a dependency of this
project: install it anywhere and put it on the path. The fixture was made with

    pip install --target /tmp/dpkgs diffusers==0.42.1
    PYTHONPATH=/tmp/dpkgs OMP_NUM_THREADS=1 python tests/golden/make_sde_cases.py --out tests/golden

Each case: the linear 1000-step schedule (the fork's betas, as diffusers'
trained_betas), the model eps(x, n) = 0.97 x + 0.05 tanh(2 x) n / 1000 of
:func:`fake_eps` (n its timestep), eps predictions turned into data
predictions by the scheduler, no clipping; x_T and one noise tensor per
update drawn from seeded generators and handed to ``step(variance_noise=)``.
The timesteps are the fork's time_uniform solver times, which sit on the
schedule's own steps for these step counts (999 - k * 999 / steps), and the
last update goes to step 0 (final_sigmas_type="sigma_min"). diffusers lowers
the last update's order below 15 steps, the fork (as the official
DPM-Solver) below 10, so the cases use 9 steps (both lower it) and 27 steps
(diffusers with lower_order_final=False). Stored: x_T, the noises, the
sample after every update.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from improved_diffusion.gaussian_diffusion import get_named_beta_schedule  # noqa: E402

# name: (steps, order, diffusers' lower_order_final)
CASES = {"order2_9steps": (9, 2, True), "order2_27steps": (27, 2, False), "order1_9steps": (9, 1, True)}
SHAPE = (2, 3, 6, 6)


def fake_eps(x, n):
    """
    A smooth nonlinear noise prediction, the same function in both
    implementations: close to x itself (what the true eps is where x_t is
    nearly all noise), so that the data predictions stay of order 1.
    """
    return 0.97 * x + 0.05 * torch.tanh(2.0 * x) * (n / 1000.0)


def draw(steps, order, lower_order_final, seed):
    from diffusers import DPMSolverMultistepScheduler

    betas = get_named_beta_schedule("linear", 1000)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=betas, algorithm_type="sde-dpmsolver++",
        solver_order=order, solver_type="midpoint", prediction_type="epsilon", thresholding=False,
        lower_order_final=lower_order_final, final_sigmas_type="sigma_min")
    assert 999 % steps == 0
    timesteps = [999 - k * (999 // steps) for k in range(steps)]
    scheduler.set_timesteps(timesteps=timesteps)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(SHAPE, generator=gen)
    noises = torch.randn((steps,) + SHAPE, generator=gen)
    x, samples = x_T.clone(), []
    for k, n in enumerate(scheduler.timesteps):
        eps = fake_eps(x, float(n))
        x = scheduler.step(eps, n, x, variance_noise=noises[k]).prev_sample
        samples.append(x.clone())
    return dict(x_T=x_T.numpy(), noises=noises.numpy(), samples=torch.stack(samples).numpy(),
                timesteps=np.array(timesteps + [0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    arrays = {}
    for seed, (name, (steps, order, lower)) in enumerate(CASES.items()):
        for key, value in draw(steps, order, lower, seed).items():
            arrays[f"{name}/{key}"] = value
    path = os.path.join(args.out, "sde_dpmpp_diffusers.npz")
    np.savez(path, **arrays)
    print(f"wrote {path}: {', '.join(CASES)}")


if __name__ == "__main__":
    main()
