"""
Peak memory of rank 0 against --num_samples, for the sampling scripts run as
users run them (``mpiexec -n RANKS python scripts/image_sample.py``) on a tiny
random model. Shards and the streamed npz assembly should keep it flat: a
rank holds one batch, rank 0 copies the shards into the npz one at a time.

    python benchmarks/benchmark_sample_memory.py                # 64, 256, 1024 samples
    python benchmarks/benchmark_sample_memory.py --sizes 64,4096 --image_size 32

Rank 0's peak RSS (getrusage ru_maxrss, after assembly) is read from the
run's config.json. Not a test: the numbers depend on the machine.

At 64x64 glibc's dynamic mmap threshold lets freed activation buffers
fragment the heap, so the peak creeps up with the number of batches (tens of
MiB, whatever the data); ``--malloc_mmap_threshold 131072`` fixes the
threshold (MALLOC_MMAP_THRESHOLD_) and shows the data's own footprint.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_checkpoint(path, flags):
    import torch as th

    from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    args = model_and_diffusion_defaults()
    args.update(flags)
    th.manual_seed(0)
    model, _ = create_model_and_diffusion(**args)
    th.save(model.state_dict(), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024", help="comma-separated --num_samples values")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--respacing", default="2")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=None,
                        help="set MALLOC_MMAP_THRESHOLD_ (bytes) for the runs")
    args = parser.parse_args()

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    model_flags = dict(image_size=args.image_size, num_channels=32, channel_mult="1,1,1", num_res_blocks=1,
                       attention_resolutions=str(args.image_size // 4), num_heads=2, learn_sigma=True)
    cli = " ".join(f"--{k} {v}" for k, v in model_flags.items())
    cli += f" --timestep_respacing {args.respacing} --sel_attn_depth 0 --guide_scale 1.5 --blur_sigma 3"
    cli += f" --batch_size {args.batch_size}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny.pt")
        make_checkpoint(ckpt, model_flags)
        print(f"{'num_samples':>11} {'npz MiB':>8} {'rank0 peak RSS MiB':>19} {'seconds':>8}")
        rows = []
        for n in [int(s) for s in args.sizes.split(",")]:
            logdir = os.path.join(tmp, f"run{n}")
            cmd = [sys.executable, os.path.join(ROOT, "scripts", "image_sample.py")]
            cmd += shlex.split(cli) + ["--model_path", ckpt, "--num_samples", str(n)]
            if args.ranks > 1:
                cmd = [mpiexec, "-n", str(args.ranks)] + cmd
            env = dict(os.environ, OPENAI_LOGDIR=logdir, TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
            env.setdefault("OMP_NUM_THREADS", "1")
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            start = time.monotonic()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            seconds = time.monotonic() - start
            if res.returncode != 0:
                sys.exit(f"run with --num_samples {n} failed:\n{res.stderr[-3000:]}")
            config = json.load(open(os.path.join(logdir, "config.json")))
            npz = os.path.join(logdir, config["npz"])
            rss = config["session"]["rank0_peak_rss_mib"]
            size = os.path.getsize(npz) / 2 ** 20
            rows.append((n, size, rss, seconds))
            print(f"{n:>11} {size:>8.1f} {rss:>19.1f} {seconds:>8.1f}", flush=True)
        growth = rows[-1][2] - rows[0][2]
        print(f"rank 0 peak RSS grew {growth:+.1f} MiB from {rows[0][0]} to {rows[-1][0]} samples "
              f"while the npz grew {rows[-1][1] - rows[0][1]:.1f} MiB "
              f"({args.ranks} ranks, {args.image_size}x{args.image_size}, batch {args.batch_size})")


if __name__ == "__main__":
    main()
