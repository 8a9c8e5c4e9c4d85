"""
What the sampling scripts share: flag parsing with model cards, loading a
model for sampling, drawing one seeded batch, and the npz format.

The seed contract (SAG-NOTES.md): the sample at position p of the final npz
depends on ``seed + p`` alone, whatever the batch size and number of ranks.
"""

import argparse
import math
import os

import numpy as np
import torch as th
import torch.nn.functional as F

from . import dist_util
from .random_util import BatchGenerator
from .sag import SelfAttentionGuidance
from .script_util import (
    add_dict_to_argparser,
    half_dtype_for,
    read_model_card,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_PATH = os.path.join("models", "fashion32_ema.pt")


class UsageError(Exception):
    """Bad input from the user: scripts print the message as one line and exit 2."""


def sample_defaults():
    return dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        eta=0.0,
        model_path=DEFAULT_MODEL_PATH,
        seed=0,
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


def validate_sample_args(args):
    if args.num_samples <= 0:
        raise UsageError(f"--num_samples must be > 0, got {args.num_samples}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be > 0, got {args.batch_size}")


def load_model(model, path, device, use_fp16):
    """Load a checkpoint (safely) into `model`, move it and set its precision."""
    if not path or not os.path.exists(path):
        raise UsageError(
            f"checkpoint not found: {path!r}; pass --model_path to an existing file "
            "(see scripts/download_models.py)"
        )
    state = dist_util.load_state_dict(path, map_location="cpu")
    model.load_state_dict(state)
    model.to(device)
    model.convert_to_fp16(half_dtype_for(device, use_fp16))
    model.eval()
    return model


def make_sag(model, args):
    """The SelfAttentionGuidance for the parsed flags (raises UsageError)."""
    try:
        return SelfAttentionGuidance.from_args(model, args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def make_cond_fn(classifier, scale):
    """The classifier-guidance gradient function of guided-diffusion's scripts."""

    def cond_fn(x, t, y=None):
        assert y is not None
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


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
):
    """
    Sample the images at `positions` of the run (seed contract).

    Each position p gets a CPU generator seeded ``args.seed + p``; it draws
    its label first (when `draw_labels`), then x_T, then every step's noise.

    :return: (float samples [N x C x H x W] in about [-1, 1], labels or None).
    """
    gen = BatchGenerator([args.seed + p for p in positions])
    model_kwargs = dict(model_kwargs or {})
    labels = None
    if draw_labels:
        labels = gen.randint(num_classes, device=device)
        model_kwargs["y"] = labels
    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    extra = {"eta": args.eta} if args.use_ddim else {}
    sample = sample_fn(
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
    )
    return sample, labels


class NonFiniteSamplesError(UsageError):
    pass


def to_uint8(sample):
    """
    Float images in [-1, 1] (NCHW) to uint8 NHWC as the published scripts do:
    ``((x + 1) * 127.5).clamp(0, 255)`` then a truncating cast. Non-finite
    values are refused first (the cast would hide them).
    """
    if not th.isfinite(sample).all():
        bad = int((~th.isfinite(sample)).sum())
        raise NonFiniteSamplesError(
            f"{bad} NaN/inf values in a sampled batch; the model or flags are broken "
            "(check the flags match the checkpoint, or try without --use_fp16)"
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


def rank_positions(num_samples, batch_size, rank, world_size):
    """
    The batches of positions this rank samples: batches of `batch_size`
    consecutive positions dealt round-robin to ranks, the last one shorter.
    """
    batches = []
    num_batches = math.ceil(num_samples / batch_size)
    for b in range(rank, num_batches, world_size):
        start = b * batch_size
        batches.append(list(range(start, min(start + batch_size, num_samples))))
    return batches


def add_sample_flags(parser, defaults):
    add_dict_to_argparser(parser, defaults)
    return parser


def new_parser(description):
    return argparse.ArgumentParser(description=description)


def sample_to_npz(args, draw_fn, image_size, log=print):
    """
    Sample `args.num_samples` images across ranks and write the npz on rank 0.

    :param draw_fn: positions -> (uint8 NHWC images, labels array or None).
    :return: the npz path on rank 0, None on other ranks.
    """
    import torch.distributed as dist

    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    mine = []
    for positions in rank_positions(args.num_samples, args.batch_size, rank, world):
        images, labels = draw_fn(positions)
        mine.append((positions, images, labels))
        if rank == 0:
            log(f"sampled {positions[-1] + 1 - positions[0]} at positions "
                f"{positions[0]}..{positions[-1]}")
    if world > 1 and dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    if rank != 0:
        return None
    mine.sort(key=lambda item: item[0][0])
    images = np.concatenate([item[1] for item in mine])
    labels = None
    if mine[0][2] is not None:
        labels = np.concatenate([item[2] for item in mine]).astype(np.int64)
    assert images.shape[0] == args.num_samples
    path = os.path.join(args.out_dir, npz_name(args.num_samples, image_size, image_size))
    save_npz(path, images, labels)
    return path
