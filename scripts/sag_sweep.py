"""
Sample a grid of guidance settings with the same seeds and score every setting.

    mpiexec -n N python scripts/sag_sweep.py $MODEL_FLAGS --model_path M \
        --grid "guide_scale=1.0,1.1,1.5,2.0 blur_sigma=1,3,9 sel_attn_depth=2,5" \
        --num_samples N [--ref_batch REF.npz [--inception_path W]] [--bootstrap 1000]

Every flag of image_sample.py (or, with --classifier_path or classifier flags
in the grid, of classifier_sample.py) is the fixed part; --grid lists the
flags to vary as space-separated ``flag=v1,v2,...``, and the settings are
their Cartesian product. Position p of every setting comes from seed + p, so
the settings are paired. Each setting is an ordinary sampling run in
``$OPENAI_LOGDIR/settings/<flag=value,...>/`` (shards, resume, config.json):
the same command run again resumes where it stopped and redraws no finished
setting. The no-SAG baseline (guide_scale 1.0, which runs no SAG pass, so
blur_sigma and the block do not matter there) is sampled once per value of
the other flags, and added when the grid has none.

Scores (rank 0): with --ref_batch the evaluator's FID, sFID, IS, precision
and recall (the reference's Inception pass once); for a Fashion-MNIST model
(32x32, 10 classes) the label accuracy and feature FID of
evaluations/fashion_metrics.py. Differences against the baseline come with
paired bootstrap intervals over positions. Written to the log directory:
sweep.csv, sweep.json and sweep.png (with matplotlib: pip install -e '.[plot]').
docs/sag-sweep.md tells more.
"""

import argparse
import csv
import importlib.util
import itertools
import os
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))

import numpy as np  # noqa: E402

from evaluations.paired_stats import (  # noqa: E402
    FrechetReference,
    FrechetToReference,
    fid_of,
    mcnemar,
    mean_score,
    paired_bootstrap,
)
from improved_diffusion import cli, dist_util, sampling  # noqa: E402
from improved_diffusion.checkpoints import classifier_from_args, model_from_args  # noqa: E402
from improved_diffusion.file_util import atomic_json, atomic_write  # noqa: E402
from improved_diffusion.sample_run import Batches, default_log_dir, sample_to_npz  # noqa: E402
from improved_diffusion.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.samplers import Sampler  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

def _load_script(name):
    """A sampling script of this folder as a module (its flags and nothing run)."""
    spec = importlib.util.spec_from_file_location(f"sag_sweep_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_sample = _load_script("image_sample")
classifier_sample = _load_script("classifier_sample")

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
SWEEP_DIR = "settings"
PLOT_HINT = "sweep.png not written: matplotlib is not installed (pip install -e '.[plot]')"


def add_sweep_flags(parser):
    parser.add_argument("--grid", default="",
                        help='space-separated flag=v1,v2,... e.g. "guide_scale=1.0,1.5 blur_sigma=1,3"')
    parser.add_argument("--ref_batch", default="",
                        help="reference npz (uint8 arr_0) for FID, sFID, IS, precision, recall")
    parser.add_argument("--inception_path", default=None,
                        help="the evaluator's Inception weights (evaluations/evaluator.py)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples of the positions for the intervals (0: none)")
    parser.add_argument("--reference", default="",
                        help="a setting's name: every row is also compared with it (ref_diff_*)")
    return parser


SWEEP_DESTS = ("grid", "ref_batch", "inception_path", "bootstrap", "reference")
# Flags that set how many steps a sampler takes (the x axis of nfe.png).
STEP_FLAGS = ("timestep_respacing", "solver_steps")


# ---------------------------------------------------------------------------
# Flags and grid
# ---------------------------------------------------------------------------


def grid_names(text):
    """The flag names of a grid text (for choosing the script before parsing values)."""
    return [item.split("=", 1)[0] for item in text.replace(";", " ").split()]


def parse_args(argv):
    """(fixed flags as the script parses them, sweep flags, the script module, its name)."""
    args = cli.parse_sample_args(add_sweep_flags(classifier_sample.create_argparser()), argv)
    with_classifier = (bool(args.classifier_path) or args.classifier_guidance
                       or any(n in CLASSIFIER_FLAGS for n in grid_names(args.grid)))
    script, name = classifier_sample, "classifier_sample"
    if not with_classifier:
        script, name = image_sample, "image_sample"
        args = cli.parse_sample_args(add_sweep_flags(script.create_argparser()), argv)
    sweep = argparse.Namespace(**{k: getattr(args, k) for k in SWEEP_DESTS})
    fixed = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in SWEEP_DESTS})
    if sweep.bootstrap < 0:
        raise cli.pure_usage_error(f"--bootstrap must be >= 0, got {sweep.bootstrap}")
    return fixed, sweep, script, name


