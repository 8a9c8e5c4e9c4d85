"""The training recipe behind the default model, checked against hand-computed
values: lr warm-up and cosine decay, EMA warm-up, the in-memory data order,
and `scripts/image_train.py` end to end: a run killed mid-way and resumed
ends with the same weights, EMA and optimizer state as an uninterrupted run."""

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import env_for, kill_when, record_applied_lrs
import torch as th
from PIL import Image

from improved_diffusion import logger
from improved_diffusion.image_datasets import load_data
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.train_util import TrainLoop, ema_decay, learning_rate

ROOT = Path(__file__).resolve().parents[1]

# learning_rate(step, 2e-3, warmup_steps=2, cosine_steps=4, final=1e-4), by hand:
#   step 0: cosine at 0 -> 2e-3, warm-up factor 1/2     -> 1.0e-3
#   step 1: 1e-4 + 1.9e-3 * (1 + cos(pi/4)) / 2         -> 1.7217514421e-3
#   step 2: 1e-4 + 1.9e-3 * (1 + cos(pi/2)) / 2         -> 1.05e-3
#   step 3: 1e-4 + 1.9e-3 * (1 + cos(3pi/4)) / 2        -> 3.782485579e-4
#   step 4 and after: the final value                   -> 1e-4
HAND_LR = [1.0e-3, 1.7217514421e-3, 1.05e-3, 3.782485579e-4, 1e-4, 1e-4]


