"""The pieces of a sampling run on their own: planning, npz streaming, fingerprints,
checkpoint diagnosis, pictures."""

import os

import numpy as np
import pytest
import torch as th

from conftest import tiny_flags
from improved_diffusion.run.pictures import AttentionMaskRecorder, make_grid, save_grid
from improved_diffusion.checkpoints.loading import check_state_dict, load_checkpoint
from improved_diffusion.cli import UsageError
from improved_diffusion.files.npz import npz_array, verify_npz, write_npz_streaming
from improved_diffusion.sampling.drawer import to_uint8
from improved_diffusion.run.shards import (
    describe_difference,
    fingerprint_digest,
    merge_ranges,
    plan_batches,
    rank_batches,
)
from improved_diffusion.script_util import create_model, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults


@pytest.mark.parametrize("n,bs,world", [(1, 1, 1), (7, 3, 1), (7, 2, 2), (15, 2, 2), (10, 16, 3), (33, 4, 5)])
def test_plan_covers_every_position_once(n, bs, world):
    batches = plan_batches(n, bs)
    assert batches == [(s, min(s + bs, n)) for s in range(0, n, bs)]
    dealt = [b for r in range(world) for b in rank_batches(batches, r, world)]
    positions = sorted(p for s, e in dealt for p in range(s, e))
    assert positions == list(range(n))


def test_plan_skips_done_and_cuts_partly_done_batches():
    assert plan_batches(10, 4, done=[(0, 4), (8, 10)]) == [(4, 8)]
    # Shards of another batch size: the grid batch is cut into its missing runs.
    assert plan_batches(10, 4, done=[(1, 3), (5, 6)]) == [(0, 1), (3, 4), (4, 5), (6, 8), (8, 10)]
    assert plan_batches(6, 3, done=[(0, 6)]) == []
    assert merge_ranges([(4, 6), (0, 2), (2, 3), (5, 8)]) == [(0, 3), (4, 8)]


