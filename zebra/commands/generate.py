"""`zebra generate --model DIR_OR_NAME --prompt TEXT`: one chat answer (or raw continuation) from a model.

    zebra generate --model smollm2-135m-instruct --prompt "What is a zebra?"
    zebra generate --model student --prompt "Once upon a time" --raw --max-new-tokens 40
"""

from __future__ import annotations

import time


def add_arguments(p):
    p.add_argument("--model", required=True, help="a Zebra student dir, a teacher dir / .gguf, or smollm2-135m-instruct")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as plain text")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--fast", default="auto", choices=["auto", "on", "off"],
                   help="static cache + CUDA-graph decode: auto = for Zebra models on a GPU (default)")
    p.add_argument("--seed", type=int, default=0)


def check_device(device) -> None:
    """A clear error for a device torch cannot use here (before any model is loaded)."""
    import torch

    from ..errors import ZebraError

    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ZebraError(f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZebraError(f"--device {device!r}: no CUDA GPU is available here")
    if dev.type not in ("cpu", "cuda"):
        raise ZebraError(f"--device {device!r}: zebra runs on cpu or cuda")


def run(args) -> int:
    from ..errors import ZebraError
    from ..loading import generate_text, load_model

    if args.max_new_tokens < 1:
        raise ZebraError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.temperature < 0:
        raise ZebraError(f"--temperature must be >= 0 (0 = greedy), not {args.temperature}")
    check_device(args.device)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    text = generate_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, chat=not args.raw, seed=args.seed,
                         fast=args.fast)
    dt = time.perf_counter() - t0
    print(text)
    print(f"[{args.max_new_tokens} new tokens max in {dt:.1f}s]", flush=True)
    return 0
