"""A fast multiple-choice accuracy proxy for training loops: lm-eval's own requests and metrics, our own forward.

`zebra eval` (lm-eval's HFLM) spends most of its time in Python: on every call it rebuilds and tokenises each
request and picks each one's log-probabilities apart on its own (500 documents each of ARC-E, HellaSwag and
PIQA: ~16 s for a 135M model on an H200). Inside a training loop the same small question set is scored every
few hundred steps, so everything that does not depend on the weights is done once:

    from zebra.eval.quick import QuickMC
    quick = QuickMC.build(tokenizer, tasks=("arc_easy", "hellaswag", "piqa"), limit=500)   # once (~8 s)
    quick.score(model)   # {"arc_easy": {"acc": .., "acc_norm": ..}, ..., "avg_acc_norm": ..}

(those 5001 requests: ~1.8 s at batch_size 64, ~1.0 s at 256 for the 135M teacher architecture in bf16 on
an H200; the batches are built on the first call for each batch size and device and kept.)

build() takes the (context, continuation) loglikelihood requests of the first `limit` documents from lm-eval's
task objects (zebra.eval.lm_eval_tasks.build_tasks on the offline data, zero-shot), and tokenises them as HFLM
does for loglikelihood (lm_eval.api.model.TemplateLM.loglikelihood / _encode_pair, HFLM.tok_encode): the
context's trailing spaces move into the continuation, context + continuation are encoded together and the
tokens after the context's own encoding are the continuation; an empty context becomes the BOS (else EOS)
token. score() runs right-padded batches (longest first) through `model(input_ids, attention_mask)` without a
cache or generate(), sums the log-probabilities of the continuation tokens and computes lm-eval's
multiple-choice metrics: acc = argmax of the loglikelihoods is the gold choice, acc_norm = the same after
dividing each by its choice's length in characters (lm-eval 0.4's `completion_len`; ties go to the first
choice, as with np.argmax). Log-softmax is taken in float32 whatever the model's dtype (HFLM uses the model's
dtype), so on a bf16 model the numbers can differ from `zebra eval` in near-ties; in float32 they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ZebraError

DEFAULT_TASKS = ("arc_easy", "hellaswag", "piqa")


@dataclass(frozen=True)
class MCRequest:
    """One loglikelihood request: choice `choice` of document `doc` (0-based, in lm-eval's order) of `task`."""

    task: str
    doc: int
    choice: int
    context: str
    continuation: str


@dataclass(frozen=True)
class _TaskTable:
    """Per task: request index of each (document, choice) (-1 past a document's last choice), the gold choice
    (-100 where lm-eval finds none: never counted correct) and each choice's length in characters."""

    index: np.ndarray    # (docs, max_choices) int64
    gold: np.ndarray     # (docs,) int64
    length: np.ndarray   # (docs, max_choices) float64, 1 where there is no choice


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor
    rows: torch.Tensor       # (K,) batch row of each scored position
    cols: torch.Tensor       # (K,) its position: the logits there predict `targets`
    targets: torch.Tensor    # (K,) the continuation token
    owner: torch.Tensor      # (K,) the request it belongs to


def pair_encoder(tokenizer) -> Callable[[str, str], tuple[list[int], list[int]]]:
    """(context, continuation) -> (context tokens, continuation tokens) exactly as lm-eval's HFLM.loglikelihood
    makes them with add_bos_token unset (how make_hflm builds it): HFLM.tok_encode uses the tokenizer's own
    special-token default, except that a string already starting with the prefix token's text is encoded
    without them. Context encodings are memoised (every choice of a document shares its context)."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix_text = tokenizer.decode(prefix_id)

    def encode(text: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and prefix_text and text.startswith(prefix_text):
            kwargs["add_special_tokens"] = False
        return tokenizer.encode(text, **kwargs)

    encode_context = lru_cache(maxsize=None)(encode)

    def pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = encode(continuation, add_special_tokens=False)
            return ([prefix_id], cont) if prefix_id != cont[0] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = encode_context(context)
        return list(ctx), encode(context + continuation)[len(ctx):]

    return pair


def _gold(task, doc: dict, choices: list[str]) -> int:
    """The gold choice index as lm-eval's ConfigurableTask.process_results finds it (-100: none)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return int(gold) if int(gold) < len(choices) else -100


def _check_task(name: str, task) -> None:
    """Only what _TaskTable mirrors: one multiple-choice task with lm-eval's default result processing."""
    if not hasattr(task, "build_all_requests"):
        raise ZebraError(f"QuickMC scores single lm-eval tasks; {name} is a group")
    if task.OUTPUT_TYPE != "multiple_choice":
        raise ZebraError(f"QuickMC scores multiple-choice tasks; {name} is {task.OUTPUT_TYPE}")
    if callable(task.config.process_results) or task.multiple_target or "acc_mutual_info" in task._metric_fn_list:
        raise ZebraError(f"QuickMC cannot mirror {name}'s metrics (custom results / several targets / mutual info)")


class QuickMC:
    """Pre-tokenised multiple-choice requests of a few lm-eval tasks, scored in batched forwards (see module doc)."""

    def __init__(self, requests: list[MCRequest], tokens: list[tuple[list[int], list[int]]],
                 tables: dict[str, _TaskTable]):
        self.requests = requests
        self.tables = tables
        self._tokens = tokens
        # longest first (lm-eval's order too): the padded length of a batch is its first row's
        self._order = sorted(range(len(tokens)), key=lambda i: -(len(tokens[i][0]) + len(tokens[i][1])))
        self._batches: dict[tuple[int, str], list[_Batch]] = {}

    @classmethod
    def build(cls, tokenizer, tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS, limit: int | None = 500,
              data_root: str | Path | None = None) -> QuickMC:
        """Requests of the first `limit` documents (None: all) of each task, zero-shot, tokenised for `tokenizer`."""
        from .lm_eval_tasks import build_tasks, parse_tasks

        names = parse_tasks(list(tasks))
        built = build_tasks(names, data_root)
        encode = pair_encoder(tokenizer)
        requests: list[MCRequest] = []
        tokens: list[tuple[list[int], list[int]]] = []
        tables: dict[str, _TaskTable] = {}
        for name in names:
            task = built[name]
            _check_task(name, task)
            task.set_config(key="num_fewshot", value=0)
            task.build_all_requests(limit=limit)
            docs: dict[int, dict] = {}
            per_doc: dict[int, dict[int, int]] = {}
            for inst in task.instances:
                docs[inst.doc_id] = inst.doc
                context, continuation = inst.args[:2]
                per_doc.setdefault(inst.doc_id, {})[inst.idx] = len(requests)
                ctx, cont = encode(context, continuation)
                if not ctx or not cont:  # lm-eval asserts both are non-empty
                    raise ZebraError(f"{name} doc {inst.doc_id} choice {inst.idx}: empty context or continuation "
                                     "after tokenisation")
                requests.append(MCRequest(name, inst.doc_id, inst.idx, context, continuation))
                tokens.append((ctx, cont))
            ids = sorted(per_doc)
            width = max(len(per_doc[d]) for d in ids)
            index = np.full((len(ids), width), -1, dtype=np.int64)
            length = np.ones((len(ids), width), dtype=np.float64)
            gold = np.empty(len(ids), dtype=np.int64)
            for row, d in enumerate(ids):
                choices = task.doc_to_choice(docs[d])
                for c, r in per_doc[d].items():
                    index[row, c] = r
                length[row, :len(choices)] = [float(len(ch)) for ch in choices]
                gold[row] = _gold(task, docs[d], choices)
            tables[name] = _TaskTable(index, gold, length)
        return cls(requests, tokens, tables)

    def _batches_for(self, batch_size: int, device: torch.device, pad_id: int) -> list[_Batch]:
        """The padded batches for this batch size, built once and kept on `device`."""
        key = (batch_size, str(device))
        if key not in self._batches:
            out = []
            for start in range(0, len(self._order), batch_size):
                chunk = self._order[start:start + batch_size]
                # inputs are context + continuation less the last token; the logits at the last len(cont)
                # input positions predict the continuation
                seqs = [(self._tokens[i][0] + self._tokens[i][1])[:-1] for i in chunk]
                width = len(seqs[0])
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                rows, cols, targets, owner = [], [], [], []
                for b, (i, seq) in enumerate(zip(chunk, seqs)):
                    ids[b, :len(seq)] = torch.tensor(seq)
                    mask[b, :len(seq)] = 1
                    cont = self._tokens[i][1]
                    rows += [b] * len(cont)
                    cols += range(len(seq) - len(cont), len(seq))
                    targets += cont
                    owner += [i] * len(cont)
                out.append(_Batch(ids.to(device), mask.to(device), *(torch.tensor(v, device=device)
                                                                      for v in (rows, cols, targets, owner))))
            self._batches[key] = out
        return self._batches[key]

    @torch.no_grad()
    def loglikelihoods(self, model, batch_size: int = 64) -> np.ndarray:
        """float64 log P(continuation | context) of every request, in the order of self.requests. The model is
        put in eval mode for the call (dropout off) and given back in the mode it came in."""
        if batch_size < 1:
            raise ZebraError("batch_size must be >= 1")
        device = next(model.parameters()).device
        pad_id = getattr(model.config, "pad_token_id", None)
        was_training = model.training
        model.eval()
        try:
            total = torch.zeros(len(self.requests), dtype=torch.float32, device=device)
            for b in self._batches_for(batch_size, device, pad_id if isinstance(pad_id, int) else 0):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                logp = logits[b.rows, b.cols].float().log_softmax(-1)
                total.index_add_(0, b.owner, logp.gather(1, b.targets[:, None]).squeeze(1))
        finally:
            model.train(was_training)
        return total.cpu().double().numpy()

    def metrics(self, lls: np.ndarray) -> dict:
        """lm-eval's acc / acc_norm per task from per-request loglikelihoods, and their mean acc_norm."""
        out: dict = {}
        for name, t in self.tables.items():
            ll = np.where(t.index >= 0, lls[np.maximum(t.index, 0)], -np.inf)
            out[name] = {"acc": float(np.mean(ll.argmax(1) == t.gold)),
                         "acc_norm": float(np.mean((ll / t.length).argmax(1) == t.gold))}
        out["avg_acc_norm"] = float(np.mean([out[n]["acc_norm"] for n in self.tables]))
        return out

    def score(self, model, batch_size: int = 64) -> dict:
        """{task: {"acc", "acc_norm"}, ..., "avg_acc_norm"} of `model` (any transformers causal LM, any device)."""
        return self.metrics(self.loglikelihoods(model, batch_size))
