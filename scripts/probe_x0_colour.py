"""
Where do the default model's colour casts come from? One forward pass per
noise level on real training images: the colour cast of the model's x_0
prediction and its per-channel mean error, in levels of 0..255.

    python scripts/probe_x0_colour.py CHECKPOINT... [--data_dir data/fashion_train] [--n 128]

The first --n training images in file order, noised to each of --timesteps
with fixed noise (seed 0), are fed to every checkpoint (the flags of
models/fashion32_ema.json, float32); a checkpoint's row reads
"cast / mean error" per timestep. Seconds per checkpoint on a CPU, against
many minutes for sampling and scoring: a quick way to follow a training run.
"""

import argparse
import os
import sys

import torch as th

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from improved_diffusion.image_datasets import load_data  # noqa: E402
from improved_diffusion.model_card import flags_with_card  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "data", "fashion_train"))
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--timesteps", default="100,400,700,900,999")
    parser.add_argument("--card", default=os.path.join(REPO_ROOT, "models", "fashion32_ema.json"))
    args = parser.parse_args(argv)
    for path in [args.data_dir, *args.checkpoints]:
        if not os.path.exists(path):
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    flags = flags_with_card(args.card, model_and_diffusion_defaults())
    flags.update(timestep_respacing="", use_fp16=False)
    data = load_data(data_dir=args.data_dir, batch_size=args.n, image_size=flags["image_size"],
                     class_cond=True, deterministic=True, random_flip=False)
    x0, cond = next(data)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    print("| checkpoint | " + " | ".join(f"t = {t}" for t in timesteps) + " |")
    print("|---" * (len(timesteps) + 1) + "|")
    for path in args.checkpoints:
        model, diffusion = create_model_and_diffusion(**flags)
        model.load_state_dict(th.load(path, map_location="cpu", weights_only=True))
        model.eval()
        g = th.Generator().manual_seed(0)
        cells = []
        for t in timesteps:
            tt = th.full((len(x0),), t)
            x_t = diffusion.q_sample(x0, tt, noise=th.randn(x0.shape, generator=g))
            with th.no_grad():
                pred = diffusion.p_mean_variance(model, x_t, tt, clip_denoised=True,
                                                 model_kwargs=cond)["pred_xstart"]
            levels = (pred + 1) * 127.5
            cast = (levels.max(1).values - levels.min(1).values).mean().item()
            mean_error = (pred.mean((2, 3)) - x0.mean((2, 3))).abs().mean().item() * 127.5
            cells.append(f"{cast:.1f} / {mean_error:.1f}")
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
