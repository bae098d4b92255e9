"""`zebra run CONFIG.yaml [--out DIR] [--stages a,b] [--nproc N]`: the whole pipeline (see zebra/pipeline.py),
resumable, on one process or several.

    zebra run configs/demo.yaml                 # -> runs/demo/ (each stage a folder, report.md at the end)
    zebra run configs/smollm2-135m-quality.yaml --out runs/smollm2
    torchrun --nproc-per-node 8 -m zebra.cli run configs/paper/llama-3.2-1b-4mla12m2.yaml    # 8 GPUs, FSDP2
    zebra run CONFIG --nproc 8                  # the same, started for you
Re-running skips finished stages and resumes an interrupted one from its last checkpoint (at any world size).
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run (default: all)")
    p.add_argument("--nproc", type=int, default=None,
                   help="start N processes with torchrun (one per GPU; gloo on CPU) and run there")


def run(args) -> int:
    import os
    import sys

    from ..errors import ZebraError
    from ..pipeline import STAGES, Run, load_config

    cfg = load_config(args.config)  # checked before anything starts, also before spawning ranks
    only = None
    if args.stages:
        only = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in only if s not in STAGES]
        if bad:
            raise ZebraError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    if args.nproc is not None:
        if args.nproc < 1:
            raise ZebraError("--nproc must be >= 1")
        if "WORLD_SIZE" in os.environ:
            raise ZebraError("--nproc is for starting the ranks; under torchrun leave it out")
        argv = ["run", args.config] + (["--out", args.out] if args.out else []) + \
            (["--stages", args.stages] if args.stages else [])
        from ..stages.parallel import multicast_off

        multicast_off()  # inherited by every rank
        os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", str(args.nproc), "-m", "zebra.cli", *argv])
    from ..stages.parallel import init_distributed

    init_distributed()
    out = args.out or f"runs/{cfg['name']}"
    report = Run(cfg, out).run(only)
    if Run.is_main():
        print(f"report: {report}")
    return 0
