"""The memory roofline of one decode step, and the copy bandwidth it is measured against.

A decode step at context s (s tokens already cached) and batch B must move at least
    weights       every parameter once (the embedding table only when it is also the LM head: a lookup
                  reads B rows, which is negligible)
    cache reads   attention layers: B (s+1) 2 n_kv d_h elements; MLA layers: B (s+1) (r_kv + d_r)
                  (the s cached rows plus the new one)
    state         Mamba2 layers: the fp32 SSM state read and written, 2 B H P N 4 bytes, and the conv ring
                  read and written, 2 B conv_dim d_conv elements
bytes / bandwidth is the fastest that step can be; `measure_copy_bandwidth` times large device-to-device
copies in the same run (2 x size bytes per copy: one read, one write), which is what a memory-bound kernel
can reach in practice, rather than the datasheet figure.

A generation of L tokens from a 1-token prompt visits s = 0 .. L-1; its step cost is affine in s, so
integrating the step time measured at a few positions (trapezoid) gives the generation time, and
throughput = B L / time; the roofline throughput is integrated the same way.
"""

from __future__ import annotations

import time

import torch


def weight_bytes(model) -> int:
    """Parameters a decode step reads: all, except an untied embedding table (only B rows are gathered)."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    for p in model.parameters():
        if id(p) in seen or (p is emb and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def cache_bytes_per_token(config, elem: int = 2) -> int:
    """Bytes of decode cache read per cached token per sequence, over all layers (HF Llama config dict or a
    ZebraConfig)."""
    if isinstance(config, dict):  # a plain Llama (the hf variant)
        L, n_kv = config["num_hidden_layers"], config["num_key_value_heads"]
        d_h = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return L * 2 * n_kv * d_h * elem
    per = {"attention": 2 * config.num_key_value_heads * config.head_dim,
           "mla": config.kv_lora_rank + config.qk_rope_head_dim, "mamba2": 0}
    return sum(per[t] for t in config.mixer_types) * elem


def state_bytes_per_step(config, elem: int = 2, ssm_elem: int = 4) -> int:
    """Mamba2 bytes read + written per step per sequence (SSM state of ssm_elem bytes, fp32 by default; conv ring in
    the model dtype)."""
    if isinstance(config, dict):
        return 0
    n = sum(t == "mamba2" for t in config.mixer_types)
    H, P = config.num_attention_heads, config.head_dim
    conv_dim = config.mamba_d_inner + 2 * config.mamba_d_xb
    return n * 2 * (H * P * P * ssm_elem + conv_dim * config.mamba_d_conv * elem)


def step_bytes(wbytes: int, config, s: int, batch: int, elem: int = 2, ssm_elem: int = 4) -> int:
    return wbytes + batch * ((s + 1) * cache_bytes_per_token(config, elem) + state_bytes_per_step(config, elem, ssm_elem))


def integrate(positions: list[int], step_s: list[float]) -> float:
    """Seconds for the steps s = positions[0] .. positions[-1] (inclusive) from step times measured at the
    sorted `positions`, with the step time linear between them: each segment's integer steps are summed
    exactly (n steps times the value at their mean position)."""
    total, k = 0.0, len(positions)
    if k == 1:
        return step_s[0]
    for i in range(k - 1):
        p0, p1, t0, t1 = positions[i], positions[i + 1], step_s[i], step_s[i + 1]
        a, b = p0, (p1 - 1 if i < k - 2 else p1)
        n = b - a + 1
        total += n * (t0 + (t1 - t0) * ((a + b) / 2 - p0) / (p1 - p0))
    return total


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median of `reps`."""
    device = torch.device(device)
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            t = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 2:
            times.append(t)
    del src, dst
    return 2 * n * 2 / sorted(times)[len(times) // 2]