def test_learning_rate_by_hand():
    got = [learning_rate(s, 2e-3, warmup_steps=2, cosine_steps=4, final=1e-4) for s in range(6)]
    assert got == pytest.approx(HAND_LR, rel=1e-9)
    # upstream: constant, or linear to zero over lr_anneal_steps
    assert learning_rate(7, 1e-4) == 1e-4
    assert [learning_rate(s, 1e-3, anneal_steps=4) for s in range(5)] == pytest.approx(
        [1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    # warm-up alone: (step + 1) / warmup_steps, then flat
    assert [learning_rate(s, 1.0, warmup_steps=4) for s in range(6)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_ema_decay_by_hand():
    # min(rate, (1 + n) / (10 + n))
    assert ema_decay(0.9995, 0) == pytest.approx(0.1)
    assert ema_decay(0.9995, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9995, 90) == pytest.approx(0.91)
    assert ema_decay(0.9995, 17990) == pytest.approx(0.9995)  # 17991/18000 > rate
    assert ema_decay(0.9, 100) == 0.9


@pytest.fixture
def fresh_logger(tmp_path, single_process, own_logger):
    """A single-process run logging progress.csv into tmp_path (returned)."""
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    return tmp_path


def tiny_loop(**kw):
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, channel_mult="1", num_res_blocks=1,
                 attention_resolutions="8", num_heads=2, diffusion_steps=50)
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    g = th.Generator().manual_seed(1)
    batch = th.rand(4, 3, 8, 8, generator=g) * 2 - 1

    def data():
        while True:
            yield batch.clone(), {}

    params = dict(model=model, diffusion=diffusion, data=data(), batch_size=4, microbatch=-1,
                  lr=2e-3, ema_rate="0.9995", log_interval=1, save_interval=1000,
                  resume_checkpoint="")
    params.update(kw)
    return TrainLoop(**params)


def _flat(params):
    return th.cat([p.detach().reshape(-1).double() for p in params])


def test_ema_warmup_follows_the_hand_formula(fresh_logger):
    loop = tiny_loop(ema_warmup=True, max_steps=1)
    p0 = _flat(loop.mp_trainer.master_params)
    loop.run_loop()
    p1 = _flat(loop.mp_trainer.master_params)
    loop.max_steps = 2
    loop.run_loop()
    p2 = _flat(loop.mp_trainer.master_params)
    e1 = 0.1 * p0 + 0.9 * p1  # decay 1/10 after 0 steps
    e2 = (2 / 11) * e1 + (9 / 11) * p2  # decay 2/11 after 1 step
    assert not th.allclose(p1, p2)
    assert th.allclose(_flat(loop.ema_params[0]), e2, rtol=0, atol=1e-6)


def test_scheduled_lr_reaches_the_optimizer(fresh_logger):
    loop = tiny_loop(lr_warmup_steps=2, lr_cosine_steps=4, lr_final=1e-4, max_steps=6)
    seen = record_applied_lrs(loop)  # the lr each optimizer step applies
    loop.run_loop()
    assert seen == pytest.approx(HAND_LR, rel=1e-9)


def _write_pngs(folder, n=12, size=8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{'ab'[i % 2]}_{i:03d}.png")
    return folder


def test_in_memory_batches_depend_only_on_seed_and_position(tmp_path, single_process):
    data_dir = _write_pngs(tmp_path / "imgs")

    def batches(start, count, seed=3):
        gen = load_data(data_dir=str(data_dir), batch_size=4, image_size=8, class_cond=True,
                        in_memory=True, seed=seed, start_batch=start)
        return [next(gen) for _ in range(count)]

    full = batches(0, 7)  # 3 batches an epoch: crosses two epoch boundaries
    later = batches(4, 3)
    for (xa, ya), (xb, yb) in zip(full[4:], later):
        assert th.equal(xa, xb) and th.equal(ya["y"], yb["y"])
    # each epoch is a permutation of the 12 images (with their labels)
    epoch = th.cat([x for x, _ in full[:3]])
    assert epoch.shape == (12, 3, 8, 8)
    assert len({tuple(x.flatten().tolist()) for x in epoch}) == 12
    assert not th.equal(batches(0, 1, seed=4)[0][0], full[0][0])


TRAIN_FLAGS = [
    "--image_size", "8", "--num_channels", "32", "--channel_mult", "1", "--num_res_blocks", "1",
    "--attention_resolutions", "8", "--num_heads", "2", "--diffusion_steps", "50",
    "--learn_sigma", "True", "--class_cond", "True", "--dropout", "0.1",
    "--batch_size", "4", "--lr", "2e-3", "--ema_rate", "0.9995", "--ema_warmup", "True",
    "--lr_warmup_steps", "2", "--lr_cosine_steps", "5", "--lr_final", "1e-4",
    "--data_in_memory", "True", "--seed", "7", "--log_interval", "1", "--save_interval", "3",
]


def _train_cmd(*extra):
    return [sys.executable, str(ROOT / "scripts/image_train.py"), *TRAIN_FLAGS, *extra]


def _train(logdir, *extra):
    proc = subprocess.run(_train_cmd(*extra), env=env_for(logdir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout


def test_image_train_killed_and_resumed_equals_uninterrupted(tmp_path):
    data = _write_pngs(tmp_path / "imgs")
    _train(tmp_path / "a", "--data_dir", str(data), "--max_steps", "6")

    # B runs on and on; kill it (SIGKILL, no clean-up) once step 3 is saved.
    saved = tmp_path / "b" / "opt000003.pt"
    returncode = kill_when(_train_cmd("--data_dir", str(data), "--max_steps", "100000"),
                           env_for(tmp_path / "b"), saved.exists)
    assert returncode == -signal.SIGKILL and saved.exists(), f"exit status {returncode}"

    _train(tmp_path / "c", "--data_dir", str(data), "--max_steps", "3",
           "--resume_checkpoint", str(tmp_path / "b" / "model000003.pt"))
    for name in ("model000006.pt", "ema_0.9995_000006.pt", "opt000006.pt"):
        a = th.load(tmp_path / "a" / name, weights_only=True)
        c = th.load(tmp_path / "c" / name, weights_only=True)
        if name.startswith("opt"):
            a, c = a["state"], c["state"]
            a = {(k, n): v for k, s in a.items() for n, v in s.items()}
            c = {(k, n): v for k, s in c.items() for n, v in s.items()}
        assert a.keys() == c.keys(), name
        for k in a:
            assert th.equal(th.as_tensor(a[k]), th.as_tensor(c[k])), (name, k)
    # and training moved the weights: the comparison is not between two copies of the start
    a3 = th.load(tmp_path / "b" / "model000003.pt", weights_only=True)
    a6 = th.load(tmp_path / "a" / "model000006.pt", weights_only=True)
    assert any(not th.equal(a3[k], a6[k]) for k in a3)


@pytest.mark.parametrize("extra, message", [
    (["--lr_anneal_steps", "5", "--lr_cosine_steps", "5"], "--lr_anneal_steps and --lr_cosine_steps"),
    (["--bf16_autocast", "True", "--use_fp16", "True"], "--bf16_autocast and --use_fp16"),
    (["--init_checkpoint", "nowhere.pt"], "--init_checkpoint nowhere.pt: no such file"),
    (["--seed", "1", "--data_in_memory", "False"], "add --data_in_memory True"),
    (["--norm_groups", "5"], "--norm_groups 5 must divide every block width"),
])
def test_image_train_rejects_conflicting_flags(tmp_path, extra, message):
    data = _write_pngs(tmp_path / "imgs")
    env = env_for(tmp_path / "log")
    flags = [f for f in TRAIN_FLAGS]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/image_train.py"), *flags, "--data_dir", str(data),
         *extra], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "log").exists()


def test_init_checkpoint_starts_a_new_run_from_the_weights(fresh_logger, tmp_path):
    src = tiny_loop(max_steps=2)
    src.run_loop()
    th.save(src.model.state_dict(), tmp_path / "w.pt")
    loop = tiny_loop(init_checkpoint=str(tmp_path / "w.pt"), ema_warmup=True)
    assert loop.step == 0 and loop.resume_step == 0
    assert th.equal(_flat(loop.mp_trainer.master_params), _flat(src.mp_trainer.master_params))
    assert th.equal(_flat(loop.ema_params[0]), _flat(src.mp_trainer.master_params))
    assert not loop.opt.state  # a fresh optimizer


def test_resume_bundle_with_bfloat16_optimizer_state(fresh_logger, tmp_path):
    run = tmp_path / "run"
    loop = tiny_loop(max_steps=2, save_interval=2)
    logger.configure(dir=str(run), format_strs=["csv"])
    loop.run_loop()
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_resume_bundle
    finally:
        sys.path.pop(0)
    assert make_resume_bundle.main([str(run), "2", str(tmp_path / "bundle")]) == 0
    saved = th.load(tmp_path / "bundle" / "opt000002.pt", weights_only=True)
    moments = [v for s in saved["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == th.bfloat16 for v in moments)
    assert (tmp_path / "bundle" / "step.txt").read_text().strip() == "2"
    assert make_resume_bundle.main([str(run), "3", str(tmp_path / "bundle")]) == 2

    resumed = tiny_loop(resume_checkpoint=str(tmp_path / "bundle" / "model000002.pt"))
    assert resumed.resume_step == 2
    state = resumed.opt.state_dict()["state"]
    full = th.load(run / "opt000002.pt", weights_only=True)["state"]
    for key in full:
        for name, value in full[key].items():
            if name == "step":
                continue
            got = state[key][name]
            assert got.dtype == th.float32  # cast back on loading
            assert th.equal(got, value.to(th.bfloat16).float())
