"""TrainLoop on a tiny UNet (CPU): loss goes down, checkpoints save and resume
to the same state (model, optimizer, EMA, step), and a 2-rank DDP run over
mpiexec keeps the ranks in sync."""

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import env_for, record_applied_lrs, tiny_flags
import torch as th

from improved_diffusion import logger
from improved_diffusion.script_util import create_model_and_diffusion
from improved_diffusion.train_util import (
    TrainLoop,
    find_ema_checkpoint,
    parse_resume_step_from_filename,
)

EMA = 0.9


def tiny_args(**overrides):
    """conftest's tiny flags at 8x8, one level, 100 linear steps, no learned sigmas."""
    return tiny_flags(**{**dict(image_size=8, channel_mult="1", learn_sigma=False, diffusion_steps=100,
                                timestep_respacing="", noise_schedule="linear"), **overrides})


def tiny_model_and_diffusion(seed=0, **overrides):
    th.manual_seed(seed)
    return create_model_and_diffusion(**tiny_args(**overrides))


def fixed_data(batch_size=4, seed=123):
    """An infinite iterator repeating one fixed batch (a smooth pattern)."""
    g = th.Generator().manual_seed(seed)
    base = th.linspace(-1, 1, 8)
    img = (base[None, :, None] * base[None, None, :]).expand(3, 8, 8)
    batch = (img[None] * (0.5 + 0.5 * th.rand(batch_size, 3, 1, 1, generator=g))).contiguous()

    def gen():
        while True:
            yield batch.clone(), {}

    return gen(), batch


pytestmark = pytest.mark.usefixtures("single_process", "own_logger")


def make_loop(model, diffusion, data, logdir, **kw):
    logger.configure(dir=str(logdir), format_strs=["log", "csv"])
    params = dict(
        model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=-1,
        lr=2e-3, ema_rate=str(EMA), log_interval=1, save_interval=2,
        resume_checkpoint="",
    )
    params.update(kw)
    return TrainLoop(**params)


def eval_loss(model, diffusion, batch):
    """Deterministic loss: fixed timesteps and noise."""
    g = th.Generator().manual_seed(7)
    t = th.linspace(0, diffusion.num_timesteps - 1, 16).long()
    x = batch.repeat(4, 1, 1, 1)
    noise = th.randn(x.shape, generator=g)
    with th.no_grad():
        return diffusion.training_losses(model, x, t, noise=noise)["loss"].mean().item()


