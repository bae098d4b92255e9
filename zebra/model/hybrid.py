"""ZebraForCausalLM: a Llama-family decoder whose mixer is chosen per layer ("mla", "mamba2", "attention").

Embeddings, RMSNorms, SwiGLU MLPs and the LM head are the teacher family's, under the teacher's parameter
names, so weight maps stay near-identity. Works with transformers' `generate` (greedy / sampling, batch > 1,
left padding) through ZebraCache, and loads with `AutoModelForCausalLM.from_pretrained` after `import zebra`.

    import zebra, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained("student")
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..config import ZebraConfig
from .attention import Attention
from .cache import ZebraCache, ZebraError
from .common import MLP, RMSNorm, Rotary, attention_bias, doc_segments, rope_inv_freq, varlen_available
from .mamba2 import Mamba2
from .mla import MLA

# the output field that carries the cache: `past_key_values` up to transformers 5.2x, `cache` after (the old name
# still works there, with a deprecation warning on every generate)
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = None


class ZebraDecoderLayer(nn.Module):
    def __init__(self, config: ZebraConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        if self.mixer_type == "mamba2":
            self.mamba = Mamba2(config, layer_idx)
        elif self.mixer_type == "mla":
            self.self_attn = MLA(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    @property
    def mixer(self) -> nn.Module:
        return self.mamba if self.mixer_type == "mamba2" else self.self_attn

    def forward(self, h, ctx: dict, cache=None, return_mixer: bool = False, return_input: bool = False):
        """h (B, T, d). ctx holds what the model computed once for all layers: rope tables per mixer type,
        the attention bias and the token mask. return_mixer also returns the mixer's output, return_input also
        its normalised input: (out, mixer output, mixer input) (ILD's targets, all from one call of the layer,
        so a layer sharded by FSDP2 gathers its weights once)."""
        xn = self.input_layernorm(h)
        if self.mixer_type == "mamba2":
            x = self.mamba(xn, ctx["token_mask"], cache, ctx.get("doc_ids"))
        else:
            rope = ctx["rope_attention"] if self.mixer_type == "attention" else ctx["rope_mla"][self.self_attn.rope_key]
            x = self.self_attn(xn, rope, ctx["bias"], cache, ctx.get("varlen"))
        h = h + x
        out = h + self.mlp(self.post_attention_layernorm(h))
        if return_input:
            return out, x, xn
        return (out, x) if return_mixer else out


class ZebraPreTrainedModel(PreTrainedModel):
    config_class = ZebraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZebraDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True  # Mamba2 state cannot be rolled back (no assisted decoding)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Mamba2):
            # Mamba2 defaults (SPEC 3.2): these stay as they are after attention-based init.
            H = module.n_heads
            A = torch.empty(H).uniform_(1, 16)
            dt = torch.exp(torch.rand(H) * (math.log(module.dt_max) - math.log(module.dt_min)) + math.log(module.dt_min))
            dt = dt.clamp(min=module.dt_floor)
            _copy(module.A_log, torch.log(A))
            _copy(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            _copy(module.D, torch.ones(H))
            w = torch.empty_like(module.conv1d.weight, device="cpu")
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            _copy(module.conv1d.weight, w)
            bound = 1 / math.sqrt(module.d_conv)  # fan_in of a depthwise conv = kernel size
            _copy(module.conv1d.bias, torch.empty(module.conv_dim).uniform_(-bound, bound))
            if module.z_bias is not None:
                _copy(module.z_bias, torch.zeros(module.d_inner))


def _copy(param, value):
    if hf_init is not None and hasattr(hf_init, "copy_"):
        hf_init.copy_(param, value.to(param.dtype))
    else:  # pragma: no cover
        with torch.no_grad():
            param.copy_(value)


class ZebraModel(ZebraPreTrainedModel):
    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        rope_inv_freq(config.rope_config, 2)  # fail at build time on an unsupported RoPE type
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ZebraDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.rope_config, config.head_dim)
        self._rotary_mla: dict = {}  # rope_key -> Rotary (no state: built on demand, see mla_rotary)
        self.gradient_checkpointing = False
        self.post_init()

    def mla_rotary(self, key) -> Rotary:
        """MLA's decoupled RoPE for a layer's rope_key: the teacher's rotary pairs `key` (config.mla_rope_pairs),
        or None for the paper's frequencies recomputed over d_r dims."""
        if key not in self._rotary_mla:
            cfg = self.config
            self._rotary_mla[key] = (Rotary(cfg.rope_config, cfg.qk_rope_head_dim) if key is None
                                     else Rotary(cfg.rope_config, cfg.head_dim, key))
        return self._rotary_mla[key]

    def rope(self, layer, position_ids, dtype):
        """(cos, sin) for an attention or MLA layer at these positions."""
        if layer.mixer_type == "attention":
            return self.rotary(position_ids, dtype)
        return self.mla_rotary(layer.self_attn.rope_key)(position_ids, dtype)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def context(self, attention_mask, position_ids, B: int, T: int, past: int, dtype, device, doc_ids=None,
                mixer_types=None, mla_rope_keys=None) -> dict:
        """Everything the layers share for one forward: rope tables, attention bias, token mask.
        doc_ids (B, T): packed documents, non-decreasing per row; attention stays inside a document, Mamba2
        resets its conv and state at each boundary, and positions restart at 0 (unless position_ids given)."""
        S = past + T
        if doc_ids is not None and past:
            raise ValueError("doc_ids (packed documents) is for training / scoring forwards, not cached decoding")
        if attention_mask is not None:
            if attention_mask.shape[-1] != S:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S} "
                                 f"({past} cached + {T} new)")
            if bool(attention_mask.all()):
                attention_mask = None  # nothing padded: skip the masks
        if position_ids is None and doc_ids is not None:
            idx = torch.arange(T, device=device).expand(B, T)
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            position_ids = idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, S, device=device)[None].expand(B, T)
        # From the layers, not the config: stages swap layers in place (mixer_types overrides for that).
        types = set(mixer_types) if mixer_types is not None else {layer.mixer_type for layer in self.layers}
        varlen = None
        half = dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(device.type)
        cfg = self.config
        same_dims = "mla" not in types or cfg.qk_nope_head_dim + cfg.qk_rope_head_dim == cfg.head_dim
        if doc_ids is not None and types & {"mla", "attention"} and half and same_dims and varlen_available(device):
            # flash attention inside each document piece (padding is a piece of its own): no T x T mask
            varlen = (doc_segments(doc_ids), T)
            bias = None
        elif attention_mask is None and doc_ids is None and past == 0:
            bias = None  # plain causal: the mixers pass is_causal to SDPA (flash kernels, no T x S mask)
        else:
            bias = attention_bias(attention_mask, T, S, dtype, device) if types & {"mla", "attention"} else None
        if bias is not None and doc_ids is not None:
            same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, T)
            bias = bias.masked_fill(~same, torch.finfo(dtype).min)
        ctx = {
            "token_mask": attention_mask[:, -T:] if attention_mask is not None else None,
            "bias": bias,
            "varlen": varlen,
            "doc_ids": doc_ids,
        }
        if "attention" in types:
            ctx["rope_attention"] = self.rotary(position_ids, dtype)
        if "mla" in types:
            keys = {layer.self_attn.rope_key for layer in self.layers if layer.mixer_type == "mla"}
            keys |= set(mla_rope_keys or ())
            ctx["rope_mla"] = {key: self.mla_rotary(key)(position_ids, dtype) for key in keys}
        return ctx

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: ZebraCache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        doc_ids=None,
        **kwargs,
    ):
        if past_key_values is None:  # newer transformers pass the cache as `cache`
            past_key_values = kwargs.pop("cache", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if doc_ids is not None:
            use_cache = False  # packed rows are scored / trained whole, never continued
        cache = past_key_values if use_cache or past_key_values is not None else None
        if use_cache and cache is None and not self.training:
            cache = ZebraCache(self.config)
        if cache is not None and cache.is_static:
            return self._static_forward(input_ids, attention_mask, h, cache, output_hidden_states)
        past = cache.seen_tokens if cache is not None else 0
        ctx = self.context(attention_mask, position_ids, B, T, past, h.dtype, h.device, doc_ids)
        hidden = [h] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, ctx, None, use_reentrant=False)
            else:
                h = layer(h, ctx, cache)
            if hidden is not None:
                hidden.append(h)
        if cache is not None:
            cache.seen_tokens += T
        h = self.norm(h)
        if hidden is not None:
            hidden[-1] = h  # as transformers: the last entry is after the final norm
        return BaseModelOutputWithPast(last_hidden_state=h, **{_CACHE_FIELD: cache},
                                       hidden_states=tuple(hidden) if hidden is not None else None)


    # ---- the static cache (ZebraCache.static): prefill, then one token per step ----------------------------
    def _static_forward(self, input_ids, attention_mask, h, cache: ZebraCache, output_hidden_states):
        """A forward into a static cache: a prompt (T > 1, or any T into an empty cache) is prefilled through the
        ordinary forward into a growing cache and taken over by the static buffers (left padding only); one
        token into a filled cache is decode_step."""
        B, T, _ = h.shape
        if output_hidden_states:
            raise ZebraError("output_hidden_states is not available with a static cache")
        if B != cache.kv_start.shape[0]:
            raise ZebraError(f"the static cache holds a batch of {cache.kv_start.shape[0]}, got {B} rows")
        if cache.seen_tokens and T == 1 and input_ids is not None:
            if cache.seen_tokens >= cache.max_len:
                raise ZebraError(f"the static cache is full ({cache.max_len} tokens)")
            out = self.decode_step(input_ids[:, 0], cache)
            cache.seen_tokens += 1
            return BaseModelOutputWithPast(last_hidden_state=out, **{_CACHE_FIELD: cache})
        if cache.seen_tokens:
            raise ZebraError("a static cache takes a prompt when empty (reset it), then one token per forward")
        if T >= cache.max_len:
            raise ZebraError(f"a prompt of {T} tokens does not fit the static cache's {cache.max_len} positions "
                             "(room is needed to generate)")
        if attention_mask is not None:
            am = attention_mask.to(h.device)
            if bool((am[:, 1:] < am[:, :-1]).any()):
                raise ZebraError("only left padding is supported (attention_mask must be 0...0 1...1 per row)")
            if bool((am.sum(-1) == 0).any()):
                raise ZebraError("a prompt row is all padding")
            pad = (T - am.sum(-1)).to(torch.int32)
        else:
            am, pad = None, torch.zeros(B, dtype=torch.int32, device=h.device)
        grown = ZebraCache(self.config)
        out = self(inputs_embeds=h, attention_mask=am, past_key_values=grown, use_cache=True)
        cache.load([layer.mixer for layer in self.layers], grown, T, pad)
        return BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, **{_CACHE_FIELD: cache})

    def decode_step(self, tokens, cache: ZebraCache) -> torch.Tensor:
        """One token per row into a static cache: tokens (B,) -> the final normalised hidden state (B, 1, d).
        Every layer's mixer runs its own decode_step over its static state; residual adds are fused into the
        next RMSNorm and the MLP's SiLU into its product. Device work only (no host synchronisation, no
        allocation that changes between steps), so the whole step can be captured as one CUDA graph
        (zebra.generation.StaticEngine). Advances cache.pos; the host-side cache.seen_tokens is the caller's."""
        from ..ops.dispatch import fused_op

        B = tokens.shape[0]
        cache.kv_len.copy_((cache.pos + 1).to(torch.int32).expand(B))
        pos_ids = (cache.pos - cache.kv_start.long())[:, None]  # (B, 1) RoPE positions (padding not counted)
        h = self.embed_tokens(tokens)[:, None]  # (B, 1, d)
        rope = {}
        pending = None  # the last sub-block's output, added to h inside the next norm (one kernel)
        for layer, state in zip(self.layers, cache.state):
            ln, mixer = layer.input_layernorm, layer.mixer
            h, x = fused_op("add_rms_norm", h, pending, ln.weight, ln.eps)
            key = (layer.mixer_type, getattr(mixer, "rope_key", None))
            if layer.mixer_type != "mamba2" and key not in rope:
                rope[key] = self.rope(layer, pos_ids, x.dtype)
            x = mixer.decode_step(x, rope.get(key), state, cache.pos, cache.kv_start, cache.kv_len)
            ln = layer.post_attention_layernorm
            h, x = fused_op("add_rms_norm", h, x, ln.weight, ln.eps)
            mlp = layer.mlp
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
            silu = self.config.hidden_act in ("silu", "swish")
            pending = mlp.down_proj(fused_op("silu_mul", g, u) if silu else mlp.act_fn(g) * u)
        _, h = fused_op("add_rms_norm", h, pending, self.norm.weight, self.norm.eps)
        cache.pos.add_(1)
        return h


