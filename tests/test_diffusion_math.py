"""
The diffusion maths against values computed independently of the code under
test: closed forms written here in float64 numpy (or plain Python), and small
schedules whose numbers can be checked by hand.

The hand schedule used throughout is betas = [0.1, 0.2, 0.5]:
alphas = [0.9, 0.8, 0.5], alpha_bar = [0.9, 0.72, 0.36], so at t = 2
sqrt(alpha_bar) = 0.6 and sqrt(1 - alpha_bar) = 0.8.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch as th

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from improved_diffusion.respace import space_timesteps
from improved_diffusion.script_util import create_gaussian_diffusion

HAND_BETAS = [0.1, 0.2, 0.5]
HAND_ABAR = [0.9, 0.72, 0.36]


def make(var_type="FIXED_SMALL", mean_type="EPSILON", loss="MSE", betas=HAND_BETAS, **kw):
    return gd.GaussianDiffusion(
        betas=np.array(betas),
        model_mean_type=gd.ModelMeanType[mean_type],
        model_var_type=gd.ModelVarType[var_type],
        loss_type=gd.LossType[loss],
        **kw,
    )


def ts(t, n=1):
    return th.tensor([t] * n)


def f64(*values):
    return th.tensor(values, dtype=th.float64).reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------
# Beta schedules
# ---------------------------------------------------------------------------


def test_linear_schedule_hand_values():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[999] == pytest.approx(0.02, abs=1e-15)
    # Evenly spaced: beta_333 is a third of the way (333 / 999).
    assert betas[333] == pytest.approx(1e-4 + 0.0199 / 3, abs=1e-15)
    # Other lengths scale both ends by 1000 / T (Ho et al. extended).
    b100 = gd.get_named_beta_schedule("linear", 100)
    assert b100[0] == pytest.approx(1e-3, abs=1e-15)
    assert b100[-1] == pytest.approx(0.2, abs=1e-15)
    np.testing.assert_allclose(np.diff(b100), (0.2 - 1e-3) / 99, rtol=1e-9)


def cosine_abar(t):
    """Nichol & Dhariwal eq. 17, f(t) / f(0) with s = 0.008 (float64)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


def test_cosine_schedule_matches_alpha_bar():
    T = 1000
    betas = gd.get_named_beta_schedule("cosine", T)
    assert betas.shape == (T,)
    # The product of (1 - beta) follows alpha_bar(t / T) while no beta is clipped.
    abar = np.cumprod(1 - betas)
    for k in (1, 10, 250, 500, 900):
        assert abar[k - 1] == pytest.approx(cosine_abar(k / T), rel=1e-9)
    # The first beta is tiny (s = 0.008 offset) and the last is clipped at 0.999.
    assert betas[0] == pytest.approx(1 - cosine_abar(1 / T), rel=1e-9)
    assert betas[0] < 1e-4
    assert betas[-1] == 0.999
    assert (betas <= 0.999).all() and (np.diff(betas) > 0).all()
    # T = 2 by hand: beta_0 = 1 - f(0.5) / f(0), beta_1 = min(1 - f(1) / f(0.5), 0.999).
    b2 = gd.get_named_beta_schedule("cosine", 2)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert b2[0] == pytest.approx(1 - f(0.5) / f(0.0), rel=1e-12)
    assert b2[1] == 0.999


def test_unknown_schedule():
    with pytest.raises(NotImplementedError, match="quadratic"):
        gd.get_named_beta_schedule("quadratic", 10)


def test_derived_arrays_by_hand():
    d = make()
    np.testing.assert_allclose(d.alphas_cumprod, HAND_ABAR, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, [1.0, 0.9, 0.72], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_next, [0.72, 0.36, 0.0], rtol=1e-12)
    # beta_t (1 - abar_{t-1}) / (1 - abar_t): 0, 0.2*0.1/0.28, 0.5*0.28/0.64
    np.testing.assert_allclose(
        d.posterior_variance, [0.0, 0.02 / 0.28, 0.14 / 0.64], rtol=1e-12, atol=1e-15
    )
    # log clipped: the t = 0 entry repeats t = 1 (the true value is log 0).
    np.testing.assert_allclose(
        d.posterior_log_variance_clipped,
        np.log([0.02 / 0.28, 0.02 / 0.28, 0.14 / 0.64]),
        rtol=1e-12,
    )