def parse_grids(text, parser):
    """
    ``"flag=v1,v2 flag2=w1; flag3=u1,u2"`` -> one grid per ``;``-separated
    part (settings: the union of their products), each as :func:`parse_grid`.
    """
    parts = text.split(";")
    if len(parts) > 1 and any(not part.split() for part in parts):
        raise cli.pure_usage_error(f"--grid: an empty part between ';' in {text!r}")
    return [parse_grid(part, parser) for part in parts]


def parse_grid(text, parser):
    """
    ``"flag=v1,v2 flag2=w1"`` -> [(flag, [values parsed like the flag]), ...]
    in the order given; raises a pure UsageError naming the bad part.
    """
    sweepable = ", ".join(SWEEPABLE)
    if not text.split():
        raise cli.pure_usage_error(
            f"--grid is empty; give flag=v1,v2,... items, e.g. \"guide_scale=1.0,1.5\" "
            f"(sweepable: {sweepable})")
    types = {a.dest: a.type for a in parser._actions}
    grid, seen = [], set()
    for item in text.split():
        flag, sep, values = item.partition("=")
        if not sep:
            raise cli.pure_usage_error(f"--grid: {item!r} is not flag=v1,v2,...")
        if flag not in SWEEPABLE:
            raise cli.pure_usage_error(f"--grid: unknown flag {flag!r} (sweepable: {sweepable})")
        if flag in seen:
            raise cli.pure_usage_error(f"--grid: {flag} is given twice; list its values once")
        seen.add(flag)
        raw = values.split(",")
        if not values or any(not v for v in raw):
            raise cli.pure_usage_error(f"--grid: {flag} has an empty value in {item!r}")
        parsed = []
        for v in raw:
            try:
                value = types[flag](v)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                kind = getattr(types[flag], "__name__", "value").replace("str2bool", "True/False")
                raise cli.pure_usage_error(
                    f"--grid: {flag} cannot take {v!r} (expects {kind})") from None
            if value in parsed:
                raise cli.pure_usage_error(f"--grid: {flag} lists {v!r} twice")
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


