"""
Does SAG help the default model? Draw the same seeds with no guidance, SAG,
classifier guidance (CG) and SAG + CG, and score every set with the project's
Fashion-MNIST classifier (accuracy of the drawn labels, feature FID vs the
test split).

    python scripts/compare_guidance.py [--num_samples 1000] [--out_dir out/guidance]
        [--configs none,sag,cg,sag+cg,sag_s3,sag_b2,...] [--timestep_respacing 50]

A config name is a ``+``-joined list of parts (see CONFIG_PARTS and the
``sag_s{scale}``, ``sag_b{sigma}``, ``sag_d{depth}``, ``cg{scale}`` forms):
``sag_s3_b2_d5`` is SAG with guide_scale 3, blur_sigma 2 at output block 5;
``cg2`` is classifier guidance with scale 2; ``sag+cg`` both at the defaults.
Each set is written to ``OUT_DIR/NAME_nN.npz`` (positions 0..N-1 of ``--seed``,
so the sets share their labels and starting noise) and reused when it exists
with the same model step and sampler setting; the table goes to
``OUT_DIR/results.json`` and ``results.md``.

The model's flags and the default SAG flags come from its model card
(models/fashion32_ema.json), the classifier's from models/fashion32_classifier.json.

    python scripts/compare_guidance.py classifier_accuracy [--classifier_path P]

prints the noisy classifier's accuracy on test images diffused to t = 0 .. 999;

    python scripts/compare_guidance.py paired OUT_DIR/sag_n256.npz ... --base OUT_DIR/none_n256.npz

prints paired differences (McNemar counts, bootstrap interval of the FID difference).
"""

import argparse
import json
import os
import re
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch as th  # noqa: E402

from evaluations import fashion_metrics  # noqa: E402
from improved_diffusion.checkpoints import classifier_from_card, load_model  # noqa: E402
from improved_diffusion.file_util import atomic_json  # noqa: E402
from improved_diffusion.model_card import flags_with_card  # noqa: E402
from improved_diffusion.npz_io import save_npz  # noqa: E402
from improved_diffusion.sag import SelfAttentionGuidance, sag_defaults  # noqa: E402
from improved_diffusion.sampling import BatchDrawer, make_cond_fn  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "fashion32_ema.pt")
DEFAULT_CLASSIFIER = os.path.join(REPO_ROOT, "models", "fashion32_classifier.pt")
DEFAULT_CONFIGS = "none,sag,cg,sag+cg"
DEFAULT_CLASSIFIER_SCALE = 1.0


def parse_config(name, sag_flags):
    """
    A config name -> dict(sag=None or {scale, blur_sigma, depth}, cg=None or scale).

    Parts: ``none``; ``sag`` with optional ``_s<scale>``, ``_b<sigma>``,
    ``_d<depth>`` suffixes (defaults from `sag_flags`); ``cg`` with an
    optional scale (``cg2``, ``cg0.5``).
    """
    out = dict(sag=None, cg=None)
    for part in name.split("+"):
        if part == "none":
            continue
        if part.startswith("sag"):
            sag = dict(scale=float(sag_flags["guide_scale"]),
                       blur_sigma=float(sag_flags["blur_sigma"]),
                       depth=int(sag_flags["sel_attn_depth"]),
                       block=sag_flags["sel_attn_block"])
            for key, value in re.findall(r"_([sbd])([0-9.]+)", part[3:]):
                if key == "s":
                    sag["scale"] = float(value)
                elif key == "b":
                    sag["blur_sigma"] = float(value)
                else:
                    sag["depth"] = int(value)
            if re.sub(r"_[sbd][0-9.]+", "", part[3:]):
                raise ValueError(f"bad SAG config part {part!r}")
            out["sag"] = sag
        elif part.startswith("cg"):
            out["cg"] = float(part[2:]) if part[2:] else DEFAULT_CLASSIFIER_SCALE
        else:
            raise ValueError(f"unknown config part {part!r} in {name!r}")
    return out


