import os
import sys

import pytest
import torch as th

# In-process model runs: one thread each (oversubscribed OpenMP threads spin;
# scripts run in subprocesses keep their own settings).
th.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from improved_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def tiny_flags(**overrides):
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=16,
        num_channels=32,
        channel_mult="1,1",
        num_res_blocks=1,
        attention_resolutions="8",
        num_heads=2,
        learn_sigma=True,
        diffusion_steps=1000,
        timestep_respacing="4",
    )
    flags.update(overrides)
    return flags


def tiny_model(seed=0, **overrides):
    """A tiny random UNet (with non-zero output/attention projections) and its diffusion."""
    th.manual_seed(seed)
    flags = tiny_flags(**overrides)
    model, diffusion = create_model_and_diffusion(**flags)
    with th.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.dim() > 1:  # zero-initialised projections
                p.normal_(0, 0.05)
    model.eval()
    return model, diffusion


@pytest.fixture
def tiny():
    return tiny_model()
