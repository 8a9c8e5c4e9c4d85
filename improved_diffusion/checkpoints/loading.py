"""
Loading checkpoints for sampling: safely (``torch.load(weights_only=True)``,
read once on rank 0), checked to be a model state_dict, and compared with
the model the flags build, with a one-line diagnosis of the flag that most
probably differs when they do not fit.
"""

import os
import pickle
import re
from typing import NamedTuple

import torch as th

from .. import dist_util
from ..errors import UsageError
from .model_card import flags_with_card, run_flags
from .published import PUBLISHED_CHECKPOINTS
from ..script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    create_classifier,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    half_dtype_for,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def _download_hint(path, flag):
    stem = os.path.splitext(os.path.basename(path or ""))[0]
    if stem in PUBLISHED_CHECKPOINTS:
        return f"download it with: python scripts/download_models.py {stem}"
    if flag in ("--model_path", "--classifier_path"):
        return f"pass {flag} to an existing file (published checkpoints: scripts/download_models.py --list)"
    return f"pass {flag} to an existing file"


def check_checkpoint_exists(path, flag="--model_path"):
    """UsageError unless `path` (the value of `flag`) is an existing file."""
    if not path:
        raise UsageError(f"{flag} is empty; {_download_hint(path, flag)}")
    if not os.path.isfile(path):
        what = {"--model_path": "checkpoint", "--classifier_path": "classifier checkpoint",
                "--base_samples": "base samples"}.get(flag, "file")
        raise UsageError(f"{what} not found: {path} ({flag}); {_download_hint(path, flag)}")


def load_checkpoint(path, flag="--model_path"):
    """
    Read a state_dict safely (``torch.load(weights_only=True)``, bytes read
    once on rank 0 and broadcast) and check it is one. Every rank must call
    it. Any problem becomes a one-line UsageError.
    """
    check_checkpoint_exists(path, flag)
    try:
        state = dist_util.load_state_dict(path, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "not an allowed global" in str(e):
            raise UsageError(
                f"{path} ({flag}) holds pickled Python objects that a safe load "
                "(torch.load(weights_only=True)) refuses; pass a plain state_dict "
                "(torch.save(model.state_dict(), path)) from a source you trust"
            ) from None
        raise UsageError(_unreadable(path, flag, e)) from None
    except MemoryError:
        raise
    except Exception as e:  # truncated zip, junk bytes, legacy format cut short...
        raise UsageError(_unreadable(path, flag, e)) from None
    if not isinstance(state, dict):
        raise UsageError(
            f"{path} ({flag}) holds a {type(state).__name__}, not a state_dict; "
            "pass a checkpoint saved as model.state_dict()"
        )
    if "param_groups" in state and "state" in state:
        raise UsageError(
            f"{path} ({flag}) is an optimizer state (opt*.pt), not model weights; "
            "pass the model or EMA checkpoint (model*.pt, ema_*.pt) instead"
        )
    bad = [k for k, v in state.items() if not (isinstance(k, str) and th.is_tensor(v))]
    if bad or not state:
        keys = ", ".join(str(k) for k in list(state)[:5]) or "none"
        raise UsageError(
            f"{path} ({flag}) is not a model state_dict (top-level keys: {keys}); "
            "pass a checkpoint saved as model.state_dict()"
        )
    return state


def _unreadable(path, flag, exc):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot read {path} ({flag}, {size} bytes): it is truncated or not a PyTorch "
        f"checkpoint ({type(exc).__name__}: {detail[:120]}); download or copy it again"
    )


# Generic roles -> the flag that sets them: (diffusion UNet, classifier).
FLAGS_BY_ROLE = dict(
    channels=("--num_channels", "--classifier_width"),
    res_blocks=("--num_res_blocks", "--classifier_depth"),
    attention=("--attention_resolutions", "--classifier_attention_resolutions"),
    mult=("--channel_mult", "--image_size"),
    class_cond=("--class_cond", "--num_classes"),
    num_classes=("--num_classes", "--num_classes"),
    sigma=("--learn_sigma", "--num_classes"),
    scale_shift=("--use_scale_shift_norm", "--classifier_use_scale_shift_norm"),
    updown=("--resblock_updown", "--classifier_resblock_updown"),
    head=("--learn_sigma", "--classifier_pool"),
)
MODEL_FLAG_NAMES = {role: flags[0] for role, flags in FLAGS_BY_ROLE.items()}
CLASSIFIER_FLAG_NAMES = {role: flags[1] for role, flags in FLAGS_BY_ROLE.items()}


def _shape(t):
    return list(t.shape)


def _block_prefix(key):
    m = re.match(r"((?:input|output)_blocks\.\d+\.\d+|middle_block\.\d+)\.", key)
    return m.group(1) if m else None


def _is_attention_key(key):
    return bool(re.search(r"\.(qkv|proj_out|norm)\.", key)) and _block_prefix(key) is not None


