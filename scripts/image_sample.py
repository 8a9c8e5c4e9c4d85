"""
Generate a large batch of image samples from a model (with Self-Attention
Guidance) and save them as a large numpy array. This can be used to produce
samples for FID evaluation.

    mpiexec -n N python scripts/image_sample.py $SAG_FLAGS $MODEL_FLAGS --model_path M.pt $SAMPLE_FLAGS

Finished batches go to shards in the log directory (OPENAI_LOGDIR): the same
command run again with the same OPENAI_LOGDIR resumes where it stopped. The
last line of stdout is the path of samples_NxHxWx3.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion import cli, dist_util  # noqa: E402
from improved_diffusion.sampling import drawer  # noqa: E402
from improved_diffusion.checkpoints.loading import model_from_args  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.run.sample_run import Batches, sample_to_npz  # noqa: E402


def main(argv=None):
    args = cli.parse_sample_args(create_argparser(), argv)
    cli.refuse_classifier_guidance(
        args, "needs a classifier: use scripts/classifier_sample.py with --classifier_path")
    dist_util.setup_dist()

    def setup(log_dir):
        model, diffusion = cli.agree(model_from_args, args)
        sag = cli.agree(SelfAttentionGuidance.from_args, model, args)
        draw = drawer.make_drawer(args, model, diffusion, sag)
        return Batches(draw, drawer.describe_setup(args, model, draw),
                       drawer.sag_pictures(args, draw, log_dir))

    path = sample_to_npz(args, "image_sample", args.image_size, args.class_cond,
                         {"model_path": args.model_path}, setup)
    if path:
        print(path, flush=True)
    return path  # the npz on rank 0, None on the others


def create_argparser():
    return cli.sampling_argparser(__doc__, *cli.sample_flag_sets("image_sample"))


if __name__ == "__main__":
    cli.run_main(main)
