"""scripts/presets/*.sh: every flag is accepted by its script, the model it
builds has the published checkpoint's layout (tests/data manifests), the SAG
block exists, and the seed's four commands are there verbatim."""

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch as th

from conftest import ROOT, network_of, script_module
from improved_diffusion.checkpoints.published import PUBLISHED_CHECKPOINTS
from improved_diffusion.guidance.sag import SelfAttentionGuidance
from improved_diffusion.cli import validate_sample_args
from improved_diffusion.script_util import classifier_defaults

PRESETS = os.path.join(ROOT, "scripts", "presets")
VARIABLES = ("SCRIPT", "MODEL_PATH", "BASE_SAMPLES", "SAMPLE_FLAGS", "MODEL_FLAGS", "SAG_FLAGS", "CLASSIFIER_FLAGS")

# The seed's commands (docs/seed-commands.md), as published.
SEED = {
    "128x128_diffusion": dict(
        SAMPLE_FLAGS="--batch_size 64 --num_samples 10000 --timestep_respacing 250",
        MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 8 --blur_sigma 3 --classifier_guidance True",
        CLASSIFIER_FLAGS="--classifier_scale 0.5 --classifier_path models/128x128_classifier.pt",
        SCRIPT="scripts/classifier_sample.py", MODEL_PATH="models/128x128_diffusion.pt"),
    "256x256_diffusion_uncond": dict(
        SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250",
        MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False",
        CLASSIFIER_FLAGS="--classifier_scale 0.0 --classifier_path models/256x256_classifier.pt",
        SCRIPT="scripts/classifier_sample.py"),
    "lsun_cat": dict(
        SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250",
        MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        SAG_FLAGS="--guide_scale 1.05 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False",
        SCRIPT="scripts/image_sample.py", MODEL_PATH="models/lsun_cat.pt"),
    "lsun_horse": dict(
        SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250",
        MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        SAG_FLAGS="--guide_scale 1.01 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False",
        SCRIPT="scripts/image_sample.py", MODEL_PATH="models/lsun_horse.pt"),
}


def preset_files():
    return sorted(p for p in glob.glob(os.path.join(PRESETS, "*.sh"))
                  if not os.path.basename(p).startswith("fashion32"))


def source(path):
    """The preset's variables, as bash sees them."""
    script = f'set -eu; source "{path}"; ' + "; ".join(
        f'printf "%s\\0" "${{{v}-__unset__}}"' for v in VARIABLES)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHON=sys.executable)).stdout
    values = out.split("\0")[: len(VARIABLES)]
    return {k: v for k, v in zip(VARIABLES, values) if v != "__unset__"}


def manifests():
    out = {}
    for name in ("guided_diffusion.json", "improved_diffusion.json"):
        with open(os.path.join(ROOT, "tests", "data", name)) as f:
            out.update(json.load(f))
    return out


MANIFESTS = manifests()


def test_one_preset_per_published_diffusion_checkpoint():
    names = {os.path.basename(p)[:-3] for p in preset_files()}
    diffusion = {n for n in PUBLISHED_CHECKPOINTS if not n.endswith("_classifier")}
    assert names == diffusion


@pytest.mark.parametrize("name", list(SEED))
def test_seed_commands_verbatim(name):
    got = source(os.path.join(PRESETS, f"{name}.sh"))
    for key, value in SEED[name].items():
        assert got[key] == value, key


@pytest.mark.parametrize("path", preset_files(), ids=lambda p: os.path.basename(p))
def test_preset_flags_build_the_published_model(path):
    name = os.path.basename(path)[:-3]
    v = source(path)
    assert v["MODEL_PATH"] == f"models/{name}.pt"
    script = script_module(os.path.basename(v["SCRIPT"])[:-len(".py")])
    argv = shlex.split(f"{v['SAG_FLAGS']} {v['MODEL_FLAGS']} {v.get('CLASSIFIER_FLAGS', '')} "
                       f"--model_path {v['MODEL_PATH']} {v['SAMPLE_FLAGS']}")
    if "BASE_SAMPLES" in v:
        argv += ["--base_samples", v["BASE_SAMPLES"]]
    args = script.create_argparser().parse_args(argv)
    validate_sample_args(args)
    assert args.guide_scale != 1.0 and args.timestep_respacing
    with th.device("meta"):
        model, diffusion = network_of(args, "upsampler" if "large_size" in vars(args) else "model")
        sag = SelfAttentionGuidance.from_args(model, args)  # the chosen block has attention
        assert sag.applies(diffusion.num_timesteps - 1)
        if name in MANIFESTS:
            want = [(n, s) for n, s, _ in MANIFESTS[name]["params"]]
            assert [(n, list(t.shape)) for n, t in model.state_dict().items()] == want
        if args.classifier_guidance:
            clf_name = os.path.basename(args.classifier_path)[:-3]
            assert clf_name in PUBLISHED_CHECKPOINTS
            classifier, _ = network_of(args, "classifier")
            if clf_name in MANIFESTS:
                want = [(n, s) for n, s, _ in MANIFESTS[clf_name]["params"]]
                assert [(n, list(t.shape)) for n, t in classifier.state_dict().items()] == want


