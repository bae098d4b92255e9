"""MLA weights from a teacher's GQA attention by truncated SVD (SPEC 3.1; paper App. A.1, Algorithm 1).

Pure functions on tensors. Inputs are the teacher's nn.Linear weights, [out, in]:
q_w [n_h*d_h, d], k_w / v_w [n_kv*d_h, d]; the SPEC's W matrices (d x k) are their transposes. Outputs follow
the MLA module's parameter names and layouts (see zebra/model/mla.py):

  q_proj.weight            [n_h*(d_nope+d_r), d]        when r_q is None (no query compression: exact)
  q_a_proj.weight          [r_q, d]          = W_DQ^T   when r_q is set
  q_b_proj.weight          [n_h*(d_nope+d_r), r_q]      rows per head: d_nope rows of W_UQ, then d_r of W_QR
  kv_a_proj_with_mqa.weight [r_kv + d_r, d]  = [W_DKV^T ; W_KR^T]
  kv_b_proj.weight         [n_kv*(d_nope+d_v), r_kv]    rows per KV group: d_nope rows of W_UK, then d_v of W_UV

All arithmetic is float64 (SVD of a bf16/fp32 matrix loses the small singular values we are truncating at);
results are returned in float64 and cast by the caller.
"""

from __future__ import annotations

import torch


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def truncated_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (d x k) ~= down @ up with down = U[:, :r] (d x r) and up = (S V^T)[:r] (r x k), as in Algorithm 1."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if r > S.numel():
        raise ValueError(f"rank {r} exceeds the matrix rank bound {S.numel()} of a {tuple(W.shape)} matrix")
    return U[:, :r], S[:r, None] * Vh[:r]


