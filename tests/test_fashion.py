"""Fashion-MNIST data path and measuring-classifier tests (tiny fake data, CPU, fast)."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import script_module
from evaluations.fashion_mnist import (
    CLASS_NAMES,
    FashionMNISTMissingError,
    load_fashion_mnist,
    to_rgb32,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONVERTER = os.path.join(ROOT, "scripts", "fashion_mnist_to_images.py")
METRICS = os.path.join(ROOT, "evaluations", "fashion_metrics.py")


conv = script_module("fashion_mnist_to_images")
fm = script_module("fashion_metrics", "evaluations")


def _write_idx(path, arr, gz):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data += arr.tobytes()
    with (gzip.open if gz else open)(path + (".gz" if gz else ""), "wb") as f:
        f.write(data)


def _fake_dataset(root, gz, n_train=23, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: padding detectable
        labels = (np.arange(n) * 7 + 3) % 10
        _write_idx(os.path.join(root, "%s-images-idx3-ubyte" % prefix), images, gz)
        _write_idx(os.path.join(root, "%s-labels-idx1-ubyte" % prefix), labels, gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_load_and_to_rgb32(tmp_path, gz):
    src = str(tmp_path / "src")
    truth = _fake_dataset(src, gz)
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, source_dir=src)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, truth[split][0])
        np.testing.assert_array_equal(labels, truth[split][1])
    rgb = to_rgb32(images)
    assert rgb.shape == (len(images), 32, 32, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, 2:30, 2:30, 0], images)
    assert (rgb[:, :2] == 0).all() and (rgb[:, 30:] == 0).all()
    assert (rgb[:, :, :2] == 0).all() and (rgb[:, :, 30:] == 0).all()
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("gz", [True, False])
def test_converter_naming_and_label_order(tmp_path, gz):
    src = str(tmp_path / "src")
    truth = _fake_dataset(src, gz)
    out = str(tmp_path / "out")
    assert conv.main(["--split", "train", "--out_dir", out, "--source_dir", src]) == 0
    files = sorted(os.listdir(out))
    images, labels = truth["train"]
    assert len(files) == len(images)
    # No leftover temp directories next to the output.
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    for f in files:
        prefix, rest = f.split("_", 1)
        idx = int(rest[: -len(".png")])
        label = int(prefix[:2])
        assert label == labels[idx]
        assert prefix == "%02d-%s" % (label, CLASS_NAMES[label])
        arr = np.array(Image.open(os.path.join(out, f)))
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, to_rgb32(images[idx : idx + 1])[0])
    # The training code's class indexing: sorted unique prefixes before "_".
    prefixes = sorted({f.split("_")[0] for f in files})
    sorted_classes = {x: i for i, x in enumerate(prefixes)}
    assert len(sorted_classes) == 10
    for f in files:
        idx = int(f.split("_", 1)[1][:-4])
        assert sorted_classes[f.split("_")[0]] == labels[idx]

    # --limit and refusal to clobber without --overwrite.
    assert conv.main(["--split", "test", "--out_dir", out, "--source_dir", src, "--limit", "5"]) == 2
    assert conv.main(
        ["--split", "test", "--out_dir", out, "--source_dir", src, "--limit", "5", "--overwrite"]
    ) == 0
    assert len(os.listdir(out)) == 5


def test_class_names_file_safe_and_sort_stable():
    assert len(CLASS_NAMES) == 10
    for n in CLASS_NAMES:
        assert n.isalnum() and n.islower()
    prefixes = ["%02d-%s" % (i, n) for i, n in enumerate(CLASS_NAMES)]
    assert sorted(prefixes) == prefixes


def test_missing_source_one_line_error(tmp_path):
    with pytest.raises(FashionMNISTMissingError):
        load_fashion_mnist("train", source_dir=str(tmp_path / "nope"))
    r = subprocess.run(
        [sys.executable, CONVERTER, "--split", "train", "--out_dir", str(tmp_path / "o"),
         "--source_dir", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "\n" not in err, err
    assert "make fashion-data" in err and "dataset-fashion-mnist" in err
    assert not (tmp_path / "o").exists()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return fm.FashionClassifier(channels=(4, 8), feat_dim=16).eval()


def _rand_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def direct_features(model, images):
    """Penultimate features straight from the network: images / 127.5 - 1, NCHW."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        _, feats = model.eval()(x.contiguous(), return_features=True)
    return feats.double().numpy()


