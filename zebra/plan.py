"""`zebra plan CONFIG --gpus N`: what each training stage of a run needs per GPU (memory of parameters, gradients,
optimizer state, the teacher, activations, the fused KL) and how long its token budget takes, before any weight
is loaded (the models are built on the meta device from config.json or a shipped shape).

Memory model, per rank, FSDP2 over N ranks (N = 1: plain data parallel of one):
    parameters   4 B x student params / N (fp32 master, sharded) + 2 B x the largest layer x 2 (bf16 all-gather
                 buffers of the layer in flight and the prefetched next one, N > 1)
    gradients    4 B x trained params / N            optimizer  8 B x trained params / N (AdamW m, v)
    teacher      2 B x teacher params (bf16) replicated on every rank, or, when the run shards it (`teacher_sharding`,
                 the rule of zebra.stages.parallel.shard_teacher), 2 B x (embeddings, head and final norm, which stay
                 whole + layer params / N + the 2 largest layers gathered); fits_with_sharded_teacher says whether the
                 sharded form would fit
    activations  micro-batch tokens x (layers x A_layer), or with activation checkpointing (layers x 4 d + A_layer):
                 A_layer = bytes a layer keeps per token for backward in bf16 autocast (residual and norms 8 d,
                 MLP 10 I, attention / MLA 10 H D, Mamba2 2 (2 d_inner + 2 d_xb) + 4 conv + 48 d_inner + 24 H Q
                 (the chunked scan's (Q x Q) fp32 blocks, Q = 64))
    fused KL     4096-token chunk x vocab x 10 B (both models' bf16 logits, the compiled KL's fp32 gradient and its
                 bf16 copy for the two GEMMs; zebra.ops.fused_kl) + the head's fp32 gradient (vocab x d x 4 B)
    DPO          (when dpo.enabled) the distilled hybrid trains on batch_size pairs x 2 sequences x max_len tokens per
                 micro-batch; its frozen reference is the same model in fp32 (4 B x params, replicated or sharded by
                 the teacher's rule, in the teacher column); instead of the fused KL, the full logits of the policy
                 and the reference: tokens x vocab x 12 B (policy logits in bf16 and their fp32 copy kept for the
                 backward, their fp32 gradient, the reference's logits alive meanwhile). Estimated, not yet measured.
times ACT_SCALE (fitted to measured peaks), plus a fixed 2 GiB for the CUDA context and allocator slack. Time: tokens / (measured tokens/s per GPU x N x 0.9),
the tokens/s from a `zebra bench --what train` JSON (--bench) or --tokens-per-s.

Checked against measured peaks in BENCHMARKS.md; the activation term is an estimate of what autograd keeps, not a
bound (torch.compile keeps less for elementwise chains).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ZebraError

GiB = 2**30
KL_CHUNK = 4096
KL_BYTES = 10  # per (token x vocab) element of one chunk of the fused KL, compiled (eager held ~24: fbd6616 compiled it)
# what torch.compile'd training keeps of the formula's activations, fitted to one-GPU peaks of `zebra bench --what
# train` (BENCHMARKS.md): ILD ("mixers") to the SmolLM2 and 1B ILD peaks (H200, dacf815), distillation ("all") to the
# 1B distillation peak with the compiled fused KL (H100, b0b010b); "layers" (full ILD) is not measured
ACT_SCALE = {"mixers": 0.55, "layers": 0.8, "all": 0.6}
OVERHEAD = 2 * GiB
SCALING = 0.9  # assumed data-parallel efficiency when extrapolating one GPU's tokens/s to N


def _meta_model(cfg):
    from .model.hybrid import ZebraForCausalLM

    with torch.device("meta"):
        return ZebraForCausalLM(cfg)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_count(name: str) -> int:
    """Parameters of a teacher (a registered name, HF directory or shipped shape) as an all-attention Zebra model,
    counted on the meta device (nothing loaded)."""
    from .convert.build import build_student_config

    return _count(_meta_model(build_student_config(name, "none", "all")[1]))


def _layer_bytes_per_token(cfg, mixer: str) -> float:
    d, inter = cfg.hidden_size, cfg.intermediate_size
    H, D = cfg.num_attention_heads, cfg.head_dim
    out = 8 * d + 10 * inter
    if mixer in ("attention", "mla"):
        return out + 10 * H * D
    d_in, d_xb = cfg.mamba_d_inner, cfg.mamba_d_xb
    conv = d_in + 2 * d_xb
    return out + 2 * (2 * d_in + 2 * d_xb) + 4 * conv + 48 * d_in + 24 * H * 64


def _students(run_cfg, stage: str):
    """(student ZebraConfigs trained in this stage, which parameters train: "all" | "layers" | "mixers")."""
    from .convert.build import build_student_config

    s = run_cfg["student"]
    kw = dict(kv_rank=s["kv_rank"], q_rank=s["q_rank"], rope_dim=s["rope_dim"], nope_dim=s["nope_dim"])
    base = run_cfg["_shape"] or run_cfg["base"]
    if stage == "ild":
        mla = build_student_config(base, "all", "none", **kw)[1]
        mamba = build_student_config(base, "none", "none", **kw)[1]
        return [mla, mamba], ("mixers" if run_cfg["ild"]["mode"] == "mixers" else "layers")
    layers = s["mla_layers"] if s["mla_layers"] is not None else list(range(s["num_mla"]))  # the count matters
    return [build_student_config(base, layers, s["attention_layers"], **kw)[1]], "all"


def stage_plan(run_cfg: dict, stage: str, gpus: int, gpu_mem_gib: float, tokens_per_s: float | None,
               fsdp: bool | None = None) -> dict:
    """One stage's plan. fsdp: whether the student is FSDP2-wrapped (default: when gpus > 1; one GPU under FSDP2, as
    `zebra bench --train-variants fsdp` runs it, also holds the bf16 all-gather buffers)."""
    from .convert.build import build_student_config

    st = run_cfg[stage]
    configs, trains = _students(run_cfg, stage)
    models = [_meta_model(c) for c in configs]
    if stage == "dpo":  # the frozen reference is the distilled hybrid itself, in fp32 (Run.load)
        tcfg, teacher, t_bytes = configs[0], models[0], 4
    else:
        teacher_name = run_cfg["_teacher_shape"] or (run_cfg["base"] if stage == "ild" else run_cfg["teacher"])
        tcfg = build_student_config(teacher_name, "none", "all")[1]
        teacher, t_bytes = _meta_model(tcfg), 2
    N = gpus
    p_student = sum(_count(m) for m in models)
    if trains == "mixers":
        p_train = sum(_count(layer.mixer) for m in models for layer in m.model.layers)
    elif trains == "layers":
        p_train = sum(_count(m.model.layers) for m in models)
    else:
        p_train = p_student
    largest = max(_count(layer) for m in models for layer in m.model.layers)
    fsdp = N > 1 if fsdp is None else fsdp
    params = 4 * p_student / N + (2 * 2 * largest if fsdp else 0)
    grads, optim = 4 * p_train / N, 8 * p_train / N
    p_teacher = _count(teacher)
    t_largest = max(_count(layer) for layer in teacher.model.layers)
    seq = st.get("seq_len") or run_cfg["seq_len"]
    tokens = st["batch_size"] * seq  # per micro-batch per rank
    if stage == "dpo":  # chosen and rejected, each up to max_len
        tokens = st["batch_size"] * 2 * st["max_len"]
    per_token = 0.0
    for m in models:
        cfg = m.config
        layer_bytes = [_layer_bytes_per_token(cfg, t) for t in cfg.mixer_types]
        if trains == "mixers":  # the teacher's layer inputs and outputs are kept, the MLPs do not run
            layer_bytes = [b - 10 * cfg.intermediate_size + 8 * cfg.hidden_size for b in layer_bytes]
        if st.get("grad_checkpointing"):
            per_token += len(layer_bytes) * 4 * cfg.hidden_size + max(layer_bytes)
        else:
            per_token += sum(layer_bytes)
    activations = tokens * per_token * ACT_SCALE[trains]
    kl = 0.0
    if stage == "distill":
        V, d = configs[0].vocab_size, configs[0].hidden_size
        kl = KL_CHUNK * V * KL_BYTES + V * d * 4 + tokens * tcfg.hidden_size * 2
    elif stage == "dpo":
        kl = tokens * configs[0].vocab_size * 12
    fixed = params + grads + optim + activations + kl + OVERHEAD
    budget = gpu_mem_gib * GiB
    # the frozen teacher: whole on every rank, or its layers sharded (the same rule the pipeline applies)
    from .stages.parallel import shard_teacher

    p_layers = _count(teacher.model.layers)
    sharded_teacher = t_bytes * ((p_teacher - p_layers) + p_layers / N + 2 * t_largest)
    if shard_teacher(run_cfg["teacher_sharding"], run_cfg["parallel"], N, t_bytes * p_teacher, gpu_mem_gib * GiB):
        teacher_mem, teacher_mode = sharded_teacher, "sharded"
    else:
        teacher_mem, teacher_mode = t_bytes * p_teacher, "replicated"
    total = fixed + teacher_mem
    out = {
        "stage": stage, "gpus": N, "trains": trains, "student_params": p_student, "trained_params": p_train,
        "teacher_params": p_teacher, "micro_batch_tokens": tokens, "global_batch_tokens": tokens * st["grad_accum"] * N,
        "grad_checkpointing": bool(st.get("grad_checkpointing")),
        "gib": {"parameters": params / GiB, "gradients": grads / GiB, "optimizer": optim / GiB,
                "teacher": teacher_mem / GiB, "activations": activations / GiB, "fused_kl": kl / GiB,
                "overhead": OVERHEAD / GiB, "total": total / GiB},
        "teacher_mode": teacher_mode, "gpu_mem_gib": gpu_mem_gib, "fits": total <= budget,
        "fits_with_sharded_teacher": fixed + sharded_teacher <= budget,
        "tokens": st.get("tokens"),
    }
    if tokens_per_s and st.get("tokens"):
        out["tokens_per_s_per_gpu"] = tokens_per_s
        out["hours"] = st["tokens"] / (tokens_per_s * N * (SCALING if N > 1 else 1.0)) / 3600
    return out


def read_bench(path: str | Path) -> dict:
    """A `zebra bench --what train` JSON, or a ZebraError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZebraError(f"--bench {path}: cannot read it as a zebra bench JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train", []), list):
        raise ZebraError(f"--bench {path}: not a `zebra bench --what train` JSON (no 'train' list)")
    return data


