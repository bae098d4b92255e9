"""The teacher's own GQA attention, kept as a mixer type ("attention"): Llama / Mistral / Qwen2 (q/k/v biases)
/ Qwen3 (per-head q/k RMSNorm before RoPE). With every layer of this type the student is the teacher, which
is what the parity tests check; it also gives MambaInLlama-style baselines (attention + Mamba2).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch
from ..ops.dispatch import fused_op
from .common import RMSNorm, apply_rope, varlen_causal


class Attention(nn.Module):
    STATE = ("k", "v")  # the static decode state (zebra.generation.engine); other entries are derived weights

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d, H, G, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = H, G, D
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, H * D, bias=bias)
        self.k_proj = nn.Linear(d, G * D, bias=bias)
        self.v_proj = nn.Linear(d, G * D, bias=bias)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = D**-0.5

    def project(self, h):
        """q (B, T, H, D), k and v (B, T, G, D), q / k normalised per head where the teacher does (Qwen3)."""
        Bsz, T, _ = h.shape
        q = self.q_proj(h).view(Bsz, T, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(Bsz, T, self.n_kv, self.head_dim)
        v = self.v_proj(h).view(Bsz, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, h, rope, bias, cache=None, varlen=None):
        """varlen: (cu_seqlens, max_len) of packed documents (training on CUDA): flash attention per document."""
        Bsz, T, _ = h.shape
        q, k, v = self.project(h)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if varlen is not None:
            n = Bsz * T
            o = varlen_causal(q.reshape(n, self.n_heads, -1), k.reshape(n, self.n_kv, -1), v.reshape(n, self.n_kv, -1),
                              *varlen, self.scale)  # (B*T, H, D)
            return self.o_proj(o.reshape(Bsz, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T, D)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k=k, v=v)  # (B, G, S, D)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and T > 1,
                                           scale=self.scale)  # (B, H, T, D); no bias: causal, nothing cached
        return self.o_proj(o.transpose(1, 2).reshape(Bsz, T, -1))

    # ---- static-cache decoding (zebra.generation.engine.StaticEngine) ------------------------------------
    def static_state(self, B: int, L: int, device, dtype) -> dict:
        """k, v (B, n_kv, L, d_h): slot t holds position t of every row."""
        shape = (B, self.n_kv, L, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}

    def load_state(self, state: dict, cache, T: int) -> None:
        """Copy a prefill's dynamic cache (ZebraCache, T positions) into the static state."""
        state["k"][:, :, :T] = cache.get(self.layer_idx, "k")
        state["v"][:, :, :T] = cache.get(self.layer_idx, "v")

    def decode_step(self, x, rope, state: dict, pos, kv_start, kv_len):
        """One token per row: x (B, 1, d) normalised input -> mixer output (B, 1, d). Writes slot `pos` (a (1,)
        device tensor) and attends over slots [kv_start, kv_len) per row (no host synchronisation)."""
        B = x.shape[0]
        q, k, v = self.project(x)
        q, k = fused_op("rope", q, *rope), fused_op("rope", k, *rope)
        state["k"].index_copy_(2, pos, k.transpose(1, 2))
        state["v"].index_copy_(2, pos, v.transpose(1, 2))
        q = q.view(B, self.n_kv, self.n_heads // self.n_kv, self.head_dim)  # (B, G, heads per group, D)
        o = dispatch.decode_attention(q, state["k"], state["v"], kv_start, kv_len, self.scale)  # (B, G, M, D)
        return self.o_proj(o.reshape(B, 1, self.n_heads * self.head_dim))
