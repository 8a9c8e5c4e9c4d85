"""Every published architecture is rebuilt name for name, shape for shape, dtype for
dtype, in order (strict loading through the scripts' loader: test_published_loading.py)."""

import argparse
import json
import os
import shlex

import pytest
import torch as th

from conftest import network_of
from improved_diffusion.script_util import (
    add_dict_to_argparser,
    classifier_defaults,
    model_and_diffusion_defaults,
    sr_model_and_diffusion_defaults,
)

DATA = os.path.join(os.path.dirname(__file__), "data")


def _manifest_entries():
    entries = []
    for name in ("guided_diffusion.json", "improved_diffusion.json"):
        with open(os.path.join(DATA, name)) as f:
            for key, entry in json.load(f).items():
                entries.append(pytest.param(entry, id=key))
    return entries


def build_from_flags(flags, kind):
    defaults = model_and_diffusion_defaults()
    defaults.update(classifier_defaults())
    if kind == "upsampler":
        defaults = sr_model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(shlex.split(flags))
    with th.device("meta"):
        return network_of(args, kind)[0]


def test_seventeen_manifests():
    """A manifest for every published checkpoint with a layout of its own (the upsamplers included)."""
    assert len(_manifest_entries()) == 17


@pytest.mark.parametrize("entry", _manifest_entries())
def test_published_architecture(entry):
    model = build_from_flags(entry["flags"], entry["kind"])
    got = [(name, list(t.shape), str(t.dtype).replace("torch.", ""))
           for name, t in model.state_dict().items()]
    want = [(name, shape, dtype) for name, shape, dtype in entry["params"]]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert got == want