def diffusion_of(args):
    """The diffusion of a setting's flags (its own --timestep_respacing)."""
    try:
        return create_gaussian_diffusion(
            steps=args.diffusion_steps, learn_sigma=args.learn_sigma, noise_schedule=args.noise_schedule,
            use_kl=args.use_kl, predict_xstart=args.predict_xstart,
            rescale_timesteps=args.rescale_timesteps, rescale_learned_sigmas=args.rescale_learned_sigmas,
            timestep_respacing=args.timestep_respacing)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def network_evaluations(args, diffusion):
    """Model evaluations per sample: one per step, two where SAG applies (classifier calls aside)."""
    steps = Sampler.from_args(args, diffusion).steps
    guided = 0 if float(args.guide_scale) == BASELINE_SCALE else min(steps, max(0, args.guide_start))
    return steps + guided


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
    """
    args = argparse.Namespace(**vars(fixed))
    for flag, value in setting["values"].items():
        if not (setting["baseline"] and flag in SAG_ONLY):
            setattr(args, flag, value)
    if setting["baseline"]:
        args.guide_scale = BASELINE_SCALE
    return args


def check_setting(args, setting, with_classifier):
    """The flag checks of the scripts, for one setting (pure UsageError)."""
    try:
        cli.validate_sample_args(args)
    except cli.UsageError as e:
        raise cli.pure_usage_error(f"--grid: setting {setting['name']}: {e}") from None
    if with_classifier and args.classifier_guidance and not args.classifier_path:
        where = (f"--grid: setting {setting['name']}" if "classifier_guidance" in setting["values"]
                 else "--classifier_guidance True")
        raise cli.pure_usage_error(
            f"{where} needs --classifier_path (a noisy-image classifier); pass it, or leave "
            "classifier guidance off")


# ---------------------------------------------------------------------------
# Before sampling: the reference batch and the scorers
# ---------------------------------------------------------------------------


def is_fashion_model(args):
    return int(args.image_size) == 32 and int(args.num_classes) == 10


class Scorer:
    """What scores a setting's npz: the evaluator with its reference, the Fashion-MNIST metrics."""

    def __init__(self, sweep, args, has_labels):
        from evaluations import fashion_metrics

        self.sweep, self.has_labels = sweep, has_labels
        self.inception = self.ref = None
        if sweep.ref_batch:
            from evaluations.evaluator import Evaluator, NpzBatch
            from evaluations.fid_inception import (EvaluationError, load_fid_inception,
                                                   resolve_inception_weights)

            try:
                self.ref = NpzBatch(sweep.ref_batch)
                weights = resolve_inception_weights(sweep.inception_path)
                self.inception = Evaluator(load_fid_inception(weights, device=dist_util.dev()),
                                           device=dist_util.dev(), progress=False)
            except EvaluationError as e:
                raise cli.UsageError(f"--ref_batch/--inception_path: {e}") from None
            size = int(args.image_size)
            if tuple(self.ref.shape[1:3]) != (size, size):
                raise cli.UsageError(
                    f"--ref_batch {sweep.ref_batch} holds {self.ref.shape[1]}x{self.ref.shape[2]} "
                    f"images but the samples are {size}x{size} (--image_size {size}); pass a "
                    "reference batch of the model's size")
            if len(self.ref) < 4 or int(args.num_samples) < 4:
                raise cli.UsageError(
                    f"precision and recall need at least 4 images (--ref_batch holds "
                    f"{len(self.ref)}, --num_samples {args.num_samples})")
        self.fashion = None
        if is_fashion_model(args):
            try:
                self.fashion = fashion_metrics.load_eval_classifier()
            except FileNotFoundError as e:
                raise cli.UsageError(f"Fashion-MNIST metrics: {e}") from None
        self.ref_acts = self.ref_stats = self.fashion_ref = None

    def _reference(self):
        """The reference statistics, computed once."""
        from evaluations import fashion_metrics

        if self.inception is not None and self.ref_acts is None:
            self.ref_acts = self.inception.read_activations(self.ref, desc="reference batch")
            self.ref_stats = [FrechetReference(*stats) for stats in
                              self.inception.read_statistics(self.ref, self.ref_acts)]
        if self.fashion is not None and self.fashion_ref is None:
            self.fashion_ref = FrechetReference(*fashion_metrics.reference_stats(
                self.fashion, fashion_metrics.DEFAULT_CLASSIFIER))

    def score(self, path):
        """
        (scores, per-position data for the paired comparison) of one npz. The
        Frechet distances are the evaluator's (evaluations/paired_stats.py
        computes them without its matrix square root, equal up to rounding).
        """
        from evaluations import evaluator, fashion_metrics

        self._reference()
        scores, paired = {}, {}
        with np.load(path) as z:
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in z else None
        scores["n"] = len(images)
        if self.inception is not None:
            pool, spatial = self.inception.read_activations(evaluator.NpzBatch(path),
                                                            desc=os.path.basename(path))
            paired["fid"] = FrechetToReference(pool, self.ref_stats[0])
            scores["fid"] = paired["fid"]()
            scores["sfid"] = FrechetToReference(spatial, self.ref_stats[1])()
            scores["inception_score"] = self.inception.compute_inception_score(pool)
            scores["precision"], scores["recall"] = evaluator.precision_recall(
                self.ref_acts[0], pool, device=str(dist_util.dev()))
        if self.fashion is not None:
            feats = fashion_metrics.features(self.fashion, images)
            paired["fashion_fid"] = FrechetToReference(feats, self.fashion_ref)
            scores["fashion_fid"] = paired["fashion_fid"]()
            if labels is not None:
                right = fashion_metrics.predict(self.fashion, images) == labels
                scores["accuracy"] = float(right.mean())
                paired["accuracy"] = right
        return {k: float(v) if k != "n" else int(v) for k, v in scores.items()}, paired


