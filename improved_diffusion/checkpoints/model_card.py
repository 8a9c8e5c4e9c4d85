"""
Model cards: the flags a checkpoint was trained with, in ``name.json``
beside ``name.pt``. The sampling scripts take their defaults from it, so a
checkpoint with a card samples with no flags.
"""

import json
import os

from ..files.atomic import atomic_json


def model_card_path(model_path):
    """The flags file that may sit next to a checkpoint: ``name.pt`` -> ``name.json``."""
    root, _ = os.path.splitext(model_path)
    return root + ".json"


def read_model_card_data(model_path):
    """
    The whole model card of a checkpoint (``flags`` and what else it records,
    e.g. ``dataset``), or {} when it has none.
    """
    path = model_card_path(model_path)
    if not model_path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_model_card(model_path):
    """
    The flags a checkpoint was trained with, from its model card, or {} when
    it has none (the published checkpoints have none: pass their flags).
    """
    return dict(read_model_card_data(model_path).get("flags", {}))


# Flags a training run records that sampling chooses for itself.
SAMPLING_CHOICES = ("timestep_respacing", "use_fp16", "use_checkpoint")


def run_flags(checkpoint_path):
    """
    The flags that fix the network and its diffusion, from the training run a
    checkpoint comes from: the ``model_flags.json`` that
    ``scripts/image_train.py`` writes into its log directory, beside the
    checkpoints; {} when there is none. The run's choices that sampling makes
    for itself (respacing, half precision, gradient checkpointing) are left out.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "model_flags.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        flags = json.load(f).get("flags", {})
    return {k: v for k, v in flags.items() if k not in SAMPLING_CHOICES}



def flags_with_card(model_path, defaults):
    """`defaults` (a dict of flags) with the values the model card sets for its keys."""
    flags = dict(defaults)
    flags.update({k: v for k, v in read_model_card(model_path).items() if k in flags})
    return flags


def write_model_card(model_path, flags, **extra):
    """Write the flags a checkpoint needs next to it (atomically)."""
    return atomic_json(model_card_path(model_path), dict(flags=flags, **extra), end="",
                       indent=1, sort_keys=True)


def card_flags(card_path, names):
    """``--name value`` for each of `names`, with the values of a model card (for presets)."""
    with open(card_path) as f:
        flags = json.load(f)["flags"]
    missing = [n for n in names if n not in flags]
    if missing:
        raise ValueError(f"{card_path} has no flag {', '.join(missing)}")
    return " ".join(f"--{n} {flags[n]}" for n in names)


if __name__ == "__main__":
    # python -m improved_diffusion.checkpoints.model_card CARD.json NAME...: what presets source.
    import sys

    try:
        print(card_flags(sys.argv[1], sys.argv[2:]))
    except (OSError, KeyError, ValueError) as e:  # KeyError: a card without "flags"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

