"""The `zebra` command line. Each subcommand lives in its own module under zebra/commands/ and exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their subcommand runs,
so `zebra --help` stays fast.

    zebra convert --teacher smollm2-135m-instruct --mla-layers 0,6,12,18,24,29 --kv-rank 64 --out student
    zebra kv --teacher path/to/config.json --mla-layers 0,5,10,14 --kv-rank 128 --rope-dim 32 --json
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ZebraError

# name -> (module under zebra.commands, one-line help)
COMMANDS = {
    "convert": ("convert", "build an initialised hybrid student from a teacher"),
    "kv": ("kv", "KV-cache size of a student layout vs its teacher (works from config.json alone)"),
    "smart": ("smart", "choose the MLA layers from per-layer sensitivity scores (SMART, Algorithm 2)"),
    "assets": ("assets", "fetch / show the offline assets (teacher, chat data, eval data)"),
    "generate": ("generate", "generate text from a teacher or student"),
    "chat": ("chat", "interactive chat with a model, streaming"),
    "agreement": ("agreement", "KL / top-1 agreement of students vs the teacher on held-out chat text"),
    "demo": ("demo", "the embedded default end to end (what `make demo` runs)"),
    "eval": ("eval", "zero-/few-shot accuracy with lm-eval's tasks on the offline eval data (+ table, JSON)"),
    "report": ("report", "report.md + plots (sensitivity, accuracy vs KV, throughput) from a run folder"),
    "run": ("run", "the whole pipeline from one YAML config, resumable"),
    "prepare": ("prepare", "tokenise a run's data once into memory-mapped shards in the cache, with progress"),
    "plan": ("plan", "per-GPU memory and time of a run's training stages for N GPUs, before loading weights"),
    "ablate": ("ablate", "recipe ablations at a fixed budget: one run per variant, shared stages reused, one table"),
    "init": ("stage", "pipeline stage: pure-MLA and pure-Mamba2 initialised students"),
    "ild": ("stage", "pipeline stage: intermediate layer distillation"),
    "sensitivity": ("stage", "pipeline stage: per-layer sensitivity scores"),
    "distill": ("stage", "pipeline stage: end-to-end distillation"),
    "dpo": ("stage", "pipeline stage: DPO with the distilled student as reference"),
    "compose": ("compose", "compose a hybrid from an all-MLA and an all-Mamba2 model"),
    "make-pairs": ("make_pairs", "DPO pairs: dataset reply vs the model's own sample"),
    "bench": ("bench", "throughput / memory / roofline benchmarks (decode, batch, prefill, training)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zebra", description="Zebra: Llama-family Transformer -> MLA + Mamba2 hybrid")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(f"zebra.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(f"zebra.commands.{args._module}").run(args) or 0)
    except ZebraError as e:
        print(f"zebra {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
