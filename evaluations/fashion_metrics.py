"""
Fashion-MNIST sample metrics with a small classifier of our own.

A small CNN for 32x32 RGB input (uint8 NHWC 0..255, scaled to [-1, 1]) is
trained on the Fashion-MNIST training split (28x28 padded by 2 px of black and
replicated to RGB, see evaluations/fashion_mnist.py).  It is used to
measure class-conditional samples:

* accuracy: fraction of samples whose predicted class equals their drawn label;
* colour cast: the mean over all pixels of (max - min over R, G, B), in
  levels of 0..255; Fashion-MNIST is gray, so real images give 0;
* feature FID: Frechet distance between Gaussian fits of the classifier's
  penultimate-layer features (128-d) of the samples and of a reference split
  (default: the 10,000 test images).  This is *not* the Inception FID and is
  not comparable with published FID numbers.

CLI:
    python evaluations/fashion_metrics.py train [--epochs 4]
    python evaluations/fashion_metrics.py noisy_classifier [--classifier_path models/fashion32_classifier.pt]
    python evaluations/fashion_metrics.py score SAMPLES.npz [--ref test]
        [--classifier models/fashion_eval_classifier.pt]
        [--ref_stats models/fashion_eval_ref_stats.npz]

SAMPLES.npz holds arr_0 (uint8 [N, 32, 32, 3]) and, optionally, arr_1
(int labels [N]) as written by the sampling scripts.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from improved_diffusion.files.atomic import atomic_json, atomic_write, sha256_file  # noqa: E402
from evaluations.fashion_mnist import (  # noqa: E402
    DEFAULT_SOURCE_DIR,
    load_fashion_mnist,
    to_rgb32,
)

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_CLASSIFIER = os.path.join(REPO_ROOT, "models", "fashion_eval_classifier.pt")
DEFAULT_REF_STATS = os.path.join(REPO_ROOT, "models", "fashion_eval_ref_stats.npz")
NUM_CLASSES = 10


class FashionClassifier(nn.Module):
    """
    3 x (conv3x3 -> BN -> ReLU -> maxpool2) on 32x32 RGB, then
    flatten -> dropout -> fc(feat_dim) -> ReLU [features] -> fc(10).
    """

    def __init__(self, channels=(32, 64, 128), feat_dim=128, dropout=0.3):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.feat_dim = int(feat_dim)
        convs, bns = [], []
        cin = 3
        for c in self.channels:
            convs.append(nn.Conv2d(cin, c, 3, padding=1, bias=False))
            bns.append(nn.BatchNorm2d(c))
            cin = c
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns)
        side = 32 // (2 ** len(self.channels))
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(cin * side * side, self.feat_dim)
        self.fc2 = nn.Linear(self.feat_dim, NUM_CLASSES)

    def forward(self, x, return_features=False):
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        feats = F.relu(self.fc1(self.dropout(x.flatten(1))))
        logits = self.fc2(feats)
        if return_features:
            return logits, feats
        return logits


def _config_from_state_dict(sd):
    channels = []
    i = 0
    while "convs.%d.weight" % i in sd:
        channels.append(sd["convs.%d.weight" % i].shape[0])
        i += 1
    return dict(channels=tuple(channels), feat_dim=sd["fc1.weight"].shape[0])


def load_eval_classifier(path=DEFAULT_CLASSIFIER, device="cpu"):
    """
    The Fashion-MNIST evaluation classifier (a FashionClassifier state_dict,
    loaded weights_only), in eval mode. Not the noisy classifier of
    classifier guidance (improved_diffusion.checkpoints.loading.classifier_from_card).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "classifier weights %s not found; run `python evaluations/fashion_metrics.py train`"
            % path
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = FashionClassifier(**_config_from_state_dict(sd))
    model.load_state_dict(sd)
    return model.to(device).eval()


