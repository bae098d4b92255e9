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
    """One token. state (B, H, P, N) fp32 updated in place; x (B, H, P), dt (B, H), Bm/Cm (B, H, N). Returns y (B, H, P)."""
    a = torch.exp(dt.float() * A.float())  # (B, H)
    dBx = (dt.float()[..., None, None] * x.float()[..., :, None]) * Bm.float()[..., None, :]  # (B, H, P, N)
    state.mul_(a[..., None, None]).add_(dBx)
    return torch.einsum("bhpn,bhn->bhp", state, Cm.float())


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
    """a (..., Q) log-decays -> (..., Q, Q) with [t, s] = sum_{s < r <= t} a_r for s <= t, -inf above the diagonal."""
    Q = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]  # (..., Q, Q): cs[t] - cs[s]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return diff.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, Bm, Cm, initial_state=None, chunk_size: int = 64, doc_ids=None):
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    Q = chunk_size
    pad = (-T) % Q
    x, dt, Bm, Cm = (t.float() for t in (x, dt, Bm, Cm))
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x, Bm, Cm = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bm, Cm))
        dt = F.pad(dt, (0, 0, 0, pad))
        if doc_ids is not None:  # padding joins the last document
            doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, pad)], dim=1)
    nc = x.shape[1] // Q
    # (B, c, Q, H, ...) chunks
    x, Bm, Cm = (t.reshape(Bsz, nc, Q, H, -1) for t in (x, Bm, Cm))
    dt = dt.reshape(Bsz, nc, Q, H)
    a = (dt * A.float()).permute(0, 3, 1, 2)  # (B, H, c, Q) log-decay per token
    a_cs = torch.cumsum(a, dim=-1)  # (B, H, c, Q)
    xdt = x * dt[..., None]  # (B, c, Q, H, P): dt_s * x_s

    if doc_ids is not None:
        doc = doc_ids.reshape(Bsz, nc, Q)
        doc_end = doc[:, :, -1]  # (B, c): the document a chunk's final state belongs to
        doc_prev = torch.cat([doc[:, :1, 0], doc_end[:, :-1]], dim=1)  # (B, c): document of the entering state

    # 1. inside each chunk: y[t] = sum_{s<=t} exp(cs[t]-cs[s]) (C_t . B_s) dt_s x_s
    decay = torch.exp(_segsum(a))  # (B, H, c, Q, Q)
    if doc_ids is not None:  # no mixing across documents
        decay = decay * (doc[:, :, :, None] == doc[:, :, None, :])[:, None].float()
    scores = torch.einsum("bctHn,bcsHn->bHcts", Cm, Bm) * decay
    y = torch.einsum("bHcts,bcsHp->bctHp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (B, H, c, Q)
    if doc_ids is not None:  # only the chunk's last document reaches its final state
        to_end = to_end * (doc == doc_end[..., None])[:, None].float()
    chunk_states = torch.einsum("bHcs,bcsHn,bcsHp->bcHpn", to_end, Bm, xdt)  # (B, c, H, P, N)

    # 3. carry the state across chunks: S_c = exp(sum a over chunk c) * S_{c-1} + chunk_states[c]
    state = x.new_zeros(Bsz, H, P, N) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cs[..., -1])  # (B, H, c)
    if doc_ids is not None:  # a state crosses a chunk only if the chunk ends in the same document
        chunk_decay = chunk_decay * (doc_end == doc_prev)[:, None].float()
    states_before = []
    for c in range(nc):
        states_before.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    prev = torch.stack(states_before, dim=1)  # (B, c, H, P, N): state entering chunk c

    # 4. what the entering state contributes inside the chunk: exp(cs[t]) * prev @ C_t
    carry = torch.exp(a_cs)  # (B, H, c, Q)
    if doc_ids is not None:
        carry = carry * (doc == doc_prev[..., None])[:, None].float()
    y = y + torch.einsum("bctHn,bcHpn,bHct->bctHp", Cm, prev, carry)
    y = y.reshape(Bsz, nc * Q, H, P)[:, :T]
    return y, state
