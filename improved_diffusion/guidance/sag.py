"""
Self-Attention Guidance (Hong et al., arXiv 2210.00939): which block to read,
when to guide, and how strongly.

:class:`SelfAttentionGuidance` is held by the guided denoiser
(:mod:`improved_diffusion.guidance.denoiser`), which runs the guided step for
every sampler; the pure maths lives in :mod:`improved_diffusion.guidance.sag_ops`.
"""

import math

from .attention_capture import AttentionCapture
from . import sag_ops
from ..errors import UsageError

BLOCK_PARTS = ("input", "middle", "output")


class SAGConfigError(ValueError):
    """An invalid SAG setting (raised before any sampling)."""


def sag_defaults():
    """The seed's SAG flags and their defaults."""
    return dict(
        guide_scale=1.5,
        guide_start=250,
        sel_attn_block="output",
        sel_attn_depth=2,
        blur_sigma=9.0,
        classifier_guidance=False,
        sag_true_attention=False,
    )


# SelfAttentionGuidance's defaults are those of the flags that set them.
FLAG_DEFAULTS = sag_defaults()


def valid_choices(model):
    """A readable list of the blocks of `model` that have attention."""
    blocks = model.attention_blocks()
    parts = []
    for part in BLOCK_PARTS:
        depths = sorted(i for (p, i) in blocks if p == part)
        if not depths:
            continue
        if part == "middle":
            parts.append("--sel_attn_block middle")
        else:
            parts.append(
                f"--sel_attn_block {part} with --sel_attn_depth "
                + ",".join(str(d) for d in depths)
            )
    return "; ".join(parts)


def check_sag_values(scale, blur_sigma, block=FLAG_DEFAULTS["sel_attn_block"]):
    """
    The checks of the SAG flags that need no model (the one place they are
    made: the constructor and the command line both call it). Returns
    (scale, blur_sigma) as floats; raises :class:`SAGConfigError` naming the flag.
    """
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale):
        raise SAGConfigError(f"--guide_scale must be a finite number, got {scale}")
    try:
        blur_sigma = float(blur_sigma)
    except (TypeError, ValueError):
        blur_sigma = math.nan
    if not (math.isfinite(blur_sigma) and blur_sigma > 0):
        raise SAGConfigError(f"--blur_sigma must be a number > 0, got {blur_sigma}")
    if block not in BLOCK_PARTS:
        raise SAGConfigError(
            f"--sel_attn_block must be one of {', '.join(BLOCK_PARTS)}, got {block!r}"
        )
    return scale, blur_sigma


class SelfAttentionGuidance:
    """
    SAG settings bound to one model.

    :param model: the UNetModel being sampled (its attention block is hooked).
    :param scale: guide_scale s; 1 means no guidance (the second pass is skipped).
    :param start: an evaluation with index i (the respaced step index; for
        DPM-Solver++, the evaluations still to come) is guided when start > i.
    :param block: "output", "middle" or "input".
    :param depth: index of the block in that part (ignored for "middle").
    :param blur_sigma: standard deviation of the blur, in pixels (> 0).
    :param num_heads: the ``--num_heads`` flag. The published map splits qkv
        into this many heads in the legacy layout, whatever the block really
        runs (docs/sag.md, "The published map"). Required unless true_attention.
    :param true_attention: if True, use the attention the block really
        computes (its own head count and layout) instead of the published map.
    :param separable_blur: apply the blur as two 1-D passes (default; equal to
        the published 2-D convolution up to float rounding, and much faster).
    """

    def __init__(
        self,
        model,
        scale=FLAG_DEFAULTS["guide_scale"],
        start=FLAG_DEFAULTS["guide_start"],
        block=FLAG_DEFAULTS["sel_attn_block"],
        depth=FLAG_DEFAULTS["sel_attn_depth"],
        blur_sigma=FLAG_DEFAULTS["blur_sigma"],
        num_heads=None,
        true_attention=FLAG_DEFAULTS["sag_true_attention"],
        separable_blur=True,
    ):
        scale, blur_sigma = check_sag_values(scale, blur_sigma, block)
        key = ("middle", 0) if block == "middle" else (block, int(depth))
        blocks = model.attention_blocks()
        if key not in blocks:
            where = "the middle block" if block == "middle" else f"{block}_blocks[{depth}]"
            raise SAGConfigError(
                f"{where} has no attention layer in this model; choose {valid_choices(model)}"
            )
        self.block = blocks[key]
        self.location = key
        if not true_attention:
            if num_heads is None:
                raise SAGConfigError("the published attention map needs the --num_heads flag")
            width = self.block.channels
            if width % num_heads:
                raise SAGConfigError(
                    f"--num_heads {num_heads} does not divide the {width} channels of "
                    f"{block} block {depth}; pass --sag_true_attention True"
                )
        self.scale = scale
        self.start = int(start)
        self.blur_sigma = blur_sigma
        self.num_heads = num_heads
        self.true_attention = bool(true_attention)
        self.separable_blur = separable_blur

    @classmethod
    def from_args(cls, model, args):
        """
        Build from parsed script flags (sag_defaults() plus num_heads); a bad
        flag raises :class:`improved_diffusion.errors.UsageError` naming it.
        """

        try:
            return cls(
                model,
                scale=args.guide_scale,
                start=args.guide_start,
                block=args.sel_attn_block,
                depth=args.sel_attn_depth,
                blur_sigma=args.blur_sigma,
                num_heads=getattr(args, "num_heads", None),
                true_attention=getattr(
                    args, "sag_true_attention", FLAG_DEFAULTS["sag_true_attention"]
                ),
            )
        except SAGConfigError as e:
            raise UsageError(str(e)) from None

    def applies(self, index):
        """
        Whether an evaluation with `index` evaluations after it is guided (the
        published rule: the respaced step index i is guided when start > i).
        """
        return self.scale != 1.0 and self.start > int(index)

    def capture(self, keep="key_mass"):
        """
        A fresh AttentionCapture on the chosen block, with this map's head
        split. When the map is the block's own attention, the block computes
        its weights once for both its output and the capture.

        :param keep: "key_mass" (only what the mask needs) or "weights" (the
            whole map, for inspection).
        """
        if self.true_attention:
            return AttentionCapture(self.block, keep=keep)
        return AttentionCapture(self.block, num_heads=self.num_heads, legacy=True, keep=keep)

    def mask(self, capture, x_shape):
        """The [N x C x H x W] SAG mask from a capture of the first pass."""
        mass = capture.key_mass
        if mass is None:
            raise RuntimeError(
                f"no attention was captured at {self.location}: did the model run?"
            )
        assert mass.shape[0] == x_shape[0], (mass.shape, x_shape)
        return sag_ops.key_mass_mask(mass, tuple(x_shape[1:]))
