"""Tokenised documents: conversations and plain texts -> ids + loss masks, stored flat, cached on disk.

- `tokenize_conversation(tok, conv, loss_on="assistant"|"all") -> (ids, loss_mask)`: the conversation rendered
  with the tokenizer's chat template (zebra.data.render) and tokenised exactly as `zebra.data.chat.render` does
  (so training and held-out evaluation see identical tokenisation). loss_on="assistant": 1 on each assistant
  message's content and its end-of-turn token (e.g. `<|im_end|>`), 0 on system / user turns and on the
  template's own text. A plain-text document (a str) gets all ones and the EOS token appended. Character spans
  become token masks through the fast tokenizer's offsets, so tokenisation is one pass over the full text
  (batched), not one per message.
- `tokenize_many` / `tokenize_source`: the same for many conversations at once (batched), the latter with an
  on-disk cache (.npz, written atomically) keyed by (tokenizer hash, source fingerprint, loss_on). The cache
  does not depend on seq_len or the split: packing and splitting are cheap and happen on the fly, so one
  cache file serves every stage and every run.
- `TokenizedCorpus`: document d is ids[offsets[d]:offsets[d+1]] (and its mask alike).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ZebraError
from .render import ChatRenderer, SpanStats, _end_of_turn_strings, _plain_fallback_text, _render_with_spans
from .sources import Conversation, load_conversations, normalize_spec, source_fingerprint

LOSS_ON = ("assistant", "all")
CACHE_VERSION = 1


def _backend(tok):
    bt = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if bt is None or not hasattr(bt, "encode_batch"):
        raise ZebraError(f"{type(tok).__name__} is not a fast (tokenizers-backed) tokenizer; the data pipeline "
                         "needs character offsets, which only fast tokenizers give")
    return bt


def _spans_to_mask(starts: np.ndarray, spans: list) -> np.ndarray:
    """1 for tokens whose first character lies in one of the sorted, disjoint character spans."""
    if not spans:
        return np.zeros(len(starts), np.uint8)
    bounds = np.asarray(spans, np.int64).reshape(-1)
    return (np.searchsorted(bounds, starts, side="right") % 2 == 1).astype(np.uint8)


@dataclass
class TokenizedCorpus:
    """Tokenised documents stored flat: document d is ids[offsets[d]:offsets[d+1]] (and mask alike)."""
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[d], self.offsets[d + 1]
        return self.ids[a:b], self.mask[a:b]

    @classmethod
    def from_examples(cls, examples: Iterable[tuple[Sequence[int], Sequence[int]]], dtype=None) -> TokenizedCorpus:
        ids, masks, lens = [], [], []
        for i, (a, m) in enumerate(examples):
            if len(a) != len(m):
                raise ValueError(f"example {i}: {len(a)} ids but {len(m)} mask entries")
            if len(a):
                ids.append(np.asarray(a, np.int64))
                masks.append(np.asarray(m, np.uint8))
                lens.append(len(a))
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        dtype = dtype or (np.uint16 if flat.size == 0 or flat.max() < 2**16 else np.int32)
        return cls(flat.astype(dtype), np.concatenate(masks) if masks else np.zeros(0, np.uint8),
                   np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int64))

    def select(self, docs: Sequence[int] | np.ndarray) -> TokenizedCorpus:
        """A corpus of the given documents, in the given order."""
        docs = np.asarray(docs, np.int64)
        if docs.size == 0:
            return TokenizedCorpus(self.ids[:0], self.mask[:0], np.zeros(1, np.int64), dict(self.stats))
        lens = self.lengths[docs]
        o = self.offsets
        ids = np.concatenate([self.ids[o[d]:o[d + 1]] for d in docs])
        mask = np.concatenate([self.mask[o[d]:o[d + 1]] for d in docs])
        return TokenizedCorpus(ids, mask, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), dict(self.stats))

    @classmethod
    def concat(cls, parts: Sequence[TokenizedCorpus]) -> TokenizedCorpus:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls(np.zeros(0, np.uint16), np.zeros(0, np.uint8), np.zeros(1, np.int64))
        dtype = np.result_type(*[p.ids.dtype for p in parts])
        lens = np.concatenate([p.lengths for p in parts])
        return cls(np.concatenate([p.ids.astype(dtype) for p in parts]), np.concatenate([p.mask for p in parts]),
                   np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.offsets, self.ids, self.mask):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file in the same dir + rename), so readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, ids=self.ids, mask=self.mask, offsets=self.offsets,
                         stats=np.frombuffer(json.dumps(self.stats).encode(), np.uint8))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenizedCorpus:
        with np.load(path) as z:
            stats = json.loads(z["stats"].tobytes().decode()) if "stats" in z else {}
            return cls(z["ids"], z["mask"], z["offsets"], stats)


def tokenize_many(tok, convs: Iterable[Conversation], loss_on: str = "assistant",
                  batch_size: int = 512) -> TokenizedCorpus:
    """Tokenise conversations / plain documents (see the module doc) into a TokenizedCorpus, one document
    per input in input order. Texts are rendered in Python and tokenised in batches by the fast backend."""
    if loss_on not in LOSS_ON:
        raise ZebraError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    bt = _backend(tok)
    render = ChatRenderer(tok) if getattr(tok, "chat_template", None) else None
    specials = _end_of_turn_strings(tok, render)
    eos = tok.eos_token_id
    stats = SpanStats()
    results: list = []  # (ids, mask) per input, in input order
    pending: list = []  # (index, text, char spans or None for a plain document, add_special_tokens)

    def flush():
        # the chat-rendered texts carry their special tokens already (as chat.render tokenises them);
        # plain documents and template-less chats let the tokenizer add its own (BOS, ...)
        for add_special in (False, True):
            sel = [p for p in pending if p[3] == add_special]
            if not sel:
                continue
            # offsets (needed to map character spans to tokens) cost ~1.5x; skip them where no span is mapped
            need_offsets = any(p[2] is not None for p in sel) and loss_on == "assistant"
            encode = bt.encode_batch if need_offsets or not hasattr(bt, "encode_batch_fast") else bt.encode_batch_fast
            encs = encode([p[1] for p in sel], add_special_tokens=add_special)
            for (idx, _, spans, _), enc in zip(sel, encs):
                ids = np.asarray(enc.ids, np.int64)
                if spans is None:  # plain document: everything is a target; EOS closes it
                    if eos is not None and (len(ids) == 0 or ids[-1] != eos):
                        ids = np.append(ids, eos)
                    mask = np.ones(len(ids), np.uint8)
                elif loss_on == "all":
                    mask = np.ones(len(ids), np.uint8)
                else:
                    starts = np.fromiter(itertools.chain.from_iterable(enc.offsets), np.int64,
                                         count=2 * len(ids))[0::2]
                    mask = _spans_to_mask(starts, spans)
                    if add_special:  # tokens the tokenizer adds itself have offsets (0, 0): never targets
                        mask[np.asarray(enc.special_tokens_mask, bool)] = 0
                results[idx] = (ids, mask)
        pending.clear()

    for n_conv, conv in enumerate(convs):
        results.append(None)
        if isinstance(conv, str):
            stats.plain += 1
            pending.append((n_conv, conv, None, True))
        elif not conv:
            raise ZebraError(f"conversation {n_conv} has no messages")
        elif render is not None:
            try:
                text, spans = _render_with_spans(render, conv, specials, stats)
            except Exception as e:
                raise ZebraError(f"the chat template failed on conversation {n_conv}: "
                                 f"{type(e).__name__}: {e}") from e
            pending.append((n_conv, text, spans, False))
        else:
            text, spans = _plain_fallback_text(conv)
            pending.append((n_conv, text, spans, True))
        if len(pending) >= batch_size:
            flush()
    flush()
    ids_parts = [r[0] for r in results]
    mask_parts = [r[1] for r in results]
    lens = [len(r[0]) for r in results]
    flat = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    vocab = max(len(tok), int(flat.max()) + 1 if flat.size else 0)
    corpus = TokenizedCorpus(
        flat.astype(np.uint16 if vocab <= 2**16 else np.int32),
        np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.uint8),
        np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int64),
    )
    corpus.stats = {"docs": len(lens), "tokens": corpus.num_tokens, "loss_tokens": int(corpus.mask.sum()),
                    "spans": vars(stats)}
    return corpus


def tokenize_conversation(tok, conv: Conversation, loss_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation or plain-text document; see the module doc."""
    c = tokenize_many(tok, [conv], loss_on=loss_on)
    ids, mask = c.doc(0)
    return ids.astype(np.int64).tolist(), mask.astype(np.int64).tolist()


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything that decides tokenisation and rendering."""
    h = hashlib.sha256()
    h.update(_backend(tok).to_str().encode())
    h.update(json.dumps([type(tok).__name__, getattr(tok, "chat_template", None),
                         getattr(tok, "special_tokens_map", None), tok.eos_token_id], default=str,
                        sort_keys=True).encode())
    return h.hexdigest()


def _say(msg: str) -> None:
    print(f"zebra data: {msg}", file=sys.stderr, flush=True)


def tokenize_source(tok, spec: dict | str, loss_on: str = "assistant", cache_dir: str | os.PathLike | None = None,
                    verbose: bool = False) -> TokenizedCorpus:
    """Tokenise every conversation of one source (document d = the d-th conversation of
    `load_conversations(spec)`), cached under `cache_dir` when given."""
    spec = normalize_spec(spec)
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tok),
                                         "src": source_fingerprint(spec), "loss_on": loss_on},
                                        sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir).expanduser() / f"{spec['type']}-{key}.npz"
        if path.is_file():
            try:
                corpus = TokenizedCorpus.load(path)
                if verbose:
                    _say(f"loaded {corpus.num_tokens:,} tokens from {path}")
                return corpus
            except Exception as e:  # a damaged cache is rebuilt, not fatal
                _say(f"ignoring unreadable cache {path}: {e}")
    t0 = time.perf_counter()
    corpus = tokenize_many(tok, load_conversations(spec), loss_on=loss_on)
    corpus.stats["seconds"] = round(time.perf_counter() - t0, 2)
    if verbose:
        _say(f"tokenised {spec['type']}: {corpus.stats}")
    if path is not None:
        corpus.save(path)
    return corpus
