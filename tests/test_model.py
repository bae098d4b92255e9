"""Invariants of the hybrid model on tiny seeded fp32 configs: cached decode == one full forward for every
mixer type, left padding changes nothing, MLA absorbed == decompressed, Mamba2 chunked scan == recurrence,
save / AutoModelForCausalLM round trip."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import zebra  # noqa: F401  (registers the Auto classes)
from zebra import ZebraConfig, ZebraForCausalLM
from zebra.model.cache import ZebraCache
from zebra.ops import ssd

LAYOUTS = {
    "attention": ["attention"] * 3,
    "mla": ["mla"] * 3,
    "mamba2": ["mamba2"] * 3,
    "hybrid": ["mla", "mamba2", "attention", "mamba2"],
}


def tiny_config(mixers, **kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(mixers),
                num_attention_heads=4, num_key_value_heads=2, mixer_types=mixers, kv_lora_rank=12,
                qk_rope_head_dim=8, mamba_chunk_size=4, rope_config={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return ZebraConfig(**base)


def tiny_model(mixers, seed=0, **kw):
    torch.manual_seed(seed)
    model = ZebraForCausalLM(tiny_config(mixers, **kw)).eval()
    with torch.no_grad():  # larger A/dt than the default init so the SSM state matters over a few tokens
        for layer in model.model.layers:
            if layer.mixer_type == "mamba2":
                layer.mamba.dt_bias.normal_(0, 1)
                layer.mamba.A_log.normal_(0, 0.5)
                if layer.mamba.z_bias is not None:
                    layer.mamba.z_bias.normal_(0, 1)
    return model


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_token_by_token_decode_equals_full_forward(layout):
    """Feeding tokens one at a time through the cache gives the logits of one full forward."""
    model = tiny_model(LAYOUTS[layout])
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = ZebraCache(model.config)
        steps = [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def prefill_then_steps(model, ids, n_prefill):
    """Logits of a cached prefill of the first n_prefill tokens, then one token per step through the same cache."""
    cache = ZebraCache(model.config)
    pre = model(ids[:, :n_prefill], past_key_values=cache).logits
    steps = [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(n_prefill, ids.shape[1])]
    return torch.cat([pre] + steps, 1)


def test_gate_bias_decode_equals_full_forward_and_changes_the_output():
    """Mamba2 with a gate bias (mamba_z_bias, the constant-gate init): cached decode == full forward, and the bias
    is actually applied (zeroing it changes the logits)."""
    model = tiny_model(LAYOUTS["hybrid"], mamba_z_bias=True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        torch.testing.assert_close(prefill_then_steps(model, ids, 4), full, atol=1e-5, rtol=1e-4)
        for layer in model.model.layers:
            if layer.mixer_type == "mamba2":
                layer.mamba.z_bias.zero_()
        assert not torch.allclose(model(ids, use_cache=False).logits, full, atol=1e-3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prefill_then_decode_equals_full_forward(layout):
    """A prefill of 7 tokens (crossing a Mamba2 chunk boundary) then single steps == one full forward."""
    model = tiny_model(LAYOUTS[layout])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cached = prefill_then_steps(model, ids, 7)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_left_padding_does_not_change_outputs(layout):
    """A left-padded row gives the same logits at its real positions (prefill and cached decode) as the
    same sequence alone: padding leaks neither into attention nor into the Mamba2 conv / SSM state."""
    model = tiny_model(LAYOUTS[layout])
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(0, 97, (1, 10), generator=g), torch.randint(0, 97, (1, 6), generator=g)
    pad = 4
    ids = torch.cat([long, torch.cat([torch.full((1, pad), 5), short], 1)])  # pad token id is arbitrary
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    extra = torch.randint(0, 97, (2, 3), generator=g)
    with torch.no_grad():
        cache = ZebraCache(model.config)
        out = [model(ids, attention_mask=mask, past_key_values=cache).logits]
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out.append(model(extra[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
        batched = torch.cat(out, 1)
        alone_short = model(torch.cat([short, extra[1:]], 1), use_cache=False).logits
        alone_long = model(torch.cat([long, extra[:1]], 1), use_cache=False).logits
    torch.testing.assert_close(batched[1, pad:], alone_short[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[0], alone_long[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["hybrid", "mla", "mamba2"])
def test_generate_left_padded_batch_matches_single(layout):
    """generate() on a left-padded batch gives each row the greedy tokens it gets alone, and sampling runs."""
    model = tiny_model(LAYOUTS[layout])
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(1, 97, (1, 8), generator=g), torch.randint(1, 97, (1, 5), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    both = model.generate(ids, attention_mask=mask, **kw)
    alone_a = model.generate(a, attention_mask=torch.ones_like(a), **kw)
    alone_b = model.generate(b, attention_mask=torch.ones_like(b), **kw)
    assert both[0, 8:].tolist() == alone_a[0, 8:].tolist()
    assert both[1, 8:].tolist() == alone_b[0, 5:].tolist()
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (2, 12)


def test_mla_absorbed_equals_decompressed():
    """The absorbed MLA (attention over the latent cache) equals the decompressed one, with q/kv biases
    and a query latent, for prefill and for cached decode."""
    model = tiny_model(["mla", "mla"], attention_bias=True, q_lora_rank=24)
    with torch.no_grad():
        for p in model.parameters():  # biases start at zero: make them matter
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    outs = {}
    for mode in ("always", "never"):
        for layer in model.model.layers:
            layer.self_attn.absorb = mode
        with torch.no_grad():
            cache = ZebraCache(model.config)
            pre = model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache).logits
            dec = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits
                   for t in range(6, 9)]
        outs[mode] = torch.cat([pre] + dec, 1)
    torch.testing.assert_close(outs["always"], outs["never"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T,chunk", [(1, 4), (16, 4), (37, 8), (50, 64)])
def test_ssd_chunked_equals_naive_recurrence(T, chunk):
    """The chunked SSD scan equals the token-by-token recurrence (outputs and final state), from a
    non-zero initial state, for lengths that are and are not multiples of the chunk."""
    g = torch.Generator().manual_seed(T)
    B, H, P, N = 2, 3, 4, 5
    x, Bm, Cm = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (P, N, N))
    dt = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2
    s0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    y1, s1 = ssd.ssd_naive(x, dt, A, Bm, Cm, s0)
    y2, s2 = ssd.ssd_chunked(x, dt, A, Bm, Cm, s0, chunk_size=chunk)
    torch.testing.assert_close(y2, y1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s1, atol=1e-4, rtol=1e-4)
    # and against a hand-unrolled first step: state_1 = exp(dt A) s0 + dt x B^T
    first = torch.exp(dt[:, 0] * A)[..., None, None] * s0 + dt[:, 0, :, None, None] * x[:, 0, :, :, None] * Bm[:, 0, :, None, :]
    torch.testing.assert_close(y1[:, 0].float(), torch.einsum("bhpn,bhn->bhp", first, Cm[:, 0]).float())


@pytest.mark.parametrize("layout", ["hybrid"])
def test_save_and_auto_load_round_trip(tmp_path, layout):
    """save_pretrained + AutoModelForCausalLM.from_pretrained (after `import zebra`) gives identical logits."""
    model = tiny_model(LAYOUTS[layout], tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ZebraForCausalLM
    assert loaded.config.mixer_types == model.config.mixer_types
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_config_rejects_bad_layouts():
    """Inconsistent configs fail at construction with a message naming the problem."""
    with pytest.raises(ValueError, match="mixer_types has 2 entries"):
        tiny_config(["mla", "mla"], num_hidden_layers=3)
    with pytest.raises(ValueError, match="unknown mixer"):
        tiny_config(["mla", "gru"])
    with pytest.raises(ValueError, match="rope dim"):
        tiny_config(["mla"], qk_rope_head_dim=7)
    with pytest.raises(ValueError, match="unsupported RoPE"):
        ZebraForCausalLM(tiny_config(["attention"], rope_config={"rope_type": "yarn", "rope_theta": 1e4}))


def test_kv_summary_counts_values_per_layer_type():
    """KV accounting: attention 2*n_kv*d_h, MLA r_kv + d_r, Mamba2 0 (hand-computed for the tiny config)."""
    cfg = tiny_config(["mla", "mamba2", "attention", "mamba2"])
    s = cfg.kv_summary()
    assert s["teacher_per_token"] == 4 * 2 * 2 * 16
    assert s["student_per_token"] == (12 + 8) + 0 + 2 * 2 * 16 + 0
    assert s["kv_percent"] == pytest.approx(100 * 84 / 256)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_documents_equal_separate_forwards(layout):
    """A row packing three documents (doc_ids) gives each document exactly the logits it gets alone:
    no attention across documents, Mamba2 conv window and SSM state reset at each boundary, positions restart."""
    model = tiny_model(LAYOUTS[layout])
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 9, 7)]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids).logits[0]
        alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def test_ssd_chunked_with_documents_equals_naive():
    """With doc_ids the chunked scan resets the state at boundaries exactly like the recurrence, including
    boundaries inside a chunk, at a chunk edge, and a non-zero initial state for the first document."""
    g = torch.Generator().manual_seed(8)
    B, T, H, P, N = 2, 29, 3, 4, 5
    x, Bm, Cm = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (P, N, N))
    dt = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64)
    doc = torch.tensor([[0] * 5 + [1] * 12 + [2] * 12, [0] * 20 + [3] * 9])
    s0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    y1, f1 = ssd.ssd_naive(x, dt, A, Bm, Cm, s0, doc_ids=doc)
    y2, f2 = ssd.ssd_chunked(x, dt, A, Bm, Cm, s0, chunk_size=4, doc_ids=doc)
    torch.testing.assert_close(y2, y1.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f2, f1.float(), atol=1e-4, rtol=1e-4)
    # the second document of row 0 alone, from a zero state
    ya, _ = ssd.ssd_naive(x[:1, 5:17], dt[:1, 5:17], A, Bm[:1, 5:17], Cm[:1, 5:17])
    torch.testing.assert_close(y1[:1, 5:17], ya)


def test_ssd_chunked_gradients_equal_naive_with_documents():
    """Backward through the chunked scan (document resets as -inf log-decays, chunk boundaries inside and at the
    edge of documents) equals backward through the token-by-token recurrence, with no nan anywhere."""
    g = torch.Generator().manual_seed(9)
    B, T, H, P, N = 2, 23, 2, 3, 4
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, Bm, Cm = mk(B, T, H, P), mk(B, T, H, N), mk(B, T, H, N)
    dt = torch.rand(B, T, H, generator=g)
    A = -torch.rand(H, generator=g) - 0.1
    s0 = mk(B, H, P, N)
    doc = torch.tensor([[0] * 4 + [1] * 10 + [2] * 9, [0] * 8 + [5] * 15])
    gy, gf = mk(B, T, H, P), mk(B, H, P, N)

    def recurrence(x, dt, A, Bm, Cm, s, doc_ids):  # ssd_naive without in-place updates, so autograd can follow
        ys = []
        for t in range(T):
            if t:
                s = s * (doc_ids[:, t] == doc_ids[:, t - 1]).float()[:, None, None, None]
            a = torch.exp(dt[:, t] * A)[..., None, None]
            s = a * s + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * Bm[:, t, :, None, :]
            ys.append(torch.einsum("bhpn,bhn->bhp", s, Cm[:, t]))
        return torch.stack(ys, 1), s

    grads = []
    for fn in (recurrence, lambda *a, doc_ids: ssd.ssd_chunked(*a, chunk_size=4, doc_ids=doc_ids)):
        ins = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm, s0)]
        y, f = fn(*ins[:5], ins[5], doc_ids=doc)
        ((y * gy).sum() + (f * gf).sum()).backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_feeds_one_new_token_per_step(layout):
    """transformers' own generate on a Zebra model is linear: the prompt once, then exactly one token per step,
    whatever name the installed transformers gives the cache (`past_key_values` up to 5.2x, `cache` after); the
    tokens equal greedy decoding from full forwards (which is what a generate re-feeding everything would give)."""
    model = tiny_model(LAYOUTS[layout])
    fed = []
    real = model.forward

    def spy(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else None)
        return real(*args, **kwargs)

    model.forward = spy
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert fed == [5] + [1] * 5
    model.forward = real
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_doc_segments_are_cu_seqlens_padded_to_a_bucket(monkeypatch):
    """doc_segments gives flash attention's cu_seqlens of the flattened batch (checked against the document
    lengths counted by hand), padded with empty documents to a power-of-two length so a compiled layer sees few
    distinct shapes; ZEBRA_VARLEN_BUCKET=0 turns the padding off."""
    from zebra.model.common import doc_segments

    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [5, 5, 6, 6, 6, 6, 6, 6, 7, 7]])
    exact = [0, 3, 5, 10, 12, 18, 20]  # row 0: 3, 2, 5 tokens; row 1 (offset 10): 2, 6, 2
    got = doc_segments(doc, bucket=False)
    assert got.dtype == torch.int32 and got.tolist() == exact
    padded = doc_segments(doc)
    assert padded.tolist() == exact + [20]  # 7 -> 8 entries, the extra document is empty
    lengths = padded.diff()
    assert lengths.sum().item() == doc.numel() and (lengths >= 0).all()
    many = torch.arange(20).repeat_interleave(2)[None]  # 20 documents of 2 tokens -> 21 entries -> 32
    assert doc_segments(many).numel() == 32 and doc_segments(many)[21:].eq(40).all()
    monkeypatch.setenv("ZEBRA_VARLEN_BUCKET", "0")
    assert doc_segments(doc).tolist() == exact


def test_using_backend_sets_and_restores_the_dispatch_backend():
    """dispatch.using_backend: the backend inside the block, the previous one after it, also after an error."""
    from zebra.ops import dispatch

    before = dispatch.get_backend()
    with dispatch.using_backend("torch"):
        assert dispatch.get_backend() == "torch"
    assert dispatch.get_backend() == before
    with pytest.raises(RuntimeError):
        with dispatch.using_backend("triton"):
            assert dispatch.get_backend() == "triton"
            raise RuntimeError("boom")
    assert dispatch.get_backend() == before
    with pytest.raises(ValueError, match="backend must be"):
        with dispatch.using_backend("cuda"):
            pass
    assert dispatch.get_backend() == before
