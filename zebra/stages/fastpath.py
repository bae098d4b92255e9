"""The training fast path's switches that are not kernels: torch.compile per decoder layer (or per mixer), and a
context that runs compiled modules eagerly (evaluation inside a training stage has other shapes; compiling
for them would cost a recompile each).

    if want_compile(cfg["compile"], device):
        compile_layers(student)                      # each decoder layer compiled once, reused by its twins
    with eager(student, teacher):
        agreement(teacher, student, heldout)         # no recompiles for the held-out shapes

Per-layer rather than whole-model compilation keeps compile time short (one graph per layer kind: attention,
MLA, Mamba2, reused by every layer of that kind) and lets attention over packed documents stay a graph break
(flash varlen kernels, see zebra.model.common.varlen_causal).
"""

from __future__ import annotations

import contextlib
import os

import torch


def want_compile(setting, device: torch.device) -> bool:
    """compile: "auto" (on CUDA, unless ZEBRA_COMPILE=0), True or False."""
    if os.environ.get("ZEBRA_COMPILE", "1") == "0":
        return False
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_layers(model, mixers_only: bool = False) -> int:
    """torch.compile every decoder layer (or only its mixer) of a ZebraForCausalLM in place; returns the count.
    The layers share one compiled graph per variant (mixer kind, MLA RoPE pairs, grad mode), so dynamo's
    per-function cache must hold more than its default 8 variants, or later layers silently run eagerly."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(512, getattr(torch._dynamo.config, name)))
    n = 0
    for layer in model.model.layers:
        (layer.mixer if mixers_only else layer).compile(dynamic=False)
        n += 1
    return n


@contextlib.contextmanager
def eager(*models):
    """Run compiled submodules of `models` eagerly inside the block (compiled again after it)."""
    saved = []
    for model in models:
        for m in model.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                saved.append((m, m._compiled_call_impl))
                m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, fn in saved:
            m._compiled_call_impl = fn


def uncompile(*models) -> None:
    """Undo compile_layers for good (the modules run eagerly from now on)."""
    for model in models:
        for m in model.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
