"""`zebra report RUN_DIR [--out DIR]`: report.md + PNG plots from whatever results a run folder holds
(zebra/eval/report.py says what it looks for); a `zebra run` folder gets its pipeline section first.

    zebra report runs/demo                 # writes runs/demo/report.md and runs/demo/plots/*.png
    zebra report runs/demo --out /tmp/rep  # somewhere else
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p):
    p.add_argument("run_dir", help="a run folder (e.g. the output of `zebra run`)")
    p.add_argument("--out", default=None, help="where report.md goes, with plots/ for the plots it draws (default: "
                   "RUN_DIR); a run's own plots stay in RUN_DIR and the report links to them there")


def run(args) -> int:
    from ..eval.report import write_report

    head = None
    if (Path(args.run_dir) / "run_config.json").exists():
        from ..stages.report import render_report

        head = render_report(args.run_dir)
    path = write_report(args.run_dir, args.out, head=head)
    print(path)
    return 0