# ---------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------


def fractional_steps(start, size, count):
    """Section steps start + round(k (size - 1) / (count - 1)), exact arithmetic."""
    if count == 1:
        return [start]
    out = []
    for k in range(count):
        x = Fraction(k * (size - 1), count - 1)
        out.append(start + math.floor(x + Fraction(1, 2)))
    return out


def test_respacing_plain_count_by_hand():
    # 999 / 7 = 142.714...: 0, 142.7, 285.4, 428.1, 570.9, 713.6, 856.3, 999.
    assert sorted(space_timesteps(1000, "8")) == [0, 143, 285, 428, 571, 714, 856, 999]
    assert sorted(space_timesteps(1000, [4])) == [0, 333, 666, 999]
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert sorted(space_timesteps(10, "1")) == [0]


def test_respacing_sections():
    # 300 steps in three sections of 100: 10, 20 and 30 steps each.
    got = sorted(space_timesteps(300, "10,20,30"))
    want = (
        list(range(0, 100, 11))
        + fractional_steps(100, 100, 20)
        + fractional_steps(200, 100, 30)
    )
    assert list(range(0, 100, 11)) == fractional_steps(0, 100, 10)
    assert got == want and len(got) == 60
    assert got[10:13] == [100, 105, 110] and got[-1] == 299
    # 1000 steps: sections of 334, 333 and 333 (the remainder goes first).
    got = sorted(space_timesteps(1000, "10,20,30"))
    want = (
        fractional_steps(0, 334, 10)
        + fractional_steps(334, 333, 20)
        + fractional_steps(667, 333, 30)
    )
    assert got == want
    assert got[9] == 333 and got[10] == 334 and got[-1] == 999


def test_respacing_ddim():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim8") == set(range(0, 1000, 125))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    # The smallest stride that gives exactly the count: 1000 / 143 -> 7 steps.
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    with pytest.raises(ValueError, match="exactly 6 steps"):
        space_timesteps(10, "ddim6")  # stride 1 gives 10, stride 2 gives 5
    with pytest.raises(ValueError):
        space_timesteps(30, "20,20,20")  # 20 steps from a section of 10


def linear_abar(T):
    """Cumulative alphas of the linear schedule, written out in numpy."""
    scale = 1000 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T)
    return np.cumprod(1 - betas)


def test_spaced_diffusion_keeps_alpha_bar_at_kept_steps():
    for respacing, kept in [("ddim25", list(range(0, 1000, 40))),
                            ("10,20,30", sorted(space_timesteps(1000, "10,20,30")))]:
        d = create_gaussian_diffusion(steps=1000, timestep_respacing=respacing)
        assert d.timestep_map == kept
        abar = linear_abar(1000)[kept]
        np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-10)
        np.testing.assert_allclose(d.betas[1:], 1 - abar[1:] / abar[:-1], rtol=1e-10)
        assert d.betas[0] == pytest.approx(1 - abar[0], rel=1e-10)


class RecordT:
    """A fake epsilon model: returns zeros, records the timesteps it is given."""

    def __init__(self, channels=1):
        self.seen = []
        self.channels = channels

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return th.zeros(x.shape[0], self.channels, *x.shape[2:], dtype=x.dtype)


@pytest.mark.parametrize("rescale", [False, True])
def test_model_sees_mapped_and_rescaled_timesteps(rescale):
    # 4000 base steps respaced to 4: kept 0, 1333, 2666, 3999 (3999 / 3 = 1333).
    d = create_gaussian_diffusion(steps=4000, timestep_respacing="4", rescale_timesteps=rescale)
    assert d.timestep_map == [0, 1333, 2666, 3999]
    model = RecordT()
    x = th.zeros(4, 1, 2, 2)
    d.p_mean_variance(model, x, th.tensor([0, 1, 2, 3]))
    (seen,) = model.seen
    if rescale:  # base step * 1000 / 4000, as floats
        assert seen.dtype.is_floating_point
        assert seen.tolist() == [0.0, 333.25, 666.5, 999.75]
    else:
        assert seen.tolist() == [0, 1333, 2666, 3999]
    # The plain process rescales its own index the same way: t * 1000 / T.
    plain = make(rescale_timesteps=True)
    model = RecordT()
    plain.p_mean_variance(model, th.zeros(3, 1, 2, 2), th.tensor([0, 1, 2]))
    assert model.seen[0].tolist() == pytest.approx([0.0, 1000 / 3, 2000 / 3])


