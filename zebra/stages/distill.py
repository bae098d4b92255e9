"""End-to-end knowledge distillation (SPEC 7, paper Eq. 13): forward KL from the teacher, per token.

    L = mean over counted tokens t of KL[ p_teacher(. | y_<t) || p_student(. | y_<t) ]

The teacher may be larger than the base model (same tokenizer) and runs as an all-`attention` Zebra model
(exactly the teacher; it understands packed documents). Only the tokens that count enter the mean (default:
assistant tokens, the packer's loss_mask), normalised per token, not per batch. The KL is computed from
final hidden states a chunk of tokens at a time, its gradient in the same pass (zebra.ops.fused_kl), so
full-vocabulary fp32 logits of both models never exist for the whole batch at once.
"""

from __future__ import annotations

import torch

from .losses import chunked_kl_from_hidden


def _targets(batch) -> torch.Tensor:
    """(B, T) bool: position t counts when it predicts a target t+1 (loss_mask marks targets, 0 at document starts)."""
    lm = batch["loss_mask"]
    mask = torch.zeros_like(lm, dtype=torch.bool)
    mask[:, :-1] = lm[:, 1:].bool()
    return mask


def make_distill_loss(teacher, student, chunk_tokens: int = 4096):
    """loss_fn(batch) -> (mean KL over the batch's counted positions, their number, metrics), with
    loss_fn.count(batch) for the Trainer's per-token weighting of micro-batches."""
    def loss_fn(batch):
        ids, doc_ids = batch["input_ids"], batch.get("doc_ids")
        mask = _targets(batch)
        with torch.no_grad():
            t_h = teacher.model(ids, doc_ids=doc_ids).last_hidden_state
        s_h = student.model(ids, doc_ids=doc_ids).last_hidden_state
        loss, n_tok = chunked_kl_from_hidden(s_h, student.lm_head, t_h, teacher.lm_head, mask, chunk_tokens=chunk_tokens)
        return loss, n_tok, {"kl": loss.item()}

    loss_fn.count = lambda batch: int(batch["loss_mask"][:, 1:].sum())
    return loss_fn


def distill_parameters(student, lr: float, lr_other: float | None = None) -> list[dict]:
    """Parameter groups: the mixers (new: MLA / Mamba2, at `lr`) and everything copied from the teacher (MLPs,
    norms, embeddings / head, and kept attention layers, at `lr_other`, default `lr`). Separate rates follow
    fla's hybrid distillation (mixers 1e-4, the rest 7e-6): a copied weight needs far smaller steps."""
    for p in student.parameters():
        p.requires_grad_(True)
    mixers = {id(p) for layer in student.model.layers if layer.mixer_type != "attention" for p in layer.mixer.parameters()}
    new = [p for p in student.parameters() if id(p) in mixers]
    rest = [p for p in student.parameters() if id(p) not in mixers]
    return [{"params": new, "lr": lr, "name": "mixers"},
            {"params": rest, "lr": lr if lr_other is None else lr_other, "name": "copied"}]