def preprocess(images):
    """uint8 [N, 32, 32, 3] (or [N, 32, 32] / [N, 32, 32, 1] gray) -> float [N, 3, 32, 32] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() == 3:
        x = x[..., None]
    if x.dim() != 4 or x.shape[-1] not in (1, 3) or tuple(x.shape[1:3]) != (32, 32):
        raise ValueError("expected uint8 NHWC images of size 32x32, got %s" % (tuple(x.shape),))
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def _run(model, images, batch_size=500):
    model.eval()
    dev = _device(model)
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        lo, fe = model(preprocess(images[i : i + batch_size]).to(dev), return_features=True)
        logits.append(lo.cpu())
        feats.append(fe.cpu())
    if not logits:
        return torch.zeros(0, NUM_CLASSES), torch.zeros(0, getattr(model, "feat_dim", 0))
    return torch.cat(logits), torch.cat(feats)


def features(model, images, batch_size=500):
    """Penultimate-layer features, float64 numpy [N, feat_dim]."""
    return _run(model, images, batch_size)[1].double().numpy()


def predict(model, images, batch_size=500):
    """Predicted labels, int64 numpy [N]."""
    return _run(model, images, batch_size)[0].argmax(1).numpy().astype(np.int64)


def accuracy(model, images, labels, batch_size=500):
    """Fraction of images whose predicted class equals labels."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(images):
        raise ValueError("got %d images but %d labels" % (len(images), len(labels)))
    if len(labels) == 0:
        return float("nan")
    return float((predict(model, images, batch_size) == labels).mean())


