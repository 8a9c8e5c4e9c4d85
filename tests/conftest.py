import contextlib
import glob
import importlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch as th

# In-process model runs: one thread each (oversubscribed OpenMP threads spin;
# scripts run in subprocesses keep their own settings).
th.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from improved_diffusion import dist_util, logger  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


# mpiexec: the venv's own first (mpich from the test extra), then PATH.
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def on_ci():
    """Whether the run is a CI run (CI=true, as GitHub Actions and most CIs set)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def mpiexec():
    """
    The mpiexec to launch multi-rank runs with. Without one the test is
    skipped on a developer machine, but fails under CI=true: there a missing
    mpiexec means the install step broke, and skips would hide it.
    """
    if MPIEXEC is None:
        message = (
            "mpiexec not found (in the venv or on PATH); install the test extra: "
            "pip install -e '.[test]' (it brings mpich)"
        )
        if on_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return MPIEXEC


# Mark a test that launches mpiexec (skip without it; fail on CI).
needs_mpiexec = pytest.mark.usefixtures("mpiexec")
needs_mpi = needs_mpiexec


@contextlib.contextmanager
def reserved_port():
    """
    A free TCP port on 127.0.0.1 that stays reserved while the block runs:
    the socket that found it stays bound (SO_REUSEADDR, never listening), so
    no other process can take the port, while a server that binds it with
    SO_REUSEADDR (torch's TCPStore does) still can. No window between
    choosing the port and using it.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def tiny_flags(**overrides):
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=16,
        num_channels=32,
        channel_mult="1,1",
        num_res_blocks=1,
        attention_resolutions="8",
        num_heads=2,
        learn_sigma=True,
        diffusion_steps=1000,
        timestep_respacing="4",
    )
    flags.update(overrides)
    return flags


def network_of(args, kind="model"):
    """
    (network, diffusion) that parsed flags `args` build: kind "model",
    "upsampler" or "classifier" (whose diffusion is None).
    """
    from improved_diffusion.script_util import (
        args_to_dict,
        classifier_defaults,
        create_classifier,
        sr_create_model_and_diffusion,
        sr_model_and_diffusion_defaults,
    )

    if kind == "classifier":
        return create_classifier(**args_to_dict(args, classifier_defaults().keys())), None
    if kind == "upsampler":
        return sr_create_model_and_diffusion(**args_to_dict(args, sr_model_and_diffusion_defaults().keys()))
    return create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))


def tiny_model(seed=0, **overrides):
    """A tiny random UNet (with non-zero output/attention projections) and its diffusion."""
    th.manual_seed(seed)
    flags = tiny_flags(**overrides)
    model, diffusion = create_model_and_diffusion(**flags)
    with th.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.dim() > 1:  # zero-initialised projections
                p.normal_(0, 0.05)
    model.eval()
    return model, diffusion


@pytest.fixture
def tiny():
    return tiny_model()


def draw(diffusion, model, sag=None, ddim=False, seeds=(0, 1), classifier=None, model_kwargs=None,
         eta=0.0, size=16, device=None, prefetch=None):
    """
    Samples (float NCHW, the final x) of `model` at `seeds` through the
    fork's sampler and guided denoiser: ancestral or DDIM over `diffusion`.
    """
    from improved_diffusion.guidance.denoiser import GuidedDenoiser
    from improved_diffusion.sampling.random_util import BatchGenerator
    from improved_diffusion.sampling.samplers import Sampler

    gen = BatchGenerator(list(seeds)) if prefetch is None else BatchGenerator(list(seeds), prefetch=prefetch)
    x = gen.randn((len(seeds), 3, size, size), device=device)
    sampler = Sampler.ddim(diffusion, eta) if ddim else Sampler.ddpm(diffusion)
    denoiser = GuidedDenoiser.for_diffusion(model, diffusion, sag=sag, classifier=classifier)
    return sampler.run(denoiser, x, model_kwargs, gen)


def record_applied_lrs(loop):
    """A list that fills with the lr of each optimizer step `loop` takes (wraps loop.opt.step)."""
    applied = []
    step = loop.opt.step

    def recording_step(*a, **k):
        applied.append(loop.opt.param_groups[0]["lr"])
        return step(*a, **k)

    loop.opt.step = recording_step
    return applied


# ---------------------------------------------------------------------------
# The sampling scripts run as users run them (tests/test_sampling.py, test_resume.py)
# ---------------------------------------------------------------------------

TINY = (
    "--image_size 16 --num_channels 32 --channel_mult 1,1 --num_res_blocks 1 "
    "--attention_resolutions 8 --num_heads 2 --learn_sigma True "
    "--sel_attn_depth 0 --guide_scale 1.5 --blur_sigma 3"
)


# Variables that MPI launchers and torchrun set for the processes they start.
# Neither a test's own process nor a script it starts may inherit them from
# whatever started pytest: a script would take itself for one rank of a job.
LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
)
# Variables that steer a run of this project (where it logs, the training
# test mode): a test sets them where it wants them, it never inherits them.
RUN_VARS = ("OPENAI_LOGDIR", "DIFFUSION_TRAINING_TEST")


