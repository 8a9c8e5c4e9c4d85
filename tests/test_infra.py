"""Tests of the infrastructure modules: logger, dist_util (incl. real 2-rank runs),
image_datasets, resample, losses and fp16_util.  CPU only."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch as th
import torch.nn as nn
from PIL import Image

from conftest import env_for, reserved_port
from improved_diffusion import dist_util, logger
from improved_diffusion.fp16_util import (
    MixedPrecisionTrainer,
    get_param_groups_and_shapes,
    make_master_params,
    master_params_to_model_params,
    unflatten_master_params,
)
from improved_diffusion.image_datasets import center_crop_arr, load_data, random_crop_arr
from improved_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from improved_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


@pytest.fixture
def clean_logger(tmp_path, own_logger):
    """A quiet logger of the test's own (own_logger restores the previous one after)."""
    logger.configure(dir=str(tmp_path / "quiet_log"), format_strs=[])


# ---------------------------------------------------------------------------
# logger
# ---------------------------------------------------------------------------


def test_logger_writes_log_csv_json(tmp_path, clean_logger):
    logdir = tmp_path / "logs"
    logger.configure(dir=str(logdir), format_strs=["log", "csv", "json"])
    assert logger.get_dir() == str(logdir)
    logger.log("hello", 42)
    logger.logkv("a", 1)
    logger.logkv_mean("m", 1.0)
    logger.logkv_mean("m", 3.0)
    out = logger.dumpkvs()
    assert out == {"a": 1, "m": 2.0}
    logger.logkv("a", 2)
    logger.logkv("b", np.float32(0.5))  # a new key: the csv header grows
    logger.dumpkvs()
    logger.set_level(logger.WARN)
    logger.log("hidden")
    logger.warn("shown")
    logger.Logger.CURRENT.close()

    text = (logdir / "log.txt").read_text()
    assert "Logging to" in text and "hello 42" in text and "shown" in text
    assert "hidden" not in text
    assert "| m " in text

    rows = (logdir / "progress.csv").read_text().splitlines()
    assert rows == ["a,m,b", "1,2.0,", "2,,0.5"]

    records = [json.loads(line) for line in (logdir / "progress.json").read_text().splitlines()]
    assert records == [{"a": 1, "m": 2.0}, {"a": 2, "b": 0.5}]


def test_logger_continues_the_files_of_an_earlier_run(tmp_path, clean_logger):
    """A resumed run logging into the same folder keeps the rows before it."""
    logdir = tmp_path / "logs"
    logger.configure(dir=str(logdir), format_strs=["log", "csv", "json"])
    logger.log("first run")
    logger.logkv("step", 1)
    logger.logkv("loss", 0.5)
    logger.dumpkvs()
    logger.Logger.CURRENT.close()
    logger.configure(dir=str(logdir), format_strs=["log", "csv", "json"])
    logger.log("second run")
    logger.logkv("step", 2)
    logger.logkv("loss", 0.25)
    logger.logkv("lr", 1e-3)  # a key the first run did not have
    logger.dumpkvs()
    logger.Logger.CURRENT.close()

    text = (logdir / "log.txt").read_text()
    assert text.index("first run") < text.index("second run")
    rows = (logdir / "progress.csv").read_text().splitlines()
    assert rows == ["loss,step,lr", "0.5,1,", "0.25,2,0.001"]
    records = [json.loads(line) for line in (logdir / "progress.json").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def test_logger_env_dir_and_rank_suffix(tmp_path, clean_logger, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "envdir"))
    monkeypatch.setenv("PMI_RANK", "3")
    logger.configure(format_strs=["log"])
    assert logger.get_dir() == str(tmp_path / "envdir")
    assert (tmp_path / "envdir" / "log-rank003.txt").exists()

    monkeypatch.delenv("OPENAI_LOGDIR")
    monkeypatch.delenv("PMI_RANK")
    with logger.scoped_configure(format_strs=[]):
        d = logger.get_dir()
        assert Path(d).parent == Path(__import__("tempfile").gettempdir())
        assert Path(d).name.startswith("openai-")
    assert logger.get_dir() == str(tmp_path / "envdir")
    os.rmdir(d)


