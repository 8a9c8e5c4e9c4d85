"""Self-Attention Guidance on tiny models: capture, layouts, samplers, seeds, flags."""

import subprocess
import sys

import numpy as np
import pytest
import torch as th

from conftest import ROOT, draw, tiny_model
from improved_diffusion.guidance.attention_capture import AttentionCapture
from improved_diffusion.guidance.denoiser import DiffusionTimes, GuidedDenoiser
from improved_diffusion.guidance.sag import SAGConfigError, SelfAttentionGuidance
from improved_diffusion.sampling.samplers import Sampler
from improved_diffusion.sampling.drawer import BatchDrawer


def _run(model, t=None):
    x = th.randn(2, 3, 16, 16, generator=th.Generator().manual_seed(0))
    t = th.tensor([10, 500]) if t is None else t
    with th.no_grad():
        return model(x, t)


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_forward_returns_one_tensor(tiny):
    model, _ = tiny
    out = _run(model)
    assert isinstance(out, th.Tensor) and out.shape == (2, 6, 16, 16)


def test_capture_is_scoped_and_removed(tiny):
    model, _ = tiny
    block = model.attention_blocks()[("output", 0)]
    assert _hooks(model) == 0
    with AttentionCapture(block, keep="weights") as cap:
        assert _hooks(model) == 1
        _run(model)
    assert _hooks(model) == 0
    assert cap.weights.shape == (2 * 2, 64, 64) and cap.calls == 1
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCapture(block):
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    # The result lives on the capture object, not on modules.
    assert not any(hasattr(m, "qkv_capture") or hasattr(m, "attn_map") for m in model.modules())


@pytest.mark.parametrize("new_order", [False, True])
def test_capture_matches_block_attention_both_layouts(new_order):
    model, _ = tiny_model(use_new_attention_order=new_order, num_head_channels=16)
    block = model.attention_blocks()[("middle", 0)]
    seen = {}
    handle = block.attention.register_forward_hook(
        lambda m, inp, out: seen.update(qkv=inp[0], out=out)
    )
    with AttentionCapture(block, keep="weights") as cap:
        _run(model)
    handle.remove()
    assert cap.is_true_attention
    # Rebuild the op's output from the captured weights: they are the weights it used.
    qkv = seen["qkv"]
    bs, width, length = qkv.shape
    heads = block.attention.n_heads
    ch = width // (3 * heads)
    if new_order:
        v = qkv.chunk(3, dim=1)[2].reshape(bs * heads, ch, length)
    else:
        v = qkv.reshape(bs * heads, 3 * ch, length).split(ch, dim=1)[2]
    rebuilt = th.einsum("bts,bcs->bct", cap.weights, v).reshape(bs, -1, length)
    assert th.allclose(rebuilt, seen["out"], atol=1e-5)
    assert th.allclose(cap.weights.sum(-1), th.ones(()), atol=1e-5)


