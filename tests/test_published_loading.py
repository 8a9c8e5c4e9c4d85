"""
The published checkpoints load strictly through the scripts' own loader.

The real files cannot be downloaded here. Instead, a checkpoint with random
values is made from each manifest in tests/data (names, shapes and dtypes read
off the upstream model classes: nothing here comes from the fork's model
code), and the sampling scripts' path loads it:

- two small ones (the 128x128 classifier, 42.6M parameters, and the CIFAR-10
  model, 52.5M) as real files on CPU through ``model_from_args`` /
  ``classifier_from_args`` (safe load, the one-line shape check, a strict
  ``load_state_dict``): every value must arrive unchanged, in float32;
- all of them on the meta device (no memory): the loader's shape check and a
  strict ``load_state_dict(assign=True)`` of meta tensors of the manifest's
  dtypes, and the model's own parameters in the manifest's dtypes.

Every preset with a manifest passes the manifest's flags with the same values.
"""

import json
import os
import shlex
import sys

import pytest
import torch as th

from conftest import ROOT, network_of, script_module
from improved_diffusion.checkpoints.loading import (
    check_state_dict,
    classifier_from_args,
    model_from_args,
)

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import classifier_sample  # noqa: E402
import super_res_sample  # noqa: E402
import test_presets  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
DTYPES = {"float32": th.float32, "float16": th.float16, "int64": th.int64}


def manifests():
    out = {}
    for name in ("guided_diffusion.json", "improved_diffusion.json"):
        with open(os.path.join(DATA, name)) as f:
            out.update(json.load(f))
    return out


MANIFESTS = manifests()
SMALL = ("128x128_classifier", "cifar10_uncond_50M_500K")


def parse(flags):
    """
    The flags as the sampling scripts parse them: super_res_sample.py for an
    upsampler (--large_size), else classifier_sample.py (it knows every
    model and classifier flag).
    """
    script = super_res_sample if "--large_size" in shlex.split(flags) else classifier_sample
    return script.create_argparser().parse_args(shlex.split(flags))


def random_checkpoint(entry, seed=0):
    """A state_dict with the manifest's names, shapes and dtypes, random values."""
    g = th.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype in entry["params"]:
        dt = DTYPES[dtype]
        if dt.is_floating_point:
            state[name] = th.randn(shape, generator=g, dtype=th.float32).to(dt) * 0.02
        else:
            state[name] = th.randint(0, 10, shape, generator=g, dtype=dt)
    return state


@pytest.mark.parametrize("name", SMALL)
def test_small_published_checkpoint_loads_strictly_on_cpu(name, tmp_path, single_process):
    entry = MANIFESTS[name]
    state = random_checkpoint(entry)
    path = str(tmp_path / f"{name}.pt")
    th.save(state, path)
    if entry["kind"] == "classifier":
        args = parse(f"{entry['flags']} --classifier_path {path}")
        model = classifier_from_args(args)
    else:
        args = parse(f"{entry['flags']} --model_path {path}")
        model, _ = model_from_args(args, super_res=entry["kind"] == "upsampler")
    loaded = model.state_dict()
    assert list(loaded) == [n for n, _, _ in entry["params"]]
    for key, want in state.items():
        got = loaded[key]
        assert got.dtype == DTYPES[dict((n, d) for n, _, d in entry["params"])[key]], key
        assert got.device.type == "cpu"
        assert th.equal(got, want), key
    del state, loaded, model


def meta_model(entry):
    args = parse(entry["flags"])
    with th.device("meta"):
        return network_of(args, entry["kind"])[0]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_published_checkpoint_loads_strictly_on_meta(name):
    entry = MANIFESTS[name]
    model = meta_model(entry)
    # Before loading: the model's own parameters have the published dtypes.
    own = model.state_dict()
    assert [(n, list(t.shape), str(t.dtype).replace("torch.", "")) for n, t in own.items()] == [
        (n, s, d) for n, s, d in entry["params"]]
    state = {n: th.empty(s, dtype=DTYPES[d], device="meta") for n, s, d in entry["params"]}
    check_state_dict(model, state, f"{name}.pt")  # the scripts' check: no error
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    # A checkpoint one tensor short fails the strict load, with the flag hint first.
    short = dict(state)
    short.pop(entry["params"][-1][0])
    with pytest.raises(Exception, match="missing from the checkpoint"):
        check_state_dict(meta_model(entry), short, f"{name}.pt")


def explicit_flags(flags):
    """{dest: value} of the flags written in `flags` (defaults left out)."""
    args = parse(flags)
    given = {tok[2:] for tok in shlex.split(flags) if tok.startswith("--")}
    return {k: v for k, v in vars(args).items() if k in given}


# Published checkpoints without a manifest of their own whose upstream
# commands use the same architecture flags as one that has one (they differ
# in dropout or the loss only: the state_dict layout is the same).
TWINS = {
    "lsun_bedroom": "lsun_cat",
    "lsun_horse": "lsun_cat",
    "lsun_horse_nodropout": "lsun_cat",
    "cifar10_uncond_vlb_50M_500K": "cifar10_uncond_50M_500K",
    "imagenet64_uncond_vlb_100M_1500K": "imagenet64_uncond_100M_1500K",
    "lsun_uncond_100M_2400K_bs64": "lsun_uncond_100M_1200K_bs128",
}
# Not part of the layout: precision is a sampling choice; dropout has no weights.
NOT_LAYOUT = {"use_fp16", "dropout"}


@pytest.mark.parametrize("path", test_presets.preset_files(), ids=os.path.basename)
def test_preset_flags_match_the_manifest(path):
    name = os.path.basename(path)[:-3]
    v = test_presets.source(path)
    script = script_module(os.path.basename(v["SCRIPT"])[:-len(".py")])
    preset = vars(script.create_argparser().parse_args(shlex.split(
        f"{v['MODEL_FLAGS']} {v.get('CLASSIFIER_FLAGS', '')} {v['SAG_FLAGS']}")))
    checked = []
    manifest = name if name in MANIFESTS else TWINS.get(name)
    if manifest:
        skip = NOT_LAYOUT if manifest != name else {"use_fp16"}
        for key, value in explicit_flags(MANIFESTS[manifest]["flags"]).items():
            if key not in skip:
                assert preset[key] == value, (name, manifest, key)
        checked.append(manifest)
    if preset.get("classifier_guidance"):
        clf = os.path.basename(preset["classifier_path"])[:-3]
        if clf in MANIFESTS:
            for key, value in explicit_flags(MANIFESTS[clf]["flags"]).items():
                assert preset[key] == value, (clf, key)
            checked.append(clf)
    if not checked:
        pytest.skip(f"no manifest for {name} in tests/data")
