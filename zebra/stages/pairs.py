"""Preference pairs from chat data (SPEC 8 needs (prompt, chosen, rejected); no public preference set is
available offline): chosen = the dataset's reply, rejected = the student's own sample for that prompt.

    zebra make-pairs --model runs/x/distill/model --num-pairs 512 --out pairs.jsonl

Prompts come from the distillation share of the chat data (never the held-out slice): conversations whose
first turn is a user message with an assistant reply; the prompt is that first user turn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ZebraError


def prompts_and_replies(conversations, num: int, max_prompt_chars: int = 2000, max_reply_chars: int = 4000):
    out = []
    for conv in conversations:
        if not isinstance(conv, list) or len(conv) < 2 or conv[0]["role"] != "user" or conv[1]["role"] != "assistant":
            continue
        p, r = conv[0]["content"].strip(), conv[1]["content"].strip()
        if not p or not r or len(p) > max_prompt_chars or len(r) > max_reply_chars:
            continue
        out.append(([{"role": "user", "content": p}], r))
        if len(out) >= num:
            break
    if not out:
        raise ZebraError("no usable (user prompt, assistant reply) conversations for preference pairs")
    return out


@torch.no_grad()
def make_pairs(model, tok, conversations, num_pairs: int, out_path, max_new_tokens: int = 256,
               temperature: float = 1.0, batch_size: int = 8, seed: int = 0, progress: bool = True) -> int:
    """Write JSONL lines {"prompt": [messages], "chosen": str, "rejected": str}; returns the count."""
    from tqdm import tqdm

    items = prompts_and_replies(conversations, num_pairs)
    if tok.pad_token is None:  # e.g. the GGUF tokenizer under transformers 5.17
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues at the right edge
    torch.manual_seed(seed)
    rows = []
    it = range(0, len(items), batch_size)
    for b in (tqdm(it, desc="make-pairs", unit="batch") if progress else it):
        chunk = items[b:b + batch_size]
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=None, top_k=None,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        for (prompt, reply), g in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            sample = tok.decode(g, skip_special_tokens=True).strip()
            if sample and sample != reply:
                rows.append({"prompt": prompt, "chosen": reply, "rejected": sample})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out_path)
    return len(rows)


def read_pairs(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise ZebraError(f"preference file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZebraError(f"{path}:{n}: not JSON ({e})") from None
        if not all(k in r for k in ("prompt", "chosen", "rejected")):
            raise ZebraError(f"{path}:{n}: needs keys prompt, chosen, rejected")
        if isinstance(r["prompt"], str):
            r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        rows.append(r)
    if not rows:
        raise ZebraError(f"{path} holds no preference pairs")
    return rows
