"""
Drawing one seeded batch of samples (:func:`draw_batch`, and
:class:`BatchDrawer`, what a script hands the run), and what the sampling
scripts build around it: the SAG object from the flags, classifier guidance,
the SAG pictures as a per-step callback, the uint8 cast, the log lines.

The seed contract (docs/sag.md): the sample at position p of a run depends
on ``seed + p`` alone, whatever the batch size and number of ranks.
"""

import dataclasses
import os
from typing import Any, Callable, Optional, Tuple

import torch as th
import torch.nn.functional as F

from .checkpoints import model_from_args
from .cli import NonFiniteSamplesError, UsageError, agree
from .image_grid import AttentionMaskRecorder
from .random_util import BatchGenerator
from .sag import SelfAttentionGuidance


def sampler_settings(args):
    """The flags :func:`draw_batch` reads, as keyword arguments."""
    return dict(seed=args.seed, use_ddim=args.use_ddim, eta=args.eta,
                clip_denoised=args.clip_denoised)


def draw_batch(
    diffusion,
    model_fn,
    positions,
    image_shape,
    device,
    *,
    seed,
    use_ddim=False,
    eta=0.0,
    clip_denoised=True,
    draw_labels=False,
    num_classes=1000,
    cond_fn=None,
    sag=None,
    model_kwargs=None,
    progress=False,
    step_callback=None,
):
    """
    Sample the images at `positions` of the run (seed contract).

    Each position p gets a CPU generator seeded ``seed + p``; it draws its
    label first (when `draw_labels`), then x_T, then every step's noise.

    :param use_ddim: DDIM steps (with `eta`) instead of ancestral ones.
    :param step_callback: if given, called as ``step_callback(index, out)``
        after every step with the respaced index and the step's output dict
        (which holds 'sag_mask' and 'sag_degraded_xstart' on guided steps).
    :return: (float samples [N x C x H x W] in about [-1, 1], labels or None).
    """
    gen = BatchGenerator([seed + p for p in positions])
    model_kwargs = dict(model_kwargs or {})
    labels = None
    if draw_labels:
        labels = gen.randint(num_classes, device=device)
        model_kwargs["y"] = labels
    loop = diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    extra = {"eta": eta} if use_ddim else {}
    final = None
    index = diffusion.num_timesteps
    for out in loop(
        model_fn,
        (len(positions), *image_shape),
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        device=device,
        progress=progress,
        sag=sag,
        generator=gen,
        **extra,
    ):
        index -= 1
        if step_callback is not None:
            step_callback(index, out)
        final = out
    return final["sample"], labels


@dataclasses.dataclass(frozen=True)
class BatchDrawer:
    """
    ``drawer(positions, step_callback=None)`` -> (uint8 NHWC images, int64
    labels or None): :func:`draw_batch` then :func:`to_uint8`, with what a
    sampling script fixed once (the run calls it for every batch).

    :param settings: seed, use_ddim, eta, clip_denoised (:func:`sampler_settings`).
    :param batch_inputs: optional ``batch_inputs(positions)`` -> (model_kwargs,
        labels or None) for inputs that come with the positions (the low-
        resolution images of super-resolution and their labels).
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
        sample, drawn = draw_batch(
            self.diffusion, self.model_fn, positions, self.image_shape, self.device,
            **self.settings, draw_labels=self.draw_labels, num_classes=self.num_classes,
            cond_fn=self.cond_fn, sag=self.sag, model_kwargs=model_kwargs,
            step_callback=step_callback,
        )
        if drawn is not None:
            labels = drawn.cpu().numpy()
        return to_uint8(sample, positions), labels


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


def make_sag(model, args):
    """The SelfAttentionGuidance for the parsed flags (raises UsageError)."""
    try:
        return SelfAttentionGuidance.from_args(model, args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_and_sag_from_args(args, super_res=False):
    """
    (model, diffusion, sag) for the parsed flags, on every rank together
    (a bad checkpoint or SAG flag stops every rank with one line).
    """
    model, diffusion = agree(model_from_args, args, super_res=super_res)
    sag = agree(make_sag, model, args)
    return model, diffusion, sag


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
