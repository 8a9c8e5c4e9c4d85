"""
Generate a large batch of image samples from a model (with Self-Attention
Guidance) and save them as a large numpy array. This can be used to produce
samples for FID evaluation.

    python scripts/image_sample.py $MODEL_FLAGS $SAG_FLAGS --model_path M.pt $SAMPLE_FLAGS
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion import dist_util, logger  # noqa: E402
from improved_diffusion.sample_util import (  # noqa: E402
    UsageError,
    draw_batch,
    load_model,
    make_sag,
    new_parser,
    parse_args_with_card,
    sample_defaults,
    sample_to_npz,
    to_uint8,
    validate_sample_args,
)
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sag_defaults,
)


def main(argv=None):
    args = parse_args_with_card(create_argparser(), argv)
    validate_sample_args(args)
    dist_util.setup_dist()
    logger.configure()
    args.out_dir = logger.get_dir()

    logger.log("creating model and diffusion...")
    try:
        model, diffusion = create_model_and_diffusion(
            **args_to_dict(args, model_and_diffusion_defaults().keys())
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = dist_util.dev()
    load_model(model, args.model_path, device, args.use_fp16)
    sag = make_sag(model, args)

    def draw(positions):
        sample, labels = draw_batch(
            diffusion,
            model,
            positions,
            args,
            (3, args.image_size, args.image_size),
            device,
            draw_labels=args.class_cond,
            num_classes=args.num_classes,
            sag=sag,
        )
        return to_uint8(sample), None if labels is None else labels.cpu().numpy()

    logger.log("sampling...")
    path = sample_to_npz(args, draw, args.image_size, log=logger.log)
    logger.log("sampling complete")
    if path is not None:
        print(path)  # last line of stdout: where the samples are


def create_argparser():
    defaults = sample_defaults()
    defaults.update(model_and_diffusion_defaults())
    defaults.update(sag_defaults())
    parser = new_parser(__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
