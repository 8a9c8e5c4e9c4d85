"""
Training speed of `scripts/image_train.py` with the default model's preset
(scripts/presets/fashion32_train.sh, batch 64), in images per second.

    python benchmarks/benchmark_training.py [--data_dir data/fashion_train] [--steps 40] \
        [--variants upstream_1thread,2threads,in_memory,bf16_autocast] [--json OUT.json]

Every variant is a real run of the script (a subprocess, as a user starts
it) for --steps steps; the speed is the median of the `steps_per_sec` the
run logs every 10 steps, leaving out the first interval (start-up and
decoding). The variants add one change each to the one before:

  upstream_1thread  one thread (OMP_NUM_THREADS=1), the file loader (a
                    DataLoader worker decoding PNGs every step): the
                    committed runs of the first two sessions
  2threads          torch's default threads (one per core)
  in_memory         --data_in_memory True: decoded once, batches drawn in
                    the training process, no loader worker
  bf16_autocast     --bf16_autocast True; on a CPU without native bfloat16
                    the script trains in float32 and says so, and the row
                    says "fell back to float32"

Run it on an otherwise idle machine (pause other jobs with kill -STOP).
The data folder comes from `make fashion-data` and
`python scripts/fashion_mnist_to_images.py --split train --out_dir data/fashion_train`.
"""

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64

VARIANTS = {
    "upstream_1thread": ({"OMP_NUM_THREADS": "1"}, []),
    "2threads": ({}, []),
    "in_memory": ({}, ["--data_in_memory", "True"]),
    "bf16_autocast": ({}, ["--data_in_memory", "True", "--bf16_autocast", "True"]),
}


def preset_flags():
    """MODEL_FLAGS and DIFFUSION_FLAGS of scripts/presets/fashion32_train.sh."""
    out = subprocess.run(
        ["bash", "-c", "source scripts/presets/fashion32_train.sh && echo $MODEL_FLAGS $DIFFUSION_FLAGS"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return shlex.split(out)


def run_variant(name, data_dir, steps):
    env_extra, flags = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as logdir:
        env["OPENAI_LOGDIR"] = logdir
        cmd = [sys.executable, os.path.join(ROOT, "scripts/image_train.py"), "--data_dir", data_dir,
               *preset_flags(), "--lr", "1e-3", "--batch_size", str(BATCH),
               "--log_interval", "10", "--save_interval", "1000000", "--max_steps", str(steps),
               *flags]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: image_train.py failed:\n{proc.stdout}\n{proc.stderr}")
        with open(os.path.join(logdir, "progress.csv")) as f:
            rates = [float(r["steps_per_sec"]) for r in csv.DictReader(f) if r.get("steps_per_sec")]
        with open(os.path.join(logdir, "log.txt")) as f:
            fell_back = "no native bfloat16" in f.read()
    if len(rates) < 2:
        raise SystemExit(f"{name}: too few log intervals; raise --steps")
    steps_per_sec = statistics.median(rates[1:])
    return dict(variant=name, images_per_sec=round(steps_per_sec * BATCH, 2),
                steps_per_sec=round(steps_per_sec, 4), intervals=rates[1:],
                env=env_extra, flags=flags, fell_back_to_float32=fell_back)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data/fashion_train"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: --data_dir {args.data_dir}: no such folder; see this script's docstring")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants: unknown {unknown}; choose from {list(VARIANTS)}")

    import torch

    from improved_diffusion.script_util import cpu_supports_bf16

    rows = []
    for name in names:
        rows.append(run_variant(name, args.data_dir, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["images_per_sec"]
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"native bfloat16: {cpu_supports_bf16()}, torch {torch.__version__}\n")
    print(f"| variant | images/s | x {rows[0]['variant']} |\n| --- | --- | --- |")
    for r in rows:
        note = " (fell back to float32)" if r["fell_back_to_float32"] else ""
        print(f"| {r['variant']}{note} | {r['images_per_sec']:.1f} | {r['images_per_sec'] / base:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu_count=os.cpu_count(), native_bf16=cpu_supports_bf16(),
                           torch=torch.__version__, steps=args.steps, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