# ---------------------------------------------------------------------------
# dist_util, single process
# ---------------------------------------------------------------------------


class NotAllowedInCheckpoints:
    pass


def test_dist_single_process(tmp_path, single_process):
    dist_util.setup_dist()
    assert dist_util.get_rank() == 0
    assert dist_util.get_world_size() == 1
    assert dist_util.local_rank() == 0
    assert dist_util.is_main_process()
    if not th.cuda.is_available():
        assert dist_util.dev() == th.device("cpu")
    dist_util.barrier()  # no-op
    p = th.ones(3)
    dist_util.sync_params([p])
    assert th.equal(p, th.ones(3))

    path = tmp_path / "sd.pt"
    th.save({"w": th.arange(4.0)}, path)
    sd = dist_util.load_state_dict(str(path), map_location="cpu")
    assert th.equal(sd["w"], th.arange(4.0))

    th.save({"obj": NotAllowedInCheckpoints()}, tmp_path / "bad.pt")
    with pytest.raises(Exception):  # weights_only=True refuses arbitrary pickles
        dist_util.load_state_dict(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError):
        dist_util.load_state_dict(str(path), weights_only=False)


def test_dist_timeout_env(monkeypatch):
    monkeypatch.setenv(dist_util.TIMEOUT_ENV_VAR, "7.5")
    assert dist_util.get_timeout().total_seconds() == 7.5
    monkeypatch.delenv(dist_util.TIMEOUT_ENV_VAR)
    assert dist_util.get_timeout().total_seconds() == 60


# ---------------------------------------------------------------------------
# dist_util, real multi-process runs
# ---------------------------------------------------------------------------

MPI_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch as th
    import torch.distributed as dist
    from improved_diffusion import dist_util, logger
    from improved_diffusion.resample import LossSecondMomentResampler

    out_dir, ckpt = sys.argv[1], sys.argv[2]
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()

    x = th.tensor([float(rank + 1)])
    dist.all_reduce(x)

    # Only rank 0 reads the file; the other ranks get a path that does not exist.
    path = ckpt if rank == 0 else ckpt + ".missing"
    sd = dist_util.load_state_dict(path, map_location="cpu")

    p = th.full((2,), float(rank))
    dist_util.sync_params([p])

    class D:
        num_timesteps = 4
    sampler = LossSecondMomentResampler(D(), history_per_term=2)
    n = 3 if rank == 0 else 2  # unequal batch sizes across ranks
    sampler.update_with_local_losses(th.arange(n), th.full((n,), float(rank + 1)))

    from mpi4py import MPI
    logger.configure(dir=out_dir, format_strs=[], comm=MPI.COMM_WORLD)
    logger.logkv_mean("v", float(rank))
    kvs = logger.dumpkvs()

    dist_util.barrier()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({
            "rank": rank, "world": world, "local_rank": dist_util.local_rank(),
            "allreduce": x.item(), "w": sd["w"].tolist(), "p": p.tolist(),
            "hist": sampler._loss_history.tolist(), "counts": sampler._loss_counts.tolist(),
            "kvs": kvs, "device": str(dist_util.dev()),
        }, f)
    """
)


def test_mpiexec_two_ranks_agree(mpiexec, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(MPI_WORKER)
    ckpt = tmp_path / "ckpt.pt"
    th.save({"w": th.arange(5.0) * 3}, ckpt)
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(script), str(tmp_path), str(ckpt)],
        env=env_for(IMPROVED_DIFFUSION_DIST_TIMEOUT=20),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world"] == r1["world"] == 2
    assert (r0["local_rank"], r1["local_rank"]) == (0, 1)
    assert r0["allreduce"] == r1["allreduce"] == 3.0
    assert r0["w"] == r1["w"] == [0.0, 3.0, 6.0, 9.0, 12.0]
    assert r0["p"] == r1["p"] == [0.0, 0.0]
    assert r0["hist"] == r1["hist"]
    assert r0["counts"] == r1["counts"] == [2, 2, 1, 0]
    assert r0["kvs"] == {"v": 0.5}  # averaged over the comm on rank 0
    assert r0["device"] == r1["device"] == "cpu"


DEATH_WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch as th
    import torch.distributed as dist
    from improved_diffusion import dist_util

    dist_util.setup_dist()
    if dist_util.get_rank() == 1:
        if sys.argv[1] == "die":
            os._exit(1)
        time.sleep(120)  # "hang": alive but never joins the collective
    time.sleep(0.5)
    dist.all_reduce(th.ones(4))
    print("rank 0 finished the collective", flush=True)
    """
)


