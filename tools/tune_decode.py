"""Sweep the split-K decode attention kernel's tile size / warps / pipeline stages on the GPU at the MLA (Zebra-8B
latent rows) and GQA (Llama-8B) shapes; prints achieved GB/s per setting (python tools/tune_decode.py)."""

import itertools

import torch

from zebra.bench.roofline import measure_copy_bandwidth
from zebra.kernels.decode import decode_attention

bw = measure_copy_bandwidth("cuda")
print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
S = 8192
for name, B in (("mla", 256), ("mla", 64), ("mla", 1), ("gqa", 32)):
    if name == "mla":
        cache = torch.randn(B, 4 * S if B == 1 else S, 224, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(B, 1, 32, 224, device="cuda", dtype=torch.bfloat16)
        k, v = cache[:, None], cache[:, None, :, :160]
        nbytes = cache.numel() * 2
    else:
        k = torch.randn(B, 8, S, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(B, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * k.numel() * 2
    z = torch.zeros(B, dtype=torch.int32, device="cuda")
    n = torch.full((B,), k.shape[2], dtype=torch.int32, device="cuda")
    best = None
    for bs, nw, ns in itertools.product((16, 32, 64), (4, 8), (1, 2, 3)):
        try:
            f = lambda: decode_attention(q, k, v, z, n, 0.088, block_s=bs, num_warps=nw, num_stages=ns)  # noqa: E731
            f()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                f()
            b.record()
            b.synchronize()
            t = a.elapsed_time(b) / 20 / 1e3
        except Exception as e:  # noqa: BLE001  (out of shared memory etc.)
            print(f"{name} B={B} bs={bs} w={nw} st={ns}: {type(e).__name__}")
            continue
        gbs = nbytes / t / 1e9
        best = max(best or (0,), (gbs, bs, nw, ns))
        print(f"{name} B={B} bs={bs} w={nw} st={ns}: {gbs:,.0f} GB/s ({100 * gbs * 1e9 / bw:.0f}%)")
    print(f"BEST {name} B={B}: {best}")
    del k, v, q
