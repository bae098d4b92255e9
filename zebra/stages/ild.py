"""Intermediate Layer Distillation (SPEC 4, paper Eq. 11): teacher-forced and layer-local, all layers at once, and
both candidate pools (pure MLA, pure Mamba2) from ONE teacher pass.

Run the teacher (the base model as an all-`attention` Zebra model: exactly the teacher, with the same layer API)
once; for every layer l, each student's layer l sees the teacher's input to layer l and is trained towards the
teacher's outputs there. Two modes:

  mixers  (default) only the new mixers train (MLA / Mamba2), on the teacher's normalised layer input, towards the
          teacher's attention output: MSE(mixer(x_l), attn(x_l)). MLPs, norms, embeddings and head stay as copied.
          This is the alignment stage of the most token-efficient recipes (MOHAWK stage 2, RADLADS, fla's
          hybrid distillation: mixers only, high LR); a mixer's forward/backward is all it costs per token.
  full    the paper: every parameter of every student layer trains (MLP and norms included) on
          MSE(layer output) + MSE(mixer output), as the official code.

Either way the MLA and Mamba2 candidates of every layer share the teacher's pass, which halves ILD's teacher
cost against one stage per pool (the research note's "one teacher pass" recommendation).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as ckpt

from ..errors import ZebraError
from .losses import _masked_mse

ILD_MODES = ("mixers", "full")


@torch.no_grad()
def teacher_layer_targets(teacher, batch, mla_rope_keys=()):
    """(ctx, per layer l: (input h_l, normalised input x_l, output, attention output)) of the teacher, no grad.
    ctx is the shared per-forward context (rope tables for the students' MLA keys too, masks)."""
    ids, doc_ids, mask = batch["input_ids"], batch.get("doc_ids"), batch.get("attention_mask")
    m = teacher.model
    h = m.embed_tokens(ids)
    B, T, _ = h.shape
    ctx = m.context(mask, None, B, T, 0, h.dtype, h.device, doc_ids, mixer_types={"attention", "mla", "mamba2"},
                    mla_rope_keys=mla_rope_keys)
    targets = []
    for layer in m.layers:
        out, mix, x = layer(h, ctx, None, return_input=True)  # one call: a sharded teacher layer gathers once
        targets.append((h, x, out, mix))
        h = out
    return ctx, targets


def dt_dev(model) -> str:
    return model.lm_head.weight.device.type


def _mixer(layer, x, ctx):
    """A student layer's mixer alone on a normalised input (what the decoder layer does before its residual)."""
    if layer.mixer_type == "mamba2":
        return layer.mamba(x, ctx["token_mask"], None, ctx.get("doc_ids"))
    return layer.self_attn(x, ctx["rope_mla"][layer.self_attn.rope_key], ctx["bias"], None, ctx.get("varlen"))


def make_ild_loss(teacher, students: dict, mode: str = "mixers", grad_checkpointing: bool = False):
    """loss_fn(batch) -> (sum over students and layers of ILD losses, n_tokens, metrics) for the Trainer.
    students: {"mla": pure-MLA model, "mamba2": pure-Mamba2 model} (either may be absent). Metrics: each pool's
    mean relative squared error of the mixer output, ||s - t||^2 / ||t||^2 over layers (the per-layer
    attention-output error the init comparison reports)."""
    if mode not in ILD_MODES:
        raise ZebraError(f"ild.mode must be one of {ILD_MODES}, got {mode!r}")
    keys = {layer.self_attn.rope_key for s in students.values() for layer in s.model.layers
            if layer.mixer_type == "mla"}

    def loss_fn(batch):
        mask = batch.get("attention_mask")
        ctx, targets = teacher_layer_targets(teacher, batch, keys)
        total, metrics = 0.0, {}
        for name, student in students.items():
            rel = []
            dt = student.lm_head.weight.dtype  # teacher activations in the student's dtype where no autocast casts them
            cast = (lambda t: t) if torch.is_autocast_enabled(dt_dev(student)) else (lambda t: t.to(dt))
            for layer, (h_in, x, t_out, t_mix) in zip(student.model.layers, targets):
                h_in, x = cast(h_in), cast(x)
                if mode == "mixers":
                    fn = (lambda x_, l=layer: _mixer(l, x_, ctx))
                    mix = ckpt.checkpoint(fn, x, use_reentrant=False) if grad_checkpointing else fn(x)
                    loss_l = _masked_mse(mix, t_mix, mask)
                else:
                    if grad_checkpointing:
                        out, mix = ckpt.checkpoint(layer, h_in, ctx, None, True, use_reentrant=False)
                    else:
                        out, mix = layer(h_in, ctx, None, return_mixer=True)
                    loss_l = _masked_mse(out, t_out, mask) + _masked_mse(mix, t_mix, mask)
                total = total + loss_l
                with torch.no_grad():
                    rel.append(_masked_mse(mix, t_mix, mask) / _masked_mse(t_mix, torch.zeros_like(t_mix), mask).clamp_min(1e-12))
            metrics[f"rel_err_{name}"] = torch.stack(rel).mean().item()
        return total, count(batch), metrics

    def count(batch):
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    loss_fn.count = count
    return loss_fn


def ild_parameters(students: dict, mode: str = "mixers") -> list:
    """What ILD trains, as parameter groups: the mixers of every layer (mode "mixers"), or every parameter of the
    decoder layers (mode "full"); embeddings / final norm / head (and in "mixers" mode MLPs and norms) frozen."""
    if mode not in ILD_MODES:
        raise ZebraError(f"ild.mode must be one of {ILD_MODES}, got {mode!r}")
    groups = []
    for name, student in students.items():
        for p in student.parameters():
            p.requires_grad_(False)
        params = []
        for layer in student.model.layers:
            for p in (layer.mixer if mode == "mixers" else layer).parameters():
                p.requires_grad_(True)
                params.append(p)
        groups.append({"params": params, "name": name})
    return groups