def compare(scores, paired, base_scores, base_paired, n_boot):
    """Differences against the baseline; intervals for accuracy and the FIDs."""
    out = {}
    for key, value in scores.items():
        if key == "n" or key not in base_scores:
            continue
        out[f"diff_{key}"] = value - base_scores[key]
        if key in paired:
            score = mean_score if key == "accuracy" else fid_of
            res = paired_bootstrap(score, paired[key], base_paired[key], n_boot=n_boot, seed=0)
            out[f"diff_{key}"] = res["difference"]
            if res["ci"] is not None:
                out[f"diff_{key}_ci_low"], out[f"diff_{key}_ci_high"] = res["ci"]
    if "accuracy" in paired:
        m = mcnemar(paired["accuracy"], base_paired["accuracy"])
        out.update(right_only_here=m["right_only_in_a"], right_only_in_baseline=m["right_only_in_b"],
                   mcnemar_p=m["p"])
    return out


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------


def drawer(args, model, diffusion, sag, classifier, with_classifier):
    """The BatchDrawer of one setting, as the script the sweep stands for builds it."""
    if with_classifier:
        guided = classifier if args.classifier_guidance else None
        return sampling.make_drawer(args, model, diffusion, sag, guided, labels_always=True)
    return sampling.make_drawer(args, model, diffusion, sag)


def log0(line):
    if dist_util.get_rank() == 0:
        print(line, flush=True)


def main(argv=None):
    fixed, sweep, script, script_name = parse_args(argv)
    with_classifier = script is classifier_sample
    grids = parse_grids(sweep.grid, script.create_argparser())
    settings, notes = settings_of_grids(grids, fixed)
    runs = [(s, setting_args(fixed, s)) for s in settings]
    if sweep.reference and sweep.reference not in [s["name"] for s in settings]:
        raise cli.pure_usage_error(
            f"--reference {sweep.reference!r} is not a setting of this sweep; its settings: "
            + "; ".join(s["name"] for s in settings))
    for s, args in runs:
        check_setting(args, s, with_classifier)
    dist_util.setup_dist()
    log_dir = cli.on_rank0(_log_dir)
    has_labels = with_classifier or bool(fixed.class_cond)
    scorer = [None]

    def make_scorer():
        scorer[0] = Scorer(sweep, fixed, has_labels)

    cli.on_rank0(make_scorer)
    # The model once for the whole sweep; a SAG object per setting (all built,
    # hence checked, before any sampling).
    model, diffusion = cli.agree(model_from_args, fixed)
    diffusions = {fixed.timestep_respacing: diffusion}
    for _, args in runs:
        if args.timestep_respacing not in diffusions:
            diffusions[args.timestep_respacing] = cli.agree(diffusion_of, args)
    sags = [cli.agree(_sag_for, model, args, s) for s, args in runs]
    classifier = None
    if any(with_classifier and args.classifier_guidance for _, args in runs):
        classifier = cli.agree(classifier_from_args, fixed)
    for line in notes:
        log0(line)
    log0(f"sweep of {len(runs)} settings ({script_name}) into {log_dir}")

    paths = []
    for i, ((s, args), sag) in enumerate(zip(runs, sags)):
        files = {"model_path": args.model_path}
        if with_classifier and args.classifier_guidance:
            files["classifier_path"] = args.classifier_path
        drawn = []

        def setup(setting_dir, args=args, sag=sag, drawn=drawn):
            drawn.append(True)
            draw = drawer(args, model, diffusions[args.timestep_respacing], sag, classifier,
                          with_classifier)
            return Batches(draw, sampling.describe_setup(args, model, draw),
                           sampling.sag_pictures(args, draw, setting_dir))

        log0(f"setting {i + 1}/{len(runs)}: {s['name']}")
        path = sample_to_npz(args, script_name, args.image_size, has_labels, files, setup,
                             log_dir=os.path.join(log_dir, SWEEP_DIR, s["name"]))
        log0(f"setting {i + 1}/{len(runs)}: {s['name']}: "
             + ("sampled" if drawn else "already complete, not redrawn"))
        paths.append(path)
    if dist_util.get_rank() != 0:
        return None
    rows = score_settings(runs, paths, scorer[0], sweep, log_dir, grids, diffusions)
    write_outputs(log_dir, rows, grids, fixed, sweep, script_name)
    return rows


