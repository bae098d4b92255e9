"""The models `zebra bench` compares, built from the real shapes of Llama-3.2-1B / 3B and Llama-3.1-8B (the
shipped configs in zebra/shapes/, no weights needed) with random bf16 weights:

    hf        transformers' LlamaForCausalLM + its own generate (dynamic cache): the baseline users have today
    llama     the same Llama on our engine (all GQA attention layers, static KV cache + CUDA graph)
    mil50     MambaInLlama-style: GQA attention at every 2nd layer (from 0), Mamba2 elsewhere
    mil25     MambaInLlama-style: GQA attention at every 4th layer
    mla       pure MLA at the paper's rank for the size (X-EcoMLA-style)
    zebra     the paper's Zebra config with the smallest KV cache for the size (SPEC 9); zebra-<n>mla the others
    mamba2    pure Mamba2 (Llamba-style)
"""

from __future__ import annotations

import torch

from ..convert.layout import student_config_from_teacher
from ..convert.teacher import load_teacher_config
from ..errors import ZebraError

SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
# SPEC 9 (paper Tables 5 and 6): MLA geometry and Zebra layer lists per base model
PAPER = {
    "llama-3.2-1b": {"rank": dict(kv_rank=128, q_rank=1344, nope_dim=32, rope_dim=32),
                     "zebra": {"zebra": [0, 5, 10, 14], "zebra-6mla": [0, 2, 5, 8, 11, 14],
                               "zebra-8mla": [0, 2, 4, 6, 8, 10, 12, 14]}},
    "llama-3.2-3b": {"rank": dict(kv_rank=128, q_rank=1536, nope_dim=64, rope_dim=64),
                     "zebra": {"zebra": [0, 5, 11, 17, 22, 27], "zebra-8mla": [0, 4, 8, 12, 16, 20, 24, 27],
                               "zebra-14mla": list(range(0, 25, 2)) + [27]}},
    "llama-3.1-8b": {"rank": dict(kv_rank=160, q_rank=2048, nope_dim=64, rope_dim=64),
                     "zebra": {"zebra": [0, 4, 8, 13, 18, 23, 27, 31], "zebra-16mla": list(range(0, 29, 2)) + [31]}},
}
BASE_VARIANTS = ["hf", "llama", "mil50", "mil25", "mla", "zebra", "mamba2"]


def resolve_shape(spec: str) -> tuple[str, dict]:
    """(name, HF config dict) for "1b" / "3b" / "8b", a shipped shape name or a config.json path."""
    name = SHAPES.get(spec, spec)
    cfg = load_teacher_config(name)
    if cfg.get("model_type") != "llama":
        raise ZebraError(f"bench shapes are Llama configs; {spec} has model_type {cfg.get('model_type')!r}")
    from pathlib import Path

    return (name if name in PAPER else Path(spec).stem), cfg


def variant_names(shape_name: str) -> list[str]:
    extra = [v for v in PAPER.get(shape_name, {}).get("zebra", {}) if v != "zebra"]
    return BASE_VARIANTS + extra


def variant_config(shape_name: str, cfg: dict, variant: str):
    """ZebraConfig of `variant` for this shape (not for "hf", which is transformers' own model)."""
    L = int(cfg["num_hidden_layers"])
    paper = PAPER.get(shape_name)
    rank = paper["rank"] if paper else dict(kv_rank=max(16, cfg["hidden_size"] // 16), q_rank=None, rope_dim=None, nope_dim=None)
    mla, attn = [], []
    if variant == "llama":
        attn = list(range(L))
    elif variant == "mil50":
        attn = list(range(0, L, 2))
    elif variant == "mil25":
        attn = list(range(0, L, 4))
    elif variant == "mla":
        mla = list(range(L))
    elif variant == "mamba2":
        pass
    elif variant.startswith("zebra"):
        if paper is not None and variant in paper["zebra"]:
            mla = paper["zebra"][variant]
        elif variant == "zebra":  # a custom shape: MLA at every 4th layer and the last
            mla = sorted(set(range(0, L, 4)) | {L - 1})
        else:
            raise ZebraError(f"unknown variant {variant!r} for shape {shape_name} (have: {', '.join(variant_names(shape_name))})")
    else:
        raise ZebraError(f"unknown variant {variant!r} (have: {', '.join(variant_names(shape_name))})")
    return student_config_from_teacher(cfg, mla, attn, **rank)


def random_model(config, device, dtype=torch.bfloat16, hf: bool = False):
    """A model with random weights built directly on `device` in `dtype` (no CPU init, no checkpoint)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if hf:
                from transformers import LlamaConfig, LlamaForCausalLM

                model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}))
            else:
                from ..model.hybrid import ZebraForCausalLM

                model = ZebraForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()
