"""
Drawing one seeded batch of samples (:class:`BatchDrawer`, what a script
hands the run), and what the sampling scripts build around it: classifier
guidance, the SAG pictures as a per-step callback, the uint8 cast, the log
lines.

The seed contract (docs/sag.md): the sample at position p of a run depends
on ``seed + p`` alone, whatever the batch size and number of ranks.
"""

import dataclasses
import os
from typing import Any, Callable, Optional, Tuple

import torch as th
import torch.nn.functional as F

from .cli import NonFiniteSamplesError
from .image_grid import AttentionMaskRecorder
from .random_util import BatchGenerator


def sampler_settings(args):
    """The flags a :class:`BatchDrawer` reads, as its `settings`."""
    return dict(seed=args.seed, use_ddim=args.use_ddim, eta=args.eta,
                clip_denoised=args.clip_denoised)


@dataclasses.dataclass(frozen=True)
class BatchDrawer:
    """
    ``drawer(positions, step_callback=None)`` -> (uint8 NHWC images, int64
    labels or None): the samples at `positions` of the run (seed contract),
    with what a sampling script fixed once (the run calls it for every batch).

    Each position p gets a CPU generator seeded ``seed + p``; it draws its
    label first (when `draw_labels`), then x_T, then every step's noise.

    :param model_fn: the model (or a function of x, t and model kwargs).
    :param image_shape: (C, H, W) of one sample.
    :param settings: seed, use_ddim (DDIM steps with eta instead of
        ancestral ones), eta, clip_denoised: :func:`sampler_settings`.
    :param sag: None or the :class:`~improved_diffusion.sag.SelfAttentionGuidance`
        every step uses.
    :param cond_fn: None or a classifier-guidance gradient (:func:`make_cond_fn`).
    :param draw_labels: draw a label in 0..num_classes-1 per position (model kwarg ``y``).
    :param batch_inputs: optional ``batch_inputs(positions)`` -> (model_kwargs,
        labels or None) for inputs that come with the positions (the low-
        resolution images of super-resolution and their labels).

    ``step_callback``, if given, is called as ``step_callback(index, out)``
    after every step with the respaced index and the step's output dict
    (which holds 'sag_mask' and 'sag_degraded_xstart' on guided steps).
    """

    diffusion: Any
    model_fn: Callable
    image_shape: Tuple[int, int, int]
    device: Any
    settings: dict
    sag: Optional[Any] = None
    cond_fn: Optional[Callable] = None
    draw_labels: bool = False
    num_classes: int = 1000
    batch_inputs: Optional[Callable] = None

    def __call__(self, positions, step_callback=None):
        model_kwargs, labels = {}, None
        if self.batch_inputs is not None:
            model_kwargs, labels = self.batch_inputs(positions)
        model_kwargs = dict(model_kwargs)
        gen = BatchGenerator([self.settings["seed"] + p for p in positions])
        if self.draw_labels:
            drawn = gen.randint(self.num_classes, device=self.device)
            model_kwargs["y"] = drawn
            labels = drawn.cpu().numpy()
        if self.settings["use_ddim"]:
            loop = self.diffusion.ddim_sample_loop_progressive
            extra = {"eta": self.settings["eta"]}
        else:
            loop, extra = self.diffusion.p_sample_loop_progressive, {}
        index = self.diffusion.num_timesteps
        for out in loop(
            self.model_fn,
            (len(positions), *self.image_shape),
            clip_denoised=self.settings["clip_denoised"],
            model_kwargs=model_kwargs,
            cond_fn=self.cond_fn,
            device=self.device,
            sag=self.sag,
            generator=gen,
            **extra,
        ):
            index -= 1
            if step_callback is not None:
                step_callback(index, out)
        return to_uint8(out["sample"], positions), labels


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


def make_cond_fn(classifier, scale):
    """The classifier-guidance gradient function of guided-diffusion's scripts."""

    def cond_fn(x, t, y=None, **_):
        assert y is not None
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def sag_pictures(args, sag, diffusion, log_dir):
    """
    The per-step callback of ``--save_attention_masks``: it keeps a few
    guided steps of a batch and, at ``batch_done(images)``, writes them to
    ``log_dir/attention_masks``. None without the flag.
    """
    if not args.save_attention_masks:
        return None
    guided = [i for i in range(diffusion.num_timesteps) if sag.applies(i)]
    return AttentionMaskRecorder(os.path.join(log_dir, "attention_masks"), guided,
                                 timestep_map=getattr(diffusion, "timestep_map", None))


def describe_setup(args, model, diffusion, sag=None, extra=()):
    """Lines for the log: what is sampled, and how."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    dtype = str(getattr(model, "dtype", "float32")).replace("torch.", "")
    sampler = f"DDIM (eta {args.eta})" if args.use_ddim else "ancestral"
    lines = [
        f"model {args.model_path}: {params:.1f}M parameters, torso in {dtype}",
        f"{diffusion.num_timesteps} {sampler} steps, seed {args.seed}",
    ]
    if sag is None or sag.scale == 1.0:
        lines.append("self-attention guidance off (--guide_scale 1)")
    else:
        part, depth = sag.location
        where = "middle block" if part == "middle" else f"{part}_blocks[{depth}]"
        kind = "true attention" if sag.true_attention else f"published map, --num_heads {sag.num_heads}"
        lines.append(
            f"self-attention guidance: scale {sag.scale}, attention of {where} ({kind}), "
            f"blur sigma {sag.blur_sigma}, steps with index < {sag.start}"
        )
    return lines + list(extra)
