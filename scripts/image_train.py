"""
Train a diffusion model on images.

    mpiexec -n N python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
"""

import json
import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion import dist_util, logger  # noqa: E402
from improved_diffusion.image_datasets import load_data  # noqa: E402
from improved_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    check_norm_groups,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_util import (  # noqa: E402
    TrainLoop,
    parse_resume_step_from_filename,
    train_loop_defaults,
)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        print(f"error: --data_dir {args.data_dir!r} is not a folder of images; "
              "pass the folder to train on", file=sys.stderr)
        sys.exit(2)
    problem = flag_conflict(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)

    dist_util.setup_dist()
    logger.configure()

    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    if dist_util.get_rank() == 0:
        # The flags a checkpoint of this run needs; copy next to it as NAME.json.
        with open(os.path.join(logger.get_dir(), "model_flags.json"), "w") as f:
            json.dump({"flags": model_flags}, f, indent=1, sort_keys=True)

    seed = None if args.seed < 0 else args.seed
    if seed is not None:
        th.manual_seed(seed)  # the initial weights too
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
        random_flip=args.random_flip,
        in_memory=args.data_in_memory,
        seed=seed,
        start_batch=parse_resume_step_from_filename(args.resume_checkpoint),
    )

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        schedule_sampler=schedule_sampler,
        seed=seed,
        **args_to_dict(args, train_loop_defaults().keys()),
    ).run_loop()


def flag_conflict(args):
    """One line naming the flags that cannot go together (or a missing file), else None."""
    if args.lr_anneal_steps and args.lr_cosine_steps:
        return "--lr_anneal_steps and --lr_cosine_steps are two lr schedules; pass one of them"
    if args.bf16_autocast and args.use_fp16:
        return "--bf16_autocast and --use_fp16 are two mixed-precision modes; pass one of them"
    if args.init_checkpoint and args.resume_checkpoint:
        return ("--init_checkpoint starts a new run from weights, --resume_checkpoint continues "
                "a run; pass one of them")
    if args.seed >= 0 and not args.data_in_memory:
        return ("--seed makes each step depend only on its number; the file loader's order "
                "cannot follow it: add --data_in_memory True")
    if args.init_checkpoint and not os.path.isfile(args.init_checkpoint):
        return f"--init_checkpoint {args.init_checkpoint}: no such file"
    try:
        check_norm_groups(args.norm_groups, args.num_channels, args.channel_mult, args.image_size)
    except ValueError as e:
        return str(e)
    return None


def create_argparser():
    defaults = dict(data_dir="", schedule_sampler="uniform")
    defaults.update(train_loop_defaults())
    defaults.update(
        random_flip=True,
        data_in_memory=False,
        seed=-1,  # >= 0: every step's randomness from (seed, step): exact resume
    )
    defaults.update(model_and_diffusion_defaults())
    parser = __import__("argparse").ArgumentParser(description="Train a diffusion model.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
