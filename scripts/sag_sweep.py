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
(its model card says "dataset": "fashion_mnist", or --dataset fashion_mnist)
the label accuracy and feature FID of evaluations/fashion_metrics.py. Differences against the baseline come with
paired bootstrap intervals over positions. Written to the log directory:
sweep.csv, sweep.json and sweep.png (with matplotlib: pip install -e '.[plot]').
docs/sag-sweep.md tells more.
"""

import argparse
import csv
import os
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))


from improved_diffusion.run.sweep_grid import (  # noqa: E402
    BASELINE_SCALE,
    CLASSIFIER_FLAGS,
    SAMPLER_FLAGS,
    check_setting,
    grid_names,
    parse_grids,
    setting_args,
    settings_of_grids,
)
from evaluations.sweep_scores import DATASETS, NO_SCORER, Scorer, compare, dataset_of  # noqa: E402
from improved_diffusion import cli, dist_util  # noqa: E402
from improved_diffusion.sampling import drawer  # noqa: E402
from improved_diffusion.checkpoints.loading import classifier_from_args, model_from_args  # noqa: E402
from improved_diffusion.files.atomic import atomic_json, atomic_write  # noqa: E402
from improved_diffusion.run.sample_run import Batches, default_log_dir, sample_to_npz  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.sampling.samplers import Sampler  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

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
    parser.add_argument("--dataset", default="", choices=("",) + DATASETS + ("none",),
                        help="the dataset whose own scorer applies (default: the model card's "
                        "'dataset'; none: no dataset scorer)")
    return parser


SWEEP_DESTS = ("grid", "ref_batch", "inception_path", "bootstrap", "reference", "dataset")
# Flags that set how many steps a sampler takes (the x axis of nfe.png).
STEP_FLAGS = ("timestep_respacing", "solver_steps")


# ---------------------------------------------------------------------------
# Flags and grid
# ---------------------------------------------------------------------------


def parse_args(argv):
    """(fixed flags as the script parses them, sweep flags, the script's parser, its name)."""
    args = cli.parse_sample_args(add_sweep_flags(sweep_parser("classifier_sample")), argv)
    with_classifier = (bool(args.classifier_path) or args.classifier_guidance
                       or any(n in CLASSIFIER_FLAGS for n in grid_names(args.grid)))
    name = "classifier_sample" if with_classifier else "image_sample"
    if not with_classifier:
        args = cli.parse_sample_args(add_sweep_flags(sweep_parser(name)), argv)
    sweep = argparse.Namespace(**{k: getattr(args, k) for k in SWEEP_DESTS})
    fixed = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in SWEEP_DESTS})
    if sweep.bootstrap < 0:
        raise cli.pure_usage_error(f"--bootstrap must be >= 0, got {sweep.bootstrap}")
    return fixed, sweep, sweep_parser(name), name


def sweep_parser(script):
    """The parser of a sampling script's flags (``image_sample`` or ``classifier_sample``)."""
    return cli.sampling_argparser(__doc__, *cli.sample_flag_sets(script))


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


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------


def setting_drawer(args, model, diffusion, sag, classifier, with_classifier):
    """The BatchDrawer of one setting, as the script the sweep stands for builds it."""
    if with_classifier:
        guided = classifier if args.classifier_guidance else None
        return drawer.make_drawer(args, model, diffusion, sag, guided, labels_always=True)
    return drawer.make_drawer(args, model, diffusion, sag)


def log0(line):
    if dist_util.get_rank() == 0:
        print(line, flush=True)


def main(argv=None):
    fixed, sweep, script_parser, script_name = parse_args(argv)
    with_classifier = script_name == "classifier_sample"
    grids = parse_grids(sweep.grid, script_parser)
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
        scorer[0] = Scorer(sweep, fixed, has_labels, dataset_of(sweep.dataset, fixed.model_path))
        if not scorer[0].scores_anything:
            print(NO_SCORER, flush=True)

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

    paths = sample_settings(runs, sags, model, diffusions, classifier, with_classifier,
                            script_name, has_labels, log_dir)
    if dist_util.get_rank() != 0:
        return None
    rows = score_settings(runs, paths, scorer[0], sweep, log_dir, grids, diffusions)
    write_outputs(log_dir, rows, grids, fixed, sweep, script_name)
    return rows


def sample_settings(runs, sags, model, diffusions, classifier, with_classifier, script_name,
                    has_labels, log_dir):
    """Each setting as an ordinary run in its own folder (resumed, or left as it is when
    complete); the npz paths on rank 0."""
    paths = []
    for i, ((s, args), sag) in enumerate(zip(runs, sags)):
        files = {"model_path": args.model_path}
        if with_classifier and args.classifier_guidance:
            files["classifier_path"] = args.classifier_path
        drawn = []

        def setup(setting_dir, args=args, sag=sag, drawn=drawn):
            drawn.append(True)
            draw = setting_drawer(args, model, diffusions[args.timestep_respacing], sag, classifier,
                                  with_classifier)
            return Batches(draw, drawer.describe_setup(args, model, draw),
                           drawer.sag_pictures(args, draw, setting_dir))

        log0(f"setting {i + 1}/{len(runs)}: {s['name']}")
        path = sample_to_npz(args, script_name, args.image_size, has_labels, files, setup,
                             log_dir=os.path.join(log_dir, SWEEP_DIR, s["name"]))
        log0(f"setting {i + 1}/{len(runs)}: {s['name']}: "
             + ("sampled" if drawn else "already complete, not redrawn"))
        paths.append(path)
    return paths


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


def _save(plt, fig, path, layout=True):
    if layout:
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
        for i, (label, points) in enumerate(nfe_lines(rows, key).items()):
            # matplotlib cycles 10 colours: later lines get another marker and dashes.
            style = dict(marker="o") if i < 10 else dict(marker="s", linestyle="--")
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(key)
    # One legend under both panels (the same lines in each), clear of the data.
    handles, labels = panels[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * ((len(labels) + 1) // 2), 1, 1))
    return _save(plt, fig, path, layout=False)


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
