"""
Scoped capture of one attention block's attention weights.

Usage::

    with AttentionCapture(block, num_heads=4, legacy=True) as cap:
        model(x, t)
    cap.key_mass  # [N x T]: mean over heads, then sum over queries

    with AttentionCapture(block, keep="weights") as cap:
        model(x, t)
    cap.weights   # [N*H x T x T], the whole map

The hooks are registered on entry and always removed on exit, exceptions
included. The result lives on the capture object; modules and globals hold
no state.

When the requested map is the attention the block really computes (same
head count and layout), the weights are computed once, by the block's
attention op itself, and serve both its output and the capture (the op's
weights hook). Otherwise they are rebuilt from the qkv tensor that entered
the op (a forward hook). Either way they are float32, computed from q and k
cast to float32, as the published SAG code computes its map.
"""

import torch as th

from . import sag_ops
from ..unet import AttentionBlock, attention_chunk_elements, iter_attention_weights

KEEP_CHOICES = ("weights", "key_mass")


class AttentionCapture:
    """
    Capture the attention weights of one AttentionBlock during forward passes.

    :param block: the AttentionBlock to watch.
    :param num_heads: heads to split qkv into. None: the block's own count.
    :param legacy: qkv layout to assume. None: the block's own layout.
    :param keep: "key_mass" (default) keeps only the per-key mass that the
        SAG mask needs (``weights`` stays None), reduced chunk by chunk, so
        the batch's T x T map is never held; "weights" keeps the whole map
        (``weights``, and ``key_mass`` from it), for inspection.
    """

    def __init__(self, block, num_heads=None, legacy=None, keep="key_mass"):
        if not isinstance(block, AttentionBlock):
            raise TypeError(f"expected an AttentionBlock, got {type(block).__name__}")
        if keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
        self.block = block
        self.num_heads = block.attention.n_heads if num_heads is None else num_heads
        self.legacy = block.attention.legacy if legacy is None else legacy
        self.keep = keep
        self.weights = None
        self._key_mass = None
        self.calls = 0
        self._parts = []
        self._handles = None

    @property
    def is_true_attention(self):
        """Whether the captured map is what the block itself computes."""
        op = self.block.attention
        return self.num_heads == op.n_heads and self.legacy == op.legacy

    @property
    def key_mass(self):
        """[N x T] float32: the map averaged over heads, summed over queries."""
        if self._key_mass is None and self.weights is not None:
            self._key_mass = sag_ops.key_mass(self.weights, self.weights.shape[0] // self.num_heads)
        return self._key_mass

    def _take(self, _module, start, weight):
        if start == 0:  # a new forward (drops what a failed one left)
            self._parts = []
        weight = weight.detach()
        if self.keep == "weights":
            self._parts.append(weight)
        else:
            n = weight.shape[0] // self.num_heads
            self._parts.append(sag_ops.key_mass(weight, n))

    def _after_forward(self, module, inputs, output):
        if not self.is_true_attention:
            # The map is not what the op computed: rebuild it from its input.
            (qkv,) = inputs
            with th.no_grad():
                for start, weight, _ in iter_attention_weights(
                    qkv, self.num_heads, self.legacy, attention_chunk_elements(qkv, observed=True)
                ):
                    self._take(module, start, weight)
        parts, self._parts = self._parts, []
        result = parts[0] if len(parts) == 1 else th.cat(parts)
        if self.keep == "weights":
            self.weights, self._key_mass = result, None
        else:
            self.weights, self._key_mass = None, result
        self.calls += 1

    def __enter__(self):
        if self._handles is not None:
            raise RuntimeError("AttentionCapture is already active")
        self.weights = None
        self._key_mass = None
        self._parts = []
        self.calls = 0
        op = self.block.attention
        handles = [op.register_forward_hook(self._after_forward)]
        if self.is_true_attention:
            handles.append(op.register_weights_hook(self._take))
        self._handles = handles
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = None
        self._parts = []
        return False
