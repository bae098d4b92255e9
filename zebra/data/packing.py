"""Tokenise conversations with a loss mask, pack them into fixed-length rows, and stream resumable batches.

    from zebra.data.packing import build_dataset
    stream = build_dataset(tok, ["sharegpt"], seq_len=2048, split="kd", seed=0, max_tokens=10**8,
                           batch_size=8, cache_dir="~/.cache/zebra/tokenized")
    for batch in stream:            # dict of (B, T) LongTensors: input_ids, doc_ids, loss_mask, attention_mask
        ...
    state = stream.state_dict()     # {"rows": ...}: load_state_dict(state) on a fresh stream continues exactly

Pieces (each usable alone):

- `tokenize_conversation(tok, conv, loss_on="assistant"|"all") -> (ids, loss_mask)`: the conversation
  rendered with the tokenizer's chat template and tokenised exactly as `zebra.data.chat.render` does (so
  training and held-out evaluation see identical tokenisation). loss_on="assistant": 1 on each assistant
  message's content and its end-of-turn token (e.g. `<|im_end|>`), 0 on system / user turns and on the
  template's own text. A plain-text document (a str) gets all ones and the EOS token appended.
  How the assistant spans are found, for any template: every message content is replaced by a unique
  sentinel and the conversation rendered once; the sentinels' places give each content's character span,
  and the real rendering must equal the template text with the contents put back (checked per
  conversation, also with stripped contents for templates that `trim`). Where that check fails (templates
  that rewrite contents), prefixes messages[:k] are rendered incrementally (with and without the
  generation prompt) and diffed to bound each message, and the content is searched inside its bounds.
  Character spans become token masks through the fast tokenizer's offsets, so tokenisation is one pass
  over the full text (batched), not one per message.
- `tokenize_many` / `tokenize_source`: the same for many conversations at once (batched), the latter with an
  on-disk cache (.npz, written atomically) keyed by (tokenizer hash, source fingerprint, loss_on). The cache
  does not depend on seq_len or the split: packing and splitting are cheap and happen on the fly, so one
  cache file serves every stage.
- `pack(examples, seq_len)`: greedy packing. Documents are laid end to end and cut into rows of exactly
  seq_len tokens, so no row but the last has padding. A document that crosses a row boundary (in particular
  any document longer than seq_len) continues in the next row as a NEW document piece: its own doc id,
  positions restarting at 0, no attention to / Mamba2 state from its earlier piece (the model sees a row
  alone). The last partial row is padded (pad id, loss_mask 0, attention_mask 0) with a doc id of its own,
  so padding never attends into real documents; it is kept rather than dropped so small sources lose no data.
- `split_ild_kd` / `ild_kd_part`: the seeded 20 % (ILD) / 80 % (end-to-end KD) split of SPEC 4, by a stable
  hash of (seed, source key, conversation index): deterministic, disjoint and covering.
- `PackedStream`: batches of packed rows in a seeded shuffled order (a permutation of the documents per
  epoch), with a token budget, resumable by row count, optionally sharded over ranks.
- `build_dataset(tok, sources, seq_len, split, seed, max_tokens, ...)`: all of the above.

Batch tensors (all (B, T) torch.long):
  input_ids       token ids
  doc_ids         non-decreasing per row, from 0 at each row start; one id per document piece (and one for
                  the trailing padding); the model restarts positions, attention and Mamba2 state per id
  loss_mask       1 where input_ids[t] is a TARGET, predicted from position t-1 of the same document: the
                  tokenizer's mask, zeroed at the first token of every document piece (nothing in the piece
                  precedes it). So the next-token loss is `ce(logits[:, :-1], ids[:, 1:])` weighted by
                  `loss_mask[:, 1:]`, and it never crosses a document boundary.
  attention_mask  1 on real tokens, 0 on padding
"""

from __future__ import annotations

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
import torch

from ..errors import ZebraError
from .sources import Conversation, load_conversations, normalize_spec, source_fingerprint, source_key

LOSS_ON = ("assistant", "all")
CACHE_VERSION = 1
_SENT_OPEN, _SENT_CLOSE = "\U000f0000", "\U000f0001"  # private-use code points: never in real text


# ---- chat rendering ---------------------------------------------------------------------------------