def independent_fid(f1, f2):
    """
    FID written out in float64: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2),
    the last trace as the sum of the square roots of the eigenvalues of S1 S2
    (real and >= 0 for covariance matrices), not through a matrix square root.
    """
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    eig = np.linalg.eigvals(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_independent_fid_by_hand():
    # 1-D: N(0, 1) vs N(3, 4): 9 + 1 + 4 - 2 * 2 = 10.
    a = np.array([[-1.0], [1.0]])  # mean 0, sample variance 2
    b = np.array([[1.0], [5.0]])  # mean 3, sample variance 8
    assert independent_fid(a, b) == pytest.approx(9 + 2 + 8 - 2 * 4)
    assert fm.frechet_distance([0.0], [[2.0]], [3.0], [[8.0]]) == pytest.approx(11.0)


def test_features_shape_and_fid_self_zero():
    model = _tiny_model()
    imgs = _rand_images(64, 1)
    f = fm.features(model, imgs, batch_size=17)
    assert f.shape == (64, 16) and f.dtype == np.float64
    np.testing.assert_allclose(f, fm.features(model, imgs, batch_size=64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f, direct_features(model, imgs), rtol=1e-5, atol=1e-6)
    assert abs(fm.feature_fid(imgs, imgs, model=model)) < 1e-4
    other = np.clip(_rand_images(64, 2).astype(int) // 4, 0, 255).astype(np.uint8)
    assert fm.feature_fid(imgs, other, model=model) > 1e-3


def test_frechet_distance_known_value():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    s1, s2 = np.eye(3), 4 * np.eye(3)
    # |mu|^2 = 9; tr(s1 + s2 - 2 sqrt(s1 s2)) = 3 + 12 - 12 = 3
    assert fm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(12.0, abs=1e-8)


def test_colour_cast_by_hand():
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[0, 0, 0] = (10, 10, 10)   # gray: 0
    img[0, 0, 1] = (0, 255, 7)    # 255
    img[0, 1, 0] = (200, 190, 20)  # 180
    img[0, 1, 1] = (3, 4, 5)      # 2
    assert fm.colour_cast(img) == pytest.approx((0 + 255 + 180 + 2) / 4)
    gray = np.repeat(_rand_images(4, 5)[..., :1], 3, axis=-1)
    assert fm.colour_cast(gray) == 0.0


def test_accuracy_tiny_model():
    model = _tiny_model()
    imgs = _rand_images(40, 3)
    preds = fm.predict(model, imgs, batch_size=7)
    assert preds.shape == (40,) and preds.dtype == np.int64
    # The labels straight from the network (images / 127.5 - 1, NCHW, one batch), not from predict.
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        direct = model(x).argmax(1).numpy()
    assert len(set(direct.tolist())) > 1  # a test of which class, not of a constant
    np.testing.assert_array_equal(preds, direct)
    assert fm.accuracy(model, imgs, direct) == 1.0
    wrong = (preds + 1) % 10
    assert fm.accuracy(model, imgs, wrong) == 0.0
    half = preds.copy()
    half[:10] = wrong[:10]
    assert fm.accuracy(model, imgs, half) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        fm.accuracy(model, imgs, preds[:5])


def test_checkpoint_roundtrip(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "c.pt")
    torch.save(model.state_dict(), path)
    loaded = fm.load_eval_classifier(path)
    assert loaded.channels == (4, 8) and loaded.feat_dim == 16
    imgs = _rand_images(8, 4)
    np.testing.assert_allclose(fm.features(model, imgs), fm.features(loaded, imgs), atol=1e-6)


def test_cli_score(tmp_path):
    src = str(tmp_path / "src")
    _fake_dataset(src, gz=True, n_test=30)
    model = _tiny_model()
    ckpt = str(tmp_path / "clf.pt")
    torch.save(model.state_dict(), ckpt)
    imgs = _rand_images(20, 5)
    labels = fm.predict(model, imgs)
    labels[:5] = (labels[:5] + 1) % 10
    npz = str(tmp_path / "samples.npz")
    np.savez(npz, imgs, labels)
    stats = str(tmp_path / "ref_stats.npz")
    cmd = [sys.executable, METRICS, "score", npz, "--ref", "test", "--classifier", ckpt,
           "--ref_stats", stats, "--source_dir", src]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = dict(l.split(": ", 1) for l in r.stdout.strip().splitlines())
    assert float(lines["accuracy"]) == pytest.approx(0.75)
    fid = float(lines["feature FID vs test split"])
    ref_imgs = to_rgb32(load_fashion_mnist("test", source_dir=src)[0])
    want = independent_fid(direct_features(model, imgs), direct_features(model, ref_imgs))
    assert want > 1e-3
    assert fid == pytest.approx(want, rel=1e-4, abs=2e-6)
    assert os.path.isfile(stats)
    # Second run uses the cache (source gone) and gives the same number.
    r2 = subprocess.run(cmd[:-2] + ["--source_dir", str(tmp_path / "gone")],
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout


def test_noisy_classifier_accuracy(tmp_path):
    """The guidance classifier's accuracy on diffused test images, against a direct computation."""
    from improved_diffusion.checkpoints.loading import classifier_from_card

    src = str(tmp_path / "src")
    data = _fake_dataset(src, gz=True, n_test=12)
    path = os.path.join(ROOT, "models", "fashion32_classifier.pt")
    got = fm.noisy_classifier_accuracy(path, timesteps=(0, 600), num_images=10, seed=4,
                                       source_dir=src)
    classifier, diffusion = classifier_from_card(path, torch.device("cpu"))
    x0 = torch.from_numpy(to_rgb32(data["test"][0][:10])).permute(0, 3, 1, 2).double() / 127.5 - 1
    for t in (0, 600):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4 + t)).double()
        abar = float(diffusion.alphas_cumprod[t])
        xt = (abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise).float()
        with torch.no_grad():
            pred = classifier(xt, torch.full((10,), t)).argmax(-1).numpy()
        assert got[t] == pytest.approx(np.mean(pred == data["test"][1][:10]))
    assert set(got) == {0, 600}