def draw_set(name, cfg, model, diffusion, classifier, device, *, seed, num_samples, batch_size,
             num_classes, num_heads, guide_start, log=print):
    """Positions 0..num_samples-1 of `seed` with one config (ancestral steps)."""
    sag = None
    if cfg["sag"] is not None:
        s = cfg["sag"]
        sag = SelfAttentionGuidance(model, scale=s["scale"], start=guide_start,
                                    block=s["block"], depth=s["depth"],
                                    blur_sigma=s["blur_sigma"], num_heads=num_heads)
    cond_fn = None
    if cfg["cg"] is not None:
        cond_fn = make_cond_fn(classifier, cfg["cg"])
    draw = BatchDrawer(diffusion, model, (3, 32, 32), device,
                       dict(seed=seed, use_ddim=False, eta=0.0, clip_denoised=True),
                       sag=sag, cond_fn=cond_fn, draw_labels=True, num_classes=num_classes)
    images, labels = [], []
    start = time.time()
    for first in range(0, num_samples, batch_size):
        positions = list(range(first, min(first + batch_size, num_samples)))
        batch, y = draw(positions)
        images.append(batch)
        labels.append(y)
        log(f"{name}: {positions[-1] + 1}/{num_samples} ({time.time() - start:.0f} s)")
    import numpy as np

    return np.concatenate(images), np.concatenate(labels).astype(np.int64), time.time() - start


