"""The hybrid decode cache: per layer, whatever that mixer needs to continue a sequence.

  attention  k, v             (B, n_kv, S, d_h) each          grows with S
  mla        c_kv, k_rope     (B, S, r_kv), (B, S, d_r)       grows with S (the latent cache, SPEC 2)
  mamba2     conv, ssm        (B, conv_dim, d_conv-1), (B, H, P, N) fp32    fixed size

`generate` creates it through ZebraForCausalLM.prepare_inputs_for_generation and threads it through the
steps; `seen_tokens` counts the positions already cached (padding included).
"""

from __future__ import annotations

import torch


class ZebraCache:
    is_compileable = False  # transformers checks this before building 4-D masks for static caches

    def __init__(self, config):
        self.mixer_types = list(config.mixer_types)
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.mixer_types]
        self.seen_tokens = 0

    # ---- what transformers' generate asks of a cache -------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self):
        return len(self.mixer_types)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for st in self.state:
            for k, v in st.items():
                st[k] = v.index_select(0, beam_idx.to(v.device))

    # ---- used by the mixers ---------------------------------------------------------------------------
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state for t in st.values())