def test_improved_diffusion_presets_rescale_timesteps():
    """improved-diffusion trained with rescaled timesteps unless its flags say otherwise."""
    for name in ("imagenet64_uncond_100M_1500K", "cifar10_uncond_50M_500K",
                 "imagenet64_uncond_vlb_100M_1500K", "cifar10_uncond_vlb_50M_500K"):
        assert "--rescale_timesteps True" in source(os.path.join(PRESETS, f"{name}.sh"))["MODEL_FLAGS"]
    for name in ("imagenet64_cond_270M_250K", "upsample_cond_500K", "lsun_uncond_100M_1200K_bs128"):
        assert "--rescale_timesteps False" in source(os.path.join(PRESETS, f"{name}.sh"))["MODEL_FLAGS"]


def test_default_model_flags_agree_everywhere():
    """
    The model cards are the one home of the default models' flags; the
    fashion32 presets read them from there (python -m
    improved_diffusion.checkpoints.model_card) and must give every flag the
    card sets, with its value: the network (checkpoints cannot tell some flags apart, e.g.
    --norm_groups changes no parameter shape, so a drifted copy would load
    the weights into another network without an error), the SAG and sampling
    defaults, and the noisy classifier's flags.
    """
    import argparse

    from improved_diffusion.checkpoints.model_card import SAMPLING_CHOICES, read_model_card
    from improved_diffusion.cli import sample_defaults
    from improved_diffusion.guidance.sag import sag_defaults
    from improved_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults

    def parse(flag_string, defaults, keys=None):
        parser = argparse.ArgumentParser()
        add_dict_to_argparser(parser, defaults)
        args = parser.parse_args(shlex.split(flag_string))
        given = {a.split("=")[0][2:] for a in shlex.split(flag_string) if a.startswith("--")}
        return {k: getattr(args, k) for k in (keys if keys is not None else given)}

    defaults = model_and_diffusion_defaults()
    network = set(defaults) - set(SAMPLING_CHOICES)
    card = read_model_card(os.path.join(ROOT, "models", "fashion32_ema.pt"))
    from_card = {k: card.get(k, defaults[k]) for k in network}
    sample = source(os.path.join(ROOT, "scripts", "presets", "fashion32.sh"))
    train = subprocess.run(
        ["bash", "-c", 'set -eu; source "$0"; echo $MODEL_FLAGS $DIFFUSION_FLAGS',
         os.path.join(ROOT, "scripts", "presets", "fashion32_train.sh")],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHON=sys.executable)).stdout
    assert parse(sample["MODEL_FLAGS"], defaults, network) == from_card
    assert parse(train, defaults, network) == from_card
    # SAG and sampling defaults: every flag the preset gives is the card's.
    run = {**defaults, **sag_defaults(), **sample_defaults()}
    for var in ("SAG_FLAGS", "SAMPLE_FLAGS"):
        given = parse(sample[var], run)
        assert given == {k: card[k] for k in given}, var
    assert set(sag_defaults()) - {"sag_true_attention", "classifier_guidance"} <= set(
        parse(sample["SAG_FLAGS"], run))
    # The noisy classifier's flags, against its own card.
    classifier_card = read_model_card(os.path.join(ROOT, "models", "fashion32_classifier.pt"))
    given = parse(sample["CLASSIFIER_FLAGS"], {**classifier_defaults(), **defaults})
    assert given == {k: classifier_card[k] for k in given}
    assert {k for k in classifier_card if k.startswith("classifier_") and k != "classifier_use_fp16"} \
        <= set(given)


def test_the_presets_card_reader(tmp_path):
    """python -m improved_diffusion.checkpoints.model_card CARD NAME...: the flags, or one error line."""
    from improved_diffusion.checkpoints.model_card import write_model_card

    write_model_card(str(tmp_path / "m.pt"), {"image_size": 32, "class_cond": True, "blur_sigma": 3.0})
    cmd = [sys.executable, "-m", "improved_diffusion.checkpoints.model_card", str(tmp_path / "m.json")]
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(cmd + ["blur_sigma", "image_size", "class_cond"], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path))
    assert res.returncode == 0 and res.stdout == "--blur_sigma 3.0 --image_size 32 --class_cond True\n"
    res = subprocess.run(cmd + ["image_size", "norm_groups"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: {tmp_path / 'm.json'} has no flag norm_groups\n"
