"""
The UNet of guided-diffusion (and its encoder and super-resolution variants).

Parameter names, shapes and order are exactly upstream's, so the published
checkpoints load with ``strict=True``. ``UNetModel.forward`` returns one
tensor; attention maps for Self-Attention Guidance are read with a scoped hook
(see :mod:`improved_diffusion.guidance.attention_capture`), never through the return
value.
"""

from abc import abstractmethod
from collections import OrderedDict
import math
import os

import torch as th
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    convert_conv_dtype,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


ATTENTION_BACKENDS = ("auto", "sdpa", "einsum")
ATTENTION_BACKEND_ENV = "IMPROVED_DIFFUSION_ATTENTION"

# The explicit (einsum) attention path computes its T x T weights in chunks of
# whole heads (whole samples when a capture observes them), bit-identical to
# one product (each head's products and softmax are computed alone anyway).
# On CPU a chunk holds about ATTENTION_CHUNK_ELEMENTS weights, so that it stays
# in cache (timings: benchmarks/RESULTS.md). On other devices a map is one
# product, except that an observed map (float32) is cut at
# OBSERVED_CHUNK_ELEMENTS weights (256 MiB).
ATTENTION_CHUNK_ELEMENTS = 1 << 18
OBSERVED_CHUNK_ELEMENTS = 1 << 26


def default_attention_backend():
    """
    The attention backend new attention layers start with: the
    ``IMPROVED_DIFFUSION_ATTENTION`` environment variable (``auto``, ``sdpa``
    or ``einsum``), ``auto`` when unset.
    """
    value = os.environ.get(ATTENTION_BACKEND_ENV, "").strip().lower() or "auto"
    if value not in ATTENTION_BACKENDS:
        raise ValueError(
            f"{ATTENTION_BACKEND_ENV}={value!r}: expected one of {', '.join(ATTENTION_BACKENDS)}"
        )
    return value


def split_qkv(qkv, n_heads, legacy=True):
    """
    Split a packed qkv tensor into per-head queries, keys and values.

    :param qkv: an [N x (3 * H * C) x T] tensor.
    :param n_heads: number of heads H.
    :param legacy: True for the legacy layout (per head: q, k, v, each C
                   channels); False for the new order (all q, then all k,
                   then all v, each split into heads).
    :return: (q, k, v), each an [N*H x C x T] view of `qkv`.
    """
    bs, width, length = qkv.shape
    assert width % (3 * n_heads) == 0, f"qkv width {width} not divisible by 3*{n_heads}"
    ch = width // (3 * n_heads)
    if legacy:
        return qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    return tuple(t.reshape(bs * n_heads, ch, length) for t in qkv.chunk(3, dim=1))


