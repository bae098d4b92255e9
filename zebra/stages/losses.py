"""Losses of the training stages: ILD MSE (SPEC 4, Eq. 11), per-token forward KL for end-to-end distillation
(SPEC 7, Eq. 13), and sigmoid DPO (SPEC 8).

    loss, n = forward_kl_per_token(teacher_logits, student_logits, mask)       # reference, full logits
    loss, n = chunked_kl_from_hidden(h_s, model.lm_head, h_t, teacher.lm_head, mask, chunk_tokens=4096)  # fused
    loss, metrics = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)
    logp = sequence_logprob(logits, input_ids, response_mask)                  # (B,)
    loss = ild_loss(h_student, h_teacher, mixer_student, mixer_teacher, mask)

Conventions: masks are (B, T), true/1 where a token counts; the softmax / KL / MSE math runs in float32 (float64
if given); the teacher (and DPO reference) side is a fixed target and gets no gradient. KL losses are
normalised per counted token, not per sequence or batch (SPEC 7), and return the token count so callers can
weight micro-batches exactly. `temperature` divides both models' logits; there is no T^2 factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fused_kl import linear_kl


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 upcast for the softmax / squared-error math, float64 kept (for gradchecks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _token_mask(mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    """(B, T) bool mask; None means every token counts."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)} (B, T)")
    return mask.to(device=device, dtype=torch.bool)


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher || p_student) per row of (n, V) logits, in float32. -> (n,)"""
    t_logp = F.log_softmax(_fp32(teacher_logits.detach()) / temperature, dim=-1)  # (n, V)
    s_logp = F.log_softmax(_fp32(student_logits) / temperature, dim=-1)  # (n, V)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (n,)


# ---- end-to-end distillation (SPEC 7) ----------------------------------------------------------------------
def forward_kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                         mask: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """Mean over counted tokens of sum_v p_t(v) (log p_t(v) - log p_s(v)) (Eq. 13). Logits (B, T, V).
    Returns (loss, number of counted tokens); with no counted token the loss is a differentiable 0."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ")
    m = _token_mask(mask, student_logits.shape[:2], student_logits.device)  # (B, T)
    n = int(m.sum())
    # Select counted tokens first: padded positions may hold garbage logits that would poison the sum.
    kl = _kl_rows(teacher_logits[m], student_logits[m], temperature)  # (n,)
    return kl.sum() / max(n, 1), n


def _head_params(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, d), bias (V,) or None) of an nn.Linear, or a bare weight tensor."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, torch.Tensor):
        return head, None
    raise TypeError(f"head must be an nn.Linear or a (V, d) weight tensor, got {type(head).__name__}")


def chunked_kl_from_hidden(student_hidden: torch.Tensor, student_head, teacher_hidden: torch.Tensor, teacher_head,
                           mask: torch.Tensor | None = None, chunk_tokens: int = 4096,
                           temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """`forward_kl_per_token` of head(hidden) for both models, without materialising (B*T, V) float32 logits.

    Counted token positions are flattened and handed to zebra.ops.fused_kl.linear_kl, which computes the KL and
    its gradient chunk by chunk in one pass (peak extra memory O(chunk_tokens * V), no recomputation in backward).
    Gradients reach the student's hidden states and head (weight, bias) only. hidden: (B, T, d) and (B, T, d_t);
    heads map to the same V. Returns (mean KL over counted tokens, number of counted tokens)."""
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in (B, T)")
    s_w, s_b = _head_params(student_head)
    t_w, t_b = _head_params(teacher_head)
    m = _token_mask(mask, student_hidden.shape[:2], student_hidden.device)  # (B, T)
    idx = m.reshape(-1).nonzero().squeeze(-1)  # (n,)
    n = idx.numel()
    s_flat = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)  # (n, d)
    t_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx)  # (n, d_t)
    total = linear_kl(s_flat, s_w, t_flat, t_w, chunk_tokens=chunk_tokens, temperature=temperature,
                      student_bias=s_b, teacher_bias=t_b)
    return total / max(n, 1), n


# ---- DPO (SPEC 8) -----------------------------------------------------------------------------------------
def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(labels[t] | <t) over the tokens t where mask[t] is set (the response), as in a causal LM:
    logits[:, t-1] scores labels[:, t], so mask[:, 0] is ignored. logits (B, T, V), labels/mask (B, T) -> (B,)."""
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and mask "
                         f"{tuple(mask.shape)} must agree on (B, T)")
    shifted = _fp32(logits[:, :-1])  # (B, T-1, V): position t-1 predicts token t
    target = labels[:, 1:]  # (B, T-1)
    keep = mask[:, 1:].to(torch.bool)  # (B, T-1)
    # Masked-out labels may be -100 or padding: point them at a valid id, their term is zeroed below.
    safe = torch.where(keep, target, torch.zeros_like(target))
    token_logp = shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(shifted, dim=-1)  # (B, T-1)
    return torch.where(keep, token_logp, torch.zeros_like(token_logp)).sum(-1)  # (B,)


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Sigmoid DPO: mean of -log sigmoid(beta * ((pc - rc) - (pr - rr))) over the batch (B,). The reference
    log-probs are constants (SPEC 8: the frozen distilled student). Metrics are Python floats for logging."""
    chosen = beta * (_fp32(policy_chosen_logp) - _fp32(ref_chosen_logp.detach()))  # (B,) implicit rewards
    rejected = beta * (_fp32(policy_rejected_logp) - _fp32(ref_rejected_logp.detach()))  # (B,)
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        metrics = {
            "reward_accuracy": (chosen > rejected).float().mean().item(),
            "reward_margin": (chosen - rejected).mean().item(),
            "chosen_reward": chosen.mean().item(),
            "rejected_reward": rejected.mean().item(),
        }
    return loss, metrics


# ---- ILD (SPEC 4) -----------------------------------------------------------------------------------------
def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (student - teacher)^2 over the elements of counted tokens. (B, T, d) -> scalar."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} outputs differ")
    sq = (_fp32(student) - _fp32(teacher.detach())).pow(2)  # (B, T, d)
    if mask is None:
        return sq.mean()
    # Index rather than multiply by the mask: 0 * (garbage at a padded position) can be nan.
    kept = sq[_token_mask(mask, student.shape[:2], student.device)]  # (n, d)
    return kept.sum() / max(kept.numel(), 1)


def ild_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, student_mixer: torch.Tensor | None = None,
             teacher_mixer: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's ILD loss (Eq. 11): MSE between student and teacher layer outputs (B, T, d), plus the same
    term on the mixer outputs when both are given (as the official code does); each term is a mean over the
    elements of counted tokens, and the two are added."""
    if (student_mixer is None) != (teacher_mixer is None):
        raise ValueError("pass both student_mixer and teacher_mixer, or neither")
    loss = _masked_mse(student_out, teacher_out, mask)
    if student_mixer is not None:
        loss = loss + _masked_mse(student_mixer, teacher_mixer, mask)
    return loss
