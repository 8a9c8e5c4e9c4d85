"""The demo pipeline (scripts/demo.py) on a tiny random 32x32 checkpoint, and
the embedded default model: its card makes `image_sample.py` with no flags
sample from it with SAG, and its weights load strictly."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch as th
from PIL import Image

from conftest import script_module
from improved_diffusion.sampling.samplers import Sampler, sampler_name
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    write_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "fashion32_ema.pt"
DEFAULT_CLASSIFIER = ROOT / "models" / "fashion32_classifier.pt"


pytestmark = pytest.mark.usefixtures("single_process", "own_logger")


def tiny_checkpoint(tmp_path):
    """A tiny random class-conditional 32x32 UNet with a model card (2 steps, SAG)."""
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=32, num_channels=32, channel_mult="1,2", num_res_blocks=1,
        attention_resolutions="16", num_heads=2, class_cond=True, num_classes=10,
        learn_sigma=True, diffusion_steps=100, noise_schedule="cosine",
    )
    th.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    with th.no_grad():  # give the zero-initialised projections weights: SAG then acts
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    path = str(tmp_path / "tiny.pt")
    th.save(model.state_dict(), path)
    card = dict(flags, timestep_respacing="2", batch_size=3, guide_scale=1.5,
                sel_attn_block="output", sel_attn_depth=1, blur_sigma=1.0)
    write_model_card(path, card)
    return path


def test_demo_pipeline_on_tiny_checkpoint(tmp_path, capsys, monkeypatch):
    demo = script_module("demo")
    out = tmp_path / "out"
    metrics = demo.main(["--out_dir", str(out), "--num_samples", "5", "--seed", "3",
                         "--model_path", tiny_checkpoint(tmp_path)])
    npz = out / "samples_5x32x32x3.npz"
    with np.load(npz) as z:
        assert z["arr_0"].shape == (5, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].dtype == np.int64 and z["arr_1"].shape == (5,)
        images, labels = z["arr_0"], z["arr_1"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_samples"] == 5 and saved["seed"] == 3
    assert saved["accuracy"] == metrics["accuracy"]
    # The scores, recomputed here from the evaluation classifier's weights and
    # the cached reference statistics: accuracy as a count of k/5 agreeing
    # labels, FID in float64 with the trace term from eigenvalues.
    from evaluations import fashion_metrics as fm

    clf = fm.FashionClassifier(**fm._config_from_state_dict(
        th.load(fm.DEFAULT_CLASSIFIER, map_location="cpu", weights_only=True)))
    clf.load_state_dict(th.load(fm.DEFAULT_CLASSIFIER, map_location="cpu", weights_only=True))
    x = th.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    with th.no_grad():
        logits, feats = clf.eval()(x, return_features=True)
    agree = int((logits.argmax(1).numpy() == labels).sum())
    assert saved["accuracy"] == agree / 5
    with np.load(fm.DEFAULT_REF_STATS) as ref:
        mu2, s2 = ref["mu"].astype(np.float64), ref["sigma"].astype(np.float64)
    f = feats.double().numpy()
    mu1, s1 = f.mean(0), np.cov(f, rowvar=False)
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert saved["fid"] == pytest.approx(fid, rel=1e-3)
    printed = capsys.readouterr().out
    assert str(npz) in printed and "accuracy" in printed and "FID" in printed
    grids = list(out.glob("*.png"))
    assert grids and all(str(g) in printed for g in grids)
    masks = [p for p in out.glob("*/*.png") if p.parent.name != "no_sag"]  # SAG-mask pictures
    assert masks and str(masks[0].parent) in printed

    # The comparison: the same 5 positions drawn without SAG, as image_sample.py
    # draws them with --guide_scale 1.0 on its own, beside the SAG ones.
    assert str(out / "sag_vs_none.png") in printed
    with np.load(out / "no_sag" / "samples_5x32x32x3.npz") as z:
        plain, plain_labels = z["arr_0"], z["arr_1"]
    assert np.array_equal(plain_labels, labels)
    assert not np.array_equal(plain, images)  # SAG changed the samples
    image_sample = script_module("image_sample")
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "direct"))
    direct = image_sample.main(["--num_samples", "5", "--seed", "3", "--guide_scale", "1.0",
                                "--model_path", str(tmp_path / "tiny.pt")])
    with np.load(direct) as z:
        assert np.array_equal(z["arr_0"], plain) and np.array_equal(z["arr_1"], labels)
    picture = np.asarray(Image.open(out / "sag_vs_none.png"))
    # 10 class rows of 32 * 3 + pad, 4 + 1 + 4 tiles wide, the name column and a caption line
    assert picture.shape[1] == 70 + 2 * 3 + 9 * (32 + 2) * 3


def test_demo_passes_flags_on_and_adds_pictures():
    demo = script_module("demo")
    args = type("A", (), dict(num_samples=256, seed=0))()
    argv = demo.sample_argv(args, ["--guide_scale", "1.0"], {"save_attention_masks"})
    assert argv[:4] == ["--num_samples", "256", "--seed", "0"]
    assert argv[4:6] == ["--save_attention_masks", "True"]
    assert argv[-2:] == ["--guide_scale", "1.0"]
    argv = demo.sample_argv(args, ["--save_attention_masks=False"], {"save_attention_masks"})
    assert argv.count("--save_attention_masks") == 0
    # flags image_sample.py does not have are never added
    assert demo.sample_argv(args, [], set()) == ["--num_samples", "256", "--seed", "0"]


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="default model not committed")
def test_default_model_card_gives_sag_sampling_without_flags():
    from improved_diffusion.cli import parse_args_with_card

    image_sample = script_module("image_sample")
    args = image_sample.create_argparser()
    args = parse_args_with_card(args, [])
    assert os.path.samefile(args.model_path, DEFAULT_MODEL)
    assert args.image_size == 32 and args.class_cond and args.num_classes == 10
    assert args.guide_scale != 1.0  # SAG is on
    # a fast sampler: at most 40 network evaluations per sample, SAG on each
    steps = Sampler.from_args(args, None).steps
    assert sampler_name(args) == "sde-dpmsolver++" and steps * 2 <= 40 and args.guide_start >= steps
    # the card's flags build the model the weights belong to
    flags = {k: getattr(args, k) for k in model_and_diffusion_defaults()}
    model, diffusion = create_model_and_diffusion(**flags)
    model.load_state_dict(th.load(DEFAULT_MODEL, map_location="cpu", weights_only=True))
    assert ("output", args.sel_attn_depth) in model.attention_blocks()
    assert os.path.getsize(DEFAULT_MODEL) < 20e6


@pytest.mark.skipif(not DEFAULT_CLASSIFIER.exists(), reason="default classifier not committed")
def test_default_classifier_card_builds_it():
    from improved_diffusion.script_util import (
        classifier_and_diffusion_defaults,
        create_classifier_and_diffusion,
        read_model_card,
    )

    card = read_model_card(str(DEFAULT_CLASSIFIER))
    flags = classifier_and_diffusion_defaults()
    flags.update({k: v for k, v in card.items() if k in flags})
    classifier, _ = create_classifier_and_diffusion(**flags)
    classifier.load_state_dict(
        th.load(DEFAULT_CLASSIFIER, map_location="cpu", weights_only=True))
    logits = classifier(th.zeros(2, 3, 32, 32), th.tensor([0, 500]))
    assert logits.shape == (2, 10)


def test_demo_out_dir_is_emptied_only_when_it_is_an_earlier_run(tmp_path):
    demo = script_module("demo")
    earlier = tmp_path / "earlier"
    (earlier / "shards").mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    (earlier / "shards" / "shard_x.npz").write_text("")
    demo.prepare_out_dir(str(earlier))
    assert earlier.is_dir() and not list(earlier.iterdir())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        demo.prepare_out_dir(str(other))
    assert (other / "notes.txt").exists()


def test_pick_threads(monkeypatch, tmp_path):
    demo = script_module("demo")
    assert demo.pick_threads(3) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    # /proc/stat's first line twice: 3 of 4 cores busy between the two reads.
    stats = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  250 0 100 850 0 0 0 0 0 0\n"])
    stat = tmp_path / "stat"

    def read(path="/proc/stat"):
        stat.write_text(next(stats))
        return real_read(str(stat))

    real_read = demo._cpu_times
    monkeypatch.setattr(demo, "_cpu_times", read)
    assert demo.busy_cores(interval=0) == pytest.approx(3.0)
    # Without /proc/stat: the load average.
    monkeypatch.setattr(demo, "_cpu_times", lambda: open(tmp_path / "missing"))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0, 0))
    assert demo.pick_threads() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0, 0))
    assert demo.pick_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0, 0))
    assert demo.pick_threads() == 1
