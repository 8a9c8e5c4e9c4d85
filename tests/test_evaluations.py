"""
Tests for evaluations/: the PyTorch port of guided-diffusion's evaluator.

The network runs with random weights saved in the published layout
(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, names and shapes from
tests/data/fid_inception.json) on a few tiny images.
"""

import hashlib
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from conftest import env_for, published_layout, random_state_dict  # noqa: E402
from evaluations import evaluator as ev  # noqa: E402
from evaluations import fid_inception as fi  # noqa: E402
from evaluations.evaluator import (  # noqa: E402
    EvaluationError,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)

EVALUATOR = os.path.join(ROOT, "evaluations", "evaluator.py")


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def model(weights_path):
    return fi.load_fid_inception(weights_path)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def activations(model, images):
    evaluator = ev.Evaluator(model, batch_size=64, progress=False)
    return evaluator.compute_activations([images])


def run_main(argv, capsys):
    code = ev.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *fragments):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and ";" in lines[0], lines[0]
    for frag in fragments:
        assert frag in lines[0], lines[0]


# ----------------------------------------------------------------------------
# Network


def test_state_dict_has_published_layout():
    got = [
        (k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
        for k, v in fi.FIDInceptionV3().state_dict().items()
    ]
    assert got == published_layout()


def test_tf1_resize_bilinear_hand_computed():
    row = torch.tensor([10.0, 20.0]).view(1, 1, 1, 2)
    # scale 0.5: sources 0, .5, 1, 1.5 -> the last column repeats (no half-pixel centres).
    up = fi.tf1_resize_bilinear(row, 1, 4)
    assert up.flatten().tolist() == [10.0, 15.0, 20.0, 20.0]
    # down 4 -> 3: sources 0, 4/3, 8/3.
    down = fi.tf1_resize_bilinear(torch.tensor([0.0, 3.0, 6.0, 9.0]).view(1, 1, 1, 4), 1, 3)
    np.testing.assert_allclose(down.flatten().numpy(), [0.0, 4.0, 8.0], rtol=1e-6)
    # 2-D: top + (bottom - top) * y_lerp of x-interpolated rows.
    sq = torch.tensor([[0.0, 10.0], [100.0, 110.0]]).view(1, 1, 2, 2)
    out = fi.tf1_resize_bilinear(sq, 4, 4)[0, 0]
    want = [[0, 5, 10, 10], [50, 55, 60, 60], [100, 105, 110, 110], [100, 105, 110, 110]]
    assert out.tolist() == want
    # Not torch's half-pixel bilinear.
    assert not torch.allclose(out, F.interpolate(sq, size=(4, 4), mode="bilinear")[0, 0])


def test_tf1_resize_matches_loop_reference():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(2, 3, 13, 7)).astype(np.float32)
    out = fi.tf1_resize_bilinear(torch.from_numpy(img), 299, 299).numpy()
    want = np.empty((2, 3, 299, 299), np.float32)
    sy, sx = np.float32(13) / np.float32(299), np.float32(7) / np.float32(299)
    for i in range(299):
        y = np.float32(i) * sy
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), 12)
        yl = np.float32(y - np.floor(y))
        for j in range(299):
            x = np.float32(j) * sx
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), 6)
            xl = np.float32(x - np.floor(x))
            top = img[:, :, y0, x0] + (img[:, :, y0, x1] - img[:, :, y0, x0]) * xl
            bot = img[:, :, y1, x0] + (img[:, :, y1, x1] - img[:, :, y1, x0]) * xl
            want[:, :, i, j] = top + (bot - top) * yl
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-4)


