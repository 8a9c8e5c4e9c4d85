"""
How far half-precision samples are from float32 ones, on the golden
checkpoints (tests/golden): each case sampled in-process, as
scripts/image_sample.py samples it (seed contract, SAG flags), once in
float32 and once as ``--use_fp16 True`` runs (prepare_model_for_sampling:
bfloat16 weights on a CPU with native bfloat16); for
comparison also with bfloat16 autocast over the float32 model, and with
float16 weights (the published ``--use_fp16`` path, what a GPU runs; slow
on a CPU).

    python benchmarks/half_precision_error.py [--threads 2] [--markdown out.md]

Reported per case: mean absolute difference of the uint8 images (and the
fraction of values off by more than one level) against the float32 run and
against the published float32 samples stored with the case.
"""

import argparse
import json
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package; report.py sits beside this script

import torch as th  # noqa: E402

from improved_diffusion.guidance.denoiser import GuidedDenoiser  # noqa: E402
from improved_diffusion.sampling.random_util import BatchGenerator  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.sampling.samplers import Sampler  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    prepare_model_for_sampling,
    sag_defaults,
)
from report import save_report  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden")


def parse_case(case):
    parser = argparse.ArgumentParser()
    defaults = model_and_diffusion_defaults()
    defaults.update(sag_defaults())
    defaults.update(seed=0, num_samples=4, batch_size=4, clip_denoised=True)
    add_dict_to_argparser(parser, defaults)
    argv = shlex.split(case["model_flags"]) + shlex.split(case["sag_flags"]) + shlex.split(case["sample_flags"])
    return parser.parse_args(argv)


def sample(case, precision):
    """uint8 NHWC samples of a golden case in `precision` ("fp32", "half", "autocast", "fp16")."""
    args = parse_case(case)
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    model.load_state_dict(th.load(os.path.join(GOLDEN, case["checkpoint"]), map_location="cpu"))
    model.eval()
    if precision == "half":
        prepare_model_for_sampling(model, "cpu", use_fp16=True)
    elif precision == "fp16":  # the published --use_fp16 path: float16 weights
        model.convert_to_fp16(th.float16)
    sag = SelfAttentionGuidance.from_args(model, args)
    shape = (args.num_samples, 3, args.image_size, args.image_size)
    gen = BatchGenerator([args.seed + p for p in range(args.num_samples)])
    denoiser = GuidedDenoiser.for_diffusion(model, diffusion, clip_denoised=args.clip_denoised, sag=sag)
    with th.autocast("cpu", dtype=th.bfloat16, enabled=precision == "autocast"):
        x = Sampler.ddpm(diffusion).run(denoiser, gen.randn(shape), None, gen)
    x = ((x.float() + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def diff(a, b):
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return float(d.mean()), float((d > 1).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", default="half,autocast,fp16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    if args.threads:
        th.set_num_threads(args.threads)
    with open(os.path.join(GOLDEN, "cases.json")) as f:
        cases = json.load(f)
    rows = []
    for name, case in cases.items():
        published = np.load(os.path.join(GOLDEN, case["expected"]))["arr_0"]
        fp32 = sample(case, "fp32")
        row = dict(case=name, fp32_vs_published=diff(fp32, published))
        for precision in args.precisions.split(","):
            half = sample(case, precision)
            row[precision] = dict(vs_fp32=diff(half, fp32), vs_published=diff(half, published))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    lines = [
        f"torch {th.__version__}, {th.get_num_threads()} threads. Mean |uint8 difference| "
        "(fraction of values off by more than 1 level):",
        "",
        "| case | fp32 vs published | " + " | ".join(
            f"{p} vs fp32 | {p} vs published" for p in args.precisions.split(",")) + " |",
        "|" + " --- |" * (2 + 2 * len(args.precisions.split(","))),
    ]
    fmt = lambda d: f"{d[0]:.3f} ({d[1]:.4f})"  # noqa: E731
    for row in rows:
        cells = [row["case"], fmt(row["fp32_vs_published"])]
        for p in args.precisions.split(","):
            cells += [fmt(row[p]["vs_fp32"]), fmt(row[p]["vs_published"])]
        lines.append("| " + " | ".join(cells) + " |")
    save_report("\n".join(lines), rows, args.json, args.markdown)


if __name__ == "__main__":
    main()
