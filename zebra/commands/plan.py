"""`zebra plan CONFIG --gpus N [--gpu-mem GIB] [--json FILE]`: per stage and per GPU, the memory of parameters,
gradients, optimizer state, teacher, activations and fused KL, whether it fits, and the time the token budget
takes at measured throughput (zebra/plan.py has the model). No weights are loaded.

    zebra plan configs/paper/llama-3.1-8b-8mla24m2.yaml --gpus 8 --shape llama-3.1-8b
    zebra plan configs/smollm2-135m-quality.yaml --gpus 1 --bench results/quality-h200/train-bench/bench.json
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("config", help="a `zebra run` config")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu-mem", type=float, default=139.0, help="usable memory per GPU in GiB (default: 139, an H200)")
    p.add_argument("--bench", default=None, help="a `zebra bench --what train` JSON: tokens/s per GPU for the time")
    p.add_argument("--tokens-per-s", type=float, default=None, help="tokens/s per GPU (instead of --bench)")
    p.add_argument("--shape", default=None,
                   help="plan from a shipped shape (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, smollm2-135m) or a "
                        "config.json instead of the config's base model (no weights needed)")
    p.add_argument("--teacher-shape", default=None, help="the KD teacher's shape (default: --shape)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the plan to this JSON file")


def run(args) -> int:
    import json

    from ..plan import markdown, plan

    res = plan(args.config, args.gpus, args.gpu_mem, bench=args.bench, tokens_per_s=args.tokens_per_s,
               shape=args.shape, teacher_shape=args.teacher_shape)
    print(markdown(res))
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0