def test_preprocess_scales_like_the_graph():
    x = torch.arange(256, dtype=torch.uint8).repeat(299 * 299 * 3 // 256 + 1)[: 299 * 299 * 3]
    x = x.view(1, 299, 299, 3)
    out = fi.FIDInceptionV3.preprocess(x)
    assert out.shape == (1, 3, 299, 299)
    assert torch.equal(out, (x.permute(0, 3, 1, 2).float() - 128) / 128)


def test_outputs_are_pool3_spatial_and_unbiased_softmax(model, images):
    seen = {}
    h1 = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(b1=o))
    h2 = model.Mixed_7c.register_forward_hook(lambda m, i, o: seen.update(last=o))
    try:
        with torch.inference_mode():
            pool, spatial = model(torch.from_numpy(images[:2]))
    finally:
        h1.remove()
        h2.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    assert seen["b1"].shape[1:] == (192, 17, 17) and seen["last"].shape[1:] == (2048, 8, 8)
    # first 7 channels after the ReLU, flattened in TensorFlow's (h, w, c) order
    want = seen["b1"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
    assert torch.equal(spatial, want) and (spatial >= 0).all()
    torch.testing.assert_close(pool, seen["last"].mean((2, 3)))
    probs = model.class_probabilities(pool)
    torch.testing.assert_close(probs, torch.softmax(pool @ model.fc.weight.t(), 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert model.fc.bias.abs().max() > 0  # the bias exists but, as published, is not used


# ----------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_hand_computed():
    # |1 - 3|^2 + 4 + 1 - 2 sqrt(4 * 1) = 5
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(5.0)
    # diagonal: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)


def test_frechet_distance_matches_scipy_and_eigen_formula():
    rng = np.random.default_rng(3)
    x1 = rng.normal(size=(200, 24))
    x2 = rng.normal(size=(150, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    mu1, s1 = ev.compute_statistics(x1)
    mu2, s2 = ev.compute_statistics(x2)
    np.testing.assert_allclose(s1, np.cov(x1, rowvar=False))
    got = frechet_distance(mu1, s1, mu2, s2)
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        linalg.sqrtm(s1 @ s2).real
    )
    r1 = linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    indep = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.clip(0)).sum()
    assert got == pytest.approx(ref, rel=1e-10)
    assert got == pytest.approx(indep, rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_singular_product_adds_eps():
    s1 = np.array([[0.0, 1.0], [0.0, 0.0]])  # product without a square root
    with pytest.warns(UserWarning, match="singular product"):
        got = frechet_distance([0.0, 0.0], s1, [0.0, 0.0], np.eye(2), eps=1e-6)
    # sqrtm((s1 + eps I)(1 + eps)) has trace 2 sqrt(eps (1 + eps))
    assert got == pytest.approx(2.0 - 4.0 * np.sqrt(1e-6 * (1 + 1e-6)), rel=1e-9)


def test_frechet_distance_imaginary_part():
    # tiny negative eigenvalue: imaginary diagonal 1e-4 <= 1e-3, real part kept
    assert frechet_distance([0, 0], np.diag([-1e-8, 1.0]), [0, 0], np.eye(2)) == pytest.approx(
        1.0 - 1e-8
    )
    with pytest.raises(EvaluationError, match="imaginary component"):
        frechet_distance([0, 0], np.diag([-1.0, 1.0]), [0, 0], np.eye(2))


def test_frechet_distance_bad_input():
    with pytest.raises(EvaluationError, match="different sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(EvaluationError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(EvaluationError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


# ----------------------------------------------------------------------------
# Inception score


def test_inception_score_hand_computed():
    assert inception_score(np.full((6, 4), 0.25, np.float32)) == pytest.approx(1.0)
    # distinct one-hot rows: KL to the uniform mean is log C for each row -> IS = C
    assert inception_score(np.eye(5, dtype=np.float32)) == pytest.approx(5.0, rel=1e-6)
    # two splits (one-hot of 4 classes, then identical rows) are averaged
    probs = np.concatenate([np.eye(4), np.full((4, 4), 0.25)]).astype(np.float32)
    assert inception_score(probs, split_size=4) == pytest.approx((4.0 + 1.0) / 2, rel=1e-6)


def test_inception_score_denormal_probability():
    # Two rows, 3 classes. Row 0 puts the smallest float32 (1.4e-45) on class 2,
    # whose mean over the rows underflows to 0: its term is about 1e-44, not
    # inf. The rest: rows (1 - d, 0, d) and (0, 1, 0), means (0.5, 0.5, 0):
    # each row has KL log 2 from the mean, so IS = 2.
    d = np.float32(1e-45)
    probs = np.array([[1 - d, 0, d], [0, 1, 0]], dtype=np.float32)
    assert probs[0, 2] > 0 and np.mean(probs[:, 2]) == 0
    assert inception_score(probs) == pytest.approx(2.0, rel=1e-6)


def test_inception_score_matches_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 10)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    scores = []
    for part in (probs[:12], probs[12:24], probs[24:]):
        p = part.astype(np.float64)
        marginal = p.mean(0)
        scores.append(np.exp(np.mean([np.sum(r * np.log(r / marginal)) for r in p])))
    assert inception_score(probs, split_size=12) == pytest.approx(np.mean(scores), rel=1e-5)


# ----------------------------------------------------------------------------
# Distances and precision/recall


def numpy_fp16_distances(u, v):
    """The published float16 recipe, written independently with numpy half arithmetic."""
    uh, vh = u.astype(np.float16), v.astype(np.float16)
    nu = (uh * uh).astype(np.float32).sum(1).astype(np.float16)
    nv = (vh * vh).astype(np.float32).sum(1).astype(np.float16)
    mm = (uh.astype(np.float32) @ vh.astype(np.float32).T).astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.maximum(nu[:, None] - np.float16(2) * mm + nv[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    d = (u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :]
    return np.maximum(d, 0)


def brute_force_pr(ref, samp, k, dist):
    def radii(x):
        return np.sort(dist(x, x), axis=1)[:, k]

    rr, rs = radii(ref), radii(samp)
    d = dist(ref, samp)
    precision = np.mean((d <= rr[:, None]).any(0))
    recall = np.mean((d <= rs[None, :]).any(1))
    return precision, recall


def float64_distances(u, v):
    u, v = u.astype(np.float64), v.astype(np.float64)
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)


def test_fp16_distances_hand_computed():
    # norms 10000 and 10000.25 both round to 10000 in half: the distance 0.25 becomes 0
    assert pairwise_distances([[100.0, 0.0]], [[100.0, 0.5]]).tolist() == [[0.0]]
    # 10009 rounds to 10008 in half: 10000 - 20000 + 10008 = 8 (true distance 9)
    assert pairwise_distances([[100.0, 0.0]], [[100.0, 3.0]]).tolist() == [[8.0]]
    # 300^2 overflows half: the whole block falls back to float32 (exact 9 for row 2)
    got = pairwise_distances([[300.0, 0.0], [100.0, 0.0]], [[0.0, 1.0], [100.0, 3.0]])
    assert got.tolist() == [[90001.0, 40009.0], [10001.0, 9.0]]
    assert got.dtype == np.float32


def test_fp16_distances_match_numpy_half_recipe():
    rng = np.random.default_rng(5)
    # multiples of 1/4 below 16 in 128 dims: every float32 sum is exact in any order
    u = rng.integers(-64, 65, size=(40, 128)) / 4.0
    v = rng.integers(-64, 65, size=(30, 128)) / 4.0
    got = pairwise_distances(u, v)
    want = numpy_fp16_distances(u, v)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, float64_distances(u, v).astype(np.float32))


def test_manifold_radii_and_pr_hand_computed():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # 4th smallest squared distance, the point itself included
    np.testing.assert_array_equal(manifold_radii(ref, k=3), [9.0, 4.0, 4.0, 9.0, 81.0])
    np.testing.assert_array_equal(manifold_radii(ref, k=1), [1.0, 1.0, 1.0, 1.0, 49.0])
    samp = np.array([[0.5], [5.0], [13.0], [20.0], [40.0]])
    # sample radii (k=3): 380.25, 225, 156.25, 380.25, 1225
    # precision: 0.5 (to 0: 0.25 <= 9), 5 (to 3: 4 <= 9), 13 (to 10: 9 <= 81) in; 20, 40 out
    # recall: every ref point is within 380.25 of 0.5 (10: 90.25)
    assert precision_recall(ref, samp, k=3) == (3 / 5, 1.0)
    # `<=` is inclusive: a sample exactly on a radius counts
    assert precision_recall(ref, np.array([[6.0], [30.0], [40.0], [50.0]]), k=3)[0] == 0.25


def test_precision_recall_matches_brute_force_and_batching():
    rng = np.random.default_rng(6)
    ref = rng.integers(-6, 7, size=(23, 5)).astype(np.float32)  # exact in float16
    samp = rng.integers(-6, 7, size=(17, 5)).astype(np.float32) + 1
    want = brute_force_pr(ref, samp, 3, float64_distances)
    assert precision_recall(ref, samp) == pytest.approx(want, abs=0)
    for rb, cb, me in [(5, 3, 1 << 24), (4, 4, 7), (100, 2, 1)]:
        got = precision_recall(ref, samp, row_batch_size=rb, col_batch_size=cb, max_elements=me)
        assert got == pytest.approx(want, abs=0)
        radii = manifold_radii(samp, row_batch_size=rb, col_batch_size=cb, max_elements=me)
        np.testing.assert_array_equal(radii, np.sort(float64_distances(samp, samp), 1)[:, 3])


def test_precision_recall_uses_float16_distances():
    rng = np.random.default_rng(7)
    # wide features with a large common offset: the float16 norms lose the small distances
    ref = (48 + rng.integers(-8, 9, size=(60, 128))) / 4.0
    samp = (48 + rng.integers(-8, 9, size=(50, 128))) / 4.0 + 0.25
    got = precision_recall(ref, samp)
    assert got == pytest.approx(brute_force_pr(ref, samp, 3, numpy_fp16_distances), abs=0)
    assert got != pytest.approx(brute_force_pr(ref, samp, 3, float64_distances), abs=1e-3)


def test_precision_recall_bad_input():
    with pytest.raises(EvaluationError, match="same network layer"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(EvaluationError, match="at least k\\+1=4"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))
    with pytest.raises(EvaluationError, match="NaN"):
        manifold_radii(np.full((5, 2), np.nan))


# ----------------------------------------------------------------------------
# npz reading


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_batches_stream_in_order(tmp_path, compressed):
    arr = np.random.default_rng(8).integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "x.npz")
    (np.savez_compressed if compressed else np.savez)(path, arr, np.arange(7))
    batch = ev.NpzBatch(path)
    assert len(batch) == 7 and batch.statistics is None
    parts = list(batch.batches(3))
    assert [len(p) for p in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), arr)


# ----------------------------------------------------------------------------
# CLI


def test_cli_end_to_end_same_batch_gives_zero(tmp_path, model, images, activations):
    # The module's random weights with a classifier layer 100 times larger:
    # the same pool features (FID, sFID, precision, recall), but predictions
    # peaked enough for the Inception Score to be well above 1.
    state = random_state_dict()
    state["fc.weight"] = state["fc.weight"] * 100
    weights_path = str(tmp_path / "pt_inception-peaked.pth")
    torch.save(state, weights_path)
    # Reference with stored statistics (the published format), samples without.
    (mu, sigma), (mu_s, sigma_s) = (ev.compute_statistics(a) for a in activations)
    ref = tmp_path / "ref.npz"
    np.savez(ref, images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    sample = tmp_path / "sample.npz"
    np.savez_compressed(sample, images)
    env = env_for(OPENBLAS_NUM_THREADS="1")  # faster sqrtm on a shared 2-core box
    proc = subprocess.run(
        [sys.executable, EVALUATOR, str(ref), str(sample), "--inception_path", weights_path,
         "--batch_size", "3"],
        capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    values = dict(ln.split(": ", 1) for ln in lines if ": " in ln)
    assert [ln.split(":")[0] for ln in lines[-5:]] == [
        "Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert lines[0] == "computing reference batch activations..."
    assert "sample batch" in proc.stderr and "3/3" in proc.stderr  # progress bars, 8 = 3+3+2
    assert abs(float(values["FID"])) < 1e-3 * np.trace(sigma)
    assert abs(float(values["sFID"])) < 1e-3 * np.trace(sigma_s)
    assert float(values["Precision"]) == 1.0 and float(values["Recall"]) == 1.0
    # Inception Score written out here in float64 from the pool features and
    # the fc weights that were saved (logits pool @ W^T without the bias, as
    # the published evaluator reads them): exp(E_x KL(p(y|x) || p(y))).
    w = state["fc.weight"].double().numpy()
    logits = activations[0].astype(np.float64) @ w.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0, keepdims=True)
    mean_kl = float(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    assert mean_kl > 0.01, mean_kl  # IS about 1.02: not the uniform 1.0
    got = float(values["Inception Score"])
    assert got == pytest.approx(np.exp(mean_kl), rel=1e-5)
    assert np.log(got) == pytest.approx(mean_kl, rel=1e-3)


def test_activations_do_not_depend_on_batching(model, images, activations):
    evaluator = ev.Evaluator(model, progress=False)
    pool, spatial = evaluator.compute_activations([images[:5], images[5:]])
    np.testing.assert_allclose(pool, activations[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spatial, activations[1], rtol=1e-4, atol=1e-5)


@pytest.fixture
def good_npz(tmp_path, images):
    path = tmp_path / "good.npz"
    np.savez(path, images)
    return str(path)


def _stats(**override):
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048, dtype=np.float32),
             "mu_s": np.zeros(2023), "sigma_s": np.eye(2023, dtype=np.float32)}
    stats.update(override)
    return stats


@pytest.mark.parametrize(
    "case, save, fragments",
    [
        ("no_arr_0", lambda p, x: np.savez(p, images=x), ["no arr_0", "images"]),
        ("float_images", lambda p, x: np.savez(p, x.astype(np.float32)), ["float32", "uint8"]),
        ("grayscale", lambda p, x: np.savez(p, x[..., 0]), ["shape (8, 16, 16)"]),
        ("nchw", lambda p, x: np.savez(p, x.transpose(0, 3, 1, 2)), ["shape (8, 3, 16, 16)"]),
        ("rgba", lambda p, x: np.savez(p, np.concatenate([x, x[..., :1]], -1)), ["[N, H, W, 3]"]),
        ("nan_stats", lambda p, x: np.savez(p, x, **_stats(mu=np.full(2048, np.nan))),
         ["mu has NaN"]),
        ("wrong_stat_size", lambda p, x: np.savez(p, x, **_stats(mu_s=np.zeros(1000))),
         ["mu_s has shape (1000,)", "another network"]),
        ("partial_stats", lambda p, x: np.savez(p, x, mu=np.zeros(2048)), ["lacks sigma"]),
        ("not_npz", lambda p, x: open(p, "wb").write(b"hello"), ["not a readable npz"]),
        ("too_few", lambda p, x: np.savez(p, x[:3]), ["has 3 images", "at least 4"]),
    ],
)
def test_cli_bad_npz(tmp_path, capsys, images, good_npz, weights_path, case, save, fragments):
    bad = str(tmp_path / f"{case}.npz")
    save(bad, images)
    for argv in ([bad, good_npz], [good_npz, bad]):
        code, out, err = run_main(argv + ["--inception_path", weights_path], capsys)
        assert_one_error_line(code, err, bad, *fragments)
        assert "Inception Score" not in out


def test_cli_missing_files(tmp_path, capsys, good_npz, weights_path):
    code, _, err = run_main([str(tmp_path / "nope.npz"), good_npz,
                             "--inception_path", weights_path], capsys)
    assert_one_error_line(code, err, "nope.npz not found")
    code, _, err = run_main([good_npz, good_npz, "--inception_path", str(tmp_path / "w.pth")],
                            capsys)
    assert_one_error_line(code, err, "w.pth does not exist")


def test_cli_inception_of_another_layout(tmp_path, capsys, good_npz):
    torchvision_like = random_state_dict()
    torchvision_like["fc.weight"] = torch.zeros(1000, 2048)
    torchvision_like["fc.bias"] = torch.zeros(1000)
    torchvision_like["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    del torchvision_like["Mixed_7c.branch_pool.conv.weight"]
    path = tmp_path / "inception_v3_google.pth"
    torch.save(torchvision_like, path)
    code, _, err = run_main([good_npz, good_npz, "--inception_path", str(path)], capsys)
    assert_one_error_line(code, err, "not in the layout of pt_inception-2015-12-05-6726825d.pth",
                          "1 missing", "1 unexpected", "2 of another shape")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(1000))
    code, _, err = run_main([good_npz, good_npz, "--inception_path", str(junk)], capsys)
    assert_one_error_line(code, err, "cannot read Inception weights")

    torch.save({"model": random_state_dict()}, tmp_path / "wrapped.pth")
    code, _, err = run_main([good_npz, good_npz, "--inception_path",
                             str(tmp_path / "wrapped.pth")], capsys)
    assert_one_error_line(code, err, "state_dict of tensors")


def test_cli_device_and_batch_size(capsys, good_npz, weights_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main([good_npz, good_npz, "--inception_path", weights_path,
                             "--device", "cuda"], capsys)
    assert_one_error_line(code, err, "CUDA is not available")
    code, _, err = run_main([good_npz, good_npz, "--inception_path", weights_path,
                             "--batch_size", "0"], capsys)
    assert_one_error_line(code, err, "--batch_size must be positive")


# ----------------------------------------------------------------------------
# Download


class _Server:
    def __init__(self, directory):
        self.requests = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(directory), **kw)

            def do_GET(self):
                log.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def test_download_into_cache_once(tmp_path, weights_path):
    served = tmp_path / "srv"
    served.mkdir()
    data = open(weights_path, "rb").read()
    (served / "w.pth").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    with _Server(served) as srv:
        url = srv.url + "/w.pth"
        path = fi.resolve_inception_weights(cache_dir=str(cache), url=url, sha256_prefix=sha[:8],
                                            progress=False)
        assert path == str(cache / fi.FID_WEIGHTS_FILENAME)
        assert open(path, "rb").read() == data
        assert os.listdir(cache) == [fi.FID_WEIGHTS_FILENAME]  # no temporary left
        assert fi.resolve_inception_weights(cache_dir=str(cache), url=url) == path
        assert srv.requests == ["/w.pth"]  # downloaded once
        fi.load_fid_inception(path)

        other = tmp_path / "other"
        with pytest.raises(EvaluationError, match="sha256"):
            fi.resolve_inception_weights(cache_dir=str(other), url=url, sha256_prefix="0000dead",
                                         progress=False)
        assert os.listdir(other) == []
        with pytest.raises(EvaluationError, match="could not download .*--inception_path"):
            fi.resolve_inception_weights(cache_dir=str(other), url=srv.url + "/missing.pth",
                                         progress=False)
        assert os.listdir(other) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fi.default_cache_dir() == os.path.join(str(tmp_path), "improved_diffusion_sag")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fi.default_cache_dir() == os.path.join(str(tmp_path), ".cache", "improved_diffusion_sag")