def _softmax_weights(q, k, out_dtype):
    """Softmax attention weights [B x T x S] from q [B x C x T] and k [B x C x S]."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    # More stable with f16 than dividing afterwards.
    weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
    return th.softmax(weight, dim=-1, dtype=th.float32).type(out_dtype)


def attention_chunk_elements(qkv, observed=False):
    """
    Weights per chunk of the explicit attention path for `qkv`:
    ATTENTION_CHUNK_ELEMENTS on CPU; elsewhere None (one product), or
    OBSERVED_CHUNK_ELEMENTS when the weights are `observed` (a capture
    materialises them in float32).
    """
    if qkv.device.type == "cpu":
        return ATTENTION_CHUNK_ELEMENTS
    return OBSERVED_CHUNK_ELEMENTS if observed else None


def _row_step(rows, heads, length, chunk_elements):
    """Rows (multiples of `heads`) per chunk for a budget of map elements."""
    if not chunk_elements:
        return rows
    per_group = heads * length * length
    return max(1, chunk_elements // per_group) * heads


def iter_attention_weights(qkv, n_heads, legacy=True, chunk_elements=OBSERVED_CHUNK_ELEMENTS):
    """
    Softmax attention weights in float32 (logits from q and k cast to
    float32: the published SAG map) in chunks of whole samples, each with
    at most about `chunk_elements` weights (at least one sample; None: the
    whole batch at once).

    :return: an iterator of (first sample, weight [n*H x T x T] float32,
             v [n*H x C x T]).
    """
    q, k, v = split_qkv(qkv, n_heads, legacy)
    rows, _, length = q.shape
    step = _row_step(rows, n_heads, length, chunk_elements)
    for start in range(0, rows, step):
        sl = slice(start, start + step)
        weight = _softmax_weights(q[sl].float(), k[sl].float(), th.float32)
        yield start // n_heads, weight, v[sl]


def einsum_attention(qkv, n_heads, legacy=True, chunk_elements=None):
    """
    QKV attention with explicit weights (softmax of the scaled q.k logits,
    then their product with the values), as upstream computes it.

    :param chunk_elements: if set, compute the heads in chunks of about this
        many weights (same result, bit for bit; see ATTENTION_CHUNK_ELEMENTS).
    :return: an [N x (H * C) x T] tensor.
    """
    bs, _, length = qkv.shape
    q, k, v = split_qkv(qkv, n_heads, legacy)
    rows = q.shape[0]
    step = rows if not chunk_elements else max(1, chunk_elements // (length * length))
    parts = []
    for start in range(0, rows, step):
        sl = slice(start, start + step)
        weight = _softmax_weights(q[sl], k[sl], q.dtype)
        parts.append(th.einsum("bts,bcs->bct", weight, v[sl]))
    a = parts[0] if len(parts) == 1 else th.cat(parts)
    return a.reshape(bs, -1, length)


def sdpa_attention(qkv, n_heads, legacy=True):
    """
    QKV attention with torch's fused scaled_dot_product_attention (flash or
    memory-efficient kernels: no T x T map is materialised). Equal to the
    einsum path up to float rounding (same scale, 1/sqrt(C)).

    :param qkv: an [N x (3 * H * C) x T] tensor (layout as in split_qkv()).
    :return: an [N x (H * C) x T] tensor.
    """
    bs, width, length = qkv.shape
    assert width % (3 * n_heads) == 0, f"qkv width {width} not divisible by 3*{n_heads}"
    ch = width // (3 * n_heads)
    # One copy to token-major order, so that every head's q, k, v has unit
    # stride along channels (what the fused kernels need).
    tokens = qkv.transpose(1, 2).contiguous()
    if legacy:
        q, k, v = tokens.view(bs, length, n_heads, 3, ch).unbind(3)
    else:
        q, k, v = tokens.view(bs, length, 3, n_heads, ch).unbind(2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )  # [N x H x T x C]
    return out.permute(0, 1, 3, 2).reshape(bs, n_heads * ch, length)


def set_attention_backend(module, backend):
    """
    Set the backend ("auto", "sdpa" or "einsum") of every attention layer in
    `module`; returns `module`.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    for m in module.modules():
        if isinstance(m, _QKVAttentionBase):
            m.backend = backend
    return module


