"""The one visible backend switch: "auto" | "torch" | "triton".

    from zebra.ops import dispatch
    dispatch.set_backend("torch")      # force the pure-PyTorch reference everywhere
    ZEBRA_BACKEND=torch zebra ...      # same, from the environment

"auto" uses the GPU kernels for CUDA tensors when they import (see zebra/kernels/, optional extra
`zebra[cuda]`), else the reference. CPU tensors always take the reference. zebra.kernels registers its kernels
through `register()` when first needed; nothing here imports Triton at module import.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import conv, decode, fused, ssd

_BACKEND = os.environ.get("ZEBRA_BACKEND", "auto")
# Mamba2's scan and conv when a backward will follow (training): "torch" = the chunked PyTorch scan and conv
# (zebra/ops/ssd.py, conv.py; fused by torch.compile), "fla" = the registered GPU kernels (fla-core; on Hopper with
# Triton < 3.7.1 its parallel, per-document quadratic kernel, since fla refuses its chunked backward there).
_TRAIN_SCAN = os.environ.get("ZEBRA_TRAIN_SCAN", "torch")
_KERNELS: dict[str, object] = {}  # op name -> callable, filled through register() by zebra.kernels (lazily)
OPS = ("ssd_scan", "ssd_step", "causal_conv1d", "mamba2_step", "decode_attention", "add_rms_norm",
       "gated_rms_norm", "rope", "silu_mul")
_KERNELS_LOADED = False


def register(kernels: dict) -> None:
    """Make GPU kernels available: {op name: callable with the reference op's signature}. zebra.kernels calls
    this for its own kernels when first needed; a plug-in may too."""
    unknown = sorted(set(kernels) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; ops are {', '.join(OPS)}")
    _KERNELS.update(kernels)


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def using_backend(name: str):
    """set_backend(name) inside the block, the previous backend after it."""
    prev = _BACKEND
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def _kernel(op: str, tensor, backend: str | None = None):
    """The registered GPU kernel for `op`, or None when the reference should run."""
    global _KERNELS_LOADED
    b = backend if backend not in (None, "auto") else _BACKEND
    if b == "torch" or not tensor.is_cuda:
        return None
    if not _KERNELS_LOADED:
        _KERNELS_LOADED = True
        try:
            from zebra import kernels  # noqa: F401  (registers into _KERNELS)
        except ImportError as e:
            if b == "triton":
                raise ImportError(f"backend 'triton' requested but GPU kernels are unavailable: {e}. "
                                  "Install the extra: pip install 'zebra[cuda]'") from e
    fn = _KERNELS.get(op)
    if fn is None and b == "triton":
        raise RuntimeError(f"backend 'triton' requested but no kernel is registered for {op!r}")
    return fn


def set_train_scan(name: str) -> None:
    global _TRAIN_SCAN
    if name not in ("torch", "fla"):
        raise ValueError(f"train scan must be 'torch' or 'fla', got {name!r}")
    _TRAIN_SCAN = name


def get_train_scan() -> str:
    return _TRAIN_SCAN


def _training(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd_scan(x, dt, A, Bm, Cm, initial_state=None, chunk_size=64, doc_ids=None, backend=None):
    """Mamba2 chunked scan for training / prefill. Shapes in zebra/ops/ssd.py."""
    if _TRAIN_SCAN == "torch" and backend != "triton" and _training(x, dt, A, Bm, Cm):
        return ssd.ssd_chunked(x, dt, A, Bm, Cm, initial_state=initial_state, chunk_size=chunk_size, doc_ids=doc_ids)
    fn = _kernel("ssd_scan", x, backend)
    if fn is not None:
        return fn(x, dt, A, Bm, Cm, initial_state=initial_state, chunk_size=chunk_size, doc_ids=doc_ids)
    return ssd.ssd_chunked(x, dt, A, Bm, Cm, initial_state=initial_state, chunk_size=chunk_size, doc_ids=doc_ids)


def ssd_step(state, x, dt, A, Bm, Cm, backend=None):
    """One-token recurrent update (state updated in place)."""
    fn = _kernel("ssd_step", x, backend)
    if fn is not None:
        return fn(state, x, dt, A, Bm, Cm)
    return ssd.ssd_step(state, x, dt, A, Bm, Cm)


def causal_conv1d(x, weight, bias, state=None, doc_ids=None, backend=None):
    if _TRAIN_SCAN == "torch" and backend != "triton" and _training(x, weight):
        return conv.causal_conv1d(x, weight, bias, state, doc_ids=doc_ids)
    fn = _kernel("causal_conv1d", x, backend)
    if fn is not None:
        return fn(x, weight, bias, state, doc_ids=doc_ids)
    return conv.causal_conv1d(x, weight, bias, state, doc_ids=doc_ids)


def mamba2_step(xBC, conv_ring, pos, conv_w, conv_b, dt, dt_bias, A_log, D, ssm_state, n_kv, headdim, d_state,
                backend=None):
    """One decode token of a Mamba2 layer (conv ring + state updated in place). Shapes in zebra/ops/decode.py."""
    fn = _kernel("mamba2_step", xBC, backend) or decode.mamba2_step
    return fn(xBC, conv_ring, pos, conv_w, conv_b, dt, dt_bias, A_log, D, ssm_state, n_kv, headdim, d_state)


def decode_attention(q, k, v, kv_start, kv_len, scale, backend=None):
    """One query per head over cached rows [kv_start, kv_len) (GQA or absorbed MLA). Shapes in zebra/ops/decode.py."""
    fn = _kernel("decode_attention", q, backend) or decode.decode_attention
    return fn(q, k, v, kv_start, kv_len, scale)


def fused_op(name: str, *args):
    """A fused elementwise op of the decode step (zebra/ops/fused.py): add_rms_norm, gated_rms_norm, rope,
    silu_mul; the Triton kernel on CUDA tensors, else the reference."""
    fn = _kernel(name, args[0]) or getattr(fused, name)
    return fn(*args)
