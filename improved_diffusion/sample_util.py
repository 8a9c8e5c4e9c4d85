"""
What the sampling scripts share: flag parsing with model cards, input
checks, loading checkpoints safely (with a readable diagnosis when the flags
do not fit them), drawing one seeded batch, and the npz format.

The run itself (ranks, shards, resume, assembly) is
:mod:`improved_diffusion.sample_run`.

The seed contract (SAG-NOTES.md): the sample at position p of the final npz
depends on ``seed + p`` alone, whatever the batch size and number of ranks.
"""

import argparse
import math
import os
import pickle
import re
import sys

import numpy as np
import torch as th
import torch.nn.functional as F

from . import dist_util
from .published_checkpoints import PUBLISHED_CHECKPOINTS
from .random_util import BatchGenerator
from .sag import SelfAttentionGuidance
from .script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    half_dtype_for,
    model_and_diffusion_defaults,
    read_model_card,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_PATH = os.path.join("models", "fashion32_ema.pt")


class UsageError(Exception):
    """
    Bad input from the user: scripts print ``error: <message>`` as one line
    on stderr and exit with status 2.

    :param agreed: True when every rank raised the same error at the same
        point (see :func:`improved_diffusion.sample_run.agree`): then only
        rank 0 prints it and every rank exits normally. Otherwise the rank
        that hit it prints it and takes the whole job down.
    """

    def __init__(self, message, agreed=False):
        super().__init__(message)
        self.agreed = agreed


def pure_usage_error(message):
    """A UsageError that depends on the flags alone, hence the same on every rank."""
    return UsageError(message, agreed=True)


class NonFiniteSamplesError(UsageError):
    """NaN or inf in a sampled batch (found before the uint8 cast)."""


def sample_defaults():
    return dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        eta=0.0,
        model_path=DEFAULT_MODEL_PATH,
        seed=0,
        save_attention_masks=False,
    )


def default_model_path(path):
    """Resolve the embedded default checkpoint relative to the repository too."""
    if path == DEFAULT_MODEL_PATH and not os.path.exists(path):
        return os.path.join(REPO_ROOT, path)
    return path


def parse_args_with_card(parser, argv=None):
    """
    Parse flags; defaults come from the model card next to ``--model_path``
    (``name.json`` beside ``name.pt``) when there is one, then from the
    command line. Published checkpoints have no card: their flags are passed.
    """
    pre, _ = parser.parse_known_args(argv)
    card = read_model_card(default_model_path(pre.model_path))
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in card.items() if k in known})
    args = parser.parse_args(argv)
    args.model_path = default_model_path(args.model_path)
    return args


def new_parser(description):
    return argparse.ArgumentParser(description=description)


def add_sample_flags(parser, defaults):
    add_dict_to_argparser(parser, defaults)
    return parser


# ---------------------------------------------------------------------------
# Input checks (pure: every rank reaches the same verdict)
# ---------------------------------------------------------------------------


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def validate_sample_args(args):
    """
    Check the flags that need no model or file (raises pure_usage_error: every
    rank reaches the same verdict). Script-specific checks come on top.
    """
    if args.num_samples <= 0:
        raise pure_usage_error(f"--num_samples must be > 0, got {args.num_samples}")
    if args.batch_size <= 0:
        raise pure_usage_error(f"--batch_size must be > 0, got {args.batch_size}")
    if args.seed < 0:
        raise pure_usage_error(f"--seed must be >= 0, got {args.seed}")
    if hasattr(args, "guide_scale") and not _finite(args.guide_scale):
        raise pure_usage_error(f"--guide_scale must be a finite number, got {args.guide_scale}")
    if hasattr(args, "blur_sigma") and not (_finite(args.blur_sigma) and args.blur_sigma > 0):
        raise pure_usage_error(f"--blur_sigma must be a number > 0, got {args.blur_sigma}")
    if not (_finite(args.eta) and args.eta >= 0):
        raise pure_usage_error(f"--eta must be a finite number >= 0, got {args.eta}")
    if hasattr(args, "classifier_scale") and not _finite(args.classifier_scale):
        raise pure_usage_error(
            f"--classifier_scale must be a finite number, got {args.classifier_scale}"
        )


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


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


