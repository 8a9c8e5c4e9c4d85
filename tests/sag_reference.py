"""
Whole-map references for the tests, written in plain torch from the
published SAG algorithm (docs/sag.md, steps 4 and 5) and importing nothing
from the package: the attention weights of a packed qkv tensor, and the SAG
mask of a whole map. The package never holds the whole map while sampling
(it reduces it to the per-key mass chunk by chunk); these build it all.
"""

import math

import torch as th
import torch.nn.functional as F


def attention_weights(qkv, n_heads, legacy=True, float32=False):
    """
    Softmax attention weights [N*H x T x T] (query by key) and v [N*H x C x T]
    of a packed qkv [N x 3*H*C x T], as guided-diffusion's attention computes
    them: the legacy layout holds q, k, v per head, the new order all q, then
    all k, then all v; q and k are each scaled by C ** -0.25 and the softmax
    runs in float32. With `float32`, q and k are cast to float32 first (the
    published SAG map); else the weights come back in the qkv dtype.
    """
    n, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if legacy:
        q, k, v = qkv.reshape(n * n_heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(n * n_heads, ch, length) for part in qkv.chunk(3, dim=1))
    if float32:
        q, k = q.float(), k.float()
    scale = 1 / math.sqrt(math.sqrt(ch))
    logits = th.einsum("bct,bcs->bts", q * scale, k * scale)
    return th.softmax(logits.float(), dim=-1).type(q.dtype), v


def attention_mask(attn_map, batch_size, image_shape):
    """
    The [N x C x H x W] SAG mask of a whole [N*H x T x T] map: the map
    averaged over heads, summed over queries, > 1.0, as a res x res square,
    repeated over the C image channels and upsampled nearest-neighbour.
    """
    heads = attn_map.shape[0] // batch_size
    tokens = attn_map.shape[-1]
    mass = attn_map.float().reshape(batch_size, heads, tokens, tokens).mean(1).sum(1)
    res = math.isqrt(tokens)
    mask = (mass > 1.0).reshape(batch_size, 1, res, res).float()
    channels, height, width = image_shape
    return F.interpolate(mask.repeat(1, channels, 1, 1), (height, width))