class AttentionPool2d(nn.Module):
    """
    Attention pooling, adapted from CLIP.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_spatial = x.shape
        x = x.reshape(b, c, -1)  # NC(HW)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # NC(HW+1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)  # NC(HW+1)
        x = self.qkv_proj(x)
        x = self.attention(x)
        x = self.c_proj(x)
        return x[:, :, 0]


class TimestepBlock(nn.Module):
    """
    Any module where forward() takes timestep embeddings as a second argument.
    """

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given `emb` timestep embeddings."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """
    A sequential module that passes timestep embeddings to the children that
    support it as an extra input.
    """

    def forward(self, x, emb):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """
    An upsampling layer with an optional convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: determines if the signal is 1D, 2D, or 3D. If 3D, then
                 upsampling occurs in the inner-two dimensions.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(
                x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest"
            )
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    A downsampling layer with an optional convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: determines if the signal is 1D, 2D, or 3D. If 3D, then
                 downsampling occurs in the inner-two dimensions.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(
                dims, self.channels, self.out_channels, 3, stride=stride, padding=1
            )
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block that can optionally change the number of channels.

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the rate of dropout.
    :param out_channels: if specified, the number of out channels.
    :param use_conv: if True and out_channels is specified, use a spatial
        convolution instead of a smaller 1x1 convolution to change the
        channels in the skip connection.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param use_checkpoint: if True, use gradient checkpointing on this module.
    :param up: if True, use this block for upsampling.
    :param down: if True, use this block for downsampling.
    :param norm_groups: GroupNorm groups of both normalizations (upstream: 32).
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
        norm_groups=32,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down

        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(
                emb_channels,
                2 * self.out_channels if use_scale_shift_norm else self.out_channels,
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(
                conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)
            ),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(
                dims, channels, self.out_channels, 3, padding=1
            )
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        """
        Apply the block to a Tensor, conditioned on a timestep embedding.

        :param x: an [N x C x ...] Tensor of features.
        :param emb: an [N x emb_channels] Tensor of timestep embeddings.
        :return: an [N x C x ...] Tensor of outputs.
        """
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """
    An attention block that allows spatial positions to attend to each other.

    Originally ported from here, but adapted to the N-d case.
    https://github.com/hojonathanho/diffusion/blob/1e0dceb3b3495bbe19116a5e1b3596cd0706c543/diffusion_tf/models/unet.py#L66.

    The block's ``attention`` submodule (a :class:`QKVAttentionLegacy` or
    :class:`QKVAttention`) receives the packed qkv tensor: that is where
    attention capture hooks in.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
        norm_groups=32,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert (
                channels % num_head_channels == 0
            ), f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}"
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, norm_groups)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            # split qkv before split heads
            self.attention = QKVAttention(self.num_heads)
        else:
            # split heads before split qkv
            self.attention = QKVAttentionLegacy(self.num_heads)

        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


def count_flops_attn(model, _x, y):
    """
    A counter for the `thop` package to count the operations in an
    attention operation.
    """
    b, c, *spatial = y[0].shape
    num_spatial = int(math.prod(spatial))
    # We perform two matmuls with the same number of ops.
    # The first computes the weight matrix, the second computes
    # the combination of the value vectors.
    matmul_ops = 2 * b * (num_spatial**2) * c
    model.total_ops += th.DoubleTensor([matmul_ops])


class _QKVAttentionBase(nn.Module):
    """
    QKV attention over a packed qkv tensor.

    Two backends compute the same thing: ``einsum`` (explicit weights, as
    upstream; on CPU in cache-sized chunks, ATTENTION_CHUNK_ELEMENTS, bit-identical) and
    ``sdpa`` (torch's fused scaled_dot_product_attention, equal up to float
    rounding, no T x T map). ``backend = "auto"`` (the default, see
    default_attention_backend()) picks sdpa on the devices in
    AUTO_SDPA_DEVICES (CUDA) and einsum elsewhere: on CPU the chunked einsum
    is as fast as sdpa here and keeps float32 results identical to upstream.

    A layer whose weights are observed (register_weights_hook(), used by SAG's
    attention capture) always computes its weights explicitly, once, in
    float32 from q and k: the same weights give the layer's output and go to
    the hooks (in float32 this output is bit-identical to the einsum path).
    """

    legacy = True
    # Devices where backend "auto" uses sdpa.
    AUTO_SDPA_DEVICES = ("cuda",)

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.backend = default_attention_backend()
        self._weights_hooks = OrderedDict()

    def register_weights_hook(self, hook):
        """
        Call ``hook(module, first_sample, weight)`` with this layer's attention
        weights at every forward: ``weight`` is float32 [n*H x T x T] (query
        by key, computed from q and k cast to float32) for the n samples from
        `first_sample` on. A batch may come in several chunks, in order.
        While a hook is registered the layer runs the explicit path and its
        output comes from these same weights.

        :return: a handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._weights_hooks)
        self._weights_hooks[handle.id] = hook
        return handle

    def uses_sdpa(self, qkv):
        """Whether a forward on `qkv` (with no weights hook) runs the sdpa backend."""
        if self.backend == "sdpa":
            return True
        if self.backend == "einsum":
            return False
        if self.backend != "auto":
            raise ValueError(f"unknown attention backend {self.backend!r}")
        return qkv.device.type in self.AUTO_SDPA_DEVICES

    def forward(self, qkv):
        """
        Apply QKV attention.

        :param qkv: an [N x (H * 3 * C) x T] tensor of Qs, Ks, and Vs.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        if self._weights_hooks:
            return self._observed_forward(qkv)
        if self.uses_sdpa(qkv):
            return sdpa_attention(qkv, self.n_heads, legacy=self.legacy)
        return einsum_attention(
            qkv, self.n_heads, legacy=self.legacy, chunk_elements=attention_chunk_elements(qkv)
        )

    def _observed_forward(self, qkv):
        bs, _, length = qkv.shape
        parts = []
        for start, weight, v in iter_attention_weights(
            qkv, self.n_heads, self.legacy, attention_chunk_elements(qkv, observed=True)
        ):
            for hook in list(self._weights_hooks.values()):
                hook(self, start, weight)
            parts.append(th.einsum("bts,bcs->bct", weight.type(v.dtype), v))
        a = parts[0] if len(parts) == 1 else th.cat(parts)
        return a.reshape(bs, -1, length)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVAttentionLegacy(_QKVAttentionBase):
    """
    A module which performs QKV attention. Matches legacy QKVAttention + input/output heads shaping
    """

    legacy = True


class QKVAttention(_QKVAttentionBase):
    """
    A module which performs QKV attention and splits in a different order.
    """

    legacy = False


class UNetModel(nn.Module):
    """
    The full UNet model with attention and timestep embedding.

    :param in_channels: channels in the input Tensor.
    :param model_channels: base channel count for the model.
    :param out_channels: channels in the output Tensor.
    :param num_res_blocks: number of residual blocks per downsample.
    :param attention_resolutions: a collection of downsample rates at which
        attention will take place. May be a set, list, or tuple.
        For example, if this contains 4, then at 4x downsampling, attention
        will be used.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: if True, use learned convolutions for upsampling and
        downsampling.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param num_classes: if specified (as an int), then this model will be
        class-conditional with `num_classes` classes.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage.
    :param num_heads: the number of attention heads in each attention layer.
    :param num_heads_channels: if specified, ignore num_heads and instead use
                               a fixed channel width per attention head.
    :param num_heads_upsample: works with num_heads to set a different number
                               of heads for upsampling. Deprecated.
    :param use_scale_shift_norm: use a FiLM-like conditioning mechanism.
    :param resblock_updown: use residual blocks for up/downsampling.
    :param use_new_attention_order: use a different attention pattern for potentially
                                    increased efficiency.
    :param norm_groups: GroupNorm groups in every block and the output head.
        Upstream's 32 with ``model_channels=32`` normalises each channel on
        its own, so the output cannot carry a per-image, per-channel mean
        (a colour offset the input determines); fewer groups keep it.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        norm_groups=32,
    ):
        super().__init__()

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        self._feature_size = ch
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [
                    ResBlock(
                        ch,
                        time_embed_dim,
                        dropout,
                        out_channels=int(mult * model_channels),
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                        norm_groups=norm_groups,
                    )
                ]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            use_checkpoint=use_checkpoint,
                            num_heads=num_heads,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                            norm_groups=norm_groups,
                        )
                    )
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        ResBlock(
                            ch,
                            time_embed_dim,
                            dropout,
                            out_channels=out_ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            norm_groups=norm_groups,
                            down=True,
                        )
                        if resblock_updown
                        else Downsample(
                            ch, conv_resample, dims=dims, out_channels=out_ch
                        )
                    )
                )
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        self.middle_block = TimestepEmbedSequential(
            ResBlock(
                ch,
                time_embed_dim,
                dropout,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                norm_groups=norm_groups,
            ),
            AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
                norm_groups=norm_groups,
            ),
            ResBlock(
                ch,
                time_embed_dim,
                dropout,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                norm_groups=norm_groups,
            ),
        )
        self._feature_size += ch

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [
                    ResBlock(
                        ch + ich,
                        time_embed_dim,
                        dropout,
                        out_channels=int(model_channels * mult),
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                        norm_groups=norm_groups,
                    )
                ]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            use_checkpoint=use_checkpoint,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                            norm_groups=norm_groups,
                        )
                    )
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        ResBlock(
                            ch,
                            time_embed_dim,
                            dropout,
                            out_channels=out_ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            norm_groups=norm_groups,
                            up=True,
                        )
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch, norm_groups),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self, dtype=th.float16):
        """
        Convert the torso of the model to half precision (float16 as upstream;
        pass ``th.bfloat16`` for bfloat16, the fast half type on CPUs).
        """
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(lambda m: convert_conv_dtype(m, dtype))
        self.dtype = dtype

    def convert_to_fp32(self):
        """Convert the torso of the model to float32."""
        self.convert_to_fp16(th.float32)

    def attention_blocks(self):
        """
        The attention blocks of the model by position.

        :return: a dict mapping (part, index) to the AttentionBlock inside
                 that block, with part one of "input", "middle", "output" and
                 index the block's index in that part (0 for the middle).
        """
        found = {}
        for part, blocks in (
            ("input", self.input_blocks),
            ("middle", [self.middle_block]),
            ("output", self.output_blocks),
        ):
            for index, block in enumerate(blocks):
                for layer in block:
                    if isinstance(layer, AttentionBlock):
                        found[(part, index)] = layer
        return found

    def forward(self, x, timesteps, y=None):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] Tensor of labels, if class-conditional.
        :return: an [N x C x ...] Tensor of outputs.
        """
        assert (y is not None) == (
            self.num_classes is not None
        ), "must specify y if and only if the model is class-conditional"

        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)

        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = th.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.type(x.dtype)
        out = self.out(h)
        if x.is_contiguous() and not out.is_contiguous():
            # A channels-last model: hand back the caller's layout.
            out = out.contiguous()
        return out


class SuperResModel(UNetModel):
    """
    A UNetModel that performs super-resolution.

    Expects an extra kwarg `low_res` to condition on a low-resolution image.
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        x = th.cat([x, upsampled], dim=1)
        return super().forward(x, timesteps, **kwargs)


