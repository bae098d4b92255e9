"""`model.generate(..., cache_implementation="static")` for Zebra models: the StaticEngine behind the usual call.

    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=256,
                         cache_implementation="static")          # static cache + CUDA-graph decode

Engines are kept on the model, one per batch size (a CUDA graph is specific to its batch size), and rebuilt
when a longer maximum length is needed (lengths are rounded up to 256 so nearby requests share one) or when
the model's weights changed since (an engine keeps derived weights: absorbed MLA matrices).
Honoured: greedy and sampling with temperature, top_k, top_p, min_p, repetition_penalty, eos / pad ids,
stop_strings (with tokenizer=), streamers, a torch.Generator. Anything else generate can do (beams, n-gram
bans, scores in the output, ...) is refused with a clear error rather than silently ignored.
"""

from __future__ import annotations

import torch

from ..errors import ZebraError
from .engine import StaticEngine, weights_key

_INPUTS = {"input_ids", "inputs", "attention_mask", "streamer", "generator", "tokenizer", "cache_implementation",
           "generation_config", "use_cache"}
# generation options the engine honours; anything else set to a non-neutral value is refused, never ignored
_HONOURED = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "eos_token_id", "pad_token_id", "stop_strings", "cache_implementation", "use_cache"}
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "typical_p": 1.0,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
            "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "min_length": 0,
            "min_new_tokens": None, "guidance_scale": None, "output_scores": False, "output_logits": False,
            "return_dict_in_generate": False, "output_attentions": False, "output_hidden_states": False,
            "diversity_penalty": 0.0, "penalty_alpha": None, "max_time": None, "exponential_decay_length_penalty": None,
            "renormalize_logits": False, "force_words_ids": None, "constraints": None, "token_healing": False,
            "watermarking_config": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
            "dola_layers": None}


def _options(model, generation_config, kw) -> tuple:
    """The merged generation config (model's, then the call's), refusing what the engine does not do."""
    import copy

    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    opts = {k: v for k, v in kw.items() if k not in _INPUTS}
    unknown = gc.update(**opts)  # transformers returns the keys that are not generation options
    unknown = {k: v for k, v in unknown.items() if v is not None}
    for key in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                "negative_prompt_ids", "synced_gpus"):
        if kw.get(key) is not None:
            unknown[key] = kw[key]
    if unknown:
        raise ZebraError(f"cache_implementation='static' does not support {sorted(unknown)}; use the default "
                         "cache for those options")
    refused = sorted(k for k, neutral in _NEUTRAL.items() if getattr(gc, k, neutral) not in (neutral, None)
                     and not (neutral is not None and getattr(gc, k, neutral) == neutral))
    if refused:
        raise ZebraError(f"cache_implementation='static' does not support {', '.join(refused)} "
                         f"({', '.join(f'{k}={getattr(gc, k)!r}' for k in refused)}); it does greedy and sampling with "
                         "temperature, top_k, top_p, min_p, repetition_penalty, eos / pad ids and stop_strings")
    return gc


def fast_generate(model, inputs=None, generation_config=None, **kw) -> torch.Tensor:
    gc = _options(model, generation_config, kw)
    input_ids = kw.get("input_ids", inputs)
    if input_ids is None:
        raise ZebraError("pass input_ids")
    max_new = gc.max_new_tokens
    if max_new is None:
        raise ZebraError("pass max_new_tokens")
    B, T = input_ids.shape
    need = T + max_new
    engines = model.__dict__.setdefault("_zebra_engines", {})
    eng = engines.get(B)
    if eng is not None and (eng.L < need or eng.weights_key != weights_key(model)):
        engines.pop(B, None)  # too short, or the model's weights changed since it was built
        del eng
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        eng = None
    if eng is None:
        eng = engines[B] = StaticEngine(model, B, -(-need // 256) * 256)
    do_sample = bool(gc.do_sample)
    return eng.generate(input_ids, kw.get("attention_mask"), max_new_tokens=max_new, do_sample=do_sample,
                        temperature=gc.temperature or 1.0, top_p=gc.top_p, top_k=gc.top_k, min_p=gc.min_p,
                        repetition_penalty=gc.repetition_penalty, eos_token_id=gc.eos_token_id,
                        pad_token_id=gc.pad_token_id, stop_strings=gc.stop_strings, tokenizer=kw.get("tokenizer"),
                        streamer=kw.get("streamer"), generator=kw.get("generator"))
