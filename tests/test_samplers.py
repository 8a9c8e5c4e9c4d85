"""
The samplers over the guided denoiser, and DPM-Solver++'s pieces.

Expectations come from the official DPM-Solver's rules written out here
(its step orders, its piecewise-linear interpolation, its schedule), from
numpy, or from counting model calls; the solver's samples themselves are
checked against the official code's in tests/test_golden_solver.py.
"""

import json
import math
import os

import numpy as np
import pytest
import torch as th

from conftest import ROOT, TINY, load_npz, script_module, needs_mpi, npz_files, run_script, tiny_model
from improved_diffusion import cli
from improved_diffusion.sampling import drawer
from improved_diffusion.sampling.dpm_solver import DiscreteVPSchedule, interpolate, step_orders
from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
from improved_diffusion.guidance.denoiser import DiffusionTimes, GuidedDenoiser
from improved_diffusion.sampling.random_util import BatchGenerator
from improved_diffusion.guidance.sag import SelfAttentionGuidance
from improved_diffusion.sampling.samplers import Sampler, SolverTimes, sampler_name

image_sample = script_module("image_sample")


def test_interpolate_inside_matches_numpy_and_extends_the_outer_pieces():
    xp = th.tensor([0.1, 0.2, 0.4, 0.8])
    fp = th.tensor([1.0, 3.0, 2.0, -1.0])
    inside = th.tensor([0.15, 0.3, 0.5, 0.79, 0.2, 0.8])
    want = np.interp(inside.numpy(), xp.numpy(), fp.numpy())
    np.testing.assert_allclose(interpolate(inside, xp, fp).numpy(), want, rtol=1e-6)
    # Beyond the keypoints the first and last pieces go on: by hand.
    outside = interpolate(th.tensor([0.0, 1.0]), xp, fp)
    np.testing.assert_allclose(outside.numpy(), [1.0 - 0.1 * 2.0 / 0.1, -1.0 + 0.2 * -3.0 / 0.4],
                               rtol=1e-6)


@pytest.mark.parametrize("steps,order,want", [
    (10, 2, [1] + [2] * 9),            # 10 steps: no lower-order final steps (below 10 only)
    (8, 2, [1] + [2] * 6 + [1]),
    (9, 3, [1, 2] + [3] * 5 + [2, 1]),
    (5, 3, [1, 2, 3, 2, 1]),
    (3, 3, [1, 2, 1]),
    (12, 3, [1, 2] + [3] * 10),
    (4, 1, [1, 1, 1, 1]),
])
def test_step_orders_follow_the_official_rule(steps, order, want):
    assert step_orders(steps, order) == want


def _alphas_cumprod(name):
    betas = get_named_beta_schedule(name, 1000)
    return betas, np.cumprod(1.0 - betas)


def test_linear_schedule_keeps_every_step_at_its_own_time():
    betas, abar = _alphas_cumprod("linear")
    for time_map in ("official", "exact"):
        s = DiscreteVPSchedule(betas, time_map=time_map)
        assert s.num_dropped == 0 and s.T == 1.0 and s.t_end == 1e-3
        n = np.array([0, 1, 499, 998, 999])
        t = th.tensor((n + 1) / 1000.0, dtype=th.float32)
        np.testing.assert_allclose(s.alpha(t).double().numpy() ** 2, abar[n], rtol=1e-4)
        np.testing.assert_allclose(s.sigma(t).double().numpy() ** 2, 1 - abar[n], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.model_time(t).numpy(), n, atol=2e-3)
        lam = s.lambda_(t)
        np.testing.assert_allclose(s.inverse_lambda(lam).numpy(), t.numpy(), rtol=1e-4)


