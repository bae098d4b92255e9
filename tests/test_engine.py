"""The static-cache engine (zebra.generation) against the reference model on tiny fp32 hybrids (CPU: reference
ops, no graph): per-step logits equal one full forward, greedy tokens equal transformers' generate with the
dynamic cache, left padding, the Mamba2 conv ring after short prompts, and its errors."""

import pytest
import torch

from test_model import LAYOUTS, tiny_model
from zebra.errors import ZebraError
from zebra.generation import StaticEngine

ALL = {**LAYOUTS, "all-types": ["mamba2", "mla", "attention", "mla", "mamba2"]}


@pytest.mark.parametrize("layout", list(ALL))
@pytest.mark.parametrize("prompt_len", [1, 2, 7])
def test_engine_steps_equal_full_forward(layout, prompt_len):
    """Prefill + static decode steps give the logits of one full forward at every position, including prompts
    shorter than the conv window (the ring's slots before position 0 must read as zeros)."""
    model = tiny_model(ALL[layout], qk_norm=False)
    ids = torch.randint(0, 97, (2, prompt_len + 6), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        eng = StaticEngine(model, batch_size=2, max_len=32, cuda_graph=False)
        got = [eng.prefill(ids[:, :prompt_len])]
        for t in range(prompt_len, ids.shape[1] - 1):
            got.append(eng.step(ids[:, t]).clone())
    torch.testing.assert_close(torch.stack(got, 1), full[:, prompt_len - 1:-1], atol=2e-5, rtol=1e-4)


def test_engine_with_gate_bias_equals_full_forward():
    """The engine's Mamba2 step applies the gate bias (mamba_z_bias) like the model's forward."""
    model = tiny_model(ALL["all-types"], qk_norm=False, mamba_z_bias=True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        eng = StaticEngine(model, batch_size=2, max_len=16, cuda_graph=False)
        got = [eng.prefill(ids[:, :3])] + [eng.step(ids[:, t]).clone() for t in range(3, 8)]
    torch.testing.assert_close(torch.stack(got, 1), full[:, 2:-1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["all-types", "attention", "mla", "mamba2"])
def test_static_generate_equals_reference_generate_left_padded(layout):
    """model.generate(cache_implementation="static") == the dynamic-cache generate, on a left-padded batch."""
    model = tiny_model(ALL[layout])
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(1, 97, (1, 9), generator=g), torch.randint(1, 97, (1, 4), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    fast = model.generate(ids, cache_implementation="static", **kw)
    assert fast.tolist() == ref.tolist()
    assert model._zebra_engines[2].L == 256  # one engine per batch size, length rounded up


def test_engine_stops_at_eos_and_pads_finished_rows():
    model = tiny_model(ALL["all-types"])
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(6))
    eng = StaticEngine(model, 2, 64, cuda_graph=False)
    free = eng.generate(ids, max_new_tokens=12)
    eos = int(free[0, 7])  # row 0's third new token becomes "end of sequence"
    out = eng.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert out[0, :8].tolist() == free[0, :8].tolist()
    assert set(out[0, 8:].tolist()) <= {0}
    row1 = free[1, 5:].tolist()
    if eos not in row1:
        assert out[1].tolist() == free[1].tolist()  # an unfinished row runs to max_new_tokens


def test_sampling_is_seeded_and_top_p_restricts_to_the_nucleus():
    model = tiny_model(ALL["mamba2"])
    ids = torch.randint(1, 97, (2, 4), generator=torch.Generator().manual_seed(7))
    eng = StaticEngine(model, 2, 64, cuda_graph=False)
    s1 = eng.generate(ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(1))
    s2 = eng.generate(ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(1))
    assert s1.tolist() == s2.tolist()
    greedy = eng.generate(ids, max_new_tokens=8)
    tiny_p = eng.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(2))
    assert tiny_p.tolist() == greedy.tolist()  # a vanishing nucleus keeps only the top token


def test_engine_errors():
    model = tiny_model(ALL["all-types"])
    eng = StaticEngine(model, 2, 8, cuda_graph=False)
    with pytest.raises(ZebraError, match="batch"):
        eng.prefill(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ZebraError, match="does not fit"):
        eng.prefill(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ZebraError, match="left padding"):
        eng.prefill(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ZebraError, match="exceeds"):
        eng.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ZebraError, match="outside"):
        eng.set_context_length(8)
    eng.set_context_length(7)
    eng.step(torch.ones(2, dtype=torch.long))
    with pytest.raises(ZebraError, match="full"):
        eng.step(torch.ones(2, dtype=torch.long))
    with pytest.raises(ZebraError, match="num_beams"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, num_beams=2, cache_implementation="static")
    with pytest.raises(ZebraError, match="no_repeat_ngram_size"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, no_repeat_ngram_size=2,
                       cache_implementation="static")
    with pytest.raises(ZebraError, match="does not support"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, not_an_option=1,
                       cache_implementation="static")
    with pytest.raises(ZebraError, match="tokenizer"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, stop_strings=["x"],
                       cache_implementation="static")


def test_cache_bytes_count_every_buffer():
    model = tiny_model(ALL["all-types"])  # mamba2, mla, attention, mla, mamba2; fp32
    B, L = 3, 16
    eng = StaticEngine(model, B, L, cuda_graph=False)
    cfg = model.config
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    conv_dim = cfg.mamba_d_inner + 2 * cfg.mamba_d_xb
    mamba = B * conv_dim * cfg.mamba_d_conv * 4 + B * H * D * D * 4
    mla = B * L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    attn = 2 * B * G * L * D * 4
    assert eng.cache_nbytes() == 2 * mamba + 2 * mla + attn


def test_repetition_penalty_matches_transformers_greedy():
    model = tiny_model(ALL["all-types"])
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(11))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0,
              repetition_penalty=1.8)
    ref = model.generate(ids, **kw)
    assert model.generate(ids, cache_implementation="static", **kw).tolist() == ref.tolist()
    plain = model.generate(ids, **{**kw, "repetition_penalty": 1.0})
    assert plain.tolist() != ref.tolist()  # the penalty changes this greedy continuation


