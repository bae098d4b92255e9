"""Fused elementwise Triton kernels for the decode step (one program per row), matching zebra/ops/fused.py:
a decode step at batch 1 is a chain of tiny kernels, and their count, not their bytes, is what separates it
from the weight-reading roofline. Each kernel computes in fp32 and rounds once where the module rounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_kernel(H, X, W, HOUT, Y, d, eps, HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    m = o < d
    h = tl.load(H + r * d + o, mask=m, other=0.0)
    if HAS_X:
        h = (h.to(tl.float32) + tl.load(X + r * d + o, mask=m, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(HOUT + r * d + o, h, mask=m)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / d + eps)
    n = (hf * inv).to(H.dtype.element_ty).to(tl.float32)
    w = tl.load(W + o, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + r * d + o, (w * n).to(Y.dtype.element_ty), mask=m)


def add_rms_norm(h, x, weight, eps):
    d = h.shape[-1]
    h2 = h.reshape(-1, d)
    x2 = x.reshape(-1, d) if x is not None else h2
    if h2.stride(0) != d or x2.stride(0) != d:
        h2, x2 = h2.contiguous(), x2.contiguous()
    out_h = torch.empty_like(h2) if x is not None else h2
    y = torch.empty(h2.shape, device=h.device, dtype=torch.result_type(weight, h))
    _add_rms_kernel[(h2.shape[0],)](h2, x2, weight, out_h, y, d, eps, HAS_X=x is not None,
                                    BLOCK=triton.next_power_of_2(d), num_warps=8 if d > 2048 else 4)
    return out_h.view(h.shape), y.view(h.shape)


def rms_norm(x, weight, eps):
    return add_rms_norm(x, None, weight, eps)[1]


@triton.jit
def _gated_rms_kernel(Yin, Z, W, OUT, d, sy, sz, eps, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    m = o < d
    y = tl.load(Yin + r * sy + o, mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + r * sz + o, mask=m, other=0.0).to(tl.float32)
    g = y * (z / (1.0 + tl.exp(-z)))
    inv = 1.0 / tl.sqrt(tl.sum(g * g, 0) / d + eps)
    n = (g * inv).to(Yin.dtype.element_ty).to(tl.float32)
    w = tl.load(W + o, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + r * d + o, (w * n).to(OUT.dtype.element_ty), mask=m)


def gated_rms_norm(y, z, weight, eps):
    d = y.shape[-1]
    y2, z2 = y.reshape(-1, d), z.reshape(-1, d)
    if y2.stride(1) != 1 or z2.stride(1) != 1:
        y2, z2 = y2.contiguous(), z2.contiguous()
    out = torch.empty(y2.shape, device=y.device, dtype=torch.result_type(weight, y))
    _gated_rms_kernel[(y2.shape[0],)](y2, z2, weight, out, d, y2.stride(0), z2.stride(0), eps,
                                      BLOCK=triton.next_power_of_2(d), num_warps=8 if d > 2048 else 4)
    return out.view(y.shape)


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, H, D2, sx_r, sx_h, sc_r, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)  # one (batch, token) row: all heads
    oh = tl.arange(0, BLOCK_H)[:, None]
    o = tl.arange(0, BLOCK)[None, :]
    m = (oh < H) & (o < D2)
    x1 = tl.load(X + r * sx_r + oh * sx_h + o, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + r * sx_r + oh * sx_h + D2 + o, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(COS + r * sc_r + o, mask=o < D2, other=0.0).to(tl.float32)
    c2 = tl.load(COS + r * sc_r + D2 + o, mask=o < D2, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + r * sc_r + o, mask=o < D2, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + r * sc_r + D2 + o, mask=o < D2, other=0.0).to(tl.float32)
    base = OUT + (r * H + oh) * (2 * D2)
    tl.store(base + o, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=m)
    tl.store(base + D2 + o, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=m)


def rope(x, cos, sin):
    B, T, H, D = x.shape
    if T > 1 or x.stride(-1) != 1:  # rows (b, t) at a uniform stride
        x = x.contiguous()
    row = x.stride(0) if T == 1 else x.stride(1)
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
    _rope_kernel[(B * T,)](x, cos, sin, out, H, D // 2, row, x.stride(2), D,
                           BLOCK_H=triton.next_power_of_2(H), BLOCK=triton.next_power_of_2(D // 2), num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    g = tl.load(G + o, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + o, mask=m, other=0.0)
    a = (g / (1.0 + tl.exp(-g))).to(U.dtype.element_ty).to(tl.float32)
    tl.store(OUT + o, (a * u.to(tl.float32)).to(OUT.dtype.element_ty), mask=m)


def silu_mul(g, u):
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(u)
    n = u.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](g, u, out, n, BLOCK=1024, num_warps=4)
    return out


KERNELS = {"add_rms_norm": add_rms_norm, "gated_rms_norm": gated_rms_norm, "rope": rope, "silu_mul": silu_mul}