def _is_resample_key(key):
    # Downsample (.op.) / Upsample (.conv.) convs versus ResBlocks with up/down.
    return bool(re.search(r"_blocks\.\d+\.\d+\.(op|conv)\.", key))


class _StateDiff(NamedTuple):
    """How a checkpoint's state dict differs from the model the flags build."""

    missing: list  # keys the model has and the checkpoint lacks
    unexpected: list  # keys the checkpoint has and the model lacks
    shapes: dict  # keys both have, with other shapes
    model_sd: dict
    state: dict
    names: dict  # the flag names of this kind of network
    path: str


def _guess_flag(missing, unexpected, shapes, model_sd, state, names, path=""):
    """
    The flag that most probably differs, with a hint, or None: the first of
    the checks below, in order, that recognises the difference.
    """
    diff = _StateDiff(missing, unexpected, shapes, model_sd, state, names, path)
    for check in (_class_flags, _first_layer, _output_channels, _scale_shift, _classifier_head,
                  _block_counts, _resample_kind, _attention_layers, _widths):
        hint = check(diff)
        if hint:
            return hint
    return None


def _class_flags(d):
    names = d.names
    stem = os.path.splitext(os.path.basename(d.path))[0]
    uncond_hint = ""
    if f"{stem}_uncond" in PUBLISHED_CHECKPOINTS:
        uncond_hint = f"; the unconditional model is {stem}_uncond.pt"
    if "label_emb.weight" in d.unexpected:
        return f"{names['class_cond']} (the checkpoint is class-conditional: --class_cond True{uncond_hint})"
    if "label_emb.weight" in d.missing:
        return f"{names['class_cond']} (the checkpoint is unconditional: --class_cond False)"
    if "label_emb.weight" in d.shapes:
        n = d.state["label_emb.weight"].shape[0]
        return f"{names['num_classes']} (the checkpoint has {n} classes)"
    return None


def _first_layer(d):
    first = "input_blocks.0.0.weight"
    if first not in d.shapes:
        return None
    want, got = d.model_sd[first].shape, d.state[first].shape
    if want[1] != got[1]:
        if got[1] == 2 * want[1]:
            return "wrong script: this is a super-resolution checkpoint, use scripts/super_res_sample.py"
        if 2 * got[1] == want[1]:
            return "wrong script: this is not a super-resolution checkpoint, use scripts/image_sample.py"
    if want[0] != got[0]:
        return f"{d.names['channels']} (the checkpoint's first layer has {got[0]} channels)"
    return None


def _output_channels(d):
    for key in ("out.2.weight", "out.2.bias"):
        if key in d.shapes:
            want, got = d.model_sd[key].shape[0], d.state[key].shape[0]
            if d.names is MODEL_FLAG_NAMES and got in (2 * want, want // 2) and min(got, want) in (1, 3):
                value = "True" if got > want else "False"
                return f"--learn_sigma (the checkpoint outputs {got} channels: --learn_sigma {value})"
            return f"{d.names['head']} (the checkpoint outputs {got} values)"
    return None


def _scale_shift(d):
    for key in d.shapes:
        if key.endswith("emb_layers.1.weight"):
            # FiLM (scale and shift) needs twice the block's channels from the embedding.
            conv = key.replace("emb_layers.1.weight", "out_layers.3.weight")
            if conv in d.state and conv in d.model_sd:
                ours = d.model_sd[key].shape[0] // d.model_sd[conv].shape[0]
                theirs = d.state[key].shape[0] // d.state[conv].shape[0]
                if {ours, theirs} == {1, 2}:
                    flag = d.names["scale_shift"]
                    value = "True" if theirs == 2 else "False"
                    return f"{flag} ({flag} {value} fits the checkpoint)"
    return None


def _classifier_head(d):
    if d.names is not CLASSIFIER_FLAG_NAMES:
        return None
    if any(k.startswith("out.") for k in d.missing + d.unexpected):
        return f"{d.names['head']} (the checkpoint's output head has other layers)"
    for key in d.shapes:
        if key.startswith("out.") and key.endswith(("c_proj.weight", "c_proj.bias")):
            return f"--num_classes (the checkpoint has {d.state[key].shape[0]} classes)"
        if key.endswith("positional_embedding"):
            return "--image_size (the classifier was trained at another resolution)"
    return None


def _block_counts(d):
    def count(keys, part):
        idx = {int(k.split(".")[1]) for k in keys if k.startswith(part + ".")}
        return max(idx) + 1 if idx else 0

    for part in ("input_blocks", "output_blocks"):
        if count(d.model_sd, part) != count(d.state, part):
            return (
                f"{d.names['res_blocks']} or {d.names['mult']} (the checkpoint has "
                f"{count(d.state, part)} {part}, these flags build {count(d.model_sd, part)})"
            )
    return None


def _resample_kind(d):
    """Down/upsampling by a conv (.op/.conv) on one side, by a ResBlock on the other."""
    for ours, theirs, value in ((d.missing, d.unexpected, "True"), (d.unexpected, d.missing, "False")):
        resblocks = {_block_prefix(k) for k in theirs if ".in_layers." in k}
        if any(_is_resample_key(k) and _block_prefix(k) in resblocks for k in ours):
            return f"{d.names['updown']} ({d.names['updown']} {value} fits the checkpoint)"
    return None


def _attention_layers(d):
    if any(_is_attention_key(k) for k in d.missing + d.unexpected):
        return f"{d.names['attention']} (attention layers sit at other resolutions in the checkpoint)"
    return None


def _widths(d):
    if d.shapes:
        return f"{d.names['channels']} or {d.names['mult']} (layer widths differ)"
    return None


def check_state_dict(model, state, path, flag="--model_path", names=MODEL_FLAG_NAMES):
    """
    Compare names and shapes before ``load_state_dict`` and explain the
    first mismatches (and the flag that probably differs) in one line.
    """
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in state]
    unexpected = [k for k in state if k not in model_sd]
    shapes = [k for k in model_sd if k in state and model_sd[k].shape != state[k].shape]
    missing_set, shapes_set = set(missing), set(shapes)
    if not (missing or unexpected or shapes):
        return
    details = []
    for key in model_sd:
        if key in shapes_set:
            details.append(
                f"{key} is {_shape(state[key])} in the checkpoint, {_shape(model_sd[key])} for these flags"
            )
        elif key in missing_set:
            details.append(f"{key} {_shape(model_sd[key])} is missing from the checkpoint")
        if len(details) == 3:
            break
    for key in unexpected:
        if len(details) == 3:
            break
        details.append(f"the checkpoint has an extra {key} {_shape(state[key])}")
    total = len(missing) + len(unexpected) + len(shapes)
    more = f" (and {total - len(details)} more)" if total > len(details) else ""
    guess = _guess_flag(missing, unexpected, shapes, model_sd, state, names, path)
    if guess and guess.startswith("wrong script"):
        fix = guess
    else:
        fix = f"probably {guess} differs" if guess else "check the flags against the checkpoint's"
        fix += "; the published checkpoints' flags are in scripts/presets/"
    raise UsageError(
        f"{path} ({flag}) does not match the flags: {'; '.join(details)}{more}; {fix}"
    )