def bench_tokens_per_s(data: dict, shape: str, stage: str) -> float | None:
    """The fastest measured tokens/s of `stage` on `shape` in a `zebra bench --what train` result (read_bench)."""
    rows = [r for r in data.get("train", []) if r.get("status") == "ok" and r.get("stage") == stage
            and r.get("shape") == shape]
    return max((r["tokens_per_s"] for r in rows), default=None)


def _check_models(cfg: dict) -> None:
    """Each model the plan reads from the config (no --shape for it) has a readable config, or a ZebraError that
    says how to plan without the weights."""
    from .convert.teacher import load_teacher_config, shape_names

    names = ([] if cfg["_shape"] else [cfg["base"]]) + ([] if cfg["_teacher_shape"] else [cfg["base"], cfg["teacher"]])
    for name in dict.fromkeys(names):
        try:
            load_teacher_config(name)
        except ZebraError as e:
            raise ZebraError(f"{e}; to plan without the weights, pass --shape ({', '.join(shape_names())}) or a "
                             "config.json") from e


def plan(config_path: str | Path, gpus: int, gpu_mem_gib: float = 139.0, bench: str | Path | None = None,
         tokens_per_s: float | None = None, shape: str | None = None, teacher_shape: str | None = None) -> dict:
    from .runconfig import load_config

    if gpus < 1:
        raise ZebraError("--gpus must be >= 1")
    if gpu_mem_gib <= 0:
        raise ZebraError("--gpu-mem must be positive")
    cfg = load_config(config_path)
    cfg["_shape"], cfg["_teacher_shape"] = shape, teacher_shape or shape
    stages = []
    _check_models(cfg)
    bench_data = read_bench(bench) if bench is not None else None
    notes = []
    bench_shape = _bench_shape(cfg, shape) if bench_data is not None else None
    for stage in ("ild", "distill") + (("dpo",) if cfg["dpo"]["enabled"] else ()):
        tps = tokens_per_s if stage != "dpo" else None  # no DPO throughput is measured
        if tps is None and bench_data is not None:
            tps = bench_tokens_per_s(bench_data, bench_shape, stage)
            if tps is None:
                have = sorted({f"{r.get('shape')} {r.get('stage')}" for r in bench_data.get("train", [])
                               if r.get("status") == "ok"})
                notes.append(f"no time for {stage}: --bench has no measured {stage} row of shape {bench_shape!r} "
                             f"(it has: {', '.join(have) or 'none'})")
        stages.append(stage_plan(cfg, stage, gpus, gpu_mem_gib, tps))
    return {"config": str(config_path), "gpus": gpus, "gpu_mem_gib": gpu_mem_gib, "stages": stages, "notes": notes}


