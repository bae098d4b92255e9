"""`zebra demo` (what `make demo` runs): the embedded default end to end, smoke scale.

Today: convert the embedded SmolLM2-135M-Instruct teacher into an initialised Zebra hybrid (6 MLA layers
chosen uniformly, r_kv 64, the other 24 Mamba2), print its KV cache against the teacher's, and let teacher
and student answer the same chat prompt. The student is *initialised only* (no distillation yet), so its
answer is expected to be poor: the KL it starts from is recorded in BENCHMARKS.md.

    zebra demo [--out runs/demo] [--prompt "..."]
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_PROMPT = "What are three good reasons to learn to cook at home?"


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="where the demo writes (default runs/demo)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)


def run(args) -> int:
    from ..convert.build import convert, kv_message
    from ..loading import generate_text, load_model

    teacher = "smollm2-135m-instruct"
    out = Path(args.out) / "student-init"
    t0 = time.perf_counter()
    print(f"[1/3] converting {teacher} -> {out} (MLA at 0,6,12,18,24,29, r_kv 64, d_r 32; Mamba2 elsewhere)", flush=True)
    report = convert(teacher, out, mla_layers="0,6,12,18,24,29", attention_layers="none", kv_rank=64,
                     rope_dim=32, nope_dim=32, force=True)
    print("      " + kv_message(report["kv"]), flush=True)
    print(f"[2/3] teacher answer ({teacher})", flush=True)
    model, tok = load_model(teacher, dtype="auto")
    print("   > " + generate_text(model, tok, args.prompt, args.max_new_tokens).replace("\n", "\n     "))
    del model
    print(f"[3/3] student answer (initialised, not yet distilled: {out})", flush=True)
    model, tok = load_model(str(out), dtype="auto")
    print("   > " + generate_text(model, tok, args.prompt, args.max_new_tokens).replace("\n", "\n     "))
    print(f"prompt: {args.prompt!r}")
    print(f"done in {time.perf_counter() - t0:.0f}s. {kv_message(report['kv'])}")
    return 0