def _log_dir():
    return os.path.abspath(os.path.expanduser(default_log_dir()))


def _sag_for(model, args, setting):
    try:
        return SelfAttentionGuidance.from_args(model, args)
    except cli.UsageError as e:
        raise cli.UsageError(f"--grid: setting {setting['name']}: {e}") from None


def score_settings(runs, paths, scorer, sweep, log_dir, grids, diffusions):
    """
    One row per setting: its flags, network evaluations per sample ('nfe'),
    scores and differences against its baseline (and against --reference).
    """
    flags = list(dict.fromkeys(f for grid in grids for f, _ in grid))
    scored = [scorer.score(p) for p in paths]
    settings = [s for s, _ in runs]
    base_of = {s["group"]: i for i, s in enumerate(settings) if s["baseline"]}
    rows = []
    for (s, args), path, (scores, paired) in zip(runs, paths, scored):
        row = dict(setting=s["name"], baseline=s["baseline"])
        for flag in flags:
            row[flag] = s["shown"].get(flag)
        row["guide_scale"] = float(args.guide_scale)
        row["nfe"] = network_evaluations(args, diffusions[args.timestep_respacing])
        row["npz"] = os.path.relpath(path, log_dir)
        row.update(scores)
        b = base_of[s["group"]]
        if not s["baseline"]:
            row["baseline_setting"] = settings[b]["name"]
            row.update(compare(scores, paired, scored[b][0], scored[b][1], sweep.bootstrap))
        if sweep.reference and s["name"] != sweep.reference:
            r = [x["name"] for x in settings].index(sweep.reference)
            versus = compare(scores, paired, scored[r][0], scored[r][1], sweep.bootstrap)
            row.update({"ref_" + k: v for k, v in versus.items() if k.startswith("diff_")})
        rows.append(row)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k != "n")
        print(f"{s['name']}: {summary or 'no scores (pass --ref_batch)'}", flush=True)
    return rows


def write_outputs(log_dir, rows, grids, fixed, sweep, script_name):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(os.path.join(log_dir, "sweep.csv"), "w") as f:
        writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_json(os.path.join(log_dir, "sweep.json"),
                dict(script=script_name, grid=[{f: v for f, v in grid} for grid in grids],
                     bootstrap=dict(resamples=sweep.bootstrap, seed=0, level=0.95),
                     ref_batch=sweep.ref_batch or None, flags=vars(fixed), rows=rows),
                indent=1, default=str)
    print(f"wrote {os.path.join(log_dir, 'sweep.csv')} and sweep.json", flush=True)
    print(plot(rows, os.path.join(log_dir, "sweep.png")), flush=True)
    if any(f in SAMPLER_FLAGS for grid in grids for f, _ in grid):
        print(plot_nfe(rows, os.path.join(log_dir, "nfe.png")), flush=True)