# ---------------------------------------------------------------------------
# Forward process, posterior, predictions
# ---------------------------------------------------------------------------


def test_q_sample_and_predict_xstart_by_hand():
    d = make()
    x0, eps = f64(0.5, -1.0), f64(1.0, 0.25)
    t = ts(2, 2)
    # sqrt(abar_2) = 0.6, sqrt(1 - abar_2) = 0.8
    xt = d.q_sample(x0, t, noise=eps)
    np.testing.assert_allclose(xt.flatten(), [0.6 * 0.5 + 0.8, -0.6 + 0.2], rtol=1e-6)
    np.testing.assert_allclose(
        d._predict_xstart_from_eps(f64(1.1, -0.4), t, eps).flatten(), [0.5, -1.0], rtol=1e-6
    )
    np.testing.assert_allclose(
        d._predict_eps_from_xstart(f64(1.1, -0.4), t, x0).flatten(), [1.0, 0.25], rtol=1e-6
    )
    mean, var, logvar = d.q_mean_variance(x0, t)
    np.testing.assert_allclose(mean.flatten(), [0.3, -0.6], rtol=1e-6)
    np.testing.assert_allclose(var.flatten(), [0.64, 0.64], rtol=1e-6)
    np.testing.assert_allclose(logvar.flatten(), [math.log(0.64)] * 2, rtol=1e-6)


def bayes_posterior(x0, xt, abar_prev, alpha):
    """
    q(x_{t-1} | x_t, x_0) by Gaussian conjugacy (not the closed-form
    coefficients): prior N(sqrt(abar_prev) x0, 1 - abar_prev) for x_{t-1},
    likelihood N(sqrt(alpha) x_{t-1}, 1 - alpha) for x_t.
    """
    prior_prec = 1 / (1 - abar_prev)
    lik_prec = alpha / (1 - alpha)
    var = 1 / (prior_prec + lik_prec)
    mean = var * (math.sqrt(abar_prev) * x0 * prior_prec + math.sqrt(alpha) * xt / (1 - alpha))
    return mean, var


@pytest.mark.parametrize("t", [1, 2])
def test_q_posterior_matches_bayes(t):
    d = make()
    x0s, xts = [0.5, -1.0, 0.0], [1.1, 0.3, -2.0]
    mean, var, logvar = d.q_posterior_mean_variance(f64(*x0s), f64(*xts), ts(t, 3))
    abar_prev = [1.0, 0.9, 0.72][t]
    alpha = 1 - HAND_BETAS[t]
    for i, (x0, xt) in enumerate(zip(x0s, xts)):
        m, v = bayes_posterior(x0, xt, abar_prev, alpha)
        assert float(mean[i]) == pytest.approx(m, rel=1e-6, abs=1e-7)
        assert float(var[i]) == pytest.approx(v, rel=1e-6)
        assert float(logvar[i]) == pytest.approx(math.log(v), rel=1e-6)


def test_q_posterior_at_t0_is_x0():
    d = make()
    mean, var, logvar = d.q_posterior_mean_variance(f64(0.5), f64(3.0), ts(0))
    assert float(mean) == pytest.approx(0.5, rel=1e-6)
    assert float(var) == 0.0
    assert float(logvar) == pytest.approx(math.log(0.02 / 0.28), rel=1e-6)


def test_predict_xstart_from_xprev_inverts_the_posterior_mean():
    d = make(mean_type="PREVIOUS_X")
    m, _ = bayes_posterior(0.5, 1.1, 0.72, 0.5)  # t = 2
    got = d._predict_xstart_from_xprev(f64(1.1), ts(2), f64(m))
    assert float(got) == pytest.approx(0.5, rel=1e-5)


