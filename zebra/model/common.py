"""Pieces every mixer shares, written to match the Llama family numerically: RMSNorm, the gated RMSNorm of
Mamba2, SwiGLU MLP, rotary embeddings (default / linear / llama3 scaling) and the attention bias built from
a 2-D padding mask.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's output norm: RMSNorm(y * silu(z)) over the whole d_inner (one group)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, y, z):
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ---- rotary embeddings ------------------------------------------------------------------------------
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(rope_parameters: dict, dim: int) -> torch.Tensor:
    """Inverse frequencies for a rotary embedding of `dim` dims with the teacher's RoPE parameters."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    base = float(rope_parameters.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"])
    if rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, short kept, smooth between.
        factor = float(rope_parameters["factor"])
        low, high = float(rope_parameters["low_freq_factor"]), float(rope_parameters["high_freq_factor"])
        old_ctx = float(rope_parameters["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported RoPE type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


class Rotary(nn.Module):
    """cos/sin tables for positions (B, T); applied with rotate-half pairing (dim j with j + dim/2), as Llama.
    inv_freq is recomputed per device instead of being a buffer: no state to save, and nothing for
    meta-device loading (transformers' from_pretrained) to leave uninitialised.

    pairs: keep only these rotary pairs of a `dim`-dimensional rotary embedding (MLA's decoupled RoPE built from
    whole pairs of the teacher's head, zebra.convert.svd_mla): the table then has 2 * len(pairs) dims, pair m
    rotating dims m and m + len(pairs) at the teacher's frequency of pair pairs[m]."""

    def __init__(self, rope_parameters: dict, dim: int, pairs: tuple[int, ...] | None = None):
        super().__init__()
        self.rope_parameters, self.dim = dict(rope_parameters), dim
        self.pairs = tuple(pairs) if pairs is not None else None
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, position_ids, dtype):
        dev = position_ids.device
        if dev not in self._inv_freq:
            inv = rope_inv_freq(self.rope_parameters, self.dim)
            if self.pairs is not None:
                inv = inv[list(self.pairs)]
            self._inv_freq[dev] = inv.to(dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]  # (B, T, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B, T, D)."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


# ---- attention over packed documents ---------------------------------------------------------------
def doc_segments(doc_ids: torch.Tensor, bucket: bool | None = None) -> torch.Tensor:
    """Start offsets of every document piece of every row in the flattened (B*T) batch, plus B*T at the end:
    (n + 1,) int32, the cu_seqlens of flash attention's variable-length kernels.

    bucket (default: on unless ZEBRA_VARLEN_BUCKET=0): pad to a power-of-two length (at least 8) by repeating B*T,
    i.e. empty documents at the end, which the kernels skip. A compiled decoder layer guards on this tensor's
    length, so without buckets every new document count of a batch is a recompile (dozens per run, until dynamo's
    cache limit sends the layer back to eager mode); with them a run sees a handful of lengths."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
    if bucket is None:
        bucket = os.environ.get("ZEBRA_VARLEN_BUCKET", "1") != "0"
    n = idx.numel() + 1
    size = max(8, 1 << (n - 1).bit_length()) if bucket else n
    return torch.cat([idx, idx.new_full((size - idx.numel(),), B * T)]).to(torch.int32)


def varlen_available(device: torch.device) -> bool:
    """Flash attention over packed documents (torch.nn.attention.varlen, CUDA only, torch >= 2.10)."""
    if device.type != "cuda" or os.environ.get("ZEBRA_ATTENTION", "auto") == "sdpa":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _varlen_api():
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@torch.compiler.disable  # a graph break: cu_seqlens changes length every batch, the kernel gains nothing from fusion
def varlen_causal(q, k, v, cu_seqlens, max_len: int, scale: float):
    """Causal attention inside each document piece: q (n, H, D), k / v (n, G, D) with G dividing H (GQA)
    -> (n, H, D_v). Works with both spellings of torch's API: `is_causal=` (2.10-2.11) and `window_size=`
    (2.12+); the softmax scale is folded into q where the API has no `scale=`."""
    varlen_attn, params = _varlen_api()
    if q.dtype not in (torch.float16, torch.bfloat16):  # fp32 RoPE tables promote q / k under autocast
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    H, G = q.shape[1], k.shape[1]
    if G != H:
        if "enable_gqa" in params:
            kw = {"enable_gqa": True}
        else:
            k, v, kw = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1), {}
    else:
        kw = {}
    if "scale" in params:
        kw["scale"] = scale
    else:
        q = q * (scale * q.shape[-1] ** 0.5)
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw)


# ---- masks ------------------------------------------------------------------------------------------
def attention_bias(attention_mask, T: int, S: int, dtype, device):
    """Additive bias (B or 1, 1, T, S) for T new queries over S keys (the last T keys are the new tokens):
    causal, plus padded keys (attention_mask == 0) masked. None when nothing needs masking (one query, no
    padding). A finite minimum instead of -inf keeps fully masked rows (left-padding queries) NaN-free."""
    if attention_mask is None and T == 1:
        return None
    neg = torch.finfo(dtype).min
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    allowed = torch.arange(S, device=device)[None, :] <= q_pos  # (T, S)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg)
