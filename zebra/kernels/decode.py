"""Triton decode kernels (one token per sequence), matching the references in zebra/ops/decode.py.

decode_attention  flash-decoding over a cache with split-K. Grid (batch, KV group, split): each program takes
                  all M query heads of its group, streams its chunk of cached rows in BLOCK_S tiles and keeps an
                  online softmax in fp32; a second kernel merges the splits. Each cached row is read once for
                  all M heads. For absorbed MLA the K rows are [c_kv | k_rope] and V is the c_kv part of the
                  same rows (SHARED): the scores are q_lat . c + q_rope . k_r and the tile of c read for the
                  scores is reused as the values, so a latent row is read exactly once per step.
                  kv_start / kv_len are read from GPU memory and the split count depends only on shapes, so a
                  CUDA graph captured once stays valid while the cache grows.
mamba2_step       one fused kernel per layer. Grid (batch, head, P-block): conv over the ring of the last
                  d_conv inputs (new input -> slot pos % K; programs read only older slots, and each new
                  slot value is written by exactly one program, so there is no race), SiLU, dt softplus,
                  state = exp(dt A) state + dt x B^T on an fp32 (BLOCK_P, N) tile in place, y = state C + D x.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---- attention decode ---------------------------------------------------------------------------------
@triton.jit
def _attn_tile(q_a, q_b, k_base, v_base, s0, lo, hi, sk_s, sv_s, DA, DB, scale, m_i, l_i, acc,
               SHARED: tl.constexpr, HAS_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    """One BLOCK_S tile of cached rows [s0, s0 + BLOCK_S) (rows outside [lo, hi) masked): online softmax."""
    oa = tl.arange(0, BLOCK_A)
    ob = tl.arange(0, BLOCK_B)
    os = s0 + tl.arange(0, BLOCK_S)
    sm = (os < hi) & (os >= lo)
    k_a = tl.load(k_base + os[:, None] * sk_s + oa[None, :], mask=sm[:, None] & (oa[None, :] < DA), other=0.0)
    s = tl.dot(q_a, tl.trans(k_a), input_precision=PREC)
    if HAS_B:
        k_b = tl.load(k_base + os[:, None] * sk_s + DA + ob[None, :], mask=sm[:, None] & (ob[None, :] < DB), other=0.0)
        s += tl.dot(q_b, tl.trans(k_b), input_precision=PREC)
    s = tl.where(sm[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_i - m_new))
    p = tl.where(m_new[:, None] == float("-inf"), 0.0, tl.exp(s - m_new[:, None]))
    l_i = l_i * alpha + tl.sum(p, 1)
    if SHARED:
        v = k_a
    else:
        v = tl.load(v_base + os[:, None] * sv_s + oa[None, :], mask=sm[:, None] & (oa[None, :] < DA), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attn_split_kernel(Q, K, V, KV_START, KV_LEN, O_PART, ML_PART,
                       sq_b, sq_g, sq_m, sk_b, sk_g, sk_s, sv_b, sv_g, sv_s,
                       M, DA, DB, scale, chunk, NSPLIT,
                       SHARED: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr,
                       DYNAMIC: tl.constexpr, N_TILES: tl.constexpr):
    # 64-bit offsets: batch x cached length x row width passes 2^31 elements (e.g. 256 x 32k x 576)
    b, g, sp = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
    G = tl.num_programs(1)
    start = tl.load(KV_START + b)
    lo = tl.maximum(start, sp * chunk)
    hi = tl.minimum(tl.load(KV_LEN + b), (sp + 1) * chunk)
    om = tl.arange(0, BLOCK_M)
    oa = tl.arange(0, BLOCK_A)  # key columns [0, DA): with SHARED these are also the value columns
    ob = tl.arange(0, BLOCK_B)  # key columns [DA, DA + DB) (the RoPE part of an MLA row)
    q_base = Q + b * sq_b + g * sq_g + om[:, None] * sq_m
    q_a = tl.load(q_base + oa[None, :], mask=(om[:, None] < M) & (oa[None, :] < DA), other=0.0)
    q_b = tl.load(q_base + DA + ob[None, :], mask=(om[:, None] < M) & (ob[None, :] < DB) & HAS_B, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    k_base = K + b * sk_b + g * sk_g
    v_base = V + b * sv_b + g * sv_g
    if DYNAMIC:  # GPU: visit only this split's valid rows
        for it in range(tl.cdiv(hi - lo, BLOCK_S)):
            m_i, l_i, acc = _attn_tile(q_a, q_b, k_base, v_base, lo + it * BLOCK_S, lo, hi, sk_s, sv_s, DA, DB, scale,
                                       m_i, l_i, acc, SHARED, HAS_B, BLOCK_A, BLOCK_B, BLOCK_S, PREC)
    else:  # Triton's CPU interpreter cannot loop over bounds loaded from memory: walk the whole split
        for it in range(N_TILES):
            m_i, l_i, acc = _attn_tile(q_a, q_b, k_base, v_base, sp * chunk + it * BLOCK_S, lo, hi, sk_s, sv_s, DA, DB,
                                       scale, m_i, l_i, acc, SHARED, HAS_B, BLOCK_A, BLOCK_B, BLOCK_S, PREC)
    part = (b * G + g) * NSPLIT + sp
    tl.store(O_PART + (part * BLOCK_M + om[:, None]) * BLOCK_A + oa[None, :], acc)
    tl.store(ML_PART + (part * 2) * BLOCK_M + om, m_i)
    tl.store(ML_PART + (part * 2 + 1) * BLOCK_M + om, l_i)


@triton.jit
def _attn_merge_kernel(O_PART, ML_PART, OUT, so_b, so_g, so_m, M, DV, NSPLIT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (batch, group, value-column block): merge the splits' partial softmax sums."""
    b, g, vb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)  # 64-bit offsets
    G = tl.num_programs(1)
    om = tl.arange(0, BLOCK_M)
    ov = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for sp in range(NSPLIT):  # splits that saw no keys hold l = 0 and drop out
        part = (b * G + g) * NSPLIT + sp
        m_s = tl.load(ML_PART + (part * 2) * BLOCK_M + om)
        l_s = tl.load(ML_PART + (part * 2 + 1) * BLOCK_M + om)
        a_s = tl.load(O_PART + (part * BLOCK_M + om[:, None]) * BLOCK_A + ov[None, :])
        m_new = tl.maximum(m_i, m_s)
        c_old = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_i - m_new))
        c_new = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_s - m_new))
        l_i = l_i * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * so_b + g * so_g + om[:, None] * so_m + ov[None, :], out.to(OUT.dtype.element_ty),
             mask=(om[:, None] < M) & (ov[None, :] < DV))


