"""Static-cache decoding with an optional CUDA graph: the fast generation path (SPEC 2, 3.2; issue "GPU fast path").

The dynamic ZebraCache grows by concatenation, so every step allocates and copies. StaticEngine instead
preallocates, for a fixed batch size and maximum length, everything a decode step touches:

  attention  k, v     (B, n_kv, L, d_h)            written at slot `pos`, read over [kv_start, kv_len)
  mla        kv       (B, L, r_kv + d_r)           one latent row [c_kv | RoPE(k_R)] per token (SPEC 2)
  mamba2     conv     (B, conv_dim, d_conv) ring   slot pos % d_conv holds the newest conv input
             ssm      (B, H, P, N) fp32            updated in place

All rows share one slot index `pos` (prompts are left-padded to one length); kv_start (B,) counts each row's
left padding, so row b attends to slots [kv_start[b], pos] and its RoPE position is pos - kv_start[b]. `pos`,
kv_start and kv_len live in GPU memory, so one decode step has no host synchronisation and no allocation
that changes between steps: it is captured once as a CUDA graph and replayed (cuda_graph=True).

Each mixer owns its static state and its one-token step (static_state / load_state / decode_step in
zebra/model/attention.py, mla.py, mamba2.py); the cache is the model's own ZebraCache in its static layout
(ZebraCache.static), the step the model's own decode_step (ZebraModel.decode_step: the layer loop with fused
residual + norm and MLP), the prefill the model's forward into that cache. The engine itself only preallocates,
captures the step as a CUDA graph and runs the sampling loop. The mixers' steps use two ops from zebra.ops.dispatch:
  decode_attention  softmax attention of one query per head over the cached rows. GQA: per KV group.
                    MLA: absorbed (W_UK folded into the query, W_UV into the output), all heads over the
                    latent rows, which are read once for all heads.
  mamba2_step       conv-ring update, SiLU, dt softplus, in-place state update, C readout and D skip.
On CUDA these are Triton kernels (zebra/kernels/decode.py); elsewhere the PyTorch references.

Prefill runs the ordinary model forward (SDPA / the chunked scan) with a growing cache, then copies its
states into the static buffers (ZebraCache.load).

    eng = StaticEngine(model, batch_size=4, max_len=2048)
    out = eng.generate(input_ids, attention_mask, max_new_tokens=256)      # (B, T + new) token ids
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ZebraError
from ..model.cache import ZebraCache


class StaticEngine:
    def __init__(self, model, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 ssm_dtype=torch.float32):
        if batch_size < 1 or max_len < 2:
            raise ZebraError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size}, {max_len}")
        self.model = model.eval()
        self.weights_key = weights_key(model)  # fast_generate rebuilds the engine when this changes
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.B, self.L = batch_size, max_len
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ZebraError("cuda_graph=True needs the model on a CUDA device")
        self.cache = ZebraCache.static(model, batch_size, max_len, ssm_dtype)  # each mixer's own state, preallocated
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # the step's input (static)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.cuda_graph:
            self._capture()

    @property
    def length(self) -> int:
        """Slots in use (host-side; the device-side position is cache.pos)."""
        return self.cache.seen_tokens

    # ---- sizes ----------------------------------------------------------------------------------------
    def cache_nbytes(self) -> int:
        return self.cache.nbytes()

    # ---- state ----------------------------------------------------------------------------------------
    def reset(self):
        self.cache.reset()

    def set_context_length(self, s: int):
        """Benchmarks: pretend s tokens are cached (contents as they are), so a step at context s can be timed."""
        if not 0 <= s < self.L:
            raise ZebraError(f"context length {s} outside [0, {self.L})")
        self.cache.pos.fill_(s)
        self.cache.kv_start.zero_()
        self.cache.seen_tokens = s

    # ---- prefill --------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Run the prompt (B, T) through the model into the static cache (the model's forward: the ordinary
        forward, then each mixer's load_state) and return the last position's logits (B, V). Prompts must be
        left-padded (attention_mask 0 first)."""
        self.cache.reset()
        out = self.model(input_ids=input_ids.to(self.device),
                         attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    # ---- one decode step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one token per row: tokens (B,) -> logits (B, V) (a view of a static buffer when a graph is
        used: copy it if you keep it past the next step)."""
        if self.cache.seen_tokens >= self.L:
            raise ZebraError(f"the static cache is full ({self.L} tokens)")
        self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._step()
        self.cache.seen_tokens += 1
        return self.logits

    def _step(self) -> torch.Tensor:
        return self.model.decode_step(self.tokens, self.cache)  # the model's own one-token step

    # ---- CUDA graph -----------------------------------------------------------------------------------
    def _capture(self):
        """Warm up (Triton compiles, cuBLAS picks algorithms) on a side stream, then capture one step."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = self._step()
        self.reset()  # warm-up and capture wrote into the cache

    # ---- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 streamer=None, generator: torch.Generator | None = None, top_k: int | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop_strings=None, tokenizer=None) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + n) token ids (n <= max_new_tokens: stops when every row has ended; ended
        rows are filled with pad_token_id). Greedy by default; sampling with temperature, top_k, top_p, min_p
        (transformers' order and meaning); repetition_penalty on every token already in the row (prompt
        included, as transformers); stop_strings (with `tokenizer`) end a row once its text ends with one."""
        T = input_ids.shape[1]
        if T + max_new_tokens > self.L:
            raise ZebraError(f"prompt {T} + {max_new_tokens} new tokens exceeds the engine's max_len {self.L}")
        if stop_strings and tokenizer is None:
            raise ZebraError("stop_strings need the tokenizer: generate(..., stop_strings=[...], tokenizer=tok)")
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        eos = torch.tensor(sorted(_as_set(eos_token_id)), device=self.device, dtype=torch.long)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        logits = self.prefill(input_ids, attention_mask)
        done = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        out = [input_ids.to(self.device)]
        seen = None
        if repetition_penalty is not None and repetition_penalty != 1.0:  # which ids each row holds so far
            seen = torch.zeros(self.B, logits.shape[-1], dtype=torch.bool, device=self.device)
            real = input_ids.to(self.device) if attention_mask is None else torch.where(
                attention_mask.to(self.device).bool(), input_ids.to(self.device), input_ids.new_tensor(-1))
            seen.scatter_(1, real.clamp(min=0), real >= 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for i in range(max_new_tokens):
            nxt = _pick(logits, do_sample, temperature, top_p, generator, top_k, min_p, repetition_penalty, seen)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt[:, None])
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if len(eos):
                done |= torch.isin(nxt, eos)
            if stops:
                new = torch.cat(out[1:], dim=1).tolist()
                for b in range(self.B):
                    if not done[b] and _ends_with_stop(tokenizer, input_ids[b].tolist() + new[b], stops):
                        done[b] = True
            if (len(eos) or stops) and (i % 8 == 7 or streamer is not None or self.B == 1 or stops) \
                    and bool(done.all()):
                break
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)


def _ends_with_stop(tokenizer, ids: list[int], stops: list[str], window: int = 32) -> bool:
    text = tokenizer.decode(ids[-window:])
    return any(text.endswith(s) for s in stops)


def weights_key(model) -> tuple:
    """Identity and in-place version of every parameter: changes when the weights are replaced, moved or updated
    (optimizer steps, load_state_dict), so an engine built from them knows it is stale."""
    return tuple((id(p), p._version) for p in model.parameters())


def _as_set(eos) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


def _pick(logits, do_sample, temperature, top_p, generator, top_k=None, min_p=None, repetition_penalty=None,
          seen=None):
    """The next token per row, transformers' way: repetition penalty (score / p if > 0 else score * p, on the ids
    `seen` marks), then greedy argmax, or a seeded sample from sampling_probs."""
    logits = logits.float()
    if seen is not None:
        penal = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penal, logits)
    if not do_sample:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sampling_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None) -> torch.Tensor:
    """The distribution a sample is drawn from: logits / temperature, then top_k, top_p (the smallest set whose
    mass reaches top_p), min_p (probability >= min_p x the largest), renormalised: transformers' warpers, in
    their order. (B, V) -> (B, V)."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp * keep)
    if min_p is not None and min_p > 0:
        probs = probs * (probs >= min_p * probs.max(dim=-1, keepdim=True).values)
    return probs / probs.sum(-1, keepdim=True)
