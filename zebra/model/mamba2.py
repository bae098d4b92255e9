"""Mamba2 mixer in the MambaInLlama geometry (SPEC 3.2): expand 1, d_inner = n_h*d_h, nheads = n_h,
headdim = d_state = d_h, x and B with n_kv groups (like GQA's V and K), C per head (like Q), d_conv 4.

    [z | x | B | C | dt] = in_proj(h)
    [x | B | C] = silu(causal depthwise conv1d([x | B | C]));  x, B repeated from n_kv groups to n_h heads
    dt = softplus(dt + dt_bias);  A = -exp(A_log)
    state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T;  y_t = state_t C_t + D x_t       (fp32 state)
    out = out_proj(RMSNorm(y * silu(z)))

Packed documents (doc_ids) reset the conv window and the state at each boundary (training only).
Padding (attention_mask == 0, left padding in a batch) must not reach the state: padded inputs are zeroed
before the conv (so later conv windows see what a sequence start sees) and their dt is 0 (no decay, no input).
The scan and the step go through zebra.ops.dispatch, so GPU kernels can replace them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch
from ..ops.dispatch import fused_op
from .common import GatedRMSNorm


class Mamba2(nn.Module):
    STATE = ("conv", "ssm")  # the static decode state

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.headdim = self.d_state = config.head_dim
        self.d_inner, self.d_xb = config.mamba_d_inner, config.mamba_d_xb
        self.conv_dim = self.d_inner + 2 * self.d_xb
        self.d_conv = config.mamba_d_conv
        self.chunk_size = config.mamba_chunk_size
        self.dt_min, self.dt_max, self.dt_floor = config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor
        self.in_proj = nn.Linear(d, 2 * self.d_inner + 2 * self.d_xb + self.n_heads, bias=config.attention_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, bias=True)
        self.act = nn.SiLU()
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, eps=config.rms_norm_eps)
        # z = W_z h + z_bias: with W_z = 0 and a positive bias the gate starts constant (zebra.convert.build:
        # gate_init "constant"), so the attention-derived x / B / C are not scrambled by a random gate
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner)) if getattr(config, "mamba_z_bias", False) else None
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator=None):
        """Mamba2's default init: A ~ U[1, 16], dt ~ logU[dt_min, dt_max] (dt_bias = softplus^-1(dt)), D = 1,
        conv as torch's Conv1d default."""
        dev = self.A_log.device
        A = torch.empty(self.n_heads, device=dev).uniform_(1, 16, generator=generator)
        self.A_log.copy_(torch.log(A))
        u = torch.rand(self.n_heads, device=dev, generator=generator)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)).clamp(min=self.dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()

    def project(self, h):
        """[z | xBC | dt] = in_proj(h) (+ the gate bias): (..., d_inner), (..., conv_dim), (..., H)."""
        z, xBC, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if self.z_bias is not None:
            z = z + self.z_bias
        return z, xBC, dt

    def forward(self, h, token_mask=None, cache=None, doc_ids=None):
        """h (B, T, d); token_mask (B, T) with 0 at padding, or None; cache a ZebraCache or None;
        doc_ids (B, T) non-decreasing ids of packed documents (conv and state reset at each new id), or None."""
        Bsz, T, _ = h.shape
        H, P, N, rep = self.n_heads, self.headdim, self.d_state, self.n_heads // self.n_kv
        z, xBC, dt = self.project(h)
        if token_mask is not None:
            xBC = xBC * token_mask[..., None].to(xBC.dtype)
        conv_state = cache.get(self.layer_idx, "conv") if cache is not None else None
        xBC, conv_state = dispatch.causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, conv_state, doc_ids=doc_ids)
        xBC = self.act(xBC)
        x, Bm, Cm = xBC.split([self.d_xb, self.d_xb, self.d_inner], dim=-1)
        x = x.view(Bsz, T, self.n_kv, P).repeat_interleave(rep, dim=2)  # (B, T, H, P)
        Bm = Bm.view(Bsz, T, self.n_kv, N).repeat_interleave(rep, dim=2)  # (B, T, H, N)
        Cm = Cm.view(Bsz, T, H, N)  # (B, T, H, N)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H)
        if token_mask is not None:
            dt = dt * token_mask[..., None].float()
        A = -torch.exp(self.A_log.float())  # (H,)

        ssm_state = cache.get(self.layer_idx, "ssm") if cache is not None else None
        if cache is not None and T == 1:
            if ssm_state is None:
                ssm_state = x.new_zeros(Bsz, H, P, N, dtype=torch.float32)
            y = dispatch.ssd_step(ssm_state, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])[:, None]  # (B, 1, H, P)
        else:
            y, ssm_state = dispatch.ssd_scan(x, dt, A, Bm, Cm, initial_state=ssm_state, chunk_size=self.chunk_size,
                                             doc_ids=doc_ids)
        if cache is not None:
            cache.put(self.layer_idx, "conv", conv_state)
            cache.put(self.layer_idx, "ssm", ssm_state)

        y = y + self.D.float()[:, None] * x.float()  # (B, T, H, P)
        y = y.to(h.dtype).reshape(Bsz, T, self.d_inner)
        return self.out_proj(self.norm(y, z))

    # ---- static-cache decoding (zebra.generation.engine.StaticEngine) ------------------------------------
    def static_state(self, B: int, L: int, device, dtype, ssm_dtype=torch.float32) -> dict:
        """conv (B, conv_dim, d_conv): a ring, slot pos % d_conv holds the newest conv input; ssm (B, H, P, N), fp32
        (ssm_dtype=torch.bfloat16 halves the state traffic of a step; RESULTS.md has its accuracy over 8k steps)."""
        return {"conv": torch.zeros(B, self.conv_dim, self.d_conv, device=device, dtype=dtype),
                "ssm": torch.zeros(B, self.n_heads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)}

    def load_state(self, state: dict, cache, T: int) -> None:
        K = self.d_conv
        conv = cache.get(self.layer_idx, "conv")  # (B, C, K-1): inputs T-K+1 .. T-1, oldest first
        for j in range(K - 1):
            state["conv"][:, :, (T - K + 1 + j) % K] = conv[:, :, j]
        state["ssm"].copy_(cache.get(self.layer_idx, "ssm"))

    def decode_step(self, x, rope, state: dict, pos, kv_start=None, kv_len=None):
        """One token per row: conv-ring update, SiLU, dt softplus, in-place state update, C readout and D skip
        (one dispatch op), then the gated norm and out_proj. rope / kv_start / kv_len are unused (same signature
        as the attention mixers)."""
        B = x.shape[0]
        z, xBC, dt = self.project(x[:, 0])
        y = dispatch.mamba2_step(xBC, state["conv"], pos, self.conv1d.weight[:, 0], self.conv1d.bias, dt, self.dt_bias,
                                 self.A_log, self.D, state["ssm"], self.n_kv, self.headdim, self.d_state)  # (B, H, P)
        y = y.to(x.dtype).reshape(B, 1, self.d_inner)
        return self.out_proj(fused_op("gated_rms_norm", y, z[:, None], self.norm.weight, self.norm.eps))
