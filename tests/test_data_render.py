"""Tests of a source's `render` option (chat / plain / mixed) and the plain-text held-out evaluation set.

Most tests use the byte-level tokenizer of test_data (runs anywhere); the SmolLM2 checks skip when the
teacher or the ShareGPT file is not cached.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_data import byte_tokenizer, fake_sharegpt

from zebra.data.chat import HELDOUT_FRACTION, HELDOUT_SEED, heldout_conversations, plaintext_heldout_sequences
from zebra.data.packing import build_dataset, tokenize_many, tokenize_source
from zebra.data.sharegpt import is_heldout
from zebra.data.sources import load_conversations, plain_text, source_fingerprint, source_key
from zebra.errors import ZebraError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.\nAnything else?"},
]
CONV_TEXT = "Be brief.\n\nWhat is 2+2?\n\nIt is 4.\nAnything else?"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, convs) -> str:
    path.write_text("\n".join(json.dumps({"messages": c} if isinstance(c, list) else {"text": c}) for c in convs))
    return str(path)


def synthetic(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(n)]


def tags(text: str) -> list[int]:
    """The conversation numbers fake_sharegpt writes into its answers, in order."""
    return [int(x) for x in re.findall(r"a <c(\d{4})>", text)]


# ---- render = plain ---------------------------------------------------------------------------------


def check_plain_document(tok, tmp_path):
    spec = {"type": "jsonl", "path": write_jsonl(tmp_path / "c.jsonl", [CONV]), "render": "plain"}
    docs = list(load_conversations(spec))
    assert docs == [CONV_TEXT] and plain_text(CONV) == CONV_TEXT
    c = tokenize_source(tok, spec)
    ids, mask = (a.astype(np.int64).tolist() for a in c.doc(0))
    assert ids == tok(CONV_TEXT, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[:-1]) == CONV_TEXT
    assert mask == [1] * len(ids)
    assert tok.convert_tokens_to_ids("<|im_start|>") not in ids


def test_plain_render_is_contents_joined_with_all_ones_mask_and_eos(tok, tmp_path):
    """render='plain': the exact joined text, no roles, no template; loss on every token, EOS appended."""
    check_plain_document(tok, tmp_path)


@pytest.mark.teacher
def test_plain_render_with_smollm2(teacher_tokenizer, tmp_path):
    """The same with the real SmolLM2 tokenizer (whose EOS is <|im_end|>)."""
    check_plain_document(teacher_tokenizer, tmp_path)


def test_plain_render_keeps_plain_documents_and_covers_hf(tmp_path):
    """Documents that are already text pass through; hf sources render too; text sources ignore render."""
    spec = {"type": "jsonl", "path": write_jsonl(tmp_path / "c.jsonl", ["as is", CONV]), "render": "plain"}
    assert list(load_conversations(spec)) == ["as is", CONV_TEXT]
    import datasets

    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"messages": [CONV]}).save_to_disk(str(hf))
    assert list(load_conversations({"type": "hf", "path": str(hf), "render": "plain"})) == [CONV_TEXT]
    (tmp_path / "t.txt").write_text("text doc")
    text = {"type": "text", "path": str(tmp_path / "t.txt")}
    for render in ("plain", "mixed"):
        assert list(load_conversations(dict(text, render=render))) == ["text doc"]
        assert source_fingerprint(dict(text, render=render)) == source_fingerprint(text)


# ---- render = mixed ---------------------------------------------------------------------------------


def test_mixed_render_fraction_deterministic_and_per_conversation(tmp_path):
    """Over 2000 chats, mixed renders plain_fraction of them plain (+-4.5 points), the rest unchanged,
    the same way every time; limit keeps a prefix; a larger fraction only adds plain ones."""
    convs = synthetic(2000)
    path = write_jsonl(tmp_path / "m.jsonl", convs)
    plain = {}
    for frac in (0.3, 0.5, 0.8):
        spec = {"type": "jsonl", "path": path, "render": "mixed", "plain_fraction": frac}
        got = list(load_conversations(spec))
        assert got == list(load_conversations(spec))
        assert len(got) == len(convs)
        plain[frac] = {i for i, d in enumerate(got) if isinstance(d, str)}
        for i, d in enumerate(got):
            assert d == (plain_text(convs[i]) if i in plain[frac] else convs[i])
        assert abs(len(plain[frac]) / len(convs) - frac) < 0.045
        assert list(load_conversations(dict(spec, limit=50))) == got[:50]
    assert plain[0.3] < plain[0.5] < plain[0.8]
    default = list(load_conversations({"type": "jsonl", "path": path, "render": "mixed"}))
    assert {i for i, d in enumerate(default) if isinstance(d, str)} == plain[0.5]
    for frac, want in ((0.0, 0), (1.0, len(convs))):
        spec = {"type": "jsonl", "path": path, "render": "mixed", "plain_fraction": frac}
        assert sum(isinstance(d, str) for d in load_conversations(spec)) == want
    # the choice is salted by the source: the same chats in another file are rendered differently
    other = write_jsonl(tmp_path / "other.jsonl", convs)
    got = list(load_conversations({"type": "jsonl", "path": other, "render": "mixed"}))
    assert {i for i, d in enumerate(got) if isinstance(d, str)} != plain[0.5]


def test_mixed_render_tokenises_both_ways(tok, tmp_path):
    """A mixed corpus holds chat-template documents (assistant-only loss) and plain ones (all loss, EOS)."""
    convs = synthetic(40)
    spec = {"type": "jsonl", "path": write_jsonl(tmp_path / "m.jsonl", convs), "render": "mixed"}
    docs = list(load_conversations(spec))
    c = tokenize_source(tok, spec)
    ref = tokenize_many(tok, docs)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    kinds = set()
    for d, doc in enumerate(docs):
        ids, mask = c.doc(d)
        assert np.array_equal(ids, ref.doc(d)[0])
        if isinstance(doc, str):
            kinds.add("plain")
            assert mask.all() and ids[-1] == tok.eos_token_id and im_start not in ids
        else:
            kinds.add("chat")
            assert im_start in ids and 0 < mask.sum() < len(mask)
    assert kinds == {"plain", "chat"}


# ---- cache key, split, held-out slice ---------------------------------------------------------------


def test_render_changes_fingerprint_not_source_key(tok, tmp_path):
    """Each rendering has its own tokenisation cache; equivalent specs share one; the split salt is unchanged."""
    path = write_jsonl(tmp_path / "c.jsonl", [CONV])
    base = {"type": "jsonl", "path": path}
    specs = [base, dict(base, render="plain"), dict(base, render="mixed"),
             dict(base, render="mixed", plain_fraction=0.3)]
    fps = [source_fingerprint(s) for s in specs]
    assert len(set(fps)) == len(fps)
    assert source_fingerprint(dict(base, render="chat")) == fps[0]
    assert source_fingerprint(dict(base, render="mixed", plain_fraction=0.5)) == fps[2]
    assert len({source_key(s) for s in specs}) == 1 and source_key(specs[1]) == source_key(path)
    cache = tmp_path / "cache"
    chat, plain = (tokenize_source(tok, s, cache_dir=cache) for s in specs[:2])
    assert len(list(cache.glob("*/meta.json"))) == 2
    ids = lambda c: [c.doc(d)[0].tolist() for d in range(len(c))]  # noqa: E731
    assert ids(tokenize_source(tok, specs[1], cache_dir=cache)) == ids(plain) != ids(chat)


@pytest.mark.parametrize("render", ["plain", "mixed"])
def test_render_keeps_heldout_exclusion_and_ild_kd_split(tok, tmp_path, render):
    """Whatever the rendering, the sharegpt source yields the same conversation indices (no held-out one)
    and build_dataset puts the same conversations in ILD and in KD."""
    p = tmp_path / "sg.json"
    n = fake_sharegpt(p)
    held = {i for i in range(n) if is_heldout(i, HELDOUT_FRACTION, HELDOUT_SEED)}
    assert held
    chat_spec = {"type": "sharegpt", "path": str(p)}
    spec = dict(chat_spec, render=render)

    def indices(convs):
        return [tags(c if isinstance(c, str) else plain_text(c))[0] for c in convs]

    got = list(load_conversations(spec))
    assert indices(got) == indices(load_conversations(chat_spec)) == [i for i in range(n) if i not in held]
    assert any(isinstance(c, str) for c in got)

    def part(s, split):
        stream = build_dataset(tok, s, seq_len=64, split=split, batch_size=4)
        return set(tags(tok.decode(torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in stream]).tolist())))

    for split in ("ild", "kd"):
        assert part(spec, split) == part(chat_spec, split)
        assert not part(spec, split) & held


@pytest.mark.parametrize("bad, match", [
    ({"render": "html"}, "'render'"),
    ({"render": None}, "'render'"),
    ({"render": "mixed", "plain_fraction": 1.5}, "'plain_fraction'"),
    ({"render": "mixed", "plain_fraction": -0.1}, "'plain_fraction'"),
    ({"render": "mixed", "plain_fraction": float("nan")}, "'plain_fraction'"),
    ({"render": "mixed", "plain_fraction": "half"}, "'plain_fraction'"),
    ({"render": "mixed", "plain_fraction": True}, "'plain_fraction'"),
    ({"plain_fraction": 0.3}, "'plain_fraction'"),
    ({"render": "plain", "plain_fraction": 0.3}, "'plain_fraction'"),
])
def test_bad_render_options_raise_before_any_work(tok, tmp_path, bad, match):
    """Bad render / plain_fraction values raise ZebraError naming the key, before any file is read."""
    missing = {"type": "jsonl", "path": str(tmp_path / "never-read.jsonl")}  # would raise 'not found' if read
    for call in (load_conversations, source_fingerprint, source_key, lambda s: build_dataset(tok, s, seq_len=8)):
        with pytest.raises(ZebraError, match=match):
            call(dict(missing, **bad))


# ---- plain-text held-out evaluation set -------------------------------------------------------------


def test_plaintext_heldout_sequences_are_heldout_plain_renderings(tok, tmp_path):
    """Each sequence is the plain rendering of the next held-out conversation (truncated), with no chat
    special tokens, and none of those conversations is in any rendering of the training source."""
    p = tmp_path / "sg.json"
    n = fake_sharegpt(p)
    held = [i for i in range(n) if is_heldout(i, HELDOUT_FRACTION, HELDOUT_SEED)]
    convs = list(heldout_conversations(p))
    assert [tags(plain_text(c))[0] for c in convs] == held
    specials = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    for seq_len in (1000, 12):
        seqs = plaintext_heldout_sequences(tok, num_seqs=len(held), seq_len=seq_len, min_len=1, path=p)
        assert len(seqs) == len(held)
        for s, conv in zip(seqs, convs):
            assert s.dtype == torch.long and 0 < len(s) <= seq_len and not specials & set(s.tolist())
            text = tok.decode(s.tolist())
            assert plain_text(conv).startswith(text) and (seq_len == 12 or text == plain_text(conv))
    # min_len drops short conversations: none of the fake ones reaches 30 tokens
    with pytest.raises(ZebraError, match="no held-out"):
        plaintext_heldout_sequences(tok, num_seqs=4, seq_len=100, min_len=30, path=p)
    seen = {i for r in ("chat", "plain", "mixed")
            for c in load_conversations({"type": "sharegpt", "path": str(p), "render": r})
            for i in tags(c if isinstance(c, str) else plain_text(c))}
    assert seen == set(range(n)) - set(held)


@pytest.mark.teacher
def test_plaintext_heldout_sequences_smollm2(teacher_tokenizer, sharegpt_file):
    """On the real ShareGPT file with SmolLM2: no chat-template tokens, each sequence the (truncated)
    plain rendering of the matching held-out conversation, the first with >= min_len tokens."""
    tok, seq_len, min_len = teacher_tokenizer, 256, 32
    seqs = plaintext_heldout_sequences(tok, num_seqs=6, seq_len=seq_len, min_len=min_len, path=sharegpt_file)
    assert len(seqs) == 6
    specials = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    convs = heldout_conversations(sharegpt_file)
    for s in seqs:
        text = tok.decode(s.tolist())
        conv = next(c for c in convs if len(tok(plain_text(c))["input_ids"]) >= min_len)
        assert not specials & set(s.tolist()) and "<|im_start|>" not in text
        assert len(s) <= seq_len and plain_text(conv).startswith(text.rstrip("\ufffd"))
