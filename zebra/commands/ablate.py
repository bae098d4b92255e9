"""`zebra ablate SPEC.yaml [--out DIR] [--only a,b] [--time-limit S]`: recipe ablations at a fixed budget
(see zebra/ablate.py): one `zebra run` per variant, shared stages linked, one table of held-out KL and accuracy.

    zebra ablate configs/ablations-smollm2.yaml --out runs/ablations
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("spec", help="ablation spec YAML: base config, common overrides, variants")
    p.add_argument("--out", default="runs/ablations", help="output folder (one run folder per variant)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: start no new variant after this")


def run(args) -> int:
    from ..ablate import run_ablations

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    path = run_ablations(args.spec, args.out, only, args.time_limit)
    print(path.read_text())
    print(f"table: {path}")
    return 0
