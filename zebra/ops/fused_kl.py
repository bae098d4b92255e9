"""Fused LM head + forward KL (SPEC 7): KL(p_teacher || p_student) summed over tokens, from final hidden states,
with the gradient computed during the forward pass, a chunk of tokens at a time.

    loss_sum = linear_kl(s_h, s_w, t_h, t_w, chunk_tokens=4096)   # s_h (n, d), s_w (V, d); t_h (n, d_t), t_w (V, d_t)
    (loss_sum / n).backward()                                       # per-token mean: divide by what you count

Why not the plain path: logits of both models for a batch of 64k tokens and a 49k vocabulary are 12.6 GB each in
fp32, and a naive KL keeps several such tensors alive for backward. Here only one chunk's logits ever exist;
the gradient w.r.t. the student's logits has a closed form, softmax(s) - softmax(t) (rows of p_t sum to 1), so
d hidden = G W and d W = G^T h are accumulated chunk by chunk in the forward and simply scaled by the incoming
gradient in backward: the logits are never recomputed (the checkpointed alternative computes them twice).
The GEMMs run in the autocast dtype when autocast is on (else the inputs' dtype); softmax / KL math in fp32.

We write this rather than use fla-core's FusedKLDivLoss (Triton only) because it must run on the CPU too (tests,
CI, the demo) and the cost is in the four GEMMs per chunk, which cuBLAS does either way; the elementwise part is
compiled with torch.compile on CUDA when available (`ZEBRA_COMPILE=0` turns that off).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _kl_and_grad(s_logits: torch.Tensor, t_logits: torch.Tensor, inv_temp: float, need_grad: bool):
    """Rows of KL(softmax(t) || softmax(s)) at temperature 1/inv_temp and d(sum KL)/d s_logits. (c, V) -> (c,), (c, V)."""
    acc = torch.promote_types(s_logits.dtype, torch.float32)  # fp32, or fp64 when given (gradchecks)
    s = s_logits.to(acc) * inv_temp
    t = t_logits.to(acc) * inv_temp
    ls = torch.log_softmax(s, dim=-1)
    lt = torch.log_softmax(t, dim=-1)
    pt = lt.exp()
    kl = (pt * (lt - ls)).sum(-1)
    if not need_grad:
        return kl, None
    return kl, (ls.exp() - pt) * inv_temp


_COMPILED = {}


def _elementwise(device: torch.device):
    """The KL / gradient function, compiled once per device type on CUDA (it is memory-bound: ~10 passes over a
    (chunk, V) fp32 tensor eager, one or two compiled)."""
    if device.type != "cuda" or os.environ.get("ZEBRA_COMPILE", "1") == "0":
        return _kl_and_grad
    if "cuda" not in _COMPILED:
        try:
            # dynamic=None: the first chunk shape is compiled static, a second row count (the last chunk of a
            # batch, whose size varies with the tokens the loss counts) makes the row dimension symbolic once;
            # dynamic=False would compile every distinct remainder anew until dynamo's cache limit
            _COMPILED["cuda"] = torch.compile(_kl_and_grad, dynamic=None)
        except Exception:  # noqa: BLE001  (no compiler available: eager is correct, just slower)
            _COMPILED["cuda"] = _kl_and_grad
    return _COMPILED["cuda"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_h, s_w, s_b, t_h, t_w, t_b, chunk_tokens: int, temperature: float):
        cdt = _compute_dtype(s_h)
        need_grad = any(ctx.needs_input_grad[:3])
        fn = _elementwise(s_h.device)
        with torch.autocast(s_h.device.type, enabled=False):
            w = s_w.detach().to(cdt)
            tw = t_w.detach().to(cdt)
            h = s_h.detach().to(cdt)
            th = t_h.detach().to(cdt)
            sb = s_b.detach().to(cdt) if s_b is not None else None
            tb = t_b.detach().to(cdt) if t_b is not None else None
            n = h.shape[0]
            acc = torch.promote_types(cdt, torch.float32)
            total = torch.zeros((), dtype=acc, device=h.device)
            dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            dw = torch.zeros(s_w.shape, dtype=acc, device=h.device) if ctx.needs_input_grad[1] else None
            db = torch.zeros(s_b.shape, dtype=acc, device=h.device) if ctx.needs_input_grad[2] else None
            for a in range(0, n, chunk_tokens):
                hc = h[a:a + chunk_tokens]
                s_logits = hc @ w.T if sb is None else torch.addmm(sb, hc, w.T)
                t_logits = th[a:a + chunk_tokens] @ tw.T if tb is None else torch.addmm(tb, th[a:a + chunk_tokens], tw.T)
                kl, g = fn(s_logits, t_logits, 1.0 / temperature, need_grad)
                total += kl.sum()
                if need_grad:
                    if db is not None:
                        db += g.sum(0)
                    g = g.to(cdt)  # (c, V)
                    if dh is not None:
                        dh[a:a + chunk_tokens] = g @ w
                    if dw is not None:
                        dw += (g.T @ hc).to(acc)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (s_h.dtype, s_w.dtype, s_b.dtype if s_b is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [(g * grad_out).to(dt) if g is not None else None for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def linear_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_weight: torch.Tensor, chunk_tokens: int = 4096, temperature: float = 1.0,
              student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the n rows of KL(softmax(teacher_hidden @ teacher_weight.T [+ b_t]) / T) || softmax((student_hidden @
    student_weight.T [+ b_s]) / T)), fp32 scalar. Gradients reach the student's hidden states, weight and bias only
    (the teacher side is a fixed target). hidden (n, d) / (n, d_t); weights (V, d) / (V, d_t); biases (V,)."""
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("linear_kl takes flattened (n, d) hidden states")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows but {teacher_hidden.shape[0]} teacher rows")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student head has {student_weight.shape[0]} outputs, teacher head "
                         f"{teacher_weight.shape[0]}: the models must share the vocabulary")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t_b = teacher_bias.detach() if teacher_bias is not None else None
    if not torch.is_grad_enabled():  # evaluation: detached inputs, so no gradient is computed in the forward
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        student_bias = student_bias.detach() if student_bias is not None else None
    return _LinearKL.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                           teacher_weight.detach(), t_b, int(chunk_tokens), float(temperature))