@pytest.mark.parametrize("opts", [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=20, top_p=0.9,
                                                                                     min_p=0.05, temperature=0.7)])
def test_sampling_filters_match_transformers_warpers(opts):
    """top_k / top_p / min_p / temperature give the distribution transformers' logits warpers give."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from zebra.generation.engine import sampling_probs

    g = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 97, generator=g) * 3
    scores = logits.clone()
    warpers = []
    if "temperature" in opts:
        warpers.append(TemperatureLogitsWarper(opts["temperature"]))
    if "top_k" in opts:
        warpers.append(TopKLogitsWarper(opts["top_k"]))
    if "top_p" in opts:
        warpers.append(TopPLogitsWarper(opts["top_p"]))
    if "min_p" in opts:
        warpers.append(MinPLogitsWarper(opts["min_p"]))
    for w in warpers:
        scores = w(None, scores)
    torch.testing.assert_close(sampling_probs(logits, **opts), torch.softmax(scores, -1), atol=1e-6, rtol=1e-5)


def test_stop_strings_end_a_row_like_transformers(teacher_tokenizer):
    tok = teacher_tokenizer
    model = tiny_model(["mla", "mamba2"], vocab_size=len(tok))
    ids = tok("The weather today is", return_tensors="pt")["input_ids"]
    free = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    stop = tok.decode(free[0, ids.shape[1]:ids.shape[1] + 4])[-3:]  # ends the 4th new token (or earlier)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tok)
    ref = model.generate(ids, **kw)
    fast = model.generate(ids, cache_implementation="static", **kw)
    assert ref.shape[1] < free.shape[1] and fast.tolist() == ref.tolist()


def test_engine_is_rebuilt_when_the_weights_change():
    """generate(cache_implementation="static") keeps an engine per batch size; changing the weights in place
    (an optimizer step, load_state_dict) makes it build a new one instead of decoding with stale ones."""
    model = tiny_model(ALL["all-types"])
    ids = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(13))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.generate(ids, cache_implementation="static", **kw)
    first = model._zebra_engines[1]
    model.generate(ids, cache_implementation="static", **kw)
    assert model._zebra_engines[1] is first  # unchanged weights: reused
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mixer_type == "mla":
                layer.self_attn.kv_b_proj.weight.mul_(-1.5)  # the absorbed W_UK / W_UV the engine derived
    fast = model.generate(ids, cache_implementation="static", **kw)
    assert model._zebra_engines[1] is not first
    assert fast.tolist() == model.generate(ids, **kw).tolist()


@pytest.mark.parametrize("layout", ["all-types", "mla", "mamba2"])
def test_model_forward_into_a_static_cache_equals_full_forward(layout):
    """One cache object for every path: the model's own forward prefills a ZebraCache.static and then decodes one
    token per call (its decode_step), giving the logits of one full forward, left padding included; the engine
    runs exactly that decode_step (counted), not a copy of the layer loop."""
    from transformers.cache_utils import Cache

    from zebra.model.cache import ZebraCache

    model = tiny_model(ALL[layout], qk_norm=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: 3 tokens of left padding
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = ZebraCache.static(model, batch_size=2, max_len=16)
        assert isinstance(cache, Cache) and cache.is_static
        got = [model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True).logits[:, -1]]
        assert cache.get_seq_length() == 4
        for t in range(4, 9):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert out.logits.shape == (2, 1, 97)
            got.append(out.logits[:, 0])
        assert cache.get_seq_length() == 9 and int(cache.pos) == 9
    # row 1's logits at real positions only
    torch.testing.assert_close(torch.stack(got, 1)[0], full[0, 3:9], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(got, 1)[1], full[1, 3:9], atol=2e-5, rtol=1e-4)
    with pytest.raises(ZebraError, match="takes a prompt when empty"):
        model(ids[:, :2], past_key_values=cache, use_cache=True)
    cache.reset()
    assert cache.get_seq_length() == 0 and int(cache.pos) == 0 and cache.nbytes() > 0

    calls = []
    real = model.decode_step

    def counted(tokens, c):
        calls.append(c)
        return real(tokens, c)

    model.decode_step = counted
    eng = StaticEngine(model, batch_size=2, max_len=16, cuda_graph=False)
    eng.generate(ids[:, :4], max_new_tokens=3)
    assert len(calls) == 2 and all(c is eng.cache for c in calls)  # the first new token comes from the prefill


@pytest.mark.parametrize("layout", ["all-types", "mamba2"])
def test_transformers_generate_over_a_static_cache(layout):
    """transformers' own generate, given a ZebraCache.static, prefills it once and then feeds one token per step
    through the model's decode_step, with the tokens of the growing-cache generate (left padding included)."""
    from zebra.model.cache import ZebraCache
    from zebra.model.hybrid import _CACHE_FIELD

    model = tiny_model(ALL[layout])
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 97, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    cache = ZebraCache.static(model, batch_size=2, max_len=32)
    steps = []
    real = model.model.decode_step
    model.model.decode_step = lambda tokens, c: steps.append(tokens.shape) or real(tokens, c)
    out = model.generate(ids, **kw, **{_CACHE_FIELD: cache})  # the name this transformers uses for the cache
    assert out.tolist() == ref.tolist()
    assert steps == [torch.Size([2])] * 7 and cache.get_seq_length() == 6 + 7


