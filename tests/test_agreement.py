"""zebra.eval.agreement: KL(teacher || student), top-1 agreement and perplexities over padded batches, computed on
the student's device in chunks, equal a per-sequence reference without padding (F.kl_div, argmax, cross-entropy)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from zebra.eval.agreement import agreement


def tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("batch_size,chunk_tokens", [(3, 4096), (4, 10), (2, 1)])
def test_agreement_equals_a_per_sequence_reference(batch_size, chunk_tokens):
    teacher, student = tiny(0), tiny(1)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (9, 17, 4, 12, 1, 15, 8)]
    kl = agree = nll_t = nll_s = 0.0
    tokens = next_tokens = 0
    with torch.no_grad():
        for s in seqs:
            lt, ls = teacher(s[None]).logits[0].double(), student(s[None]).logits[0].double()
            kl += F.kl_div(ls.log_softmax(-1), lt.log_softmax(-1), log_target=True, reduction="sum").item()
            agree += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
            tokens += len(s)
            if len(s) > 1:
                nll_t += F.cross_entropy(lt[:-1], s[1:], reduction="sum").item()
                nll_s += F.cross_entropy(ls[:-1], s[1:], reduction="sum").item()
                next_tokens += len(s) - 1
    out = agreement(teacher, student, seqs, batch_size=batch_size, chunk_tokens=chunk_tokens)
    assert out["tokens"] == tokens and out["sequences"] == len(seqs)
    assert out["kl"] == pytest.approx(kl / tokens, rel=1e-4)
    assert out["top1_agreement"] == pytest.approx(agree / tokens)
    assert out["ppl_teacher"] == pytest.approx(math.exp(nll_t / next_tokens), rel=1e-4)
    assert out["ppl_student"] == pytest.approx(math.exp(nll_s / next_tokens), rel=1e-4)
    assert out["kl"] > 0.01  # two different models: the test can fail
