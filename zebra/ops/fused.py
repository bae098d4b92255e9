"""References for the elementwise pieces of a decode step that the engine fuses on the GPU
(zebra/kernels/fused.py): the same arithmetic as the model's modules (zebra/model/common.py), so the fused
path is checked against exactly what training and the reference forward compute.

add_rms_norm    h = h + x; y = RMSNorm(h)            (the residual add folded into the next norm)
gated_rms_norm  y = RMSNorm(y * silu(z))              (Mamba2's output norm)
rope            x cos + rotate_half(x) sin            (q and k of one decode token)
silu_mul        silu(g) * u                           (the SwiGLU MLP's activation)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(h, x, weight, eps):
    """(h + x, RMSNorm(h + x)); x None means no residual add."""
    if x is not None:
        h = h + x
    return h, rms_norm(h, weight, eps)


def gated_rms_norm(y, z, weight, eps):
    yf = y.float() * F.silu(z.float())
    return weight * (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)).to(y.dtype)


def rope(x, cos, sin):
    """x (B, T, H, D); cos / sin (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, :, None] + torch.cat([-x2, x1], dim=-1) * sin[:, :, None]


def silu_mul(g, u):
    return F.silu(g) * u