def test_npz_streaming_equals_savez_and_is_verified(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, (10,)).astype(np.int64)
    path = str(tmp_path / "a.npz")
    write_npz_streaming(path, [
        ("arr_0", np.uint8, images.shape, lambda: (images[i:i + 3] for i in range(0, 10, 3))),
        ("arr_1", np.int64, labels.shape, lambda: iter([labels[:5], labels[5:]])),
    ])
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0", "arr_1"]
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    expected = {"arr_0": (np.uint8, images.shape), "arr_1": (np.int64, labels.shape)}
    assert verify_npz(path, expected) is None
    assert np.array_equal(np.asarray(npz_array(path, "arr_0")), images)
    assert isinstance(npz_array(path, "arr_0"), np.memmap)
    assert "expected uint8 (11, 4, 4, 3)" in verify_npz(path, {"arr_0": (np.uint8, (11, 4, 4, 3)),
                                                             "arr_1": (np.int64, (10,))})
    # A flipped byte in the data fails the CRC; a cut file fails to open.
    data = bytearray(open(path, "rb").read())
    data[200] ^= 0xFF
    open(tmp_path / "b.npz", "wb").write(bytes(data))
    assert "CRC" in verify_npz(str(tmp_path / "b.npz"), expected)
    open(tmp_path / "c.npz", "wb").write(bytes(data[: len(data) // 2]))
    assert verify_npz(str(tmp_path / "c.npz"), expected) is not None
    # Without reading the data (the recorded sizes): the whole file passes, the cut one fails.
    assert verify_npz(path, expected, read_data=False) is None
    assert verify_npz(str(tmp_path / "c.npz"), expected, read_data=False) is not None
    # Wrong number of rows written: refused while writing.
    with pytest.raises(RuntimeError, match="expected"):
        write_npz_streaming(str(tmp_path / "d.npz"), [("arr_0", np.uint8, (11, 4, 4, 3), lambda: iter([images]))])


def test_npz_array_of_compressed_file_loads(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    np.savez_compressed(tmp_path / "c.npz", a)
    assert np.array_equal(npz_array(str(tmp_path / "c.npz")), a)
    with pytest.raises(KeyError):
        npz_array(str(tmp_path / "c.npz"), "arr_1")


def test_fingerprint_difference_names_the_flag():
    old = {"script": "image_sample", "guide_scale": 1.5, "seed": 0, "model_path sha256": "a" * 64}
    assert describe_difference(old, dict(old, guide_scale=1.1)) == "--guide_scale (1.5 there, 1.1 now)"
    assert describe_difference(old, dict(old, script="classifier_sample")).startswith(
        "the script (scripts/image_sample.py made them, this is scripts/classifier_sample.py)")
    assert describe_difference(old, dict(old, **{"model_path sha256": "b" * 64})).startswith(
        "--model_path (the file's contents differ")
    assert fingerprint_digest(old) == fingerprint_digest(dict(reversed(list(old.items()))))
    assert fingerprint_digest(old) != fingerprint_digest(dict(old, seed=1))


def _model(**overrides):
    flags = tiny_flags(**overrides)
    keys = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
            "attention_resolutions", "num_heads", "num_head_channels", "use_scale_shift_norm",
            "resblock_updown", "num_classes")
    with th.device("meta"):
        return create_model(**{k: flags[k] for k in keys})


@pytest.mark.parametrize(
    "ckpt_flags,flags,hint",
    [
        (dict(learn_sigma=False), dict(), "probably --learn_sigma (the checkpoint outputs 3 channels: --learn_sigma False)"),
        (dict(class_cond=True, num_classes=10), dict(class_cond=True, num_classes=1000),
         "probably --num_classes (the checkpoint has 10 classes)"),
        (dict(class_cond=True), dict(), "probably --class_cond (the checkpoint is class-conditional: --class_cond True)"),
        (dict(resblock_updown=True), dict(), "probably --resblock_updown (--resblock_updown True fits the checkpoint)"),
        (dict(), dict(resblock_updown=True), "probably --resblock_updown (--resblock_updown False fits the checkpoint)"),
        (dict(use_scale_shift_norm=False), dict(), "probably --use_scale_shift_norm (--use_scale_shift_norm False fits"),
        (dict(channel_mult="1,2"), dict(), "probably --num_channels or --channel_mult (layer widths differ)"),
        (dict(channel_mult="1,1,1"), dict(), "probably --num_res_blocks or --channel_mult"),
        (dict(num_head_channels=16), dict(), None),  # heads do not change any shape: loads
    ],
)
def test_mismatch_hints(ckpt_flags, flags, hint):
    state = _model(**ckpt_flags).state_dict()
    model = _model(**flags)
    if hint is None:
        check_state_dict(model, state, "x.pt")
        return
    with pytest.raises(UsageError) as e:
        check_state_dict(model, state, "x.pt")
    message = str(e.value)
    assert message.startswith("x.pt (--model_path) does not match the flags: ")
    assert hint in message and "\n" not in message


def test_mismatch_super_resolution_and_uncond_hint():
    defaults = sr_model_and_diffusion_defaults()
    defaults.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1,
                    attention_resolutions="8", num_heads=2)
    with th.device("meta"):
        sr, _ = sr_create_model_and_diffusion(**defaults)
    plain = _model(image_size=64, channel_mult="", attention_resolutions="8")
    with pytest.raises(UsageError, match="; wrong script: this is a super-resolution checkpoint, use scripts/super_res_sample.py$"):
        check_state_dict(plain, sr.state_dict(), "sr.pt")
    with pytest.raises(UsageError, match="the unconditional model is 256x256_diffusion_uncond.pt"):
        check_state_dict(_model(), _model(class_cond=True).state_dict(), "models/256x256_diffusion.pt")


def test_load_checkpoint_refuses_non_state_dicts(tmp_path):
    th.save(th.zeros(3), tmp_path / "tensor.pt")
    th.save({}, tmp_path / "empty.pt")
    th.save({"model": {"w": th.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(UsageError, match="holds a Tensor, not a state_dict"):
        load_checkpoint(str(tmp_path / "tensor.pt"))
    with pytest.raises(UsageError, match=r"is not a model state_dict \(top-level keys: none\)"):
        load_checkpoint(str(tmp_path / "empty.pt"))
    with pytest.raises(UsageError, match=r"is not a model state_dict \(top-level keys: model\)"):
        load_checkpoint(str(tmp_path / "nested.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match="it is truncated or not a PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(UsageError, match="download it with: python scripts/download_models.py lsun_cat"):
        load_checkpoint(str(tmp_path / "lsun_cat.pt"))


def test_to_uint8_truncates_and_refuses_nan():
    x = th.tensor([-1.5, -1.0, -0.2, 0.0, 0.999, 2.0]).view(1, 1, 1, 6).repeat(1, 3, 1, 1)
    got = to_uint8(x)[0, 0, :, 0].tolist()
    assert got == [0, 0, int(0.8 * 127.5), 127, int(1.999 * 127.5), 255]
    x[0, 1, 0, 2] = float("inf")
    with pytest.raises(UsageError, match="1 NaN/inf values in the sampled batch at positions 4..4"):
        to_uint8(x, [4])


def test_grid_and_attention_pictures(tmp_path):
    images = np.stack([np.full((4, 4, 3), i * 20, dtype=np.uint8) for i in range(5)])
    grid = make_grid(images, pad=1)
    assert grid.shape == (1 + 2 * 5, 1 + 3 * 5, 3)
    assert (grid[1:5, 6:10] == 20).all() and (grid[0] == 255).all()
    save_grid(str(tmp_path / "g.png"), images)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] >= 256

    recorder = AttentionMaskRecorder(str(tmp_path / "masks"), guided=list(range(10)), max_steps=4,
                                     max_samples=2, timestep_map=list(range(0, 1000, 100)))
    assert recorder.steps == [9, 6, 3, 0]
    for index in range(9, -1, -1):
        out = {"sample": th.zeros(3, 3, 8, 8)}
        if index % 2 == 0 or index == 9:
            out.update(sag_xstart=th.zeros(3, 3, 8, 8), sag_mask=th.ones(3, 3, 8, 8),
                       sag_degraded_xstart=th.zeros(3, 3, 8, 8))
        recorder(index, out)
    paths = recorder.save(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    assert [os.path.basename(p) for p in paths] == ["step_0009_t0900.png", "step_0006_t0600.png",
                                                    "step_0000_t0000.png"]
    picture = np.asarray(Image.open(paths[0]))
    assert picture.shape[0] > picture.shape[1] / 4  # 2 rows, 4 columns


def test_read_shard_flags(tmp_path):
    """The flags a shard records; {} for a missing, damaged or flag-less file.
    (The format of the shards the sampler really writes is checked on a
    killed run's shards in test_sampling.py.)"""
    from improved_diffusion.run.shards import read_shard_flags

    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((1, 2, 2, 3), np.uint8),
             flags=np.frombuffer(b'{"seed": 4}', dtype=np.uint8))
    assert read_shard_flags(str(path)) == {"seed": 4}
    assert read_shard_flags(str(tmp_path / "missing.npz")) == {}
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert read_shard_flags(str(tmp_path / "junk.npz")) == {}
    np.savez(tmp_path / "noflags.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    assert read_shard_flags(str(tmp_path / "noflags.npz")) == {}
