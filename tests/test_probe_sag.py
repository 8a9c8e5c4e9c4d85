"""scripts/probe_sag.py: the identity it rests on (SAG's x_0 from the parts of
one step), the foreground of images on a plain background, the coverage
shares, the restoration coefficient, and the script on a tiny checkpoint."""

import math
import re

import torch as th

from conftest import script_module, probe_inputs, tiny_model
from improved_diffusion.guidance.denoiser import DiffusionTimes, GuidedDenoiser
from improved_diffusion.guidance.sag import SelfAttentionGuidance


probe = script_module("probe_sag")


def test_guided_xstart_is_x0_less_scale_minus_one_times_what_the_second_pass_adds():
    model, diffusion = tiny_model(timestep_respacing="")
    g = th.Generator().manual_seed(1)
    x_t = th.randn(3, 3, 16, 16, generator=g)
    t = th.tensor([700, 400, 900])
    for scale in (1.5, 0.8):
        sag = SelfAttentionGuidance(model, scale=scale, start=1000, block="output", depth=0,
                                    blur_sigma=1.0, num_heads=2)  # every step guided
        denoiser = GuidedDenoiser.for_diffusion(model, diffusion, clip_denoised=False, sag=sag)
        with th.no_grad():
            out = denoiser(x_t, t, DiffusionTimes(diffusion))
        guided_xstart = diffusion._predict_xstart_from_eps(x_t, t, out.eps)
        mask, x0, x0_blur, x0_bar = probe.sag_step_parts(model, diffusion, x_t, t, {}, sag)
        assert th.equal(mask, out.pictures["sag_mask"])
        assert not th.allclose(x0_bar, x0_blur)  # the second pass moved something
        expected = x0 - (scale - 1) * (x0_bar - x0_blur)
        assert th.allclose(guided_xstart, expected, atol=1e-5), (
            (guided_xstart - expected).abs().max())


def test_restored_is_the_least_squares_coefficient():
    x0 = th.tensor([1.0, 0.0, 2.0])
    x0_blur = th.tensor([0.0, 0.0, 0.0])
    x0_bar = th.tensor([0.5, 0.3, 0.0])  # 0.5 of the first detail back, none of the third
    assert probe.restored(x0, x0_blur, x0_bar) == 0.5 / 5
    assert probe.restored(x0, x0_blur, x0) == 1.0
    assert probe.restored(x0, x0_blur, x0_blur) == 0.0


def test_foreground_is_what_differs_from_the_border_level():
    images = th.full((2, 3, 8, 8), -1.0)  # black background
    images[0, :, 2:5, 3:7] = 0.8  # a light square
    images[1] = 1.0  # white background ...
    images[1, 1, 4:6, 0:2] = 0.5  # ... a square off the white in one channel, at the border
    images[1, :, 0, 5] = 0.95  # within the threshold: background
    fg = probe.foreground(images, threshold=0.1)
    expected = th.zeros(2, 8, 8, dtype=th.bool)
    expected[0, 2:5, 3:7] = True
    expected[1, 4:6, 0:2] = True
    assert th.equal(fg, expected)


def test_coverage_counts_object_and_background_pixels_apart():
    fg = th.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=th.bool)
    mask = th.tensor([[1, 1, 1, 0, 1, 0, 0, 0, 0, 0]], dtype=th.float32)
    on, off = probe.coverage(mask, fg)
    assert on == 3 / 4 and off == 1 / 6


def test_the_script_prints_a_row_per_attention_block(tmp_path, capsys):
    model, ckpt, card, data = probe_inputs(tmp_path)
    code = probe.main([str(ckpt), "--data_dir", str(data), "--n", "4", "--timesteps", "10,500",
                       "--card", str(card)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"foreground: {64 / 256:.3f} of the pixels; blur sigma 3"
    rows = [line for line in out if line.startswith(f"| {ckpt} |")]
    names = ["middle" if p == "middle" else f"{p} {d}" for p, d in sorted(model.attention_blocks())]
    assert [row.split(" | ")[1] for row in rows] == names
    for row in rows:
        cells = row.strip(" |").split(" | ")[2:]
        assert len(cells) == 2
        for cell in cells:
            on, off, back = (float(v) for v in re.fullmatch(r"(\S+) / (\S+) / (\S+)",
                                                             cell).groups())
            assert 0 <= on <= 1 and 0 <= off <= 1 and math.isfinite(back)


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    assert probe.main([str(tmp_path / "none.pt"), "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'none.pt'}: not found; pass an existing file or folder"]
