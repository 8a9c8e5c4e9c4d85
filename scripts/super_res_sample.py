"""
Upsample low-resolution samples (an npz from image_sample.py or
classifier_sample.py) with a super-resolution model, with Self-Attention
Guidance available as in the other samplers.

    mpiexec -n N python scripts/super_res_sample.py $SAG_FLAGS $MODEL_FLAGS \
        --model_path models/64_256_upsampler.pt --base_samples 64_samples.npz $SAMPLE_FLAGS

Position p of the output upsamples base image p modulo the number of base
images (with its label from the base npz's arr_1 for class-conditional
models, carried over to the output's arr_1); its noise comes from seed + p.
"""

import os
import sys

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion import cli, dist_util  # noqa: E402
from improved_diffusion.sampling import drawer  # noqa: E402
from improved_diffusion.checkpoints.loading import model_from_args  # noqa: E402
from improved_diffusion.files.npz import npz_array  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.run.sample_run import Batches, sample_to_npz  # noqa: E402


def main(argv=None):
    args = cli.parse_sample_args(create_argparser(), argv)
    cli.refuse_classifier_guidance(args, "is not available for super-resolution")
    if not args.base_samples:
        raise cli.pure_usage_error(
            "--base_samples is required: an npz of low-resolution samples "
            "(arr_0, and arr_1 labels for class-conditional models), e.g. from image_sample.py"
        )
    dist_util.setup_dist()
    files = {"model_path": args.model_path, "base_samples": args.base_samples}

    def setup(log_dir):
        images, labels = cli.agree(open_base_samples, args)
        model, diffusion = cli.agree(model_from_args, args, super_res=True)
        sag = cli.agree(SelfAttentionGuidance.from_args, model, args)
        device = dist_util.dev()

        def base_inputs(positions):
            """Position p upsamples base image p modulo their number (with its label)."""
            rows = [p % len(images) for p in positions]
            low = th.from_numpy(np.asarray(images[rows], dtype=np.float32) / 127.5 - 1.0)
            model_kwargs = dict(low_res=low.permute(0, 3, 1, 2).contiguous().to(device))
            batch_labels = None
            if labels is not None:
                batch_labels = np.asarray(labels[rows], dtype=np.int64)
                model_kwargs["y"] = th.from_numpy(batch_labels).to(device)
            return model_kwargs, batch_labels

        draw = drawer.make_drawer(args, model, diffusion, sag, batch_inputs=base_inputs,
                                    image_size=args.large_size)

        base = f"base samples {args.base_samples}: {len(images)} images"
        return Batches(draw, drawer.describe_setup(args, model, draw, [base]),
                       drawer.sag_pictures(args, draw, log_dir))

    path = sample_to_npz(args, "super_res_sample", args.large_size, args.class_cond, files, setup)
    if path:
        print(path, flush=True)


def open_base_samples(args):
    """The base images (memory-mapped when possible) and labels (or None)."""
    path = args.base_samples
    try:
        images = npz_array(path, "arr_0")
    except MemoryError:
        raise
    except Exception as e:  # not a zip, no arr_0, pickled objects...
        raise cli.UsageError(
            f"cannot read arr_0 of --base_samples {path} ({type(e).__name__}: {e}); "
            "pass an npz written by image_sample.py"
        ) from None
    want = (args.small_size, args.small_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.dtype != np.uint8 or not len(images):
        raise cli.UsageError(
            f"--base_samples {path} holds {images.dtype} images of shape {tuple(images.shape)}; "
            f"expected uint8 (N, {args.small_size}, {args.small_size}, 3) for --small_size "
            f"{args.small_size}"
        )
    labels = None
    if args.class_cond:
        try:
            labels = npz_array(path, "arr_1")
        except KeyError:
            raise cli.UsageError(
                f"--base_samples {path} has no labels (arr_1) but --class_cond True; "
                "pass samples from a class-conditional run (classifier_sample.py writes them)"
            ) from None
        if labels.shape != (len(images),):
            raise cli.UsageError(
                f"--base_samples {path}: arr_1 has shape {labels.shape}, expected ({len(images)},)"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= args.num_classes):
            raise cli.UsageError(
                f"--base_samples {path}: labels outside 0..{args.num_classes - 1} (--num_classes)"
            )
    return images, labels


def create_argparser():
    return cli.sampling_argparser(__doc__, *cli.sample_flag_sets("super_res_sample"))


if __name__ == "__main__":
    cli.run_main(main)