def load_model(model, path, device, use_fp16, flag="--model_path", names=MODEL_FLAG_NAMES):
    """Load a checkpoint (safely) into `model`, move it and set its precision."""
    state = load_checkpoint(path, flag)
    check_state_dict(model, state, path, flag, names)
    model.load_state_dict(state)
    del state
    model.to(device)
    model.convert_to_fp16(half_dtype_for(device, use_fp16))
    model.eval()
    return model


def model_from_args(args, super_res=False):
    """Build the UNet and diffusion the flags describe, load --model_path into it."""
    try:
        if super_res:
            model, diffusion = sr_create_model_and_diffusion(
                **args_to_dict(args, sr_model_and_diffusion_defaults().keys())
            )
        else:
            model, diffusion = create_model_and_diffusion(
                **args_to_dict(args, model_and_diffusion_defaults().keys())
            )
    except ValueError as e:
        raise UsageError(str(e)) from None
    load_model(model, args.model_path, dist_util.dev(), args.use_fp16)
    return model, diffusion


def classifier_from_args(args):
    """Build the classifier the flags describe, load --classifier_path into it."""
    try:
        classifier = create_classifier(**args_to_dict(args, classifier_defaults().keys()))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return load_model(classifier, args.classifier_path, dist_util.dev(),
                      args.classifier_use_fp16, flag="--classifier_path",
                      names=CLASSIFIER_FLAG_NAMES)


def classifier_from_card(path, device):
    """
    The noisy-image classifier at `path` built with the flags of its model
    card (``name.json`` beside ``name.pt``) and loaded like :func:`load_model`,
    with the diffusion it was trained on.
    """
    flags = flags_with_card(path, classifier_and_diffusion_defaults())
    classifier, diffusion = create_classifier_and_diffusion(**flags)
    load_model(classifier, path, device, flags["classifier_use_fp16"],
               flag="--classifier_path", names=CLASSIFIER_FLAG_NAMES)
    return classifier, diffusion


def model_from_card(checkpoint, card, **overrides):
    """
    A checkpoint of a carded model's training run (or the carded model
    itself), on the CPU for probing: the network and diffusion of the flags
    of `card` (a model card, ``name.json``), with the model flags of the
    ``model_flags.json`` beside `checkpoint` where there is one (a run that
    changed the architecture), then `overrides`; weights loaded and checked
    like :func:`load_model`. Returns (model, diffusion, flags).
    """
    flags = flags_with_card(card, model_and_diffusion_defaults())
    flags.update(run_flags(checkpoint))
    flags.update(overrides)
    model, diffusion = create_model_and_diffusion(**flags)
    load_model(model, checkpoint, "cpu", flags["use_fp16"])
    return model, diffusion, flags
