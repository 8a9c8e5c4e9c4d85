"""scripts/classifier_train.py on tiny data (CPU): loss goes down, checkpoints
save and resume to the same state, lr annealing, and the script itself from an
image folder, single-process with resume and over ``mpiexec -n 2``."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th

from conftest import env_for, script_module
from improved_diffusion import logger
from improved_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    read_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "classifier_train.py"
# The smallest classifier the 32x32 table allows with attention (64 channels
# at 8x8, one 64-channel head) and the attention pool.
TINY = dict(
    image_size=32, num_classes=2, classifier_width=32, classifier_depth=1,
    classifier_attention_resolutions="8", classifier_pool="attention",
    diffusion_steps=100, noise_schedule="cosine", learn_sigma=True,
)
TINY_CLI = [f"--{k}={v}" for k, v in TINY.items()]


ct = script_module("classifier_train")


pytestmark = pytest.mark.usefixtures("single_process", "own_logger")


def tiny_classifier(seed=0):
    th.manual_seed(seed)
    flags = classifier_and_diffusion_defaults()
    flags.update(TINY)
    return create_classifier_and_diffusion(**flags)


def two_class_batch(n=8, seed=3):
    """Class 0: a bright top half; class 1: a bright bottom half (plus noise)."""
    g = th.Generator().manual_seed(seed)
    labels = th.arange(n) % 2
    x = -th.ones(n, 3, 32, 32)
    for i, y in enumerate(labels.tolist()):
        if y == 0:
            x[i, :, :16] = 1.0
        else:
            x[i, :, 16:] = 1.0
    x = (x + 0.1 * th.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, labels


def fixed_data(n=8):
    x, y = two_class_batch(n)

    def gen():
        while True:
            yield x.clone(), {"y": y.clone()}

    return gen(), x, y


def make_trainer(model, diffusion, logdir, **kw):
    logger.configure(dir=str(logdir), format_strs=["log", "csv"])
    data, _, _ = fixed_data()
    params = dict(model=model, diffusion=diffusion, data=data, batch_size=8,
                  iterations=4, lr=1e-3, log_interval=1, save_interval=2)
    params.update(kw)
    return ct.ClassifierTrainer(**params)


def clean_loss(model, x, y):
    with th.no_grad():
        logits = model(x, th.zeros(len(x), dtype=th.long))
        return th.nn.functional.cross_entropy(logits, y).item()


def test_loss_goes_down(tmp_path):
    model, diffusion = tiny_classifier()
    _, x, y = fixed_data()
    before = clean_loss(model, x, y)
    trainer = make_trainer(model, diffusion, tmp_path, iterations=15, noised=False,
                           microbatch=4, save_interval=100)
    trainer.run_loop()
    assert trainer.step == 15
    after = clean_loss(model, x, y)
    assert after < 0.5 * before, (before, after)
    assert (tmp_path / "model000015.pt").exists() and (tmp_path / "opt000015.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train_loss", "train_loss_q0", "train_acc@1", "step", "samples",
                "steps_per_sec", "grad_norm", "lr"):
        assert key in header, header
    assert "train_acc@5" not in header  # only 2 classes


def test_noised_training_logs_quartiles_and_validation(tmp_path):
    model, diffusion = tiny_classifier()
    val, _, _ = fixed_data()
    np.random.seed(0)
    trainer = make_trainer(model, diffusion, tmp_path, iterations=3, val_data=val,
                           eval_interval=1, save_interval=100)
    trainer.run_loop()
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert "val_loss" in header and "val_acc@1" in header
    assert sum(k.startswith("train_loss_q") for k in header) >= 2
    assert model.training  # evaluation restores train mode


def _state(trainer):
    return ([p.detach().clone() for p in trainer.mp_trainer.master_params],
            copy.deepcopy(trainer.opt.state_dict()), trainer.mp_trainer.lg_loss_scale)


def _assert_same_params(a, b):
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert th.equal(pa.detach(), pb.detach())


def _assert_opt_same(sd_a, sd_b):
    assert sd_a["param_groups"] == sd_b["param_groups"]
    for k in sd_a["state"]:
        for name, va in sd_a["state"][k].items():
            assert th.equal(th.as_tensor(va), th.as_tensor(sd_b["state"][k][name])), name


@pytest.mark.parametrize("use_fp16", [False, True])
def test_save_and_resume_same_state(tmp_path, use_fp16):
    run_a = tmp_path / "a"
    model, diffusion = tiny_classifier(seed=0)
    card = {"image_size": 32, "num_classes": 2}
    trainer_a = make_trainer(model, diffusion, run_a, iterations=2, use_fp16=use_fp16,
                             anneal_lr=True, card_flags=card)
    np.random.seed(5)
    th.manual_seed(5)
    trainer_a.run_loop()
    ckpt = run_a / "model000002.pt"
    assert ckpt.exists() and (run_a / "opt000002.pt").exists()
    assert read_model_card(str(ckpt)) == card
    at_2 = _state(trainer_a)

    np.random.seed(99)
    th.manual_seed(99)
    trainer_a.iterations = 4
    trainer_a.run_loop()
    assert trainer_a.step == 4 and (run_a / "model000004.pt").exists()

    model_b, diffusion_b = tiny_classifier(seed=1)
    trainer_b = make_trainer(model_b, diffusion_b, tmp_path / "b", iterations=4,
                             use_fp16=use_fp16, anneal_lr=True, resume_checkpoint=str(ckpt))
    assert trainer_b.resume_step == 2 and trainer_b.step == 0
    _assert_same_params(trainer_b.mp_trainer.master_params, at_2[0])
    _assert_opt_same(trainer_b.opt.state_dict(), at_2[1])
    assert trainer_b.mp_trainer.lg_loss_scale == at_2[2]

    np.random.seed(99)
    th.manual_seed(99)
    trainer_b.run_loop()
    assert trainer_b.step == 2 and trainer_b.global_step() == 4
    _assert_same_params(trainer_b.mp_trainer.master_params, trainer_a.mp_trainer.master_params)
    _assert_opt_same(trainer_b.opt.state_dict(), trainer_a.opt.state_dict())
    sd_a = th.load(run_a / "model000004.pt", weights_only=True)
    sd_b = th.load(tmp_path / "b" / "model000004.pt", weights_only=True)
    for k in sd_a:
        assert th.equal(sd_a[k], sd_b[k]), k


def test_anneal_lr_is_linear_to_zero(tmp_path):
    model, diffusion = tiny_classifier()
    trainer = make_trainer(model, diffusion, tmp_path, iterations=4, lr=1e-3,
                           anneal_lr=True, noised=False, save_interval=100)
    lrs = []
    while trainer.global_step() < trainer.iterations:
        trainer.run_step()
        lrs.append(trainer.opt.param_groups[0]["lr"])
        logger.dumpkvs()
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_compute_top_k():
    logits = th.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3]])
    labels = th.tensor([2, 0])
    assert ct.compute_top_k(logits, labels, k=1) == 0.5
    assert ct.compute_top_k(logits, labels, k=2) == 1.0
    assert ct.compute_top_k(logits, labels, k=1, reduction="none").tolist() == [0.0, 1.0]


def write_image_folder(root, n_per_class=4):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    x, y = two_class_batch(2 * n_per_class)
    arr = ((x + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).numpy()
    for i, (img, label) in enumerate(zip(arr, y.tolist())):
        Image.fromarray(img).save(root / f"{'top' if label == 0 else 'bottom'}_{i:03d}.png")
    return root


def test_script_trains_and_resumes_from_folder(tmp_path):
    data = write_image_folder(tmp_path / "data")
    cmd = [sys.executable, str(SCRIPT), "--data_dir", str(data), "--val_data_dir", str(data),
           "--batch_size", "4", "--log_interval", "1", "--eval_interval", "1"] + TINY_CLI
    run = tmp_path / "run"
    proc = subprocess.run(cmd + ["--iterations", "2", "--save_interval", "2"], env=env_for(run),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "model000002.pt").exists() and (run / "opt000002.pt").exists()
    card = read_model_card(str(run / "model000002.pt"))
    assert card["num_classes"] == 2 and card["classifier_width"] == 32
    assert json.loads((run / "model_flags.json").read_text())["flags"] == card

    proc = subprocess.run(
        cmd + ["--iterations", "3", "--resume_checkpoint", str(run / "model000002.pt")],
        env=env_for(tmp_path / "run2"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run2" / "model000003.pt").exists()
    log = (tmp_path / "run2" / "log.txt").read_text()
    assert "loading optimizer state" in log and "val_loss" in log


def test_script_rejects_missing_data_dir(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(tmp_path / "nope")],
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--data_dir" in proc.stderr


def test_script_two_ranks(mpiexec, tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=4)
    run = tmp_path / "run"
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(SCRIPT), "--data_dir", str(data),
         "--batch_size", "2", "--microbatch", "1", "--iterations", "2",
         "--log_interval", "1"] + TINY_CLI,
        env=env_for(run), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "model000002.pt").exists()
    assert (run / "log-rank001.txt").exists()  # rank 1 logs on its own
    rows = (run / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert float(rows[-1].split(",")[header.index("samples")]) == 2 * 2 * 2  # global batch 4
