"""End-to-end knowledge distillation (SPEC 7, paper Eq. 13): forward KL from the teacher, per token.

    L = mean over counted tokens t of KL[ p_teacher(. | y_<t) || p_student(. | y_<t) ]

The teacher may be larger than the base model (same tokenizer) and runs as an all-`attention` Zebra model
(exactly the teacher; it understands packed documents). Only the tokens that count enter the mean (default:
assistant tokens, the packer's loss_mask), normalised per token, not per batch. The KL is computed from
final hidden states a chunk of tokens at a time with recomputation in backward, so full-vocabulary fp32
logits of both models never exist for the whole batch at once.
"""

from __future__ import annotations

import torch

from .losses import chunked_kl_from_hidden


def make_distill_loss(teacher, student, chunk_tokens: int = 2048):
    def loss_fn(batch):
        ids, doc_ids = batch["input_ids"], batch.get("doc_ids")
        # loss_mask marks target tokens (0 at document starts): position t counts when it predicts a target t+1.
        mask = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
        mask[:, :-1] = batch["loss_mask"][:, 1:].bool()
        with torch.no_grad():
            t_h = teacher.model(ids, doc_ids=doc_ids).last_hidden_state
        s_h = student.model(ids, doc_ids=doc_ids).last_hidden_state
        loss, n_tok = chunked_kl_from_hidden(s_h, student.lm_head, t_h, teacher.lm_head, mask, chunk_tokens=chunk_tokens)
        return loss, n_tok, {"kl": loss.item()}
    return loss_fn