def _compile_template(template: str):
    """The template compiled the way transformers compiles it (its private helper when present, so the
    sandbox, filters and `{% generation %}` tag match exactly), else an equivalent own environment."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:
        pass
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatRenderer:
    """Renders messages to text with a tokenizer's chat template, fast: the template is compiled once and
    rendered directly (apply_chat_template costs ~10x more per call). The first rendering is compared with
    `tok.apply_chat_template`; on any difference every later call goes through apply_chat_template."""

    def __init__(self, tok):
        self.tok = tok
        self.template = getattr(tok, "chat_template", None) or None
        if isinstance(self.template, dict):  # several named templates: the default one
            self.template = self.template.get("default") or next(iter(self.template.values()))
        self._compiled = None
        self._checked = False
        if self.template:
            try:
                self._compiled = _compile_template(self.template)
            except Exception:
                self._compiled = None  # apply_chat_template will say what is wrong
        self._kwargs = dict(getattr(tok, "special_tokens_map", {}) or {})

    def _slow(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._compiled is None:
            return self._slow(messages, add_generation_prompt)
        text = self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._kwargs)
        if not self._checked:
            self._checked = True
            if text != self._slow(messages, add_generation_prompt):
                self._compiled = None
                return self._slow(messages, add_generation_prompt)
        return text


def _special_strings(tok) -> list[str]:
    """Special-token strings, longest first (so `<|im_end|>` wins over any shorter prefix)."""
    out = set(getattr(tok, "all_special_tokens", []) or [])
    for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            out.add(str(t))
    return sorted((s for s in out if s), key=len, reverse=True)


def _end_of_turn_strings(tok, render) -> list[str]:
    """Special tokens that may close an assistant turn: all of them except those that open one (found in
    what the generation prompt appends, e.g. `<|im_start|>` or `<|start_header_id|>`), so a template
    with no end-of-turn token never gets the next turn's opening token masked instead."""
    specials = _special_strings(tok)
    if render is None:
        return specials
    probe = [{"role": "user", "content": "x"}]
    try:
        base, gen = render(probe), render(probe, add_generation_prompt=True)
    except Exception:
        return specials
    opener = gen[len(base):] if gen.startswith(base) else gen
    return [s for s in specials if s not in opener]


def _end_of_turn(text: str, start: int, stop: int, specials: Sequence[str]) -> int:
    """End (exclusive) of the end-of-turn token right after an assistant content ending at `start`:
    optional whitespace then a special token, looked for before `stop`; `start` itself when there is none."""
    j = start
    while j < stop and text[j] in " \t\r\n":
        j += 1
    for s in specials:
        if text.startswith(s, j) and j + len(s) <= stop:
            return j + len(s)
    return start


@dataclass
class SpanStats:
    """How assistant spans were found (sentinel = exact, prefix = incremental-prefix fallback,
    unlocated = content not found in its bounds: the whole message span was masked)."""
    sentinel: int = 0
    prefix: int = 0
    unlocated: int = 0
    plain: int = 0


