"""
What scores the settings of a guidance sweep (scripts/sag_sweep.py), and the
paired differences between two settings.

Two scorers, each chosen explicitly:

- the evaluator's FID, sFID, IS, precision and recall against ``--ref_batch``
  (any dataset);
- the Fashion-MNIST label accuracy and feature FID of
  ``evaluations/fashion_metrics.py``, for a model of that dataset: the model
  card says so (``"dataset": "fashion_mnist"`` beside its flags) or
  ``--dataset fashion_mnist`` does. The image size and class count never
  decide it: a CIFAR-10 model is also 32x32 with 10 classes.
"""

import os

import numpy as np

from evaluations.paired_stats import (
    FrechetReference,
    FrechetToReference,
    fid_of,
    mcnemar,
    mean_score,
    paired_bootstrap,
)
from improved_diffusion import dist_util
from improved_diffusion.checkpoints.model_card import read_model_card_data
from improved_diffusion.errors import UsageError

# The datasets with a scorer of their own (--dataset).
DATASETS = ("fashion_mnist",)
NO_SCORER = ("no scorer applies: pass --ref_batch REF.npz for the Inception metrics, or "
             "--dataset fashion_mnist for a Fashion-MNIST model; the table lists the settings "
             "without scores")


def dataset_of(choice, model_path):
    """
    The dataset whose scorer applies: `choice` (``--dataset``) when given,
    else the model card's ``dataset``; None for "none" or when neither names one.
    """
    if choice == "none":
        return None
    if choice:
        return choice
    card = read_model_card_data(model_path)
    return card.get("dataset") if card.get("dataset") in DATASETS else None


class Scorer:
    """What scores a setting's npz: the evaluator with its reference, the Fashion-MNIST metrics."""

    def __init__(self, sweep, args, has_labels, dataset=None):
        self.sweep, self.has_labels, self.dataset = sweep, has_labels, dataset
        self.inception = self.ref = None
        if sweep.ref_batch:
            from evaluations.evaluator import Evaluator, NpzBatch
            from evaluations.fid_inception import (EvaluationError, load_fid_inception,
                                                   resolve_inception_weights)

            try:
                self.ref = NpzBatch(sweep.ref_batch)
                weights = resolve_inception_weights(sweep.inception_path)
                self.inception = Evaluator(load_fid_inception(weights, device=dist_util.dev()),
                                           device=dist_util.dev(), progress=False)
            except EvaluationError as e:
                raise UsageError(f"--ref_batch/--inception_path: {e}") from None
            size = int(args.image_size)
            if tuple(self.ref.shape[1:3]) != (size, size):
                raise UsageError(
                    f"--ref_batch {sweep.ref_batch} holds {self.ref.shape[1]}x{self.ref.shape[2]} "
                    f"images but the samples are {size}x{size} (--image_size {size}); pass a "
                    "reference batch of the model's size")
            if len(self.ref) < 4 or int(args.num_samples) < 4:
                raise UsageError(
                    f"precision and recall need at least 4 images (--ref_batch holds "
                    f"{len(self.ref)}, --num_samples {args.num_samples})")
        self.fashion = None
        if dataset == "fashion_mnist":
            from evaluations import fashion_metrics

            try:
                self.fashion = fashion_metrics.load_eval_classifier()
            except FileNotFoundError as e:
                raise UsageError(f"Fashion-MNIST metrics: {e}") from None
        self.ref_acts = self.ref_stats = self.fashion_ref = None

    @property
    def scores_anything(self):
        return self.inception is not None or self.fashion is not None

    def _reference(self):
        """The reference statistics, computed once."""
        from evaluations import fashion_metrics

        if self.inception is not None and self.ref_acts is None:
            self.ref_acts = self.inception.read_activations(self.ref, desc="reference batch")
            self.ref_stats = [FrechetReference(*stats) for stats in
                              self.inception.read_statistics(self.ref, self.ref_acts)]
        if self.fashion is not None and self.fashion_ref is None:
            self.fashion_ref = FrechetReference(*fashion_metrics.reference_stats(
                self.fashion, fashion_metrics.DEFAULT_CLASSIFIER))

    def score(self, path):
        """
        (scores, per-position data for the paired comparison) of one npz. The
        Frechet distances are the evaluator's (evaluations/paired_stats.py
        computes them without its matrix square root, equal up to rounding).
        """
        from evaluations import evaluator, fashion_metrics

        self._reference()
        scores, paired = {}, {}
        with np.load(path) as z:
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in z else None
        scores["n"] = len(images)
        if self.inception is not None:
            pool, spatial = self.inception.read_activations(evaluator.NpzBatch(path),
                                                            desc=os.path.basename(path))
            paired["fid"] = FrechetToReference(pool, self.ref_stats[0])
            scores["fid"] = paired["fid"]()
            scores["sfid"] = FrechetToReference(spatial, self.ref_stats[1])()
            scores["inception_score"] = self.inception.compute_inception_score(pool)
            scores["precision"], scores["recall"] = evaluator.precision_recall(
                self.ref_acts[0], pool, device=str(dist_util.dev()))
        if self.fashion is not None:
            feats = fashion_metrics.features(self.fashion, images)
            paired["fashion_fid"] = FrechetToReference(feats, self.fashion_ref)
            scores["fashion_fid"] = paired["fashion_fid"]()
            if labels is not None:
                right = fashion_metrics.predict(self.fashion, images) == labels
                scores["accuracy"] = float(right.mean())
                paired["accuracy"] = right
        return {k: float(v) if k != "n" else int(v) for k, v in scores.items()}, paired


def compare(scores, paired, base_scores, base_paired, n_boot):
    """Differences against the baseline; intervals for accuracy and the FIDs."""
    out = {}
    for key, value in scores.items():
        if key == "n" or key not in base_scores:
            continue
        out[f"diff_{key}"] = value - base_scores[key]
        if key in paired:
            score = mean_score if key == "accuracy" else fid_of
            res = paired_bootstrap(score, paired[key], base_paired[key], n_boot=n_boot, seed=0)
            out[f"diff_{key}"] = res["difference"]
            if res["ci"] is not None:
                out[f"diff_{key}_ci_low"], out[f"diff_{key}_ci_high"] = res["ci"]
    if "accuracy" in paired:
        m = mcnemar(paired["accuracy"], base_paired["accuracy"])
        out.update(right_only_here=m["right_only_in_a"], right_only_in_baseline=m["right_only_in_b"],
                   mcnemar_p=m["p"])
    return out