def test_mpiexec_dead_rank_does_not_hang(mpiexec, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DEATH_WORKER)
    # A hang would run into the subprocess timeout (TimeoutExpired fails the
    # test); no assertion on how long the launcher took to notice.
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(script), "die"],
        env=env_for(IMPROVED_DIFFUSION_DIST_TIMEOUT=10),
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "finished the collective" not in proc.stdout


def test_torchrun_env_stuck_rank_times_out(tmp_path):
    """torchrun-style env vars; rank 1 stays alive but never joins: rank 0 must
    fail after the process-group timeout rather than hang."""
    script = tmp_path / "stuck.py"
    script.write_text(DEATH_WORKER)
    with reserved_port() as port:  # held until the store has bound it
        common = dict(
            WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            IMPROVED_DIFFUSION_DIST_TIMEOUT=5, CUDA_VISIBLE_DEVICES="",
        )
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), "hang"],
                env=env_for(RANK=r, LOCAL_RANK=r, **common),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for r in (0, 1)
        ]
        try:
            # Rank 1 sleeps 120 s before it joins: rank 0 returning within
            # 90 s means it gave up on its own (the error says why).
            out, err = procs[0].communicate(timeout=90)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.communicate()
    assert procs[0].returncode != 0, out + err
    assert "finished the collective" not in out
    assert "Timed out" in err or "timeout" in err.lower(), err[-2000:]


# ---------------------------------------------------------------------------
# image_datasets
# ---------------------------------------------------------------------------

COLORS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "eel": (0, 0, 255)}


def _make_image_folder(root):
    root.mkdir()
    (root / "sub").mkdir()
    sizes = [(40, 30), (17, 23), (64, 64)]
    for name, color in COLORS.items():
        for i, size in enumerate(sizes[:2]):
            folder = root / "sub" if (name == "eel" and i == 1) else root
            Image.new("RGB", size, color).save(folder / f"{name}_{i}.png")
    Image.new("RGB", sizes[2], COLORS["dog"]).save(root / "dog_x_extra.png")
    (root / "notes.txt").write_text("not an image")


def test_load_data_labels_shapes_values(tmp_path, single_process):
    data_dir = tmp_path / "imgs"
    _make_image_folder(data_dir)
    gen = load_data(data_dir=str(data_dir), batch_size=7, image_size=8,
                    class_cond=True, deterministic=True)
    batch, cond = next(gen)
    assert batch.shape == (7, 3, 8, 8) and batch.dtype == th.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    y = cond["y"]
    assert y.dtype == th.int64 and y.shape == (7,)
    assert sorted(y.tolist()) == [0, 0, 1, 1, 1, 2, 2]  # cat=0, dog=1, eel=2
    for img, label in zip(batch, y):
        channel = int(label)  # each class has a pure red/green/blue colour
        assert th.allclose(img[channel], th.ones(8, 8), atol=1e-2)
        others = [c for c in range(3) if c != channel]
        assert th.allclose(img[others], -th.ones(2, 8, 8), atol=1e-2)

    gen = load_data(data_dir=str(data_dir), batch_size=2, image_size=4)
    batch, cond = next(gen)
    assert batch.shape == (2, 3, 4, 4) and cond == {}


