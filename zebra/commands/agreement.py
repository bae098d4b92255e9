"""`zebra agreement`: how close students are to their teacher on held-out chat text.

    zebra agreement --teacher smollm2-135m-instruct --model runs/mla --model runs/mamba2 --num-seqs 64

Per model: mean per-token KL(teacher || student), top-1 agreement, perplexity of both, on the first
--num-seqs held-out ShareGPT conversations (stable 2% slice never used for training), truncated to --seq-len.
"""

from __future__ import annotations

import json
import time


def add_arguments(p):
    p.add_argument("--teacher", required=True)
    p.add_argument("--model", action="append", required=True, help="student dir (repeatable)")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")


def run(args) -> int:
    from ..data.chat import heldout_sequences
    from ..eval.agreement import agreement
    from ..loading import load_model

    teacher, tok = load_model(args.teacher, dtype=args.dtype, device=args.device)
    seqs = heldout_sequences(tok, args.num_seqs, args.seq_len)
    rows = []
    for path in args.model:
        student, _ = load_model(path, dtype=args.dtype, device=args.device)
        t0 = time.perf_counter()
        stats = agreement(teacher, student, seqs, batch_size=args.batch_size, progress=True)
        stats.update(model=path, seconds=round(time.perf_counter() - t0, 1))
        kv = getattr(student.config, "kv_summary", None)
        stats["kv_percent"] = kv()["kv_percent"] if kv else 100.0
        rows.append(stats)
        del student
    print(f"held-out chat: {len(seqs)} sequences, {rows[0]['tokens']} tokens, teacher ppl {rows[0]['ppl_teacher']:.2f}")
    print("| model | KV % | KL(teacher||student) | top-1 agree | student ppl |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv_percent']:.2f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['ppl_student']:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"teacher": args.teacher, "results": rows}, f, indent=2)
    return 0
