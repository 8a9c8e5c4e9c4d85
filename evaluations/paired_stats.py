"""
Paired comparisons of two sample sets drawn from the same seeds: position p
of one set and position p of the other share their label and starting noise
(docs/sag.md, the seed contract), so a difference of scores is measured on
pairs, and its uncertainty by resampling the positions jointly.

* :func:`paired_bootstrap`: the score difference and a percentile bootstrap
  interval over positions;
* :class:`FrechetToReference`: the Frechet distance (FID) of fixed features,
  or of a resample of them, to fixed reference statistics, cheap enough to
  run a thousand times (no matrix square root);
* :func:`mcnemar`: the counts of pairs right in one set only, and the exact
  two-sided binomial p-value on them.
"""

import math

import numpy as np


def bootstrap_resamples(n, n_boot, seed=0):
    """
    The resamples of positions ``0 .. n-1``: `n_boot` arrays of `n` positions
    drawn with replacement, ``np.random.default_rng(seed).integers(0, n, n)``
    one after the other.
    """
    rng = np.random.default_rng(seed)
    for _ in range(int(n_boot)):
        yield rng.integers(0, n, n)


def paired_bootstrap(score, a, b, n_boot=1000, seed=0, level=0.95):
    """
    score(a) - score(b) and its bootstrap interval over positions.

    :param score: ``score(rows, positions)`` -> float: the score of the
        positions (an int array, with repeats) of the per-position data `rows`.
    :param a, b: per-position data of the two sets (anything `score` reads;
        ``len`` gives the number of positions, the same for both).
    :param n_boot: resamples (0: no interval).
    :param level: the interval's coverage; its ends are the
        ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
        differences (``np.percentile``, linear interpolation).
    :return: dict(difference, ci=[low, high] or None, n_boot, level).
    """
    n = len(a)
    if len(b) != n:
        raise ValueError(f"paired sets differ in size: {n} and {len(b)} positions")
    every = np.arange(n)
    out = dict(difference=float(score(a, every) - score(b, every)), ci=None,
               n_boot=int(n_boot), level=float(level))
    if n_boot > 0 and n > 0:
        diffs = np.array([score(a, idx) - score(b, idx)
                          for idx in bootstrap_resamples(n, n_boot, seed)], dtype=np.float64)
        tail = 100.0 * (1.0 - level) / 2.0
        out["ci"] = [float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100.0 - tail))]
    return out


def mean_score(rows, positions):
    """The mean of per-position values (e.g. 1.0 where a label is right) over `positions`."""
    return float(np.mean(np.asarray(rows, dtype=np.float64)[positions]))


class FrechetReference:
    """
    Reference statistics (mu_r, sigma_r) prepared for :class:`FrechetToReference`:
    a factor ``L`` with ``sigma_r = L L^T`` (from its eigendecomposition, once).
    """

    def __init__(self, mu_r, sigma_r):
        self.mu = np.asarray(mu_r, dtype=np.float64)
        sigma_r = np.asarray(sigma_r, dtype=np.float64)
        w, v = np.linalg.eigh((sigma_r + sigma_r.T) / 2)
        self.factor = v * np.sqrt(np.clip(w, 0, None))
        self.trace = float(np.trace(sigma_r))


class FrechetToReference:
    """
    ``fid(positions)``: the Frechet distance between the Gaussian fit of the
    features at `positions` (rows of a fixed [N x D] array, repeats allowed)
    and a :class:`FrechetReference`.

    The same quantity as ``evaluations.evaluator.frechet_distance`` on
    ``compute_statistics(feats[positions])`` (equal up to float rounding),
    computed without a matrix square root: with ``sigma_r = L L^T``,
    ``tr sqrt(sigma sigma_r)`` is the sum of the square roots of the
    eigenvalues of ``L^T sigma L``, i.e. of the Gram matrix of the centred,
    L-projected rows, which for a resample needs only its distinct rows
    (weighted by their counts). Cheap enough for a thousand resamples.
    """

    def __init__(self, feats, reference):
        self.feats = np.asarray(feats, dtype=np.float64)
        self.reference = reference
        self.projected = self.feats @ reference.factor

    def __len__(self):
        return len(self.feats)

    def __call__(self, positions=None):
        """The distance of the rows at `positions` (default: every row once)."""
        if positions is None:
            positions = np.arange(len(self.feats))
        positions = np.asarray(positions)
        m = len(positions)
        if m < 2:
            raise ValueError(f"a Frechet distance needs at least 2 rows, got {m}")
        counts = np.bincount(positions, minlength=len(self.feats)).astype(np.float64)
        held = np.nonzero(counts)[0]
        weight = counts[held][:, None]
        x, z = self.feats[held], self.projected[held]
        mu = (weight * x).sum(0) / m
        # Rows sqrt(count) * (row - mean): their Gram matrices give the covariances.
        xc = np.sqrt(weight) * (x - mu)
        zc = np.sqrt(weight) * (z - (weight * z).sum(0) / m)
        trace_s = float((xc * xc).sum()) / (m - 1)
        gram = zc @ zc.T if len(held) <= zc.shape[1] else zc.T @ zc
        eig = np.linalg.eigvalsh(gram) / (m - 1)
        trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
        diff = mu - self.reference.mu
        return float(diff @ diff) + trace_s + self.reference.trace - 2.0 * trace_sqrt


def fid_of(fid, positions):
    """A :func:`paired_bootstrap` score for per-set :class:`FrechetToReference` objects."""
    return fid(positions)


def mcnemar(right_a, right_b):
    """
    Pairs right in `a` only and in `b` only (boolean per-position arrays),
    and the exact two-sided binomial p-value of that split under "no
    difference" (McNemar's exact test).
    """
    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    only_a = int((right_a & ~right_b).sum())
    only_b = int((~right_a & right_b).sum())
    k = only_a + only_b
    if k == 0:
        return dict(right_only_in_a=0, right_only_in_b=0, p=1.0)
    tail = sum(math.comb(k, i) for i in range(min(only_a, only_b) + 1)) / 2.0 ** k
    return dict(right_only_in_a=only_a, right_only_in_b=only_b, p=min(1.0, 2.0 * tail))
