"""Mamba2 weights from a teacher's attention (SPEC 3.2; paper App. A.2, following MambaInLlama).

Dropping the softmax turns attention into a linear RNN with x ~ V, B ~ K, C ~ Q, so the in_proj rows that
produce x, B and C take the teacher's v_proj, k_proj and q_proj rows and out_proj takes o_proj. in_proj's row
blocks, in order: z (d_inner), x (d_xb), B (d_xb), C (d_inner), dt (n_h), with d_inner = n_h*d_h and
d_xb = n_kv*d_h. The z and dt rows, conv1d, A_log, dt_bias, D and the gated norm keep Mamba2's own default
init, which the freshly constructed model already holds: we only overwrite the mapped rows.
"""

from __future__ import annotations

import torch

# Parameters of a Mamba2 layer that keep their default init (relative to the layer's `mamba` module).
DEFAULT_INIT = ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight")
GATE_BIAS = 1.0  # gate_init "constant": z = 0 * h + 1, silu(1) on every channel (the per-token norm removes the scale)


def in_proj_blocks(n_h: int, n_kv: int, d_h: int) -> dict[str, slice]:
    """Row ranges of in_proj's output blocks z, x, B, C, dt."""
    d_inner, d_xb = n_h * d_h, n_kv * d_h
    sizes = {"z": d_inner, "x": d_xb, "B": d_xb, "C": d_inner, "dt": n_h}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out


def init_mamba2_from_attention(
    layer_state: dict[str, torch.Tensor],
    q_w: torch.Tensor,
    k_w: torch.Tensor,
    v_w: torch.Tensor,
    o_w: torch.Tensor,
    n_h: int,
    n_kv: int,
    d_h: int,
    q_b: torch.Tensor | None = None,
    k_b: torch.Tensor | None = None,
    v_b: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """New in_proj.weight (+ in_proj.bias) and out_proj.weight for one Mamba2 layer.

    layer_state: the layer's current (default-initialised) tensors, names relative to the `mamba` module;
    only in_proj.weight (and in_proj.bias when present) are read, so z / dt rows keep their default values.
    Teacher weights are nn.Linear layout: q_w [n_h*d_h, d], k_w / v_w [n_kv*d_h, d], o_w [d, n_h*d_h].
    """
    blocks = in_proj_blocks(n_h, n_kv, d_h)
    w = layer_state["in_proj.weight"].detach().clone()
    expected_rows = blocks["dt"].stop
    if w.shape[0] != expected_rows:
        raise ValueError(f"in_proj.weight has {w.shape[0]} rows, expected {expected_rows} (z, x, B, C, dt)")
    w[blocks["x"]] = v_w.to(w.dtype)
    w[blocks["B"]] = k_w.to(w.dtype)
    w[blocks["C"]] = q_w.to(w.dtype)
    out = {"in_proj.weight": w, "out_proj.weight": o_w.detach().clone().to(w.dtype)}
    if "in_proj.bias" in layer_state:
        b = torch.zeros_like(layer_state["in_proj.bias"])  # z and dt rows 0: dt already has its own dt_bias
        for name, src in (("x", v_b), ("B", k_b), ("C", q_b)):
            if src is not None:
                b[blocks[name]] = src.to(b.dtype)
        out["in_proj.bias"] = b
    return out