# ---------------------------------------------------------------------------
# Fixed and learned sigma
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("var_type", ["FIXED_SMALL", "FIXED_LARGE"])
def test_fixed_sigma(var_type):
    d = make(var_type=var_type)
    post = [0.0, 0.02 / 0.28, 0.14 / 0.64]
    if var_type == "FIXED_SMALL":  # the posterior variance (log clipped at t = 0)
        want = [post[1], post[1], post[2]]
        want_var = post
    else:  # beta_t, with the posterior variance at t = 0
        want = [post[1], 0.2, 0.5]
        want_var = want
    x = f64(0.3, 0.3, 0.3)
    out = d.p_mean_variance(RecordT(), x, th.tensor([0, 1, 2]), clip_denoised=False)
    np.testing.assert_allclose(out["variance"].flatten(), want_var, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["log_variance"].flatten(), np.log(want), rtol=1e-6)
    # eps = 0: pred_xstart = x_t / sqrt(abar_t); mean = the Bayes posterior mean.
    np.testing.assert_allclose(
        out["pred_xstart"].flatten(), [0.3 / math.sqrt(a) for a in HAND_ABAR], rtol=1e-6
    )
    for t in (1, 2):
        m, _ = bayes_posterior(0.3 / math.sqrt(HAND_ABAR[t]), 0.3, [1.0, 0.9, 0.72][t],
                               1 - HAND_BETAS[t])
        assert float(out["mean"][t]) == pytest.approx(m, rel=1e-6)


class LearnedRange:
    """A fake learned-sigma model: eps 0 and a fixed variance value v."""

    def __init__(self, v):
        self.v = v

    def __call__(self, x, t, **kwargs):
        return th.cat([th.zeros_like(x), th.full_like(x, self.v)], dim=1)


@pytest.mark.parametrize("v", [-1.0, 0.0, 1.0])
def test_learned_range_interpolates_log_variance(v):
    d = make(var_type="LEARNED_RANGE")
    out = d.p_mean_variance(LearnedRange(v), f64(0.3), ts(2), clip_denoised=False)
    lo, hi = math.log(0.14 / 0.64), math.log(0.5)
    want = (v + 1) / 2 * hi + (1 - v) / 2 * lo
    assert float(out["log_variance"]) == pytest.approx(want, rel=1e-6)
    assert float(out["variance"]) == pytest.approx(math.exp(want), rel=1e-6)


# ---------------------------------------------------------------------------
# Likelihood terms
# ---------------------------------------------------------------------------


def kl_closed_form(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) from standard deviations."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


@pytest.mark.parametrize(
    "m1,s1,m2,s2",
    [(0.0, 1.0, 0.0, 1.0), (1.0, 1.0, 0.0, 1.0), (0.0, 2.0, 0.0, 1.0),
     (0.3, 0.5, -0.2, 1.5), (2.0, 0.1, 1.0, 0.2)],
)
def test_normal_kl_closed_form(m1, s1, m2, s2):
    got = normal_kl(
        th.tensor(m1, dtype=th.float64), th.tensor(2 * math.log(s1), dtype=th.float64),
        th.tensor(m2, dtype=th.float64), th.tensor(2 * math.log(s2), dtype=th.float64),
    )
    assert float(got) == pytest.approx(kl_closed_form(m1, s1, m2, s2), rel=1e-12, abs=1e-15)


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def exact_discretized(x, m, s):
    """log P(bin of x) under N(m, s^2) with 256 bins on [-1, 1], edges open."""
    if x < -0.999:
        return math.log(phi((x - m + 1 / 255) / s))
    if x > 0.999:
        return math.log(1 - phi((x - m - 1 / 255) / s))
    return math.log(phi((x - m + 1 / 255) / s) - phi((x - m - 1 / 255) / s))


@pytest.mark.parametrize(
    "x,m,s",
    [(0.0, 0.0, 1.0), (0.5, 0.4, 0.1), (-1.0, -0.9, 0.2), (1.0, 0.2, 0.5),
     (-1.0, 1.0, 0.5), (127 / 127.5 - 1, 0.0, 0.01)],
)
def test_discretized_gaussian_log_likelihood(x, m, s):
    got = discretized_gaussian_log_likelihood(
        th.tensor([x], dtype=th.float64),
        means=th.tensor([m], dtype=th.float64),
        log_scales=th.tensor([math.log(s)], dtype=th.float64),
    )
    # The code uses guided-diffusion's tanh approximation of the normal CDF
    # (absolute error under 2e-4): compare probabilities, not logs, there.
    want = exact_discretized(x, m, s)
    assert math.exp(float(got)) == pytest.approx(math.exp(want), rel=2e-3, abs=2e-4)


