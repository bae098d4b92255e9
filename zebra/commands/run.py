"""`zebra run CONFIG.yaml [--out DIR] [--stages a,b]`: the whole pipeline (see zebra/pipeline.py), resumable.

    zebra run configs/demo.yaml                 # -> runs/demo/ (each stage a folder, report.md at the end)
    zebra run configs/smollm2-135m-gpu.yaml --out runs/smollm2
Re-running skips finished stages and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run (default: all)")


def run(args) -> int:
    from ..errors import ZebraError
    from ..pipeline import STAGES, Run, load_config

    cfg = load_config(args.config)
    only = None
    if args.stages:
        only = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in only if s not in STAGES]
        if bad:
            raise ZebraError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    out = args.out or f"runs/{cfg['name']}"
    report = Run(cfg, out).run(only)
    print(f"report: {report}")
    return 0
