"""The hybrid decode cache: one object, per layer whatever that layer's mixer needs to continue a sequence, in one of
two layouts that the mixers themselves define.

Growing (`ZebraCache(config)`; what transformers' `generate` threads through its steps): tensors grow by
concatenation as tokens arrive.

  attention  k, v             (B, n_kv, S, d_h) each          grows with S
  mla        c_kv, k_rope     (B, S, r_kv), (B, S, d_r)       grows with S (the latent cache, SPEC 2)
  mamba2     conv, ssm        (B, conv_dim, d_conv-1), (B, H, P, N) fp32    fixed size

Static (`ZebraCache.static(model, batch_size, max_len)`; what `generate(cache_implementation="static")` and the
CUDA-graph engine use): everything a one-token step touches is preallocated by each mixer's `static_state`
(attention k/v and MLA latent rows indexed by slot, Mamba2's conv as a ring, fp32 SSM state), plus three device
tensors shared by all layers: `pos` (the slot being written), `kv_start` (B,) (each row's left padding) and
`kv_len` (B,). A forward of T > 1 tokens into a static cache is a prefill (the ordinary forward into a growing
cache, then each mixer's `load_state`); a forward of one token is the model's `decode_step`, the same call the
engine captures as a CUDA graph.

`seen_tokens` counts the positions already cached (left padding included). A subclass of transformers' `Cache`, so
generation code that checks for one accepts it; transformers' per-layer cache classes are not used (the Mamba2 and
MLA states are not key / value pairs).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

try:
    from ..errors import ZebraError
except ImportError:  # in a checkpoint's bundled modeling file (zebra.model.bundle), without the package
    ZebraError = ValueError


class ZebraCache(Cache):
    is_compileable = False  # transformers checks this before building 4-D masks for static caches

    def __init__(self, config):
        super().__init__(layers=[])  # transformers' layer objects stay empty: the state is per mixer, below
        self.mixer_types = list(config.mixer_types)
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.mixer_types]
        self.seen_tokens = 0
        self.is_static = False
        self.max_len: int | None = None
        self.state_keys: list[tuple] = []  # static: the entries of each layer's state that decoding writes
        self.pos = self.kv_start = self.kv_len = None

    @classmethod
    def static(cls, model, batch_size: int, max_len: int, ssm_dtype=torch.float32) -> ZebraCache:
        """A preallocated cache for `batch_size` rows of up to `max_len` positions, on the model's device and dtype;
        Mamba2's SSM state in `ssm_dtype` (fp32 by default; bf16 halves its traffic, its accuracy is in RESULTS.md).
        The MLA entries hold the absorbed weights of the model as it is now: make a new cache after the weights
        change."""
        if batch_size < 1 or max_len < 2:
            raise ZebraError(f"a static cache needs batch_size >= 1 and max_len >= 2, got {batch_size}, {max_len}")
        p = next(model.parameters())
        cache = cls(model.config)
        if ssm_dtype not in (torch.float32, torch.bfloat16):
            raise ZebraError(f"ssm_dtype must be torch.float32 or torch.bfloat16, got {ssm_dtype}")
        layers = model.model.layers
        mixers = [layer.mixer for layer in layers]
        cache.state = [m.static_state(batch_size, max_len, p.device, p.dtype,
                                      **({"ssm_dtype": ssm_dtype} if layer.mixer_type == "mamba2" else {}))
                       for layer, m in zip(layers, mixers)]
        cache.state_keys = [type(m).STATE for m in mixers]
        cache.is_static, cache.max_len = True, max_len
        cache.pos = torch.zeros(1, dtype=torch.long, device=p.device)  # slot of the token being decoded
        cache.kv_start = torch.zeros(batch_size, dtype=torch.int32, device=p.device)
        cache.kv_len = torch.ones(batch_size, dtype=torch.int32, device=p.device)
        return cache

    # ---- what transformers' generate asks of a cache -------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self):
        return len(self.mixer_types)

    def __repr__(self):
        kind = f"static, {self.max_len} positions" if self.is_static else "growing"
        return f"ZebraCache({kind}, {len(self)} layers, {self.seen_tokens} tokens seen)"

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self.is_static:
            raise ZebraError("a static ZebraCache cannot be reordered (beam search uses the growing cache)")
        for st in self.state:
            for k, v in st.items():
                st[k] = v.index_select(0, beam_idx.to(v.device))

    def reset(self):
        """Empty the cache (a static one keeps its buffers, zeroed)."""
        if self.is_static:
            for st, keys in zip(self.state, self.state_keys):
                for k in keys:
                    st[k].zero_()
            self.pos.zero_()
            self.kv_start.zero_()
        else:
            self.state = [{} for _ in self.mixer_types]
        self.seen_tokens = 0

    # ---- growing layout: used by the mixers' forwards ----------------------------------------------------
    def append(self, layer_idx: int, **new: torch.Tensor) -> list[torch.Tensor]:
        """Append along the time axis (dim -2 for attention's (B, H, S, D), dim 1 for MLA's (B, S, R)) and
        return the full tensors in the order given."""
        st = self.state[layer_idx]
        time_dim = 2 if self.mixer_types[layer_idx] == "attention" else 1
        out = []
        for name, t in new.items():
            st[name] = t if name not in st else torch.cat([st[name], t], dim=time_dim)
            out.append(st[name])
        return out

    def get(self, layer_idx: int, name: str):
        return self.state[layer_idx].get(name)

    def put(self, layer_idx: int, name: str, t: torch.Tensor):
        self.state[layer_idx][name] = t

    # ---- static layout ----------------------------------------------------------------------------------
    def load(self, mixers, grown: ZebraCache, T: int, pad: torch.Tensor) -> None:
        """Take over a prefill: copy the growing cache `grown` (T positions) into the static buffers, through each
        mixer's load_state; pad (B,) int32: the left padding of each row."""
        if T >= self.max_len:
            raise ZebraError(f"a prompt of {T} tokens does not fit the static cache's {self.max_len} positions "
                             "(room is needed to generate)")
        self.reset()
        for m, st in zip(mixers, self.state):
            m.load_state(st, grown, T)
        self.pos.fill_(T)
        self.kv_start.copy_(pad)
        self.seen_tokens = T

    def nbytes(self) -> int:
        """Bytes of decode state (a static cache: the preallocated buffers, not the derived weights it keeps)."""
        if self.is_static:
            return sum(st[k].numel() * st[k].element_size() for st, keys in zip(self.state, self.state_keys)
                       for k in keys)
        return sum(t.numel() * t.element_size() for st in self.state for t in st.values())