def feature_stats(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 (the evaluator's, quiet)."""
    from evaluations.evaluator import frechet_distance as fid

    return fid(mu1, sigma1, mu2, sigma2, eps=eps, quiet=True)


def feature_fid(sample_images, ref_images, model=None, classifier_path=DEFAULT_CLASSIFIER):
    """
    Frechet distance of classifier features of sample_images vs ref_images
    (both uint8 NHWC 32x32).  ref_images may instead be a precomputed
    (mu, sigma) pair.  model defaults to the classifier at classifier_path.
    """
    if model is None:
        model = load_eval_classifier(classifier_path)
    mu1, s1 = feature_stats(features(model, sample_images))
    if isinstance(ref_images, (tuple, list)) and len(ref_images) == 2:
        mu2, s2 = ref_images
    else:
        mu2, s2 = feature_stats(features(model, ref_images))
    return frechet_distance(mu1, s1, mu2, s2)


def reference_stats(
    model,
    classifier_path,
    ref="test",
    ref_stats_path=DEFAULT_REF_STATS,
    source_dir=DEFAULT_SOURCE_DIR,
):
    """
    (mu, sigma) of the classifier features of a Fashion-MNIST split, cached in
    ref_stats_path; the cache is keyed on the classifier file's sha256 and the
    split and is recomputed when either differs.
    """
    key = "%s:%s" % (sha256_file(classifier_path), ref)
    if ref_stats_path and os.path.isfile(ref_stats_path):
        with np.load(ref_stats_path) as z:
            if "key" in z and str(z["key"]) == key:
                return z["mu"], z["sigma"]
    images, _ = load_fashion_mnist(ref, source_dir=source_dir)
    mu, sigma = feature_stats(features(model, to_rgb32(images)))
    if ref_stats_path:
        os.makedirs(os.path.dirname(os.path.abspath(ref_stats_path)), exist_ok=True)
        with atomic_write(ref_stats_path) as f:
            np.savez(f, mu=mu, sigma=sigma, key=np.array(key), n=np.array(len(images)))
    return mu, sigma


def colour_cast(images):
    """Mean over pixels of max - min across the colour channels of uint8 NHWC images (levels)."""
    images = np.asarray(images)
    return float((images.max(axis=-1).astype(np.int16) - images.min(axis=-1)).mean())


def score(
    samples_path,
    classifier_path=DEFAULT_CLASSIFIER,
    ref="test",
    ref_stats_path=DEFAULT_REF_STATS,
    source_dir=DEFAULT_SOURCE_DIR,
):
    """Return dict(n, accuracy (None without labels), fid, colour_cast)."""
    model = load_eval_classifier(classifier_path)
    with np.load(samples_path) as z:
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z else None
    acc = accuracy(model, images, labels) if labels is not None else None
    mu, sigma = reference_stats(model, classifier_path, ref, ref_stats_path, source_dir)
    fid = feature_fid(images, (mu, sigma), model=model)
    return dict(n=len(images), accuracy=acc, fid=fid, colour_cast=colour_cast(images))


DEFAULT_REFERENCE = os.path.join(REPO_ROOT, "models", "fashion_eval_reference.json")
DEFAULT_NOISY_CLASSIFIER = os.path.join(REPO_ROOT, "models", "fashion32_classifier.pt")


def noisy_classifier_accuracy(classifier_path=DEFAULT_NOISY_CLASSIFIER,
                              timesteps=(0, 250, 500, 750, 999), num_images=2000, seed=0,
                              batch_size=500, source_dir=DEFAULT_SOURCE_DIR):
    """
    Accuracy of a noisy-image classifier (the one classifier guidance uses,
    built from its model card) on the first `num_images` test images diffused
    to each of `timesteps` with its own diffusion; the noise of step t comes
    from a generator seeded ``seed + t``. Returns {t: accuracy}.
    """
    from improved_diffusion.checkpoints.loading import classifier_from_card

    classifier, diffusion = classifier_from_card(classifier_path, torch.device("cpu"))
    images, labels = load_fashion_mnist("test", source_dir=source_dir)
    x0 = torch.from_numpy(to_rgb32(images[:num_images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(labels[:num_images].astype("int64"))
    out = {}
    for t in timesteps:
        gen = torch.Generator().manual_seed(seed + t)
        correct = 0
        for i in range(0, len(x0), batch_size):
            xb = x0[i : i + batch_size]
            tt = torch.full((len(xb),), t, dtype=torch.long)
            noise = torch.randn(xb.shape, generator=gen)
            with torch.no_grad():
                logits = classifier(diffusion.q_sample(xb, tt, noise=noise), tt)
            correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
        out[int(t)] = correct / len(x0)
    return out


def real_image_reference(sizes, classifier_path=DEFAULT_CLASSIFIER, ref_stats_path=DEFAULT_REF_STATS,
                         source_dir=DEFAULT_SOURCE_DIR):
    """
    What real images score, per sample count n: the last n training images
    (unseen by the FID reference, the test split) with their true labels.
    FID grows as n shrinks, so samples are compared with the row of their n.
    """
    model = load_eval_classifier(classifier_path)
    images, labels = load_fashion_mnist("train", source_dir=source_dir)
    images = to_rgb32(images)
    mu, sigma = reference_stats(model, classifier_path, "test", ref_stats_path, source_dir)
    rows = {}
    for n in sizes:
        imgs, labs = images[-n:], labels[-n:]
        rows[str(n)] = dict(accuracy=accuracy(model, imgs, labs),
                            fid=feature_fid(imgs, (mu, sigma), model=model),
                            colour_cast=colour_cast(imgs))
    return dict(classifier_sha256=sha256_file(classifier_path),
                scored="the last n Fashion-MNIST training images, true labels, FID vs the test split",
                rows=rows)


def train(
    epochs=4,
    batch_size=128,
    lr=2e-3,
    weight_decay=1e-4,
    out_path=DEFAULT_CLASSIFIER,
    source_dir=DEFAULT_SOURCE_DIR,
    seed=0,
    threads=1,
    device="cpu",
    train_limit=None,
    log=print,
):
    """
    Train the classifier on the training split (random horizontal flips, Adam,
    one-cycle LR), evaluate on the test split, save the state_dict to out_path.
    Returns (model, test_accuracy).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = load_fashion_mnist("train", source_dir=source_dir)
    x_test, y_test = load_fashion_mnist("test", source_dir=source_dir)
    if train_limit:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_train, x_test = to_rgb32(x_train), to_rgb32(x_test)
    # Whole training split as one float tensor (60000*3*32*32*4 B ~ 737 MB would be
    # too much); keep uint8 and convert per batch instead.
    y_train_t = torch.from_numpy(y_train)

    model = FashionClassifier().to(device)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    t0 = time.time()
    for epoch in range(epochs):
        loss, train_acc = _train_epoch(model, opt, sched, x_train, y_train_t, batch_size, rng, device)
        test_acc = accuracy(model, x_test, y_test)
        log(
            "epoch %d/%d  train loss %.4f  train acc %.4f  test acc %.4f  (%.0fs)"
            % (epoch + 1, epochs, loss, train_acc, test_acc, time.time() - t0)
        )
    model.eval()
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with atomic_write(out_path) as f:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)
        log("saved %s (%.2f MB)" % (out_path, os.path.getsize(out_path) / 2**20))
    return model, test_acc


def _train_epoch(model, opt, sched, x_train, y_train, batch_size, rng, device):
    """One pass over the shuffled training images (random horizontal flips): (mean loss, accuracy)."""
    model.train()
    perm = rng.permutation(len(x_train))
    tot_loss, tot_correct = 0.0, 0
    for i in range((len(x_train) + batch_size - 1) // batch_size):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        x = preprocess(x_train[idx])
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x[flip] = x[flip].flip(-1)
        x, y = x.to(device), y_train[idx].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tot_loss += loss.item() * len(idx)
        tot_correct += (logits.argmax(1) == y).sum().item()
    return tot_loss / len(x_train), tot_correct / len(x_train)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fashion-MNIST classifier metrics")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the classifier on the training split")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--batch_size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", default=DEFAULT_CLASSIFIER)
    t.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR)
    s = sub.add_parser("score", help="score a samples .npz (arr_0 images, arr_1 labels)")
    s.add_argument("samples")
    s.add_argument("--ref", choices=["test", "train"], default="test")
    s.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    s.add_argument("--ref_stats", default=None,
                   help="reference-statistics cache (default models/fashion_eval_ref_stats.npz "
                        "for --ref test, ..._train.npz for --ref train)")
    s.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR)
    s.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("reference", help="score real images at given sample counts into a JSON "
                                         "that the demo compares with (models/fashion_eval_reference.json)")
    r.add_argument("--n", default="256,1000", help="comma-separated sample counts")
    r.add_argument("--out", default=DEFAULT_REFERENCE)
    r.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR)
    c = sub.add_parser("noisy_classifier", help="accuracy of a noisy-image classifier (classifier "
                                                "guidance's) on test images diffused to t")
    c.add_argument("--classifier_path", default=DEFAULT_NOISY_CLASSIFIER)
    c.add_argument("--num_images", type=int, default=2000)
    c.add_argument("--timesteps", default="0,250,500,750,999")
    c.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return {"noisy_classifier": _noisy_classifier, "reference": _reference, "train": _train,
            "score": _score}[args.cmd](args)


def _noisy_classifier(args):
    result = noisy_classifier_accuracy(
        args.classifier_path, [int(t) for t in args.timesteps.split(",") if t],
        num_images=args.num_images, source_dir=args.source_dir)
    for t, acc in result.items():
        print("t=%d: accuracy %.4f (n=%d)" % (t, acc, args.num_images))
    return 0


def _reference(args):
    result = real_image_reference([int(n) for n in args.n.split(",") if n],
                                  source_dir=args.source_dir)
    result["command"] = "python evaluations/fashion_metrics.py reference --n %s" % args.n
    atomic_json(args.out, result, end="", indent=1)
    print(json.dumps(result["rows"]))
    return 0


def _train(args):
    t0 = time.time()
    _, acc = train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   out_path=args.out, source_dir=args.source_dir, seed=args.seed,
                   threads=args.threads, device=args.device)
    print("test accuracy: %.4f" % acc)
    print("wall time: %.0fs" % (time.time() - t0))
    return 0


def _score(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    ref_stats = args.ref_stats
    if ref_stats is None:
        ref_stats = DEFAULT_REF_STATS
        if args.ref != "test":
            ref_stats = DEFAULT_REF_STATS.replace(".npz", "_%s.npz" % args.ref)
    try:
        r = score(args.samples, args.classifier, args.ref, ref_stats, args.source_dir)
    except FileNotFoundError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print("samples: %d" % r["n"])
    if r["accuracy"] is None:
        print("accuracy: n/a (no arr_1 labels in %s)" % args.samples)
    else:
        print("accuracy: %.4f" % r["accuracy"])
    print("feature FID vs %s split: %.6f" % (args.ref, r["fid"]))
    print("colour cast: %.3f levels" % r["colour_cast"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
