"""
FID, sFID, Inception Score, precision and recall of a sample batch against a
reference batch, in PyTorch, computed the way guided-diffusion's TensorFlow
evaluator (``evaluations/evaluator.py``) computes them.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz \
        [--inception_path PATH] [--device cpu|cuda] [--batch_size 64]

Both files hold ``arr_0``: uint8 images [N, H, W, 3]. A reference batch that
also holds ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (as the published ones do)
has its statistics used as they are; its images are still used for precision
and recall.

The maths is importable for features of your own::

    from evaluations.evaluator import (
        frechet_distance, inception_score, manifold_radii, precision_recall)
"""

import argparse
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `evaluations` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion.files.npz import (  # noqa: E402
    TruncatedMember,
    UnsupportedNpyVersion,
    iter_npz_rows,
    read_npy_header,
)
from evaluations.precision_recall import (  # noqa: E402
    manifold_radii,
    pairwise_distances,
    precision_recall,
)
from evaluations.fid_inception import (  # noqa: E402
    FID_WEIGHTS_FILENAME,
    POOL_DIM,
    SPATIAL_DIM,
    EvaluationError,
    FIDInceptionV3,
    load_fid_inception,
    resolve_inception_weights,
)

__all__ = [
    "EvaluationError",
    "Evaluator",
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "main",
    "manifold_radii",
    "pairwise_distances",
    "precision_recall",
]

SOFTMAX_BATCH_SIZE = 512


# ----------------------------------------------------------------------------
# Fréchet distance


