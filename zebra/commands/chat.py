"""`zebra chat --model DIR_OR_NAME`: an interactive chat in the terminal, streaming tokens as they come.

    zebra chat --model runs/smollm2-135m/dpo/model
    > What is a zebra?
    A zebra is ...
    > /reset      (forget the conversation)      > /exit   (or Ctrl-D)

Uses the tokenizer's chat template over the whole history and transformers' generate; for a Zebra model on a
GPU, the static-cache / CUDA-graph engine (zebra.generation) behind it (--fast off: the dynamic cache).
"""

from __future__ import annotations

import sys


def add_arguments(p):
    p.add_argument("--model", required=True, help="a Zebra student dir, a teacher dir / .gguf, or smollm2-135m-instruct")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--fast", default="auto", choices=["auto", "on", "off"],
                   help="static cache + CUDA-graph decode: auto = for Zebra models on a GPU (default)")


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from ..loading import fast_path_kwargs, load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    fast = fast_path_kwargs(model, args.fast)
    history = [{"role": "system", "content": args.system}] if args.system else []
    start = list(history)
    interactive = sys.stdin.isatty()
    print("zebra chat: /reset to start over, /exit to quit", flush=True)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            print("(conversation reset)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        sample = args.temperature > 0
        with torch.no_grad():
            out = model.generate(**enc, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=sample,
                                 temperature=args.temperature if sample else None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, **fast)
        reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
