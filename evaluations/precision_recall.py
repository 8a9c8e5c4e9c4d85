"""
Precision and recall of generated images (Kynkaanniemi et al. 2019) on
Inception features, computed as the published ManifoldEstimator of
guided-diffusion's evaluator computes them (float16 distances, k = 3,
batches of 10,000 rows and columns). ``evaluations/evaluator.py`` uses it.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluations.fid_inception import EvaluationError

ROW_BATCH_SIZE = 10000  # as the published ManifoldEstimator
COL_BATCH_SIZE = 10000



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
