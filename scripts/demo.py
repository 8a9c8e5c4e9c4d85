"""
The demo (`make demo`): draw 256 class-conditional Fashion-MNIST garments with
Self-Attention Guidance from the embedded default model on the CPU, offline,
then score them with the project's own Fashion-MNIST classifier.

    python scripts/demo.py [--out_dir demo_out] [--num_samples 256] [--seed 0]
        [any scripts/image_sample.py flag, e.g. --guide_scale 1.0]

Writes into --out_dir (replacing the files of an earlier run):
  samples_256x32x32x3.npz   arr_0 uint8 images, arr_1 int64 labels
  the PNG grid and the SAG-mask pictures that scripts/image_sample.py writes
  samples_by_class.png      one row per class, named
  sag_vs_none.png           the first 64 positions with SAG beside the same seeds
                            without it (drawn into no_sag/; --compare False skips it)
  metrics.json              accuracy of the labels and feature FID vs the test split
and prints where they are.

The sampling flags come from the default model's card (models/fashion32_ema.json:
SDE-DPM-Solver++ with 15 logSNR steps and SAG on each, bfloat16 where the CPU
has it); flags given here win.
"""

import argparse
import json
import os
import shutil
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "demo_out")

# Optional outputs of image_sample.py, used when that script has the flag.
PICTURE_FLAGS = {
    "save_attention_masks": "True",
}
# The comparison without SAG: how many positions, and the folder of its run.
COMPARE_SAMPLES = 64
COMPARE_DIR = "no_sag"
# What a finished run leaves in out_dir (a folder holding one of these is
# taken for an earlier demo's output and emptied first).
RUN_MARKERS = ("config.json", "log.txt", "metrics.json")


def _has_flag(argv, name):
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def sample_argv(args, extra, known_flags):
    """The image_sample.py command line of the demo."""
    argv = ["--num_samples", str(args.num_samples), "--seed", str(args.seed)]
    for name, value in PICTURE_FLAGS.items():
        if name in known_flags and not _has_flag(extra, name):
            argv += [f"--{name}", value]
    return argv + list(extra)


def prepare_out_dir(out_dir):
    """
    Make `out_dir` empty: sampling resumes from shards of an earlier run with
    the same flags and refuses different ones, so the demo always starts fresh.
    Only a folder that looks like an earlier run's output is emptied.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not any(os.path.exists(os.path.join(out_dir, m)) for m in RUN_MARKERS):
            raise SystemExit(f"error: --out_dir {out_dir} is not empty and holds no earlier "
                             "demo output; choose another folder")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def pictures(out_dir):
    """The PNG files of the SAG run (the grids, then the SAG-mask pictures)."""
    found = []
    for root, dirs, files in os.walk(out_dir):
        if root == out_dir and COMPARE_DIR in dirs:
            dirs.remove(COMPARE_DIR)
        found += [os.path.join(root, f) for f in files if f.endswith(".png")]
    return sorted(found, key=lambda p: (os.path.dirname(p) != out_dir, p))


def _cpu_times(path="/proc/stat"):
    """(busy, total) CPU time of all cores so far, in clock ticks (Linux)."""
    with open(path) as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


def busy_cores(interval=0.5):
    """
    How many cores other work keeps busy now: measured from /proc/stat over
    `interval` seconds where there is one, else the 1-minute load average
    (which lags: the pip install that `make demo` has just run still counts
    there for a minute).
    """
    try:
        busy0, total0 = _cpu_times()
        time.sleep(interval)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    if total1 <= total0:
        return 0.0
    return (os.cpu_count() or 1) * (busy1 - busy0) / (total1 - total0)


def pick_threads(requested=0):
    """
    Torch threads for sampling: `requested` if > 0, else the cores left idle
    by other work (cores minus the busy ones, at least 1). On a busy machine
    more threads than free cores make every op wait for the slowest thread
    (several times slower than one thread).
    """
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(round(cores - busy_cores()))))


def score_samples(npz_path, classifier_path=None):
    """Accuracy of the drawn labels and feature FID vs the test split."""
    from evaluations import fashion_metrics

    kwargs = {}
    if classifier_path:
        kwargs["classifier_path"] = classifier_path
    return fashion_metrics.score(npz_path, **kwargs)


def write_class_rows(npz_path, out_dir, per_class=8):
    """samples_by_class.png: one row per class with its name; None for unconditional samples."""
    import numpy as np

    from evaluations.fashion_mnist import CLASS_NAMES
    from improved_diffusion.run.pictures import class_rows, save_png

    with np.load(npz_path) as z:
        if "arr_1" not in z:
            return None
        images, labels = z["arr_0"], z["arr_1"]
    path = os.path.join(out_dir, "samples_by_class.png")
    return save_png(path, class_rows(images, labels, CLASS_NAMES, per_class=per_class))


def compare_without_sag(image_sample, cmd, sag_npz, out_dir):
    """
    Draw the first COMPARE_SAMPLES positions of the run again with
    --guide_scale 1.0 into out_dir/no_sag/ (the same labels and starting
    noise: position p depends on seed + p alone) and write sag_vs_none.png:
    per class, the SAG samples on the left and the same seeds without SAG on
    the right. Returns its path, or None when the run had no SAG or no labels.
    """
    import numpy as np

    from improved_diffusion import cli
    from evaluations.fashion_mnist import CLASS_NAMES
    from improved_diffusion.run.pictures import class_rows, save_png

    flags = cli.parse_sample_args(image_sample.create_argparser(), cmd)
    if float(flags.guide_scale) == 1.0 or not flags.class_cond:
        return None
    n = min(COMPARE_SAMPLES, int(flags.num_samples))
    extra = ["--num_samples", str(n), "--guide_scale", "1.0"]
    if hasattr(flags, "save_attention_masks"):
        extra += ["--save_attention_masks", "False"]
    os.environ["OPENAI_LOGDIR"] = os.path.join(out_dir, COMPARE_DIR)
    try:
        plain_npz = image_sample.main(cmd + extra)
    finally:
        os.environ["OPENAI_LOGDIR"] = out_dir
    with np.load(sag_npz) as z:
        sag, labels = z["arr_0"][:n], z["arr_1"][:n]
    with np.load(plain_npz) as z:
        plain, plain_labels = z["arr_0"], z["arr_1"]
    if not np.array_equal(labels, plain_labels):
        raise SystemExit("error: the run without SAG drew other labels than the SAG run "
                         "(the seed contract is broken)")
    captions = [f"with SAG (guide_scale {flags.guide_scale:g})", "the same seeds without SAG"]
    picture = class_rows(sag, labels, CLASS_NAMES, per_class=4, more=[plain], captions=captions)
    return save_png(os.path.join(out_dir, "sag_vs_none.png"), picture)


def real_image_reference(n):
    """The real-image row of models/fashion_eval_reference.json for n samples (None if absent)."""
    from evaluations.fashion_metrics import DEFAULT_REFERENCE

    try:
        with open(DEFAULT_REFERENCE) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return None
    if str(n) not in rows:
        return None
    return dict(rows[str(n)], n=n)


def parse_args(argv):
    """(the demo's flags, the other flags, passed on to image_sample.py)."""
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        epilog="Other flags are passed on to scripts/image_sample.py.",
    )
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: the idle cores, at least 1)")
    parser.add_argument("--score", type=lambda s: s.lower() in ("1", "true", "yes"),
                        default=True, help="score the samples (default True)")
    parser.add_argument("--compare", type=lambda s: s.lower() in ("1", "true", "yes"),
                        default=True, help=f"draw the first {COMPARE_SAMPLES} positions again "
                        "without SAG and put them beside the SAG ones (default True)")
    return parser.parse_known_args(argv)


