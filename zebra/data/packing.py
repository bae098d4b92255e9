"""Tokenise conversations with a loss mask, pack them into fixed-length rows, and stream resumable batches.

    from zebra.data.packing import build_dataset
    stream = build_dataset(tok, ["sharegpt"], seq_len=2048, split="kd", seed=0, max_tokens=10**8,
                           batch_size=8, cache_dir="~/.cache/zebra/tokenized")
    for batch in stream:            # dict of (B, T) LongTensors: input_ids, doc_ids, loss_mask, attention_mask
        ...
    state = stream.state_dict()     # {"rows": ...}: load_state_dict(state) on a fresh stream continues exactly

Pieces: zebra.data.render (chat template rendering and assistant spans), zebra.data.corpus (tokenisation,
TokenizedCorpus, the on-disk cache), zebra.data.split (the ILD / KD split), and here:

- `pack(examples, seq_len)`: greedy packing. Documents are laid end to end and cut into rows of exactly
  seq_len tokens, so no row but the last has padding. A document that crosses a row boundary (in particular
  any document longer than seq_len) continues in the next row as a NEW document piece: its own doc id,
  positions restarting at 0, no attention to / Mamba2 state from its earlier piece (the model sees a row
  alone). The last partial row is padded (pad id, loss_mask 0, attention_mask 0) with a doc id of its own,
  so padding never attends into real documents; it is kept rather than dropped so small sources lose no data.
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

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ZebraError
from .corpus import (  # noqa: F401  (re-exported: the data pipeline's one import)
    LOSS_ON,
    CorpusView,
    ShardedCorpus,
    TokenizedCorpus,
    as_view,
    _say,
    tokenize_conversation,
    tokenize_many,
    tokenize_source,
    tokenizer_fingerprint,
)
from .sources import source_key
from .split import ild_kd_part, split_ild_kd  # noqa: F401  (re-exported)


class _Rows:
    """Row r of a packing is the token range [r*T, (r+1)*T) of the documents laid end to end: epoch 0's
    order, then epoch 1's, ... (cycling) or epoch 0 only, then padding (finite). Any row can be built
    directly from the corpus view (memory-mapped shards are read only where a row lies), so skipping ahead
    costs nothing."""

    def __init__(self, corpus: CorpusView, seq_len: int, seed: int, shuffle: bool, cycle: bool, pad_id: int):
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
        T, c = self.T, self.c
        ids = np.full((n, T), self.pad, np.int64)
        doc = np.zeros((n, T), np.int64)
        mask = np.zeros((n, T), np.int64)
        attn = np.zeros((n, T), np.int64)
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
                cids, cmask = c.parts[c.part[d]]
                a = c.start[d] + off
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
    corpus = examples if isinstance(examples, (TokenizedCorpus, CorpusView)) else TokenizedCorpus.from_examples(examples)
    r = _Rows(as_view(corpus), seq_len, seed=0, shuffle=False, cycle=False, pad_id=pad_id)
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

    def __init__(self, corpus: TokenizedCorpus | CorpusView, seq_len: int = 2048, batch_size: int = 1, seed: int = 0,
                 max_tokens: int | None = None, shuffle: bool = True, pad_id: int = 0,
                 rank: int | None = None, world: int | None = None, prefetch: int = 2):
        if batch_size < 1:
            raise ZebraError(f"batch_size must be positive, got {batch_size}")
        corpus = as_view(corpus)
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
        self.prefetch = prefetch  # batches built ahead by a background thread
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
        # the world size may change: rows are counted globally, so the data simply continues from there, as long
        # as a round (batch size x ranks) is as many rows as before
        saved_round = state.get("batch_size", self.batch_size) * state.get("world", self.world)
        if saved_round != self.batch_size * self.world:
            raise ZebraError(f"cannot resume this data stream: {self.batch_size} rows x {self.world} ranks per step, "
                             f"the checkpoint's {state.get('batch_size')} x {state.get('world')} (resuming needs the "
                             "same global batch)")
        for k in ("seq_len", "seed", "data"):
            mine = self.fingerprint() if k == "data" else getattr(self, k)
            if k in state and state[k] != mine:
                raise ZebraError(f"cannot resume this data stream: its {k} is {mine!r}, the checkpoint's is "
                                 f"{state[k]!r} (resuming needs the same data, seq_len, global batch and seed)")
        self.row = int(state["rows"])

    def _positions(self):
        """(row counter after the batch, first row, rows) of every batch this rank has still to produce."""
        B, W = self.batch_size, self.world
        row = self.row
        while row // (B * W) < self.rounds:
            start = row + self.rank * B
            n = min(B, self.total_rows - start)
            if n <= 0:
                return
            row += B * W
            yield row, start, n

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order; with prefetch > 0 a background thread builds the next ones (reading the memory-mapped
        corpus) while the caller trains. The stream's position (state_dict) advances as batches are handed out,
        so a checkpoint taken after a batch resumes with the next one whatever was prefetched."""
        positions = self._positions()
        if self.prefetch <= 0:
            for row, start, n in positions:
                batch = self._batch(start, n)
                self.row = row  # before yielding: a checkpoint taken now resumes after this batch
                yield batch
            return
        import queue
        import threading

        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for row, start, n in positions:
                    item = (row, self._batch(start, n))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
                q.put(e)

        t = threading.Thread(target=produce, daemon=True, name="zebra-prefetch")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.row = item[0]
                yield item[1]
        finally:
            stop.set()

    def _batch(self, start: int, n: int) -> dict[str, torch.Tensor]:
        if not self._warned_repeat and (start + n) > self._rows.epoch_rows and self._rows.cycle:
            self._warned_repeat = True
            _say(f"the token budget ({self.max_tokens:,}) is {self.epochs:.2f} passes over the data: "
                 "repeating it (reshuffled each pass)")
        return _to_torch(self._rows.rows(start, n))


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
        corpus = as_view(tokenize_source(tok, spec, loss_on=loss_on, cache_dir=cache_dir, verbose=verbose))
        if split != "all":
            salt = source_key(spec)
            keep = [d for d in range(len(corpus)) if ild_kd_part(d, ild_fraction, split_seed, salt) == split]
            corpus = corpus.select(keep)
        parts.append(corpus)
    corpus = CorpusView.concat(parts)
    if corpus.num_tokens == 0:
        raise ZebraError(f"the {split} part of the data is empty")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return PackedStream(corpus, seq_len=seq_len, batch_size=batch_size, seed=seed, max_tokens=max_tokens,
                        pad_id=pad, rank=rank, world=world)
