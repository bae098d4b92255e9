"""Data-calibrated scale of the initialised Mamba2 mixers (a step after the weight mapping, SPEC 3.2).

The mapped Mamba2 layer ends in out_proj(RMSNorm(y * silu(z))): the norm makes every token's output unit-RMS per
channel times norm.weight (1 by default), while the teacher's attention output before o_proj (which out_proj
copies) has the scale of its values, several times smaller. The initialised mixer's output is then several times
the teacher's (results/init-compare: mean squared error 38x the signal with a constant gate). Calibration sets
norm.weight channel by channel to the least-squares scale between the normalised student signal and the teacher's
pre-o_proj attention output on a few batches of training text:

    w_c = sum_t o_c(t) * y_c(t) / sum_t y_c(t)^2        (o: teacher attention before o_proj, y: normalised signal)

    stats = calibrate_mamba2_norms(teacher, mamba_student, batches)   # {layer: relative error before / after}

Teacher-forced like ILD: each layer sees the teacher's normalised input to that layer.
"""

from __future__ import annotations

import time

import torch

from ..stages.ild import teacher_layer_targets


@torch.no_grad()
def calibrate_mamba2_norms(teacher, student, batches, progress: bool = True) -> dict:
    """Set each Mamba2 layer's norm.weight of `student` to the per-channel least-squares scale (see the module
    doc). batches: dicts with input_ids (+ doc_ids / attention_mask), e.g. a few PackedStream batches of training
    data. Returns {"layers": the calibrated layers, "tokens": tokens used, "first_batch_seconds" (kernel
    compilation shows here), "seconds"}. progress: a progress bar with tokens/s on stderr."""
    from tqdm import tqdm

    layers = [i for i, layer in enumerate(student.model.layers) if layer.mixer_type == "mamba2"]
    num = {i: 0.0 for i in layers}
    den = {i: 0.0 for i in layers}
    captured: dict = {}

    def keep(name):
        def hook(_module, args, out):
            captured[name] = (args[0] if name.startswith("t") else out).detach().float()
        return hook

    handles = []
    for i in layers:
        handles.append(teacher.model.layers[i].self_attn.o_proj.register_forward_hook(keep(f"t{i}")))
        handles.append(student.model.layers[i].mamba.norm.register_forward_hook(keep(f"s{i}")))
    saved = {i: student.model.layers[i].mamba.norm.weight.detach().clone() for i in layers}
    tokens = 0
    first_batch_s, t0 = None, time.perf_counter()  # the first batch pays for kernel compilation: said apart
    try:
        for i in layers:
            student.model.layers[i].mamba.norm.weight.fill_(1.0)  # the hook then sees the normalised signal
        bar = tqdm(batches, desc="calibrate", unit="batch", disable=not progress, dynamic_ncols=True)
        for batch in bar:
            mask = batch.get("attention_mask")
            keepm = mask.bool() if mask is not None else torch.ones(batch["input_ids"].shape, dtype=torch.bool,
                                                                        device=batch["input_ids"].device)
            tokens += int(keepm.sum())
            ctx, targets = teacher_layer_targets(teacher, batch)
            for i in layers:
                mixer = student.model.layers[i].mamba
                x = targets[i][1].to(student.lm_head.weight.dtype)
                mixer(x, ctx["token_mask"], None, ctx.get("doc_ids"))
                o, y = captured[f"t{i}"][keepm], captured[f"s{i}"][keepm]  # (n, d_inner)
                num[i] = num[i] + (o * y).sum(0)
                den[i] = den[i] + (y * y).sum(0)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}", refresh=False)
            if first_batch_s is None:
                if batch["input_ids"].is_cuda:
                    torch.cuda.synchronize()
                first_batch_s = round(time.perf_counter() - t0, 2)
        for i in layers:
            w = student.model.layers[i].mamba.norm.weight
            w.copy_((num[i] / den[i].clamp_min(1e-12)).to(w.dtype))
    except Exception:
        for i in layers:
            student.model.layers[i].mamba.norm.weight.copy_(saved[i])
        raise
    finally:
        for h in handles:
            h.remove()
    return {"layers": layers, "tokens": tokens, "first_batch_seconds": first_batch_s,
            "seconds": round(time.perf_counter() - t0, 2)}