def test_discretized_central_bin_by_hand():
    # N(0, 1), bin [-1/255, 1/255]: about 2/255 * pdf(0) = 0.0031287.
    got = discretized_gaussian_log_likelihood(
        th.zeros(1, dtype=th.float64), means=th.zeros(1, dtype=th.float64),
        log_scales=th.zeros(1, dtype=th.float64),
    )
    assert math.exp(float(got)) == pytest.approx(2 / 255 / math.sqrt(2 * math.pi), rel=1e-3)


class ExactEps:
    """A fake model that returns the true noise (plus an offset)."""

    def __init__(self, eps, offset=0.0, var_value=None):
        self.eps, self.offset, self.var_value = eps, offset, var_value

    def __call__(self, x, t, **kwargs):
        out = self.eps + self.offset
        if self.var_value is not None:
            out = th.cat([out, th.full_like(out, self.var_value)], dim=1)
        return out


def test_vb_term_zero_for_the_true_posterior():
    # Fixed-small variance and the true eps: p(x_{t-1}|x_t) is q(x_{t-1}|x_t,x_0).
    d = make(var_type="FIXED_SMALL")
    x0, eps = f64(0.5, -0.25), f64(1.0, -0.5)
    t = ts(2, 2)
    xt = d.q_sample(x0, t, noise=eps)
    out = d._vb_terms_bpd(ExactEps(eps), x0, xt, t, clip_denoised=False)
    np.testing.assert_allclose(out["output"], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["pred_xstart"].flatten(), [0.5, -0.25], rtol=1e-5)


def test_vb_term_fixed_large_and_offset_by_hand():
    # Fixed-large variance (beta_t) at t = 1, eps off by 0.1: the KL of two
    # Gaussians with the posterior's variance and beta_1 = 0.2, in bits.
    d = make(var_type="FIXED_LARGE")
    x0, eps = f64(0.5), f64(1.0)
    t = ts(1)
    xt = float(d.q_sample(x0, t, noise=eps))
    out = d._vb_terms_bpd(ExactEps(eps, offset=0.1), x0, f64(xt), t, clip_denoised=False)
    abar = 0.72
    x0_hat = (xt - math.sqrt(1 - abar) * 1.1) / math.sqrt(abar)
    m_true, v_true = bayes_posterior(0.5, xt, 0.9, 0.8)
    m_model, _ = bayes_posterior(x0_hat, xt, 0.9, 0.8)
    want = kl_closed_form(m_true, math.sqrt(v_true), m_model, math.sqrt(0.2)) / math.log(2)
    assert float(out["output"]) == pytest.approx(want, rel=1e-5)


def test_vb_term_at_t0_is_the_decoder_nll():
    d = make(var_type="FIXED_LARGE")
    x0, eps = f64(1.0), f64(0.3)
    t = ts(0)
    xt = d.q_sample(x0, t, noise=eps)
    out = d._vb_terms_bpd(ExactEps(eps), x0, xt, t, clip_denoised=False)
    # True eps: mean = x0 exactly at t = 0; std sqrt(posterior_variance[1]).
    s = math.sqrt(0.02 / 0.28)
    want = -exact_discretized(1.0, 1.0, s) / math.log(2)
    assert float(out["output"]) == pytest.approx(want, rel=2e-3)


