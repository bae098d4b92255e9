"""DPO (SPEC 8): sigmoid DPO on (prompt, chosen, rejected) with the distilled student itself, frozen, as
the reference model (the paper finds this much more stable than a separate reference).

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

Sequence log-probabilities sum over the response tokens only (prompt tokens are context).
"""

from __future__ import annotations

import math

import torch

from ..errors import ZebraError
from .losses import dpo_loss, sequence_logprob


def encode_pair(tok, pair: dict, max_len: int):
    """(ids_chosen, mask_chosen, ids_rejected, mask_rejected): prompt via the chat template, then the
    response and the end-of-turn token; mask 1 on response tokens. Truncated to max_len from the right."""
    prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for key in ("chosen", "rejected"):
        r_ids = tok(pair[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p_ids + r_ids)[:max_len]
        mask = ([0] * len(p_ids) + [1] * len(r_ids))[:max_len]
        out += [ids, mask]
    return out


class PairStream:
    """Batches of encoded pairs, `epochs` passes in a seeded order; resumable by position. With several ranks
    (rank / world, default: the process group's) each global batch of batch_size x world pairs is split, rank r
    taking rows [r x batch_size, (r + 1) x batch_size): the ranks together see the pairs of one rank with
    batch_size x world, each pair once. When the pairs do not fill the last global batch, the order is padded with
    its own beginning (as torch's DistributedSampler does), so every rank has a batch at every step."""

    def __init__(self, tok, pairs, batch_size: int, max_len: int, epochs: int = 1, seed: int = 0,
                 rank: int | None = None, world: int | None = None):
        from .parallel import rank_world

        self.enc = [encode_pair(tok, p, max_len) for p in pairs]
        self.enc = [e for e in self.enc if sum(e[1]) and sum(e[3])]  # responses not truncated away
        if not self.enc:
            raise ZebraError("DPO has no usable pairs (none given, or every response truncated away by max_len)")
        self.batch_size, self.max_len, self.epochs, self.seed = batch_size, max_len, epochs, seed
        r, w = rank_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.pos = 0
        n = len(self.enc)
        self.order = []
        for e in range(epochs):
            g = torch.Generator().manual_seed(seed + e)
            self.order += torch.randperm(n, generator=g).tolist()
        per_step = batch_size * self.world
        self.num_batches = math.ceil(len(self.order) / per_step)  # per rank (= optimizer steps of one micro-batch)
        if self.world > 1:
            short = self.num_batches * per_step - len(self.order)
            self.order += (self.order * (short // len(self.order) + 1))[:short]
        self.tokens_per_batch = batch_size * 2 * max_len  # budget unit (upper bound)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]

    def _pad(self, seqs):
        T = max(len(s) for s in seqs)
        t = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        m = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            t[i, :len(s)] = torch.tensor(s)
            m[i, :len(s)] = 1
        return t, m

    def __iter__(self):
        while self.pos < self.num_batches:
            start = (self.pos * self.world + self.rank) * self.batch_size
            idx = self.order[start:start + self.batch_size]
            self.pos += 1
            rows = [self.enc[i] for i in idx]
            seqs = [r[0] for r in rows] + [r[2] for r in rows]  # chosen first, then rejected
            ids, attn = self._pad(seqs)
            resp, _ = self._pad([r[1] for r in rows] + [r[3] for r in rows])
            yield {"input_ids": ids, "attention_mask": attn, "response_mask": resp[:, :ids.shape[1]] * attn}


def make_dpo_loss(policy, reference, beta: float = 0.1):
    def loss_fn(batch):
        ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        n = ids.shape[0] // 2
        logits = policy(ids, attention_mask=attn, use_cache=False).logits
        lp = sequence_logprob(logits, ids, resp)
        with torch.no_grad():
            ref_lp = sequence_logprob(reference(ids, attention_mask=attn, use_cache=False).logits, ids, resp)
        loss, metrics = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], beta=beta)
        return loss, int(resp.sum()), metrics
    return loss_fn
