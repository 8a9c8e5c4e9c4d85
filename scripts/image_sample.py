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

from improved_diffusion import dist_util  # noqa: E402
from improved_diffusion.sample_run import SampleRun, agree, report_result  # noqa: E402
from improved_diffusion.sample_util import (  # noqa: E402
    describe_setup,
    draw_batch,
    make_sag,
    model_from_args,
    new_parser,
    parse_args_with_card,
    pure_usage_error,
    run_main,
    sample_defaults,
    to_uint8,
    validate_sample_args,
)
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    model_and_diffusion_defaults,
    sag_defaults,
)


def main(argv=None):
    args = parse_args_with_card(create_argparser(), argv)
    validate_sample_args(args)
    if args.classifier_guidance:
        raise pure_usage_error(
            "--classifier_guidance True needs a classifier; use scripts/classifier_sample.py "
            "with --classifier_path, or pass --classifier_guidance False"
        )
    dist_util.setup_dist()
    files = {"model_path": args.model_path}
    with SampleRun(args, "image_sample", args.image_size, args.class_cond, files) as run:
        if run.prepare():
            model, diffusion = agree(model_from_args, args)
            sag = agree(make_sag, model, args)
            device = dist_util.dev()

            def draw(positions, step_callback=None):
                sample, labels = draw_batch(
                    diffusion, model, positions, args,
                    (3, args.image_size, args.image_size), device,
                    draw_labels=args.class_cond, num_classes=args.num_classes,
                    sag=sag, step_callback=step_callback,
                )
                return to_uint8(sample, positions), None if labels is None else labels.cpu().numpy()

            run.start(describe_setup(args, model, diffusion, sag))
            run.sample(draw, sag=sag, diffusion=diffusion)
            run.finish()
    report_result(run)


def create_argparser():
    defaults = sample_defaults()
    defaults.update(model_and_diffusion_defaults())
    defaults.update(sag_defaults())
    parser = new_parser(__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