_SM_COUNT: dict[int, int] = {}


def _num_splits(B: int, G: int, S: int, device) -> int:
    if device.type != "cuda":  # the Triton interpreter (tests on CPU)
        return max(1, min(4, triton.cdiv(S, 2048)))
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = triton.cdiv(2 * _SM_COUNT[idx], B * G)  # about two programs per SM
    # but at least 1024 rows per split: each split writes an fp32 partial of M x D_v that the merge reads back
    return max(1, min(want, triton.cdiv(S, 1024)))


def decode_attention(q, k, v, kv_start, kv_len, scale, num_splits=None, block_s=None, num_warps=None,
                     num_stages=None):
    """Same contract as zebra.ops.decode.decode_attention (block_s / num_warps / num_stages: tuning)."""
    B, G, M, DK = q.shape
    S, DV = k.shape[2], v.shape[3]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of q, k and v must be contiguous")
    shared = v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and DV <= DK
    if shared:
        DA, DB = DV, DK - DV
    else:
        DA, DB = DK, 0
        if DV != DK:
            raise ValueError("decode_attention: separate K and V must have the same head dim")
    nsplit = num_splits or _num_splits(B, G, S, q.device)
    BLOCK_S = block_s or 64
    chunk = triton.cdiv(triton.cdiv(S, nsplit), BLOCK_S) * BLOCK_S
    nsplit = triton.cdiv(S, chunk)
    BLOCK_M = max(16, triton.next_power_of_2(M))
    BLOCK_A = max(16, triton.next_power_of_2(DA))
    BLOCK_B = max(16, triton.next_power_of_2(max(DB, 1)))
    o_part = torch.empty(B * G * nsplit * BLOCK_M * BLOCK_A, device=q.device, dtype=torch.float32)
    ml_part = torch.empty(B * G * nsplit * 2 * BLOCK_M, device=q.device, dtype=torch.float32)
    _attn_split_kernel[(B, G, nsplit)](
        q, k, v, kv_start, kv_len, o_part, ml_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        M, DA, DB, scale, chunk, nsplit,
        SHARED=shared, HAS_B=DB > 0, BLOCK_M=BLOCK_M, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B, BLOCK_S=BLOCK_S,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DYNAMIC=not _INTERPRET, N_TILES=chunk // BLOCK_S, num_warps=num_warps or 4,
        num_stages=num_stages or 3)  # tools/tune_decode.py on an H100: 4 warps / 3 stages best for MLA and GQA
    out = torch.empty(B, G, M, DV, device=q.device, dtype=q.dtype)
    BLOCK_V = min(BLOCK_A, 64)
    _attn_merge_kernel[(B, G, triton.cdiv(DV, BLOCK_V))](o_part, ml_part, out, out.stride(0), out.stride(1),
                                                         out.stride(2), M, DV, nsplit, BLOCK_M=BLOCK_M,
                                                         BLOCK_A=BLOCK_A, BLOCK_V=BLOCK_V, num_warps=4)
    return out


