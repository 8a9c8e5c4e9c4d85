"""
Which attention block's SAG mask falls on the content? SAG blurs its x_0
prediction where the mask is 1 and guides away from the blurred version, so
a block whose mask follows the object sharpens the object, one whose mask is
spread at random over object and background blurs both alike.

    python scripts/probe_sag_masks.py CHECKPOINT... [--data_dir data/fashion_train] [--n 64]

The first --n training images in file order, noised to each of --timesteps
with fixed noise (seed 0), go through every checkpoint once per attention
block, with the SAG mask of that block taken as sampling takes it (the
published map, --num_heads of the card). Foreground: the pixels that differ
from the image's background level (the median of its border pixels) by more
than --threshold in [-1, 1] units, so it suits images on a plain background
such as Fashion-MNIST's. A row per checkpoint and block reads "on object / on
background" per timestep: the share of foreground pixels the mask covers and
the share of background pixels it covers. A mask that ignores the content
covers both alike. The model's flags come from --card, with the model flags
of the model_flags.json beside a checkpoint where there is one.
"""

import argparse
import os
import sys

import torch as th

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from improved_diffusion.image_datasets import load_data  # noqa: E402
from improved_diffusion.model_card import flags_with_card, run_flags  # noqa: E402
from improved_diffusion.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def foreground(images, threshold=0.1):
    """
    [N x H x W] bool: the pixels of images [N x C x H x W] (in [-1, 1]) that
    differ from their image's background level, the median of its border
    pixels, by more than `threshold` in some channel.
    """
    border = th.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]],
                    dim=2)
    level = border.median(dim=2).values[:, :, None, None]
    return ((images - level).abs() > threshold).any(dim=1)


def coverage(mask, fg):
    """(share of the foreground pixels the mask covers, share of the background ones)."""
    mask, fg = mask.bool(), fg.bool()
    on = (mask & fg).sum().item() / max(1, fg.sum().item())
    off = (mask & ~fg).sum().item() / max(1, (~fg).sum().item())
    return on, off


def block_masks(model, diffusion, x_t, t, cond, num_heads):
    """{(part, depth): the [N x H x W] SAG mask of that block} for one forward pass each."""
    masks = {}
    for part, depth in sorted(model.attention_blocks()):
        sag = SelfAttentionGuidance(model, scale=2.0, block=part, depth=depth,
                                    num_heads=num_heads)
        with th.no_grad(), sag.capture() as attention:
            diffusion.p_mean_variance(model, x_t, t, model_kwargs=cond)
        masks[(part, depth)] = sag.mask(attention, x_t.shape)[:, 0]
    return masks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "data", "fashion_train"))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--timesteps", default="100,300,500,700,900")
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--card", default=os.path.join(REPO_ROOT, "models", "fashion32_ema.json"))
    args = parser.parse_args(argv)
    for path in [args.data_dir, *args.checkpoints]:
        if not os.path.exists(path):
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    flags = flags_with_card(args.card, model_and_diffusion_defaults())
    flags.update(timestep_respacing="", use_fp16=False)
    data = load_data(data_dir=args.data_dir, batch_size=args.n, image_size=flags["image_size"],
                     class_cond=flags["class_cond"], deterministic=True, random_flip=False)
    x0, cond = next(data)
    fg = foreground(x0, args.threshold)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    print(f"foreground: {fg.float().mean().item():.3f} of the pixels")
    print("| checkpoint | block | " + " | ".join(f"t = {t}" for t in timesteps) + " |")
    print("|---" * (len(timesteps) + 2) + "|")
    for path in args.checkpoints:
        model_flags = {**flags, **run_flags(path)}
        model, diffusion = create_model_and_diffusion(**model_flags)
        model.load_state_dict(th.load(path, map_location="cpu", weights_only=True))
        model.eval()
        g = th.Generator().manual_seed(0)
        cells = {}
        for t in timesteps:
            tt = th.full((len(x0),), t)
            x_t = diffusion.q_sample(x0, tt, noise=th.randn(x0.shape, generator=g))
            masks = block_masks(model, diffusion, x_t, tt, cond, model_flags["num_heads"])
            for key, mask in masks.items():
                cells.setdefault(key, []).append("%.2f / %.2f" % coverage(mask, fg))
        for (part, depth), row in cells.items():
            block = "middle" if part == "middle" else f"{part} {depth}"
            print(f"| {path} | {block} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
