"""Layer sensitivity (SPEC 5, paper Eq. 12) from the ILD-refined pure-Mamba2 and pure-MLA models.

    KL_0 = KL[p_teacher || p_all-Mamba2];  KL_i = the same with only layer i replaced by its MLA layer
    s_i  = KL_0 - KL_i      (higher: layer i matters more as MLA)

KL is the mean per-token forward KL over the held-out sequences (the paper sums over tokens: the same
ranking up to a constant). The all-Mamba2 hidden states are computed once per batch and each variant i
restarts from layer i's input, so the L variants cost about half of L full forwards.
"""

from __future__ import annotations

import torch

from ..eval.agreement import pad_batch, token_kl


@torch.no_grad()
def layer_sensitivity(teacher, mamba_model, mla_model, seqs: list[torch.Tensor], batch_size: int = 4,
                      progress: bool = True) -> dict:
    m = mamba_model.model
    L = len(m.layers)
    dev = next(mamba_model.parameters()).device
    kl0, kli, ntok = 0.0, [0.0] * L, 0
    batches = range(0, len(seqs), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="sensitivity", unit="batch")
    for b in batches:
        ids, mask = pad_batch(seqs[b:b + batch_size])
        ids, mask = ids.to(dev), mask.to(dev)
        t_logits = teacher(ids, attention_mask=mask, use_cache=False).logits.float()
        keep = mask.bool()
        ntok += int(keep.sum())

        h = m.embed_tokens(ids)
        B, T, _ = h.shape
        mla_layers = mla_model.model.layers
        keys = {layer.self_attn.rope_key for layer in mla_layers}
        ctx = m.context(mask, None, B, T, 0, h.dtype, h.device, mixer_types={"mla", "mamba2"}, mla_rope_keys=keys)
        inputs = []
        for layer in m.layers:  # all-Mamba2 pass, remembering every layer's input
            inputs.append(h)
            h = layer(h, ctx)
        kl0 += token_kl(t_logits, mamba_model.lm_head(m.norm(h)).float())[keep].sum().item()
        for i in range(L):
            x = mla_layers[i](inputs[i], ctx)
            for j in range(i + 1, L):
                x = m.layers[j](x, ctx)
            kli[i] += token_kl(t_logits, mamba_model.lm_head(m.norm(x)).float())[keep].sum().item()
    kl0 /= max(ntok, 1)
    kli = [k / max(ntok, 1) for k in kli]
    return {"scores": [kl0 - k for k in kli], "kl_all_mamba2": kl0, "kl_with_mla": kli, "num_tokens": ntok,
            "num_sequences": len(seqs)}