def test_bf16_ssm_state_is_an_option_close_to_fp32():
    """ZebraCache.static(ssm_dtype=torch.bfloat16) stores Mamba2's state in bf16 (half the bytes) and decodes close
    to the fp32 state; fp32 stays the default; other dtypes are refused."""
    from zebra.model.cache import ZebraCache

    model = tiny_model(ALL["all-types"], qk_norm=False)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    engs = {dt: StaticEngine(model, batch_size=2, max_len=16, cuda_graph=False, ssm_dtype=dt)
            for dt in (torch.float32, torch.bfloat16)}
    ssm = [st["ssm"] for st in engs[torch.bfloat16].cache.state if "ssm" in st]
    assert ssm and all(t.dtype == torch.bfloat16 for t in ssm)
    assert engs[torch.bfloat16].cache_nbytes() < engs[torch.float32].cache_nbytes()
    assert all(st["ssm"].dtype == torch.float32 for st in ZebraCache.static(model, 1, 8).state if "ssm" in st)
    with torch.no_grad():
        out = {dt: [e.prefill(ids[:, :4])] + [e.step(ids[:, t]).clone() for t in range(4, 11)] for dt, e in engs.items()}
    a, b = torch.stack(out[torch.float32], 1), torch.stack(out[torch.bfloat16], 1)
    assert not torch.equal(a, b)  # the state really is rounded
    torch.testing.assert_close(b, a, atol=5e-3, rtol=5e-2)
    with pytest.raises(ZebraError, match="ssm_dtype"):
        ZebraCache.static(model, 1, 8, ssm_dtype=torch.float16)
