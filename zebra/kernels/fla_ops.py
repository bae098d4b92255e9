"""Mamba2 training / prefill on fla-core's Triton kernels (SPEC 3.2).

SSD is gated linear attention with a scalar per-head decay: with q = C, k = dt * B, v = x and log-decay
g = dt * A, fla's chunk_simple_gla computes o_t = sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s and carries the
state (V-first layout [P, N] = ours). Packed documents become variable-length sequences (cu_seqlens) of a
flattened batch, so the state and the conv window reset at each boundary exactly as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules.causal_conv1d import causal_conv1d as fla_conv
from fla.ops.simple_gla import chunk_simple_gla, parallel_simple_gla


def _cu_seqlens(doc_ids):
    """Boundaries of every document of every row in the flattened (1, B*T) batch: (N+1,) int32."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
    return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)


def _fla_backward_ok(device) -> bool:
    """fla refuses its gated backward on Hopper with Triton >= 3.4, < 3.7.1 (known wrong results, fla #640)."""
    import triton

    major, minor, patch = (int(v) for v in (triton.__version__.split(".") + ["0", "0"])[:3])
    return torch.cuda.get_device_capability(device)[0] != 9 or (major, minor, patch) >= (3, 7, 1)


def ssd_scan(x, dt, A, Bm, Cm, initial_state=None, chunk_size=64, doc_ids=None):
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, Bm, Cm))
    Bsz, T, H, P = x.shape
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    g = (dt.float() * A.float()[None, None])  # (B, T, H) log-decay
    k = (Bm.float() * dt.float()[..., None]).to(dtype)
    q, v = Cm.to(dtype), x.to(dtype)
    if training and not _fla_backward_ok(x.device):
        # fla's chunked gated backward is wrong on this Hopper / Triton pair (fla #640); its parallel
        # (flash-attention-like, quadratic within a sequence) simple-GLA kernels have their own backward.
        if initial_state is not None:
            from ..ops.ssd import ssd_chunked

            return ssd_chunked(x, dt, A, Bm, Cm, initial_state=initial_state, chunk_size=chunk_size, doc_ids=doc_ids)
        cu = _cu_seqlens(doc_ids if doc_ids is not None else torch.zeros(Bsz, T, dtype=torch.long, device=x.device))
        flat = lambda t: t.reshape(1, Bsz * T, *t.shape[2:])  # noqa: E731
        y, _ = parallel_simple_gla(flat(q), flat(k), flat(v), flat(g), scale=1.0, cu_seqlens=cu.long())
        return y.reshape(Bsz, T, H, P).float(), None
    if doc_ids is not None:
        if initial_state is not None:
            raise NotImplementedError("packed documents with an initial state")
        cu = _cu_seqlens(doc_ids)
        flat = lambda t: t.reshape(1, Bsz * T, *t.shape[2:])  # noqa: E731
        y, _ = chunk_simple_gla(flat(q), flat(k), flat(v), flat(g), scale=1.0, output_final_state=False,
                                state_v_first=True, cu_seqlens=cu.long())
        return y.reshape(Bsz, T, H, P).float(), None
    y, final = chunk_simple_gla(q, k, v, g, scale=1.0, initial_state=initial_state, output_final_state=True,
                                state_v_first=True)
    return y.float(), final.float()


def causal_conv1d(x, weight, bias, state=None, doc_ids=None):
    """x (B, T, C), weight (C, 1, K), state (B, C, K-1) -> (y, new_state (B, C, K-1))."""
    Bsz, T, C = x.shape
    K = weight.shape[-1]
    w = weight[:, 0]
    if doc_ids is not None:
        y, _ = fla_conv(x.reshape(1, Bsz * T, C), w, bias, cu_seqlens=_cu_seqlens(doc_ids).long())
        return y.reshape(Bsz, T, C), None
    init = None if state is None else F.pad(state, (1, 0)).to(x.dtype)  # fla keeps K columns, we keep K-1
    y, final = fla_conv(x, w, bias, initial_state=init, output_final_state=True)
    return y, final[..., 1:]


KERNELS = {"ssd_scan": ssd_scan, "causal_conv1d": causal_conv1d}