def test_load_data_errors_and_sharding(tmp_path, single_process, monkeypatch):
    data_dir = tmp_path / "imgs"
    _make_image_folder(data_dir)
    with pytest.raises(ValueError):
        next(load_data(data_dir=str(data_dir), batch_size=8, image_size=8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        next(load_data(data_dir=str(tmp_path / "empty"), batch_size=1, image_size=8))

    # rank 1 of 2 gets every other file, starting at the second.
    monkeypatch.setattr(dist_util, "get_rank", lambda: 1)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    _, cond = next(load_data(data_dir=str(data_dir), batch_size=3, image_size=8,
                             class_cond=True, deterministic=True))
    # sorted files: cat_0 cat_1 dog_0 dog_1 dog_x_extra eel_0 sub/eel_1
    assert cond["y"].tolist() == [0, 1, 2]


def test_crops():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (100, 300, 3), dtype=np.uint8))
    assert center_crop_arr(img, 16).shape == (16, 16, 3)
    for _ in range(5):
        assert random_crop_arr(img, 16).shape == (16, 16, 3)


# ---------------------------------------------------------------------------
# resample
# ---------------------------------------------------------------------------


class FakeDiffusion:
    def __init__(self, n):
        self.num_timesteps = n


def test_uniform_sampler():
    sampler = create_named_schedule_sampler("uniform", FakeDiffusion(10))
    assert isinstance(sampler, UniformSampler)
    t, w = sampler.sample(100, "cpu")
    assert t.dtype == th.int64 and t.min() >= 0 and t.max() < 10
    assert th.allclose(w, th.ones(100))
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("nope", FakeDiffusion(10))


def test_loss_second_moment_resampler():
    sampler = create_named_schedule_sampler("loss-second-moment", FakeDiffusion(4))
    assert isinstance(sampler, LossSecondMomentResampler)
    assert np.allclose(sampler.weights(), 1.0)  # not warmed up yet
    for _ in range(sampler.history_per_term):
        sampler.update_with_local_losses(th.arange(4), th.tensor([1.0, 2.0, 3.0, 4.0]))
    w = sampler.weights()
    expected = np.array([1.0, 2.0, 3.0, 4.0]) / 10 * (1 - 0.001) + 0.001 / 4
    assert np.allclose(w, expected)
    np.random.seed(0)
    t, weights = sampler.sample(1000, "cpu")
    assert np.allclose(weights.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)
    # higher-loss timesteps are drawn more often
    counts = np.bincount(t.numpy(), minlength=4)
    assert counts[3] > counts[0]
    # history shifts once full
    sampler.update_with_local_losses(th.tensor([0]), th.tensor([9.0]))
    assert sampler._loss_history[0, -1] == 9.0 and sampler._loss_counts[0] == 10


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------


def test_normal_kl():
    assert normal_kl(th.tensor(0.0), 0.0, 0.0, 0.0).item() == 0.0
    assert math.isclose(normal_kl(th.tensor(1.0), 0.0, 0.0, 0.0).item(), 0.5, rel_tol=1e-6)
    # KL(N(1, 4) || N(0, 1)) = 0.5 * (-1 + 0 - log 4 + 4 + 1)
    got = normal_kl(th.tensor([1.0]), math.log(4.0), 0.0, th.tensor([0.0]))
    assert math.isclose(got.item(), 0.5 * (4 - math.log(4.0)), rel_tol=1e-6)
    # broadcasting a batch against scalars
    assert normal_kl(th.zeros(2, 3), 0.0, 0.0, 0.0).shape == (2, 3)
    with pytest.raises(Exception):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def _approx_cdf(x):
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_approx_standard_normal_cdf():
    x = th.linspace(-4, 4, 81, dtype=th.float64)
    got = approx_standard_normal_cdf(x)
    exact = 0.5 * (1 + th.erf(x / math.sqrt(2)))
    assert th.allclose(got, exact, atol=1e-3)
    assert approx_standard_normal_cdf(th.zeros(1)).item() == 0.5


