"""Pipeline stages on tiny seeded models: ILD loss decreases for MLA and Mamba2 students, compose takes each
layer whole from the right source, the sensitivity shortcut equals full forwards of the swapped models, and
end-to-end distillation lowers the KL."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zebra import ZebraForCausalLM
from zebra.convert.build import apply_weights, map_weights
from zebra.convert.layout import student_config_from_teacher
from zebra.eval.agreement import token_kl
from zebra.stages.compose import compose
from zebra.stages.distill import make_distill_loss
from zebra.stages.ild import ild_parameters, make_ild_loss
from zebra.stages.sensitivity import layer_sensitivity
from zebra.stages.trainer import Trainer, TrainConfig

V = 61


def hf_teacher():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def zebra_from(teacher, mla=(), attention=()):
    cfg = student_config_from_teacher(teacher.config.to_dict(), list(mla), list(attention), kv_rank=8, rope_dim=4,
                                      nope_dim=8)
    torch.manual_seed(1)
    m = ZebraForCausalLM(cfg)
    mapped, default, _, _ = map_weights(cfg, teacher.state_dict(), dict(m.named_parameters()))
    apply_weights(m, mapped, default)
    return m.eval()


class Batches:
    """A fixed set of random packed batches, resumable like PackedStream."""

    def __init__(self, n=40, B=2, T=24):
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, V, (B, T), generator=g) for _ in range(n)]
        self.tokens_per_batch, self.pos = B * T, 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]

    def __iter__(self):
        while self.pos < len(self.data):
            ids = self.data[self.pos]
            self.pos += 1
            doc = (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand_as(ids)  # two documents a row
            yield {"input_ids": ids, "doc_ids": doc, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def losses_of(tmp_path, name):
    import json

    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r and "event" not in r]


@pytest.mark.parametrize("mode", ["mixers", "full"])
def test_ild_loss_decreases_for_both_pools_from_one_teacher_pass(tmp_path, mode):
    """Teacher-forced layer-local ILD of the MLA and the Mamba2 pool together (one teacher forward per batch) lowers
    the loss within a few dozen steps. Mode "mixers" trains only the mixers (MLPs / norms stay the teacher's);
    mode "full" every layer parameter; embeddings and head stay frozen in both."""
    hf = hf_teacher()
    teacher = zebra_from(hf, attention=range(3))
    students = {"mla": zebra_from(hf, mla=range(3)), "mamba2": zebra_from(hf)}
    mlp_before = students["mamba2"].model.layers[1].mlp.up_proj.weight.detach().clone()
    calls = []
    real_forward = teacher.model.layers[0].forward
    teacher.model.layers[0].forward = lambda *a, **k: (calls.append(1), real_forward(*a, **k))[1]
    tr = Trainer(torch.nn.ModuleDict(students), ild_parameters(students, mode), make_ild_loss(teacher, students, mode), Batches(n=24),
                 TrainConfig(tokens=24 * 48, lr=3e-3, ckpt_every=100), tmp_path, "ild", torch.device("cpu"))
    tr.fit()
    assert len(calls) == 24  # one teacher pass per batch serves both pools
    losses = losses_of(tmp_path, "ild")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    for s in students.values():
        assert s.model.embed_tokens.weight.grad is None  # frozen outside the layers
    mlp_after = students["mamba2"].model.layers[1].mlp.up_proj.weight
    assert torch.equal(mlp_after, mlp_before) == (mode == "mixers")


def test_ild_mixer_loss_is_the_mse_of_the_mixer_outputs():
    """Mode "mixers": the loss is sum over pools and layers of mean((mixer(x_l) - attn(x_l))^2), x_l the teacher's
    normalised input to layer l: recomputed here from the teacher's layers by hand."""
    hf = hf_teacher()
    teacher = zebra_from(hf, attention=range(3))
    students = {"mamba2": zebra_from(hf)}
    batch = next(iter(Batches(n=1)))
    loss, n, metrics = make_ild_loss(teacher, students, "mixers")(batch)
    ids = batch["input_ids"]
    with torch.no_grad():
        hs = teacher(ids, doc_ids=batch["doc_ids"], output_hidden_states=True).hidden_states
        want = 0.0
        ctx = teacher.model.context(None, None, *ids.shape, 0, torch.float32, ids.device, batch["doc_ids"])
        for i, (tl, sl) in enumerate(zip(teacher.model.layers, students["mamba2"].model.layers)):
            x = tl.input_layernorm(hs[i])
            t_mix = tl.self_attn(x, ctx["rope_attention"], ctx["bias"])
            s_mix = sl.mamba(x, None, None, batch["doc_ids"])
            want += ((s_mix - t_mix) ** 2).mean().item()
    assert n == ids.numel() and loss.item() == pytest.approx(want, rel=1e-5)
    assert 0 < metrics["rel_err_mamba2"]


def test_compose_takes_whole_layers_from_the_right_model():
    """Layers in the MLA list come whole (mixer, norms, MLP) from the MLA model, the rest from Mamba2."""
    hf = hf_teacher()
    mla, mamba = zebra_from(hf, mla=range(3)), zebra_from(hf)
    with torch.no_grad():  # make the MLPs differ so the source is identifiable
        for p in mla.model.layers[1].mlp.parameters():
            p.add_(1.0)
    hybrid = compose(mla, mamba, [1])
    assert hybrid.config.mixer_types == ["mamba2", "mla", "mamba2"]
    torch.testing.assert_close(hybrid.model.layers[1].mlp.up_proj.weight, mla.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(hybrid.model.layers[0].mamba.A_log, mamba.model.layers[0].mamba.A_log)
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():  # the composed model computes what its layers compute
        ref = mamba.model.embed_tokens(ids)
        ctx = hybrid.model.context(None, None, 1, 9, 0, ref.dtype, ref.device)
        for i, layer in enumerate([mamba.model.layers[0], mla.model.layers[1], mamba.model.layers[2]]):
            ref = layer(ref, ctx)
        torch.testing.assert_close(hybrid(ids, use_cache=False).logits, mamba.lm_head(mamba.model.norm(ref)))


def test_sensitivity_equals_full_forwards_of_swapped_models():
    """s_i from the cached-prefix shortcut == KL_0 - KL_i computed from full forwards of each composed model."""
    hf = hf_teacher()
    teacher = zebra_from(hf, attention=range(3))
    mla, mamba = zebra_from(hf, mla=range(3)), zebra_from(hf)
    seqs = [torch.randint(0, V, (n,)) for n in (12, 9, 15)]
    res = layer_sensitivity(teacher, mamba, mla, seqs, batch_size=2, progress=False)

    def kl(model):
        tot, n = 0.0, 0
        with torch.no_grad():
            for s in seqs:
                tot += token_kl(teacher(s[None]).logits, model(s[None], use_cache=False).logits).sum().item()
                n += len(s)
        return tot / n

    kl0 = kl(mamba)
    assert abs(res["kl_all_mamba2"] - kl0) < 1e-5
    for i in range(3):
        assert abs(res["scores"][i] - (kl0 - kl(compose(mla, mamba, [i])))) < 1e-5


def test_distillation_lowers_kl(tmp_path):
    """A few steps of forward-KL distillation lower the student's KL to the teacher on the training batches."""
    hf = hf_teacher()
    teacher = zebra_from(hf, attention=range(3))
    student = compose(zebra_from(hf, mla=range(3)), zebra_from(hf), [0])
    loss_fn = make_distill_loss(teacher, student, chunk_tokens=16)
    tr = Trainer(student, student.parameters(), loss_fn, Batches(n=20), TrainConfig(tokens=20 * 48, lr=3e-3, ckpt_every=100),
                 tmp_path, "distill", torch.device("cpu"))
    tr.fit()
    losses = losses_of(tmp_path, "distill")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_mamba2_norm_calibration_is_the_least_squares_scale():
    """calibrate_mamba2_norms sets norm.weight so that w * y (y: the normalised signal) is the per-channel least-
    squares fit of the teacher's attention output before o_proj: the calibrated weights solve the normal
    equations, and the mixer output's error against the teacher's attention output drops."""
    from zebra.convert.calibrate import calibrate_mamba2_norms
    from zebra.stages.ild import _mixer, teacher_layer_targets

    hf = hf_teacher()
    teacher = zebra_from(hf, attention=range(3))
    student = zebra_from(hf)
    batches = [next(iter(Batches(n=2)))]

    def errors():
        ctx, targets = teacher_layer_targets(teacher, batches[0])
        with torch.no_grad():
            return [((_mixer(layer, x, ctx) - t) ** 2).mean().item()
                    for layer, (_, x, _, t) in zip(student.model.layers, targets)]

    before = errors()
    res = calibrate_mamba2_norms(teacher, student, batches)
    after = errors()
    assert res["layers"] == [0, 1, 2] and res["tokens"] == batches[0]["input_ids"].numel()
    assert sum(after) < sum(before)
    # normal equations of layer 1: sum_t (o_c - w_c y_c) y_c = 0 for every channel
    cap = {}
    t_attn, s_norm = teacher.model.layers[1].self_attn.o_proj, student.model.layers[1].mamba.norm
    h1 = t_attn.register_forward_hook(lambda m, a, o: cap.__setitem__("o", a[0]))
    w = s_norm.weight.detach().clone()
    with torch.no_grad():
        s_norm.weight.fill_(1.0)
        h2 = s_norm.register_forward_hook(lambda m, a, o: cap.__setitem__("y", o))
        ctx, targets = teacher_layer_targets(teacher, batches[0])
        student.model.layers[1].mamba(targets[1][1], None, None, batches[0]["doc_ids"])
    h1.remove(), h2.remove()
    o, y = cap["o"].reshape(-1, w.numel()), cap["y"].reshape(-1, w.numel())
    grad = ((o - w * y) * y).sum(0)
    assert grad.abs().max() < 1e-3 * (y * y).sum(0).max()


class _Tok:
    """The little of a tokenizer encode_pair needs: one id per character, a chat template that is the user text."""
    pad_token_id, eos_token_id = 0, 1

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return msgs[-1]["content"] + ">"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 50 for c in text]}


