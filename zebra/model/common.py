"""Pieces every mixer shares, written to match the Llama family numerically: RMSNorm, the gated RMSNorm of
Mamba2, SwiGLU MLP, rotary embeddings (default / linear / llama3 scaling) and the attention bias built from
a 2-D padding mask.
"""

from __future__ import annotations

import math

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
    meta-device loading (transformers' from_pretrained) to leave uninitialised."""

    def __init__(self, rope_parameters: dict, dim: int):
        super().__init__()
        self.rope_parameters, self.dim = dict(rope_parameters), dim
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, position_ids, dtype):
        dev = position_ids.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.rope_parameters, self.dim).to(dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]  # (B, T, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B, T, D)."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


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
