"""
The published SAG sampling step (SusungHong/Self-Attention-Guidance, on
guided-diffusion), rebuilt from this fork's modules so that it can be timed
against ours on the same machine. Benchmark use only: nothing in the package
imports it.

What it reproduces, cost for cost:
- the UNet returns ``(output, attention map)``: a forward hook on the chosen
  block's attention op stores a float32 copy of its qkv input at every
  forward, and the map is rebuilt from it at the end of *every* forward
  (second pass included), split by the ``--num_heads`` flag, legacy layout;
- every attention layer runs upstream's explicit einsum attention (no fused
  kernel, no chunking);
- the classifier's attention blocks are gradient-checkpointed (upstream's
  AttentionBlock passes ``True`` to ``checkpoint``), so the classifier
  gradient recomputes them;
- a guided step: first pass (p_mean_variance with the map), mask (mean over
  heads, sum over queries, > 1, nearest upsampling of a 3-channel repeat),
  torchvision's GaussianBlur maths (kernel 31, reflect padding, one 31 x 31
  convolution per channel, and its draw of sigma from the global generator),
  re-noise, a full second p_mean_variance (map and all), combine, posterior
  mean, classifier guidance on the mean, ancestral sample;
- ``--use_fp16`` is float16 weights in the torso whatever the device, as the
  published scripts do (``model.convert_to_fp16()``).

Written from the published code's behaviour (docs/sag.md); no code of it is
copied, and torchvision is not used.
"""

import math

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from improved_diffusion.gaussian_diffusion import ModelVarType, _extract_into_tensor
from improved_diffusion.unet import AttentionBlock, _QKVAttentionBase


def published_attention_weights(qkv, num_heads):
    """Upstream's legacy-layout attention weights (softmax in float32, cast back)."""
    bs, width, length = qkv.shape
    assert width % (3 * num_heads) == 0
    ch = width // (3 * num_heads)
    q, k, _ = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
    return th.softmax(weight.float(), dim=-1).type(weight.dtype)


class PublishedQKVAttention(nn.Module):
    """Upstream's QKVAttentionLegacy / QKVAttention forward (einsum, one product)."""

    def __init__(self, n_heads, legacy):
        super().__init__()
        self.n_heads = n_heads
        self.legacy = legacy

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        scale = 1 / math.sqrt(math.sqrt(ch))
        if self.legacy:
            q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
            weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
        else:
            q, k, v = qkv.chunk(3, dim=1)
            weight = th.einsum(
                "bct,bcs->bts",
                (q * scale).view(bs * self.n_heads, ch, length),
                (k * scale).view(bs * self.n_heads, ch, length),
            )
            v = v.reshape(bs * self.n_heads, ch, length)
        weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = th.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


