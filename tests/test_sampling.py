"""
The sampling scripts run as users run them: real ``mpiexec -n 2`` on CPU,
a crash and a resume, and every bad input giving one line and no npz.

Tiny random checkpoints are made in tmp dirs (tests/conftest.py tiny_flags).
"""

import glob
import hashlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch as th

from conftest import (
    ROOT,
    TINY,
    die_while_writing,
    env_for,
    error_lines,
    load_npz,
    script_module,
    needs_mpi,
    npz_files,
    reserved_port,
    run_in_process,
    run_script,
    tiny_model,
)
from improved_diffusion.run.shards import read_shard_flags


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs share 2 cores with the subprocesses and other jobs."""
    before = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(before)


# ---------------------------------------------------------------------------
# mpiexec -n 2: exact, complete, reproducible; a crash half-way and a resume
# ---------------------------------------------------------------------------

RUN_FLAGS = TINY + " --class_cond True --num_classes 10 --timestep_respacing 40 --num_samples 15 --seed 3"


@pytest.fixture(scope="module")
def reference(ckpts, tmp_path_factory):
    """One plain process, batch size 4, with the SAG pictures."""
    out = tmp_path_factory.mktemp("single")
    res = run_script("image_sample.py",
                     f"{RUN_FLAGS} --model_path {ckpts['cond']} --batch_size 4 --save_attention_masks True",
                     out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.fixture(scope="module")
def mpi_full(ckpts, tmp_path_factory):
    """mpiexec -n 2, batch size 2: 8 batches (the last of one sample), 4 per rank."""
    out = tmp_path_factory.mktemp("mpi_full")
    res = run_script("image_sample.py", f"{RUN_FLAGS} --model_path {ckpts['cond']} --batch_size 2",
                     out, ranks=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, res


def test_single_process_outputs(reference):
    out, res = reference
    (path,) = npz_files(out)
    assert os.path.basename(path) == "samples_15x16x16x3.npz"
    assert res.stdout.strip().splitlines()[-1] == path
    data = load_npz(path)
    assert list(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].shape == (15, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].shape == (15,) and data["arr_1"].dtype == np.int64
    want = [int(th.randint(0, 10, (1,), generator=th.Generator().manual_seed(3 + p))) for p in range(15)]
    assert data["arr_1"].tolist() == want  # labels from seed + p
    assert os.path.exists(os.path.join(out, "samples_15x16x16x3.png"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["seed"] == 3 and config["world_size"] == 1
    assert config["flags"]["batch_size"] == 4 and config["flags"]["guide_scale"] == 1.5
    assert {"torch", "numpy", "python"} <= set(config["versions"])
    masks = sorted(os.listdir(os.path.join(out, "attention_masks")))
    assert len(masks) == 4 and all(m.endswith(".png") for m in masks)
    assert not os.path.exists(os.path.join(out, "shards"))


@needs_mpi
def test_mpi_two_ranks_same_npz_exact_count_distinct(reference, mpi_full):
    (single,) = npz_files(reference[0])
    out, res = mpi_full
    (path,) = npz_files(out)
    assert res.stdout.strip().splitlines()[-1] == path
    a, b = load_npz(single), load_npz(path)
    assert b["arr_0"].shape == (15, 16, 16, 3)  # 15 = 3 * (2 ranks x 2) + 3
    assert np.array_equal(a["arr_1"], b["arr_1"])
    # Other batch size: batched convolutions may round differently in the last
    # float bit; the contract is equality up to that (here it is exact).
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    rows = b["arr_0"].reshape(15, -1)
    assert len({r.tobytes() for r in rows}) == 15  # every position is its own sample
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["world_size"] == 2
    assert config["session"]["positions_sampled"] == 15
    assert not os.path.exists(os.path.join(out, "shards"))


@needs_mpi
def test_mpi_killed_run_resumes_to_same_npz(ckpts, mpi_full, tmp_path):
    flags = f"{RUN_FLAGS} --model_path {ckpts['cond']} --batch_size 2"
    out = tmp_path / "crash"
    # 15 positions in 8 batches of 2 (the last of 1), dealt 0,2,4,6 to rank 0
    # and 1,3,5,7 to rank 1. Each rank writes 3 shards; once both have, both
    # die half-way through their fourth (SIGKILL, from inside, at that point).
    res = die_while_writing(f"shard_together 3 {tmp_path / 'rendezvous'}", "image_sample", flags, out,
                            ranks=2)
    assert res.returncode != 0
    assert not npz_files(out)
    shards = sorted(os.listdir(out / "shards"))
    held = sorted(s for s in shards if s.startswith("shard_"))
    assert [s.split("_")[-1] for s in held] == [
        f"{2 * b:09d}-{2 * b + 2:09d}.npz" for b in range(6)], shards
    assert not [s for s in shards if s.endswith(".npz") and not s.startswith("shard_")]
    # What the sampler wrote: plain zips of .npy members, loadable without
    # pickle; the positions they hold, labels and the run's flags.
    for name in held:
        path = out / "shards" / name
        with zipfile.ZipFile(path) as z:
            assert sorted(z.namelist()) == ["flags.npy", "images.npy", "labels.npy",
                                            "positions.npy"]
        with np.load(path, allow_pickle=False) as shard:
            positions = shard["positions"]
            assert positions.dtype == np.int64 and len(positions) == 2
            assert positions.tolist() == list(range(positions[0], positions[0] + 2))
            assert shard["images"].shape == (2, 16, 16, 3)
            assert shard["images"].dtype == np.uint8
            assert shard["labels"].shape == (2,)
        recorded = read_shard_flags(str(path))
        assert recorded["script"] == "image_sample"
        assert recorded["seed"] == 3 and recorded["num_classes"] == 10
        with open(ckpts["cond"], "rb") as f:
            assert recorded["model_path sha256"] == hashlib.sha256(f.read()).hexdigest()

    resumed = run_script("image_sample.py", flags, out, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: 12 of 15 positions" in resumed.stdout, resumed.stdout
    (path,) = npz_files(out)
    (full,) = npz_files(mpi_full[0])
    a, b = load_npz(full), load_npz(path)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    config = json.load(open(out / "config.json"))
    assert config["session"]["positions_sampled"] == 3
    assert not os.path.exists(out / "shards")
    # The resume sampled only what was missing: counted from the run's own
    # record (config.json above) and log, not timed.
    full_config = json.load(open(os.path.join(mpi_full[0], "config.json")))
    assert full_config["session"]["positions_sampled"] == 15

    # Run again: the result is there; nothing is sampled.
    again = run_script("image_sample.py", flags, out, ranks=2)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == path


@needs_mpi
def test_mpi_bad_input_one_line_all_ranks_exit(ckpts, tmp_path):
    out = tmp_path / "out"
    res = run_script("image_sample.py", f"{TINY} --model_path {tmp_path}/missing.pt --num_samples 4",
                     out, ranks=2, timeout=60)
    assert res.returncode == 2, res.stderr
    assert error_lines(res.stderr) == [
        f"error: checkpoint not found: {tmp_path}/missing.pt (--model_path); pass --model_path "
        "to an existing file (published checkpoints: scripts/download_models.py --list)"
    ]
    assert not out.exists()


def test_dead_rank_stops_the_others(ckpts, tmp_path):
    """torchrun-style launch, no launcher to clean up: rank 1 is SIGKILLed
    while sampling; rank 0 notices the missing progress reports and exits."""
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "image_sample.py")] + shlex.split(
        f"{TINY} --timestep_respacing 50 --model_path {ckpts['uncond']} --num_samples 8 --batch_size 1"
    )
    with reserved_port() as port:  # held until rank 0's store has bound it
        common = dict(WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      IMPROVED_DIFFUSION_DIST_TIMEOUT=10)
        procs = [subprocess.Popen(cmd, env=env_for(out, RANK=r, LOCAL_RANK=r, **common),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in (0, 1)]
        try:
            # Wait (polling, bounded) until rank 1 reports progress, then kill it.
            for _ in range(2400):
                if glob.glob(str(out / "shards" / "alive_*_1.json")):
                    break
                assert procs[0].poll() is None and procs[1].poll() is None
                time.sleep(0.05)
            procs[1].send_signal(signal.SIGKILL)
            # A hang runs into this timeout; how fast rank 0 noticed is not asserted.
            _, err = procs[0].communicate(timeout=120)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.communicate()
    assert procs[0].returncode == 1, err[-2000:]
    assert error_lines(err) and "rank 1 stopped reporting progress" in error_lines(err)[0]
    assert not npz_files(out)


# ---------------------------------------------------------------------------
# Other scripts
# ---------------------------------------------------------------------------


def test_classifier_sample_guided_and_unguided(ckpts, tmp_path, capsys, monkeypatch):
    clf = ("--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 "
           f"--classifier_pool attention --num_classes 10 --classifier_path {ckpts['classifier']}")
    base = (f"{TINY} --image_size 32 --attention_resolutions 16 --class_cond True "
            f"--timestep_respacing 2 --model_path {ckpts['cond32']} --num_samples 3 --batch_size 2")
    code, err = run_in_process(CLASSIFIER_SAMPLE, f"{base} {clf} --classifier_guidance True --classifier_scale 5 "
                               "--use_fp16 True --classifier_use_fp16 True", tmp_path / "cg", capsys, monkeypatch)
    assert code == 0, err
    code, err = run_in_process(CLASSIFIER_SAMPLE, f"{base} --num_classes 10 --classifier_guidance False "
                               f"--classifier_path {tmp_path}/not_needed.pt --use_fp16 True",
                               tmp_path / "plain", capsys, monkeypatch)
    assert code == 0, err
    a, b = load_npz(npz_files(tmp_path / "cg")[0]), load_npz(npz_files(tmp_path / "plain")[0])
    assert list(a) == list(b) == ["arr_0", "arr_1"]
    assert np.array_equal(a["arr_1"], b["arr_1"])  # labels from seed + p either way
    assert not np.array_equal(a["arr_0"], b["arr_0"])  # the classifier steered


def test_classifier_sample_reads_the_classifiers_card(ckpts, tmp_path, capsys, monkeypatch):
    """A card beside --classifier_path gives the classifier_* flags (and nothing else): the same samples."""
    import shutil

    clf = dict(classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
               classifier_pool="attention", classifier_use_scale_shift_norm=True,
               classifier_resblock_updown=True)
    shutil.copy(ckpts["classifier"], tmp_path / "clf.pt")
    # The diffusion's flags in a classifier's card are the classifier's training, not the sampling's.
    (tmp_path / "clf.json").write_text(json.dumps({"flags": dict(
        clf, timestep_respacing="", noise_schedule="cosine", image_size=32, num_classes=10)}))
    base = (f"{TINY} --image_size 32 --attention_resolutions 16 --class_cond True --num_classes 10 "
            f"--timestep_respacing 2 --model_path {ckpts['cond32']} --num_samples 2 --batch_size 2 "
            "--classifier_guidance True --classifier_scale 5")
    explicit = " ".join(f"--{k} {v}" for k, v in clf.items())
    code, err = run_in_process(CLASSIFIER_SAMPLE, f"{base} {explicit} --classifier_path {ckpts['classifier']}",
                               tmp_path / "flags", capsys, monkeypatch)
    base += f" --classifier_path {tmp_path / 'clf.pt'}"
    assert code == 0, err
    code, err = run_in_process(CLASSIFIER_SAMPLE, base, tmp_path / "card", capsys, monkeypatch)
    assert code == 0, err
    a, b = load_npz(npz_files(tmp_path / "flags")[0]), load_npz(npz_files(tmp_path / "card")[0])
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    # A flag on the command line still wins over the card.
    code, err = run_in_process(CLASSIFIER_SAMPLE, f"{base} --classifier_width 64", tmp_path / "wide",
                               capsys, monkeypatch)
    assert code == 2 and "--classifier_width" in err


def test_super_res_sample(tmp_path, capsys, monkeypatch):
    from improved_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults

    flags = sr_model_and_diffusion_defaults()
    flags.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1,
                 attention_resolutions="8", num_heads=2, learn_sigma=True, class_cond=True,
                 num_classes=10, timestep_respacing="2")
    th.manual_seed(0)
    model, _ = sr_create_model_and_diffusion(**flags)
    th.save(model.state_dict(), tmp_path / "sr.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "base.npz", rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
             np.array([3, 7], dtype=np.int64))
    cli = (f"--large_size 64 --small_size 32 --num_channels 32 --num_res_blocks 1 "
           f"--attention_resolutions 8 --num_heads 2 --learn_sigma True --class_cond True "
           f"--num_classes 10 --timestep_respacing 2 --sel_attn_depth 0 --blur_sigma 2 "
           f"--model_path {tmp_path}/sr.pt --base_samples {tmp_path}/base.npz --num_samples 3 --batch_size 2")
    code, err = run_in_process(SUPER_RES_SAMPLE, cli, tmp_path / "out", capsys, monkeypatch)
    assert code == 0, err
    data = load_npz(npz_files(tmp_path / "out")[0])
    assert data["arr_0"].shape == (3, 64, 64, 3)
    assert data["arr_1"].tolist() == [3, 7, 3]  # base labels, cycled
    # DPM-Solver++ upsamples too (the low-resolution images reach both SAG passes).
    code, err = run_in_process(SUPER_RES_SAMPLE, cli + " --sampler dpmsolver++ --solver_steps 3",
                               tmp_path / "solver", capsys, monkeypatch)
    assert code == 0, err
    solved = load_npz(npz_files(tmp_path / "solver")[0])
    assert solved["arr_1"].tolist() == [3, 7, 3]
    assert np.abs(solved["arr_0"].astype(int) - data["arr_0"].astype(int)).mean() > 1
    code, err = run_in_process(SUPER_RES_SAMPLE, cli.replace("--small_size 32", "--small_size 16"),
                               tmp_path / "bad", capsys, monkeypatch)
    assert code == 2
    assert "holds uint8 images of shape (2, 32, 32, 3); expected uint8 (N, 16, 16, 3)" in err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------
# The path of --guide_scale (docs/ARCHITECTURE.md), the run's logging
# ---------------------------------------------------------------------------


def test_guide_scale_reaches_combine_in_at_most_6_calls(ckpts, tmp_path, capsys, monkeypatch):
    """The Python stack when sag_ops.combine is entered, from the script's main down."""
    from improved_diffusion.guidance import sag_ops

    package = os.path.join(ROOT, "improved_diffusion") + os.sep
    seen = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is sag_ops.combine.__code__ and not seen:
            stack, f = [], frame
            while f is not None:
                stack.append((f.f_code.co_filename, f.f_code.co_name))
                f = f.f_back
            seen.append((frame.f_locals["scale"], stack[::-1]))

    flags = f"{TINY} --guide_scale 1.75 --timestep_respacing 3 --num_samples 2 --batch_size 2"
    before = sys.getprofile()
    sys.setprofile(profile)
    try:
        code, err = run_in_process(IMAGE_SAMPLE, f"{flags} --model_path {ckpts['uncond']}",
                                   tmp_path / "out", capsys, monkeypatch)
    finally:
        sys.setprofile(before)
    assert code == 0, err
    scale, stack = seen[0]
    assert scale == 1.75  # the flag's value, at the line that uses it
    names = [name for _, name in stack]
    main = len(names) - 1 - names[::-1].index("main")
    assert stack[main][0] == IMAGE_SAMPLE.__file__
    calls = stack[main + 1:]  # every call after main's, combine included
    assert calls[-1][1] == "combine"
    assert len(calls) <= 6, calls
    outside = [c for c in calls if not c[0].startswith(package)]
    assert not outside, outside  # down through the package, never back into a script


