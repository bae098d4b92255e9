"""How far a bf16 Mamba2 SSM state drifts from the fp32 one over a long decode (issue 10 item 5: measure before
offering it). Two static-cache engines over the same model decode the same teacher-forced token stream (held-out
chat, concatenated), one with the fp32 state and one with bf16; at every step we compare their next-token
distributions: KL(fp32 || bf16) and top-1 agreement, summarised per window of steps.

    python tools/ssm_dtype_accuracy.py --model runs/demo/distill/model --steps 8192 --out results/ssm-dtype
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default="results/ssm-dtype")
    args = ap.parse_args()

    import zebra  # noqa: F401  (registers the model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zebra.data.chat import heldout_sequences
    from zebra.generation import StaticEngine

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    seqs = heldout_sequences(tok, 64, 4096)
    stream = torch.cat(seqs)[: args.steps + 1]
    if len(stream) < args.steps + 1:
        raise SystemExit(f"only {len(stream)} held-out tokens")
    L = args.steps + 2
    engines = {name: StaticEngine(model, 1, L, cuda_graph=False, ssm_dtype=dt)
               for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    logits = {n: e.prefill(stream[None, :1].to(dev)) for n, e in engines.items()}
    rows, acc = [], {"kl": 0.0, "agree": 0, "n": 0, "kl_max": 0.0}
    t0 = time.perf_counter()
    for t in range(args.steps):
        lp = F.log_softmax(logits["fp32"].double(), -1)
        lq = F.log_softmax(logits["bf16"].double(), -1)
        kl = float((lp.exp() * (lp - lq)).sum())
        acc["kl"] += kl
        acc["kl_max"] = max(acc["kl_max"], kl)
        acc["agree"] += int(lp.argmax() == lq.argmax())
        acc["n"] += 1
        if acc["n"] == args.window:
            rows.append({"steps": [t + 1 - args.window, t + 1], "mean_kl": acc["kl"] / acc["n"], "max_kl": acc["kl_max"],
                         "top1_agreement": acc["agree"] / acc["n"]})
            print(rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
            acc = {"kl": 0.0, "agree": 0, "n": 0, "kl_max": 0.0}
        if t + 1 < args.steps:
            nxt = stream[t + 1: t + 2].to(dev)
            logits = {n: e.step(nxt).clone() for n, e in engines.items()}
    ssm = {n: torch.cat([st["ssm"].float().flatten() for st, keys in zip(e.cache.state, e.cache.state_keys)
                         if "ssm" in keys]) for n, e in engines.items()}
    rel = float((ssm["bf16"] - ssm["fp32"]).norm() / ssm["fp32"].norm())
    out = {"model": args.model, "device": dev, "torch": torch.__version__, "steps": args.steps, "windows": rows,
           "final_state_rel_error": rel, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ssm_dtype.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "windows"}))


if __name__ == "__main__":
    main()