def noisy_classifier_accuracy(classifier_path, timesteps=(0, 250, 500, 750, 999),
                              num_images=2000, seed=0, batch_size=500):
    """
    Accuracy of the noisy classifier on the first `num_images` test images
    diffused to each of `timesteps` (its own diffusion, fixed noise).
    """
    from improved_diffusion.fashion_mnist import load_fashion_mnist, to_rgb32

    classifier, diffusion = classifier_from_card(classifier_path, th.device("cpu"))
    images, labels = load_fashion_mnist("test")
    x0 = th.from_numpy(to_rgb32(images[:num_images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = th.from_numpy(labels[:num_images].astype("int64"))
    out = {}
    for t in timesteps:
        gen = th.Generator().manual_seed(seed + t)
        correct = 0
        for i in range(0, num_images, batch_size):
            xb = x0[i : i + batch_size]
            tt = th.full((len(xb),), t, dtype=th.long)
            noise = th.randn(xb.shape, generator=gen)
            with th.no_grad():
                logits = classifier(diffusion.q_sample(xb, tt, noise=noise), tt)
            correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
        out[int(t)] = correct / num_images
        print(f"t={t}: accuracy {out[int(t)]:.4f} (n={num_images})", flush=True)
    return out


def paired_stats(npz_path, base_path, n_boot=200, seed=0):
    """
    How sure is a difference between two sets drawn from the same seeds?

    Accuracy: the samples right in one set only (a McNemar test's counts;
    an exact two-sided binomial p-value on them). FID: a 95 % bootstrap
    interval of FID(set) - FID(base), resampling the positions jointly.
    """
    import numpy as np
    from scipy import stats as sstats

    model = fashion_metrics.load_eval_classifier()
    mu_ref, sigma_ref = fashion_metrics.reference_stats(
        model, fashion_metrics.DEFAULT_CLASSIFIER)
    out = {}
    feats, right = [], []
    for path in (npz_path, base_path):
        with np.load(path) as z:
            images, labels = z["arr_0"], z["arr_1"]
        feats.append(fashion_metrics.features(model, images))
        right.append(fashion_metrics.predict(model, images) == labels)
    only_a = int((right[0] & ~right[1]).sum())
    only_b = int((~right[0] & right[1]).sum())
    out["right_only_in_set"], out["right_only_in_base"] = only_a, only_b
    k = only_a + only_b
    out["mcnemar_p"] = (float(sstats.binomtest(only_a, k, 0.5).pvalue) if k else 1.0)
    rng = np.random.default_rng(seed)
    n = len(feats[0])
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        fa = fashion_metrics.frechet_distance(*fashion_metrics.feature_stats(feats[0][idx]),
                                              mu_ref, sigma_ref)
        fb = fashion_metrics.frechet_distance(*fashion_metrics.feature_stats(feats[1][idx]),
                                              mu_ref, sigma_ref)
        diffs.append(fa - fb)
    out["fid_diff_ci95"] = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
    return out


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["paired"]:
        q = argparse.ArgumentParser(description="paired differences of sample sets")
        q.add_argument("sets", nargs="+", help="npz files to compare with --base")
        q.add_argument("--base", required=True)
        q.add_argument("--n_boot", type=int, default=200)
        a = q.parse_args(argv[1:])
        res = {}
        for path in a.sets:
            res[path] = paired_stats(path, a.base, n_boot=a.n_boot)
            r = res[path]
            print(f"{os.path.basename(path)} vs {os.path.basename(a.base)}: right only in set "
                  f"{r['right_only_in_set']}, only in base {r['right_only_in_base']} "
                  f"(McNemar p={r['mcnemar_p']:.3g}); FID difference 95% CI "
                  f"[{r['fid_diff_ci95'][0]:.1f}, {r['fid_diff_ci95'][1]:.1f}]", flush=True)
        return res
    if argv[:1] == ["classifier_accuracy"]:
        q = argparse.ArgumentParser(description="accuracy of the noisy classifier vs t")
        q.add_argument("--classifier_path", default=DEFAULT_CLASSIFIER)
        q.add_argument("--num_images", type=int, default=2000)
        a = q.parse_args(argv[1:])
        return noisy_classifier_accuracy(a.classifier_path, num_images=a.num_images)
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model_path", default=DEFAULT_MODEL)
    p.add_argument("--classifier_path", default=DEFAULT_CLASSIFIER)
    p.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out", "guidance"))
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timestep_respacing", default=None, help="default: the model card's")
    p.add_argument("--use_fp16", default=None, help="default: the model card's")
    args = p.parse_args(argv)

    flags = flags_with_card(args.model_path, model_and_diffusion_defaults())
    if args.timestep_respacing is not None:
        flags["timestep_respacing"] = args.timestep_respacing
    if args.use_fp16 is not None:
        flags["use_fp16"] = args.use_fp16.lower() in ("1", "true", "yes")
    sag_flags = flags_with_card(args.model_path, sag_defaults())

    device = th.device("cpu")
    model, diffusion = create_model_and_diffusion(**flags)
    load_model(model, args.model_path, device, flags["use_fp16"])
    names = [c for c in args.configs.split(",") if c]
    cfgs = {name: parse_config(name, sag_flags) for name in names}
    classifier = None
    if any(c["cg"] is not None for c in cfgs.values()):
        classifier, _ = classifier_from_card(args.classifier_path, device)

    settings = dict(
        seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
        num_classes=flags["num_classes"], num_heads=flags["num_heads"],
        guide_start=int(sag_flags["guide_start"]),
    )
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    setting = dict(model=os.path.basename(args.model_path), step=None,
                   timestep_respacing=flags["timestep_respacing"], use_fp16=flags["use_fp16"],
                   seed=args.seed, num_samples=args.num_samples)
    try:
        with open(os.path.join(args.model_path[:-3] + ".json")) as f:
            setting["step"] = json.load(f).get("step")
    except (OSError, ValueError):
        pass

    for name in names:
        key = f"{name}_n{args.num_samples}"
        npz = os.path.join(args.out_dir, f"{key}.npz")
        seconds = None
        same = results.get(key, {}).get("setting") == setting
        if not (os.path.exists(npz) and same):
            images, labels, seconds = draw_set(name, cfgs[name], model, diffusion, classifier,
                                               device, **settings)
            save_npz(npz, images, labels)
        r = fashion_metrics.score(npz)
        prev = results.get(key, {}) if same else {}
        results[key] = dict(name=name, config=cfgs[name], n=r["n"], accuracy=r["accuracy"],
                            fid=r["fid"], seconds=seconds if seconds else prev.get("seconds"),
                            setting=setting)
        print(f"{key}: accuracy {r['accuracy']:.4f}  feature FID {r['fid']:.2f}", flush=True)
        atomic_json(results_path, results, end="", indent=1)
    write_table(results, os.path.join(args.out_dir, "results.md"))
    return results


def describe(cfg):
    parts = []
    if cfg["sag"] is not None:
        s = cfg["sag"]
        parts.append(f"SAG s={s['scale']:g} sigma={s['blur_sigma']:g} "
                     f"{s['block']}[{s['depth']}]")
    if cfg["cg"] is not None:
        parts.append(f"CG scale={cfg['cg']:g}")
    return " + ".join(parts) or "no guidance"


def write_table(results, path):
    lines = ["| config | guidance | n | accuracy | feature FID | sampling s |",
             "|---|---|---|---|---|---|"]
    for key, r in results.items():
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['name']} | {describe(r['config'])} | {r['n']} | "
                     f"{r['accuracy']:.4f} | {r['fid']:.2f} | {secs} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
