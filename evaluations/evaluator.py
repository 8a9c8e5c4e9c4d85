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

from improved_diffusion.npz_io import (  # noqa: E402
    TruncatedMember,
    UnsupportedNpyVersion,
    iter_npz_rows,
    read_npy_header,
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

ROW_BATCH_SIZE = 10000  # as the published ManifoldEstimator
COL_BATCH_SIZE = 10000
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
# Precision and recall (Kynkäänniemi et al. 2019)


def _distances_fp16(u, v):
    """
    Squared distances as the published TensorFlow graph computes them in
    float16: inputs rounded to half; squared norms (squares rounded to half,
    summed in float32, rounded to half) and the matrix product (accumulated in
    float32, rounded to half); then ``norm_u - 2 u.v + norm_v`` rounded to half
    op by op; clamped at 0. Half values are carried in float32 tensors (float32
    holds them exactly, and one float32 op then rounding to half equals the
    correctly rounded half op). Returns float32.
    """
    u = u.half().float()
    v = v.half().float()
    norm_u = (u * u).half().float().sum(1).half().float()
    norm_v = (v * v).half().float().sum(1).half().float()
    d = (u @ v.t()).half().float()
    d = d.mul_(2).half().float()
    d = torch.sub(norm_u[:, None], d).half().float()
    d = d.add_(norm_v[None, :]).half().float()
    return d.clamp_min_(0)


def _distances_fp32(u, v):
    norm_u = (u * u).sum(1)
    norm_v = (v * v).sum(1)
    d = torch.sub(norm_u[:, None], 2 * (u @ v.t()))
    return d.add_(norm_v[None, :]).clamp_min_(0)


def _sub_rows(n_rows, n_cols, max_elements):
    return max(1, min(n_rows, max_elements // max(n_cols, 1)))


def _map_block(u, v, fn, max_elements):
    """
    Apply ``fn(distances, start, stop)`` to row chunks of the distance block
    u x v and return the results. As published, the whole block uses float16
    distances unless one of them is not finite; then it is redone in float32.
    Chunking bounds memory to ``max_elements`` floats per temporary.
    """
    step = _sub_rows(len(u), len(v), max_elements)
    for dist_fn in (_distances_fp16, _distances_fp32):
        results = []
        for start in range(0, len(u), step):
            stop = min(start + step, len(u))
            d = dist_fn(u[start:stop], v)
            if dist_fn is _distances_fp16 and not bool(torch.isfinite(d).all()):
                break
            results.append(fn(d, start, stop))
        else:
            return results
    raise AssertionError("unreachable")


def pairwise_distances(u, v, device="cpu"):
    """
    Squared Euclidean distances [len(u), len(v)] of one block, as the published
    ``DistanceBlock``: float16 (see ``_distances_fp16``), or float32 when any
    float16 distance is not finite. Returns float32 numpy.
    """
    u = torch.as_tensor(np.asarray(u, dtype=np.float32), device=device)
    v = torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
    parts = _map_block(u, v, lambda d, a, b: d.cpu(), max_elements=1 << 62)
    return torch.cat(parts, 0).numpy()


def _as_features(x, name, device):
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise EvaluationError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}; "
                              "pass one feature vector per row")
    if not np.isfinite(x).all():
        raise EvaluationError(f"{name} has NaN or inf values; check the features")
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)


def _manifold_radii(feats, k, row_batch_size, col_batch_size, max_elements, progress=None):
    n = len(feats)
    if not 0 <= k < n:
        raise EvaluationError(f"k={k} needs at least k+1={k + 1} feature vectors, got {n}; "
                              "use more samples or a smaller k")
    radii = torch.empty(n, dtype=torch.float32)
    for r0 in range(0, n, row_batch_size):
        rows = feats[r0 : r0 + row_batch_size]
        best = None  # the k+1 smallest distances of each row so far
        for c0 in range(0, n, col_batch_size):
            cols = feats[c0 : c0 + col_batch_size]
            kk = min(k + 1, len(cols))
            parts = _map_block(
                rows, cols, lambda d, a, b: torch.topk(d, kk, dim=1, largest=False).values,
                max_elements,
            )
            cand = torch.cat(parts, 0)
            best = cand if best is None else torch.cat([best, cand], 1)
            if best.shape[1] > k + 1:
                best = torch.topk(best, k + 1, dim=1, largest=False).values
            if progress is not None:
                progress.update(1)
        # The (k+1)-th smallest: the point itself is at distance 0.
        radii[r0 : r0 + len(rows)] = torch.kthvalue(best, k + 1, dim=1).values.cpu()
    return radii


def manifold_radii(features, k=3, row_batch_size=ROW_BATCH_SIZE, col_batch_size=COL_BATCH_SIZE,
                   device="cpu", max_elements=1 << 24):
    """
    Radius of each feature vector's k-NN hypersphere: the (k+1)-th smallest
    squared distance within ``features`` (the point itself counts, at 0),
    with the published float16 distances. Returns float32 [N].
    """
    feats = _as_features(features, "features", device)
    return _manifold_radii(feats, int(k), int(row_batch_size), int(col_batch_size),
                           int(max_elements)).numpy()


def precision_recall(ref_features, sample_features, k=3, row_batch_size=ROW_BATCH_SIZE,
                     col_batch_size=COL_BATCH_SIZE, device="cpu", max_elements=1 << 24,
                     progress=False):
    """
    Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii:
    precision = fraction of samples within (<=) the radius of some reference
    point; recall = fraction of reference points within the radius of some
    sample. Distances as the published evaluator (float16, float32 fallback per
    block), in blocks of ``row_batch_size`` x ``col_batch_size``.
    Returns ``(precision, recall)``.
    """
    ref = _as_features(ref_features, "reference features", device)
    samp = _as_features(sample_features, "sample features", device)
    if ref.shape[1] != samp.shape[1]:
        raise EvaluationError(
            f"reference features have {ref.shape[1]} values but sample features {samp.shape[1]}; "
            "use features of the same network layer"
        )
    k, rb, cb, me = int(k), int(row_batch_size), int(col_batch_size), int(max_elements)
    if rb < 1 or cb < 1:
        raise EvaluationError("row and column batch sizes must be positive; use e.g. 10000")
    nblocks = lambda a, b: -(-a // rb) * -(-b // cb)  # noqa: E731
    total = nblocks(len(ref), len(ref)) + nblocks(len(samp), len(samp)) + nblocks(len(ref), len(samp))
    with tqdm(total=total, desc="precision/recall blocks", disable=not progress) as bar:
        ref_radii = _manifold_radii(ref, k, rb, cb, me, bar).to(device)
        samp_radii = _manifold_radii(samp, k, rb, cb, me, bar).to(device)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)  # -> recall
        samp_in = torch.zeros(len(samp), dtype=torch.bool, device=device)  # -> precision
        for r0 in range(0, len(ref), rb):
            rows = ref[r0 : r0 + rb]
            for c0 in range(0, len(samp), cb):
                cols = samp[c0 : c0 + cb]
                c1 = c0 + len(cols)

                def fn(d, a, b, r0=r0, c0=c0, c1=c1):
                    rows_in = (d <= samp_radii[None, c0:c1]).any(1)
                    cols_in = (d <= ref_radii[r0 + a : r0 + b, None]).any(0)
                    return a, b, rows_in, cols_in

                for a, b, rows_in, cols_in in _map_block(rows, cols, fn, me):
                    ref_in[r0 + a : r0 + b] |= rows_in
                    samp_in[c0:c1] |= cols_in
                bar.update(1)
    precision = float(samp_in.double().mean())
    recall = float(ref_in.double().mean())
    return precision, recall


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