def env_for(logdir=None, **extra):
    """
    The environment of a script a test starts: this process's, without launcher
    or run variables, with the repository importable, one OpenMP thread, no
    GPU, a 30 s distributed timeout and no progress bars; OPENAI_LOGDIR=logdir
    when one is given; then `extra` (each value as str()).
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS + RUN_VARS}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               IMPROVED_DIFFUSION_DIST_TIMEOUT="30", TQDM_DISABLE="1")
    if logdir is not None:
        env["OPENAI_LOGDIR"] = str(logdir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def single_process(monkeypatch):
    """This process as a plain one-process run: no launcher or run variables, a fresh dist_util state."""
    for var in LAUNCH_VARS + RUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dist_util, "_STATE", dist_util._DistState())


@pytest.fixture
def own_logger():
    """
    No logger configured when the test starts (the test or the code under test
    configures one); after it, that one is closed and the previous restored.
    """
    prev = logger.Logger.CURRENT, logger.Logger.DEFAULT
    logger.Logger.CURRENT = None
    yield
    if logger.Logger.CURRENT is not None:
        logger.Logger.CURRENT.close()
    logger.Logger.CURRENT, logger.Logger.DEFAULT = prev


def run_script(script, flags, logdir, ranks=None, timeout=240, preexec_fn=None, **env):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script)] + shlex.split(flags)
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=env_for(logdir, **env),
                          timeout=timeout, preexec_fn=preexec_fn)


def npz_files(logdir):
    return sorted(glob.glob(os.path.join(str(logdir), "*.npz")))


def load_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.keys()}


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def kill_when(cmd, env, done, timeout=240):
    """
    Run cmd in a process group of its own and SIGKILL the whole group as soon
    as done() is true (a crash from outside at a point the test chooses), or
    after `timeout` seconds. Returns the exit status: -SIGKILL when it was
    killed, its own when it ended first.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not done():
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def die_while_writing(how, script, flags, logdir, ranks=None, timeout=240):
    """
    tests/die_while_writing.py: scripts/`script` (a module name) SIGKILLed at
    a known point, e.g. ``how="shard 1"`` or ``"shard_together 3 DIR"``.
    """
    cmd = [sys.executable, os.path.join(ROOT, "tests", "die_while_writing.py")] + how.split()
    cmd += [script] + shlex.split(flags)
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=env_for(logdir), timeout=timeout)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny random checkpoints: unconditional, class-conditional (10 classes), a classifier."""
    from improved_diffusion.script_util import create_classifier

    d = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, extra in [("uncond", {}), ("cond", dict(class_cond=True, num_classes=10))]:
        model, _ = tiny_model(**extra)
        paths[name] = str(d / f"{name}.pt")
        th.save(model.state_dict(), paths[name])
    # Classifiers exist for 32 px and up: a 32 px pair for classifier guidance.
    model, _ = tiny_model(image_size=32, attention_resolutions="16", class_cond=True, num_classes=10)
    paths["cond32"] = str(d / "cond32.pt")
    th.save(model.state_dict(), paths["cond32"])
    th.manual_seed(1)
    clf = create_classifier(32, False, 32, 1, "8", True, True, "attention", num_classes=10)
    paths["classifier"] = str(d / "classifier.pt")
    th.save(clf.state_dict(), paths["classifier"])
    return paths


def probe_inputs(folder, n=4, size=16):
    """
    What the probe scripts read, under `folder`: a tiny class-conditional
    checkpoint (2 classes, full 1000 steps) with its model card, and n
    images of a gray square on black (labels 0, 1, 0, ...).
    :return: (model, checkpoint path, card path, image folder)
    """
    from PIL import Image

    from improved_diffusion.checkpoints.model_card import write_model_card

    model, _ = tiny_model(class_cond=True, num_classes=2, timestep_respacing="")
    ckpt = folder / "tiny.pt"
    th.save(model.state_dict(), ckpt)
    write_model_card(str(ckpt), tiny_flags(class_cond=True, num_classes=2, timestep_respacing=""))
    data = folder / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.zeros((size, size, 3), dtype=np.uint8)
        img[4:12, 4:12] = rng.integers(100, 255)
        Image.fromarray(img).save(data / f"{i % 2}_{i:03d}.png")
    return model, ckpt, folder / "tiny.json", data


def script_module(name, package="scripts"):
    """The module <package>/<name>.py, imported as ``<package>.<name>`` (nothing run: its main, flags)."""
    return importlib.import_module(f"{package}.{name}")


def run_in_process(module, flags, logdir, capsys, monkeypatch):
    """The script's main through run_main, in this process: (exit code, stderr)."""
    from improved_diffusion.cli import run_main

    monkeypatch.setenv("OPENAI_LOGDIR", str(logdir))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    code = 0
    try:
        run_main(module.main, shlex.split(flags))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# A random FID Inception: the published weights file's layout, random values.

LAYOUT_JSON = os.path.join(ROOT, "tests", "data", "fid_inception.json")


def published_layout():
    with open(LAYOUT_JSON) as f:
        return [(name, tuple(shape), dtype) for name, shape, dtype in json.load(f)["params"]]


def random_state_dict(seed=0):
    """Random weights with every name/shape/dtype of the published file (He-scaled convs)."""
    g = th.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype in published_layout():
        leaf = name.rsplit(".", 1)[1]
        if dtype == "int64":
            state[name] = th.zeros(shape, dtype=th.int64)
        elif name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            state[name] = th.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name == "fc.weight":
            state[name] = th.randn(shape, generator=g) * 2048 ** -0.5
        elif leaf == "weight":
            state[name] = 1 + 0.1 * th.randn(shape, generator=g)
        elif leaf in ("bias", "running_mean"):
            state[name] = 0.1 * th.randn(shape, generator=g)
        elif leaf == "running_var":
            state[name] = 1 + 0.1 * th.rand(shape, generator=g)
        else:
            raise KeyError(name)
    return state
