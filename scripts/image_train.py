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
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_util import (  # noqa: E402
    TrainLoop,
    parse_resume_step_from_filename,
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
        lr_warmup_steps=args.lr_warmup_steps,
        lr_cosine_steps=args.lr_cosine_steps,
        lr_final=args.lr_final,
        ema_warmup=args.ema_warmup,
        bf16_autocast=args.bf16_autocast,
        init_checkpoint=args.init_checkpoint,
        seed=seed,
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
    return None


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
        # Not upstream; each default keeps upstream's behaviour (see TrainLoop).
        lr_warmup_steps=0,
        lr_cosine_steps=0,
        lr_final=0.0,
        ema_warmup=False,
        bf16_autocast=False,
        init_checkpoint="",
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
