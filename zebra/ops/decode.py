"""Decode-step references in pure PyTorch (the Triton kernels in zebra/kernels/decode.py must match these).

mamba2_step       one token of a Mamba2 layer for all heads: conv ring update + SiLU, dt softplus, in-place
                  SSM state update, C readout, D skip (SPEC 3.2)
decode_attention  one query per head over cached rows [kv_start, kv_len): GQA decode, and absorbed MLA
                  decode over the latent rows (SPEC 2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ssd import ssd_step


def mamba2_step(xBC, conv_ring, pos, conv_w, conv_b, dt, dt_bias, A_log, D, ssm_state, n_kv, headdim, d_state):
    """xBC (B, C) new pre-conv inputs laid out [x (n_kv*P) | B (n_kv*N) | C (H*N)]; conv_ring (B, C, K) in place:
    the new input goes to slot pos % K, slot (pos - j) % K holds input t - j; pos (1,) tensor (same for all
    rows); conv_w (C, K) (conv_w[:, K-1] multiplies the newest input); dt (B, H) raw; ssm_state (B, H, P, N)
    fp32 in place. Returns y (B, H, P) fp32 = state @ C_h + D_h x_h."""
    Bsz, C = xBC.shape
    K = conv_ring.shape[-1]
    H, P, N = dt.shape[1], headdim, d_state
    rep = H // n_kv
    slot = (pos.long() % K).view(1, 1, 1).expand(Bsz, C, 1)
    conv_ring.scatter_(2, slot, xBC[..., None].to(conv_ring.dtype))
    order = (pos.long() - torch.arange(K - 1, -1, -1, device=xBC.device)) % K  # oldest .. newest slot
    window = conv_ring.index_select(2, order).float()  # (B, C, K) in time order
    u = F.silu((window * conv_w.float()[None]).sum(-1) + (conv_b.float() if conv_b is not None else 0.0))
    x, Bm, Cm = u.split([n_kv * P, n_kv * N, H * N], dim=-1)
    x = x.view(Bsz, n_kv, P).repeat_interleave(rep, dim=1)  # (B, H, P)
    Bm = Bm.view(Bsz, n_kv, N).repeat_interleave(rep, dim=1)  # (B, H, N)
    Cm = Cm.view(Bsz, H, N)
    dt = F.softplus(dt.float() + dt_bias.float())  # (B, H)
    y = ssd_step(ssm_state, x, dt, -torch.exp(A_log.float()), Bm, Cm)  # the recurrence of the scan, one token
    return y + D.float()[None, :, None] * x


def decode_attention(q, k, v, kv_start, kv_len, scale):
    """q (B, G, M, Dk); k (B, G, S, Dk); v (B, G, S, Dv) (any strides, v may be a narrow view of k);
    kv_start / kv_len (B,) int: row b attends to keys kv_start[b] <= s < kv_len[b]. Returns (B, G, M, Dv) in
    q.dtype; a row without valid keys gives zeros."""
    S = k.shape[2]
    s = torch.arange(S, device=q.device)
    valid = (s[None] >= kv_start[:, None].long()) & (s[None] < kv_len[:, None].long())  # (B, S)
    scores = torch.einsum("bgmd,bgsd->bgms", q.float(), k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bgms,bgsd->bgmd", p, v.float()).to(q.dtype)
