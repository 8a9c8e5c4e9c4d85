"""
Train a diffusion model on images.

    mpiexec -n N python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion import dist_util, logger  # noqa: E402
from improved_diffusion.image_datasets import load_data  # noqa: E402
from improved_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_util import TrainLoop  # noqa: E402


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        print(f"error: --data_dir {args.data_dir!r} is not a folder of images; "
              "pass the folder to train on", file=sys.stderr)
        sys.exit(2)

    dist_util.setup_dist()
    logger.configure()

    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    if dist_util.get_rank() == 0:
        # The flags a checkpoint of this run needs; copy next to it as NAME.json.
        with open(os.path.join(logger.get_dir(), "model_flags.json"), "w") as f:
            json.dump({"flags": model_flags}, f, indent=1, sort_keys=True)

    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**model_flags)
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
    )

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        max_steps=args.max_steps,
    ).run_loop()


def create_argparser():
    defaults = dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        max_steps=0,
    )
    defaults.update(model_and_diffusion_defaults())
    parser = __import__("argparse").ArgumentParser(description="Train a diffusion model.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
