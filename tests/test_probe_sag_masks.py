"""scripts/probe_sag_masks.py: the foreground of images on a plain background,
the coverage shares, and the script on a tiny checkpoint and image folder."""

import importlib.util
import os
import re

import numpy as np
import torch as th
from PIL import Image

from conftest import ROOT, tiny_flags, tiny_model
from improved_diffusion.model_card import write_model_card


def _load():
    path = os.path.join(ROOT, "scripts", "probe_sag_masks.py")
    spec = importlib.util.spec_from_file_location("probe_sag_masks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load()


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
    flags = tiny_flags(class_cond=True, num_classes=2, timestep_respacing="")
    model, _ = tiny_model(class_cond=True, num_classes=2, timestep_respacing="")
    ckpt = tmp_path / "tiny.pt"
    th.save(model.state_dict(), ckpt)
    write_model_card(str(ckpt), flags)
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img = np.zeros((16, 16, 3), dtype=np.uint8)
        img[4:12, 4:12] = rng.integers(100, 255)
        Image.fromarray(img).save(data / f"{i % 2}_{i:03d}.png")
    code = probe.main([str(ckpt), "--data_dir", str(data), "--n", "4", "--timesteps", "10,500",
                       "--card", str(tmp_path / "tiny.json")])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"foreground: {64 / 256:.3f} of the pixels"
    rows = [line for line in out if line.startswith(f"| {ckpt} |")]
    names = ["middle" if p == "middle" else f"{p} {d}" for p, d in sorted(model.attention_blocks())]
    assert [row.split(" | ")[1] for row in rows] == names
    for row in rows:
        cells = row.strip(" |").split(" | ")[2:]
        assert len(cells) == 2
        for cell in cells:
            on, off = (float(v) for v in re.fullmatch(r"(\S+) / (\S+)", cell).groups())
            assert 0 <= on <= 1 and 0 <= off <= 1


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    assert probe.main([str(tmp_path / "none.pt"), "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'none.pt'}: not found"]
