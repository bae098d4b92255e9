"""Chat conversations -> token sequences through the model's chat template.

The held-out slice (a stable 2% of the ShareGPT conversations by index hash, see sharegpt.is_heldout) is
what every KL / agreement figure is measured on; training stages must draw from the other 98%.

    from zebra.data.chat import heldout_sequences
    seqs = heldout_sequences(tok, num_seqs=64, seq_len=512)   # list of 1-D LongTensors
"""

from __future__ import annotations

import torch

from ..errors import ZebraError
from .sharegpt import is_heldout, iter_sharegpt

HELDOUT_FRACTION = 0.02
HELDOUT_SEED = 0


def render(tok, conversation: list[dict]) -> list[int]:
    """Token ids of a whole conversation rendered with the tokenizer's chat template."""
    if not getattr(tok, "chat_template", None):
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation)
        return tok(text, add_special_tokens=True)["input_ids"]
    text = tok.apply_chat_template(conversation, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def heldout_sequences(tok, num_seqs: int, seq_len: int, min_len: int = 32, path=None) -> list[torch.Tensor]:
    """The first `num_seqs` held-out conversations (in file order) with at least `min_len` tokens,
    each truncated to `seq_len` tokens."""
    out = []
    for i, conv in enumerate(iter_sharegpt(path)):
        if not is_heldout(i, HELDOUT_FRACTION, HELDOUT_SEED):
            continue
        ids = render(tok, conv)[:seq_len]
        if len(ids) >= min_len:
            out.append(torch.tensor(ids, dtype=torch.long))
        if len(out) >= num_seqs:
            break
    if not out:
        raise ZebraError("no held-out conversations found in the chat data")
    return out
