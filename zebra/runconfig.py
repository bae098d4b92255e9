"""The `zebra run` configuration: defaults, types and checks, in one place (README "Config keys" documents each).

    cfg = load_config("configs/smollm2-135m-quality.yaml")      # a plain dict, every key present and typed

A YAML file overrides DEFAULTS key by key (nested mappings merge). Every value is checked against the type of its
default (or TYPES where the default is None): numbers written as strings ("1e6", which YAML reads as a string)
are parsed, integers must be whole, unknown keys and wrong types are refused with the key's dotted name, before
any work starts. Each setting has one default, here.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from .convert.layout import DEFAULT_KV_RANK, DEFAULT_ROPE_DIM
from .errors import ZebraError

# Table 1 of the paper less RACE (not in the offline data)
TABLE1_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "mmlu"]

DEFAULTS = {
    "name": "zebra-run",
    "base": "smollm2-135m-instruct",  # the model the student is built from (init + ILD teacher)
    "teacher": None,  # the end-to-end KD teacher (same tokenizer); default: the base model
    "data": ["sharegpt"],  # chat / text sources, see zebra/data/sources.py
    "seq_len": 2048,  # packed row length (a stage may set its own)
    "seed": 0,
    "ild_fraction": 0.2,
    "device": "auto",
    "compile": "auto",  # torch.compile the decoder layers while training: auto (= on CUDA), true, false
    "parallel": "fsdp",  # several ranks (torchrun): "fsdp" (FSDP2, sharded) or "ddp" (replicated)
    "teacher_sharding": "auto",  # several ranks with fsdp: the frozen teacher's layers sharded (shard), not (replicate),
    # or auto: sharded when a replicated copy would take more than 1/8 of a GPU (zebra.stages.parallel.shard_teacher)
    "save_dtype": "bfloat16",  # the distilled / DPO models on disk: bfloat16 or float32 (ILD pools stay fp32)
    "student": {"num_mla": 6, "placement": "smart", "mla_layers": None, "attention_layers": None, "kv_budget": None,
                "kv_rank": DEFAULT_KV_RANK, "q_rank": None, "rope_dim": DEFAULT_ROPE_DIM, "nope_dim": None,  # = zebra convert's
                "rope_select": "freq",  # MLA RoPE: the teacher's fastest rotary pairs ("norm", "last": the paper)
                "conv_init": "identity",  # Mamba2 short conv as the identity ("random": Mamba2's default)
                "gate_init": "constant",  # Mamba2 gate constant at init ("random": Mamba2's default)
                "calibrate_tokens": 65536},  # ILD-share tokens that set Mamba2's output scale at init (0: off)
    "ild": {"mode": "mixers", "tokens": 1_000_000, "lr": 1e-3, "batch_size": 4, "grad_accum": 1, "seq_len": None,
            "betas": [0.9, 0.95], "warmup_steps": 0, "warmup_frac": 0.01, "schedule": "cosine", "decay_frac": 0.2,
            "ckpt_every": 50, "grad_checkpointing": False, "time_budget_s": 0.0},
    "sensitivity": {"num_seqs": 64, "seq_len": 512, "batch_size": 8},
    "distill": {"tokens": 4_000_000, "lr": 8e-5, "lr_other": None, "batch_size": 4, "grad_accum": 1,
                "seq_len": None, "betas": [0.9, 0.95], "warmup_steps": 0, "warmup_frac": 0.01, "schedule": "cosine",
                "decay_frac": 0.2, "loss_on": "assistant", "token_weighting": "tokens", "ckpt_every": 50,
                "grad_checkpointing": False, "eval_every": 0, "curve_seqs": 32, "curve_tasks": None,
                "curve_limit": 200, "time_budget_s": 0.0,
                "data": None},  # the distillation's own sources (default: the run's data)
    "pairs": {"num_pairs": 256, "max_new_tokens": 128, "temperature": 1.0, "batch_size": 32},
    "dpo": {"enabled": True, "lr": 5e-7, "beta": 0.1, "epochs": 1, "batch_size": 4, "grad_accum": 1,
            "max_len": 1024, "ckpt_every": 50, "pairs_file": None},  # pairs_file: your own (prompt, chosen, rejected) JSONL
    "eval": {"num_seqs": 64, "seq_len": 512, "batch_size": 8, "plaintext_seqs": 64,
             "tasks": list(TABLE1_TASKS), "limit": None, "jobs": "auto",  # lm-eval tasks for teacher and student
             # (default: the paper's Table 1 tasks; [] = none)
             "proxy_tasks": [], "proxy_limit": 500,  # the fast multiple-choice proxy (zebra.eval.quick)
             "teacher_async": True},  # on a GPU, score the teacher in the background while the student trains
}

# types for keys whose default is None or that take several types: dotted key -> allowed kinds
TYPES = {
    "teacher": (str, None),
    "student.mla_layers": (list, str, None),
    "student.attention_layers": (list, str, None),
    "student.kv_budget": (float, None),
    "student.q_rank": (int, None),
    "student.nope_dim": (int, None),
    "ild.seq_len": (int, None),
    "distill.seq_len": (int, None),
    "distill.lr_other": (float, None),
    "distill.curve_tasks": (list, None),
    "distill.data": (list, None),
    "eval.tasks": (list, str),
    "dpo.pairs_file": (str, None),
    "eval.limit": (float, None),
    "eval.jobs": (int, str),
    "compile": (bool, str),
}
CHOICES = {
    "compile": ("auto", True, False),
    "parallel": ("fsdp", "ddp"),
    "teacher_sharding": ("auto", "shard", "replicate"),
    "save_dtype": ("bfloat16", "float32"),
    "ild.mode": ("mixers", "full"),
    "ild.schedule": ("cosine", "wsd"),
    "distill.schedule": ("cosine", "wsd"),
    "distill.loss_on": ("assistant", "all"),
    "distill.token_weighting": ("tokens", "micro"),
    "student.rope_select": ("freq", "norm", "last"),
    "student.placement": ("smart", "top", "uniform"),
    "student.conv_init": ("identity", "random"),
    "student.gate_init": ("constant", "random"),
}
POSITIVE = ("seq_len", "ild.tokens", "ild.lr", "ild.batch_size", "ild.grad_accum", "distill.tokens", "distill.lr",
            "distill.batch_size", "distill.grad_accum", "dpo.lr", "dpo.batch_size", "student.kv_rank",
            "student.rope_dim", "sensitivity.num_seqs", "eval.num_seqs", "distill.lr_other", "ild.seq_len",
            "distill.seq_len", "ild.ckpt_every", "distill.ckpt_every", "dpo.ckpt_every")


def _number(value, kind, key):
    if isinstance(value, bool):
        raise ZebraError(f"config key {key!r} must be a number, not {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            raise ZebraError(f"config key {key!r} must be a number, not {value!r}") from None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise ZebraError(f"config key {key!r} must be a number, not {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ZebraError(f"config key {key!r} must be a whole number, not {value!r}")
        return int(value)
    return float(value)


def _typed(value, default, key):
    """value converted to the kind of `default` (or TYPES[key]); ZebraError naming the key otherwise."""
    kinds = TYPES.get(key) or (type(default),)
    if value is None:
        if None in kinds:
            return None
        raise ZebraError(f"config key {key!r} needs a value")
    if bool in kinds and isinstance(value, bool):
        return value
    if list in kinds and isinstance(value, (list, tuple)):
        return list(value)
    for kind in (int, float):
        if kind in kinds and not isinstance(value, (bool, list, tuple, dict)):
            try:
                return _number(value, kind, key)
            except ZebraError:
                if not (str in kinds and isinstance(value, str)):
                    raise
    if str in kinds and isinstance(value, str):
        return value
    names = " or ".join("null" if k is None else k.__name__ for k in kinds)
    raise ZebraError(f"config key {key!r} must be {names}, not {value!r}")


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in base:
            raise ZebraError(f"unknown config key {key!r} (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ZebraError(f"config key {key!r} must be a mapping")
            out[k] = _merge(base[k], v, f"{key}.")
        elif k == "data":  # the run's sources, or a stage's own: a single source is a list of one
            out[k] = None if v is None and where else (v if isinstance(v, list) else [v])
        else:
            out[k] = _typed(v, base[k], key)
    return out


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check(cfg: dict) -> dict:
    """Cross-key checks and resolved defaults (teacher = base)."""
    cfg["teacher"] = cfg["teacher"] or cfg["base"]
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ZebraError(f"config key {key!r} must be one of {list(choices)}, not {_get(cfg, key)!r}")
    for key in POSITIVE:
        v = _get(cfg, key)
        if v is not None and v <= 0:
            raise ZebraError(f"config key {key!r} must be positive, not {v!r}")
    if cfg["seq_len"] < 16:
        raise ZebraError("config key 'seq_len' must be at least 16")
    if not 0 < cfg["ild_fraction"] < 1:
        raise ZebraError(f"config key 'ild_fraction' (the ILD share of the data) must be between 0 and 1, not "
                         f"{cfg['ild_fraction']!r}")
    dev = str(cfg["device"])
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ZebraError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {cfg['device']!r}")
    budget = cfg["student"]["kv_budget"]
    if budget is not None and not 0 < budget <= 1:
        raise ZebraError(f"config key 'student.kv_budget' is a fraction of the teacher's KV cache in (0, 1], not "
                         f"{budget!r} (e.g. 0.05 for 5%)")
    if cfg["teacher_sharding"] == "shard" and cfg["parallel"] != "fsdp":
        raise ZebraError("config key 'teacher_sharding' is 'shard', which needs 'parallel: fsdp' (DDP replicates "
                         f"every model), not {cfg['parallel']!r}")
    for stage in ("ild", "distill"):
        b = cfg[stage]["betas"]
        if len(b) != 2:
            raise ZebraError(f"config key '{stage}.betas' must be two numbers")
        cfg[stage]["betas"] = [_number(x, float, f"{stage}.betas") for x in b]
    from .data.sources import normalize_spec

    for key, sources in (("data", cfg["data"]), ("distill.data", cfg["distill"]["data"])):
        if sources is None:  # distill.data: the run's data
            continue
        if not sources:
            raise ZebraError(f"config key {key!r} lists no source")
        for spec in sources:  # teacher-sampled data: the run's teacher writes it unless the source names one
            if isinstance(spec, dict) and str(spec.get("type", "")).lower() == "teacher_samples" \
                    and not spec.get("teacher"):
                spec["teacher"] = cfg["teacher"]
            normalize_spec(spec)  # a bad source fails here, before any stage starts or writes
    if cfg["eval"]["tasks"]:
        from .eval.lm_eval_tasks import parse_tasks

        cfg["eval"]["tasks"] = parse_tasks(cfg["eval"]["tasks"])
    return cfg


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ZebraError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ZebraError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ZebraError(f"{path} must hold a mapping of settings")
    cfg = _merge(DEFAULTS, raw)
    _one_layer_choice(raw, str(path))
    if overrides:
        cfg = _merge(cfg, overrides)
    return check(cfg)


def _one_layer_choice(raw: dict, where: str) -> None:
    """student.mla_layers fixes the MLA layers; num_mla / kv_budget ask SMART to choose them: a file that gives both
    would have one silently ignored. (An ablation variant's override of the base file's choice is not a conflict.)"""
    student = raw.get("student") if isinstance(raw.get("student"), dict) else {}
    given = [k for k in ("mla_layers", "num_mla", "kv_budget") if student.get(k) is not None]
    if len(given) > 1:
        raise ZebraError(f"{where}: give one of student.mla_layers (fixed layers), student.num_mla or "
                         f"student.kv_budget (SMART chooses), not {' and '.join('student.' + k for k in given)}")


def config_from_dict(raw: dict) -> dict:
    _one_layer_choice(raw, "config")
    return check(_merge(DEFAULTS, raw))
