"""
Whole-map references for the tests: the attention weights of a packed qkv
tensor and the SAG mask built from a whole map, as the published sampler
builds it. The package itself never holds the whole map while sampling
(it reduces it to the per-key mass chunk by chunk).
"""

import torch as th

from improved_diffusion import sag_ops, unet


def attention_weights(qkv, n_heads, legacy=True, float32=False):
    """
    Softmax attention weights [N*H x T x T] (query by key) and v [N*H x C x T]
    of a packed qkv tensor; with `float32`, from q and k cast to float32 (the
    published SAG map), else in the qkv dtype (what the attention layers do).
    """
    q, k, v = unet.split_qkv(qkv, n_heads, legacy)
    if float32:
        return unet._softmax_weights(q.float(), k.float(), th.float32), v
    return unet._softmax_weights(q, k, q.dtype), v


def attention_mask(attn_map, batch_size, image_shape):
    """The [N x C x H x W] SAG mask from a whole [N*H x T x T] map (docs/sag.md, step 5)."""
    return sag_ops.key_mass_mask(sag_ops.key_mass(attn_map, batch_size), image_shape)