def test_run_logs_into_its_dir_and_gives_the_logger_back(ckpts, tmp_path, capsys, monkeypatch):
    """Two runs in one process (a sweep): each logs into its own dir, the caller's logger stays."""
    from improved_diffusion import logger

    logger.configure(dir=str(tmp_path / "caller"), format_strs=["log"])
    try:
        for name in ("a", "b"):
            code, err = run_in_process(IMAGE_SAMPLE, f"{TINY} --timestep_respacing 2 --num_samples 1 "
                                       f"--batch_size 1 --model_path {ckpts['uncond']}",
                                       tmp_path / name, capsys, monkeypatch)
            assert code == 0, err
            assert logger.get_dir() == str(tmp_path / "caller")
            logger.log(f"caller after {name}")
    finally:
        logger.configure(dir=str(tmp_path / "closed"), format_strs=[])  # closes the caller's log.txt
    for name in ("a", "b"):
        text = (tmp_path / name / "log.txt").read_text()
        assert f"into {tmp_path / name}" in text and "wrote " in text
        assert "caller after" not in text
    assert "into " + str(tmp_path / "b") not in (tmp_path / "a" / "log.txt").read_text()
    caller = (tmp_path / "caller" / "log.txt").read_text()
    assert "caller after a" in caller and "caller after b" in caller and "sampling " not in caller


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------


