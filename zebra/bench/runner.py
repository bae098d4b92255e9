"""The measurements of `zebra bench` (the paper's Fig. 4/7, Fig. 8/9 and prefill), each point with its roofline.

decode   batch 1, prompt 1, generation length L: step times at s = 0, L/2, L-1 (warm-up, then `steps` CUDA-graph
         replays timed with CUDA events), integrated over the generation (zebra.bench.roofline.integrate):
         decoding 32k tokens one by one per point would not fit a GPU session, and the step cost is affine in s.
batch    prompt 1, L = 8192 generated, batch B: the same at s = 0, L/2, L-1 with a static cache of B x L; peak
         memory = weights + cache + workspace (torch.cuda.max_memory_allocated); out-of-memory is a result.
prefill  time to first token for a T-token prompt at batch 1 (the prompt forward, the cache filled, the last
         position's logits), median of 3 after a warm-up.
hf       transformers' own `generate` (dynamic cache) on the same Llama shape: its step time at context s is
         (generate(n + 1 new tokens) - generate(1 new token)) / n after an s-token prompt.
"""

from __future__ import annotations

import gc
import time

import torch

from ..generation.engine import StaticEngine
from . import roofline
from .variants import random_model, variant_config


class Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, reps: int = 1) -> float:
        """Seconds per call of fn (reps calls, after the caller's warm-up)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / reps


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


def _vocab(model) -> int:
    return min(1000, model.config.vocab_size)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Bench:
    def __init__(self, device="cuda", dtype=torch.bfloat16, steps=16, warmup=3, graph=True, bandwidth=None,
                 ssm_dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.ssm_dtype = ssm_dtype  # Mamba2's decode state (bf16: an option whose accuracy RESULTS.md measures)
        self.ssm_elem = torch.tensor([], dtype=ssm_dtype).element_size()
        self.steps, self.warmup = steps, warmup
        self.graph = graph and self.device.type == "cuda"
        self.timer = Timer(device)
        self.bw = bandwidth or roofline.measure_copy_bandwidth(device, nbytes=(1 << 30) if self.device.type == "cuda" else 1 << 24)
        self.elem = torch.tensor([], dtype=dtype).element_size()

    # ---- our engine -------------------------------------------------------------------------------------
    def build(self, shape_name, cfg, variant):
        if variant == "hf":
            return random_model(cfg, self.device, self.dtype, hf=True), cfg
        zc = variant_config(shape_name, cfg, variant)
        return random_model(zc, self.device, self.dtype), zc

    def _step_times(self, eng, positions):
        tok = torch.zeros(eng.B, dtype=torch.long, device=self.device)
        out = []
        for s in positions:
            eng.set_context_length(s)
            for _ in range(self.warmup):
                eng.step(tok)
            eng.set_context_length(s)
            out.append(self.timer(lambda: eng.step(tok), self.steps))
        return out

    def generation_point(self, model, zc, batch: int, length: int) -> dict:
        """Throughput of generating `length` tokens at `batch` (prompt 1) with the static engine."""
        positions = [0, length // 2, length - 1]
        wb = roofline.weight_bytes(model)
        reset_peak(self.device)
        eng = None
        try:
            eng = StaticEngine(model, batch, length + self.steps + self.warmup + 1, cuda_graph=self.graph,
                               ssm_dtype=self.ssm_dtype)
            times = self._step_times(eng, positions)
        finally:
            del eng
        return self._point(times, positions, wb, zc, batch, length)

    def _point(self, times, positions, wb, zc, batch, length):
        total = roofline.integrate(positions, times)
        rl = [roofline.step_bytes(wb, zc, s, batch, self.elem, self.ssm_elem) / self.bw for s in positions]
        rl_total = roofline.integrate(positions, rl)
        return {"batch": batch, "length": length, "tokens_per_s": batch * length / total,
                "ms_per_step": {str(s): t * 1e3 for s, t in zip(positions, times)},
                "roofline_tokens_per_s": batch * length / rl_total, "roofline_fraction": rl_total / total,
                "bytes_per_step": {str(s): roofline.step_bytes(wb, zc, s, batch, self.elem, self.ssm_elem)
                                   for s in positions},
                "peak_mem_gib": peak_gib(self.device), "status": "ok"}

    @torch.no_grad()
    def prefill_point(self, model, zc, T: int, hf: bool = False) -> dict:
        ids = torch.randint(0, _vocab(model), (1, T), device=self.device)
        reset_peak(self.device)
        if hf:
            def run():
                model(ids, use_cache=True, logits_to_keep=1)
        else:
            eng = StaticEngine(model, 1, T + 2, cuda_graph=False)

            def run():
                eng.prefill(ids)
        run()
        ts = sorted(self.timer(run) for _ in range(3))
        return {"batch": 1, "length": T, "ttft_ms": ts[1] * 1e3, "tokens_per_s": T / ts[1],
                "peak_mem_gib": peak_gib(self.device), "status": "ok"}

    # ---- transformers' generate --------------------------------------------------------------------------
    @torch.no_grad()
    def hf_generation_point(self, model, cfg, batch: int, length: int) -> dict:
        n = self.steps
        positions = [1, max(2, length - 1)]
        wb = roofline.weight_bytes(model)
        reset_peak(self.device)
        times = []
        for s in positions:
            ids = torch.randint(0, _vocab(model), (batch, s), device=self.device)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

            def gen(k):
                return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                              min_new_tokens=k, **kw)
            gen(2)()  # warm-up
            t1 = self.timer(gen(1))
            tn = self.timer(gen(n + 1))
            times.append(max(tn - t1, 1e-9) / n)
        positions[0] = 0
        return self._point(times, positions, wb, cfg, batch, length)


@torch.no_grad()
def kernel_points(bench: Bench) -> list[dict]:
    """The decode kernels alone at large batch, 8B geometry: bytes they must read (and write) over their time,
    as a fraction of the measured copy bandwidth. MLA: Zebra-8B latent rows (r_kv 160 + d_r 64, 32 heads);
    GQA: Llama-8B (8 KV groups x 4 heads, d_h 128); Mamba2 step: 32 heads, P = N = 128."""
    from ..ops import dispatch

    dev, dt, out = bench.device, bench.dtype, []
    S = 8192

    def timed(fn, reps=20):
        fn()
        return bench.timer(fn, reps)

    for B in (64, 256):
        cache = torch.randn(B, S, 224, device=dev, dtype=dt)
        q = torch.randn(B, 1, 32, 224, device=dev, dtype=dt)
        z, n = torch.zeros(B, dtype=torch.int32, device=dev), torch.full((B,), S, dtype=torch.int32, device=dev)
        kv = cache[:, None]
        t = timed(lambda: dispatch.decode_attention(q, kv, kv[..., :160], z, n, 0.088, backend="triton"))
        nbytes = cache.numel() * cache.element_size()
        out.append({"kernel": "mla_decode", "batch": B, "length": S, "us": t * 1e6, "bytes": nbytes,
                    "bandwidth_fraction": nbytes / t / bench.bw})
        del cache, q, kv
    for B in (16, 32):
        k = torch.randn(B, 8, S, 128, device=dev, dtype=dt)
        v = torch.randn_like(k)
        q = torch.randn(B, 8, 4, 128, device=dev, dtype=dt)
        z, n = torch.zeros(B, dtype=torch.int32, device=dev), torch.full((B,), S, dtype=torch.int32, device=dev)
        t = timed(lambda: dispatch.decode_attention(q, k, v, z, n, 0.088, backend="triton"))
        nbytes = 2 * k.numel() * k.element_size()
        out.append({"kernel": "gqa_decode", "batch": B, "length": S, "us": t * 1e6, "bytes": nbytes,
                    "bandwidth_fraction": nbytes / t / bench.bw})
        del k, v, q
    for B in (64, 256):
        H, P, C, K = 32, 128, 8 * 128 * 2 + 32 * 128, 4
        xBC, ring = torch.randn(B, C, device=dev, dtype=dt), torch.zeros(B, C, K, device=dev, dtype=dt)
        w, bias = torch.randn(C, K, device=dev, dtype=dt), torch.randn(C, device=dev, dtype=dt)
        dtv, hp = torch.randn(B, H, device=dev), torch.randn(H, device=dev)
        state = torch.zeros(B, H, P, P, device=dev)
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        t = timed(lambda: dispatch.mamba2_step(xBC, ring, pos, w, bias, dtv, hp, hp, hp, state, 8, P, P,
                                               backend="triton"))
        nbytes = 2 * state.numel() * 4 + 2 * ring.numel() * ring.element_size()
        out.append({"kernel": "mamba2_step", "batch": B, "length": 1, "us": t * 1e6, "bytes": nbytes,
                    "bandwidth_fraction": nbytes / t / bench.bw})
        del state, ring
    free()
    return out