def test_discretized_gaussian_log_likelihood():
    x = th.tensor([-1.0, 0.0, 1.0, 0.5], dtype=th.float64)
    means = th.tensor([0.0, 0.0, 0.0, 0.25], dtype=th.float64)
    log_scales = th.tensor([0.0, 0.0, math.log(0.5), math.log(0.1)], dtype=th.float64)
    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    expected = []
    for xi, mi, li in zip(x.tolist(), means.tolist(), log_scales.tolist()):
        inv = math.exp(-li)
        plus = _approx_cdf(inv * (xi - mi + 1 / 255))
        minus = _approx_cdf(inv * (xi - mi - 1 / 255))
        if xi < -0.999:
            expected.append(math.log(max(plus, 1e-12)))
        elif xi > 0.999:
            expected.append(math.log(max(1 - minus, 1e-12)))
        else:
            expected.append(math.log(max(plus - minus, 1e-12)))
    assert th.allclose(got, th.tensor(expected, dtype=th.float64), rtol=1e-9, atol=1e-12)
    with pytest.raises(AssertionError):
        discretized_gaussian_log_likelihood(x, means=means[:2], log_scales=log_scales)


# ---------------------------------------------------------------------------
# fp16_util
# ---------------------------------------------------------------------------


class TinyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.dtype = th.float32

    def convert_to_fp16(self):
        self.lin.half()
        self.dtype = th.float16

    def forward(self, x):
        return self.lin(x.to(self.dtype)).float()


def _regression_data():
    g = th.Generator().manual_seed(0)
    x = th.randn(64, 4, generator=g)
    y = x @ th.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.25
    return x, y


@pytest.mark.parametrize("use_fp16", [False, True])
def test_mixed_precision_trainer_decreases_loss(use_fp16, clean_logger):
    th.manual_seed(0)
    model = TinyLinear()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=use_fp16, initial_lg_loss_scale=8.0)
    opt = th.optim.AdamW(trainer.master_params, lr=0.05)
    x, y = _regression_data()
    losses = []
    for _ in range(30):
        trainer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        trainer.backward(loss)
        assert trainer.optimize(opt)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    kvs = logger.dumpkvs()
    assert kvs["grad_norm"] > 0 and kvs["param_norm"] > 0
    if use_fp16:
        assert model.lin.weight.dtype == th.float16
        assert all(p.dtype == th.float32 for p in trainer.master_params)
        assert trainer.lg_loss_scale == pytest.approx(8.0 + 30 * 1e-3)
        assert "lg_loss_scale" in kvs
        # the fp16 model mirrors the fp32 master weights
        flat = th.cat([p.view(-1) for p in trainer.master_params])
        model_flat = th.cat([model.lin.bias.float().view(-1), model.lin.weight.float().view(-1)])
        assert th.allclose(flat, model_flat, atol=1e-2)

    # state-dict round trip
    sd = trainer.master_params_to_state_dict(trainer.master_params)
    assert sd["lin.weight"].dtype == th.float32
    back = trainer.state_dict_to_master_params(sd)
    for a, b in zip(back, trainer.master_params):
        assert th.equal(a.detach(), b.detach())


def test_fp16_overflow_skips_step(clean_logger):
    th.manual_seed(0)
    model = TinyLinear()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=40.0)
    opt = th.optim.AdamW(trainer.master_params, lr=0.1)
    before = [p.detach().clone() for p in trainer.master_params]
    x, y = _regression_data()
    trainer.zero_grad()
    trainer.backward(((model(x) - y) ** 2).mean())  # 2**40 overflows fp16 grads
    assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == 39.0
    for a, b in zip(before, trainer.master_params):
        assert th.equal(a, b.detach())
        assert b.grad is None


def test_master_param_flattening_roundtrip():
    model = nn.Sequential(nn.Linear(3, 2), nn.Conv2d(2, 2, 1))
    groups = get_param_groups_and_shapes(model.named_parameters())
    assert [len(g) for g, _ in groups] == [2, 2]  # biases / weights
    master = make_master_params(groups)
    assert master[0].shape == (4,) and master[1].shape == (1, 6 + 4)
    with th.no_grad():
        for m in master:
            m.add_(1.0)
    expected = [p.detach() + 1 for _, p in groups[1][0]]
    master_params_to_model_params(groups, iter(master))
    assert all(th.equal(p.detach(), e) for (_, p), e in zip(groups[1][0], expected))
    unflat = unflatten_master_params(groups[0][0], master[0].view(-1))
    assert [u.shape for u in unflat] == [(2,), (2,)]
