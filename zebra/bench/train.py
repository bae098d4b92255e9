"""Training throughput of the pipeline's two heavy stages (`zebra bench --what train`), through the real
`Trainer` and the stages' own loss functions and parameter groups: what `zebra run` does per optimizer step.

    ild      the joint ILD stage (zebra.stages.ild, mode "mixers"): one bf16 teacher forward (no grad) and, for
             every layer, the MLA and the Mamba2 candidate mixers on the teacher's layer input, forward + backward
    distill  end-to-end distillation (zebra.stages.distill): bf16 teacher forward + hybrid student forward /
             backward + the fused LM-head KL

Inputs are random token ids packed into rows with random document boundaries (doc_ids), as the packer produces
them, so the packed-document paths run (flash varlen attention, Mamba2 resets). Random weights of the real
shapes (SmolLM2-135M; Llama-3.2-1B for the 1B recipe). The first `warmup` steps (torch.compile, autotuning) are
not timed: tokens/s is the median over the timed steps of the Trainer's own per-step figure.

Variants: "fast" (what `zebra run` does on a GPU: torch.compile per layer, chunked SSD scan in PyTorch), "eager"
(the same without torch.compile), "fla" (compiled, Mamba2 training scan = fla's parallel kernel, the previous path),
"fsdp" (fast, with the trained models inside the pipeline's StageLoss wrapped by FSDP2 as `zebra run` does with
several ranks: fp32 master weights sharded per layer, bf16 compute; with one process it measures the FSDP2 path's
memory and speed on one GPU. Under `torchrun --nproc-per-node 1` it joins torchrun's process group, else it makes
a one-rank group).

Model FLOPs (for MFU, the PaLM convention: matmul FLOPs only, no recomputation counted):
    trained layers  6 * params * tokens  (+ attention scores: 3 * 4 * T/2 * n_h * d_qk per token and layer)
    teacher         2 * params * tokens  (+ 4 * T/2 * n_h * d_h per token and attention layer)
Mamba2's scan adds O(T * d_inner * d_state) per layer, counted as 6 * 2 * d_inner * d_state per token
(state update + readout, forward and backward). MFU = model FLOPs / time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..ops import dispatch

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense tensor-core bf16 FLOP/s
VARIANTS = ("fast", "eager", "fla", "fsdp")


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _mixer_flops(m, layer_type: str, T: int, mult: int) -> float:
    """Non-parameter matmul FLOPs per token of one mixer (attention scores / SSD), forward x mult/2."""
    if layer_type == "attention":
        return (mult // 2) * 4 * (T / 2) * m.n_heads * m.head_dim
    if layer_type == "mla":  # decompressed: scores over d_nope + d_r, values of d_v
        return (mult // 2) * 2 * (T / 2) * m.n_heads * (m.d_nope + m.d_r + m.d_v)
    return (mult // 2) * 2 * 2 * m.d_inner * m.d_state


def _layer_flops_per_token(model, T: int, train: bool, mixers_only: bool = False) -> float:
    """Matmul FLOPs per token of the decoder layers (or only their mixers), forward x3 when train."""
    mult = 6 if train else 2
    flops = 0.0
    for layer in model.model.layers:
        part = layer.mixer if mixers_only else layer
        flops += mult * sum(p.numel() for p in part.parameters())
        flops += _mixer_flops(layer.mixer, layer.mixer_type, T, mult)
    return flops


def model_flops_per_token(stage: str, teacher, students, T: int) -> float:
    """stage "distill": students = the hybrid; "ild": students = {pool: model} (mixers trained) or one model
    (all layer parameters trained, the paper's ILD)."""
    teacher_fwd = _layer_flops_per_token(teacher, T, train=False)
    if stage == "distill":
        s = students
        return teacher_fwd + 2 * teacher.lm_head.weight.numel() + _layer_flops_per_token(s, T, train=True) \
            + 6 * s.lm_head.weight.numel()
    if isinstance(students, dict):
        return teacher_fwd + sum(_layer_flops_per_token(m, T, train=True, mixers_only=True) for m in students.values())
    return teacher_fwd + _layer_flops_per_token(students, T, train=True)


def random_batch(batch_size: int, seq_len: int, vocab: int, device, seed: int = 0, mean_doc: int = 600):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    doc_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for b in range(batch_size):  # documents of random lengths, as packed chat data
        pos, d = 0, 0
        while pos < seq_len:
            n = int(torch.randint(mean_doc // 4, 2 * mean_doc, (1,), generator=g))
            doc_ids[b, pos:pos + n] = d
            pos, d = pos + n, d + 1
    return {"input_ids": ids.to(device), "doc_ids": doc_ids.to(device), "attention_mask": None,
            "loss_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device)}


class RandomStream:
    """An endless, resumable stream of random packed batches (what PackedStream yields, on random tokens)."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int, device, seed: int = 0):
        self.batch_size, self.seq_len, self.vocab, self.device, self.seed = batch_size, seq_len, vocab, device, seed
        self.tokens_per_batch = batch_size * seq_len
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]

    def __iter__(self):
        while True:
            self.pos += 1
            yield random_batch(self.batch_size, self.seq_len, self.vocab, self.device, seed=self.seed + self.pos)


def train_throughput(stage: str, teacher, students, batch_size: int, seq_len: int, steps: int = 10, warmup: int = 3,
                     variant: str = "fast", grad_accum: int = 1) -> dict:
    """Tokens/s, MFU and peak memory of `stage` ("ild" or "distill") through the Trainer. students: for "ild" a
    dict {"mla": ..., "mamba2": ...}; for "distill" the hybrid."""
    from ..stages.distill import distill_parameters, make_distill_loss
    from ..stages.fastpath import compile_layers, want_compile
    from ..stages.ild import ild_parameters, make_ild_loss
    from ..stages.trainer import Trainer, TrainConfig

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    models = students if isinstance(students, dict) else {"student": students}
    device = next(iter(models.values())).lm_head.weight.device
    cuda = device.type == "cuda"
    compiled = variant != "eager" and want_compile("auto", device)
    if stage == "distill":
        groups = distill_parameters(students, 1e-5)
        loss_fn = make_distill_loss(teacher, students)
        holder = students
    else:
        groups = ild_parameters(students, "mixers")
        loss_fn = make_ild_loss(teacher, students, "mixers")
        holder = torch.nn.ModuleDict(students)
    if compiled:
        for m in models.values():
            compile_layers(m, mixers_only=stage == "ild")
        compile_layers(teacher)
    if variant == "fsdp":  # the pipeline's multi-rank path (zebra.pipeline.Run._train), forced on at one rank
        from ..stages.parallel import StageLoss, ensure_process_group, regroup, wrap
        from ..stages.trainer import param_groups

        ensure_process_group(device)
        holder = StageLoss(models, loss_fn)
        before = {id(p): n for n, p in holder.named_parameters()}
        count = holder.count
        holder = wrap(holder, "fsdp", mixed_precision=cuda, device=device, force=True)
        holder.count = count
        groups = regroup(param_groups(groups), before, holder)
        loss_fn = None
    stream = RandomStream(batch_size, seq_len, teacher.config.vocab_size, device)
    cfg = TrainConfig(tokens=(warmup + steps) * stream.tokens_per_batch * grad_accum, lr=1e-5, batch_size=batch_size,
                      grad_accum=grad_accum, ckpt_every=0, warmup_steps=1)
    prev_scan = dispatch.get_train_scan()
    dispatch.set_train_scan("fla" if variant == "fla" else "torch")
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        held_before = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(holder, groups, loss_fn, stream, cfg, tmp, f"{stage}-{variant}", device)
            summary = trainer.fit()
            recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            held_after = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    finally:
        dispatch.set_train_scan(prev_scan)
    per_step = [r["tokens_per_s"] for r in recs if "event" not in r][warmup:]
    tps = sorted(per_step)[len(per_step) // 2]
    flops = model_flops_per_token(stage, teacher, students, seq_len)
    peak = peak_flops(device)
    return {"stage": stage, "variant": variant, "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
            "tokens_per_step": stream.tokens_per_batch * grad_accum, "steps_timed": len(per_step),
            "tokens_per_s": tps, "model_tflops": flops * tps / 1e12, "mfu": flops * tps / peak if peak else None,
            "loss": summary["final"].get("loss"), "compiled": compiled,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            # what the peak is made of (zebra plan's check, tools/plan_check.py): the models alone before training,
            # the state kept between steps after it (weights + optimizer; gradients are freed), and the peak above
            # that state (activations, gradients, the KL's and the kernels' transients)
            "held_before_gib": held_before, "held_after_gib": held_after}


# ---- `zebra bench --what train` ---------------------------------------------------------------------------
# teacher shape, the hybrid's MLA layers and rank (SmolLM2: our H100 run's SMART choice; 1B: paper 4MLA-12M2),
# and the default micro-batch (rows x --train-seq)
TRAIN_SHAPES = {
    "smollm2": ("smollm2-135m", [0, 6, 11, 16, 21, 26], dict(kv_rank=64, rope_dim=32, nope_dim=32), 16),
    "1b": ("llama-3.2-1b", [0, 5, 10, 14], dict(kv_rank=128, q_rank=1344, rope_dim=32, nope_dim=32), 8),
}


def run_train(shape: str, _cfg, _variants, device, args) -> list[dict]:
    """ILD (both pools, mixers) and distillation (the hybrid) step throughput per --train-variants."""
    from ..convert.layout import student_config_from_teacher
    from ..convert.teacher import load_teacher_config
    from ..stages.fastpath import uncompile
    from .runner import free, is_oom
    from .variants import random_model

    name, mla, rank, rows = TRAIN_SHAPES[shape]
    rows = args.train_batch or rows
    cfg = load_teacher_config(name)
    L = int(cfg["num_hidden_layers"])
    tdtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # as zebra run's teacher
    teacher = random_model(student_config_from_teacher(cfg, [], list(range(L)), **rank), device, tdtype)
    out = []
    for stage in ("ild", "distill"):
        for variant in [v.strip() for v in args.train_variants.split(",") if v.strip()]:
            if stage == "ild":
                students = {"mla": random_model(student_config_from_teacher(cfg, list(range(L)), [], **rank), device,
                                                torch.float32),
                            "mamba2": random_model(student_config_from_teacher(cfg, [], [], **rank), device,
                                                   torch.float32)}
            else:
                students = random_model(student_config_from_teacher(cfg, mla, [], **rank), device, torch.float32)
            try:
                r = train_throughput(stage, teacher, students, rows, args.train_seq, steps=args.steps,
                                     warmup=args.warmup, variant=variant, grad_accum=args.train_accum)
                r["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (an OOM is a result; anything else is a bug)
                if not is_oom(e):
                    raise
                r = {"stage": stage, "variant": variant, "status": "oom", "batch_size": rows,
                     "seq_len": args.train_seq}
            r.update(shape=name)
            out.append(r)
            print(f"  train {name} {stage:>8} {variant:>6}: " + (
                f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {r['peak_mem_gib']:.1f} GiB"
                if r.get("mfu") else f"{r.get('tokens_per_s', 0):,.0f} tok/s ({r['status']})"), flush=True)
            del students
            uncompile(teacher)
            free()
    del teacher
    free()
    return out
