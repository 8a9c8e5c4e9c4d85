"""
Score checkpoints of the default model's training run the way the demo
scores the committed model: sample with the card's settings (its sampler
and SAG; models/fashion32_ema.json), then label accuracy, feature FID vs
the test split and colour cast (evaluations/fashion_metrics.py).

    python scripts/evaluate_default_model.py logs/fashion32_v2/model001000.pt \
        logs/fashion32_v2/ema_0.9995_001000.pt [--num_samples 1000] [--seed 0] \
        [--out evaluations.jsonl] [any scripts/image_sample.py flag]

Each checkpoint is sampled in a folder of its own under --work_dir (the
checkpoint linked beside a copy of the card, so the sampling flags are the
card's whatever the file is called, with the model flags of the
model_flags.json beside the checkpoint where there is one); one JSON line per checkpoint is
appended to --out and a markdown table row printed. Positions 0..N-1 of
--seed are drawn for every checkpoint, so rows are paired.
"""

import argparse
import json
import os
import re
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from improved_diffusion.checkpoints.model_card import run_flags  # noqa: E402

CARD = os.path.join(REPO_ROOT, "models", "fashion32_ema.json")


def checkpoint_kind(path):
    """('raw' | 'ema <rate>', step) from a modelNNNNNN.pt / ema_<rate>_NNNNNN.pt name."""
    name = os.path.basename(path)
    m = re.fullmatch(r"model(\d+)\.pt", name)
    if m:
        return "raw", int(m.group(1))
    m = re.fullmatch(r"ema_([0-9.]+)_(\d+)\.pt", name)
    if m:
        return f"ema {m.group(1)}", int(m.group(2))
    return "?", -1


def evaluate(checkpoint, num_samples, seed, work_dir, extra):
    """The demo's metrics for one checkpoint (sampled into a fresh folder under work_dir)."""
    from scripts import demo

    with open(CARD) as f:
        card = json.load(f)
    folder = tempfile.mkdtemp(prefix="eval_", dir=work_dir)
    model_path = os.path.join(folder, "model.pt")
    os.symlink(os.path.abspath(checkpoint), model_path)
    flags = dict(card["flags"])
    flags.update(run_flags(checkpoint))  # the architecture of the run it comes from
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump({"flags": flags}, f)
    metrics = demo.main(["--model_path", model_path, "--out_dir", os.path.join(folder, "samples"),
                         "--num_samples", str(num_samples), "--seed", str(seed), *extra])
    kind, step = checkpoint_kind(checkpoint)
    return dict(checkpoint=os.path.abspath(checkpoint), weights=kind, step=step,
                num_samples=num_samples, seed=seed, accuracy=metrics["accuracy"],
                fid=metrics["fid"], colour_cast=metrics["colour_cast"],
                sample_seconds=metrics["sample_seconds"], threads=metrics["threads"], flags=extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=os.path.join(REPO_ROOT, "logs", "evaluations"))
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "logs", "evaluations.jsonl"))
    args, extra = parser.parse_known_args(argv)
    missing = [c for c in args.checkpoints if not os.path.isfile(c)]
    if missing:
        print(f"error: {missing[0]}: no such checkpoint file", file=sys.stderr)
        return 2
    os.makedirs(args.work_dir, exist_ok=True)
    rows = []
    for checkpoint in args.checkpoints:
        row = evaluate(checkpoint, args.num_samples, args.seed, args.work_dir, extra)
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print("\n| step | weights | n | accuracy | feature FID | colour cast |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['step']} | {r['weights']} | {r['num_samples']} | {r['accuracy']:.3f} "
              f"| {r['fid']:.1f} | {r['colour_cast']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
