"""Single pipeline stages as subcommands, on a run directory (what `zebra run` does, one stage at a time):

    zebra ild CONFIG.yaml [--out RUN] [--kind mla|mamba2|both]
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
    p.add_argument("--kind", default="both", choices=["mla", "mamba2", "both"], help="ILD only: which student")
    p.add_argument("--force", action="store_true", help="re-run even if the stage is DONE")


def run(args) -> int:
    from ..errors import ZebraError
    from ..pipeline import STAGES, Run, load_config

    cfg = load_config(args.config)
    r = Run(cfg, args.out or f"runs/{cfg['name']}")
    cmd = args.command
    if cmd == "ild":
        stages = ["ild-mla", "ild-mamba2"] if args.kind == "both" else [f"ild-{args.kind}"]
    elif cmd == "dpo":
        stages = ["pairs", "dpo"]  # pairs is skipped when already made
    else:
        stages = [cmd]
    needed = [s for s in STAGES[:STAGES.index(stages[0])] if not (cmd == "ild" and s.startswith("ild"))]
    missing = [s for s in needed if not r.done(s)]
    if missing:
        raise ZebraError(f"{cmd} needs finished earlier stages in {r.out}: {', '.join(missing)} (run them, or `zebra run`)")
    for s in stages:
        if args.force and r.done(s):
            shutil.rmtree(r.stage_dir(s))
    r.run(stages)
    return 0