def _bench_shape(cfg: dict, shape: str | None) -> str:
    """The bench's name for the config's base model: --shape, else the shipped shape with the same dimensions (a
    bench row of `llama-3.2-1b` times a run of any Llama-3.2-1B checkpoint), else the model's folder name."""
    if shape:
        return shape
    from .convert.teacher import load_teacher_config, shape_names

    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads")
    mine = load_teacher_config(cfg["base"])
    for name in shape_names():
        other = load_teacher_config(name)
        if all(other.get(k) == mine.get(k) for k in keys):
            return name
    return Path(cfg["base"]).name


def markdown(res: dict) -> str:
    lines = [f"`{res['config']}` on {res['gpus']} GPU(s) of {res['gpu_mem_gib']:.0f} GiB (per GPU, GiB):", "",
             "| stage | trains | micro-batch | params | grads | optimizer | teacher (DPO: reference) | activations | fused KL (DPO: logits) | context + slack | total | fits | time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for s in res["stages"]:
        g = s["gib"]
        t = "-"
        if "hours" in s:
            t = f"{s['hours']:.1f} h" if s["hours"] >= 1 else f"{60 * s['hours']:.1f} min"
        lines.append(f"| {s['stage']} | {s['trains']} | {s['micro_batch_tokens']:,} | {g['parameters']:.1f} | "
                     f"{g['gradients']:.1f} | {g['optimizer']:.1f} | {g['teacher']:.1f} ({s['teacher_mode']}) | "
                     f"{g['activations']:.1f} | {g['fused_kl']:.1f} | {g['overhead']:.1f} | {g['total']:.1f} | "
                     f"{_fits(s)} | {t} |")
    if res.get("notes"):
        lines += [""] + [f"Note: {n}." for n in res["notes"]]
    return "\n".join(lines) + "\n"


def _fits(s: dict) -> str:
    if s["fits"]:
        return "yes"
    if s["teacher_mode"] == "replicated" and s["fits_with_sharded_teacher"]:
        return "NO (would with `teacher_sharding: shard`)"
    return "NO"