def test_cosine_schedule_drops_its_end_and_the_time_maps():
    betas, abar = _alphas_cumprod("cosine")
    half_log_snr = 0.5 * np.log(abar / (1 - abar))
    dropped = int((half_log_snr < -5.1).sum())
    assert 0 < dropped < 20 and (half_log_snr[:-dropped] >= -5.1).all()
    kept = 1000 - dropped
    official = DiscreteVPSchedule(betas, time_map="official")
    exact = DiscreteVPSchedule(betas, time_map="exact")
    assert official.num_dropped == exact.num_dropped == dropped
    # official: the kept steps spread over (0, 1]; the model is asked 1000 (t - 1/N').
    assert official.T == 1.0 and official.total_n == kept
    assert float(official.model_time(th.tensor(1.0))) == pytest.approx(1000 * (1 - 1 / kept), abs=1e-3)
    # exact: step n stays at (n + 1) / 1000, the solver starts at the last kept step.
    assert exact.T == kept / 1000
    assert float(exact.model_time(th.tensor(exact.T))) == pytest.approx(kept - 1, abs=1e-3)
    n = np.array([0, 400, kept - 1])
    t = th.tensor((n + 1) / 1000.0, dtype=th.float32)
    np.testing.assert_allclose(exact.alpha(t).double().numpy() ** 2, abar[n], rtol=1e-4)


