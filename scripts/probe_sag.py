"""
What SAG does to a model's x_0 prediction, block by block, in seconds rather
than a sweep: where each attention block's mask falls, and whether the model
puts back the detail that SAG's blur takes away.

    python scripts/probe_sag.py CHECKPOINT... [--data_dir data/fashion_train] [--n 64]
        [--blur_sigma 3] [--timesteps 100,300,500,700,900]

One SAG step with an unclipped x_0 (x0) and the first pass's eps degrades x0
to x0_blur (blurred where the mask is 1), re-noises it with that eps and asks
the model again, which gives x0_bar. Then, exactly,

    guided x_0 = x0 - (s - 1) * (x0_bar - x0_blur)

(tests/test_probe_sag.py checks it against the sampler). Write
x0_bar - x0_blur = c * (x0 - x0_blur) + rest, with c the least-squares
coefficient ("restored"): c near 0, the model keeps the blur and SAG hardly
moves x0; c > 0, the model puts the blurred-away detail back and SAG at
s > 1 takes c * (s - 1) of that detail out of x0 (it smooths where the mask
is); c < 0, the model smooths further and SAG at s > 1 sharpens.

The first --n training images in file order, noised to each of --timesteps
with fixed noise (seed 0), go through every checkpoint with each attention
block's mask taken as sampling takes it (the published map, the card's
--num_heads). Foreground: the pixels that differ from their image's
background level (the median of its border pixels) by more than --threshold
in [-1, 1] units (images on a plain background, such as Fashion-MNIST). A
row per checkpoint and block reads "on object / on background / restored"
per timestep: the share of the foreground and of the background pixels the
mask covers (a mask that ignores the content covers both alike) and c. The
model's flags come from --card, with the model flags of the
model_flags.json beside a checkpoint where there is one.
"""

import os
import sys

import torch as th

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from improved_diffusion.checkpoints.loading import model_from_card  # noqa: E402
from improved_diffusion.checkpoints.probes import probe_argparser, read_probe_inputs  # noqa: E402
from improved_diffusion.errors import UsageError  # noqa: E402
from improved_diffusion.guidance.denoiser import DiffusionTimes, GuidedDenoiser  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402


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


def sag_step_parts(model, diffusion, x_t, t, cond, sag):
    """
    (mask, x0, x0_blur, x0_bar) of one SAG step at x_t, unclipped, from the
    guided denoiser's pictures: the first pass's x_0 and the block's mask,
    x_0 blurred under the mask, and the second pass's x_0 on it re-noised
    with the first pass's eps. `sag` must apply at t (its start above t).
    """
    denoiser = GuidedDenoiser.for_diffusion(model, diffusion, clip_denoised=False, sag=sag)
    with th.no_grad():
        pictures = denoiser(x_t, t, DiffusionTimes(diffusion), cond).pictures
    assert pictures is not None, "SAG does not apply at this t (its --guide_start)"
    return (pictures["sag_mask"], pictures["pred_xstart"], pictures["sag_degraded_xstart"],
            pictures["second_pass_xstart"])


def restored(x0, x0_blur, x0_bar):
    """c: the least-squares coefficient of x0_bar - x0_blur on x0 - x0_blur."""
    detail, back = (x0 - x0_blur).flatten().double(), (x0_bar - x0_blur).flatten().double()
    return (back @ detail / (detail @ detail).clamp(min=1e-30)).item()


def main(argv=None):
    parser = probe_argparser(__doc__, n=64, timesteps="100,300,500,700,900")
    parser.add_argument("--blur_sigma", type=float, default=3.0)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        _, x0, cond, timesteps = read_probe_inputs(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fg = foreground(x0, args.threshold)
    print(f"foreground: {fg.float().mean().item():.3f} of the pixels; blur sigma {args.blur_sigma:g}")
    print("| checkpoint | block | " + " | ".join(f"t = {t}" for t in timesteps) + " |")
    print("|---" * (len(timesteps) + 2) + "|")
    for path in args.checkpoints:
        model, diffusion, flags = model_from_card(path, args.card, timestep_respacing="",
                                                  use_fp16=False)
        noised = []
        g = th.Generator().manual_seed(0)
        for t in timesteps:
            tt = th.full((len(x0),), t)
            noised.append((tt, diffusion.q_sample(x0, tt, noise=th.randn(x0.shape, generator=g))))
        for part, depth in sorted(model.attention_blocks()):
            sag = SelfAttentionGuidance(model, scale=2.0, start=diffusion.num_timesteps,
                                        block=part, depth=depth, blur_sigma=args.blur_sigma,
                                        num_heads=flags["num_heads"])
            cells = []
            for tt, x_t in noised:
                mask, pred, blurred, bar = sag_step_parts(model, diffusion, x_t, tt, cond, sag)
                on, off = coverage(mask[:, 0], fg)
                cells.append(f"{on:.2f} / {off:.2f} / {restored(pred, blurred, bar):+.2f}")
            block = "middle" if part == "middle" else f"{part} {depth}"
            print(f"| {path} | {block} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
