"""
What the probe scripts (scripts/probe_sag.py, scripts/probe_x0_colour.py)
share: their common flags, and the checkpoints, card and training images
they read. A probe looks at checkpoints in seconds, outside a sampling run.
"""

import argparse
import os

from ..errors import UsageError
from ..image_datasets import first_images
from .model_card import read_model_card

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe_argparser(doc, n, timesteps):
    """
    A parser with the probes' flags: checkpoints, --data_dir, --n (default
    `n`), --timesteps (default `timesteps`, comma-separated) and --card.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "data", "fashion_train"))
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--timesteps", default=timesteps)
    parser.add_argument("--card", default=os.path.join(REPO_ROOT, "models", "fashion32_ema.json"))
    return parser


def read_probe_inputs(args):
    """
    (card flags, the first --n images [N x C x H x W] in [-1, 1], their
    model kwargs, the timesteps); a missing file or folder raises a
    UsageError naming it.
    """
    for path in [args.card, args.data_dir, *args.checkpoints]:
        if not os.path.exists(path):
            raise UsageError(f"{path}: not found; pass an existing file or folder")
    card = read_model_card(args.card)
    x0, cond = first_images(args.data_dir, args.n, card["image_size"], card.get("class_cond", False))
    return card, x0, cond, [int(t) for t in args.timesteps.split(",")]
