"""Autograd's saved-tensor bytes per token of one decoder layer, against `zebra plan`'s per-token formula
(`zebra.plan._layer_bytes_per_token`), on the CPU: for a shipped shape's width, a 1-layer and a 2-layer model of
one mixer type run forward under bf16 autocast (eager) with a saved-tensors hook that sums unique storages; their
difference is one layer. Run at two sequence lengths, the slope is the per-token bytes and the intercept the
layer's bf16 weight copies (autocast saves them for backward).

    python tools/saved_activations.py llama-3.2-1b 256 512
"""

from __future__ import annotations

import argparse

import torch

from zebra.convert.build import build_student_config
from zebra.model.hybrid import ZebraForCausalLM
from zebra.plan import _layer_bytes_per_token


def saved_bytes(shape: str, mixer: str, layers: int, T: int) -> tuple[int, object]:
    mla = "all" if mixer == "mla" else "none"
    attention = "all" if mixer == "attention" else None
    cfg = build_student_config(shape, mla, attention, kv_rank=64, rope_dim=32, nope_dim=32)[1]
    cfg.num_hidden_layers, cfg.mixer_types = layers, [mixer] * layers
    model = ZebraForCausalLM(cfg)
    ids = torch.randint(0, 1000, (1, T), generator=torch.Generator().manual_seed(0))
    doc = (torch.arange(T) >= T // 3).long()[None]
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, doc_ids=doc, use_cache=False)
    return sum(seen.values()), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", help="a shipped shape: smollm2-135m, llama-3.2-1b, ...")
    ap.add_argument("lengths", type=int, nargs=2, help="two sequence lengths")
    args = ap.parse_args()
    T0, T1 = args.lengths
    print("| shape | mixer | saved per token per layer (eager, bf16) | plan formula | ratio | per-layer constant |")
    print("|---|---|---:|---:|---:|---:|")
    for mixer in ("attention", "mla", "mamba2"):
        per_layer = []
        for T in (T0, T1):
            (one, _), (two, cfg) = saved_bytes(args.shape, mixer, 1, T), saved_bytes(args.shape, mixer, 2, T)
            per_layer.append(two - one)
        slope = (per_layer[1] - per_layer[0]) / (T1 - T0)
        const = per_layer[0] - slope * T0
        plan = _layer_bytes_per_token(cfg, mixer)
        print(f"| {args.shape} | {mixer} | {slope:,.0f} B | {plan:,.0f} B | {slope / plan:.2f} | "
              f"{const / 2**20:,.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