def main(argv=None):
    args, extra = parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    prepare_out_dir(out_dir)
    os.environ["OPENAI_LOGDIR"] = out_dir
    import torch

    torch.set_num_threads(pick_threads(args.threads))
    from scripts import image_sample

    known = {a.dest for a in image_sample.create_argparser()._actions}
    cmd = sample_argv(args, extra, known)

    print(f"demo: python scripts/image_sample.py {' '.join(cmd)}  "
          f"({torch.get_num_threads()} threads)", flush=True)
    start = time.time()
    image_sample.main(cmd)
    sample_seconds = time.time() - start

    npzs = [f for f in sorted(os.listdir(out_dir)) if f.startswith("samples_")
            and f.endswith(".npz")]
    if not npzs:
        raise SystemExit(f"error: no samples npz in {out_dir}")
    npz = os.path.join(out_dir, npzs[-1])

    metrics = dict(num_samples=args.num_samples, seed=args.seed,
                   sample_seconds=round(sample_seconds, 1), threads=torch.get_num_threads(),
                   argv=cmd)
    if args.score:
        result = score_samples(npz)
        metrics.update(accuracy=result["accuracy"], fid=result["fid"],
                       colour_cast=result["colour_cast"])
    metrics_path = os.path.join(out_dir, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=1)

    by_class = write_class_rows(npz, out_dir)
    comparison = compare_without_sag(image_sample, cmd, npz, out_dir) if args.compare else None
    report(args, metrics, metrics_path, npz, out_dir, by_class, comparison)
    return metrics


def report(args, metrics, metrics_path, npz, out_dir, by_class, comparison):
    """Where everything is, and the scores beside the real images' (printed)."""
    reference = real_image_reference(args.num_samples)
    print()
    print(f"demo: {args.num_samples} samples in {metrics['sample_seconds']:.0f} s")
    if args.score:
        real = (lambda key, fmt: f"   (real images, n={reference['n']}: {fmt % reference[key]})"
                if reference else "")
        print(f"  accuracy of the drawn labels (our Fashion-MNIST classifier): "
              f"{metrics['accuracy']:.3f}{real('accuracy', '%.3f')}")
        print(f"  feature FID vs the test split (n={args.num_samples}): "
              f"{metrics['fid']:.1f}{real('fid', '%.1f')}")
        print(f"  colour cast (mean max-min over R, G, B): "
              f"{metrics['colour_cast']:.2f} levels{real('colour_cast', '%.0f')}")
    print(f"  samples:      {npz}  (arr_0 images, arr_1 labels)")
    if by_class:
        print(f"  by class:     {by_class}  (one row per class)")
    pics = pictures(out_dir)
    if comparison:
        print(f"  SAG vs none:  {comparison}  (per class, the same seeds with SAG on the left, "
              "without on the right)")
    for path in pics:
        if os.path.dirname(path) == out_dir and path not in (by_class, comparison):
            print(f"  grid:         {path}  (the first 64 in drawing order)")
    mask_dirs = sorted({os.path.dirname(p) for p in pics if os.path.dirname(p) != out_dir})
    for folder in mask_dirs:
        count = sum(os.path.dirname(p) == folder for p in pics)
        print(f"  SAG masks:    {folder}  ({count} PNGs, one per step: final sample, "
              f"x0 prediction, mask, blurred prediction)")
    print(f"  metrics:      {metrics_path}")


if __name__ == "__main__":
    from improved_diffusion.errors import UsageError

    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
