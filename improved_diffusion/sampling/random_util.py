"""
Explicit random generators for sampling.

The seed contract (docs/sag.md): the sample at position p of a run seeded S
depends on S + p alone, whatever the batch size or number of ranks. Each
sample owns a CPU ``torch.Generator`` seeded S + p; draws are made on the CPU
and moved to the device, so GPU runs match CPU runs up to float rounding.

On CUDA the per-sample draws would stall every step (tens of milliseconds of
CPU work at 256x256, then a copy that waits for the GPU), so there a
BatchGenerator draws the next normal tensor of the same shape ahead, in a
background thread, from copies of the generators, while the GPU runs; the
copies' states are adopted when that draw is asked for, and the draw is
thrown away if anything else is drawn first. Either way the numbers are the
ones the generators would have given in order.
"""

from concurrent.futures import ThreadPoolExecutor

import torch as th


def _draw_normal(generators, per_sample, pin):
    draws = [th.randn(per_sample, generator=g) for g in generators]
    out = th.empty((len(draws),) + per_sample, pin_memory=pin)
    return th.stack(draws, out=out)


def _clone(generator):
    g = th.Generator()
    g.set_state(generator.get_state())
    return g


class BatchGenerator:
    """
    One CPU generator per sample of a batch.

    :param seeds: one integer seed per sample (S + p for position p).
    :param prefetch: draw the next normal tensor ahead in a background
        thread: None (default) on CUDA devices only, True always, False never.
    """

    def __init__(self, seeds, prefetch=None):
        self.seeds = [int(s) for s in seeds]
        self.generators = [th.Generator().manual_seed(s) for s in self.seeds]
        self.prefetch = prefetch
        self._pending = None  # (per_sample shape, pin, future of (tensor, generator copies))
        self._executor = None

    def __len__(self):
        return len(self.generators)

    def _take_pending(self, per_sample, pin):
        """The prefetched draw if it is the one asked for; else discard it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        key, future = pending[:2], pending[2]
        draws, copies = future.result()  # wait either way: the copies must be done
        if key != (per_sample, pin):
            return None
        for g, c in zip(self.generators, copies):
            g.set_state(c.get_state())
        return draws

    def _start_prefetch(self, per_sample, pin):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="randn")
        copies = [_clone(g) for g in self.generators]
        future = self._executor.submit(lambda: (_draw_normal(copies, per_sample, pin), copies))
        self._pending = (per_sample, pin, future)

    def randn(self, shape, device=None, dtype=th.float32):
        """A [N x ...] tensor: each sample's slice drawn from its own generator."""
        assert shape[0] == len(self.generators), f"batch {shape[0]} != {len(self)} generators"
        per_sample = tuple(shape[1:])
        cuda = device is not None and th.device(device).type == "cuda"
        prefetch = cuda if self.prefetch is None else self.prefetch
        pin = cuda and th.cuda.is_available()
        draws = self._take_pending(per_sample, pin)
        if draws is None:
            draws = _draw_normal(self.generators, per_sample, pin)
        if prefetch:
            self._start_prefetch(per_sample, pin)
        # From pinned memory the copy is queued on the stream without waiting for the GPU.
        return draws.to(device=device, dtype=dtype, non_blocking=pin)

    def randn_like(self, x):
        return self.randn(tuple(x.shape), device=x.device, dtype=x.dtype)

    def randint(self, high, device=None):
        """One label per sample, uniform in [0, high)."""
        self._take_pending(None, None)  # a prefetched normal draw is stale now
        draws = [th.randint(0, high, (1,), generator=g) for g in self.generators]
        return th.cat(draws).to(device=device)
