"""
Where do the default model's colour casts come from? One forward pass per
noise level on real training images: the colour cast of the model's x_0
prediction and its per-channel mean error, in levels of 0..255, and r, the
correlation between the predicted and the true noise's per-image,
per-channel spatial mean (less the image's mean over channels: the colour
part). The data is gray, so x_t's colour part is noise alone and a perfect
model has r = 1; a network that cannot carry a per-channel mean to its
output has r near 0 and turns that noise into a colour cast.

    python scripts/probe_x0_colour.py CHECKPOINT... [--data_dir data/fashion_train] [--n 128]

The first --n training images in file order, noised to each of --timesteps
with fixed noise (seed 0), are fed to every checkpoint (the flags of
models/fashion32_ema.json, with the model flags of the model_flags.json
beside the checkpoint where there is one; float32); a checkpoint's row reads
"cast / mean error / r" per timestep. Seconds per checkpoint on a CPU, against
many minutes for sampling and scoring: a quick way to follow a training run.
"""

import os
import sys

import torch as th

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from improved_diffusion.checkpoints.loading import model_from_card  # noqa: E402
from improved_diffusion.checkpoints.probes import probe_argparser, read_probe_inputs  # noqa: E402
from improved_diffusion.errors import UsageError  # noqa: E402


def _colour_of_mean(x):
    """Per-image, per-channel spatial mean, less its mean over channels."""
    m = x.mean((2, 3))
    return m - m.mean(1, keepdim=True)


def _correlation(a, b):
    a = a.flatten() - a.mean()
    b = b.flatten() - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def main(argv=None):
    args = probe_argparser(__doc__, n=128, timesteps="100,400,700,900,999").parse_args(argv)
    try:
        _, x0, cond, timesteps = read_probe_inputs(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| checkpoint | " + " | ".join(f"t = {t}" for t in timesteps) + " |")
    print("|---" * (len(timesteps) + 1) + "|")
    for path in args.checkpoints:
        model, diffusion, _ = model_from_card(path, args.card, timestep_respacing="", use_fp16=False)
        g = th.Generator().manual_seed(0)
        cells = []
        for t in timesteps:
            tt = th.full((len(x0),), t)
            noise = th.randn(x0.shape, generator=g)
            x_t = diffusion.q_sample(x0, tt, noise=noise)
            with th.no_grad():
                unclipped = diffusion.p_mean_variance(model, x_t, tt, clip_denoised=False,
                                                      model_kwargs=cond)["pred_xstart"]
            pred = unclipped.clamp(-1, 1)  # = clip_denoised=True
            levels = (pred + 1) * 127.5
            cast = (levels.max(1).values - levels.min(1).values).mean().item()
            mean_error = (pred.mean((2, 3)) - x0.mean((2, 3))).abs().mean().item() * 127.5
            eps = diffusion._predict_eps_from_xstart(x_t, tt, unclipped)
            r = _correlation(_colour_of_mean(eps), _colour_of_mean(noise))
            cells.append(f"{cast:.1f} / {mean_error:.1f} / {r:.2f}")
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
