"""Multi-head Latent Attention, GQA-preserving (SPEC 2; DeepSeek-V2 naming).

    C_Q = h W_DQ (q_a_proj)            Q = C_Q W_UQR (q_b_proj), per head [nope (d_nope) | rope (d_r)]
    [C_KV | K_R] = h [W_DKV | W_KR] (kv_a_proj_with_mqa)      cached per token: r_kv + d_r values
    per KV group g: [K_C,g | V_g] = C_KV W_UKV,g (kv_b_proj)  shared by the n_h/n_kv heads of the group
    head i: q_i = [Q_C,i ; RoPE(Q_R,i)], k_i = [K_C,g(i) ; RoPE(K_R)], v_i = V_g(i)
    O = softmax(q k^T / sqrt(d_h) + mask) v, then o_proj (the teacher's W_O)

Two equivalent computations:
  decompressed  materialise K, V from the latent cache: training and prefill (SDPA).
  absorbed      fold W_UK into the query and W_UV into the output and attend over C_KV directly: decode,
                where reading r_kv + d_r values per cached token is the whole point.
A k bias (Qwen2) adds q_nope . b_k to every score of a query: constant over keys, so softmax ignores it;
the v bias passes through softmax unchanged (rows sum to 1) and is added after.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch
from ..ops.dispatch import fused_op
from .common import apply_rope, varlen_causal


class MLA(nn.Module):
    STATE = ("kv",)  # the static decode state; w_uk / w_uv in it are views of kv_b_proj, made once

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        H, G = config.num_attention_heads, config.num_key_value_heads
        self.n_heads, self.n_kv = H, G
        self.d_nope, self.d_r, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.r_kv, self.r_q = config.kv_lora_rank, config.q_lora_rank
        bias = config.attention_bias
        dq = self.d_nope + self.d_r
        if self.r_q is None:
            self.q_proj = nn.Linear(d, H * dq, bias=bias)
        else:
            self.q_a_proj = nn.Linear(d, self.r_q, bias=False)
            self.q_b_proj = nn.Linear(self.r_q, H * dq, bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.r_kv + self.d_r, bias=bias)
        self.kv_b_proj = nn.Linear(self.r_kv, G * (self.d_nope + self.d_v), bias=bias)
        self.o_proj = nn.Linear(H * self.d_v, d, bias=False)
        self.scale = config.head_dim**-0.5  # the teacher's scale (d_nope + d_r = d_h in the paper's configs)
        # the teacher's rotary pairs this layer's RoPE dims come from (zebra.convert.svd_mla), or None: the paper's
        # frequencies recomputed over d_r dims
        pairs = (getattr(config, "mla_rope_pairs", None) or {}).get(str(layer_idx))
        self.rope_key = tuple(int(p) for p in pairs) if pairs is not None else None
        self.absorb = "decode"  # "decode": absorbed for one-token steps; "always" / "never" for tests

    def _queries(self, h):
        q = self.q_proj(h) if self.r_q is None else self.q_b_proj(self.q_a_proj(h))
        q = q.view(*h.shape[:2], self.n_heads, self.d_nope + self.d_r)  # (B, T, H, d_nope + d_r)
        return q[..., : self.d_nope], q[..., self.d_nope :]

    def forward(self, h, rope, bias, cache=None, varlen=None):
        Bsz, T, _ = h.shape
        cos, sin = rope
        q_nope, q_rope = self._queries(h)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.kv_a_proj_with_mqa(h).split([self.r_kv, self.d_r], dim=-1)  # (B, T, R), (B, T, d_r)
        k_rope = apply_rope(k_rope[:, :, None], cos, sin)[:, :, 0]
        if cache is not None:
            c_kv, k_rope = cache.append(self.layer_idx, c_kv=c_kv, k_rope=k_rope)  # (B, S, R), (B, S, d_r)
        use_absorbed = self.absorb == "always" or (self.absorb == "decode" and T == 1 and cache is not None)
        if use_absorbed:
            o = self._absorbed(q_nope, q_rope, c_kv, k_rope, bias)
        else:
            o = self._decompressed(q_nope, q_rope, c_kv, k_rope, bias, varlen)
        return self.o_proj(o.reshape(Bsz, T, self.n_heads * self.d_v))

    def _decompressed(self, q_nope, q_rope, c_kv, k_rope, bias, varlen=None):
        Bsz, S, _ = c_kv.shape
        H, G = self.n_heads, self.n_kv
        kv = self.kv_b_proj(c_kv).view(Bsz, S, G, self.d_nope + self.d_v)
        k_nope, v = kv[..., : self.d_nope], kv[..., self.d_nope :]  # (B, S, G, d_nope), (B, S, G, d_v)
        rep = H // G
        k = torch.cat([k_nope.repeat_interleave(rep, dim=2), k_rope[:, :, None].expand(-1, -1, H, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, d_nope + d_r)
        v = v.repeat_interleave(rep, dim=2)  # (B, S, H, d_v)
        if varlen is not None:  # packed documents on CUDA: flash attention per document (context checks d_qk == d_v)
            n = Bsz * S
            o = varlen_causal(q.reshape(n, H, -1), k.reshape(n, H, -1), v.reshape(n, H, -1), *varlen, self.scale)
            return o.view(Bsz, S, H, self.d_v)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
            is_causal=bias is None and q.shape[1] > 1, scale=self.scale,
        )  # (B, H, T, d_v); no bias: plain causal (nothing cached, no padding)
        return o.transpose(1, 2)  # (B, T, H, d_v)

    # ---- the absorbed form's two folds, shared by the growing-cache path (_absorbed) and decode_step --------
    def absorbed_weights(self):
        """kv_b_proj split per KV group: W_UK (G, d_nope, R) and W_UV (G, d_v, R) (views)."""
        w = self.kv_b_proj.weight.view(self.n_kv, self.d_nope + self.d_v, self.r_kv)
        return w[:, : self.d_nope], w[:, self.d_nope :]

    def fold_query(self, q_nope, w_uk):
        """W_UK folded into the query: (..., G, rep, d_nope) -> (..., G, rep, R); q . k_C = (q W_UK) . c_kv."""
        return torch.einsum("...gjd,gdr->...gjr", q_nope, w_uk)

    def unfold_output(self, o_lat, w_uv):
        """W_UV applied after attention over the latent rows: (..., G, rep, R) -> (..., G, rep, d_v), plus the v bias
        (softmax rows sum to 1, so it passes through unchanged)."""
        o = torch.einsum("...gjr,gvr->...gjv", o_lat, w_uv)
        if self.kv_b_proj.bias is not None:
            o = o + self.kv_b_proj.bias.view(self.n_kv, self.d_nope + self.d_v)[:, self.d_nope :][:, None]
        return o

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, bias):
        Bsz, T, H, _ = q_nope.shape
        G, rep = self.n_kv, self.n_heads // self.n_kv
        w_uk, w_uv = self.absorbed_weights()
        qn = q_nope.reshape(Bsz, T, G, rep, self.d_nope)
        qr = q_rope.reshape(Bsz, T, G, rep, self.d_r)
        q_lat = self.fold_query(qn, w_uk)  # (B, T, G, rep, R)
        scores = torch.einsum("btgjr,bsr->bgjts", q_lat, c_kv) + torch.einsum("btgjd,bsd->bgjts", qr, k_rope)
        scores = scores.float() * self.scale  # (B, G, rep, T, S)
        if bias is not None:
            scores = scores + bias[:, :, None].float()  # (B, 1, 1, T, S)
        elif T > 1:  # plain causal, nothing cached (T == S)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bgjts,bsr->btgjr", p, c_kv)  # attention over the latent cache
        return self.unfold_output(o_lat, w_uv).reshape(Bsz, T, H, self.d_v)

    # ---- static-cache decoding (zebra.generation.engine.StaticEngine): the absorbed form ---------------------
    def static_state(self, B: int, L: int, device, dtype) -> dict:
        """kv (B, L, r_kv + d_r): one latent row [c_kv | RoPE(k_R)] per token, read once for all heads (SPEC 2);
        w_uk (G, d_nope, R) / w_uv (G, d_v, R): kv_b_proj split for folding into the query / the output."""
        w_uk, w_uv = self.absorbed_weights()
        return {"kv": torch.zeros(B, L, self.r_kv + self.d_r, device=device, dtype=dtype),
                "w_uk": w_uk.contiguous(), "w_uv": w_uv.contiguous()}

    def load_state(self, state: dict, cache, T: int) -> None:
        state["kv"][:, :T, : self.r_kv] = cache.get(self.layer_idx, "c_kv")
        state["kv"][:, :T, self.r_kv:] = cache.get(self.layer_idx, "k_rope")

    def decode_step(self, x, rope, state: dict, pos, kv_start, kv_len):
        """Absorbed MLA for one token per row (see Attention.decode_step for the slot arguments)."""
        B, R = x.shape[0], self.r_kv
        q_nope, q_rope = self._queries(x)  # (B, 1, H, d_nope), (B, 1, H, d_r)
        q_rope = fused_op("rope", q_rope, *rope)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([R, self.d_r], dim=-1)
        k_rope = fused_op("rope", k_rope[:, :, None], *rope)[:, :, 0]
        state["kv"].index_copy_(1, pos, torch.cat([c_kv, k_rope], dim=-1))
        G, rep = self.n_kv, self.n_heads // self.n_kv
        q_lat = self.fold_query(q_nope.reshape(B, G, rep, self.d_nope), state["w_uk"])  # (B, G, rep, R)
        q = torch.cat([q_lat.reshape(B, 1, self.n_heads, R), q_rope.reshape(B, 1, self.n_heads, self.d_r)], dim=-1)
        kv = state["kv"][:, None]  # (B, 1, L, R + d_r): one latent row for every head
        o_lat = dispatch.decode_attention(q, kv, kv[..., :R], kv_start, kv_len, self.scale)  # (B, 1, H, R)
        o = self.unfold_output(o_lat.view(B, G, rep, R), state["w_uv"])  # (B, G, rep, d_v)
        return self.o_proj(o.reshape(B, 1, self.n_heads * self.d_v))
