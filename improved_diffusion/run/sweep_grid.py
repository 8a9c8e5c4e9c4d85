"""
The settings of a paired guidance sweep (scripts/sag_sweep.py): the grid
text (``"flag=v1,v2 flag2=w1; flag3=u1"``) parsed like the flags it names,
the Cartesian product of each grid, the no-SAG baselines, and the flags of
each setting. Every setting is an ordinary sampling run of its own.
"""

import argparse
import itertools

from ..cli import asks_for_upstream_sampler, use_upstream_sampler, validate_sample_args
from ..errors import UsageError, pure_usage_error

# Flags that only act through a second SAG pass: none of them changes a
# sample at guide_scale 1.0 (SelfAttentionGuidance.applies is then False at
# every step and the sampler takes the plain path).
SAG_ONLY = ("blur_sigma", "sel_attn_block", "sel_attn_depth", "guide_start", "sag_true_attention")
# The sampler's flags (a setting with another --timestep_respacing gets its own diffusion).
SAMPLER_FLAGS = ("sampler", "use_ddim", "eta", "timestep_respacing", "solver_steps", "solver_order",
                 "skip_type", "solver_time_map")
SWEEPABLE = ("guide_scale",) + SAG_ONLY + SAMPLER_FLAGS + (
    "clip_denoised", "classifier_scale", "classifier_guidance")
CLASSIFIER_FLAGS = ("classifier_scale", "classifier_guidance")
BASELINE_SCALE = 1.0

def grid_names(text):
    """The flag names of a grid text (for choosing the script before parsing values)."""
    return [item.split("=", 1)[0] for item in text.replace(";", " ").split()]


def parse_grids(text, parser):
    """
    ``"flag=v1,v2 flag2=w1; flag3=u1,u2"`` -> one grid per ``;``-separated
    part (settings: the union of their products), each as :func:`parse_grid`.
    """
    parts = text.split(";")
    if len(parts) > 1 and any(not part.split() for part in parts):
        raise pure_usage_error(f"--grid: an empty part between ';' in {text!r}")
    return [parse_grid(part, parser) for part in parts]


def parse_grid(text, parser):
    """
    ``"flag=v1,v2 flag2=w1"`` -> [(flag, [values parsed like the flag]), ...]
    in the order given; raises a pure UsageError naming the bad part.
    """
    sweepable = ", ".join(SWEEPABLE)
    if not text.split():
        raise pure_usage_error(
            f"--grid is empty; give flag=v1,v2,... items, e.g. \"guide_scale=1.0,1.5\" "
            f"(sweepable: {sweepable})")
    types = {a.dest: a.type for a in parser._actions}
    grid, seen = [], set()
    for item in text.split():
        flag, sep, values = item.partition("=")
        if not sep:
            raise pure_usage_error(f"--grid: {item!r} is not flag=v1,v2,...")
        if flag not in SWEEPABLE:
            raise pure_usage_error(f"--grid: unknown flag {flag!r} (sweepable: {sweepable})")
        if flag in seen:
            raise pure_usage_error(f"--grid: {flag} is given twice; list its values once")
        seen.add(flag)
        raw = values.split(",")
        if not values or any(not v for v in raw):
            raise pure_usage_error(f"--grid: {flag} has an empty value in {item!r}")
        parsed = []
        for v in raw:
            try:
                value = types[flag](v)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                kind = getattr(types[flag], "__name__", "value").replace("str2bool", "True/False")
                raise pure_usage_error(
                    f"--grid: {flag} cannot take {v!r} (expects {kind})") from None
            if value in parsed:
                raise pure_usage_error(f"--grid: {flag} lists {v!r} twice")
            parsed.append(value)
        grid.append((flag, parsed))
    return grid


def _text(value):
    return repr(value) if isinstance(value, float) else str(value)


def settings_of(grid, fixed):
    """
    The settings, in a stable order: the Cartesian product of the grid (the
    first flag varying slowest), the no-SAG baselines sampled once per value
    of the other flags (added first when the grid has none).

    :return: (settings, notes) with each setting a dict(name, values (every
        grid flag), shown (the flags that act), baseline, group).
    """
    flags = [f for f, _ in grid]
    group_flags = [f for f in flags if f != "guide_scale" and f not in SAG_ONLY]
    settings, names, notes = [], set(), []
    for combo in itertools.product(*[vals for _, vals in grid]):
        values = dict(zip(flags, combo))
        scale = values.get("guide_scale", fixed.guide_scale)
        settings.append(_setting(values, flags, group_flags, float(scale) == BASELINE_SCALE))
    for s in list(settings):
        if s["baseline"] and s["name"] in names:
            settings.remove(s)  # the same samples as the first one of this name
        names.add(s["name"])
    for group in dict.fromkeys(s["group"] for s in settings):
        if not any(s["baseline"] and s["group"] == group for s in settings):
            first = {f: vals[0] for f, vals in grid}
            first.update(dict(group), guide_scale=BASELINE_SCALE)
            base = _setting(first, flags, group_flags, True)
            settings.insert(0, base)
            notes.append(f"the grid has no guide_scale {BASELINE_SCALE}: adding the no-SAG "
                         f"baseline {base['name']}")
    return settings, notes


def settings_of_grids(grids, fixed):
    """The settings of several grids: each grid's (:func:`settings_of`), each name once."""
    settings, notes, names = [], [], set()
    for grid in grids:
        part, part_notes = settings_of(grid, fixed)
        settings += [s for s in part if s["name"] not in names]
        names.update(s["name"] for s in part)
        notes += part_notes
    return settings, notes


def _setting(values, flags, group_flags, baseline):
    shown = {f: values[f] for f in flags if not (baseline and f in SAG_ONLY)}
    if baseline:
        shown = dict(guide_scale=BASELINE_SCALE, **{f: v for f, v in shown.items()
                                                     if f != "guide_scale"})
    name = ",".join(f"{f}={_text(v)}" for f, v in shown.items())
    return dict(name=name, values=values, shown=shown, baseline=baseline,
                group=tuple((f, values[f]) for f in group_flags))


def setting_args(fixed, setting):
    """
    The flags of one setting: the fixed part with the setting's grid values.
    A baseline runs no SAG pass, so it keeps the fixed part's SAG-only flags
    whatever the grid lists: the same run (and the same folder to resume)
    in every sweep that shares it, in whatever order the grid gives them.
    A setting that gives --timestep_respacing or --use_ddim True and no
    --sampler samples with the ancestral sampler or DDIM, whatever sampler
    the fixed part (the model card) names.
    """
    args = argparse.Namespace(**vars(fixed))
    values = setting["values"]
    for flag, value in values.items():
        if not (setting["baseline"] and flag in SAG_ONLY):
            setattr(args, flag, value)
    if setting["baseline"]:
        args.guide_scale = BASELINE_SCALE
    args.from_card = [k for k in getattr(fixed, "from_card", ()) if k not in values]
    # As on a command line (cli.parse_args_with_card).
    if asks_for_upstream_sampler(values):
        use_upstream_sampler(args)
    return args


def check_setting(args, setting, with_classifier):
    """The flag checks of the scripts, for one setting (pure UsageError)."""
    try:
        validate_sample_args(args)
    except UsageError as e:
        raise pure_usage_error(f"--grid: setting {setting['name']}: {e}") from None
    if with_classifier and args.classifier_guidance and not args.classifier_path:
        where = (f"--grid: setting {setting['name']}" if "classifier_guidance" in setting["values"]
                 else "--classifier_guidance True")
        raise pure_usage_error(
            f"{where} needs --classifier_path (a noisy-image classifier); pass it, or leave "
            "classifier guidance off")