class ZebraForCausalLM(ZebraPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        self.model = ZebraModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the hybrid cache is made in prepare_inputs_for_generation

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        doc_ids=None,
        cache=None,
        **kwargs,
    ):
        if past_key_values is None:  # newer transformers pass the cache as `cache` (a named argument, so their
            past_key_values = cache  # generate accepts a cache given by the caller, e.g. ZebraCache.static)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, doc_ids=doc_ids)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
                                      hidden_states=out.hidden_states)

    def decode_step(self, tokens, cache: ZebraCache) -> torch.Tensor:
        """One token per row into a static cache (ZebraModel.decode_step): tokens (B,) -> logits (B, V)."""
        return self.lm_head(self.model.decode_step(tokens, cache))[:, 0]

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' generate, or with cache_implementation="static" (argument or generation config) the
        static-cache / CUDA-graph engine of zebra.generation (greedy or temperature / top_p sampling)."""
        impl = kwargs.get("cache_implementation") or getattr(generation_config or self.generation_config,
                                                             "cache_implementation", None)
        if impl == "static":
            from ..generation.fast import fast_generate

            return fast_generate(self, inputs, generation_config, **kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, cache=None, **kwargs):
        # Our own, so generate's cache handling (which changes between transformers versions) never
        # touches the hybrid cache: make one on the first step, then feed only the uncached tokens.
        # transformers < 5.2x threads the cache as `past_key_values`, newer ones as `cache`: take either.
        if past_key_values is None:
            past_key_values = cache
        if not isinstance(past_key_values, ZebraCache):
            past_key_values = ZebraCache(self.config) if use_cache else None
        past = past_key_values.seen_tokens if past_key_values is not None else 0
        inputs = {"past_key_values": past_key_values, "attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        if kwargs.get("position_ids") is not None:
            inputs["position_ids"] = kwargs["position_ids"][:, past:]
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