def test_prior_bpd_by_hand():
    d = make()
    x0 = f64(0.5, -1.0)
    got = d._prior_bpd(x0)
    # q(x_T | x_0) = N(0.6 x0, 0.64) against N(0, 1).
    want = [kl_closed_form(0.6 * v, 0.8, 0.0, 1.0) / math.log(2) for v in (0.5, -1.0)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("loss", ["MSE", "RESCALED_MSE"])
def test_hybrid_loss(loss):
    # Learned range with v = 1 (variance beta_t), eps off by 0.1 at t = 1:
    # mse = 0.01, vb = the hand KL above (times T / 1000 when rescaled).
    d = make(var_type="LEARNED_RANGE", loss=loss)
    x0, eps = f64(0.5), f64(1.0)
    model = ExactEps(eps, offset=0.1, var_value=1.0)
    terms = d.training_losses(model, x0, ts(1), noise=eps)
    xt = float(d.q_sample(x0, ts(1), noise=eps))
    x0_hat = (xt - math.sqrt(0.28) * 1.1) / math.sqrt(0.72)
    m_true, v_true = bayes_posterior(0.5, xt, 0.9, 0.8)
    m_model, _ = bayes_posterior(x0_hat, xt, 0.9, 0.8)
    vb = kl_closed_form(m_true, math.sqrt(v_true), m_model, math.sqrt(0.2)) / math.log(2)
    if loss == "RESCALED_MSE":
        vb *= 3 / 1000
    assert float(terms["mse"]) == pytest.approx(0.01, rel=1e-6)
    assert float(terms["vb"]) == pytest.approx(vb, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(0.01 + vb, rel=1e-5)


def test_kl_loss_rescaled_by_num_timesteps():
    d_kl = make(var_type="FIXED_LARGE", loss="KL")
    d_rkl = make(var_type="FIXED_LARGE", loss="RESCALED_KL")
    x0, eps = f64(0.5), f64(1.0)
    a = d_kl.training_losses(ExactEps(eps, offset=0.1), x0, ts(1), noise=eps)["loss"]
    b = d_rkl.training_losses(ExactEps(eps, offset=0.1), x0, ts(1), noise=eps)["loss"]
    assert float(b) == pytest.approx(3 * float(a), rel=1e-9)
    assert float(a) > 0


# ---------------------------------------------------------------------------
# Flags that cannot be made: one error that names the flag
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,fragments",
    [
        (dict(steps=10, noise_schedule="cosine", timestep_respacing="ddim6"),
         ["--timestep_respacing 'ddim6'", "--diffusion_steps 10", "integer stride"]),
        (dict(steps=30, timestep_respacing="20,20,20"),
         ["--timestep_respacing '20,20,20'", "section of 10 steps into 20"]),
        (dict(steps=1000, timestep_respacing="fast"), ["--timestep_respacing 'fast'", "not a step count"]),
        (dict(steps=1000, timestep_respacing="0"), ["--timestep_respacing '0'", "no steps at all"]),
        (dict(steps=10), ["--noise_schedule linear with --diffusion_steps 10", "betas up to 2"]),
        (dict(steps=20), ["--noise_schedule linear with --diffusion_steps 20", "betas up to 1",
                          "--diffusion_steps 21 or more"]),
        (dict(steps=100, noise_schedule="quadratic"), ["--noise_schedule must be linear or cosine"]),
        (dict(steps=0), ["--diffusion_steps must be >= 1"]),
    ],
)
def test_impossible_diffusion_flags_name_the_flag(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        create_gaussian_diffusion(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_impossible_respacing_is_one_error_line_from_the_script(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, env_for, tiny_model

    model, _ = tiny_model()
    ckpt = tmp_path / "tiny.pt"
    th.save(model.state_dict(), ckpt)
    cmd = [sys.executable, f"{ROOT}/scripts/image_sample.py", "--image_size", "16",
           "--num_channels", "32", "--channel_mult", "1,1", "--num_res_blocks", "1",
           "--attention_resolutions", "8", "--num_heads", "2", "--learn_sigma", "True",
           "--timestep_respacing", "ddim300",
           "--num_samples", "1", "--model_path", str(ckpt)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env_for(tmp_path / "out"),
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        # strides 3 and 4 give 334 and 250 steps
        "error: --timestep_respacing 'ddim300' cannot be made from --diffusion_steps 1000 (cannot "
        "create exactly 300 steps with an integer stride from 1000); pass a step count from 1 to "
        "1000 (e.g. 250), comma-separated counts per equal section of the steps (e.g. 10,20,30), "
        "or ddimN for N steps at an integer stride"
    ]