class CountingModel(th.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.times = []

    def forward(self, x, t, **kwargs):
        self.times.append(float(t[0]))
        return self.model(x, t, **kwargs)


def _solve(model, sag, steps=6, order=2, skip_type="time_uniform"):
    schedule = DiscreteVPSchedule(get_named_beta_schedule("linear", 1000))
    sampler = Sampler.dpm_solver_pp(schedule, steps, order, skip_type)
    denoiser = GuidedDenoiser(model, learn_sigma=True, sag=sag)
    gen = BatchGenerator([0, 1])
    return list(sampler(denoiser, gen.randn((2, 3, 16, 16)), {}, gen))


def test_solver_evaluates_once_per_step_and_guides_the_last_guide_start():
    base, _ = tiny_model()
    model = CountingModel(base)
    steps = _solve(model, None)
    assert len(model.times) == 6 and [i for i, _ in steps] == [5, 4, 3, 2, 1, 0]
    assert model.times[0] == pytest.approx(999.0, abs=1e-3)  # T = 1: model time 1000 (1 - 1/1000)
    assert all(a > b for a, b in zip(model.times, model.times[1:]))
    plain_times = list(model.times)
    for start, guided in ((1000, 6), (2, 2), (0, 0)):
        model.times.clear()
        sag = SelfAttentionGuidance(base, scale=1.5, start=start, depth=0, num_heads=2)
        steps = _solve(model, sag)
        assert len(model.times) == 6 + guided
        with_pictures = [i for i, step in steps if "sag_mask" in step]
        assert with_pictures == [i for i in (5, 4, 3, 2, 1, 0) if i < start]
        # The second pass runs at the first pass's time.
        assert sorted(set(model.times)) == sorted(set(plain_times))


def _architecture_doc_sampler():
    """The sampler that docs/ARCHITECTURE.md shows under "Adding a sampler", as written there."""
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
        text = f.read()
    block = text.split("## Adding a sampler", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"th": th, "DiffusionTimes": DiffusionTimes}
    exec(compile(block, "docs/ARCHITECTURE.md", "exec"), namespace)
    return namespace["ddim_eta0"]


@pytest.mark.parametrize("guide_scale", [1.0, 1.5])
def test_the_architecture_docs_sampler_is_upstreams_ddim(guide_scale):
    # The docs' claim: a sampler is one function over the denoiser, and SAG
    # comes with it. Its samples must be upstream's DDIM (eta 0) on the same
    # denoiser, SAG on every step or off.
    model, diffusion = tiny_model()
    sag = SelfAttentionGuidance(model, scale=guide_scale, depth=0, num_heads=2)
    denoiser = GuidedDenoiser.for_diffusion(model, diffusion, sag=sag)
    gen = BatchGenerator([0, 1])
    x_T = gen.randn((2, 3, 16, 16))
    steps = list(Sampler.ddim(diffusion)(denoiser, x_T, {}, gen))
    assert len([i for i, step in steps if "sag_mask" in step]) == (4 if guide_scale != 1.0 else 0)
    ours = list(_architecture_doc_sampler()(denoiser, x_T, diffusion=diffusion))
    assert [i for i, _ in ours] == [i for i, _ in steps] == [3, 2, 1, 0]
    assert th.allclose(ours[-1][1]["sample"], steps[-1][1]["sample"], atol=1e-5)
    assert not th.allclose(ours[0][1]["sample"], x_T, atol=1e-2)


def test_solver_times_invert_each_other():
    schedule = DiscreteVPSchedule(get_named_beta_schedule("cosine", 1000))
    times = SolverTimes(schedule, schedule.time_steps("logSNR", 5)[:-1])
    t = times.evaluated[2].expand(3)
    x, eps = th.randn(3, 3, 4, 4), th.randn(3, 3, 4, 4)
    x0 = times.x0_from_eps(x, t, eps)
    assert th.allclose(times.renoise(x0, t, eps), x, atol=1e-5)
    assert th.allclose(times.eps_from_x0(x, t, x0), eps, atol=1e-4)
    assert times.steps_left(t) == 2


def _args(flags):
    return cli.parse_sample_args(image_sample.create_argparser(), f"{TINY} {flags}".split())


@pytest.mark.parametrize("flags,message", [
    ("--sampler dpmsolver++ --use_ddim True", "--use_ddim True and --sampler dpmsolver++ disagree"),
    ("--sampler euler", "--sampler must be one of ddpm, ddim, dpmsolver++, sde-dpmsolver++"),
    ("--sampler sde-dpmsolver++ --use_ddim True", "--use_ddim True and --sampler sde-dpmsolver++ disagree"),
    ("--sampler sde-dpmsolver++ --solver_order 3", "--solver_order must be 1 or 2 with --sampler sde-dpmsolver++"),
    ("--sampler sde-dpmsolver++ --solver_steps 0", "--solver_steps must be at least"),
    ("--sampler dpmsolver++ --solver_order 4", "--solver_order must be 1, 2 or 3"),
    ("--sampler dpmsolver++ --solver_steps 2 --solver_order 3", "--solver_steps must be at least"),
    ("--sampler dpmsolver++ --skip_type cosine", "--skip_type must be one of"),
    ("--sampler dpmsolver++ --solver_time_map linear", "--solver_time_map must be one of"),
])
def test_bad_sampler_flags(flags, message):
    with pytest.raises(cli.UsageError, match=message.replace("+", r"\+")):
        _args(flags)


def test_sampler_from_flags_and_the_log_says_respacing_does_not_apply():
    model, diffusion = tiny_model()
    assert Sampler.from_args(_args("--sampler ddpm"), diffusion).name == "ddpm"
    assert Sampler.from_args(_args("--use_ddim True --eta 0.5"), diffusion).eta == 0.5
    args = _args("--sampler dpmsolver++ --solver_steps 7 --solver_order 3 --skip_type time_uniform "
                 "--timestep_respacing 4")
    draw = drawer.make_drawer(args, model, diffusion, None)
    assert (draw.sampler.name, draw.sampler.steps, draw.sampler.order) == ("dpmsolver++", 7, 3)
    lines = drawer.describe_setup(args, model, draw)
    assert "DPM-Solver++ 3M, 7 steps (time_uniform) over the full 1000-step schedule" in lines[1]
    assert "--timestep_respacing 4 does not apply to dpmsolver++" in lines[2]
    assert sorted(draw.sampler.model_timesteps()) == list(range(7))


def test_sde_solver_draws_each_positions_noise_from_its_own_generator():
    model, diffusion = tiny_model()
    args = _args("--class_cond False --sampler sde-dpmsolver++ --solver_steps 4 --skip_type logSNR --seed 3")
    draw = drawer.make_drawer(args, model, diffusion, None)
    assert drawer.describe_setup(args, model, draw)[1].startswith("SDE-DPM-Solver++ 2M, 4 steps (logSNR)")
    whole, _ = draw([0, 1, 2, 3])
    halves = np.concatenate([draw([0, 1])[0], draw([2, 3])[0]])
    diff = np.abs(whole.astype(int) - halves.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # The same x_T through the ODE: the SDE's own noise changes the samples.
    ode_args = _args("--class_cond False --sampler dpmsolver++ --solver_steps 4 --skip_type logSNR --seed 3")
    ode = drawer.make_drawer(ode_args, model, diffusion, None)
    assert (np.abs(ode([0, 1, 2, 3])[0].astype(int) - whole.astype(int)) > 2).mean() > 0.5


@pytest.mark.parametrize("flags,want", [
    ("", ("sde-dpmsolver++", "50")),
    ("--use_ddim True", ("ddim", "50")),
    ("--use_ddim False", ("sde-dpmsolver++", "50")),
    ("--timestep_respacing 100", ("ddpm", "100")),
    ("--timestep_respacing 100 --use_ddim True", ("ddim", "100")),
    ("--sampler dpmsolver++ --timestep_respacing 100", ("dpmsolver++", "100")),
    ("--sampler ddpm", ("ddpm", "50")),
])
def test_upstream_sampler_flags_override_a_cards_solver(tmp_path, flags, want):
    """A card with a solver: upstream's --use_ddim / --timestep_respacing still pick upstream's samplers."""
    (tmp_path / "m.json").write_text(json.dumps({"flags": {
        "sampler": "sde-dpmsolver++", "solver_steps": 20, "timestep_respacing": "50"}}))
    args = cli.parse_sample_args(image_sample.create_argparser(),
                                 f"{TINY} --model_path {tmp_path / 'm.pt'} {flags}".split())
    assert (sampler_name(args), args.timestep_respacing) == want
    assert ("sampler" in args.from_card) == (want[0] == "sde-dpmsolver++")  # the card's, not overridden


@pytest.mark.parametrize("flags,told", [
    ("", False),
    ("--sampler dpmsolver++", False),
    ("--sampler dpmsolver++ --timestep_respacing 100", True),
    ("--sampler dpmsolver++ --timestep_respacing 50", True),
])
def test_the_log_tells_of_respacing_only_when_the_user_gave_it(tmp_path, flags, told):
    """The card's respacing (for --sampler ddpm) is its own; only a respacing on the command line is reported."""
    from improved_diffusion.run.shards import make_fingerprint

    (tmp_path / "m.json").write_text(json.dumps({"flags": {
        "sampler": "sde-dpmsolver++", "solver_steps": 5, "timestep_respacing": "50"}}))
    args = cli.parse_sample_args(image_sample.create_argparser(),
                                 f"{TINY} --model_path {tmp_path / 'm.pt'} {flags}".split())
    model, diffusion = tiny_model()
    draw = drawer.make_drawer(args, model, diffusion, None)
    lines = drawer.describe_setup(args, model, draw)
    assert any("does not apply" in line for line in lines) == told, lines
    assert "from_card" not in make_fingerprint(args, "image_sample", {})


SOLVER_FLAGS = f"{TINY} --class_cond True --num_classes 10 --num_samples 6 --seed 4 --skip_type logSNR"


@needs_mpi
@pytest.mark.parametrize("solver", ["--sampler dpmsolver++ --solver_steps 5 --solver_order 3",
                                    "--sampler sde-dpmsolver++ --solver_steps 5 --solver_order 2"])
def test_solver_run_on_two_ranks_equals_one_with_pictures(ckpts, tmp_path, solver):
    """A solver run is just another sampler: ranks, shards, npz and SAG pictures."""
    flags = f"{SOLVER_FLAGS} {solver} --model_path {ckpts['cond']}"
    one = run_script("image_sample.py", f"{flags} --batch_size 3 --save_attention_masks True", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_script("image_sample.py", f"{flags} --batch_size 2", tmp_path / "two", ranks=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_npz(npz_files(tmp_path / "one")[0]), load_npz(npz_files(tmp_path / "two")[0])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    pictures = sorted((tmp_path / "one" / "attention_masks").iterdir())
    # 5 evaluations, all guided; 4 kept, named by index and model time.
    assert [p.name[:9] for p in pictures] == ["step_0004", "step_0003", "step_0001", "step_0000"][::-1]
    assert all(math.isfinite(float(p.name.split("_t")[1][:4])) for p in pictures)