def use_published_attention(model, checkpoint_blocks=False):
    """
    Swap every attention op of `model` for upstream's (they hold no
    parameters). With `checkpoint_blocks`, attention blocks recompute in
    backward, as upstream's always-checkpointed AttentionBlock does.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, _QKVAttentionBase):
                setattr(module, name, PublishedQKVAttention(child.n_heads, child.legacy))
        if checkpoint_blocks and isinstance(module, AttentionBlock):
            module.forward = _checkpointed(module)
    return model


def _checkpointed(block):
    def forward(x):
        if th.is_grad_enabled() and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(block._forward, x, use_reentrant=False)
        return block._forward(x)

    return forward


class PublishedSAGModel(nn.Module):
    """
    A UNetModel as the published SAG code runs it: forward returns
    ``(output, map)``, the map rebuilt from the stored qkv after every call.

    :param unet: a UNetModel (its attention ops are replaced by upstream's).
    :param block: (part, index) of the attention block to read, e.g. ("output", 8).
    :param num_heads: the --num_heads flag.
    """

    def __init__(self, unet, block, num_heads):
        super().__init__()
        self.unet = use_published_attention(unet)
        self.num_heads = num_heads
        self.extract_attention = unet.attention_blocks()[block].attention
        self.extract_attention.register_forward_hook(self._save_qkv)
        self.qkv = None

    def _save_qkv(self, module, inputs, output):
        self.qkv = inputs[0].detach().float()

    def forward(self, x, timesteps, **kwargs):
        out = self.unet(x, timesteps, **kwargs)
        return out, published_attention_weights(self.qkv, self.num_heads)


def published_gaussian_blur(img, sigma, kernel_size=31):
    """
    torchvision's GaussianBlur(kernel_size, sigma) on a float batch: it draws
    sigma uniformly from [sigma, sigma] (one draw from the global generator),
    pads by reflection and convolves each channel with the 2-D kernel.
    """
    sigma = th.empty(1).uniform_(sigma, sigma).item()
    half = (kernel_size - 1) * 0.5
    x = th.linspace(-half, half, steps=kernel_size)
    pdf = th.exp(-0.5 * (x / sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    kernel2d = th.mm(kernel1d[:, None], kernel1d[None, :]).to(img.device, img.dtype)
    channels = img.shape[-3]
    kernel = kernel2d.expand(channels, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    padded = F.pad(img, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


class PublishedSampler:
    """
    The published ancestral sampler with SAG over one of this fork's
    (spaced) diffusions, whose maths helpers are upstream's.

    :param diffusion: a SpacedDiffusion (epsilon prediction, as the
        published models).
    :param model: a PublishedSAGModel.
    :param guide_scale, guide_start, blur_sigma: the SAG flags. As published,
        a step with index i is guided when guide_start > i, whatever the
        scale (``--guide_scale 1.0`` still runs the second pass); the
        benchmark's published plain step uses guide_start 0.
    """

    def __init__(self, diffusion, model, guide_scale, guide_start, blur_sigma):
        self.diffusion = diffusion
        self.num_heads = model.num_heads
        self.model = diffusion._wrap_model(model)
        self.guide_scale = guide_scale
        self.guide_start = guide_start
        self.blur_sigma = blur_sigma

    def p_mean_variance(self, x, t, clip_denoised=True, model_kwargs=None):
        d = self.diffusion
        B, C = x.shape[:2]
        model_output, attn_map = self.model(x, t, **(model_kwargs or {}))
        assert d.model_var_type == ModelVarType.LEARNED_RANGE
        model_output, model_var_values = th.split(model_output, C, dim=1)
        min_log = _extract_into_tensor(d.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract_into_tensor(np.log(d.betas), t, x.shape)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        model_variance = th.exp(model_log_variance)
        pred_xstart = d._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = d.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "eps": model_output,
            "attn_map": attn_map,
        }

    def attention_masking(self, x, t, attn_map, prev_noise):
        B, C, H, W = x.shape
        num_heads = self.num_heads
        tokens = attn_map.shape[-1]
        res = math.isqrt(tokens)
        mask = (
            attn_map.reshape(B, num_heads, tokens, tokens).mean(1, keepdim=False).sum(1, keepdim=False)
            > 1.0
        )
        mask = mask.reshape(B, res, res).unsqueeze(1).repeat(1, 3, 1, 1).int().float()
        mask = F.interpolate(mask, (H, W))
        blurred = published_gaussian_blur(x, self.blur_sigma)
        mixed = blurred * mask + x * (1 - mask)
        return self.diffusion.q_sample(mixed, t, noise=prev_noise)

    def p_sample(self, x, t, cond_fn=None, model_kwargs=None, clip_denoised=True):
        d = self.diffusion
        model_kwargs = model_kwargs or {}
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        out = self.p_mean_variance(x, t, clip_denoised, model_kwargs)
        if self.guide_start > t[0]:
            cond_eps = out["eps"]
            degraded = self.attention_masking(out["pred_xstart"], t, out["attn_map"], cond_eps)
            uncond_eps = self.p_mean_variance(degraded, t, clip_denoised, model_kwargs)["eps"]
            guided_eps = uncond_eps + self.guide_scale * (cond_eps - uncond_eps)
            pred_xstart = d._predict_xstart_from_eps(x_t=x, t=t, eps=guided_eps)
            if clip_denoised:
                pred_xstart = pred_xstart.clamp(-1, 1)
            final = {"variance": out["variance"]}
            final["mean"], _, _ = d.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            final = out
        noise = th.randn_like(x)
        if cond_fn is not None:
            final["mean"] = d.condition_mean(cond_fn, final, x, t, model_kwargs=model_kwargs)
        sample = final["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, shape, cond_fn=None, model_kwargs=None, device="cpu", max_steps=None,
                      on_step=None):
        """
        Sample (the first `max_steps` steps only, if given); returns the last
        sample. `on_step()`, if given, is called at the end of each step.
        """
        img = th.randn(*shape, device=device)
        indices = list(reversed(range(self.diffusion.num_timesteps)))[:max_steps]
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                img = self.p_sample(img, t, cond_fn=cond_fn, model_kwargs=model_kwargs)["sample"]
            if on_step is not None:
                on_step()
        return img

