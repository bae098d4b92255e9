"""Training throughput of the pipeline's two heavy stages, fast path vs reference (`zebra bench --what train`).

One optimizer step = what the stage's Trainer does per micro-batch: bf16 autocast over fp32 master weights,
the stage's own loss function (zebra.stages.ild / zebra.stages.distill), backward, gradient clipping and
AdamW. Inputs are random token ids packed into rows of `seq_len` with random document boundaries (doc_ids),
as the packer produces them, so the packed-document kernels run.

    ild-mla / ild-mamba2   teacher forward (no grad) + every student layer on the teacher's layer inputs
    distill                teacher forward (no grad) + student forward/backward + chunked KL

Model FLOPs (for MFU, the PaLM convention: matmul FLOPs only, no recomputation counted):
    trained layers  6 * params * tokens  (+ attention scores: 3 * 4 * T/2 * n_h * d_qk per token and layer)
    teacher         2 * params * tokens  (+ 4 * T/2 * n_h * d_h per token and attention layer)
Mamba2's scan adds O(T * d_inner * d_state) per layer, counted as 6 * 2 * d_inner * d_state per token
(state update + readout, forward and backward). MFU = model FLOPs / time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import time

import torch

from ..ops import dispatch

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense tensor-core bf16 FLOP/s


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _layer_flops_per_token(model, T: int, train: bool) -> float:
    """Matmul FLOPs per token of the decoder layers (and head when present), forward x3 when train."""
    cfg = model.config
    mult = 6 if train else 2
    flops = 0.0
    for layer in model.model.layers:
        n = sum(p.numel() for p in layer.parameters())
        flops += mult * n
        if layer.mixer_type == "attention":
            flops += (mult // 2) * 4 * (T / 2) * cfg.num_attention_heads * cfg.head_dim
        elif layer.mixer_type == "mla":  # decompressed: scores over d_nope + d_r, values of d_v
            m = layer.self_attn
            flops += (mult // 2) * 2 * (T / 2) * m.n_heads * (m.d_nope + m.d_r + m.d_v)
        else:
            m = layer.mamba
            flops += (mult // 2) * 2 * 2 * m.d_inner * m.d_state
    return flops


def model_flops_per_token(stage: str, teacher, student, T: int) -> float:
    head_t = 2 * teacher.lm_head.weight.numel()
    teacher_fwd = _layer_flops_per_token(teacher, T, train=False)
    if stage == "distill":
        return teacher_fwd + head_t + _layer_flops_per_token(student, T, train=True) + 6 * student.lm_head.weight.numel()
    return teacher_fwd + _layer_flops_per_token(student, T, train=True)


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


def train_step_throughput(stage: str, teacher, student, batch_size: int, seq_len: int, steps: int = 10,
                          warmup: int = 3, backend: str = "auto", grad_checkpointing: bool = False) -> dict:
    """Tokens/s and MFU of `stage` ("ild" or "distill") with the given dispatch backend."""
    from ..stages.distill import make_distill_loss
    from ..stages.ild import ild_parameters, make_ild_loss

    device = next(student.parameters()).device
    student.train()
    teacher.eval()
    if stage == "distill":
        for p in student.parameters():
            p.requires_grad_(True)
        params = [p for p in student.parameters()]
        loss_fn = make_distill_loss(teacher, student)
    else:
        params = ild_parameters(student)
        loss_fn = make_ild_loss(teacher, student, grad_checkpointing=grad_checkpointing)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.8), fused=device.type == "cuda")
    batch = random_batch(batch_size, seq_len, student.config.vocab_size, device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    prev = dispatch.get_backend()
    dispatch.set_backend(backend)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                loss, _, _ = loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        dispatch.set_backend(prev)
    step_s = sorted(times)[len(times) // 2]
    tokens = batch_size * seq_len
    flops = model_flops_per_token(stage, teacher, student, seq_len) * tokens
    peak = peak_flops(device)
    return {"stage": stage, "backend": backend, "batch_size": batch_size, "seq_len": seq_len,
            "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s, "model_tflops": flops / step_s / 1e12,
            "mfu": (flops / step_s / peak) if peak else None, "loss": float(loss.detach()),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


# ---- `zebra bench --what train` ---------------------------------------------------------------------------
# teacher shape, the hybrid's MLA layers and rank (SmolLM2: our H100 run's SMART choice; 1B: paper 4MLA-12M2)
TRAIN_SHAPES = {
    "smollm2": ("smollm2-135m", [0, 6, 11, 16, 21, 26], dict(kv_rank=64, rope_dim=32, nope_dim=32)),
    "1b": ("llama-3.2-1b", [0, 5, 10, 14], dict(kv_rank=128, q_rank=1344, rope_dim=32, nope_dim=32)),
}


def run_train(shape: str, _cfg, variants, device, args) -> list[dict]:
    """ILD (pure MLA, pure Mamba2) and distillation (the hybrid) step throughput, reference and fast path."""
    from ..convert.layout import student_config_from_teacher
    from ..convert.teacher import load_teacher_config
    from .runner import free, is_oom
    from .variants import random_model

    name, mla, rank = TRAIN_SHAPES[shape]
    cfg = load_teacher_config(name)
    L = int(cfg["num_hidden_layers"])
    teacher = random_model(student_config_from_teacher(cfg, [], list(range(L)), **rank), device, torch.bfloat16)
    students = {"ild-mla": (list(range(L)), "ild"), "ild-mamba2": ([], "ild"), "distill": (mla, "distill")}
    rows = []
    for label, (layers, stage) in students.items():
        for backend in ("torch", "auto"):
            student = random_model(student_config_from_teacher(cfg, layers, [], **rank), device, torch.float32)
            try:
                r = train_step_throughput(stage, teacher, student, args.train_batch, args.train_seq, steps=args.steps,
                                          warmup=args.warmup, backend=backend)
                r["status"] = "ok"
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                r = {"stage": stage, "backend": backend, "status": "oom"}
            r.update(shape=name, run=label)
            rows.append(r)
            print(f"  train {name} {label:>10} {backend:>5}: " + (
                f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else
                f"{r.get('tokens_per_s', 0):,.0f} tok/s ({r['status']})"), flush=True)
            del student
            free()
    del teacher
    free()
    return rows
