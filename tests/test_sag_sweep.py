"""
scripts/sag_sweep.py on a tiny random model and a random FID Inception: a 2x2
grid end to end, a sweep killed between settings and resumed, the pairing
with image_sample.py, the bootstrap interval, the plot with and without
matplotlib, and bad input.
"""

import csv
import json
import os
import shlex
import signal

import numpy as np
import pytest
import torch as th

from conftest import (
    script_module,
    ROOT,
    die_while_writing,
    needs_mpiexec,
    random_state_dict,
    run_in_process,
    run_script,
    tiny_model,
)
from evaluations.sweep_scores import NO_SCORER, dataset_of
from improved_diffusion.checkpoints.model_card import write_model_card
from improved_diffusion.run.sweep_grid import setting_args, settings_of
from improved_diffusion.sampling.samplers import sampler_name
from evaluations.evaluator import compute_statistics, frechet_distance
from evaluations import paired_stats as ps

TINY = (
    "--image_size 16 --num_channels 32 --channel_mult 1,1 --num_res_blocks 1 "
    "--attention_resolutions 8 --num_heads 2 --learn_sigma True --class_cond True "
    "--num_classes 10 --timestep_respacing 4 --sel_attn_depth 0 --guide_scale 1.5 --blur_sigma 3 "
    "--seed 5 --batch_size 2"
)
GRID = "guide_scale=1.0,2.0 blur_sigma=1,3"
SETTINGS = ["guide_scale=1.0", "guide_scale=2.0,blur_sigma=1.0", "guide_scale=2.0,blur_sigma=3.0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep_inputs")
    model, _ = tiny_model(class_cond=True, num_classes=10)
    th.save(model.state_dict(), d / "cond.pt")
    th.save(random_state_dict(), d / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(d / "ref16.npz", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.savez(d / "ref32.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    return dict(model=str(d / "cond.pt"), inception=str(d / "inception.pth"),
                ref16=str(d / "ref16.npz"), ref32=str(d / "ref32.npz"))


@pytest.fixture(scope="module")
def sweep(files, tmp_path_factory):
    """The 2x2 grid end to end (the two baselines are one setting), 4 samples each."""
    out = tmp_path_factory.mktemp("sweep")
    res = run_script("sag_sweep.py", f"{TINY} --model_path {files['model']} --num_samples 4 --grid '{GRID}' "
                     f"--ref_batch {files['ref16']} --inception_path {files['inception']} "
                     "--bootstrap 50", out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, res


def setting_npz(out, name, n=4):
    return os.path.join(str(out), "settings", name, f"samples_{n}x16x16x3.npz")


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z}


def test_grid_end_to_end(sweep):
    out, res = sweep
    assert sorted(os.listdir(out / "settings")) == sorted(SETTINGS)
    samples = [load(setting_npz(out, name)) for name in SETTINGS]
    for s in samples:
        assert s["arr_0"].shape == (4, 16, 16, 3)
        assert np.array_equal(s["arr_1"], samples[0]["arr_1"])  # paired: the same labels
    assert not np.array_equal(samples[0]["arr_0"], samples[1]["arr_0"])  # SAG acted
    assert not np.array_equal(samples[1]["arr_0"], samples[2]["arr_0"])  # blur_sigma acted
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == SETTINGS
    assert [r["guide_scale"] for r in rows] == ["1.0", "2.0", "2.0"]
    assert [r["blur_sigma"] for r in rows] == ["", "1.0", "3.0"]
    table = json.load(open(out / "sweep.json"))
    assert [r["setting"] for r in table["rows"]] == SETTINGS
    base, sag = table["rows"][0], table["rows"][1]
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(base[key]) and np.isfinite(sag[key])
    assert "diff_fid" not in base
    assert sag["baseline_setting"] == "guide_scale=1.0"
    # sweep.png, or the one line saying how to get it
    try:
        import matplotlib  # noqa: F401
        assert (out / "sweep.png").exists()
    except ImportError:
        assert not (out / "sweep.png").exists()
        assert "pip install -e '.[plot]'" in res.stdout


def closed_form_fid(acts, ref):
    """
    FID of activations `acts` [n x d] against `ref` written out in numpy
    (float64): the Frechet distance of a rank-n covariance, with
    tr sqrt(S S_r) from the eigenvalues of the n x n matrix Fc S_r Fc^T / (n - 1).
    """
    mu_r, sigma_r = ref.mean(0), np.cov(ref, rowvar=False)
    centred = acts - acts.mean(0)
    gram = centred @ sigma_r @ centred.T / (len(acts) - 1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
    return float(((acts.mean(0) - mu_r) ** 2).sum() + (centred**2).sum() / (len(acts) - 1)
                 + np.trace(sigma_r) - 2 * cross)


def inception_activations(files, *paths):
    """The evaluator's pool activations (float64) of npz files, with the sweep's Inception weights."""
    from evaluations import evaluator
    from evaluations.fid_inception import load_fid_inception

    ev = evaluator.Evaluator(load_fid_inception(files["inception"]), progress=False)
    return [ev.read_activations(evaluator.NpzBatch(p))[0].astype(np.float64) for p in paths]


def test_fid_is_the_evaluators(sweep, files):
    """
    The sweep's FID on the evaluator's activations of the npz, against the
    closed form above (test_frechet_to_reference_is_the_evaluators ties the
    sweep's Frechet distance to the evaluator's sqrtm on smaller features).
    """
    out, _ = sweep
    ref, acts = inception_activations(files, files["ref16"], setting_npz(out, SETTINGS[1]))
    got = json.load(open(out / "sweep.json"))["rows"][1]["fid"]
    assert got == pytest.approx(closed_form_fid(acts, ref), rel=1e-5)


def test_difference_and_interval_recomputed_from_the_npz_files(sweep, files):
    """
    diff_fid from the two settings' npz files, and its interval from the
    same 50 resamples of positions (seed 0), with FID in closed form
    (closed_form_fid) and numpy's percentiles.
    """
    from evaluations.paired_stats import bootstrap_resamples

    out, _ = sweep
    ref, base, sag = inception_activations(files, files["ref16"], setting_npz(out, SETTINGS[0]),
                                           setting_npz(out, SETTINGS[1]))

    def fid(acts):
        return closed_form_fid(acts, ref)

    row = json.load(open(out / "sweep.json"))["rows"][1]
    assert row["setting"] == SETTINGS[1]
    assert row["diff_fid"] == pytest.approx(fid(sag) - fid(base), rel=1e-4, abs=1e-2)
    diffs = [fid(sag[idx]) - fid(base[idx]) for idx in bootstrap_resamples(4, 50, seed=0)]
    low, high = np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)
    assert low < high
    assert row["diff_fid_ci_low"] == pytest.approx(low, rel=1e-4, abs=1e-2)
    assert row["diff_fid_ci_high"] == pytest.approx(high, rel=1e-4, abs=1e-2)


def test_baseline_equals_image_sample(sweep, files, tmp_path):
    """The no-SAG setting is image_sample.py --guide_scale 1.0 at the same seed, byte for byte."""
    out, _ = sweep
    res = run_script("image_sample.py",
                     f"{TINY} --model_path {files['model']} --num_samples 4 --guide_scale 1.0", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plain = load(str(tmp_path / "samples_4x16x16x3.npz"))
    base = load(setting_npz(out, "guide_scale=1.0"))
    assert plain["arr_0"].tobytes() == base["arr_0"].tobytes()
    assert plain["arr_1"].tobytes() == base["arr_1"].tobytes()
    # and a SAG setting is image_sample.py with its flags
    res = run_script("image_sample.py",
                     f"{TINY} --model_path {files['model']} --num_samples 4 --guide_scale 2 --blur_sigma 1",
                     tmp_path / "sag")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (load(str(tmp_path / "sag" / "samples_4x16x16x3.npz"))["arr_0"].tobytes()
            == load(setting_npz(out, SETTINGS[1]))["arr_0"].tobytes())


SAMPLER_GRID = ("guide_scale=1.0,2.0 timestep_respacing=3,5; "
                "guide_scale=2.0 sampler=dpmsolver++ solver_order=2 solver_steps=3")
REFERENCE = "guide_scale=2.0,timestep_respacing=5"


def test_sampler_grid_parts_nfe_and_reference(files, tmp_path):
    """
    Grids joined by ';' (their settings' union), samplers and step counts in
    the grid (each respacing its own diffusion), network evaluations per
    sample, and every row against --reference.
    """
    out = tmp_path / "samplers"
    res = run_script("sag_sweep.py", f"{TINY} --guide_start 2 --model_path {files['model']} --num_samples 4 "
                     f"--grid '{SAMPLER_GRID}' --reference {REFERENCE} --ref_batch {files['ref16']} "
                     f"--inception_path {files['inception']} --bootstrap 20", out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    with open(out / "sweep.csv") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    solver = "guide_scale=2.0,sampler=dpmsolver++,solver_order=2,solver_steps=3"
    solver_base = "guide_scale=1.0,sampler=dpmsolver++,solver_order=2,solver_steps=3"
    assert set(rows) == {"guide_scale=1.0,timestep_respacing=3", "guide_scale=1.0,timestep_respacing=5",
                         "guide_scale=2.0,timestep_respacing=3", REFERENCE, solver, solver_base}
    # steps + guided evaluations (--guide_start 2: the last two of each run)
    nfe = {name: int(r["nfe"]) for name, r in rows.items()}
    assert nfe == {"guide_scale=1.0,timestep_respacing=3": 3, "guide_scale=1.0,timestep_respacing=5": 5,
                   "guide_scale=2.0,timestep_respacing=3": 5, REFERENCE: 7, solver: 5, solver_base: 3}
    assert rows[solver]["baseline_setting"] == solver_base
    assert rows[REFERENCE]["ref_diff_fid"] == ""
    for name in set(rows) - {REFERENCE}:
        diff = float(rows[name]["ref_diff_fid"])
        assert diff == pytest.approx(float(rows[name]["fid"]) - float(rows[REFERENCE]["fid"]), abs=1e-6)
    # Each setting is image_sample.py with its flags: a respacing of its own, and the solver.
    for name, flags in ((REFERENCE, "--guide_scale 2.0 --timestep_respacing 5"),
                        (solver, "--guide_scale 2.0 --sampler dpmsolver++ --solver_steps 3")):
        single = tmp_path / name.replace(",", "_")
        res = run_script("image_sample.py",
                         f"{TINY} --guide_start 2 --model_path {files['model']} --num_samples 4 {flags}",
                         single)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (load(str(single / "samples_4x16x16x3.npz"))["arr_0"].tobytes()
                == load(setting_npz(out, name))["arr_0"].tobytes()), name


def test_killed_sweep_resumes_without_redrawing(files, tmp_path):
    flags = f"{TINY} --model_path {files['model']} --num_samples 6 --grid '{GRID}' --bootstrap 0"
    out = tmp_path / "killed"
    # 3 batches of 2 per setting: the first setting finishes (3 shards, then
    # its npz), the second writes 1 shard and dies half-way through its second.
    res = die_while_writing("shard 4", "sag_sweep", flags, out)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert os.path.exists(os.path.join(str(out), "settings", SETTINGS[0], "config.json"))
    second = out / "settings" / SETTINGS[1] / "shards"
    assert len([n for n in os.listdir(second) if n.startswith("shard_")]) == 1
    assert not (out / "settings" / SETTINGS[2]).exists()
    assert not (out / "sweep.csv").exists()
    res = run_script("sag_sweep.py", flags, out)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert f"setting 1/3: {SETTINGS[0]}: already complete, not redrawn" in lines
    assert sum(line.endswith(": sampled") for line in lines) == 2
    assert "resuming: 2 of 6 positions are already in shards; sampling the other 4" in lines
    # Only the batches the killed run had not finished were drawn now: 2 + 3.
    assert sum(line.startswith("sampled positions") for line in lines) == 5
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["setting"] for r in rows] == SETTINGS
    # A third run draws nothing.
    res = run_script("sag_sweep.py", flags, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("already complete, not redrawn") == 3
    assert "sampled positions" not in res.stdout


def test_baseline_keeps_the_fixed_sag_flags():
    sweep = script_module("sag_sweep")
    fixed = sweep.parse_args(shlex.split(f"{TINY} --grid x"))[0]
    grid = [("guide_scale", [1.0, 2.0]), ("blur_sigma", [1.0, 3.0]), ("sel_attn_depth", [1, 0])]
    settings, _ = settings_of(grid, fixed)
    base = [s for s in settings if s["baseline"]]
    assert [s["name"] for s in base] == ["guide_scale=1.0"]
    args = setting_args(fixed, base[0])
    assert (args.guide_scale, args.blur_sigma, args.sel_attn_depth) == (1.0, 3.0, 0)  # TINY's
    guided = setting_args(fixed, settings[-1])
    assert (guided.guide_scale, guided.blur_sigma, guided.sel_attn_depth) == (2.0, 3.0, 0)
    assert (setting_args(fixed, settings[1]).blur_sigma,
            setting_args(fixed, settings[1]).sel_attn_depth) == (1.0, 1)


def test_upstream_sampler_flags_in_the_grid_override_a_fixed_solver():
    """As on a command line: timestep_respacing or use_ddim=True in a setting, and no sampler, mean ddpm/ddim."""
    sweep = script_module("sag_sweep")
    fixed = sweep.parse_args(shlex.split(f"{TINY} --sampler sde-dpmsolver++ --grid x"))[0]
    grid = [("guide_scale", [1.0]), ("timestep_respacing", ["20"])]
    [setting] = settings_of(grid, fixed)[0]
    assert sampler_name(setting_args(fixed, setting)) == "ddpm"
    grid = [("guide_scale", [1.0]), ("use_ddim", [True])]
    assert sampler_name(setting_args(fixed, settings_of(grid, fixed)[0][0])) == "ddim"
    grid = [("guide_scale", [1.0]), ("solver_steps", [10])]
    assert sampler_name(setting_args(fixed, settings_of(grid, fixed)[0][0])) == "sde-dpmsolver++"
    grid = [("guide_scale", [1.0]), ("sampler", ["dpmsolver++"]), ("timestep_respacing", ["20"])]
    assert sampler_name(setting_args(fixed, settings_of(grid, fixed)[0][0])) == "dpmsolver++"


def test_a_wider_grid_resumes_the_settings_it_shares(files, tmp_path):
    """A second sweep listing SAG flags in another order redraws neither its baseline nor a shared setting."""
    out = tmp_path / "wider"
    base = f"{TINY} --model_path {files['model']} --num_samples 2 --bootstrap 0"
    res = run_script("sag_sweep.py", f"{base} --grid 'guide_scale=1.0,2.0 blur_sigma=1'", out)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_script("sag_sweep.py", f"{base} --grid 'guide_scale=1.0,2.0 blur_sigma=3,1'", out)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "setting 1/3: guide_scale=1.0: already complete, not redrawn" in lines
    assert "setting 2/3: guide_scale=2.0,blur_sigma=3.0: sampled" in lines
    assert "setting 3/3: guide_scale=2.0,blur_sigma=1.0: already complete, not redrawn" in lines


@needs_mpiexec
def test_two_ranks_same_samples(sweep, files, tmp_path):
    """mpiexec -n 2: every setting's npz equals the one-process sweep's; rank 0 alone scores."""
    out, _ = sweep
    res = run_script("sag_sweep.py", f"{TINY} --model_path {files['model']} --num_samples 4 "
                     "--grid 'guide_scale=1.0,2.0 blur_sigma=1' --bootstrap 0", tmp_path, ranks=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for name in SETTINGS[:2]:
        assert (load(setting_npz(tmp_path, name))["arr_0"].tobytes()
                == load(setting_npz(out, name))["arr_0"].tobytes())
        assert json.load(open(os.path.join(tmp_path, "settings", name, "config.json")))["world_size"] == 2
    assert res.stdout.count("wrote " + str(tmp_path / "sweep.csv")) == 1
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["setting"] for r in rows] == SETTINGS[:2]


# ---------------------------------------------------------------------------
# The paired statistics
# ---------------------------------------------------------------------------


def test_bootstrap_hand_computed():
    # A constant shift of every pair: every resample gives the same difference.
    a, b = np.array([1.0, 3.0, 4.0]), np.array([0.5, 2.5, 3.5])
    res = ps.paired_bootstrap(ps.mean_score, a, b, n_boot=200, seed=3)
    assert res["difference"] == pytest.approx(0.5)
    assert res["ci"] == pytest.approx([0.5, 0.5])
    # One position: nothing to resample.
    res = ps.paired_bootstrap(ps.mean_score, np.array([1.0]), np.array([0.0]), n_boot=10)
    assert res["difference"] == 1.0 and res["ci"] == [1.0, 1.0]
    # Two positions, right/wrong vs wrong/wrong: the resampled accuracy
    # difference is 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4), so with 2000
    # resamples the 2.5 % and 97.5 % quantiles are 0 and 1.
    res = ps.paired_bootstrap(ps.mean_score, np.array([1, 0]), np.array([0, 0]), n_boot=2000)
    assert res["difference"] == 0.5 and res["ci"] == [0.0, 1.0]
    assert ps.paired_bootstrap(ps.mean_score, a, b, n_boot=0)["ci"] is None
    with pytest.raises(ValueError):
        ps.paired_bootstrap(ps.mean_score, a, b[:2])


def test_bootstrap_matches_float64_numpy():
    """An independent implementation: resamples drawn as documented, np.cov, scipy's sqrtm FID."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    fa, fb = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.3
    ref = rng.normal(size=(40, 3)) * [1.0, 2.0, 0.5]
    mu_r, sigma_r = ref.mean(0), np.cov(ref, rowvar=False)

    def fid(x):
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        covmean = linalg.sqrtm(sigma @ sigma_r).real
        return float(((mu - mu_r) ** 2).sum() + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(covmean))

    draw = np.random.default_rng(7)
    diffs = []
    for _ in range(100):
        idx = draw.integers(0, 12, 12)
        diffs.append(fid(fa[idx]) - fid(fb[idx]))
    reference = ps.FrechetReference(mu_r, sigma_r)
    res = ps.paired_bootstrap(ps.fid_of, ps.FrechetToReference(fa, reference),
                           ps.FrechetToReference(fb, reference), n_boot=100, seed=7)
    assert res["difference"] == pytest.approx(fid(fa) - fid(fb), rel=1e-8)
    assert res["ci"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)],
                                      rel=1e-7)


def test_frechet_to_reference_is_the_evaluators():
    rng = np.random.default_rng(2)
    feats, ref = rng.normal(size=(30, 8)), rng.normal(size=(50, 8)) * 1.5 + 0.2
    stats = compute_statistics(ref)
    fid = ps.FrechetToReference(feats, ps.FrechetReference(*stats))
    assert fid() == pytest.approx(frechet_distance(*compute_statistics(feats), *stats, quiet=True),
                                  rel=1e-9)
    idx = rng.integers(0, 30, 30)
    assert fid(idx) == pytest.approx(
        frechet_distance(*compute_statistics(feats[idx]), *stats, quiet=True), rel=1e-9)


def test_mcnemar_hand_computed():
    m = ps.mcnemar([1, 1, 1, 0, 0], [0, 0, 1, 0, 1])
    # 2 right here only, 1 right in the base only: p = 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8
    assert m == dict(right_only_in_a=2, right_only_in_b=1, p=1.0)
    m = ps.mcnemar([1] * 6, [0] * 6)
    assert m["p"] == pytest.approx(2 / 64)
    assert ps.mcnemar([1, 0], [1, 0])["p"] == 1.0


# ---------------------------------------------------------------------------
# The plot, with and without matplotlib
# ---------------------------------------------------------------------------

ROWS = [
    dict(setting="guide_scale=1.0", baseline=True, guide_scale=1.0, fid=10.0, accuracy=0.5),
    dict(setting="guide_scale=1.5,blur_sigma=1.0", baseline=False, guide_scale=1.5, fid=9.0,
         accuracy=0.4, baseline_setting="guide_scale=1.0"),
    dict(setting="guide_scale=2.0,blur_sigma=1.0", baseline=False, guide_scale=2.0, fid=8.0,
         accuracy=0.3, baseline_setting="guide_scale=1.0", diff_fid=-2.0, diff_fid_ci_low=-3.5,
         diff_fid_ci_high=-0.5),
    dict(setting="guide_scale=0.5,blur_sigma=3.0", baseline=False, guide_scale=0.5, fid=12.0,
         baseline_setting="guide_scale=1.0", diff_fid=2.0, diff_fid_ci_low=1.0, diff_fid_ci_high=4.0),
]


def test_plot_lines_start_at_the_baseline_with_intervals_around_its_value():
    sweep = script_module("sag_sweep")
    assert sweep.plot_lines(ROWS, "fid") == {
        "blur_sigma=1.0": [(1.0, 10.0, 10.0, 10.0), (1.5, 9.0, None, None), (2.0, 8.0, 6.5, 9.5)],
        "blur_sigma=3.0": [(0.5, 12.0, 11.0, 14.0), (1.0, 10.0, 10.0, 10.0)],
    }
    assert sweep.plot_lines(ROWS, "accuracy") == {
        "blur_sigma=1.0": [(1.0, 0.5, 0.5, 0.5), (1.5, 0.4, None, None), (2.0, 0.3, None, None)],
    }


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = script_module("sag_sweep")
    line = sweep.plot(ROWS, str(tmp_path / "sweep.png"))
    assert line == f"wrote {tmp_path / 'sweep.png'}"
    with open(tmp_path / "sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    sweep = script_module("sag_sweep")
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    line = sweep.plot(ROWS, str(tmp_path / "sweep.png"))
    assert line == "sweep.png not written: matplotlib is not installed (pip install -e '.[plot]')"
    assert not (tmp_path / "sweep.png").exists()


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2, before any sampling, nothing left behind
# ---------------------------------------------------------------------------

SWEEPABLE = ("sweepable: guide_scale, blur_sigma, sel_attn_block, sel_attn_depth, guide_start, "
             "sag_true_attention, sampler, use_ddim, eta, timestep_respacing, solver_steps, "
             "solver_order, skip_type, solver_time_map, clip_denoised, classifier_scale, "
             "classifier_guidance")


@pytest.mark.parametrize("grid, extra, message", [
    ("foo=1,2", "", f"--grid: unknown flag 'foo' ({SWEEPABLE})"),
    ("guide_scale=1.0,abc", "", "--grid: guide_scale cannot take 'abc' (expects float)"),
    ("sel_attn_depth=1.5", "", "--grid: sel_attn_depth cannot take '1.5' (expects int)"),
    ("", "", f"--grid is empty; give flag=v1,v2,... items, e.g. \"guide_scale=1.0,1.5\" ({SWEEPABLE})"),
    ("guide_scale", "", "--grid: 'guide_scale' is not flag=v1,v2,..."),
    ("guide_scale=1.0,1.0", "", "--grid: guide_scale lists '1.0' twice"),
    ("blur_sigma=1,-2", "", "--grid: setting blur_sigma=-2.0: --blur_sigma must be a number > 0, got -2.0"),
    ("guide_scale=2 sel_attn_depth=0,3", "",
     "--grid: setting guide_scale=2.0,sel_attn_depth=3: output_blocks[3] has no attention layer"),
    ("guide_scale=1.0 classifier_guidance=False,True", "",
     "--grid: setting guide_scale=1.0,classifier_guidance=True needs --classifier_path"),
    ("guide_scale=1.0,2.0", "--classifier_guidance True",
     "--classifier_guidance True needs --classifier_path"),
    ("guide_scale=1.0,2.0", "--ref_batch {ref32}",
     "--ref_batch {ref32} holds 32x32 images but the samples are 16x16 (--image_size 16)"),
])
def test_bad_input_one_line(files, tmp_path, grid, extra, message, capsys, monkeypatch):
    """The sweep's main as its command line runs it (run_main, in this process)."""
    out = tmp_path / "out"
    flags = (f"{TINY} --model_path {files['model']} --num_samples 4 --grid '{grid}' "
             f"--inception_path {files['inception']} " + extra.format(**files))
    code, stderr = run_in_process(script_module("sag_sweep"), flags, out, capsys, monkeypatch)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr[-2000:]
    assert len(errors) == 1, stderr[-2000:]
    assert errors[0].startswith("error: " + message.format(**files)), errors[0]
    assert not out.exists() or not os.listdir(out)


# ---------------------------------------------------------------------------
# The scorer comes from a flag or the model card, never from the shape
# ---------------------------------------------------------------------------

CIFAR_LIKE = TINY.replace("--image_size 16", "--image_size 32").replace(
    "--attention_resolutions 8", "--attention_resolutions 16")


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A 32x32, 10-class model (CIFAR-10's shape) with no model card."""
    d = tmp_path_factory.mktemp("cifar_like")
    model, _ = tiny_model(class_cond=True, num_classes=10, image_size=32, attention_resolutions="16")
    th.save(model.state_dict(), d / "cifar.pt")
    return str(d / "cifar.pt")


def test_a_32x32_10_class_model_without_a_card_gets_no_fashion_scores(cifar_like, tmp_path):
    res = run_script("sag_sweep.py", f"{CIFAR_LIKE} --model_path {cifar_like} --num_samples 2 "
                     "--grid guide_scale=1.0,2.0 --bootstrap 0", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    assert NO_SCORER in res.stdout.splitlines()
    rows = json.load(open(tmp_path / "out" / "sweep.json"))["rows"]
    assert len(rows) == 2
    for row in rows:
        assert not {"accuracy", "fashion_fid", "fid"} & set(row), row
    # Asked for by name, the Fashion-MNIST scorer does score it.
    res = run_script("sag_sweep.py", f"{CIFAR_LIKE} --model_path {cifar_like} --num_samples 2 "
                     "--grid guide_scale=1.0,2.0 --bootstrap 0 --dataset fashion_mnist", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    assert NO_SCORER not in res.stdout
    assert "already complete, not redrawn" in res.stdout
    rows = json.load(open(tmp_path / "out" / "sweep.json"))["rows"]
    assert all({"accuracy", "fashion_fid"} <= set(row) for row in rows), rows


def test_the_dataset_scorer_from_the_model_card(tmp_path):
    ckpt = tmp_path / "m.pt"
    assert dataset_of("", str(ckpt)) is None  # no card
    write_model_card(str(ckpt), {"image_size": 32, "num_classes": 10})
    assert dataset_of("", str(ckpt)) is None  # a card that names no dataset
    write_model_card(str(ckpt), {"image_size": 32}, dataset="fashion_mnist")
    assert dataset_of("", str(ckpt)) == "fashion_mnist"
    assert dataset_of("none", str(ckpt)) is None
    assert dataset_of("", os.path.join(ROOT, "models", "fashion32_ema.pt")) == "fashion_mnist"
