"""
Command-line handling of the sampling scripts: flags (with defaults from a
model card), the checks that need no model or file, and bad input.

Bad input raises :class:`UsageError`; :func:`run_main` turns it into one
line ``error: <message>`` on stderr and exit status 2. Checks that every
rank makes run through :func:`agree` (or :func:`on_rank0`), so that all
ranks stop at the same point and only rank 0 prints the line.
"""

import argparse
import math
import os
import sys

from . import dist_util
from .guidance.sag import SAGConfigError, check_sag_values
from .errors import NonFiniteSamplesError, UsageError, pure_usage_error  # noqa: F401  (scripts use cli.*)
from .checkpoints.model_card import read_model_card
from .sampling.samplers import check_sampler_flags
from .script_util import (
    add_dict_to_argparser,
    check_norm_groups,
    classifier_defaults,
    model_and_diffusion_defaults,
    sag_defaults,
    sr_model_and_diffusion_defaults,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_PATH = os.path.join("models", "fashion32_ema.pt")


def agree(fn, *args, **kwargs):
    """
    Run `fn` on every rank; if any rank raises UsageError, every rank raises
    the first such error (lowest rank), marked agreed: rank 0 alone prints it
    and every rank exits normally, so that no rank is left waiting.
    """
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except UsageError as e:
        error = str(e)
    errors = [e for e in dist_util.gather_objects(error) if e is not None]
    if errors:
        raise UsageError(errors[0], agreed=True)
    return result


def on_rank0(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result (or UsageError) to every rank."""
    result, error = None, None
    if dist_util.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except UsageError as e:
            error = str(e)
    result, error = dist_util.broadcast_object((result, error))
    if error is not None:
        raise UsageError(error, agreed=True)
    return result


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------


def sample_defaults():
    return dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        eta=0.0,
        sampler="ddpm",
        solver_steps=20,
        solver_order=2,
        skip_type="time_uniform",
        solver_time_map="official",
        model_path=DEFAULT_MODEL_PATH,
        seed=0,
        save_attention_masks=False,
    )


def sample_flag_sets(script):
    """
    The flag dicts (beyond :func:`sample_defaults`) of a sampling script:
    ``image_sample``, ``classifier_sample`` or ``super_res_sample``.
    """
    sets = {
        "image_sample": [model_and_diffusion_defaults(), sag_defaults()],
        "classifier_sample": [model_and_diffusion_defaults(), classifier_defaults(), sag_defaults(),
                              dict(classifier_path="", classifier_scale=1.0)],
        "super_res_sample": [sr_model_and_diffusion_defaults(), sag_defaults(),
                             dict(base_samples="")],
    }
    return sets[script]


def sampling_argparser(doc, *defaults):
    """
    A parser for a sampling script: the first line of its docstring, then
    a flag for each key of :func:`sample_defaults` and of each dict in
    `defaults`.
    """
    flags = sample_defaults()
    for d in defaults:
        flags.update(d)
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    add_dict_to_argparser(parser, flags)
    return parser


def default_model_path(path):
    """Resolve the embedded default checkpoint relative to the repository too."""
    if path == DEFAULT_MODEL_PATH and not os.path.exists(path):
        return os.path.join(REPO_ROOT, path)
    return path




def asks_for_upstream_sampler(given):
    """
    Whether flags given explicitly (a command line's, a sweep setting's:
    {flag: value}) ask for upstream's samplers over a model card's solver:
    --timestep_respacing or --use_ddim True, and no --sampler.
    """
    return "sampler" not in given and ("timestep_respacing" in given or bool(given.get("use_ddim")))


def use_upstream_sampler(args):
    """
    Sample with upstream's samplers (ddpm; --use_ddim True then makes it
    ddim) instead of a card's solver, which then no longer chose the sampler.
    """
    args.sampler = "ddpm"
    args.from_card = [k for k in getattr(args, "from_card", ()) if k != "sampler"]


def flags_given(parser, argv=None):
    """The flags that `argv` sets itself (not through a default): {dest: value}."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    given, _ = parser.parse_known_args(argv, namespace)
    return {dest: value for dest, value in vars(given).items() if value is not unset}


def parse_args_with_card(parser, argv=None):
    """
    Parse flags; defaults come from the model card next to ``--model_path``
    (``name.json`` beside ``name.pt``) when there is one, then from the
    command line. Published checkpoints have no card: their flags are passed.
    A classifier's card (beside ``--classifier_path``) gives its
    ``classifier_*`` flags the same way. ``args.from_card`` lists the flags
    whose values a card chose.

    A card that samples with a solver (``"sampler": "sde-dpmsolver++"``)
    still lets the upstream commands choose upstream's samplers: with
    ``--use_ddim True`` or ``--timestep_respacing`` on the command line and
    no ``--sampler``, the run samples with DDIM or the ancestral sampler
    over those steps (docs/samplers.md).
    """
    pre, _ = parser.parse_known_args(argv)
    card = read_model_card(default_model_path(pre.model_path))
    known = {a.dest for a in parser._actions}
    defaults = {k: v for k, v in card.items() if k in known}
    if getattr(pre, "classifier_path", ""):
        # The classifier's own architecture; the diffusion's flags are the model's.
        defaults.update({k: v for k, v in read_model_card(pre.classifier_path).items()
                         if k.startswith("classifier_") and k in known})
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.model_path = default_model_path(args.model_path)
    given = flags_given(parser, argv)
    # Which values a card chose (for the log only; not in the fingerprint).
    args.from_card = sorted(k for k in defaults if k not in given)
    if "sampler" in card and "sampler" in known and asks_for_upstream_sampler(given):
        use_upstream_sampler(args)
    return args


def parse_sample_args(parser, argv=None):
    """:func:`parse_args_with_card`, then :func:`validate_sample_args`."""
    args = parse_args_with_card(parser, argv)
    validate_sample_args(args)
    return args


def refuse_classifier_guidance(args, instead):
    """For a script without a classifier: --classifier_guidance True is one line saying what to do."""
    if args.classifier_guidance:
        raise pure_usage_error(f"--classifier_guidance True {instead}; or pass --classifier_guidance False")


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
    if hasattr(args, "guide_scale"):
        try:
            check_sag_values(args.guide_scale, args.blur_sigma, args.sel_attn_block)
        except SAGConfigError as e:
            raise pure_usage_error(str(e)) from None
    if not (_finite(args.eta) and args.eta >= 0):
        raise pure_usage_error(f"--eta must be a finite number >= 0, got {args.eta}")
    try:
        check_sampler_flags(args)
    except ValueError as e:
        raise pure_usage_error(str(e)) from None
    if hasattr(args, "norm_groups"):
        try:
            check_norm_groups(args.norm_groups, args.num_channels, args.channel_mult, args.image_size)
        except ValueError as e:
            raise pure_usage_error(str(e)) from None
    if hasattr(args, "classifier_scale") and not _finite(args.classifier_scale):
        raise pure_usage_error(
            f"--classifier_scale must be a finite number, got {args.classifier_scale}"
        )


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
        dist_util.close_process_group()
        return result
    except UsageError as e:
        rank, world = dist_util.get_rank(), dist_util.get_world_size()
        if not e.agreed or rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if world > 1 and not e.agreed:
            os._exit(2)
        dist_util.close_process_group()
        sys.exit(2)
