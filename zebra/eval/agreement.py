"""Teacher agreement on held-out text: per-token KL(teacher || student), top-1 agreement, perplexities.

This is the number each pipeline stage must push down (SPEC 7 trains on exactly this KL). Computed one
micro-batch at a time in fp32 log-space, so memory is batch x seq x vocab for one model at a time.

    from zebra.eval.agreement import agreement
    stats = agreement(teacher, student, seqs, batch_size=4)   # seqs: list of 1-D LongTensors
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pad_batch(seqs: list[torch.Tensor], pad_id: int = 0):
    """Right-pad 1-D sequences -> (ids (B, T), mask (B, T))."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def token_kl(teacher_logits, student_logits):
    """Per-position KL(p_teacher || p_student) over the vocabulary, (B, T), in fp32."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


@torch.no_grad()
def agreement(teacher, student, seqs: list[torch.Tensor], batch_size: int = 4, progress: bool = False,
              chunk_tokens: int = 4096) -> dict:
    """Mean over all real tokens of KL(teacher || student), top-1 agreement, and each model's perplexity
    on the next token. Both models must share the tokenizer. The statistics are computed where the student's
    logits are (the GPU when it runs there: copying batch x seq x vocab fp32 logits to the CPU and reducing them
    there cost tens of seconds per evaluation), in fp32, `chunk_tokens` positions at a time (bounded memory),
    and summed on the device (one synchronisation per call)."""
    dev_t, dev_s = teacher.device, student.device
    tot = torch.zeros(4, dtype=torch.float64, device=dev_s)  # kl, agree, nll_t, nll_s
    tokens = next_tokens = 0
    it = range(0, len(seqs), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="agreement", unit="batch")
    for i in it:
        ids, mask = pad_batch(seqs[i: i + batch_size])
        lt_all = teacher(ids.to(dev_t), attention_mask=mask.to(dev_t), use_cache=False).logits.to(dev_s)
        ls_all = student(ids.to(dev_s), attention_mask=mask.to(dev_s), use_cache=False).logits
        ids, mask = ids.to(dev_s), mask.to(dev_s)
        tokens += int(mask.sum())
        nm_all = (mask[:, 1:] * mask[:, :-1]).bool()  # positions whose next token is real
        next_tokens += int(nm_all.sum())
        rows = max(1, chunk_tokens // ids.shape[1])
        for r in range(0, ids.shape[0], rows):
            lt, ls = lt_all[r:r + rows].float(), ls_all[r:r + rows].float()
            m, nm, tgt = mask[r:r + rows].bool(), nm_all[r:r + rows], ids[r:r + rows, 1:]
            tot[0] += token_kl(lt, ls)[m].sum(dtype=torch.float64)
            tot[1] += (lt.argmax(-1) == ls.argmax(-1))[m].sum()
            for k, lg in ((2, lt), (3, ls)):
                nll = F.cross_entropy(lg[:, :-1].transpose(1, 2), tgt, reduction="none")
                tot[k] += nll[nm].sum(dtype=torch.float64)
            del lt, ls
        del lt_all, ls_all
    kl, agree, nll_t, nll_s = tot.tolist()
    tot = {"kl": kl, "agree": agree, "nll_t": nll_t, "nll_s": nll_s, "tokens": tokens, "next_tokens": next_tokens}
    n, nn_ = max(tot["tokens"], 1), max(tot["next_tokens"], 1)
    return {
        "kl": tot["kl"] / n,
        "top1_agreement": tot["agree"] / n,
        "ppl_teacher": math.exp(tot["nll_t"] / nn_),
        "ppl_student": math.exp(tot["nll_s"] / nn_),
        "tokens": tot["tokens"],
        "sequences": len(seqs),
    }
