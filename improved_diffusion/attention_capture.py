"""
Scoped capture of one attention block's attention weights.

Usage::

    with AttentionCapture(block, num_heads=4, legacy=True) as cap:
        model(x, t)
    cap.weights  # [N*num_heads x T x T]

The hook is registered on entry and always removed on exit, exceptions
included. The result lives on the capture object; modules and globals hold
no state.
"""

import torch as th

from .unet import AttentionBlock, attention_weights


class AttentionCapture:
    """
    Capture the attention weights of one AttentionBlock during forward passes.

    The weights are rebuilt from the packed qkv tensor that enters the
    block's attention op, split into `num_heads` heads with the given layout.

    :param block: the AttentionBlock to watch.
    :param num_heads: heads to split qkv into. None: the block's own count.
    :param legacy: qkv layout to assume. None: the block's own layout.
    """

    def __init__(self, block, num_heads=None, legacy=None):
        if not isinstance(block, AttentionBlock):
            raise TypeError(f"expected an AttentionBlock, got {type(block).__name__}")
        self.block = block
        self.num_heads = block.attention.n_heads if num_heads is None else num_heads
        self.legacy = block.attention.legacy if legacy is None else legacy
        self.weights = None
        self.calls = 0
        self._handle = None

    @property
    def is_true_attention(self):
        """Whether the captured map is what the block itself computes."""
        op = self.block.attention
        return self.num_heads == op.n_heads and self.legacy == op.legacy

    def _hook(self, module, inputs, output):
        (qkv,) = inputs
        with th.no_grad():
            weight, _ = attention_weights(qkv.float(), self.num_heads, legacy=self.legacy)
        self.weights = weight
        self.calls += 1

    def __enter__(self):
        if self._handle is not None:
            raise RuntimeError("AttentionCapture is already active")
        self.weights = None
        self.calls = 0
        self._handle = self.block.attention.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
        return False
