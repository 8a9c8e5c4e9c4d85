"""UNet options of this fork: --norm_groups, and the flags a training run records."""

import json

import pytest
import torch as th

from conftest import TINY, run_script, tiny_flags
from improved_diffusion.checkpoints.model_card import run_flags
from improved_diffusion.script_util import create_model_and_diffusion


def _group_norms(model):
    return [m for m in model.modules() if isinstance(m, th.nn.GroupNorm)]


def test_norm_groups_default_is_upstreams_32_and_the_flag_reaches_every_norm():
    th.manual_seed(0)
    plain, _ = create_model_and_diffusion(**tiny_flags())
    th.manual_seed(0)
    grouped, _ = create_model_and_diffusion(**tiny_flags(norm_groups=8))
    assert {m.num_groups for m in _group_norms(plain)} == {32}
    assert {m.num_groups for m in _group_norms(grouped)} == {8}
    assert len(_group_norms(plain)) == len(_group_norms(grouped))
    # Same parameters, so a checkpoint cannot tell: its card or model_flags.json must say.
    a, b = plain.state_dict(), grouped.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    grouped.load_state_dict(a)


def _head_channel_means(model, x, t):
    """Per-image, per-channel spatial means after the output head's normalization."""
    seen = []
    handle = model.out[0].register_forward_hook(lambda m, i, o: seen.append(o.mean((2, 3))))
    with th.no_grad():
        model(x, t)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("groups", [32, 8])
def test_one_channel_per_group_erases_each_images_channel_means_before_the_output(groups):
    """
    Why the default model sets --norm_groups 8: with 32 channels and 32 groups
    the output head normalises every channel on its own, so each channel's
    spatial mean there is the norm's bias whatever the input (a per-image
    colour offset cannot reach the output); with 4 channels a group it varies.
    """
    th.manual_seed(0)
    model, _ = create_model_and_diffusion(**tiny_flags(norm_groups=groups))
    model.eval()
    with th.no_grad():
        model.out[0].bias.normal_()
    x = th.randn(4, 3, 16, 16) + th.tensor([0.5, -0.5, 0.0]).view(1, 3, 1, 1) * th.arange(4.0).view(4, 1, 1, 1)
    means = _head_channel_means(model, x, th.tensor([10, 200, 500, 900]))
    bias = model.out[0].bias.view(1, -1).expand_as(means)
    if groups == 32:
        assert th.allclose(means, bias, atol=1e-5)
    else:
        assert (means - bias).abs().max() > 0.05
        assert (means - means[0]).abs().max() > 0.05  # and differs between images


def test_bad_norm_groups_is_one_error_line_before_any_model(tmp_path):
    res = run_script("image_sample.py", f"{TINY} --model_path {tmp_path}/m.pt --norm_groups 5",
                     tmp_path / "o")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: --norm_groups 5 must divide every block width [32]")
    assert not (tmp_path / "o").exists()


def test_run_flags_are_the_architecture_a_training_run_wrote(tmp_path):
    assert run_flags(str(tmp_path / "model000200.pt")) == {}
    (tmp_path / "model_flags.json").write_text(json.dumps({"flags": dict(
        num_channels=32, norm_groups=8, timestep_respacing="", use_fp16=False,
        use_checkpoint=True, noise_schedule="cosine")}))
    assert run_flags(str(tmp_path / "model000200.pt")) == dict(
        num_channels=32, norm_groups=8, noise_schedule="cosine")
