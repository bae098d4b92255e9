"""`model.generate(..., cache_implementation="static")` for Zebra models: the StaticEngine behind the usual call.

    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=256,
                         cache_implementation="static")          # static cache + CUDA-graph decode

Engines are kept on the model, one per batch size (a CUDA graph is specific to its batch size), and rebuilt
only when a longer maximum length is needed (lengths are rounded up to 256 so nearby requests share one).
Supported: greedy and sampling (temperature, top_p), eos / pad ids, streamers. Anything else generate can
do (beams, top_k, repetition penalties, ...) is refused with a clear error rather than silently ignored.
"""

from __future__ import annotations

import torch

from ..errors import ZebraError
from .engine import StaticEngine

_SUPPORTED = {"input_ids", "inputs", "attention_mask", "max_new_tokens", "do_sample", "temperature", "top_p",
              "eos_token_id", "pad_token_id", "streamer", "cache_implementation", "generation_config",
              "use_cache", "top_k", "num_beams", "num_return_sequences", "return_dict_in_generate",
              "output_scores", "generator"}


def fast_generate(model, inputs=None, generation_config=None, **kw) -> torch.Tensor:
    unknown = set(kw) - _SUPPORTED
    if unknown:
        raise ZebraError(f"cache_implementation='static' does not support {sorted(unknown)}; "
                         "use the default cache for those options")
    gc = generation_config if generation_config is not None else model.generation_config

    def opt(name, default=None):
        v = kw.get(name)
        return v if v is not None else getattr(gc, name, default)

    for name, ok in (("num_beams", 1), ("num_return_sequences", 1)):
        if (opt(name, 1) or 1) != ok:
            raise ZebraError(f"cache_implementation='static' supports {name}=1 only")
    if kw.get("top_k") not in (None, 0) and opt("do_sample", False):
        raise ZebraError("cache_implementation='static' samples with temperature / top_p; pass top_k=None")
    if kw.get("return_dict_in_generate") or kw.get("output_scores"):
        raise ZebraError("cache_implementation='static' returns token ids only")
    input_ids = kw.get("input_ids", inputs)
    if input_ids is None:
        raise ZebraError("pass input_ids")
    max_new = opt("max_new_tokens")
    if max_new is None:
        raise ZebraError("pass max_new_tokens")
    B, T = input_ids.shape
    need = T + max_new
    engines = model.__dict__.setdefault("_zebra_engines", {})
    eng = engines.get(B)
    if eng is None or eng.L < need:
        engines.pop(B, None)
        if eng is not None:
            del eng
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        eng = engines[B] = StaticEngine(model, B, -(-need // 256) * 256)
    do_sample = bool(opt("do_sample", False))
    return eng.generate(input_ids, kw.get("attention_mask"), max_new_tokens=max_new, do_sample=do_sample,
                        temperature=opt("temperature", 1.0) or 1.0, top_p=opt("top_p"),
                        eos_token_id=opt("eos_token_id"), pad_token_id=opt("pad_token_id"),
                        streamer=kw.get("streamer"), generator=kw.get("generator"))