def test_loss_goes_down(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    data, batch = fixed_data()
    before = eval_loss(model, diffusion, batch)
    loop = make_loop(model, diffusion, data, tmp_path, max_steps=12, save_interval=1000)
    loop.run_loop()
    assert loop.step == 12
    after = eval_loss(model, diffusion, batch)
    assert after < 0.7 * before, (before, after)
    # the final checkpoint is written even though 12 is no multiple of save_interval
    assert (tmp_path / "model000012.pt").exists()
    assert (tmp_path / f"ema_{EMA}_000012.pt").exists()
    assert (tmp_path / "opt000012.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of atomic saves
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("loss", "mse", "loss_q0", "step", "samples", "steps_per_sec", "grad_norm"):
        assert key in header, header


def _params(params):
    return [p.detach().clone() for p in params]


def _assert_same(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert th.equal(a.detach(), b.detach())


def _assert_opt_same(sd_a, sd_b):
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for k in sd_a["state"]:
        for name, va in sd_a["state"][k].items():
            vb = sd_b["state"][k][name]
            assert th.equal(th.as_tensor(va), th.as_tensor(vb)), name


@pytest.mark.parametrize("use_fp16", [False, True])
def test_checkpoint_save_and_resume(tmp_path, use_fp16):
    data, _ = fixed_data()
    run_a = tmp_path / "a"

    # Run A: 2 steps, checkpoint at 2, then 2 more steps with fixed RNG.
    model, diffusion = tiny_model_and_diffusion(seed=0)
    loop_a = make_loop(model, diffusion, data, run_a, max_steps=2, use_fp16=use_fp16)
    loop_a.run_loop()
    ckpt = run_a / "model000002.pt"
    assert ckpt.exists() and (run_a / "opt000002.pt").exists()
    assert (run_a / f"ema_{EMA}_000002.pt").exists()
    assert parse_resume_step_from_filename(str(ckpt)) == 2
    assert find_ema_checkpoint(str(ckpt), 2, EMA) == str(run_a / f"ema_{EMA}_000002.pt")
    state_at_2 = (
        _params(loop_a.mp_trainer.master_params),
        _params(loop_a.ema_params[0]),
        copy.deepcopy(loop_a.opt.state_dict()),
        loop_a.mp_trainer.lg_loss_scale,
    )
    th.manual_seed(99)
    np.random.seed(99)
    loop_a.max_steps = 4
    loop_a.run_loop()
    assert loop_a.step == 4 and (run_a / "model000004.pt").exists()

    # Resume from step 2 in a fresh, differently-initialised model.
    model_b, diffusion_b = tiny_model_and_diffusion(seed=1)
    loop_b = make_loop(model_b, diffusion_b, data, tmp_path / "b", max_steps=2,
                       resume_checkpoint=str(ckpt), use_fp16=use_fp16)
    assert loop_b.resume_step == 2 and loop_b.step == 0
    _assert_same(loop_b.mp_trainer.master_params, state_at_2[0])
    _assert_same(loop_b.ema_params[0], state_at_2[1])
    _assert_opt_same(loop_b.opt.state_dict(), state_at_2[2])
    assert loop_b.mp_trainer.lg_loss_scale == state_at_2[3]
    if use_fp16:
        assert next(model_b.input_blocks.parameters()).dtype == th.float16

    # Continuing with the same RNG state reproduces run A exactly.
    th.manual_seed(99)
    np.random.seed(99)
    loop_b.run_loop()
    assert loop_b.step == 2 and loop_b.step + loop_b.resume_step == 4
    _assert_same(loop_b.mp_trainer.master_params, loop_a.mp_trainer.master_params)
    _assert_same(loop_b.ema_params[0], loop_a.ema_params[0])
    _assert_opt_same(loop_b.opt.state_dict(), loop_a.opt.state_dict())
    for pa, pb in zip(model.parameters(), model_b.parameters()):
        assert th.equal(pa, pb)
    sd_a = th.load(run_a / "model000004.pt", weights_only=True)
    sd_b = th.load(tmp_path / "b" / "model000004.pt", weights_only=True)
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert th.equal(sd_a[k], sd_b[k]), k


def test_lr_anneal_and_training_test_env(tmp_path, monkeypatch):
    model, diffusion = tiny_model_and_diffusion()
    data, _ = fixed_data()
    loop = make_loop(model, diffusion, data, tmp_path, lr_anneal_steps=4, save_interval=100)
    applied = record_applied_lrs(loop)  # the lr each optimizer step applies
    loop.run_loop()
    assert loop.step == 4
    # upstream: lr * (1 - steps_done / lr_anneal_steps), lr = 2e-3
    assert applied == pytest.approx([2e-3, 1.5e-3, 1e-3, 5e-4])
    assert (tmp_path / "model000004.pt").exists()

    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")
    loop = make_loop(model, diffusion, data, tmp_path / "t", save_interval=3)
    loop.run_loop()  # returns after the first save
    assert loop.step == 3


DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch as th
    from improved_diffusion import dist_util, logger
    from improved_diffusion.script_util import create_model_and_diffusion
    from improved_diffusion.train_util import TrainLoop

    out_dir = sys.argv[1]
    args = json.loads(sys.argv[2])
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=out_dir, format_strs=["log"])
    th.manual_seed(rank)  # different inits: TrainLoop must sync them from rank 0
    model, diffusion = create_model_and_diffusion(**args)
    model.to(dist_util.dev())
    g = th.Generator().manual_seed(100 + rank)  # different data per rank

    def data():
        while True:
            yield th.rand(2, 3, 8, 8, generator=g) * 2 - 1, {}

    loop = TrainLoop(model=model, diffusion=diffusion, data=data(), batch_size=2,
                     microbatch=1, lr=1e-3, ema_rate="0.9", log_interval=1,
                     save_interval=100, resume_checkpoint="", max_steps=2)
    assert loop.use_ddp
    loop.run_loop()
    flat = th.cat([p.detach().view(-1) for p in model.parameters()])
    with open(f"{out_dir}/ddp{rank}.json", "w") as f:
        json.dump({"sum": flat.double().sum().item(), "abs": flat.double().abs().sum().item(),
                   "global_batch": loop.global_batch}, f)
    """
)


def test_ddp_two_ranks_stay_in_sync(mpiexec, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_WORKER)
    env = env_for()
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(script), str(tmp_path), json.dumps(tiny_args())],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "ddp0.json").read_text())
    r1 = json.loads((tmp_path / "ddp1.json").read_text())
    assert r0["global_batch"] == 4
    assert r0["sum"] == pytest.approx(r1["sum"], rel=1e-6, abs=1e-6)
    assert r0["abs"] == pytest.approx(r1["abs"], rel=1e-6)
    assert (tmp_path / "model000002.pt").exists()
    assert (tmp_path / "log-rank001.txt").exists()
