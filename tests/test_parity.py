"""Student vs teacher, through the converter's own weight map (tiny seeded fp32 teachers built in code):
an all-`attention` student IS the teacher (Llama with llama3 RoPE scaling, Qwen2 with q/k/v biases, Qwen3
with q/k norms, Mistral), and a Mamba2 layer initialised from attention, with conv, decay, gate, D and norm
neutralised and dt = 1, IS causal linear attention over the teacher's Q, K, V."""

import math

import pytest
import torch
import torch.nn as nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from zebra import ZebraForCausalLM
from zebra.convert.build import apply_weights, map_weights
from zebra.convert.layout import student_config_from_teacher

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

TEACHERS = {
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=True)),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-qknorm": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
}


def make_teacher(kind, seed=0):
    cfg_cls, model_cls, extra = TEACHERS[kind]
    torch.manual_seed(seed)
    teacher = model_cls(cfg_cls(**COMMON, **extra)).eval()
    with torch.no_grad():  # random biases / norm weights so they are not trivially zero / one
        for name, p in teacher.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return teacher


def student_from(teacher, mla=(), attention=(), **kw):
    cfg = student_config_from_teacher(teacher.config.to_dict(), list(mla), list(attention), **kw)
    torch.manual_seed(1)
    student = ZebraForCausalLM(cfg).eval()
    mapped, default, _, _ = map_weights(cfg, teacher.state_dict(), dict(student.named_parameters()))
    apply_weights(student, mapped, default)
    return student


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_all_attention_student_equals_teacher(kind):
    """With every layer kept as `attention`, student logits == teacher logits (fp32), and greedy decoding
    through the hybrid cache produces the teacher's tokens."""
    teacher = make_teacher(kind)
    student = student_from(teacher, attention=range(3))
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))  # llama3 scaling changes inv_freq at every position
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=2e-5, rtol=1e-4)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert student.generate(ids[:, :10], **kw).tolist() == teacher.generate(ids[:, :10], **kw).tolist()


class _PassThrough(nn.Module):
    def forward(self, y, z=None):
        return y


def test_neutralised_mamba2_equals_causal_linear_attention():
    """Mamba2 from attention (x <- W_V, B <- W_K, C <- W_Q, out <- W_O) with identity conv and no activation,
    A = 0 (no decay), dt = 1, D = 0 and no gate / norm computes o_proj(sum_{s<=t} (q_t . k_s) v_s) per head,
    with K/V shared over each GQA group: attention without softmax (and without RoPE)."""
    teacher = make_teacher("llama3-rope")
    student = student_from(teacher)  # every layer mamba2
    m = student.model.layers[0].mamba
    with torch.no_grad():
        m.conv1d.weight.zero_()
        m.conv1d.weight[:, 0, -1] = 1.0  # the current token only
        m.conv1d.bias.zero_()
        m.A_log.fill_(-math.inf)  # A = -exp(-inf) = 0: no decay
        m.in_proj.weight[-m.n_heads:] = 0.0  # dt rows
        m.dt_bias.fill_(math.log(math.e - 1))  # softplus(0 + dt_bias) = 1
        m.D.zero_()
    m.act, m.norm = nn.Identity(), _PassThrough()

    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    attn = teacher.model.layers[0].self_attn
    B, T, H, G, D = 2, 9, 4, 2, 16
    with torch.no_grad():
        out = m(h)
        q = attn.q_proj(h).view(B, T, H, D)
        k = attn.k_proj(h).view(B, T, G, D).repeat_interleave(H // G, dim=2)
        v = attn.v_proj(h).view(B, T, G, D).repeat_interleave(H // G, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k).tril()  # causal, no softmax, no scale
        ref = attn.o_proj(torch.einsum("bhts,bshd->bthd", scores, v).reshape(B, T, H * D))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_full_rank_mla_keeps_teacher_values_and_nope_keys():
    """At full KV rank the SVD-initialised MLA reproduces the teacher's V and the nope part of K exactly
    (only the RoPE part differs: SPEC 3.1's caveat), so its output is finite and close to the teacher's."""
    teacher = make_teacher("llama3-rope")
    student = student_from(teacher, mla=range(3), kv_rank=64, rope_dim=8, nope_dim=8)
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    mla, attn = student.model.layers[0].self_attn, teacher.model.layers[0].self_attn
    with torch.no_grad():
        c = mla.kv_a_proj_with_mqa(h)[..., :64]
        kv = mla.kv_b_proj(c).view(1, 5, 2, 8 + 16)
        k_t = attn.k_proj(h).view(1, 5, 2, 16)
        torch.testing.assert_close(kv[..., 8:], attn.v_proj(h).view(1, 5, 2, 16), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv[..., :8], k_t[..., :8], atol=1e-5, rtol=1e-4)
