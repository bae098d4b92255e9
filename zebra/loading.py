"""Load any model Zebra works with (a teacher by embedded name / HF dir / GGUF, or a saved Zebra student)
with its tokenizer, and pick the device and dtype a user would expect (GPU + bf16 when present).

    from zebra.loading import load_model
    model, tok = load_model("smollm2-135m-instruct")      # the cached embedded teacher
    model, tok = load_model("runs/demo/student")          # a Zebra student (plain AutoModelForCausalLM)
"""

from __future__ import annotations

import os

import torch

from .errors import ZebraError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ZebraError(f"unknown dtype {name!r} (use one of {sorted(table)})")
    return table[name]


def load_model(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """(model in eval mode, tokenizer). Raises ZebraError with the cause when the model cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zebra  # noqa: F401  (registers ZebraConfig with the Auto classes)
    from .assets import resolve_teacher

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = resolve_teacher(name_or_path)
    kwargs = {}
    if path.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(os.path.abspath(path))
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ZebraError(f"cannot load model from {name_or_path!r}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def chat_prompt(tok, text: str, system: str | None = None) -> str:
    """The prompt string for one user turn, through the tokenizer's chat template when it has one."""
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text


def fast_path_kwargs(model, fast: str = "auto") -> dict:
    """generate() options for the static-cache / CUDA-graph engine: used for Zebra models on a GPU ("auto"),
    always ("on": also on CPU, without the graph) or never ("off")."""
    from .model.hybrid import ZebraForCausalLM

    if fast not in ("auto", "on", "off"):
        raise ZebraError(f"fast must be auto, on or off, got {fast!r}")
    is_zebra = isinstance(model, ZebraForCausalLM)
    if fast == "on" and not is_zebra:
        raise ZebraError("the fast path (static cache + CUDA graph) is for Zebra models; this is a "
                         f"{type(model).__name__}")
    use = is_zebra and (fast == "on" or (fast == "auto" and model.device.type == "cuda"))
    return {"cache_implementation": "static"} if use else {}


@torch.no_grad()
def generate_text(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  chat: bool = True, seed: int = 0, fast: str = "auto") -> str:
    text = chat_prompt(tok, prompt) if chat else prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id, **fast_path_kwargs(model, fast))
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