# ---- Mamba2 step -------------------------------------------------------------------------------------
@triton.jit
def _softplus(x):
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _conv_silu(XBC, RING, W, BIAS, b, ch, cmask, pos, sx_b, sr_b, sr_c, sw_c, write, K: tl.constexpr,
               BLOCK_MASK: tl.constexpr):
    """SiLU(conv) for channels `ch` of row b; the new input goes to ring slot pos % K when `write`."""
    new = tl.load(XBC + b * sx_b + ch, mask=cmask, other=0.0)
    acc = tl.load(BIAS + ch, mask=cmask, other=0.0).to(tl.float32)
    acc += tl.load(W + ch * sw_c + (K - 1), mask=cmask, other=0.0).to(tl.float32) * new.to(tl.float32)
    for i in tl.static_range(1, K):
        slot = (pos - i + K) % K  # pos >= 0, so this is the non-negative residue
        old = tl.load(RING + b * sr_b + ch * sr_c + slot, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.load(W + ch * sw_c + (K - 1 - i), mask=cmask, other=0.0).to(tl.float32) * old
    if BLOCK_MASK:  # newer Triton interpreters refuse a scalar term in a store mask: broadcast it first
        wmask = cmask & (tl.full(ch.shape, 1, tl.int32) * write.to(tl.int32) != 0)
    else:
        wmask = cmask & write
    tl.store(RING + b * sr_b + ch * sr_c + pos % K, new.to(RING.dtype.element_ty), mask=wmask)
    return acc / (1.0 + tl.exp(-acc))


@triton.jit
def _mamba2_step_kernel(XBC, RING, POS, W, BIAS, DT, DT_BIAS, A_LOG, D, STATE, Y,
                        sx_b, sr_b, sr_c, sw_c, sdt_b, ss_b, ss_h, ss_p, sy_b, sy_h,
                        H, NKV, P, N,
                        K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MASK: tl.constexpr):
    b, h, pb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # 64-bit batch offsets
    rep = H // NKV
    grp, j = h // rep, h % rep
    pos = tl.load(POS).to(tl.int32)
    op = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    on = tl.arange(0, BLOCK_N)
    pm, nm = op < P, on < N
    first_head = j == 0
    x = _conv_silu(XBC, RING, W, BIAS, b, grp * P + op, pm, pos, sx_b, sr_b, sr_c, sw_c, first_head, K, BLOCK_MASK)
    bv = _conv_silu(XBC, RING, W, BIAS, b, NKV * P + grp * N + on, nm, pos, sx_b, sr_b, sr_c, sw_c,
                    first_head & (pb == 0), K, BLOCK_MASK)
    cv = _conv_silu(XBC, RING, W, BIAS, b, NKV * P + NKV * N + h * N + on, nm, pos, sx_b, sr_b, sr_c, sw_c,
                    pb == 0, K, BLOCK_MASK)
    dt = _softplus(tl.load(DT + b * sdt_b + h).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32))
    dA = tl.exp(-dt * tl.exp(tl.load(A_LOG + h).to(tl.float32)))
    sp = STATE + b * ss_b + h * ss_h + op[:, None] * ss_p + on[None, :]
    smask = pm[:, None] & nm[None, :]
    st = tl.load(sp, mask=smask, other=0.0).to(tl.float32)  # fp32 or bf16 storage, fp32 arithmetic
    st = st * dA + (dt * x)[:, None] * bv[None, :]
    tl.store(sp, st.to(STATE.dtype.element_ty, fp_downcast_rounding="rtne"), mask=smask)  # rounded once (to nearest);
    # the readout below uses the unrounded fp32 state
    y = tl.sum(st * cv[None, :], 1) + tl.load(D + h).to(tl.float32) * x
    tl.store(Y + b * sy_b + h * sy_h + op, y, mask=pm)


def mamba2_step(xBC, conv_ring, pos, conv_w, conv_b, dt, dt_bias, A_log, D, ssm_state, n_kv, headdim, d_state):
    """Same contract as zebra.ops.decode.mamba2_step."""
    Bsz, C = xBC.shape
    H = dt.shape[1]
    K = conv_ring.shape[-1]
    if ssm_state.dtype not in (torch.float32, torch.bfloat16) or ssm_state.stride(-1) != 1 \
            or conv_ring.stride(-1) != 1:
        raise ValueError("mamba2_step: ssm_state must be fp32 or bf16 and state / ring contiguous in the last "
                         "dimension")
    if xBC.stride(-1) != 1:
        xBC = xBC.contiguous()
    if conv_b is None:
        conv_b = torch.zeros(C, device=xBC.device, dtype=xBC.dtype)
    y = torch.empty(Bsz, H, headdim, device=xBC.device, dtype=torch.float32)
    BLOCK_N = max(16, triton.next_power_of_2(d_state))
    BLOCK_P = min(max(16, triton.next_power_of_2(headdim)), max(16, 4096 // BLOCK_N))
    grid = (Bsz, H, triton.cdiv(headdim, BLOCK_P))
    _mamba2_step_kernel[grid](
        xBC, conv_ring, pos, conv_w, conv_b, dt, dt_bias, A_log, D, ssm_state, y,
        xBC.stride(0), conv_ring.stride(0), conv_ring.stride(1), conv_w.stride(0), dt.stride(0),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
        H, n_kv, headdim, d_state, K=K, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, BLOCK_MASK=_INTERPRET, num_warps=4)
    return y


KERNELS = {"decode_attention": decode_attention, "mamba2_step": mamba2_step}
