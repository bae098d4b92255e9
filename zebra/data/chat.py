"""Chat conversations -> token sequences through the model's chat template.

The held-out slice (a stable 2% of the ShareGPT conversations by index hash, see sharegpt.is_heldout) is
what every KL / agreement figure is measured on; training stages must draw from the other 98%.

Two evaluation sets are drawn from it, in file order:

- `heldout_sequences`: each conversation through the chat template, exactly as training tokenises chats.
- `plaintext_heldout_sequences`: each conversation as plain text, no chat template: the message contents
  joined with "\\n\\n" (`zebra.data.sources.plain_text`, what a source's render="plain" trains on),
  tokenised with the tokenizer's own special tokens (as a plain document; no EOS appended). No stage trains
  on it either: it is the same held-out slice.

    from zebra.data.chat import heldout_sequences, plaintext_heldout_sequences
    seqs = heldout_sequences(tok, num_seqs=64, seq_len=512)             # list of 1-D LongTensors
    plain = plaintext_heldout_sequences(tok, num_seqs=64, seq_len=512)  # the same, rendered as plain text
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import ZebraError
from .sharegpt import is_heldout, iter_sharegpt
from .sources import plain_text

HELDOUT_FRACTION = 0.02
HELDOUT_SEED = 0


def render(tok, conversation: list[dict]) -> list[int]:
    """Token ids of a whole conversation rendered with the tokenizer's chat template."""
    if not getattr(tok, "chat_template", None):
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation)
        return tok(text, add_special_tokens=True)["input_ids"]
    text = tok.apply_chat_template(conversation, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def heldout_conversations(path=None) -> Iterator[list[dict]]:
    """The held-out ShareGPT conversations, in file order."""
    return (conv for i, conv in enumerate(iter_sharegpt(path)) if is_heldout(i, HELDOUT_FRACTION, HELDOUT_SEED))


def _first_heldout(encode: Callable[[list[dict]], list[int]], num_seqs: int, seq_len: int, min_len: int,
                   path) -> list[torch.Tensor]:
    """The first `num_seqs` held-out conversations with at least `min_len` tokens once encoded, each
    truncated to `seq_len` tokens."""
    out = []
    for conv in heldout_conversations(path):
        ids = encode(conv)[:seq_len]
        if len(ids) >= min_len:
            out.append(torch.tensor(ids, dtype=torch.long))
        if len(out) >= num_seqs:
            break
    if not out:
        raise ZebraError("no held-out conversations found in the chat data")
    return out


def heldout_sequences(tok, num_seqs: int, seq_len: int, min_len: int = 32, path=None) -> list[torch.Tensor]:
    """The first `num_seqs` held-out conversations (in file order) with at least `min_len` tokens,
    each truncated to `seq_len` tokens."""
    return _first_heldout(lambda conv: render(tok, conv), num_seqs, seq_len, min_len, path)


def plaintext_heldout_sequences(tok, num_seqs: int, seq_len: int, min_len: int = 32,
                                path=None) -> list[torch.Tensor]:
    """As `heldout_sequences`, but each conversation rendered as plain text (`plain_text`, no chat template)
    and tokenised with the tokenizer's own special tokens, as a plain training document is."""
    return _first_heldout(lambda conv: tok(plain_text(conv), add_special_tokens=True)["input_ids"],
                          num_seqs, seq_len, min_len, path)
