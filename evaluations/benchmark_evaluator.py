"""
Time and peak memory of evaluating NUM_SAMPLES samples against a reference
batch of as many images, with a random-weight FID Inception (no download).

The network's cost is linear in the number of images (batches of
--batch_size, streamed), so it is timed on --network_images random images and
scaled to the 2 x NUM_SAMPLES images a full run pushes through it (reference
and samples). Everything after the network (statistics, Inception Score, FID
and sFID with scipy's sqrtm, precision/recall with 10,000 x 10,000 distance
blocks) is run at full size on random features of the real widths.
Pass --network_images 2*NUM_SAMPLES to time the network without scaling.

    nice -n 10 python evaluations/benchmark_evaluator.py --num_samples 10000
"""

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations import evaluator as ev  # noqa: E402
from evaluations.fid_inception import POOL_DIM, SPATIAL_DIM, FIDInceptionV3  # noqa: E402


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def random_model(device):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for name, p in model.named_parameters():
        if name.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
        elif name == "fc.weight":
            torch.nn.init.normal_(p, std=POOL_DIM ** -0.5)
    return model.eval().to(memory_format=torch.channels_last).to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_samples", type=int, default=10000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--network_images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    n = args.num_samples
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{n} samples of {args.image_size}x{args.image_size}")

    # 1. everything after the network, at full size (memory grows with N)
    timings = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = time.perf_counter() - t
        print(f"{name}: {timings[name]:.1f} s (peak RSS so far {peak_rss_mib():.0f} MiB)", flush=True)
        return out

    ref_pool = np.abs(rng.standard_normal((n, POOL_DIM), dtype=np.float32))
    ref_spatial = np.abs(rng.standard_normal((n, SPATIAL_DIM), dtype=np.float32))
    samp_pool = np.abs(rng.standard_normal((n, POOL_DIM), dtype=np.float32)) * 1.1
    samp_spatial = np.abs(rng.standard_normal((n, SPATIAL_DIM), dtype=np.float32)) * 1.1
    stats = timed("statistics (4 x mean + np.cov)", lambda: [
        ev.compute_statistics(a) for a in (ref_pool, ref_spatial, samp_pool, samp_spatial)])
    timed("FID (sqrtm 2048)", ev.frechet_distance, *stats[2], *stats[0])
    timed("sFID (sqrtm 2023)", ev.frechet_distance, *stats[3], *stats[1])
    timed("precision/recall", ev.precision_recall, ref_pool, samp_pool, device=args.device)
    maths_peak = peak_rss_mib()

    # 2. network, timed on a subset (its memory is bounded by --batch_size)
    model = random_model(args.device)
    evaluator = ev.Evaluator(model, device=args.device, batch_size=args.batch_size, progress=False)
    m = args.network_images
    images = rng.integers(0, 256, size=(m, args.image_size, args.image_size, 3), dtype=np.uint8)
    batches = [images[i : i + args.batch_size] for i in range(0, m, args.batch_size)]
    evaluator.compute_activations(batches[:1])  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pool, _ = evaluator.compute_activations(batches)
    t_net = time.perf_counter() - t0
    per_image = t_net / m
    print(f"network: {m} images in {t_net:.1f} s = {per_image * 1000:.1f} ms/image "
          f"-> {2 * n} images (reference + samples) ~ {2 * n * per_image / 60:.1f} min; "
          f"peak RSS so far {peak_rss_mib():.0f} MiB")
    del images, batches
    timed("inception score", evaluator.compute_inception_score, samp_pool)

    after = sum(timings.values())
    total = 2 * n * per_image + after
    print(f"after the network: {after:.1f} s")
    print(f"estimated total for {n} samples + {n} reference images: {total / 60:.1f} min "
          f"({2 * n * per_image / 60:.1f} min network, scaled from {m} images)")
    print(f"peak RSS: {maths_peak:.0f} MiB after the maths at full size, "
          f"{peak_rss_mib():.0f} MiB overall")


if __name__ == "__main__":
    main()
