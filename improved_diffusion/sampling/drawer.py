"""
Drawing one seeded batch of samples (:class:`BatchDrawer`, what a script
hands the run; :func:`make_drawer` builds it from the flags), and what the
sampling scripts build around it: the SAG pictures as a per-step callback,
the uint8 cast, the log lines.

The seed contract (docs/sag.md): the sample at position p of a run depends
on ``seed + p`` alone, whatever the batch size and number of ranks.
"""

import dataclasses
import os
from typing import Any, Callable, Optional, Tuple

import torch as th

from .. import dist_util
from ..errors import NonFiniteSamplesError
from ..guidance.denoiser import ClassifierGuidance, GuidedDenoiser
from ..run.pictures import AttentionMaskRecorder
from .random_util import BatchGenerator
from .samplers import Sampler


@dataclasses.dataclass(frozen=True)
class BatchDrawer:
    """
    ``drawer(positions, step_callback=None)`` -> (uint8 NHWC images, int64
    labels or None): the samples at `positions` of the run (seed contract),
    with what a sampling script fixed once (the run calls it for every batch).

    Each position p gets a CPU generator seeded ``seed + p``; it draws its
    label first (when `draw_labels`), then x_T, then every step's noise (the
    ancestral and DDIM samplers; DPM-Solver++ draws none).

    :param sampler: the :class:`~improved_diffusion.sampling.samplers.Sampler` of the run.
    :param denoiser: the :class:`~improved_diffusion.guidance.denoiser.GuidedDenoiser`
        (the model with SAG and classifier guidance).
    :param image_shape: (C, H, W) of one sample.
    :param draw_labels: draw a label in 0..num_classes-1 per position (model kwarg ``y``).
    :param batch_inputs: optional ``batch_inputs(positions)`` -> (model_kwargs,
        labels or None) for inputs that come with the positions (the low-
        resolution images of super-resolution and their labels).

    ``step_callback``, if given, is called as ``step_callback(index, step)``
    after every step with the index of the step's model evaluation (counting
    down to 0) and the sampler's step dict (which holds 'sag_xstart',
    'sag_mask' and 'sag_degraded_xstart' on guided steps).
    """

    sampler: Any
    denoiser: Any
    image_shape: Tuple[int, int, int]
    device: Any
    seed: int
    draw_labels: bool = False
    num_classes: int = 1000
    batch_inputs: Optional[Callable] = None

    def __call__(self, positions, step_callback=None):
        model_kwargs, labels = {}, None
        if self.batch_inputs is not None:
            model_kwargs, labels = self.batch_inputs(positions)
        model_kwargs = dict(model_kwargs)
        gen = BatchGenerator([self.seed + p for p in positions])
        if self.draw_labels:
            drawn = gen.randint(self.num_classes, device=self.device)
            model_kwargs["y"] = drawn
            labels = drawn.cpu().numpy()
        x = gen.randn((len(positions), *self.image_shape), device=self.device)
        for index, step in self.sampler(self.denoiser, x, model_kwargs, gen):
            if step_callback is not None:
                step_callback(index, step)
        return to_uint8(step["sample"], positions), labels


def make_drawer(args, model, diffusion, sag, classifier=None, *, labels_always=False,
                batch_inputs=None, image_size=None):
    """
    The drawer of a sampling script's flags: the sampler (``--sampler``,
    ``--use_ddim``, ``--eta``, ``--solver_*``), the guided denoiser (SAG,
    and classifier guidance at ``--classifier_scale`` when `classifier` is
    given) and the seed contract.

    :param labels_always: draw a label for every position even for an
        unconditional model (classifier_sample.py: the classifier needs them;
        the model then does not see them).
    :param batch_inputs: inputs (and labels) that come with the positions
        (super-resolution); no label is drawn then.
    :param image_size: the samples' size (default ``--image_size``).
    """
    model_fn = model
    if labels_always and not args.class_cond:
        model_fn = _without_labels(model)
    guidance = None
    if classifier is not None:
        guidance = ClassifierGuidance(classifier, args.classifier_scale)
    denoiser = GuidedDenoiser.for_diffusion(model_fn, diffusion, clip_denoised=args.clip_denoised,
                                            sag=sag, classifier=guidance)
    size = image_size or args.image_size
    draw_labels = (labels_always or args.class_cond) and batch_inputs is None
    return BatchDrawer(Sampler.from_args(args, diffusion), denoiser, (3, size, size),
                       dist_util.dev(), args.seed, draw_labels=draw_labels,
                       num_classes=args.num_classes, batch_inputs=batch_inputs)


def _without_labels(model):
    """The model of an unconditional run whose labels are the classifier's only."""

    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)

    return model_fn


def to_uint8(sample, positions=None):
    """
    Float images in [-1, 1] (NCHW) to uint8 NHWC as the published scripts do:
    ``((x + 1) * 127.5).clamp(0, 255)`` then a truncating cast. Non-finite
    values are refused first (the cast would hide them).
    """
    finite = th.isfinite(sample)
    if not finite.all():
        bad = int((~finite).sum())
        where = ""
        if positions is not None and len(positions):
            where = f" at positions {positions[0]}..{positions[-1]}"
        raise NonFiniteSamplesError(
            f"{bad} NaN/inf values in the sampled batch{where} (found before the uint8 "
            "cast); the model or flags are broken: check the flags match the checkpoint, "
            "or try without --use_fp16"
        )
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return sample.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def sag_pictures(args, drawer, log_dir):
    """
    The per-step callback of ``--save_attention_masks``: it keeps a few
    guided steps of a batch and, at ``batch_done(images)``, writes them to
    ``log_dir/attention_masks``. None without the flag.
    """
    if not args.save_attention_masks:
        return None
    sampler, denoiser = drawer.sampler, drawer.denoiser
    guided = [i for i in range(sampler.steps) if denoiser.guides(i)]
    return AttentionMaskRecorder(os.path.join(log_dir, "attention_masks"), guided,
                                 timestep_map=sampler.model_timesteps())


def describe_setup(args, model, drawer, extra=()):
    """Lines for the log: what is sampled, and how."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    dtype = str(getattr(model, "dtype", "float32")).replace("torch.", "")
    sampler, sag = drawer.sampler, drawer.denoiser.sag
    lines = [
        f"model {args.model_path}: {params:.1f}M parameters, torso in {dtype}",
        f"{sampler.describe()}, seed {args.seed}",
    ]
    # A card's respacing (kept for --sampler ddpm) is not the user's to be told about.
    respacing_given = "timestep_respacing" not in getattr(args, "from_card", ())
    if sampler.schedule is not None and getattr(args, "timestep_respacing", "") and respacing_given:
        lines.append(f"--timestep_respacing {args.timestep_respacing} does not apply to {sampler.name} "
                     f"(it takes --solver_steps {sampler.steps} over the full schedule)")
    if sag is None or sag.scale == 1.0:
        lines.append("self-attention guidance off (--guide_scale 1)")
    else:
        part, depth = sag.location
        where = "middle block" if part == "middle" else f"{part}_blocks[{depth}]"
        kind = "true attention" if sag.true_attention else f"published map, --num_heads {sag.num_heads}"
        lines.append(
            f"self-attention guidance: scale {sag.scale}, attention of {where} ({kind}), "
            f"blur sigma {sag.blur_sigma}, evaluations with index < {sag.start}"
        )
    return lines + list(extra)
