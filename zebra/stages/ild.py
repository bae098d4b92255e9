"""Intermediate Layer Distillation (SPEC 4, paper Eq. 11): teacher-forced and layer-local, all layers at once.

Run the teacher (the base model, as an all-`attention` Zebra model: exactly the teacher, with the same
layer API), feed each student layer l the teacher's input to layer l, and minimise, summed over layers,
the MSE between the student's and the teacher's layer outputs plus the same term on the mixer outputs
(as the official code). Every parameter of every student layer trains (MLP and norms included); the
embeddings, final norm and LM head are not used here and stay frozen.

Done once for the pure-MLA and once for the pure-Mamba2 student, on the ILD share (20%) of the data.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as ckpt

from .losses import ild_loss


def teacher_layer_targets(teacher, batch):
    """Per layer l: (input h_l, output, mixer output) of the teacher, no grad. teacher: ZebraForCausalLM
    with attention layers."""
    ids, doc_ids, mask = batch["input_ids"], batch.get("doc_ids"), batch.get("attention_mask")
    m = teacher.model
    with torch.no_grad():
        h = m.embed_tokens(ids)
        B, T, _ = h.shape
        ctx = m.context(mask, None, B, T, 0, h.dtype, h.device, doc_ids)
        targets = []
        for layer in m.layers:
            out, mix = layer(h, ctx, None, return_mixer=True)
            targets.append((h, out, mix))
            h = out
    return targets


def make_ild_loss(teacher, student, grad_checkpointing: bool = False):
    """loss_fn(batch) -> (sum over layers of ILD losses, n_tokens, metrics) for the Trainer."""
    def loss_fn(batch):
        targets = teacher_layer_targets(teacher, batch)
        mask = batch.get("attention_mask")
        h0 = targets[0][0]
        B, T, _ = h0.shape
        ctx = student.model.context(mask, None, B, T, 0, h0.dtype, h0.device, batch.get("doc_ids"))
        total, per_layer = 0.0, []
        for layer, (h_in, t_out, t_mix) in zip(student.model.layers, targets):
            if grad_checkpointing:
                out, mix = ckpt.checkpoint(layer, h_in, ctx, None, True, use_reentrant=False)
            else:
                out, mix = layer(h_in, ctx, None, return_mixer=True)
            loss_l = ild_loss(out, t_out, mix, t_mix, mask)
            per_layer.append(loss_l.detach())
            total = total + loss_l
        n_tok = int(mask.sum()) if mask is not None else B * T
        return total, n_tok, {"layer_loss_mean": torch.stack(per_layer).mean().item()}
    return loss_fn


def ild_parameters(student):
    """What ILD trains: every parameter of the decoder layers; embeddings / final norm / head frozen."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for layer in student.model.layers:
        for p in layer.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params