class EncoderUNetModel(nn.Module):
    """
    The half UNet model with attention and timestep embedding.

    For usage, see UNet.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        self._feature_size = ch
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [
                    ResBlock(
                        ch,
                        time_embed_dim,
                        dropout,
                        out_channels=int(mult * model_channels),
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            use_checkpoint=use_checkpoint,
                            num_heads=num_heads,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                        )
                    )
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        ResBlock(
                            ch,
                            time_embed_dim,
                            dropout,
                            out_channels=out_ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            down=True,
                        )
                        if resblock_updown
                        else Downsample(
                            ch, conv_resample, dims=dims, out_channels=out_ch
                        )
                    )
                )
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        self.middle_block = TimestepEmbedSequential(
            ResBlock(
                ch,
                time_embed_dim,
                dropout,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            ),
            AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            ),
            ResBlock(
                ch,
                time_embed_dim,
                dropout,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            ),
        )
        self._feature_size += ch
        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            assert num_head_channels != -1
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(
                    (image_size // ds), ch, num_head_channels, out_channels
                ),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, self.out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, self.out_channels),
            )
        else:
            raise NotImplementedError(f"Unexpected {pool} pooling")

    def convert_to_fp16(self, dtype=th.float16):
        """Convert the torso of the model to half precision."""
        for part in (self.input_blocks, self.middle_block):
            part.apply(lambda m: convert_conv_dtype(m, dtype))
        self.dtype = dtype

    def convert_to_fp32(self):
        """Convert the torso of the model to float32."""
        self.convert_to_fp16(th.float32)

    def forward(self, x, timesteps):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x K] Tensor of outputs.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        results = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.type(x.dtype).mean(dim=(2, 3)))
            h = th.cat(results, axis=-1)
            return self.out(h)
        else:
            h = h.type(x.dtype)
            return self.out(h)
