"""Single pipeline stages as subcommands, on a run directory (what `zebra run` does, one stage at a time):

    zebra init CONFIG.yaml [--out RUN]
    zebra ild CONFIG.yaml [--out RUN]          (both pools, MLA and Mamba2, from one teacher pass)
    zebra sensitivity CONFIG.yaml [--out RUN]
    zebra distill CONFIG.yaml [--out RUN]
    zebra dpo CONFIG.yaml [--out RUN]          (makes the preference pairs first if needed)
Earlier stages must be DONE in RUN (or run them first); a finished stage is re-run only with --force.
"""

from __future__ import annotations

import shutil


def add_arguments(p):
    p.add_argument("config")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--force", action="store_true", help="re-run even if the stage is DONE")


def run(args) -> int:
    from ..errors import ZebraError
    from ..pipeline import STAGES, Run, load_config

    from ..stages.parallel import init_distributed

    cfg = load_config(args.config)
    init_distributed()  # under torchrun: one rank of several
    r = Run(cfg, args.out or f"runs/{cfg['name']}")
    cmd = args.command
    stages = ["pairs", "dpo"] if cmd == "dpo" else [cmd]  # pairs is skipped when already made
    needed = STAGES[:STAGES.index(stages[0])]
    missing = [s for s in needed if not r.done(s)]
    if missing:
        raise ZebraError(f"{cmd} needs finished earlier stages in {r.out}: {', '.join(missing)} (run them, or `zebra run`)")
    for s in stages:
        if args.force and r.done(s):
            shutil.rmtree(r.stage_dir(s))
    r.run(stages)
    return 0
