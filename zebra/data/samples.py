"""Teacher-sampled training data (sequence-level distillation): text from the teacher's own distribution, where
the teacher is most confident, rather than the replies of whatever model wrote the chat data. Two styles:

    "style": "answer"    (default) the teacher answers the first user turn of each conversation of a chat source;
                         (prompt, the teacher's answer) become training conversations.
    "style": "continue"  the teacher continues the first `prefix_tokens` tokens of each document of the source,
                         rendered as plain text (no chat template); prefix + continuation become plain documents:
                         free text in the teacher's pretraining-like distribution, the kind multiple-choice
                         benchmarks score (HellaSwag endings, ARC answers), which chat data covers least.

    {"type": "teacher_samples", "teacher": "smollm2-135m-instruct", "prompts": "sharegpt", "num": 20000,
     "max_new_tokens": 384, "batch_size": 256, "temperature": 1.0, "seed": 0, "max_prompt_tokens": 512,
     "style": "answer", "prefix_tokens": 32}

Generated once through `model.generate(..., cache_implementation="static")` (zebra.generation: the static-cache
engine, CUDA graphs on a GPU, one engine per batch size), on the GPU when there is one, and cached in
$ZEBRA_CACHE/samples/ under a hash of the spec (written to a temporary file and renamed: an interrupted run
leaves nothing half-written and starts again). The prompts come from the prompt source as `load_conversations`
yields it, i.e. without ShareGPT's held-out slice; conversations whose first turn is not a user message are
skipped. temperature 0 is greedy decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ZebraError

DEFAULTS = {"prompts": "sharegpt", "num": 2000, "max_new_tokens": 384, "batch_size": 64, "temperature": 1.0,
            "seed": 0, "max_prompt_tokens": 512, "style": "answer", "prefix_tokens": 32}
STYLES = ("answer", "continue")
KEYS = set(DEFAULTS) | {"teacher"}


def check_spec(spec: dict) -> dict:
    """The spec's sampling options with defaults filled in, checked (ZebraError naming the key)."""
    if not spec.get("teacher"):
        raise ZebraError("a teacher_samples source needs 'teacher': the model that writes the answers "
                         "(a name such as smollm2-135m-instruct or an HF folder)")
    out = {**DEFAULTS, **{k: v for k, v in spec.items() if k in KEYS}}
    if out["style"] not in STYLES:
        raise ZebraError(f"teacher_samples 'style' must be one of {', '.join(STYLES)}, got {out['style']!r}")
    for key in ("num", "max_new_tokens", "batch_size", "max_prompt_tokens", "prefix_tokens"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ZebraError(f"teacher_samples '{key}' must be a positive integer, got {v!r}")
    t = out["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        raise ZebraError(f"teacher_samples 'temperature' must be a number >= 0, got {t!r}")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int):
        raise ZebraError(f"teacher_samples 'seed' must be an integer, got {out['seed']!r}")
    if isinstance(out["prompts"], dict) and out["prompts"].get("type") == "teacher_samples":
        raise ZebraError("teacher_samples 'prompts' cannot itself be a teacher_samples source")
    return out


def samples_path(spec: dict) -> Path:
    """Where the samples of this spec are cached (a hash of the sampling options and the teacher)."""
    from ..assets import cache_dir

    opts = check_spec(spec)
    key = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir()) / "samples" / f"teacher-samples-{key}.jsonl"


def first_user_prompts(conversations, num: int, tok, max_prompt_tokens: int) -> list[str]:
    """Up to `num` distinct first user turns (at most max_prompt_tokens tokens each) of chat conversations."""
    seen, out = set(), []
    for conv in conversations:
        if not isinstance(conv, list) or not conv or conv[0]["role"] != "user":
            continue
        p = conv[0]["content"].strip()
        if not p or p in seen or len(tok(p, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            continue
        seen.add(p)
        out.append(p)
        if len(out) >= num:
            break
    return out


def text_prefixes(conversations, num: int, tok, prefix_tokens: int) -> list[list[int]]:
    """Up to `num` distinct token prefixes, exactly `prefix_tokens` long, of the source's documents as plain text
    (chats joined without template, as render "plain"; tokenised as plain documents are, with special tokens).
    Documents shorter than twice the prefix are skipped (too little text to say what comes next)."""
    from .sources import plain_text

    seen, out, heads = set(), [], []

    def take(batch) -> bool:  # tokenise a batch of document heads at once (the fast tokenizer's batch call)
        for ids in tok(batch, add_special_tokens=True)["input_ids"]:
            key = tuple(ids[:prefix_tokens])
            if len(ids) < 2 * prefix_tokens or key in seen:
                continue
            seen.add(key)
            out.append(list(key))
            if len(out) >= num:
                return True
        return False

    for conv in conversations:
        text = plain_text(conv) if isinstance(conv, list) else conv
        if not isinstance(text, str) or not text.strip():
            continue
        # only the head of the document is tokenised (a token spans at most a few dozen characters, and a cut far
        # beyond the prefix cannot change the tokens before it): whole chats cost seconds per thousand
        heads.append(text[:64 * prefix_tokens])
        if len(heads) == 1024:
            if take(heads):
                return out
            heads = []
    if heads:
        take(heads)
    return out


def generate_samples(spec: dict, progress: bool = True) -> Path:
    """The cached JSONL of {"messages": [user prompt, the teacher's answer]} for `spec` (made now if missing)."""
    import torch

    from .sources import load_conversations

    opts = check_spec(spec)
    path = samples_path(spec)
    if path.exists():
        return path
    from ..convert.build import build_student

    model, tok, _ = build_student(opts["teacher"], "none", "all")  # the teacher itself, as a Zebra model
    cuda = torch.cuda.is_available() and os.environ.get("ZEBRA_DEVICE", "") != "cpu"
    model = model.to("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues at the right edge
    cont = opts["style"] == "continue"
    if cont:
        prompts = text_prefixes(load_conversations(opts["prompts"]), opts["num"], tok, opts["prefix_tokens"])
        if not prompts:
            raise ZebraError(f"teacher_samples: the prompt source {opts['prompts']!r} has no document of at least "
                             f"{2 * opts['prefix_tokens']} tokens to continue")
    else:
        prompts = first_user_prompts(load_conversations(opts["prompts"]), opts["num"], tok, opts["max_prompt_tokens"])
        if not prompts:
            raise ZebraError(f"teacher_samples: the prompt source {opts['prompts']!r} has no conversation that "
                             "starts with a user turn")
    gen = torch.Generator(model.device).manual_seed(opts["seed"])
    sample = opts["temperature"] > 0
    rows = []
    bs = opts["batch_size"]
    batches = range(0, len(prompts), bs)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="teacher samples", unit="batch")
    with torch.no_grad():
        for b in batches:
            chunk = prompts[b:b + bs]
            if cont:  # equal-length prefixes: no padding
                ids = torch.tensor(chunk, device=model.device)
                enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            else:
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in chunk]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kw = {"do_sample": True, "temperature": float(opts["temperature"]), "generator": gen} if sample else \
                {"do_sample": False}
            out = model.generate(**enc, max_new_tokens=opts["max_new_tokens"], pad_token_id=tok.pad_token_id,
                                 cache_implementation="static", top_k=None, top_p=None, **kw)
            for p, g in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                answer = tok.decode(g, skip_special_tokens=True)
                if not answer.strip():
                    continue
                if cont:
                    rows.append({"text": tok.decode(list(p) + g.tolist(), skip_special_tokens=True)})
                else:
                    rows.append({"messages": [{"role": "user", "content": p},
                                              {"role": "assistant", "content": answer.strip()}]})
    if not rows:
        raise ZebraError("teacher_samples: the teacher produced no non-empty answer")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
