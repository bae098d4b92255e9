"""Mamba2's selective state-space recurrence (SSD, SPEC 3.2) in pure PyTorch: the reference for every kernel.

Per head h with scalar decay a_t = exp(dt_t * A_h) (A_h < 0):
    state_t = a_t * state_{t-1} + dt_t * (x_t outer B_t)        # (P, N): headdim x d_state
    y_t     = state_t @ C_t                                      # (P,)
`ssd_naive` runs that loop token by token; `ssd_chunked` computes the same thing in chunks of Q tokens
(quadratic attention-like form inside a chunk, the recurrence only across chunk boundaries), which is
what training and prefill use. All arithmetic is fp32 whatever the input dtype: the state must stay fp32.

Shapes: x (B, T, H, P), dt (B, T, H) already softplus'd, A (H,), Bm / Cm (B, T, H, N),
initial_state (B, H, P, N) or None. Returns y (B, T, H, P) fp32 and the final state (B, H, P, N) fp32.

Packed sequences: doc_ids (B, T), non-decreasing along T, resets the state where the id changes, so a row
holding several documents gives each one exactly what it would get alone (the initial state belongs to
the row's first document; the final state to its last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_step(state, x, dt, A, Bm, Cm):
    """One token. state (B, H, P, N) updated in place; x (B, H, P), dt (B, H), Bm/Cm (B, H, N). Returns y (B, H, P).
    The update and the readout are computed in fp32; a bf16 state is rounded once, when stored (the readout uses
    the unrounded value, as the GPU kernel does)."""
    a = torch.exp(dt.float() * A.float())  # (B, H)
    dBx = (dt.float()[..., None, None] * x.float()[..., :, None]) * Bm.float()[..., None, :]  # (B, H, P, N)
    if state.dtype == torch.float32:
        new = state.mul_(a[..., None, None]).add_(dBx)
    else:
        new = state.float() * a[..., None, None] + dBx
        state.copy_(new)
    return torch.einsum("bhpn,bhn->bhp", new, Cm.float())


def ssd_naive(x, dt, A, Bm, Cm, initial_state=None, doc_ids=None):
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    state = x.new_zeros(Bsz, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(T):
        if doc_ids is not None and t > 0:  # a new document starts from a zero state
            state.mul_((doc_ids[:, t] == doc_ids[:, t - 1]).float()[:, None, None, None])
        ys.append(ssd_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t]))
    return torch.stack(ys, dim=1), state


def _segsum(a):
    """a (..., Q) log-decays -> (..., Q, Q) with [t, s] = sum_{s < r <= t} a_r for s <= t, -inf above the diagonal.
    Each entry is summed directly (masked cumsum), never as a difference of two prefix sums: a_r = -inf (a state
    reset) then gives exactly -inf, never inf - inf = nan, and there is no cancellation error."""
    Q = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, Q)  # (..., r, s) = a_r
    strict = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)  # r > s
    seg = torch.cumsum(x.masked_fill(~strict, 0.0), dim=-2)  # [t, s] = sum_{s < r <= t} a_r
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return seg.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, Bm, Cm, initial_state=None, chunk_size: int = 64, doc_ids=None):
    """SSD in chunks of Q tokens, all chunks at once (no Python loop, so torch.compile sees one graph):

      1. inside a chunk, the quadratic (attention-like) form  y_t += sum_{s<=t} exp(seg[t, s]) (C_t . B_s) dt_s x_s;
      2. each chunk's own state at its end                      S_c = sum_s exp(seg[Q-1, s]) dt_s x_s B_s^T;
      3. the states entering every chunk, from a segsum over the chunk totals (the recurrence
         S_in(c+1) = exp(sum of a over chunk c) S_in(c) + S_c written as one (c+1) x (c+1) decay matrix);
      4. what the entering state contributes inside the chunk   y_t += exp(cumsum a up to t) S_in . C_t.

    A document boundary sets that token's log-decay to -inf: the state is forgotten exactly there (a_t = 0) and
    every later term that would cross it gets exp(-inf) = 0, so packed rows need no extra masks. fp32 throughout
    (autocast off: the state must stay fp32; GEMMs may use TF32 where the caller allows it)."""
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    Q = chunk_size
    with torch.autocast(x.device.type, enabled=False):
        g = dt.float() * A.float()  # (B, T, H) log-decay per token, <= 0
        if doc_ids is not None:
            starts = torch.zeros_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            g = g.masked_fill(starts[..., None], float("-inf"))
        xdt = x.float() * dt.float()[..., None]  # (B, T, H, P): dt_s x_s
        Bf, Cf = Bm.float(), Cm.float()
        pad = (-T) % Q
        if pad:  # padding: no decay (g = 0) and no input (dt x = 0), so the final state is unchanged
            xdt, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, Bf, Cf))
            g = F.pad(g, (0, 0, 0, pad))
        nc = xdt.shape[1] // Q
        # (B, H, c, Q, .) layout: every GEMM below is batched over (B, H, c)
        chunks = lambda t: t.reshape(Bsz, nc, Q, H, -1).permute(0, 3, 1, 2, 4)  # noqa: E731
        xdt, Bf, Cf = chunks(xdt), chunks(Bf), chunks(Cf)
        g = g.reshape(Bsz, nc, Q, H).permute(0, 3, 1, 2)  # (B, H, c, Q)

        seg = _segsum(g)  # (B, H, c, Q, Q)
        y = ((Cf @ Bf.transpose(-1, -2)) * torch.exp(seg)) @ xdt  # 1. (B, H, c, Q, P)
        to_end = torch.exp(seg[..., -1, :])  # (B, H, c, Q): decay from each token to the chunk's end
        states = xdt.transpose(-1, -2) @ (Bf * to_end[..., None])  # 2. (B, H, c, P, N)

        cs = torch.cumsum(g, dim=-1)  # (B, H, c, Q): log-decay from the chunk start through t (-inf after a reset)
        s0 = (torch.zeros(Bsz, H, P, N, device=x.device, dtype=torch.float32) if initial_state is None
              else initial_state.float())
        states = torch.cat([s0[:, :, None], states], dim=2)  # (B, H, c+1, P, N)
        chunk_decay = torch.exp(_segsum(F.pad(cs[..., -1], (1, 0))))  # 3. (B, H, c+1, c+1)
        entering = torch.einsum("bhzc,bhcpn->bhzpn", chunk_decay, states)  # state after chunk z-1 (z=0: s0)
        prev, final = entering[:, :, :-1], entering[:, :, -1]

        y = y + (Cf @ prev.transpose(-1, -2)) * torch.exp(cs)[..., None]  # 4. (B, H, c, Q, P)
        y = y.permute(0, 2, 3, 1, 4).reshape(Bsz, nc * Q, H, P)[:, :T]
    return y, final
