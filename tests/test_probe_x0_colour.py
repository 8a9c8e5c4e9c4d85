"""scripts/probe_x0_colour.py: its two measures against hand-computed values,
the script on a tiny checkpoint, and model_from_card (shared with
probe_sag.py), which builds a run's checkpoint with the run's model flags."""

import json
import math
import re

import numpy as np
import pytest
import torch as th

from conftest import script_module, probe_inputs, tiny_flags, tiny_model
from improved_diffusion.checkpoints.loading import model_from_card
from improved_diffusion.cli import UsageError
from improved_diffusion.checkpoints.model_card import write_model_card


probe = script_module("probe_x0_colour")


def test_colour_of_mean_is_the_channel_means_less_their_average():
    x = th.zeros(1, 3, 2, 2)
    x[0, 0] = th.tensor([[1.0, 3.0], [0.0, 0.0]])  # mean 1
    x[0, 1] = 4.0  # mean 4
    x[0, 2] = th.tensor([[1.0, 0.0], [0.0, 0.0]])  # mean 0.25
    expected = th.tensor([[1.0, 4.0, 0.25]]) - (1.0 + 4.0 + 0.25) / 3
    assert th.allclose(probe._colour_of_mean(x), expected)
    gray = th.rand(2, 1, 4, 4).expand(2, 3, 4, 4)
    assert probe._colour_of_mean(gray).abs().max() < 1e-6  # no colour in gray images


def test_correlation_is_pearsons_r():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    expected = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert probe._correlation(th.tensor(a), th.tensor(b)) == pytest.approx(expected, abs=1e-12)
    assert probe._correlation(th.tensor(a), th.tensor(2 * a + 1)) == pytest.approx(1.0)


def test_the_script_prints_cast_mean_error_and_r_per_timestep(tmp_path, capsys):
    _, ckpt, card, data = probe_inputs(tmp_path)
    code = probe.main([str(ckpt), str(ckpt), "--data_dir", str(data), "--n", "4",
                       "--timesteps", "10,500,999", "--card", str(card)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| checkpoint | t = 10 | t = 500 | t = 999 |"
    rows = [line for line in out if line.startswith(f"| {ckpt} |")]
    assert len(rows) == 2 and rows[0] == rows[1]  # fixed images and noise
    cells = rows[0].strip(" |").split(" | ")[1:]
    assert len(cells) == 3
    for cell in cells:
        cast, mean_error, r = (float(v) for v in re.fullmatch(r"(\S+) / (\S+) / (\S+)", cell).groups())
        assert 0 <= cast <= 255 and 0 <= mean_error <= 255 and -1 <= r <= 1 and math.isfinite(r)


def test_missing_card_is_one_error_line(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    ckpt.write_bytes(b"")
    card = tmp_path / "none.json"
    assert probe.main([str(ckpt), "--data_dir", str(tmp_path), "--card", str(card)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {card}: not found; pass an existing file or folder"]


def test_model_from_card_takes_the_architecture_of_the_run_beside_the_checkpoint(tmp_path):
    card_flags = tiny_flags(timestep_respacing="")
    write_model_card(str(tmp_path / "card.pt"), card_flags)
    run = tmp_path / "run"
    run.mkdir()
    run_model, _ = tiny_model(norm_groups=8, timestep_respacing="")
    th.save(run_model.state_dict(), run / "model000100.pt")
    (run / "model_flags.json").write_text(json.dumps(
        {"flags": {**card_flags, "norm_groups": 8, "timestep_respacing": "25", "use_fp16": True}}))
    model, diffusion, flags = model_from_card(str(run / "model000100.pt"), str(tmp_path / "card.json"),
                                              timestep_respacing="", use_fp16=False)
    assert flags["norm_groups"] == 8  # the run's architecture ...
    assert flags["timestep_respacing"] == "" and flags["use_fp16"] is False  # ... not its sampling
    assert diffusion.num_timesteps == 1000
    for name, p in run_model.state_dict().items():
        assert th.equal(model.state_dict()[name], p), name
    assert not model.training
    # Without the run's flags the same weights compute another network: the
    # card's 32 groups load the same shapes, so compare outputs.
    th.save(run_model.state_dict(), tmp_path / "loose.pt")
    other, _, _ = model_from_card(str(tmp_path / "loose.pt"), str(tmp_path / "card.json"))
    x, t = th.randn(1, 3, 16, 16), th.tensor([10])
    with th.no_grad():
        assert not th.allclose(model(x, t), other(x, t))


def test_model_from_card_names_a_checkpoint_that_does_not_fit(tmp_path):
    write_model_card(str(tmp_path / "card.pt"), tiny_flags(timestep_respacing=""))
    wrong, _ = tiny_model(num_res_blocks=2, timestep_respacing="")
    th.save(wrong.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(UsageError, match="wrong.pt"):
        model_from_card(str(tmp_path / "wrong.pt"), str(tmp_path / "card.json"))
