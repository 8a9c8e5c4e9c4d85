"""
Explicit random generators for sampling.

The seed contract (SAG-NOTES.md): the sample at position p of a run seeded S
depends on S + p alone, whatever the batch size or number of ranks. Each
sample owns a CPU ``torch.Generator`` seeded S + p; draws are made on the CPU
and moved to the device, so GPU runs match CPU runs up to float rounding.
"""

import torch as th


class BatchGenerator:
    """
    One CPU generator per sample of a batch.

    :param seeds: one integer seed per sample (S + p for position p).
    """

    def __init__(self, seeds):
        self.seeds = [int(s) for s in seeds]
        self.generators = [th.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, device=None, dtype=th.float32):
        """A [N x ...] tensor: each sample's slice drawn from its own generator."""
        assert shape[0] == len(self.generators), f"batch {shape[0]} != {len(self)} generators"
        per_sample = tuple(shape[1:])
        draws = [th.randn(per_sample, generator=g) for g in self.generators]
        return th.stack(draws).to(device=device, dtype=dtype)

    def randn_like(self, x):
        return self.randn(tuple(x.shape), device=x.device, dtype=x.dtype)

    def randint(self, high, device=None):
        """One label per sample, uniform in [0, high)."""
        draws = [th.randint(0, high, (1,), generator=g) for g in self.generators]
        return th.cat(draws).to(device=device)
