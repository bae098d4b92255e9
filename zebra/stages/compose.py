"""Compose the hybrid (SPEC 1 step 4): MLA layers from the ILD-refined pure-MLA model, every other layer
from the ILD-refined pure-Mamba2 model. A layer moves whole (mixer, norms and MLP, all refined together
by ILD); embeddings, final norm and LM head come from the Mamba2 model (ILD does not touch them).
Optionally some layers keep the teacher's own attention (MambaInLlama-style baselines), taken whole from an
all-attention model of the teacher.

    hybrid = compose(mla_model, mamba_model, [0, 6, 12, 18, 24, 29])
    baseline = compose(mla_model, mamba_model, [], attention_model=teacher, attention_layers=range(0, 30, 2))
"""

from __future__ import annotations

import copy

import torch

from ..errors import ZebraError


def compose(mla_model, mamba_model, mla_layers: list[int], attention_model=None, attention_layers=()):
    from ..model.hybrid import ZebraForCausalLM

    L = mamba_model.config.num_hidden_layers
    attention_layers = sorted(int(i) for i in attention_layers)
    if attention_layers:
        if attention_model is None or not all(t == "attention" for t in attention_model.config.mixer_types):
            raise ZebraError("attention layers need the all-attention teacher model to take them from")
        if set(attention_layers) & {int(i) for i in mla_layers}:
            raise ZebraError(f"layers {sorted(set(attention_layers) & set(mla_layers))} are both MLA and attention")
    if mla_model.config.num_hidden_layers != L:
        raise ZebraError(f"the MLA model has {mla_model.config.num_hidden_layers} layers, the Mamba2 model {L}")
    if not all(t == "mla" for t in mla_model.config.mixer_types):
        raise ZebraError("the MLA source model must be all-MLA")
    if not all(t == "mamba2" for t in mamba_model.config.mixer_types):
        raise ZebraError("the Mamba2 source model must be all-Mamba2")
    bad = [i for i in list(mla_layers) + attention_layers if not 0 <= i < L]
    if bad or len(set(mla_layers)) != len(mla_layers):
        raise ZebraError(f"MLA layer list {mla_layers} must hold distinct indices in [0, {L - 1}]")
    chosen, kept = set(mla_layers), set(attention_layers)
    cfg = copy.deepcopy(mamba_model.config)
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "mla_rope_pairs"):
        setattr(cfg, key, getattr(mla_model.config, key))
    cfg.mamba_z_bias = getattr(mamba_model.config, "mamba_z_bias", False)
    cfg.mixer_types = ["mla" if i in chosen else "attention" if i in kept else "mamba2" for i in range(L)]
    if cfg.mla_rope_pairs:
        cfg.mla_rope_pairs = {k: v for k, v in cfg.mla_rope_pairs.items() if int(k) in chosen} or None
    cfg.validate()
    with torch.device("meta"):
        hybrid = ZebraForCausalLM(cfg)
    src_mla, src_mamba = mla_model.state_dict(), mamba_model.state_dict()
    src_attn = attention_model.state_dict() if kept else {}
    state = {}
    for name in hybrid.state_dict():
        src = src_mamba
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            src = src_mla if i in chosen else src_attn if i in kept else src_mamba
        state[name] = src[name].to(src_mamba["model.norm.weight"].dtype)
    hybrid.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        hybrid.tie_weights()
    return hybrid.eval()