def test_published_map_vs_true_heads():
    # 32 channels with 16 per head: the blocks run 2 heads; the --num_heads flag says 4.
    model, _ = tiny_model(num_heads=4, num_head_channels=16)
    published = SelfAttentionGuidance(model, block="output", depth=0, num_heads=4)
    true = SelfAttentionGuidance(model, block="output", depth=0, num_heads=4, true_attention=True)
    with published.capture(keep="weights") as cp:
        _run(model)
    with true.capture(keep="weights") as ct:
        _run(model)
    assert cp.weights.shape == (2 * 4, 64, 64) and not cp.is_true_attention
    assert ct.weights.shape == (2 * 2, 64, 64) and ct.is_true_attention
    # Published map: legacy split into 4 "heads" of 8 channels, whatever the block runs.
    qkv = {}
    h = published.block.attention.register_forward_hook(lambda m, i, o: qkv.update(x=i[0]))
    _run(model)
    h.remove()
    q, k, _ = qkv["x"].reshape(2 * 4, 24, 64).split(8, dim=1)
    s = 8 ** -0.25
    want = th.softmax(th.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    assert th.allclose(cp.weights, want, atol=1e-6)
    # When the flag matches the blocks, the two maps are the same.
    model4, _ = tiny_model(num_heads=2)
    a = SelfAttentionGuidance(model4, depth=0, num_heads=2)
    b = SelfAttentionGuidance(model4, depth=0, num_heads=2, true_attention=True)
    with a.capture(keep="weights") as ca:
        _run(model4)
    with b.capture(keep="weights") as cb:
        _run(model4)
    assert th.equal(ca.weights, cb.weights)


class CountingModel(th.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


_sample = draw


@pytest.mark.parametrize("ddim", [False, True])
def test_scale_one_is_plain_sampling(tiny, ddim):
    model, diffusion = tiny
    counted = CountingModel(model)
    plain = _sample(diffusion, counted, ddim=ddim)
    plain_calls = counted.calls
    sag1 = SelfAttentionGuidance(model, scale=1.0, depth=0, num_heads=2)
    counted.calls = 0
    same = _sample(diffusion, counted, sag=sag1, ddim=ddim)
    assert th.equal(plain, same)
    assert counted.calls == plain_calls == 4  # no second pass at scale 1


@pytest.mark.parametrize("ddim", [False, True])
def test_sag_changes_samples_and_is_deterministic(tiny, ddim):
    model, diffusion = tiny
    sag = SelfAttentionGuidance(model, scale=3.0, depth=0, num_heads=2, blur_sigma=1.0)
    plain = _sample(diffusion, model, ddim=ddim)
    a = _sample(diffusion, model, sag=sag, ddim=ddim)
    b = _sample(diffusion, model, sag=sag, ddim=ddim)
    assert th.equal(a, b)
    assert th.isfinite(a).all()
    assert (a - plain).abs().max() > 1e-3


def test_guidance_window(tiny):
    model, diffusion = tiny  # 4 respaced steps: indices 3, 2, 1, 0
    counted = CountingModel(model)
    guided_steps = []
    for start, n_guided in [(250, 4), (2, 2), (0, 0)]:
        sag = SelfAttentionGuidance(model, scale=1.5, start=start, depth=0, num_heads=2)
        counted.calls = 0
        _sample(diffusion, counted, sag=sag)
        assert counted.calls == 4 + n_guided
        guided_steps.append([sag.applies(i) for i in (3, 2, 1, 0)])
    assert guided_steps[1] == [False, False, True, True]


def test_guided_denoiser_keeps_first_pass_variance_and_reports_its_xstart(tiny):
    model, diffusion = tiny
    sag = SelfAttentionGuidance(model, scale=2.0, depth=0, num_heads=2)
    x = th.randn(2, 3, 16, 16)
    t = th.tensor([2, 2])
    times = DiffusionTimes(diffusion)
    with th.no_grad():
        plain = GuidedDenoiser.for_diffusion(model, diffusion)(x, t, times)
        guided = GuidedDenoiser.for_diffusion(model, diffusion, sag=sag)(x, t, times)
    assert plain.pictures is None
    assert th.equal(plain.output[:, 3:], guided.output[:, 3:])  # the variance channels
    assert not th.equal(plain.eps, guided.eps)
    assert th.equal(guided.output[:, :3], guided.eps)
    # The pictures' x_0 is the first pass's (the unguided prediction, clamped).
    want = diffusion.p_mean_variance(model, x, t)["pred_xstart"]
    assert th.equal(guided.pictures["pred_xstart"], want)
    assert guided.pictures["sag_mask"].shape == x.shape


class ConstantGradient:
    """Classifier guidance whose gradient is 1 everywhere (records its calls)."""

    scale = 0.5

    def __init__(self):
        self.calls = []

    def gradient(self, x, t, **kwargs):
        self.calls.append(t)
        return th.ones_like(x)

    def __call__(self, x, t, **kwargs):
        return self.gradient(x, t) * self.scale


def test_classifier_guidance_with_sag(tiny):
    model, diffusion = tiny
    sag = SelfAttentionGuidance(model, scale=1.5, depth=0, num_heads=2)
    for ddim in (False, True):
        classifier = ConstantGradient()
        base = _sample(diffusion, model, sag=sag, ddim=ddim)
        guided = _sample(diffusion, model, sag=sag, ddim=ddim, classifier=classifier)
        assert len(classifier.calls) == 4
        assert guided.mean() > base.mean()  # the gradient pushes every pixel up


def _drawer(diffusion, model, seed, use_ddim=False, sag=None, **kwargs):
    sampler = Sampler.ddim(diffusion) if use_ddim else Sampler.ddpm(diffusion)
    denoiser = GuidedDenoiser.for_diffusion(model, diffusion, sag=sag)
    return BatchDrawer(sampler, denoiser, (3, 16, 16), "cpu", seed, **kwargs)


def test_seed_contract_batch_sizes(tiny):
    model, diffusion = tiny
    sag = SelfAttentionGuidance(model, scale=1.5, depth=0, num_heads=2)
    draw = _drawer(diffusion, model, seed=5, sag=sag)
    one = np.concatenate([draw([p])[0] for p in range(3)]).astype(int)
    three = draw([0, 1, 2])[0].astype(int)
    assert three.shape == (3, 16, 16, 3)
    # Equal up to float rounding (batched convolutions sum in another order),
    # which can move a value across a uint8 level.
    assert np.abs(one - three).max() <= 1
    other = draw([1, 2, 3])[0].astype(int)
    assert np.abs(other[:2] - three[1:]).max() <= 1
    assert np.abs(other[2] - three[2]).max() > 12  # position 3 is another sample


def test_labels_drawn_first_from_each_generator():
    model, diffusion = tiny_model(class_cond=True, num_classes=10)
    draw = _drawer(diffusion, model, seed=3, use_ddim=True, draw_labels=True, num_classes=10)
    _, labels = draw([0, 1])
    want = [int(th.randint(0, 10, (1,), generator=th.Generator().manual_seed(3 + p))) for p in (0, 1)]
    assert labels.tolist() == want


def test_training_losses_on_sag_unet(tiny):
    model, diffusion = tiny
    model.train()
    x = th.randn(2, 3, 16, 16)
    t = th.tensor([0, 3])
    losses = diffusion.training_losses(model, x, t)
    assert set(losses) >= {"loss", "mse", "vb"}
    losses["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block="output", depth=5), r"output_blocks\[5\] has no attention.*output with --sel_attn_depth 0,1(;|$)"),
        (dict(block="decoder"), "--sel_attn_block must be one of"),
        (dict(blur_sigma=0), "--blur_sigma must be"),
        (dict(blur_sigma=-1), "--blur_sigma must be"),
        (dict(scale=float("nan")), "--guide_scale must be a finite"),
        (dict(scale=float("inf")), "--guide_scale must be a finite"),
        (dict(num_heads=3), "--num_heads 3 does not divide"),
    ],
)
def test_invalid_sag_settings(tiny, kwargs, match):
    model, _ = tiny
    base = dict(scale=1.5, block="output", depth=0, num_heads=2)
    base.update(kwargs)
    with pytest.raises(SAGConfigError, match=match):
        SelfAttentionGuidance(model, **base)


def test_middle_and_input_blocks_guide_with_their_own_map(tiny):
    """SAG at the middle block and at an input block: each step's mask is that block's map."""
    from sag_reference import attention_mask

    model, diffusion = tiny
    inputs = [i for (p, i) in model.attention_blocks() if p == "input"]
    x = th.randn(2, 3, 16, 16, generator=th.Generator().manual_seed(4))
    t = th.tensor([2, 2])
    times = DiffusionTimes(diffusion)
    with th.no_grad():
        plain = GuidedDenoiser.for_diffusion(model, diffusion)(x, t, times)
    masks = []
    for part, depth in (("middle", 0), ("input", inputs[0]), ("output", 0)):
        sag = SelfAttentionGuidance(model, scale=2.0, block=part, depth=depth, num_heads=2)
        block = model.attention_blocks()[(part, depth)]
        with th.no_grad():
            with AttentionCapture(block, num_heads=2, legacy=True, keep="weights") as cap:
                model(x, times.model_time(t))
            guided = GuidedDenoiser.for_diffusion(model, diffusion, sag=sag)(x, t, times)
        assert th.equal(guided.pictures["sag_mask"], attention_mask(cap.weights, 2, (3, 16, 16)))
        assert not th.allclose(guided.eps, plain.eps)
        masks.append(guided.pictures["sag_mask"])
    # three blocks, three maps
    assert not th.equal(masks[0], masks[1]) and not th.equal(masks[1], masks[2])
    assert not th.equal(masks[0], masks[2])


TINY_FLAGS = (
    "--image_size 16 --num_channels 32 --channel_mult 1,1 --num_res_blocks 1 "
    "--attention_resolutions 8 --num_heads 2 --learn_sigma True --timestep_respacing 2"
).split()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from conftest import tiny_flags
    from improved_diffusion.script_util import create_model_and_diffusion

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model, _ = create_model_and_diffusion(**tiny_flags(timestep_respacing="2"))
    th.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sel_attn_depth", "7"], "output_blocks[7] has no attention layer in this model; choose"),
        (["--blur_sigma", "0"], "--blur_sigma must be a number > 0"),
        (["--guide_scale", "nan"], "--guide_scale must be a finite number"),
        (["--sel_attn_block", "top"], "--sel_attn_block must be one of"),
    ],
)
def test_script_rejects_bad_sag_flags(tiny_ckpt, tmp_path, flags, message):
    cmd = [sys.executable, f"{ROOT}/scripts/image_sample.py", *TINY_FLAGS, "--model_path", tiny_ckpt,
           "--num_samples", "2", "--batch_size", "2", *flags]
    env = {"OPENAI_LOGDIR": str(tmp_path / "out"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not list((tmp_path / "out").glob("*.npz")) if (tmp_path / "out").exists() else True


def test_no_torchvision_or_tensorflow_anywhere():
    import pathlib

    offenders = []
    for path in pathlib.Path(ROOT).rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")) and any(
                f" {mod}" in s.replace(",", " ") for mod in ("torchvision", "tensorflow")
            ):
                offenders.append(f"{path}: {s}")
    assert not offenders