def plot_lines(rows, key):
    """
    The lines of one panel of sweep.png: {label: [(guide_scale, value,
    low, high)]}, one per value of the flags other than guide_scale, sorted
    by scale and starting at their baseline (guide_scale 1, low = high =
    value). low and high place the paired 95 % interval of the difference
    against the baseline around the baseline's value (None without one).
    """
    baselines = {r["setting"]: r for r in rows if r["baseline"]}
    lines = {}
    for r in rows:
        if r["baseline"] or key not in r:
            continue
        label = ", ".join(f"{k}={v}" for k, v in _line_flags(r).items())
        base = baselines[r["baseline_setting"]]
        if label not in lines:
            lines[label] = [(BASELINE_SCALE, base[key], base[key], base[key])] if key in base else []
        low, high = r.get(f"diff_{key}_ci_low"), r.get(f"diff_{key}_ci_high")
        if low is None or high is None or key not in base:
            low = high = None
        else:
            low, high = base[key] + low, base[key] + high
        lines[label].append((float(r["guide_scale"]), r[key], low, high))
    return {label: sorted(points) for label, points in lines.items()}


def plot(rows, path):
    """
    sweep.png: FID (and accuracy) against guide_scale, one line per value of
    the other flags with the paired intervals as error bars, each baseline as
    a horizontal line. Returns a line for the log.
    """
    figure, message = _figure(rows, path, width=6)
    if figure is None:
        return message
    plt, fig, panels = figure
    baselines = {r["setting"]: r for r in rows if r["baseline"]}
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for ax, key in panels:
        for n, (name, base) in enumerate(baselines.items()):
            if key in base:
                group = name.partition(",")[2]
                ax.axhline(base[key], color="black", linewidth=1, linestyle=styles[n % len(styles)],
                           label=f"no SAG {group}".strip())
        for label, points in plot_lines(rows, key).items():
            x, y = [p[0] for p in points], [p[1] for p in points]
            err = [[p[1] - p[2] if p[2] is not None else 0 for p in points],
                   [p[3] - p[1] if p[3] is not None else 0 for p in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label or "SAG")
        ax.set_xlabel("guide_scale")
        ax.set_ylabel(key + " (bars: paired 95 % interval)")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _figure(rows, path, width):
    """
    ((plt, fig, [(axis, score key)]), None) for a figure with a panel for FID
    and one for accuracy (those the rows have), or (None, a line saying why not).
    """
    name = os.path.basename(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, PLOT_HINT.replace("sweep.png", name)
    fid_key = "fid" if any("fid" in r for r in rows) else "fashion_fid"
    keys = [k for k in (fid_key, "accuracy") if any(k in r for r in rows)]
    if not keys:
        return None, f"{name} not written: no scores (pass --ref_batch)"
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 4.5), squeeze=False)
    return (plt, fig, list(zip(axes[0], keys))), None


def _save(plt, fig, path):
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def nfe_lines(rows, key):
    """
    The lines of one panel of nfe.png: {label: [(nfe, value)]}, one per
    sampler and guidance setting (the setting's flags but the step counts),
    sorted by network evaluations per sample.
    """
    lines = {}
    for r in rows:
        if key not in r:
            continue
        flags = {k: v for k, v in _line_flags(r, keep_scale=True).items() if k not in STEP_FLAGS}
        label = ", ".join(f"{k}={v}" for k, v in flags.items())
        lines.setdefault(label, []).append((int(r["nfe"]), r[key]))
    return {label: sorted(points) for label, points in lines.items()}


def plot_nfe(rows, path):
    """nfe.png: FID and accuracy against network evaluations per sample. Returns a line for the log."""
    figure, message = _figure(rows, path, width=6.5)
    if figure is None:
        return message
    plt, fig, panels = figure
    for ax, key in panels:
        for label, points in nfe_lines(rows, key).items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _line_flags(row, keep_scale=False):
    """The flags of a row (but guide_scale unless keep_scale) by name, from its setting name."""
    flags = {}
    for item in row["setting"].split(","):
        flag, _, value = item.partition("=")
        if keep_scale or flag != "guide_scale":
            flags[flag] = value
    return flags


if __name__ == "__main__":
    cli.run_main(main)
