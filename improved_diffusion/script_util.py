"""
Flags and factories: the ``*_defaults()`` dicts that become argparse flags,
and the functions that build models and diffusions from them (upstream names).
"""

import argparse
import inspect
import warnings

import torch as th

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .checkpoints.model_card import read_model_card, write_model_card  # noqa: F401  (re-exported for the training code)
from .guidance.sag import sag_defaults  # noqa: F401  (re-exported: scripts import it from here)
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000


def diffusion_defaults():
    """
    Defaults for image and classifier training.
    """
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """
    Defaults for classifier models.
    """
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults():
    """
    Defaults for image training.
    """
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        num_classes=NUM_CLASSES,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        norm_groups=32,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    norm_groups=32,
):
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
        norm_groups=norm_groups,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def _default_channel_mult(image_size, table, what):
    if image_size not in table:
        sizes = ", ".join(str(s) for s in sorted(table))
        raise ValueError(
            f"no default --channel_mult for {what} image size {image_size} "
            f"(defaults exist for {sizes}); pass --channel_mult, e.g. 1,2,2,2"
        )
    return table[image_size]


def _parse_channel_mult(channel_mult, image_size, table, what):
    if channel_mult == "" or channel_mult is None:
        return _default_channel_mult(image_size, table, what)
    if isinstance(channel_mult, str):
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return tuple(channel_mult)


def _attention_ds(attention_resolutions, image_size):
    if attention_resolutions in ("", None):
        return ()
    return tuple(image_size // int(res) for res in str(attention_resolutions).split(","))


_UNET_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def check_norm_groups(norm_groups, num_channels, channel_mult, image_size):
    """Raise ValueError (naming the flag) unless --norm_groups divides every block's width."""
    mult = _parse_channel_mult(channel_mult, image_size, _UNET_CHANNEL_MULT, "UNet")
    widths = sorted({int(m * num_channels) for m in mult})
    if norm_groups < 1 or any(w % norm_groups for w in widths):
        raise ValueError(
            f"--norm_groups {norm_groups} must divide every block width {widths} "
            f"(--num_channels {num_channels} times --channel_mult); e.g. --norm_groups 32"
        )


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    norm_groups=32,
):
    check_norm_groups(norm_groups, num_channels, channel_mult, image_size)
    channel_mult = _parse_channel_mult(channel_mult, image_size, _UNET_CHANNEL_MULT, "UNet")
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        norm_groups=norm_groups,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
):
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return classifier, diffusion


_CLASSIFIER_CHANNEL_MULT = dict(_UNET_CHANNEL_MULT)


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
):
    channel_mult = _default_channel_mult(image_size, _CLASSIFIER_CHANNEL_MULT, "classifier")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults():
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion)[0]
    for k in res.copy().keys():
        if k not in arg_names:
            del res[k]
    return res


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
):
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


_SR_CHANNEL_MULT = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
):
    _ = small_size  # hack to prevent unused variable
    channel_mult = _default_channel_mult(large_size, _SR_CHANNEL_MULT, "super-resolution")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def respaced_timesteps(steps, timestep_respacing):
    """
    space_timesteps() for the flags: a value that cannot be made raises a
    ValueError that names --timestep_respacing and --diffusion_steps and
    says what would work (upstream's text names neither).
    """
    text = (timestep_respacing if isinstance(timestep_respacing, str)
            else ",".join(str(c) for c in timestep_respacing))
    try:
        use_timesteps = space_timesteps(steps, timestep_respacing)
        if not use_timesteps:
            raise ValueError("no steps at all")
    except ValueError as e:
        reason = str(e)
        if reason.startswith("invalid literal for int()"):
            reason = "not a step count"
        raise ValueError(
            f"--timestep_respacing {text!r} cannot be made from --diffusion_steps {steps} "
            f"({reason}); pass a step count from 1 to {steps} (e.g. {min(250, steps)}), comma-separated "
            "counts per equal section of the steps (e.g. 10,20,30), or ddimN for N steps "
            "at an integer stride"
        ) from None
    return use_timesteps


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    if steps < 1:
        raise ValueError(f"--diffusion_steps must be >= 1, got {steps}")
    try:
        betas = gd.get_named_beta_schedule(noise_schedule, steps)
    except NotImplementedError:
        raise ValueError(
            f"--noise_schedule must be linear or cosine, got {noise_schedule!r}"
        ) from None
    if not ((betas > 0).all() and (betas < 1).all()):  # a beta of 1 leaves alpha_bar 0
        raise ValueError(
            f"--noise_schedule {noise_schedule} with --diffusion_steps {steps} gives betas "
            f"up to {betas.max():.3g} (its last beta is 0.02 * 1000 / steps); use "
            "--diffusion_steps 21 or more, or --noise_schedule cosine"
        )
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=respaced_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(
            gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X
        ),
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser, default_dict):
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def keyword_defaults(fn, exclude=()):
    """
    The arguments of `fn` that have a default, with it, in signature order
    (less `exclude`): for flags whose defaults are those of the function
    they are passed to.
    """
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not p.empty and name not in exclude
    }


def str2bool(v):
    """
    https://stackoverflow.com/questions/15008758/parsing-boolean-values-with-argparse
    """
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    elif v.lower() in ("no", "false", "f", "n", "0"):
        return False
    else:
        raise argparse.ArgumentTypeError("boolean value expected")


# ---------------------------------------------------------------------------
# Beyond upstream: half precision on any device (model cards: checkpoints/model_card.py).


def cpu_supports_bf16():
    """
    Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX).
    Processors without it only emulate bfloat16, which is no faster than
    float32.
    """
    cpu = getattr(th, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        return bool(th.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def half_dtype_for(device, use_fp16):
    """
    The dtype the network's torso runs in for ``--use_fp16``.

    On CUDA: float16, as upstream (the published fp16 weights path). On CPU:
    bfloat16 weights where the processor has native bfloat16 arithmetic
    (float16 convolutions on CPU are slower than float32), else float32 with
    a one-line warning. bfloat16 *weights* (``convert_to_fp16(th.bfloat16)``:
    the convolutions of the torso, as upstream converts them) rather than
    bfloat16 autocast: as fast or faster (no weight casts at every call) and
    the timestep embedding stays float32.
    """
    if not use_fp16:
        return th.float32
    if th.device(device).type == "cuda":
        return th.float16
    if cpu_supports_bf16():
        return th.bfloat16
    warnings.warn(
        "--use_fp16 True: this CPU has no native bfloat16 support; running in float32",
        stacklevel=2,
    )
    return th.float32


def prepare_model_for_sampling(model, device, use_fp16, channels_last=False, attention=None):
    """
    Put a loaded model (already on `device`) in its sampling setup.

    - precision: the torso in half_dtype_for(device, use_fp16);
    - memory format: channels-last when `channels_last` is True (off by
      default; why: benchmarks/RESULTS.md, "Channels-last");
    - attention: `attention` ("auto", "sdpa", "einsum") for every attention
      layer; None keeps each layer's (``auto`` unless the
      ``IMPROVED_DIFFUSION_ATTENTION`` environment variable says otherwise:
      fused sdpa on CUDA, the explicit path on CPU).

    The model's outputs keep the input's layout and float32 dtype, so the
    samplers need no change. Returns `model` (in eval mode).
    """
    dtype = half_dtype_for(device, use_fp16)
    model.convert_to_fp16(dtype)
    model.to(memory_format=th.channels_last if channels_last else th.contiguous_format)
    if attention is not None:
        from .unet import set_attention_backend

        set_attention_backend(model, attention)
    return model.eval()
