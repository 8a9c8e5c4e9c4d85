"""
The golden cases of tests/golden (cases.json: the published SAG sampler;
solver_cases.json: the official DPM-Solver++) and how a test runs one: its
script with the user's command line and the real files, in a process of its
own, or in the test process where the float samples are checked too.
"""

import contextlib
import glob
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch as th

from conftest import ROOT, env_for, script_module

GOLDEN = os.path.join(ROOT, "tests", "golden")
with open(os.path.join(GOLDEN, "cases.json")) as f:
    CASES = json.load(f)
# DPM-Solver++ cases drawn by the official solver (tests/golden/make_solver_cases.py).
with open(os.path.join(GOLDEN, "solver_cases.json")) as f:
    SOLVER_CASES = json.load(f)
ALL_CASES = {**CASES, **SOLVER_CASES}

def golden_path(name):
    return os.path.join(GOLDEN, name)


def case_command(case, extra=()):
    """The command line a user runs for `case` (files resolved in tests/golden)."""
    script = case.get("script", "image_sample.py")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script)]
    cmd += shlex.split(case["model_flags"]) + shlex.split(case["sag_flags"])
    cmd += ["--model_path", golden_path(case["checkpoint"])]
    sample_flags = shlex.split(case["sample_flags"])
    for i, flag in enumerate(sample_flags[:-1]):
        if flag == "--classifier_path":
            sample_flags[i + 1] = golden_path(sample_flags[i + 1])
    return cmd + sample_flags + list(extra)


def run_case(name, tmp_path, extra=(), floats=None):
    """
    Run case `name` as a user runs it: its script in a process of its own
    with the case's command line, one OpenMP thread. With a list `floats`
    the script's main runs in this process instead (one torch thread, as
    conftest sets), and each batch's float samples, as the drawer hands them
    to the uint8 cast, are appended. Returns the npz's arrays (arr_0, and
    arr_1 if any).
    """
    case = ALL_CASES[name]
    out = tmp_path / "out"
    if floats is None:
        res = subprocess.run(case_command(case, extra), capture_output=True, text=True,
                             env=env_for(out, OMP_NUM_THREADS="1"), timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        printed = res.stdout
    else:
        printed = _run_in_process_recording(case, extra, out, floats)
    (path,) = glob.glob(str(out / "samples_*.npz"))
    assert printed.strip().splitlines()[-1] == path
    with np.load(path) as data:
        return {k: data[k] for k in data.keys()}


def _run_in_process_recording(case, extra, out, floats):
    """The script's main in this process, the float samples before the uint8 cast into `floats`."""
    from improved_diffusion.cli import run_main
    from improved_diffusion.sampling import drawer

    script = script_module(case.get("script", "image_sample.py")[: -len(".py")])
    printed = io.StringIO()
    cast = drawer.to_uint8

    def recording_cast(sample, positions=None):
        floats.append(sample.detach().cpu().clone())
        return cast(sample, positions)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("OPENAI_LOGDIR", str(out))
        mp.setenv("TQDM_DISABLE", "1")
        mp.setattr(drawer, "to_uint8", recording_cast)
        run_main(script.main, case_command(case, extra)[2:])
    return printed.getvalue()


def expected(name):
    with np.load(golden_path(ALL_CASES[name]["expected"])) as data:
        return {k: data[k] for k in data.keys()}


def diff_stats(got, want):
    assert got.shape == want.shape and got.dtype == np.uint8
    d = np.abs(got.astype(np.int64) - want.astype(np.int64))
    return float(d.mean()), float((d > 1).mean())


def per_sample_means(got, want):
    return [diff_stats(got[i : i + 1], want[i : i + 1])[0] for i in range(len(got))]


def check_golden_case(name, tmp_path):
    """
    Case `name` through its script, within the stated tolerance of its
    expected npz; where the case has the official solver's float samples
    (x_final), the script's floats before the cast equal them up to float
    rounding (atol 1e-5).
    """
    want = expected(name)
    x_final = want.pop("x_final", None)
    floats = [] if x_final is not None else None
    got = run_case(name, tmp_path, floats=floats)
    if x_final is not None:
        np.testing.assert_allclose(th.cat(floats).numpy(), x_final, rtol=0, atol=1e-5)
    assert sorted(got) == sorted(want)
    mean, frac = diff_stats(got["arr_0"], want["arr_0"])
    assert mean <= 0.05 and frac <= 0.001, (name, mean, frac)
    if "arr_1" in want:  # labels: drawn under the seed contract, exactly
        assert got["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
