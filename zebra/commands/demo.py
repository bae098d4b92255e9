"""`zebra demo` (what `make demo` runs): the whole pipeline on the embedded default, SMOKE SCALE.

Runs `zebra run configs/demo.yaml --out runs/demo` (SmolLM2-135M-Instruct teacher, ShareGPT data, 6 MLA
layers chosen by SMART + 24 Mamba2, r_kv 64: 5% of the teacher's KV cache) with tiny token budgets so it
finishes in about 15-20 minutes on a 2-core CPU (a GPU is used when present), prints the report (KL to the
teacher after each stage), and lets the teacher and the final student answer the same prompt. The budgets
show the mechanics, not a good model: see configs/smollm2-135m-gpu.yaml for a real run. Re-running resumes.

    zebra demo [--config configs/demo.yaml] [--out runs/demo] [--prompt "..."]
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ZebraError

DEFAULT_PROMPT = "What are three good reasons to learn to cook at home?"


def _default_config() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def add_arguments(p):
    p.add_argument("--config", default=None, help="default: configs/demo.yaml of this checkout")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=40)


def run(args) -> int:
    from ..loading import generate_text, load_model
    from ..pipeline import Run, load_config

    cfg_path = Path(args.config) if args.config else _default_config()
    if not cfg_path.exists():
        raise ZebraError(f"demo config {cfg_path} not found (pass --config)")
    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    print(f"Zebra demo (smoke-scale budgets from {cfg_path}) -> {args.out}", flush=True)
    report = Run(cfg, args.out).run()
    print("\n" + report.read_text())
    final = Path(args.out) / "dpo" / "model"
    for label, path in (("teacher", cfg["teacher"]), ("Zebra student (after ILD, KD, DPO)", str(final))):
        model, tok = load_model(path)
        text = generate_text(model, tok, args.prompt, args.max_new_tokens) or "(no text: it ended its turn at once)"
        print(f"[{label}] > " + text.replace("\n", "\n    "))
        del model
    print(f"prompt: {args.prompt!r}\ndemo done in {time.perf_counter() - t0:.0f}s; report: {report}")
    return 0