def _render_with_spans(render: ChatRenderer, conv: list[dict], specials, stats: SpanStats) -> tuple[str, list]:
    """(full text, sorted list of (start, end) character spans of assistant content + end-of-turn)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in conv]
    full = render(msgs)
    asst = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if not asst:
        return full, []
    if not any(_SENT_OPEN in m["content"] or _SENT_CLOSE in m["content"] for m in msgs):
        spans = _sentinel_spans(render, msgs, full, specials)
        if spans is not None:
            stats.sentinel += 1
            return full, spans
    stats.prefix += 1
    return full, _prefix_spans(render, msgs, full, specials, stats)


def _sentinel_spans(render, msgs, full, specials):
    marked = [dict(m, content=f"{_SENT_OPEN}{k}{_SENT_CLOSE}") for k, m in enumerate(msgs)]
    try:
        skeleton = render(marked)
    except Exception:
        return None
    pieces, places, pos = [], [], 0
    for k in range(len(msgs)):
        tag = f"{_SENT_OPEN}{k}{_SENT_CLOSE}"
        at = skeleton.find(tag, pos)
        if at < 0 or skeleton.count(tag) != 1:
            return None  # the template dropped or repeated a content
        pieces.append(skeleton[pos:at])
        places.append(k)
        pos = at + len(tag)
    tail = skeleton[pos:]
    for strip in (False, True):
        out, where, cur = [], [], 0
        for piece, k in zip(pieces, places):
            content = msgs[k]["content"].strip() if strip else msgs[k]["content"]
            out.append(piece)
            cur += len(piece)
            where.append((cur, cur + len(content)))
            out.append(content)
            cur += len(content)
        out.append(tail)
        if "".join(out) == full:
            # an end-of-turn token lies in the template text between this content and the next one
            stops = [w[0] for w in where[1:]] + [len(full)]
            return [(a, _end_of_turn(full, b, stop, specials))
                    for k, ((a, b), stop) in enumerate(zip(where, stops)) if msgs[k]["role"] == "assistant"]
    return None


def _locate(full: str, content: str, lo: int, hi: int, specials) -> int:
    """Where `content` starts inside full[lo:hi], or -1. The message's own text is the last thing before its
    end-of-turn token, so the last occurrence followed by one wins (a short content may also occur in the
    header or a default system prompt); without end-of-turn tokens, the first occurrence."""
    first, best, at = -1, -1, full.find(content, lo, hi)
    while at >= 0:
        first = at if first < 0 else first
        end = at + len(content)
        if _end_of_turn(full, end, hi, specials) > end:
            best = at
        at = full.find(content, at + 1, hi)
    return best if best >= 0 else first


def _prefix_spans(render, msgs, full, specials, stats: SpanStats):
    """Fallback for templates that rewrite contents: bound message k by the renderings of messages[:k] and
    messages[:k+1] (each must be a prefix of the full rendering), skip the assistant header given by the
    generation prompt, and find the content inside; where prefixes are not stable, search from a cursor."""
    spans, cursor = [], 0
    prefix_len = {}

    def plen(k: int, gen: bool = False) -> int | None:
        key = (k, gen)
        if key not in prefix_len:
            try:
                text = render(msgs[:k], add_generation_prompt=gen) if k or gen else ""
            except Exception:
                text = None
            prefix_len[key] = len(text) if text is not None and full.startswith(text) else None
        return prefix_len[key]

    for k, m in enumerate(msgs):
        lo, hi = plen(k), plen(k + 1)
        if lo is None or hi is None or hi < lo:
            lo, hi = cursor, len(full)
        lo = max(lo, cursor)
        if m["role"] == "assistant":
            g = plen(k, True)
            if g is not None and lo <= g <= hi:
                lo = g
        content = m["content"]
        at = _locate(full, content, lo, hi, specials)
        if at < 0 and content.strip() != content:
            content = content.strip()
            at = _locate(full, content, lo, hi, specials)
        if at < 0:
            if m["role"] == "assistant":
                stats.unlocated += 1
                spans.append((lo, hi))
            cursor = max(cursor, lo)
            continue
        end = at + len(content)
        if m["role"] == "assistant":
            spans.append((at, _end_of_turn(full, end, hi, specials)))
        cursor = end
    return spans


# ---- tokenisation -----------------------------------------------------------------------------------


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


def _plain_fallback_text(conv: list[dict]) -> tuple[str, list]:
    """No chat template: the same "role: content" text as zebra.data.chat.render, with assistant spans."""
    parts, spans, cur = [], [], 0
    for i, m in enumerate(conv):
        head = ("\n\n" if i else "") + f"{m['role']}: "
        parts += [head, m["content"]]
        cur += len(head)
        if m["role"] == "assistant":
            spans.append((cur, cur + len(m["content"])))
        cur += len(m["content"])
    return "".join(parts), spans


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


# ---- ILD / KD split ---------------------------------------------------------------------------------


def ild_kd_part(index: int, ild_fraction: float = 0.2, seed: int = 0, salt: str = "") -> str:
    """"ild" or "kd" for conversation `index`, from a stable hash (process- and platform-independent)."""
    h = hashlib.sha256(f"zebra-ild-kd:{seed}:{salt}:{index}".encode()).digest()
    return "ild" if int.from_bytes(h[:8], "big") / 2.0**64 < ild_fraction else "kd"


def split_ild_kd(conversations: Iterable, ild_fraction: float = 0.2, seed: int = 0,
                 salt: str = "") -> tuple[list, list]:
    """(ild, kd) lists: conversation i goes to ILD with probability `ild_fraction`, by `ild_kd_part(i, ...)`.
    The same (fraction, seed, salt) splits the same way everywhere, so the ILD and KD stages never share a
    conversation, whatever they each consume."""
    if not 0.0 <= ild_fraction <= 1.0:
        raise ZebraError(f"ild_fraction must be in [0, 1], got {ild_fraction}")
    ild, kd = [], []
    for i, conv in enumerate(conversations):
        (ild if ild_kd_part(i, ild_fraction, seed, salt) == "ild" else kd).append(conv)
    return ild, kd


# ---- packing ----------------------------------------------------------------------------------------


class _Rows:
    """Row r of a packing is the token range [r*T, (r+1)*T) of the documents laid end to end: epoch 0's
    order, then epoch 1's, ... (cycling) or epoch 0 only, then padding (finite). Any row can be built
    directly, so skipping ahead costs nothing."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int, shuffle: bool, cycle: bool, pad_id: int):
        if seq_len < 1:
            raise ZebraError(f"seq_len must be positive, got {seq_len}")
        if corpus.num_tokens == 0:
            raise ZebraError("no tokens to pack (the selected data is empty)")
        self.c, self.T, self.seed, self.shuffle, self.cycle, self.pad = corpus, seq_len, seed, shuffle, cycle, pad_id
        self.S = corpus.num_tokens
        self.epoch_rows = -(-self.S // seq_len)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            n = len(self.c)
            perm = (np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle
                    else np.arange(n))
            cum = np.concatenate([[0], np.cumsum(self.c.lengths[perm])])
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (perm, cum)
        return self._epochs[e]

    def rows(self, start: int, n: int) -> dict[str, np.ndarray]:
        T = self.T
        ids = np.full((n, T), self.pad, np.int64)
        doc = np.zeros((n, T), np.int64)
        mask = np.zeros((n, T), np.int64)
        attn = np.zeros((n, T), np.int64)
        offsets, cids, cmask = self.c.offsets, self.c.ids, self.c.mask
        for i in range(n):
            g, pos, did = (start + i) * T, 0, 0
            while pos < T:
                e, q = divmod(g, self.S)
                if e > 0 and not self.cycle:  # past the data: pad the rest, as a document of its own
                    doc[i, pos:] = did
                    break
                perm, cum = self._epoch(e)
                j = int(np.searchsorted(cum, q, side="right")) - 1
                d, off = perm[j], q - cum[j]
                take = int(min(cum[j + 1] - q, T - pos))
                a = offsets[d] + off
                ids[i, pos:pos + take] = cids[a:a + take]
                mask[i, pos:pos + take] = cmask[a:a + take]
                mask[i, pos] = 0  # a piece's first token has nothing before it in this row to predict it from
                attn[i, pos:pos + take] = 1
                doc[i, pos:pos + take] = did
                did += 1
                pos += take
                g += take
        return {"input_ids": ids, "doc_ids": doc, "loss_mask": mask, "attention_mask": attn}


def _to_torch(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in rows.items()}


def pack(examples: Iterable[tuple[Sequence[int], Sequence[int]]] | TokenizedCorpus, seq_len: int = 2048,
         pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pack (ids, loss_mask) documents, in order, into rows of exactly `seq_len` (see the module doc):
    a dict of (R, seq_len) LongTensors input_ids / doc_ids / loss_mask / attention_mask, R = ceil(N / seq_len)."""
    corpus = examples if isinstance(examples, TokenizedCorpus) else TokenizedCorpus.from_examples(examples)
    r = _Rows(corpus, seq_len, seed=0, shuffle=False, cycle=False, pad_id=pad_id)
    return _to_torch(r.rows(0, r.epoch_rows))


def _dist_default(rank, world):
    if rank is None or world is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    return rank, world


class PackedStream:
    """Batches of packed rows, deterministic given `seed`, resumable.

    - Order: documents in a seeded random permutation per epoch (`shuffle=False`: corpus order).
    - Budget: `max_tokens=None` -> one pass over the data (the last row padded, the last batch possibly
      short). `max_tokens=N` -> ceil(N / (batch_size * seq_len * world)) full batches per rank (N counted as
      rows * seq_len over all ranks); the data repeats (reshuffled per epoch, packed across the epoch
      boundary) if one pass is shorter than that.
    - Ranks: with `world` > 1 (default: torch.distributed's), each round of `world` consecutive batches
      gives rank r the r-th; only whole rounds are produced, so every rank gets the same number of batches
      (the caller must not shard again).
    - Resume: `state_dict()` = {"rows": global rows consumed, ...}; `load_state_dict` on a stream built the
      same way makes the next batch the one that would have come next (skip-ahead is free: rows are
      computed directly from their position).
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int = 2048, batch_size: int = 1, seed: int = 0,
                 max_tokens: int | None = None, shuffle: bool = True, pad_id: int = 0,
                 rank: int | None = None, world: int | None = None):
        if batch_size < 1:
            raise ZebraError(f"batch_size must be positive, got {batch_size}")
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed
        self.max_tokens = max_tokens
        self.rank, self.world = _dist_default(rank, world)
        self._rows = _Rows(corpus, seq_len, seed, shuffle, cycle=max_tokens is not None, pad_id=pad_id)
        if max_tokens is None:
            self.total_rows = self._rows.epoch_rows
            n_batches = -(-self.total_rows // batch_size)
            self.rounds = n_batches // self.world if self.world > 1 else n_batches
        else:
            if max_tokens < 1:
                raise ZebraError(f"max_tokens must be positive, got {max_tokens}")
            # rounded up to whole rounds, so a trainer counting ceil(tokens / tokens per step) never runs dry
            self.rounds = -(-max_tokens // (batch_size * seq_len * self.world))
            self.total_rows = self.rounds * self.world * batch_size
        self.row = 0  # global rows consumed (all ranks)
        self._fingerprint = None
        self._warned_repeat = False

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def epochs(self) -> float:
        """How many passes over the data the budget takes."""
        return self.total_rows / self._rows.epoch_rows

    def __len__(self) -> int:
        """Batches this rank still has to produce."""
        per_round = self.batch_size * self.world
        return max(0, self.rounds - self.row // per_round)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.corpus.fingerprint()
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"rows": self.row, "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
                "world": self.world, "data": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        # the world size may change: rows are counted globally, so the data simply continues from there
        for k in ("seq_len", "batch_size", "seed", "data"):
            mine = self.fingerprint() if k == "data" else getattr(self, k)
            if k in state and state[k] != mine:
                raise ZebraError(f"cannot resume this data stream: its {k} is {mine!r}, the checkpoint's is "
                                 f"{state[k]!r} (resuming needs the same data, seq_len, batch size and seed)")
        self.row = int(state["rows"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, W = self.batch_size, self.world
        while True:
            rnd = self.row // (B * W)
            if rnd >= self.rounds:
                return
            start = self.row + self.rank * B
            n = min(B, self.total_rows - start)
            if n <= 0:
                return
            if not self._warned_repeat and (start + n) > self._rows.epoch_rows and self._rows.cycle:
                self._warned_repeat = True
                _say(f"the token budget ({self.max_tokens:,}) is {self.epochs:.2f} passes over the data: "
                     "repeating it (reshuffled each pass)")
            batch = _to_torch(self._rows.rows(start, n))
            self.row += B * W  # before yielding: a checkpoint taken now resumes after this batch
            yield batch


def build_dataset(tok, sources, seq_len: int = 2048, split: str = "kd", seed: int = 0,
                  max_tokens: int | None = None, batch_size: int = 1, loss_on: str = "assistant",
                  cache_dir: str | os.PathLike | None = None, ild_fraction: float = 0.2, split_seed: int = 0,
                  rank: int | None = None, world: int | None = None, verbose: bool = False) -> PackedStream:
    """A PackedStream over `sources` (one spec or a list, see zebra.data.sources), restricted to the
    ILD part (`split="ild"`), the KD part ("kd") or everything ("all") of each source.

    The split uses `split_seed` (not `seed`, which only shuffles), so stages run with different shuffle
    seeds still get disjoint ILD / KD data. Tokenised sources are cached in `cache_dir` when given."""
    if split not in ("ild", "kd", "all"):
        raise ZebraError(f"split must be 'ild', 'kd' or 'all', got {split!r}")
    if isinstance(sources, (str, dict, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ZebraError("no data sources given")
    parts = []
    for spec in sources:
        corpus = tokenize_source(tok, spec, loss_on=loss_on, cache_dir=cache_dir, verbose=verbose)
        if split != "all":
            salt = source_key(spec)
            keep = [d for d in range(len(corpus)) if ild_kd_part(d, ild_fraction, split_seed, salt) == split]
            corpus = corpus.select(keep)
        parts.append(corpus)
    corpus = TokenizedCorpus.concat(parts)
    if corpus.num_tokens == 0:
        raise ZebraError(f"the {split} part of the data is empty")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return PackedStream(corpus, seq_len=seq_len, batch_size=batch_size, seed=seed, max_tokens=max_tokens,
                        pad_id=pad, rank=rank, world=world)
