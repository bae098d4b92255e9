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

import array
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ZebraError
from .render import ChatRenderer, SpanStats, _end_of_turn_strings, _plain_fallback_text, _render_with_spans
from .sources import Conversation, load_conversations, normalize_spec, source_fingerprint

LOSS_ON = ("assistant", "all")
CACHE_VERSION = 2  # 2: memory-mapped shards (ids-K.bin, mask-K.bin, offsets.npy, meta.json) instead of one .npz
SHARD_TOKENS = 1 << 28  # 268M tokens (512 MiB of uint16 ids) per shard


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

    def view(self) -> CorpusView:
        """These documents as a CorpusView (no copy)."""
        return CorpusView([(self.ids, self.mask)], np.zeros(len(self), np.int64), self.offsets[:-1].copy(),
                          self.lengths, [self.fingerprint()], dict(self.stats))

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


def tokenize_stream(tok, convs: Iterable[Conversation], loss_on: str = "assistant", batch_size: int = 512,
                    stats: SpanStats | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss mask) of every conversation / plain document, in input order, a batch of `batch_size` at a time
    (rendered in Python, tokenised in batches by the fast backend): memory is bounded by one batch."""
    if loss_on not in LOSS_ON:
        raise ZebraError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    bt = _backend(tok)
    render = ChatRenderer(tok) if getattr(tok, "chat_template", None) else None
    specials = _end_of_turn_strings(tok, render)
    eos = tok.eos_token_id
    stats = stats if stats is not None else SpanStats()
    pending: list = []  # (index, text, char spans or None for a plain document, add_special_tokens)

    def flush():
        results = {}
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
        out = [results[p[0]] for p in sorted(pending)]
        pending.clear()
        return out

    for n_conv, conv in enumerate(convs):
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
            yield from flush()
    yield from flush()


def tokenize_many(tok, convs: Iterable[Conversation], loss_on: str = "assistant",
                  batch_size: int = 512) -> TokenizedCorpus:
    """Tokenise conversations / plain documents (see the module doc) into an in-memory TokenizedCorpus, one
    document per input in input order (tokenize_source writes large sources to memory-mapped shards instead)."""
    stats = SpanStats()
    docs = list(tokenize_stream(tok, convs, loss_on, batch_size, stats))
    lens = [len(ids) for ids, _ in docs]
    flat = np.concatenate([ids for ids, _ in docs]) if docs else np.zeros(0, np.int64)
    vocab = max(len(tok), int(flat.max()) + 1 if flat.size else 0)
    corpus = TokenizedCorpus(
        flat.astype(np.uint16 if vocab <= 2**16 else np.int32),
        np.concatenate([m for _, m in docs]) if docs else np.zeros(0, np.uint8),
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
                    verbose: bool = False, shard_tokens: int = SHARD_TOKENS):
    """Tokenise every conversation of one source (document d = the d-th conversation of `load_conversations(spec)`).
    With `cache_dir`: streamed into memory-mapped shards there (written once, in bounded memory, progress on stderr;
    later calls map them and read nothing up front) and returned as a ShardedCorpus; without, an in-memory
    TokenizedCorpus."""
    spec = normalize_spec(spec)
    if cache_dir is None:
        t0 = time.perf_counter()
        corpus = tokenize_many(tok, load_conversations(spec), loss_on=loss_on)
        corpus.stats["seconds"] = round(time.perf_counter() - t0, 2)
        return corpus
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tok),
                                     "src": source_fingerprint(spec), "loss_on": loss_on},
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"{spec['type']}-{key}"
    if (path / "meta.json").is_file():
        try:
            corpus = ShardedCorpus(path)
            if verbose:
                _say(f"mapped {corpus.num_tokens:,} tokens from {path}")
            return corpus
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            _say(f"ignoring unreadable cache {path}: {e}")
    dtype = np.uint16 if len(tok) <= 2**16 else np.int32
    write_shards(path, tokenize_stream(tok, load_conversations(spec), loss_on), dtype, shard_tokens,
                 label=f"{spec['type']} {spec.get('path') or ''}".strip())
    return ShardedCorpus(path)


# ---- memory-mapped shards ----------------------------------------------------------------------------


def write_shards(path: Path, docs: Iterable[tuple[np.ndarray, np.ndarray]], dtype, shard_tokens: int = SHARD_TOKENS,
                 label: str = "", progress_s: float = 10.0) -> dict:
    """Append documents to shard files ids-K.bin / mask-K.bin (a document never crosses shards; a shard closes
    once it holds shard_tokens), then write offsets.npy (per document: shard, start, length) and meta.json.
    Written into a temporary directory beside `path` and renamed into place: readers see all of it or nothing.
    Memory: one document batch and 24 bytes of index per document; progress (documents, tokens, tokens/s) on
    stderr every `progress_s` seconds."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        index = array.array("q")  # (shard, start, length) per document, flat: 24 bytes a document
        n_docs = 0
        digest = hashlib.sha256()
        shard, in_shard, tokens, loss_tokens = 0, 0, 0, 0
        fi, fm = open(tmp / "ids-0.bin", "wb"), open(tmp / "mask-0.bin", "wb")
        t0 = last = time.perf_counter()
        for ids, mask in docs:
            n = len(ids)
            if n == 0:
                index.extend((shard, in_shard, 0))
                n_docs += 1
                continue
            if in_shard and in_shard + n > shard_tokens:
                fi.close(), fm.close()
                shard, in_shard = shard + 1, 0
                fi, fm = open(tmp / f"ids-{shard}.bin", "wb"), open(tmp / f"mask-{shard}.bin", "wb")
            a, m = np.asarray(ids, dtype), np.asarray(mask, np.uint8)
            fi.write(a.tobytes()), fm.write(m.tobytes())
            digest.update(a.tobytes()), digest.update(m.tobytes())
            index.extend((shard, in_shard, n))
            n_docs += 1
            in_shard += n
            tokens += n
            loss_tokens += int(m.sum())
            now = time.perf_counter()
            if now - last > progress_s:
                last = now
                _say(f"tokenising {label}: {n_docs:,} documents, {tokens:,} tokens "
                     f"({tokens / (now - t0):,.0f} tokens/s)")
        fi.close(), fm.close()
        np.save(tmp / "offsets.npy", np.frombuffer(index, np.int64).reshape(-1, 3))
        meta = {"version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "shards": shard + 1, "docs": n_docs,
                "tokens": tokens, "loss_tokens": loss_tokens, "sha256": digest.hexdigest()[:16],
                "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        tmp = None
        _say(f"tokenised {label}: {n_docs:,} documents, {tokens:,} tokens in {meta['seconds']}s -> {path}")
        return meta
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


class CorpusView:
    """Documents of one or more corpora, read where they lie (memory-mapped shards or in-memory arrays), never
    copied: document d is parts[part[d]][start[d] : start[d] + lengths[d]] of the ids (and of the masks).
    select() and concat() make new views (index arrays only), so a split of a 1B-token corpus costs its index."""

    def __init__(self, parts: list, part: np.ndarray, start: np.ndarray, lengths: np.ndarray, fingerprints: list,
                 stats: dict | None = None):
        self.parts, self.part, self.start, self.lengths = parts, part, start, lengths
        self._fps = fingerprints
        self.stats = stats or {}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.parts[self.part[d]]
        a = self.start[d]
        return ids[a:a + self.lengths[d]], mask[a:a + self.lengths[d]]

    def select(self, docs) -> CorpusView:
        docs = np.asarray(docs, np.int64)
        return CorpusView(self.parts, self.part[docs], self.start[docs], self.lengths[docs], self._fps,
                          dict(self.stats))

    @classmethod
    def concat(cls, views: Sequence[CorpusView]) -> CorpusView:
        parts, fps, part, start, lengths = [], [], [], [], []
        for v in views:
            part.append(v.part + len(parts))
            parts += v.parts
            fps += v._fps
            start.append(v.start)
            lengths.append(v.lengths)
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))  # noqa: E731
        return cls(parts, cat(part), cat(start), cat(lengths), fps)

    def fingerprint(self) -> str:
        """What the documents are (their parts' content hashes) and which, in which order: cheap for any size."""
        h = hashlib.sha256(json.dumps(self._fps).encode())
        for a in (self.part, self.start, self.lengths):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


