"""
Seconds per sampling step: plain, SAG, and SAG + classifier guidance, in
float32 and half precision, for this fork and for the published SAG code
(benchmarks/published_reference.py), on random weights.

    python benchmarks/benchmark_sampling.py                      # everything (long on a CPU)
    python benchmarks/benchmark_sampling.py --archs fashion32 --memory
    python benchmarks/benchmark_sampling.py --device cuda --archs imagenet256 --batch 16 \\
        --precisions fp32,half,bf16 --impls ours --modes plain,sag

Method: the seed commands' schedule (1000 steps respaced to 250, every step
guided); each variant runs the first n1 and the first n2 steps of sampling
one batch (``--steps 1,2``), and (time(n2) - time(n1)) / (n2 - n1) is one
step, start-up cancelled. ``--timing within`` runs n2 steps once instead and
takes the clock at the end of each step: (end of step n2 - end of step n1)
/ (n2 - n1) is one step, without the difference of two runs' start-up and
their run-to-run spread (n1 >= 1 leaves out the first step, which sets
things up). All variants of an architecture (every precision,
implementation and mode) are interleaved, the order reversing every repeat,
so that a change in the machine's load hits them alike; the median over
``--repeats`` is reported. Each variant first runs n1 steps untimed
(warm-up); a variant whose warm-up takes more than ``--slow_s`` seconds (the
published float16 path on a CPU without float16 convolutions: minutes per
step) is timed by that one run instead, marked "1 run".

Precisions: ``fp32``; ``half`` is what ``--use_fp16 True`` runs: for this
fork prepare_model_for_sampling() (bfloat16 weights on a CPU with native
bfloat16, float16 on CUDA), for the published code float16
weights whatever the device; ``bf16`` forces bfloat16 weights for both;
``half_cl`` (this fork only) is ``half`` with the model in channels-last.
The classifier runs in float32 (the seed commands' classifier flags).

``--allocator keep`` sets the C library's allocator as this fork's sampling
runs do (improved_diffusion/allocator.py) for the whole process; the default
leaves glibc's settings, as the published scripts run. The report gives the
page faults per step of each variant.

``--memory`` also measures the peak memory of sampling (CPU: peak RSS of a
fresh process per variant, reset before sampling; CUDA: peak allocated).

Architectures (batch 1 unless --batch): imagenet128 and imagenet256 are the
seed commands' MODEL_FLAGS and SAG_FLAGS; fashion32 is the embedded default
(scripts/presets/fashion32.sh, batch 64).
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch as th  # noqa: E402

from improved_diffusion.allocator import keep_freed_memory  # noqa: E402
from improved_diffusion.sampling.random_util import BatchGenerator  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.guidance.denoiser import ClassifierGuidance, GuidedDenoiser  # noqa: E402
from improved_diffusion.sampling.samplers import Sampler  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    classifier_defaults,
    create_classifier,
    create_gaussian_diffusion,
    create_model,
    model_and_diffusion_defaults,
    prepare_model_for_sampling,
)
from report import save_report  # noqa: E402
from published_reference import (  # noqa: E402
    PublishedSAGModel,
    PublishedSampler,
    use_published_attention,
)

ARCHS = {
    "imagenet128": dict(
        batch=1,
        model=dict(
            attention_resolutions="32,16,8", class_cond=True, image_size=128, learn_sigma=True,
            num_channels=256, num_heads=4, num_res_blocks=2, resblock_updown=True,
            use_scale_shift_norm=True,
        ),
        diffusion=dict(noise_schedule="linear"),
        sag=dict(guide_scale=1.1, block="output", depth=8, blur_sigma=3.0),
        classifier=dict(image_size=128),
        classifier_scale=0.5,
    ),
    "imagenet256": dict(
        batch=1,
        model=dict(
            attention_resolutions="32,16,8", class_cond=False, image_size=256, learn_sigma=True,
            num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
            use_scale_shift_norm=True,
        ),
        diffusion=dict(noise_schedule="linear"),
        sag=dict(guide_scale=1.5, block="output", depth=2, blur_sigma=9.0),
        classifier=dict(image_size=256),
        classifier_scale=1.0,
    ),
    "fashion32": dict(
        batch=64,
        model=dict(
            image_size=32, num_channels=32, channel_mult="1,2,2", num_res_blocks=2,
            attention_resolutions="16,8", num_heads=4, class_cond=True, num_classes=10,
            learn_sigma=True, dropout=0.1, resblock_updown=False, use_scale_shift_norm=True,
        ),
        diffusion=dict(noise_schedule="cosine"),
        sag=dict(guide_scale=1.5, block="output", depth=5, blur_sigma=1.0),
        classifier=dict(
            image_size=32, num_classes=10, classifier_width=32, classifier_depth=1,
            classifier_attention_resolutions="16,8", classifier_pool="attention",
            classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
        ),
        classifier_scale=1.0,
    ),
}
MODES = ("plain", "sag", "sag_cg")


def model_flags(arch):
    flags = model_and_diffusion_defaults()
    flags.update(ARCHS[arch]["model"])
    keep = ("image_size num_channels num_res_blocks channel_mult learn_sigma class_cond use_checkpoint "
            "attention_resolutions num_heads num_head_channels num_heads_upsample use_scale_shift_norm "
            "dropout resblock_updown use_fp16 use_new_attention_order num_classes").split()
    return {k: flags[k] for k in keep}


def build_unet(arch, seed=0):
    th.manual_seed(seed)
    return create_model(**model_flags(arch)).eval()


def build_classifier(arch, seed=1):
    flags = classifier_defaults()
    flags.update(ARCHS[arch]["classifier"])
    th.manual_seed(seed)
    return create_classifier(**flags).eval()


PRECISIONS = ["fp32", "half", "bf16", "half_cl"]


def set_precision(model, impl, precision, device):
    """Cast (and lay out) a UNet as `impl` runs `precision`."""
    if precision == "fp32":
        return model
    if precision == "bf16":
        model.convert_to_fp16(th.bfloat16)
        return model
    if precision == "half_cl":
        return prepare_model_for_sampling(model, device, use_fp16=True, channels_last=True)
    if impl == "ours":
        return prepare_model_for_sampling(model, device, use_fp16=True)
    model.convert_to_fp16(th.float16)  # published: float16 weights on any device
    return model


class Variant:
    """
    One (implementation, precision, mode) of an architecture, ready to run.

    :param model: ours: the UNet; published: its PublishedSAGModel.
    :param classifier: the noisy classifier (sag_cg only).
    """

    def __init__(self, arch, impl, precision, mode, model, classifier, device, batch, respacing=250):
        spec = ARCHS[arch]
        self.name = f"{impl}/{precision}/{mode}"
        self.impl, self.precision, self.mode = impl, precision, mode
        self.arch, self.device, self.batch = arch, device, batch
        self.class_cond = spec["model"]["class_cond"]
        self.num_classes = spec["model"].get("num_classes", 1000)
        size = spec["model"]["image_size"]
        self.shape = (batch, 3, size, size)
        self.classifier = (ClassifierGuidance(classifier, spec["classifier_scale"])
                           if mode == "sag_cg" else None)
        self.needs_labels = self.class_cond or mode == "sag_cg"
        s = spec["sag"]
        if impl == "ours":
            self.unet = model
            self.sag = None
            if mode != "plain":
                self.sag = SelfAttentionGuidance(
                    model, scale=s["guide_scale"], start=250, block=s["block"], depth=s["depth"],
                    blur_sigma=s["blur_sigma"], num_heads=spec["model"].get("num_heads", 4),
                )
        else:
            self.published = model
        self.respacing = respacing
        self._diffusion = None

    def diffusion(self):
        if self._diffusion is None:
            flags = ARCHS[self.arch]["diffusion"]
            self._diffusion = create_gaussian_diffusion(
                steps=1000, learn_sigma=True, noise_schedule=flags["noise_schedule"],
                timestep_respacing=str(self.respacing),
            )
        return self._diffusion

    def _model_fn(self, model):
        if self.class_cond:
            return model

        def model_fn(x, t, y=None):  # labels go to the classifier only
            return model(x, t)

        return model_fn

    def run(self, steps, seed=0, on_step=None):
        """
        The first `steps` steps of sampling one batch; returns the last sample.
        `on_step()`, if given, is called at the end of each step.
        """
        gen = BatchGenerator(range(seed, seed + self.batch))
        kwargs = {}
        if self.needs_labels:
            kwargs["y"] = gen.randint(self.num_classes, device=self.device)
        diffusion = self.diffusion()
        if self.impl == "ours":
            denoiser = GuidedDenoiser.for_diffusion(self._model_fn(self.unet), diffusion, sag=self.sag,
                                                    classifier=self.classifier)
            x = gen.randn(self.shape, device=self.device)
            loop = Sampler.ddpm(diffusion)(denoiser, x, kwargs, gen)
            for done, (_, out) in enumerate(loop, 1):
                if on_step is not None:
                    on_step()
                if done == steps:
                    return out["sample"]
        s = ARCHS[self.arch]["sag"]
        sampler = PublishedSampler(
            diffusion, self._published_fn(), guide_scale=s["guide_scale"],
            guide_start=0 if self.mode == "plain" else 250, blur_sigma=s["blur_sigma"],
        )
        return sampler.p_sample_loop(
            self.shape, cond_fn=self.classifier, model_kwargs=kwargs, device=self.device, max_steps=steps,
            on_step=on_step,
        )

    def _published_fn(self):
        if self.class_cond:
            return self.published
        published = self.published

        class DropLabels(th.nn.Module):
            num_heads = published.num_heads

            def forward(self, x, t, y=None):
                return published(x, t)

        return DropLabels()


def sync(device):
    if th.device(device).type == "cuda":
        th.cuda.synchronize()


def page_faults():
    """Minor page faults of this process so far (the kernel's count)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(variant, steps):
    """(seconds, page faults) of the first `steps` steps of `variant`."""
    sync(variant.device)
    faults = page_faults()
    start = time.perf_counter()
    out = variant.run(steps)
    sync(variant.device)
    elapsed = time.perf_counter() - start
    faults = page_faults() - faults
    if not th.isfinite(out).all():
        print(f"warning: {variant.name} produced non-finite samples", file=sys.stderr)
    return elapsed, faults


def timed_within(variant, n1, n2):
    """
    One run of n2 steps of `variant`, the clock read at the end of each step:
    (seconds, page faults) of steps n1 + 1 to n2, and the seconds of each step.
    """
    marks = []

    def on_step():
        sync(variant.device)
        marks.append((time.perf_counter(), page_faults()))

    sync(variant.device)
    marks.append((time.perf_counter(), page_faults()))
    out = variant.run(n2, on_step=on_step)
    if not th.isfinite(out).all():
        print(f"warning: {variant.name} produced non-finite samples", file=sys.stderr)
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    return marks[n2][0] - marks[n1][0], marks[n2][1] - marks[n1][1], steps


def build_variants(arch, impls, precision, modes, device, batch, skip=()):
    """The variants of one precision; the modes of an implementation share its models."""
    spec = ARCHS[arch]
    variants = []
    for impl in impls:
        if all(f"{impl}/{precision}/{mode}" in skip for mode in modes):
            continue
        if precision == "half_cl" and impl != "ours":
            continue  # an option of this fork only
        unet = set_precision(build_unet(arch).to(device), impl, precision, device)
        if impl == "published":
            s = spec["sag"]
            model = PublishedSAGModel(unet, (s["block"], s["depth"]), spec["model"].get("num_heads", 4))
        else:
            model = unet
        classifier = None
        if "sag_cg" in modes:
            classifier = build_classifier(arch).to(device)
            if impl == "published":
                use_published_attention(classifier, checkpoint_blocks=True)
        for mode in modes:
            if f"{impl}/{precision}/{mode}" not in skip:
                variants.append(Variant(arch, impl, precision, mode, model, classifier, device, batch))
    return variants


def bench_arch(arch, impls, precisions, modes, device, batch, steps, repeats, slow_s, log, skip=(),
               timing="runs"):
    """Time every variant of `arch`, all precisions interleaved (`timing`: see the module's docstring)."""
    variants = []
    for precision in precisions:
        variants += build_variants(arch, impls, precision, modes, device, batch, skip)
    n1, n2 = steps
    per_step = {v.name: [] for v in variants}
    faults = {v.name: [] for v in variants}
    raw = {v.name: [] for v in variants}
    slow = set()
    for v in variants:
        with th.no_grad():
            warm, _ = timed(v, n1)  # warm-up
        log(f"  {arch} {v.name} warm-up: {n1} steps {warm:.2f}s")
        if warm > slow_s or repeats == 0:
            # Minutes per step (or --repeats 0): one run, start-up included.
            slow.add(v.name)
            per_step[v.name].append(warm / n1)
            raw[v.name].append({n1: warm})
    timed_variants = [v for v in variants if v.name not in slow]
    for r in range(repeats):
        order = timed_variants if r % 2 == 0 else timed_variants[::-1]
        for v in order:
            if timing == "within":
                seconds, faulted, each = timed_within(v, n1, n2)
                step = seconds / (n2 - n1)
                per_step[v.name].append(step)
                faults[v.name].append(faulted / (n2 - n1))
                raw[v.name].append({"step_seconds": each})
                log(f"  {arch} {v.name} repeat {r}: steps " + " ".join(f"{t:.2f}" for t in each)
                    + f" s -> {step:.3f} s/step")
                continue
            counts = (n1, n2) if r % 2 == 0 else (n2, n1)
            measured = {n: timed(v, n) for n in counts}
            times = {n: measured[n][0] for n in counts}
            step = (times[n2] - times[n1]) / (n2 - n1)
            per_step[v.name].append(step)
            faults[v.name].append((measured[n2][1] - measured[n1][1]) / (n2 - n1))
            raw[v.name].append(times)
            log(f"  {arch} {v.name} repeat {r}: {n1} steps {times[n1]:.2f}s, {n2} steps {times[n2]:.2f}s"
                f" -> {step:.3f} s/step")
    del variants, timed_variants
    return {
        name: dict(
            median=statistics.median(vals),
            per_step=vals,
            page_faults_per_step=statistics.median(faults[name]) if faults[name] else None,
            single_run=name in slow,
            runs=[{str(k): t for k, t in times.items()} for times in raw[name]],
        )
        for name, vals in per_step.items()
    }


# --- peak memory -----------------------------------------------------------


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def memory_child(arch, impl, precision, mode, device, batch, steps):
    """In a fresh process: peak memory of sampling one batch (MiB)."""
    variants = build_variants(arch, [impl], precision, [mode], device, batch)
    v = variants[0]
    with th.no_grad():
        v.run(1)  # warm-up: one-time allocations are not sampling's
    if th.device(device).type == "cuda":
        th.cuda.synchronize()
        th.cuda.reset_peak_memory_stats()
        base = th.cuda.memory_allocated()
        v.run(steps)
        th.cuda.synchronize()
        peak = th.cuda.max_memory_allocated()
        return dict(peak_mib=peak / 2**20, base_mib=base / 2**20)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _rss_kib("VmRSS")
    v.run(steps)
    peak = _rss_kib("VmHWM")
    return dict(peak_mib=peak / 1024, base_mib=base / 1024)


def measure_memory(arch, impls, precisions, modes, device, batch, steps, threads, log, skip=(),
                   allocator="default"):
    results = {}
    for precision in precisions:
        for impl in impls:
            for mode in modes:
                if f"{impl}/{precision}/{mode}" in skip or (precision == "half_cl" and impl != "ours"):
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--memory_child",
                       ",".join([arch, impl, precision, mode]), "--device", device,
                       "--batch", str(batch), "--steps", f"{steps},{steps}", "--allocator", allocator]
                if threads:
                    cmd += ["--threads", str(threads)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    log(f"  memory {arch} {impl}/{precision}/{mode} failed: {res.stderr[-500:]}")
                    continue
                got = json.loads(res.stdout.strip().splitlines()[-1])
                results[f"{impl}/{precision}/{mode}"] = got
                log(f"  memory {arch} {impl}/{precision}/{mode}: peak {got['peak_mib']:.0f} MiB "
                    f"(before sampling {got['base_mib']:.0f} MiB)")
    return results


# --- report ------------------------------------------------------------------


def machine_info(device, threads):
    info = dict(
        python=platform.python_version(), torch=th.__version__, threads=th.get_num_threads(),
        platform=platform.platform(), device=device,
    )
    try:
        with open("/proc/cpuinfo") as f:
            cpu = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu"] = f"{cpu[0]} x{len(cpu)}" if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        from improved_diffusion.script_util import cpu_supports_bf16

        info["cpu_native_bf16"] = cpu_supports_bf16()
    except Exception:  # pragma: no cover
        pass
    if th.device(device).type == "cuda":
        info["gpu"] = th.cuda.get_device_name()
    info["loadavg_start"] = os.getloadavg()
    return info


def median_interval(values, level=0.95):
    """
    (low, high): a distribution-free interval for the median of `values`,
    the order statistics x_(j) and x_(n-1-j) (0-based) with the largest j
    whose coverage 1 - 2 P(Binomial(n, 1/2) <= j) is at least `level`;
    None when n is too small for any (n < 6 at 0.95).
    """
    xs = sorted(values)
    n = len(xs)
    tail, best = 0.0, None
    for j in range(n // 2):
        tail += math.comb(n, j) / 2 ** n
        if 1 - 2 * tail < level:
            break
        best = (xs[j], xs[n - 1 - j])
    return best


def paired_ratio(results, arch, a, b):
    """
    Median over repeats of the per-repeat ratio a / b, with its interval
    (median_interval); a and b ran next to each other in every repeat, so
    a change in the machine's speed between repeats cancels.
    """
    try:
        ra, rb = results[arch][a], results[arch][b]
    except KeyError:
        return None
    if ra["single_run"] or rb["single_run"]:
        return None
    ratios = [x / y for x, y in zip(ra["per_step"], rb["per_step"])]
    return statistics.median(ratios), median_interval(ratios)


def ratio(results, arch, a, b):
    try:
        return results[arch][a]["median"] / results[arch][b]["median"]
    except (KeyError, ZeroDivisionError):
        return None


def markdown(report):
    lines = []
    m = report["machine"]
    lines.append(f"Machine: {m.get('cpu')}, {m.get('gpu', 'no GPU')}; torch {m['torch']}, "
                 f"{m['threads']} threads; load average {m['loadavg_start']} at start, "
                 f"{m.get('loadavg_end')} at end.")
    lines.append("")
    lines.append(f"Command: `{report['command']}`")
    lines.append("")
    for arch, res in report["timing"].items():
        batch = report["batch"][arch]
        n1, n2 = report["steps"]
        how = (f"steps {n1 + 1} to {n2} within each run" if report.get("timing_method") == "within"
               else f"steps {n1} and {n2}")
        lines.append(f"### {arch}, batch {batch}: seconds per step (median of {report['repeats']}, {how})")
        lines.append("")
        precisions = sorted({k.split("/")[1] for k in res}, key=PRECISIONS.index)
        impls = [i for i in ("ours", "published") if any(k.startswith(i + "/") for k in res)]
        header = "| precision | mode | " + " | ".join(impls) + (" | ours / published |" if len(impls) == 2 else " |")
        lines.append(header)
        lines.append("|" + " --- |" * (header.count("|") - 1))
        for p in precisions:
            for mode in MODES:
                cells = []
                for impl in impls:
                    r = res.get(f"{impl}/{p}/{mode}")
                    cells.append((f"{r['median']:.3f}" + (" (1 run)" if r["single_run"] else "")) if r else "")
                row = f"| {p} | {mode} | " + " | ".join(cells) + " |"
                if len(impls) == 2:
                    q = ratio(report["timing"], arch, f"ours/{p}/{mode}", f"published/{p}/{mode}")
                    row += f" {q:.2f} |" if q else " |"
                if any(cells):
                    lines.append(row)
        lines.append("")
        extra = []
        for p in precisions:
            q = ratio(report["timing"], arch, f"ours/{p}/sag", f"ours/{p}/plain")
            if q:
                extra.append(f"ours {p} SAG / ours {p} plain = {q:.2f}")
            against = (("", f"ours/{p}/plain"), (f"ours {p} SAG / published {p} SAG ", f"published/{p}/sag"))
            for label, base in against:
                paired = paired_ratio(report["timing"], arch, f"ours/{p}/sag", base)
                if paired:
                    q, interval = paired
                    extra.append(f"{label}per repeat {q:.3f}" + (
                        f" (95 % interval for the median {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
        q = ratio(report["timing"], arch, "ours/half/sag", "published/half/sag")
        if q:
            extra.append(f"ours half SAG / published `--use_fp16` SAG = {q:.2f}")
        if extra:
            lines.append("; ".join(extra) + ".")
            lines.append("")
        faults = [f"{name} {r['page_faults_per_step']:.0f}" for name, r in res.items()
                  if r.get("page_faults_per_step") is not None]
        if faults:
            lines.append(f"Page faults per step (allocator: {report.get('allocator', 'default')}): "
                         + "; ".join(faults) + ".")
            lines.append("")
        if str(m.get("device", "cpu")).startswith("cuda"):
            rates = [f"{name} {batch / r['median']:.2f}" for name, r in res.items() if r["median"] > 0]
            lines.append("Images per second (batch / seconds per step): " + "; ".join(rates) + ".")
            lines.append("")
    for arch, res in report.get("memory", {}).items():
        lines.append(f"### {arch}, batch {report['batch'][arch]}: peak memory of sampling (MiB)")
        lines.append("")
        lines.append("| variant | peak | before sampling | peak / plain peak |")
        lines.append("| --- | --- | --- | --- |")
        for name, r in res.items():
            impl, p, _ = name.split("/")
            plain = res.get(f"{impl}/{p}/plain")
            q = f"{r['peak_mib'] / plain['peak_mib']:.2f}" if plain else ""
            lines.append(f"| {name} | {r['peak_mib']:.0f} | {r['base_mib']:.0f} | {q} |")
        lines.append("")
    return "\n".join(lines)


def load_report(path):
    with open(path) as f:
        report = json.load(f)
    report["steps"] = tuple(report["steps"])
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--archs", default="fashion32,imagenet128,imagenet256")
    parser.add_argument("--precisions", default="fp32,half")
    parser.add_argument("--impls", default="ours,published")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", default="1,2", help="two step counts, n1 < n2")
    parser.add_argument("--slow_s", type=float, default=120.0,
                        help="a variant whose warm-up (n1 steps) takes longer is timed by that one run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="0: each variant is timed by its warm-up run alone")
    parser.add_argument("--timing", choices=("runs", "within"), default="runs",
                        help="runs: one step is the difference of an n1- and an n2-step run; "
                        "within: the clock at the end of each step of one n2-step run")
    parser.add_argument("--batch", type=int, default=None, help="override every architecture's batch")
    parser.add_argument("--device", default="cuda" if th.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip", default="", help="variants not to run, e.g. published/half/sag_cg")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--memory_steps", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--from_json", default=None,
                        help="comma-separated reports (--json) to merge into one table; runs nothing")
    parser.add_argument("--allocator", choices=("default", "keep"), default="default",
                        help="default: the C library's settings (as the published scripts run); "
                        "keep: what this fork's sampling runs set (improved_diffusion/allocator.py)")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        text = "\n\n".join(markdown(load_report(path)) for path in args.from_json.split(","))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        print(text)
        return
    if args.allocator == "keep":
        keep_freed_memory()
    if args.threads:
        th.set_num_threads(args.threads)
    try:
        steps = tuple(int(s) for s in args.steps.split(","))
    except ValueError:
        parser.error(f"--steps takes two step counts n1,n2, e.g. 1,2; got {args.steps!r}")

    if args.memory_child:
        arch, impl, precision, mode = args.memory_child.split(",")
        batch = args.batch or ARCHS[arch]["batch"]
        print(json.dumps(memory_child(arch, impl, precision, mode, args.device, batch, steps[0])))
        return
    if len(steps) != 2 or steps[0] < 1 or (args.repeats > 0 and steps[0] >= steps[1]):
        parser.error(f"--steps takes two step counts n1,n2 with 1 <= n1 < n2, got {args.steps!r}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    archs = args.archs.split(",")
    impls = args.impls.split(",")
    precisions = args.precisions.split(",")
    modes = args.modes.split(",")
    skip = set(filter(None, args.skip.split(",")))
    report = dict(
        command="python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        machine=machine_info(args.device, args.threads), steps=steps, repeats=args.repeats,
        timing={}, batch={}, memory={}, allocator=args.allocator, timing_method=args.timing,
    )
    for arch in archs:
        batch = args.batch or ARCHS[arch]["batch"]
        report["batch"][arch] = batch
        log(f"{arch} batch {batch} {','.join(precisions)}")
        report["timing"][arch] = bench_arch(
            arch, impls, precisions, modes, args.device, batch, steps, args.repeats, args.slow_s, log, skip,
            args.timing,
        )
        if args.memory:
            report["memory"][arch] = measure_memory(
                arch, impls, precisions, [m for m in modes if m != "sag_cg"], args.device, batch,
                args.memory_steps, args.threads, log, skip, args.allocator,
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    save_report(markdown(report), report, args.json, args.markdown)


if __name__ == "__main__":
    main()