# Generic roles -> the flag that sets them, for the diffusion UNet and the classifier.
MODEL_FLAG_NAMES = dict(
    channels="--num_channels",
    res_blocks="--num_res_blocks",
    attention="--attention_resolutions",
    mult="--channel_mult",
    class_cond="--class_cond",
    num_classes="--num_classes",
    sigma="--learn_sigma",
    scale_shift="--use_scale_shift_norm",
    updown="--resblock_updown",
    head="--learn_sigma",
)
CLASSIFIER_FLAG_NAMES = dict(
    channels="--classifier_width",
    res_blocks="--classifier_depth",
    attention="--classifier_attention_resolutions",
    mult="--image_size",
    class_cond="--num_classes",
    num_classes="--num_classes",
    sigma="--num_classes",
    scale_shift="--classifier_use_scale_shift_norm",
    updown="--classifier_resblock_updown",
    head="--classifier_pool",
)


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


def _guess_flag(missing, unexpected, shapes, model_sd, state, names, path=""):
    """The flag that most probably differs, with a hint, or None."""
    stem = os.path.splitext(os.path.basename(path))[0]
    uncond_hint = ""
    if f"{stem}_uncond" in PUBLISHED_CHECKPOINTS:
        uncond_hint = f"; the unconditional model is {stem}_uncond.pt"
    if "label_emb.weight" in unexpected:
        return f"{names['class_cond']} (the checkpoint is class-conditional: --class_cond True{uncond_hint})"
    if "label_emb.weight" in missing:
        return f"{names['class_cond']} (the checkpoint is unconditional: --class_cond False)"
    if "label_emb.weight" in shapes:
        n = state["label_emb.weight"].shape[0]
        return f"{names['num_classes']} (the checkpoint has {n} classes)"
    first = "input_blocks.0.0.weight"
    if first in shapes:
        want, got = model_sd[first].shape, state[first].shape
        if want[1] != got[1]:
            if got[1] == 2 * want[1]:
                return "wrong script: this is a super-resolution checkpoint, use scripts/super_res_sample.py"
            if 2 * got[1] == want[1]:
                return "wrong script: this is not a super-resolution checkpoint, use scripts/image_sample.py"
        if want[0] != got[0]:
            return f"{names['channels']} (the checkpoint's first layer has {got[0]} channels)"
    for key in ("out.2.weight", "out.2.bias"):
        if key in shapes:
            want, got = model_sd[key].shape[0], state[key].shape[0]
            if names is MODEL_FLAG_NAMES and got in (2 * want, want // 2) and min(got, want) in (1, 3):
                value = "True" if got > want else "False"
                return f"--learn_sigma (the checkpoint outputs {got} channels: --learn_sigma {value})"
            return f"{names['head']} (the checkpoint outputs {got} values)"
    for key in shapes:
        if key.endswith("emb_layers.1.weight"):
            # FiLM (scale and shift) needs twice the block's channels from the embedding.
            conv = key.replace("emb_layers.1.weight", "out_layers.3.weight")
            if conv in state and conv in model_sd:
                ours = model_sd[key].shape[0] // model_sd[conv].shape[0]
                theirs = state[key].shape[0] // state[conv].shape[0]
                if {ours, theirs} == {1, 2}:
                    flag = names["scale_shift"]
                    value = "True" if theirs == 2 else "False"
                    return f"{flag} ({flag} {value} fits the checkpoint)"
    if names is CLASSIFIER_FLAG_NAMES and any(k.startswith("out.") for k in missing + unexpected):
        return f"{names['head']} (the checkpoint's output head has other layers)"
    if names is CLASSIFIER_FLAG_NAMES:
        for key in shapes:
            if key.startswith("out.") and key.endswith(("c_proj.weight", "c_proj.bias")):
                return f"--num_classes (the checkpoint has {state[key].shape[0]} classes)"
            if key.endswith("positional_embedding"):
                return "--image_size (the classifier was trained at another resolution)"

    def count(keys, part):
        idx = {int(k.split(".")[1]) for k in keys if k.startswith(part + ".")}
        return max(idx) + 1 if idx else 0

    for part in ("input_blocks", "output_blocks"):
        if count(model_sd, part) != count(state, part):
            return (
                f"{names['res_blocks']} or {names['mult']} (the checkpoint has "
                f"{count(state, part)} {part}, these flags build {count(model_sd, part)})"
            )
    # Down/upsampling by a conv (.op/.conv) on one side, by a ResBlock on the other.
    for ours, theirs, value in ((missing, unexpected, "True"), (unexpected, missing, "False")):
        resblocks = {_block_prefix(k) for k in theirs if ".in_layers." in k}
        if any(_is_resample_key(k) and _block_prefix(k) in resblocks for k in ours):
            return f"{names['updown']} ({names['updown']} {value} fits the checkpoint)"
    if any(_is_attention_key(k) for k in missing + unexpected):
        return f"{names['attention']} (attention layers sit at other resolutions in the checkpoint)"
    if shapes:
        return f"{names['channels']} or {names['mult']} (layer widths differ)"
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


def load_classifier(classifier, path, device, use_fp16):
    """load_model for the noisy-image classifier (its flags in the hints)."""
    return load_model(
        classifier, path, device, use_fp16, flag="--classifier_path", names=CLASSIFIER_FLAG_NAMES
    )


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
    return load_classifier(classifier, args.classifier_path, dist_util.dev(),
                           args.classifier_use_fp16)


def make_sag(model, args):
    """The SelfAttentionGuidance for the parsed flags (raises UsageError)."""
    try:
        return SelfAttentionGuidance.from_args(model, args)
    except ValueError as e:
        raise UsageError(str(e)) from None


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


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------


def draw_batch(
    diffusion,
    model_fn,
    positions,
    args,
    image_shape,
    device,
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

    Each position p gets a CPU generator seeded ``args.seed + p``; it draws
    its label first (when `draw_labels`), then x_T, then every step's noise.

    :param step_callback: if given, called as ``step_callback(index, out)``
        after every step with the respaced index and the step's output dict
        (which holds 'sag_mask' and 'sag_degraded_xstart' on guided steps).
    :return: (float samples [N x C x H x W] in about [-1, 1], labels or None).
    """
    gen = BatchGenerator([args.seed + p for p in positions])
    model_kwargs = dict(model_kwargs or {})
    labels = None
    if draw_labels:
        labels = gen.randint(num_classes, device=device)
        model_kwargs["y"] = labels
    loop = (
        diffusion.ddim_sample_loop_progressive
        if args.use_ddim
        else diffusion.p_sample_loop_progressive
    )
    extra = {"eta": args.eta} if args.use_ddim else {}
    final = None
    index = diffusion.num_timesteps
    for out in loop(
        model_fn,
        (len(positions), *image_shape),
        clip_denoised=args.clip_denoised,
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


def npz_name(num_samples, height, width):
    return f"samples_{num_samples}x{height}x{width}x3.npz"


def save_npz(path, images, labels=None):
    """Write ``arr_0`` (and ``arr_1``) atomically: temp file, then rename."""
    tmp = path + ".tmp.npz"
    if labels is not None:
        np.savez(tmp, images, labels)
    else:
        np.savez(tmp, images)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# Script entry point
# ---------------------------------------------------------------------------


def run_main(main, argv=None):
    """
    Run a sampling script's ``main`` and turn a UsageError into one line on
    stderr and exit status 2.

    An agreed error (every rank raised it at the same point) is printed by
    rank 0 and every rank exits normally. An error on one rank only (NaN in
    a batch, disk full) is printed by that rank, which then leaves at once
    without MPI finalisation so that ``mpiexec`` tears down the other ranks
    (torchrun does the same for a failed worker).
    """
    try:
        result = main(argv)
        _close_process_group()
        return result
    except UsageError as e:
        rank, world = dist_util.get_rank(), dist_util.get_world_size()
        if not e.agreed or rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if world > 1 and not e.agreed:
            os._exit(2)
        _close_process_group()
        sys.exit(2)


def _close_process_group():
    """Every rank leaves together: take the process group down cleanly first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # leaving anyway
            pass
