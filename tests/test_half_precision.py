"""--use_fp16 on CPU: bfloat16 where the processor has it, float32 with a warning where not."""

import warnings

import pytest
import torch as th

from conftest import draw, tiny_model
from improved_diffusion import script_util
from improved_diffusion.guidance.sag import SelfAttentionGuidance
from improved_diffusion.script_util import half_dtype_for, prepare_model_for_sampling


def test_half_dtype_for_devices(monkeypatch):
    assert half_dtype_for("cpu", False) == th.float32
    assert half_dtype_for("cuda", True) == th.float16
    assert half_dtype_for("cuda:1", False) == th.float32
    monkeypatch.setattr(script_util, "cpu_supports_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert half_dtype_for("cpu", True) == th.bfloat16
    monkeypatch.setattr(script_util, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning) as record:
        assert half_dtype_for("cpu", True) == th.float32
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert "bfloat16" in str(record[0].message)


def test_prepare_model_for_sampling_cpu(monkeypatch):
    monkeypatch.setattr(script_util, "cpu_supports_bf16", lambda: True)
    model, _ = tiny_model()
    prepare_model_for_sampling(model, "cpu", use_fp16=True)
    conv = model.input_blocks[0][0]
    assert model.dtype == th.bfloat16 and conv.weight.dtype == th.bfloat16
    assert conv.weight.is_contiguous()  # channels-last only on request
    assert model.time_embed[0].weight.dtype == th.float32  # as upstream: the torso only
    assert model.out[2].weight.dtype == th.float32
    prepare_model_for_sampling(model, "cpu", use_fp16=True, channels_last=True)
    assert conv.weight.is_contiguous(memory_format=th.channels_last)
    model32, _ = tiny_model()
    prepare_model_for_sampling(model32, "cpu", use_fp16=False)
    assert model32.dtype == th.float32 and model32.input_blocks[0][0].weight.is_contiguous()


def _sample(model, diffusion, sag, seeds=(0, 1, 2, 3)):
    return draw(diffusion, model, sag=sag, seeds=seeds)


@pytest.mark.parametrize("ddim", [False, True])
def test_bf16_sag_sampling_stays_close_to_fp32(ddim):
    model, diffusion = tiny_model()
    sag = SelfAttentionGuidance(model, scale=1.5, depth=0, num_heads=2, blur_sigma=1.0)

    def sample(seeds):
        return draw(diffusion, model, sag=sag, ddim=ddim, seeds=seeds)

    want = sample([0, 1, 2, 3])
    other = sample([4, 5, 6, 7])
    model.convert_to_fp16(th.bfloat16)  # what --use_fp16 runs on a bfloat16 CPU
    model.to(memory_format=th.channels_last)
    got = sample([0, 1, 2, 3])
    assert got.dtype == th.float32 and got.is_contiguous() and th.isfinite(got).all()
    # In uint8 levels, as the scripts save them: a few levels at most on this
    # tiny random model, against tens between different seeds.
    to8 = lambda x: ((x + 1) * 127.5).clamp(0, 255).to(th.uint8).long()  # noqa: E731
    d = (to8(got) - to8(want)).abs().float().mean()
    seeds_apart = (to8(other) - to8(want)).abs().float().mean()
    assert 0 < d < 4 and d < 0.1 * seeds_apart, (d, seeds_apart)


def test_bf16_capture_map_is_float32():
    model, _ = tiny_model()
    model.convert_to_fp16(th.bfloat16)
    sag = SelfAttentionGuidance(model, depth=0, num_heads=2)
    x = th.randn(2, 3, 16, 16)
    with sag.capture(keep="weights") as cap, th.no_grad():
        out = model(x, th.tensor([3, 700]))
    assert out.dtype == th.float32
    assert cap.weights.dtype == th.float32 and cap.key_mass.dtype == th.float32
    assert th.allclose(cap.weights.sum(-1), th.ones(()), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 64, 9, 9), (3, 64, 50)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_group_norm_equals_float_path(shape, channels_last):
    import torch.nn.functional as F

    from improved_diffusion.nn import GroupNorm32

    norm = GroupNorm32(32, 64)
    with th.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (th.randn(*shape) * 4 + 1).to(th.bfloat16)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=th.channels_last)
    got = norm(x)  # the direct bfloat16 path
    want = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(th.bfloat16)
    assert got.dtype == th.bfloat16 and th.equal(got, want)
    x16 = x.to(th.float16)  # other dtypes: through float32 and back
    want16 = F.group_norm(x16.float(), 32, norm.weight, norm.bias, norm.eps).to(th.float16)
    assert th.equal(norm(x16), want16)