@pytest.mark.parametrize("n_pairs", [8, 5])
def test_dpo_pairs_are_split_across_ranks_like_one_rank_with_the_global_batch(n_pairs):
    """PairStream under 2 ranks: at every step the two ranks' rows together are the 1-rank batch of 2 x batch_size
    (each pair once); a last global batch that the pairs do not fill is padded from the start of the order, so both
    ranks step equally; resume by position."""
    from zebra.stages.dpo import PairStream

    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"good {i}", "rejected": f"bad {i}"}
             for i in range(n_pairs)]
    one = list(PairStream(_Tok(), pairs, batch_size=4, max_len=64, seed=3, rank=0, world=1))
    ranks = [list(PairStream(_Tok(), pairs, batch_size=2, max_len=64, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == -(-n_pairs // 4)

    def rows(b):  # the chosen sequences of a batch, as tuples
        n = b["input_ids"].shape[0] // 2
        return [tuple(x[m.bool()].tolist()) for x, m in zip(b["input_ids"][:n], b["attention_mask"][:n])]

    seen = []
    for step, b in enumerate(one):
        both = rows(ranks[0][step]) + rows(ranks[1][step])
        assert both[:len(rows(b))] == rows(b)
        seen += both
    assert len(set(seen)) == n_pairs and len(seen) == len(one) * 4  # every pair; padding repeats, never drops
    s = PairStream(_Tok(), pairs, batch_size=2, max_len=64, seed=3, rank=1, world=2)
    s.load_state_dict({"pos": 1})
    assert [rows(b) for b in s] == [rows(b) for b in ranks[1][1:]]
    with pytest.raises(Exception, match="no usable pairs"):
        PairStream(_Tok(), [], batch_size=2, max_len=64)