IMAGE_SAMPLE = script_module("image_sample")
CLASSIFIER_SAMPLE = script_module("classifier_sample")
SUPER_RES_SAMPLE = script_module("super_res_sample")


@pytest.fixture(scope="module")
def bad_files(ckpts, tmp_path_factory):
    import argparse

    d = tmp_path_factory.mktemp("bad")
    data = open(ckpts["uncond"], "rb").read()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    opt = th.optim.Adam(th.nn.Linear(2, 2).parameters())
    th.save(opt.state_dict(), d / "opt.pt")
    th.save({"args": argparse.Namespace(lr=1.0), "model": th.load(ckpts["uncond"])}, d / "pickled.pt")
    model, _ = tiny_model()
    with th.no_grad():
        model.out[2].bias.fill_(float("nan"))
    th.save(model.state_dict(), d / "nan.pt")
    return d


BAD_INPUTS = [
    ("missing", "--model_path {d}/nope.pt", "checkpoint not found: {d}/nope.pt (--model_path)"),
    ("truncated", "--model_path {d}/truncated.pt",
     "cannot read {d}/truncated.pt (--model_path, "),
    ("optimizer", "--model_path {d}/opt.pt", "is an optimizer state (opt*.pt), not model weights"),
    ("pickle", "--model_path {d}/pickled.pt", "holds pickled Python objects that a safe load"),
    ("learn_sigma", "--model_path {uncond} --learn_sigma False",
     "out.2.weight is [6, 32, 3, 3] in the checkpoint, [3, 32, 3, 3] for these flags"),
    ("class_cond", "--model_path {uncond} --class_cond True",
     "label_emb.weight [1000, 128] is missing from the checkpoint; probably --class_cond"),
    ("num_channels", "--model_path {uncond} --num_channels 64", "probably --num_channels"),
    ("num_res_blocks", "--model_path {uncond} --num_res_blocks 2",
     "probably --num_res_blocks or --channel_mult"),
    ("attention", "--model_path {uncond} --attention_resolutions 16",
     "probably --attention_resolutions"),
    ("num_samples", "--model_path {uncond} --num_samples 0", "--num_samples must be > 0, got 0"),
    ("batch_size", "--model_path {uncond} --batch_size -2", "--batch_size must be > 0, got -2"),
    ("blur_sigma", "--model_path {uncond} --blur_sigma 0", "--blur_sigma must be a number > 0"),
    ("guide_scale_nan", "--model_path {uncond} --guide_scale nan", "--guide_scale must be a finite number"),
    ("guide_scale_inf", "--model_path {uncond} --guide_scale inf", "--guide_scale must be a finite number"),
    ("nan_batch", "--model_path {d}/nan.pt", "NaN/inf values in the sampled batch at positions 0..1"),
    ("sampler", "--model_path {uncond} --sampler euler",
     "--sampler must be one of ddpm, ddim, dpmsolver++, sde-dpmsolver++, got 'euler'"),
    ("solver_steps", "--model_path {uncond} --sampler dpmsolver++ --solver_steps 0",
     "--solver_steps must be at least --solver_order (2), got 0"),
    ("solver_order", "--model_path {uncond} --sampler dpmsolver++ --solver_order 4",
     "--solver_order must be 1, 2 or 3, got 4"),
]