def head_dim_order(d_h: int, d_nope: int, d_r: int, rope_pairs: list[int] | None = None,
                   pair_scores: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """(nope dims, rope dims) of a teacher head, as indices into its d_h dims.

    rope_pairs None (the paper): rope = the last d_r dims, nope = the first d_nope. With rotate-half RoPE these are
    not whole rotary pairs: dim j rotates with dim j + d_h/2.
    rope_pairs given (whole pairs, zebra's default): rope = [p_1..p_k, p_1 + d_h/2 .. p_k + d_h/2] (rotate-half
    layout over 2k = d_r dims, pair m keeps the teacher's frequency of p_m); nope = the other pairs' dims, best
    scored first (`pair_scores`, (d_h/2,)), cut to d_nope."""
    half = d_h // 2
    if rope_pairs is None:
        return list(range(d_nope)), list(range(d_h - d_r, d_h))
    if 2 * len(rope_pairs) != d_r:
        raise ValueError(f"{len(rope_pairs)} rotary pairs give {2 * len(rope_pairs)} RoPE dims, expected d_r = {d_r}")
    rest = [j for j in range(half) if j not in set(rope_pairs)]
    if pair_scores is not None:
        rest.sort(key=lambda j: -float(pair_scores[j]))
    nope = [dim for j in rest for dim in (j, j + half)][:d_nope]
    return nope, list(rope_pairs) + [p + half for p in rope_pairs]


def rope_pair_scores(q_w: torch.Tensor, k_w: torch.Tensor, n_h: int, n_kv: int, d_h: int) -> torch.Tensor:
    """How much each rotary pair j (dims j, j + d_h/2) carries in a layer's q.k products, from the weights alone:
    sum over query heads i of ||W_Q,i pair j||_F * ||W_K,g(i) pair j||_F (the 2-norm criterion of MHA2MLA's
    partial RoPE, on weights instead of activations). (d_h/2,) float64."""
    half = d_h // 2
    q = _f64(q_w).reshape(n_h, d_h, -1)  # (H, D, d)
    k = _f64(k_w).reshape(n_kv, d_h, -1)  # (G, D, d)
    pair_norm = lambda w: (w[:, :half].pow(2).sum(-1) + w[:, half:].pow(2).sum(-1)).sqrt()  # noqa: E731  (heads, half)
    qn, kn = pair_norm(q), pair_norm(k)  # (H, half), (G, half)
    return (qn * kn.repeat_interleave(n_h // n_kv, dim=0)).sum(0)


def rope_pairs_by_norm(q_w: torch.Tensor, k_w: torch.Tensor, n_h: int, n_kv: int, d_h: int, d_r: int) -> list[int]:
    """The d_r/2 rotary pairs with the largest rope_pair_scores, ascending (one set per layer: K_R is shared by
    all heads, so every head rotates the same pairs)."""
    scores = rope_pair_scores(q_w, k_w, n_h, n_kv, d_h)
    return sorted(int(j) for j in torch.topk(scores, d_r // 2).indices)


def rope_pairs_by_frequency(inv_freq: torch.Tensor, d_r: int) -> list[int]:
    """The d_r/2 rotary pairs that turn fastest (largest inverse frequency), ascending. A slow pair rotates by
    theta * distance << 1 over the context, so it loses little as a position-free (nope) dim that the latent
    carries exactly; a fast one must keep its rotation. Measured on SmolLM2 (results/init-compare): the
    lowest mixer-output error of the three choices, at full rank and at r_kv 64."""
    return sorted(int(j) for j in torch.topk(inv_freq.double(), d_r // 2).indices)


def _split_heads(W: torch.Tensor, n: int, d_h: int, dims: list[int]) -> torch.Tensor:
    """(m, n*d_h) -> (m, n*len(dims)): per head keep the given dims, in that order ([nope dims | rope dims])."""
    m = W.shape[0]
    return W.reshape(m, n, d_h)[:, :, dims].reshape(m, n * len(dims))


def _rel_error(S: torch.Tensor, r: int) -> float:
    """||M - M_r||_F / ||M||_F from the singular values of M (Eckart-Young)."""
    total = (S ** 2).sum()
    return float(((S[r:] ** 2).sum() / total).sqrt()) if total > 0 else 0.0


def matrix_rank_error(w: torch.Tensor, r: int) -> float:
    """Relative Frobenius error of the best rank-r approximation of w."""
    return _rel_error(torch.linalg.svdvals(_f64(w)), r)


def svd_reconstruction_error(k_w: torch.Tensor, v_w: torch.Tensor, r: int) -> float:
    """Relative Frobenius error of the rank-r reconstruction of [W_K, W_V] (what the MLA latent cache loses)."""
    W_KV = torch.cat([_f64(k_w).T, _f64(v_w).T], dim=1)  # (d, 2*n_kv*d_h)
    return _rel_error(torch.linalg.svdvals(W_KV), r)


def init_mla_from_attention(
    q_w: torch.Tensor,
    k_w: torch.Tensor,
    v_w: torch.Tensor,
    n_h: int,
    n_kv: int,
    d_h: int,
    d_nope: int,
    d_r: int,
    r_kv: int,
    r_q: int | None,
    q_b: torch.Tensor | None = None,
    k_b: torch.Tensor | None = None,
    v_b: torch.Tensor | None = None,
    rope_pairs: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """MLA parameters (names relative to the MLA module, float64) from one teacher attention layer (Algorithm 1).
    rope_pairs: the teacher's rotary pairs that become the decoupled RoPE dims (head_dim_order); None: the last
    d_r dims, as the paper."""
    W_Q, W_K, W_V = _f64(q_w).T, _f64(k_w).T, _f64(v_w).T  # (d, n_h*d_h), (d, n_kv*d_h), (d, n_kv*d_h)
    d = W_Q.shape[0]
    assert W_Q.shape == (d, n_h * d_h), f"q_proj is {tuple(q_w.shape)}, expected ({n_h * d_h}, {d})"
    assert W_K.shape == W_V.shape == (d, n_kv * d_h), f"k/v_proj are {tuple(k_w.shape)}, expected ({n_kv * d_h}, {d})"
    out: dict[str, torch.Tensor] = {}
    scores = rope_pair_scores(q_w, k_w, n_h, n_kv, d_h) if rope_pairs is not None else None
    nope, rope = head_dim_order(d_h, d_nope, d_r, rope_pairs, scores)
    qdims = nope + rope

    # ---- queries: q_i = [Q_C,i ; Q_R,i] ----
    if r_q is None:
        out["q_proj.weight"] = _split_heads(W_Q, n_h, d_h, qdims).T.contiguous()  # (n_h*dq, d)
        if q_b is not None:
            out["q_proj.bias"] = _split_heads(_f64(q_b)[None], n_h, d_h, qdims)[0]
    else:
        W_DQ, W_UQR = truncated_svd(W_Q, r_q)  # (d, r_q), (r_q, n_h*d_h)
        out["q_a_proj.weight"] = W_DQ.T.contiguous()  # (r_q, d)
        # (S V^T)[:r_q] reshaped (r_q, n_h, d_h): W_UQ = its nope dims, W_QR = its rope dims, interleaved per head.
        out["q_b_proj.weight"] = _split_heads(W_UQR, n_h, d_h, qdims).T.contiguous()  # (n_h*dq, r_q)
        if q_b is not None:
            # The latent C_Q has no bias, so the whole query bias moves to the up-projection.
            out["q_b_proj.bias"] = _split_heads(_f64(q_b)[None], n_h, d_h, qdims)[0]

    # ---- keys / values: joint SVD of [W_K, W_V] so one latent C_KV serves both ----
    W_KV = torch.cat([W_K, W_V], dim=1)  # (d, 2*n_kv*d_h)
    W_DKV, W_UKV = truncated_svd(W_KV, r_kv)  # (d, R), (R, 2*n_kv*d_h)
    W_UK = W_UKV[:, : n_kv * d_h].reshape(r_kv, n_kv, d_h)[:, :, nope]  # (R, n_kv, d_nope)
    # Algorithm 1 prints d_h*n_h as the split point; the V half starts at n_kv*d_h (SPEC 3.1).
    W_UV = W_UKV[:, n_kv * d_h:].reshape(r_kv, n_kv, d_h)  # (R, n_kv, d_v)
    # One RoPE key shared by all heads: average the teacher's KV heads' rope dims.
    W_KR = W_K.reshape(d, n_kv, d_h)[:, :, rope].mean(dim=1)  # (d, d_r)

    out["kv_a_proj_with_mqa.weight"] = torch.cat([W_DKV, W_KR], dim=1).T.contiguous()  # (R + d_r, d)
    out["kv_b_proj.weight"] = torch.cat([W_UK, W_UV], dim=-1).reshape(r_kv, n_kv * (d_nope + d_h)).T.contiguous()
    if k_b is not None or v_b is not None:
        kb = _f64(k_b) if k_b is not None else torch.zeros(n_kv * d_h, dtype=torch.float64)
        vb = _f64(v_b) if v_b is not None else torch.zeros(n_kv * d_h, dtype=torch.float64)
        kb, vb = kb.reshape(n_kv, d_h), vb.reshape(n_kv, d_h)  # (n_kv, D)
        # The latent is bias-free (a bias there would be cached per token for nothing); K/V biases move to the
        # up-projection, and the shared RoPE key takes the mean of the heads' RoPE-part biases like W_KR.
        out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r_kv, dtype=torch.float64), kb[:, rope].mean(0)])
        out["kv_b_proj.bias"] = torch.cat([kb[:, nope], vb], dim=-1).reshape(-1)  # (n_kv*(d_nope+d_v),)
    return out