def _sqrtm(a):
    """scipy.linalg.sqrtm, without its printed/deprecation noise on any scipy version."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = linalg.sqrtm(a, disp=False)
        except TypeError:  # scipy >= 1.18: no `disp`
            out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, quiet=False):
    """
    Fréchet distance between the Gaussians N(mu1, sigma1) (samples) and
    N(mu2, sigma2) (reference), as the published evaluator computes it:
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``
    with scipy's ``sqrtm``; if the square root of the product is not finite,
    ``eps`` is added to both diagonals and it is retried; the real part is kept
    when the imaginary part of the diagonal is within 1e-3 of 0.

    :param quiet: for features whose covariances are singular by nature
        (small networks, few samples; evaluations/fashion_metrics.py): no
        warning when ``eps`` is added, and the real part is kept whatever
        the imaginary part.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise EvaluationError(
            f"sample and reference means have different sizes: {mu1.shape} vs {mu2.shape}; "
            "compare statistics of the same network layer"
        )
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EvaluationError(
            f"covariances {sigma1.shape} and {sigma2.shape} do not match means of size {d}; "
            "compare statistics of the same network layer"
        )
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise EvaluationError(f"{name} has NaN or inf values; recompute the statistics")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        if not quiet:
            warnings.warn(
                f"fid calculation produces singular product; adding {eps} to diagonal of cov "
                "estimates"
            )
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not quiet and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise EvaluationError(
                f"the square root of the covariance product has an imaginary component {m:.3g}; "
                "use more samples (the covariances are too ill-conditioned)"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def compute_statistics(activations):
    """Mean and ``np.cov(rowvar=False)`` of [N, D] activations, in float64."""
    acts = np.asarray(activations, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise EvaluationError(
            f"need at least 2 activation rows [N, D] for statistics, got shape {acts.shape}; "
            "evaluate more images"
        )
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


# ----------------------------------------------------------------------------
# Inception score


def inception_score(probs, split_size=5000):
    """
    Inception Score of class probabilities [N, classes]: within each split of
    ``split_size`` rows, exp of the mean KL divergence of each row from the
    split's mean row; averaged over splits. Computed in the dtype of ``probs``
    (float32 from the network, as published). A probability of exactly 0
    contributes 0 (0 log 0 = 0) instead of NaN; so does a denormal one whose
    split mean underflows to 0 (p log(p / mean) is then about 1e-44, not inf).
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise EvaluationError(f"probabilities must be [N, classes] with N > 0, got {probs.shape}; "
                              "pass softmax outputs")
    split_size = int(split_size)
    if split_size < 1:
        raise EvaluationError(f"split_size must be positive, got {split_size}; use e.g. 5000")
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(0, len(probs), split_size):
            part = probs[i : i + split_size]
            marginal = np.expand_dims(np.mean(part, 0), 0)
            kl = part * (np.log(part) - np.log(marginal))
            kl = np.where((part > 0) & (marginal > 0), kl, np.zeros((), dtype=kl.dtype))
            kl = np.mean(np.sum(kl, 1))
            scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------
# npz batches


STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzBatch:
    """
    An npz batch: ``arr_0`` (uint8 [N, H, W, 3]) read in batches straight from
    the zip member (never all in memory), and optional statistics.
    Everything is checked when opened.
    """

    def __init__(self, path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "arr_0.npy" not in names:
                    held = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "nothing"
                    raise EvaluationError(
                        f"{path} has no arr_0 array (it holds: {held}); "
                        "save the images with np.savez(path, images) as uint8 [N, H, W, 3]"
                    )
                with zf.open("arr_0.npy") as f:
                    self.shape, self.fortran, self.dtype, self.header_ok = _read_npy_header(f)
                if not self.header_ok:
                    with np.load(path) as obj:
                        arr = obj["arr_0"]
                    self.shape, self.fortran, self.dtype = arr.shape, False, arr.dtype
                self.stat_names = [k for k in STAT_KEYS if f"{k}.npy" in names]
        except FileNotFoundError:
            raise EvaluationError(f"{path} not found; check the path") from None
        except IsADirectoryError:
            raise EvaluationError(f"{path} is a directory; pass an .npz file") from None
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            if isinstance(exc, EvaluationError):
                raise
            raise EvaluationError(
                f"{path} is not a readable npz file ({type(exc).__name__}: {exc}); "
                "pass a file written by np.savez"
            ) from None
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
            raise EvaluationError(
                f"{path}: arr_0 is {self.dtype} with shape {tuple(self.shape)}; "
                "expected uint8 images [N, H, W, 3] (NHWC, values 0..255)"
            )
        if self.shape[0] == 0 or self.shape[1] == 0 or self.shape[2] == 0:
            raise EvaluationError(f"{path}: arr_0 has shape {tuple(self.shape)} with no pixels; "
                                  "save at least one image")
        self.statistics = self._read_statistics() if self.stat_names else None

    def __len__(self):
        return int(self.shape[0])

    def _read_statistics(self):
        missing = [k for k in STAT_KEYS if k not in self.stat_names]
        if missing:
            raise EvaluationError(
                f"{self.path} has {', '.join(self.stat_names)} but lacks {', '.join(missing)}; "
                "store all of mu, sigma, mu_s, sigma_s or none"
            )
        try:
            with np.load(self.path) as obj:
                stats = {k: np.asarray(obj[k]) for k in STAT_KEYS}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise EvaluationError(
                f"{self.path}: cannot read its statistics ({type(exc).__name__}: {exc}); "
                "store mu, sigma, mu_s, sigma_s as plain numeric arrays"
            ) from None
        want = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
                "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
        for k in STAT_KEYS:
            if stats[k].shape != want[k]:
                raise EvaluationError(
                    f"{self.path}: {k} has shape {stats[k].shape} but the FID Inception gives "
                    f"{want[k]}; these statistics come from another network, remove them "
                    "to compute them from arr_0"
                )
            if not np.issubdtype(stats[k].dtype, np.number) or not np.isfinite(stats[k]).all():
                raise EvaluationError(
                    f"{self.path}: {k} has NaN or inf values; regenerate the statistics or "
                    "remove mu, sigma, mu_s, sigma_s to compute them from arr_0"
                )
        return (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])

    def batches(self, batch_size):
        """Yield uint8 arrays of at most ``batch_size`` images."""
        n = len(self)
        if not self.header_ok or self.fortran:
            with np.load(self.path) as obj:
                arr = obj["arr_0"]
            for i in range(0, n, batch_size):
                yield arr[i : i + batch_size]
            return
        try:
            yield from iter_npz_rows(self.path, "arr_0", batch_size)
        except TruncatedMember as e:
            raise EvaluationError(f"arr_0 ends after {e.got} of {e.size} bytes of a batch; "
                                  "the npz file is truncated, write it again") from None


def _read_npy_header(f):
    try:
        shape, fortran, dtype = read_npy_header(f)
    except UnsupportedNpyVersion:  # read through np.load instead of streaming
        return None, None, None, False
    return shape, fortran, dtype, True


# ----------------------------------------------------------------------------
# Evaluator


class Evaluator:
    """Runs the FID Inception over npz batches and computes the metrics."""

    def __init__(self, model: FIDInceptionV3, device="cpu", batch_size=64,
                 softmax_batch_size=SOFTMAX_BATCH_SIZE, progress=True):
        self.model = model
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.softmax_batch_size = int(softmax_batch_size)
        self.progress = progress

    @torch.inference_mode()
    def compute_activations(self, batches, total=None, desc="activations"):
        """(pool [N, 2048], spatial [N, 2023]) float32 for an iterable of uint8 NHWC batches."""
        pools, spatials = [], []
        for batch in tqdm(batches, total=total, desc=desc, disable=not self.progress):
            x = torch.from_numpy(np.array(batch, copy=True)).to(self.device)
            pool, spatial = self.model(x)
            pools.append(pool.float().cpu().numpy())
            spatials.append(spatial.float().cpu().numpy())
        return np.concatenate(pools, 0), np.concatenate(spatials, 0)

    def read_activations(self, batch: NpzBatch, desc="activations"):
        total = -(-len(batch) // self.batch_size)
        return self.compute_activations(batch.batches(self.batch_size), total=total, desc=desc)

    @staticmethod
    def read_statistics(batch: NpzBatch, activations):
        """((mu, sigma), (mu_s, sigma_s)): stored ones if the npz has them, else computed."""
        if batch.statistics is not None:
            return batch.statistics
        for acts in activations:
            if not np.isfinite(acts).all():
                raise EvaluationError(
                    f"the network gave NaN or inf activations for {batch.path}; "
                    "check the Inception weights"
                )
        return tuple(compute_statistics(acts) for acts in activations)

    @torch.inference_mode()
    def class_probabilities(self, pool):
        out = []
        for i in range(0, len(pool), self.softmax_batch_size):
            x = torch.from_numpy(np.ascontiguousarray(pool[i : i + self.softmax_batch_size]))
            out.append(self.model.class_probabilities(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out, 0)

    def compute_inception_score(self, pool, split_size=5000):
        return inception_score(self.class_probabilities(pool), split_size=split_size)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="FID, sFID, Inception Score, precision and recall of SAMPLE_BATCH against "
        "REF_BATCH (npz files with uint8 images [N, H, W, 3] in arr_0), as guided-diffusion's "
        "evaluator computes them."
    )
    parser.add_argument("ref_batch", help="path to the reference batch npz file")
    parser.add_argument("sample_batch", help="path to the sample batch npz file")
    parser.add_argument(
        "--inception_path",
        default=None,
        help=f"pytorch-fid's {FID_WEIGHTS_FILENAME} (default: downloaded once into the cache)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=int, default=64, help="images per network batch")
    return parser.parse_args(argv)


def _run(args):
    if args.batch_size < 1:
        raise EvaluationError(f"--batch_size must be positive, got {args.batch_size}; use e.g. 64")
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EvaluationError("--device cuda but CUDA is not available; use --device cpu")
        # Full float32 on the GPU (no TF32), as the published numbers were computed.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    ref = NpzBatch(args.ref_batch)
    sample = NpzBatch(args.sample_batch)
    for batch in (ref, sample):
        # k+1 = 4 images for the precision/recall radii (also enough for a covariance)
        if len(batch) < 4:
            raise EvaluationError(
                f"{batch.path} has {len(batch)} images; precision and recall need at least 4 "
                "(use thousands for meaningful numbers)"
            )
    weights = resolve_inception_weights(args.inception_path)
    model = load_fid_inception(weights, device=device)
    evaluator = Evaluator(model, device=device, batch_size=args.batch_size)

    print("computing reference batch activations...", flush=True)
    ref_acts = evaluator.read_activations(ref, desc="reference batch")
    print("computing/reading reference batch statistics...", flush=True)
    ref_stats, ref_stats_spatial = evaluator.read_statistics(ref, ref_acts)

    print("computing sample batch activations...", flush=True)
    sample_acts = evaluator.read_activations(sample, desc="sample batch")
    print("computing/reading sample batch statistics...", flush=True)
    sample_stats, sample_stats_spatial = evaluator.read_statistics(sample, sample_acts)

    print("Computing evaluations...", flush=True)
    print("Inception Score:", evaluator.compute_inception_score(sample_acts[0]), flush=True)
    print("FID:", frechet_distance(*sample_stats, *ref_stats), flush=True)
    print("sFID:", frechet_distance(*sample_stats_spatial, *ref_stats_spatial), flush=True)
    prec, recall = precision_recall(ref_acts[0], sample_acts[0], device=device, progress=True)
    print("Precision:", prec)
    print("Recall:", recall, flush=True)
    return 0


def main(argv=None):
    """CLI entry point; returns the exit status (2 with one 'error: ...' line on bad input)."""
    args = _parse_args(argv)
    try:
        return _run(args)
    except EvaluationError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