@pytest.mark.parametrize("case,flags,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_in_process(case, flags, message, ckpts, bad_files, tmp_path, capsys, monkeypatch):
    fmt = dict(d=bad_files, uncond=ckpts["uncond"])
    out = tmp_path / "out"
    code, err = run_in_process(
        IMAGE_SAMPLE, f"{TINY} --timestep_respacing 2 --num_samples 2 --batch_size 2 " + flags.format(**fmt),
        out, capsys, monkeypatch)
    # (a run that got as far as sampling has drawn its progress bar first)
    lines = [line for line in err.splitlines() if line.strip() and "UserWarning" not in line
             and not line.startswith("  ") and not line.startswith("sampling:")]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(**fmt) in lines[0], err
    leftovers = [p for p in glob.glob(str(out / "**"), recursive=True)
                 if p.endswith((".npz", ".partial", ".tmp"))]
    assert not leftovers
    if case != "nan_batch":  # a run that started keeps its logs; invalid input leaves nothing
        assert not out.exists()


def test_classifier_guidance_needs_classifier_path(ckpts, tmp_path, capsys, monkeypatch):
    code, err = run_in_process(
        CLASSIFIER_SAMPLE, f"{TINY} --model_path {ckpts['uncond']} --classifier_guidance True",
        tmp_path / "out", capsys, monkeypatch)
    assert code == 2
    assert err.strip() == ("error: --classifier_guidance True needs --classifier_path (a noisy-image "
                           "classifier, e.g. models/128x128_classifier.pt); or pass --classifier_guidance False")
    code, err = run_in_process(
        CLASSIFIER_SAMPLE, f"{TINY} --image_size 32 --attention_resolutions 16 --model_path {ckpts['cond32']} "
        f"--class_cond True --num_classes 10 --classifier_width 64 --classifier_depth 1 "
        f"--classifier_attention_resolutions 8 --classifier_guidance True "
        f"--classifier_path {ckpts['classifier']}", tmp_path / "out", capsys, monkeypatch)
    assert code == 2 and "(--classifier_path) does not match the flags" in err, err
    assert "probably --classifier_width (the checkpoint's first layer has 32 channels)" in err, err
    assert not (tmp_path / "out").exists()


def test_unwritable_log_dir(ckpts, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    code, err = run_in_process(IMAGE_SAMPLE, f"{TINY} --model_path {ckpts['uncond']} --num_samples 2",
                               tmp_path / "file" / "logs", capsys, monkeypatch)
    assert code == 2
    assert err.strip() == (f"error: cannot write to the log directory {tmp_path}/file/logs (Not a "
                           "directory); set OPENAI_LOGDIR to a writable folder")


def test_flags_differ_from_shards(ckpts, tmp_path, capsys, monkeypatch):
    from improved_diffusion.run import sample_run

    out = tmp_path / "out"
    flags = f"{TINY} --timestep_respacing 2 --model_path {ckpts['uncond']} --num_samples 4 --batch_size 2"
    write_shard = sample_run.write_shard

    def write_then_stop(*args, **kwargs):  # a crash after the first shard
        write_shard(*args, **kwargs)
        raise KeyboardInterrupt()

    monkeypatch.setattr(sample_run, "write_shard", write_then_stop)
    monkeypatch.setenv("OPENAI_LOGDIR", str(out))
    with pytest.raises(KeyboardInterrupt):
        IMAGE_SAMPLE.main(shlex.split(flags))
    monkeypatch.setattr(sample_run, "write_shard", write_shard)
    assert len(os.listdir(out / "shards")) >= 1
    code, err = run_in_process(IMAGE_SAMPLE, flags + " --guide_scale 1.2 --seed 0", out, capsys, monkeypatch)
    assert code == 2
    assert err.strip() == (f"error: the shards in {out}/shards were made with other flags: --guide_scale "
                           "(1.5 there, 1.2 now); re-run with the same flags to resume, or use another "
                           "OPENAI_LOGDIR")
    # Batch size and sample count may change: the samples do not depend on them.
    code, err = run_in_process(IMAGE_SAMPLE, flags.replace("--batch_size 2", "--batch_size 3")
                               .replace("--num_samples 4", "--num_samples 5") + " --seed 0",
                               out, capsys, monkeypatch)
    assert code == 0, err
    assert load_npz(npz_files(out)[0])["arr_0"].shape == (5, 16, 16, 3)


def test_disk_full_while_writing_a_shard(ckpts, tmp_path):
    """Files may not grow past 25000 bytes (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG): a
    shard of 64 16x16 images (49152 bytes of pixels) does not fit; the logs (config.json
    about 2700 bytes, log.txt about 400) fit with a wide margin."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (25000, 25000))

    out = tmp_path / "out"
    res = run_script("image_sample.py",
                     f"{TINY} --timestep_respacing 2 --model_path {ckpts['uncond']} --num_samples 64 --batch_size 64",
                     out, preexec_fn=limit)
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = error_lines(res.stderr)
    assert line.startswith("error: disk full while writing shard ") and "re-run the same command" in line
    assert not npz_files(out)
    assert not [p for p in os.listdir(out / "shards") if p.startswith("shard_") or p.endswith(".tmp")]


def test_script_error_is_one_line_and_exit_2(tmp_path):
    res = run_script("image_sample.py", f"{TINY} --model_path {tmp_path}/m.pt --batch_size 0", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --batch_size must be > 0, got 0"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["image_sample.py", "classifier_sample.py"])
def test_top_level_entry_points_run_their_scripts(name, tmp_path):
    """The seed's `python image_sample.py ...` runs scripts/image_sample.py, from any folder."""
    env = env_for(COLUMNS="100")
    outs = []
    for path in (os.path.join(ROOT, name), os.path.join(ROOT, "scripts", name)):
        res = subprocess.run([sys.executable, path, "--num_samples", "0"], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.strip() == "error: --num_samples must be > 0, got 0"
        res = subprocess.run([sys.executable, path, "--help"], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    assert "--guide_scale" in outs[0]


@pytest.mark.parametrize("script, flags, says", [
    ("image_sample", TINY, "needs a classifier: use scripts/classifier_sample.py with --classifier_path"),
    ("super_res_sample", "--base_samples x.npz", "is not available for super-resolution"),
])
def test_classifier_guidance_without_a_classifier_is_one_line(script, flags, says, tmp_path, capsys,
                                                              monkeypatch):
    code, err = run_in_process(script_module(script), f"{flags} --classifier_guidance True",
                               tmp_path / "out", capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --classifier_guidance True {says}; or pass --classifier_guidance False"]
    assert not (tmp_path / "out").exists()