class ShardedCorpus(CorpusView):
    """A tokenised source in memory-mapped shards (write_shards): nothing is read until rows are built from it."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            raise ZebraError(f"{path}: cache version {meta.get('version')}, expected {CACHE_VERSION}")
        index = np.load(path / "offsets.npy")
        dtype = np.dtype(meta["dtype"])
        parts = []
        for k in range(meta["shards"]):
            f = path / f"ids-{k}.bin"
            size = f.stat().st_size // dtype.itemsize
            if size == 0:  # an empty shard cannot be mapped
                parts.append((np.zeros(0, dtype), np.zeros(0, np.uint8)))
                continue
            parts.append((np.memmap(f, dtype=dtype, mode="r", shape=(size,)),
                          np.memmap(path / f"mask-{k}.bin", dtype=np.uint8, mode="r", shape=(size,))))
        if int(index[:, 2].sum()) != meta["tokens"]:
            raise ZebraError(f"{path}: offsets and meta.json disagree")
        super().__init__(parts, index[:, 0], index[:, 1], index[:, 2], [meta["sha256"]],
                         {k: meta[k] for k in ("docs", "tokens", "loss_tokens", "seconds")})
        self.path = path


def as_view(corpus) -> CorpusView:
    return corpus if isinstance(corpus, CorpusView) else corpus.view()
