"""The one training loop every stage uses (ILD, end-to-end distillation, DPO), SPEC 9's recipe:
AdamW betas (0.9, 0.8), 1% linear warmup then cosine decay, gradient accumulation, clipping, bf16 autocast
on GPU, seeded, with a budget in tokens (not steps).

What a reader sees in `Trainer.fit`: for each optimizer step, micro-batches -> loss_fn -> backward; clip;
step; log one line to metrics.jsonl; checkpoint every `ckpt_every` steps. A checkpoint (trainable weights,
optimizer, step, data position, RNG states) is written to a temp file and renamed, so a kill at any moment
loses at most the work since the last one and never corrupts it; `fit` resumes from it automatically.

Multi-GPU ready: rank / world size come from torch.distributed when it is initialised (torchrun);
only rank 0 logs and writes checkpoints. The data stream shards itself by rank (PackedStream gives each rank
every world-th batch), so the loop does not. The model may be wrapped (DDP / FSDP2) by the caller; the
loop only needs `parameters()` and the loss function.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch


@dataclass
class TrainConfig:
    tokens: int  # budget: tokens seen by the model (packed rows x seq_len, all ranks)
    lr: float = 8e-5
    betas: tuple = (0.9, 0.8)
    weight_decay: float = 0.0
    warmup_frac: float = 0.01
    min_lr_frac: float = 0.0  # cosine decays to lr * min_lr_frac
    batch_size: int = 4  # rows per micro-batch per rank
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50  # optimizer steps
    log_every: int = 1
    bf16: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "yes" / "no"
    grad_checkpointing: bool = False
    extra: dict = field(default_factory=dict)


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lr_factor(step: int, total: int, warmup: int, min_frac: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_frac at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """fit() trains `params` of `model` with `loss_fn(batch) -> (loss, n_tokens, metrics)` on `stream`.

    stream: an iterable of batches with `state_dict()` / `load_state_dict()` (resumable) and
    `tokens_per_batch`; loss is already normalised per token by loss_fn.
    """

    def __init__(self, model: torch.nn.Module, params: Iterable[torch.nn.Parameter], loss_fn: Callable,
                 stream, cfg: TrainConfig, out_dir: str | Path, name: str, device: torch.device):
        self.model, self.loss_fn, self.stream, self.cfg = model, loss_fn, stream, cfg
        self.params = [p for p in params if p.requires_grad]
        self.out_dir, self.name, self.device = Path(out_dir), name, device
        self.rank, self.world = dist_info()
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        tokens_per_step = stream.tokens_per_batch * cfg.grad_accum * self.world
        self.total_steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
        self.warmup = max(1, round(cfg.warmup_frac * self.total_steps))
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, self.warmup, cfg.min_lr_frac))
        self.step = 0
        self.tokens_seen = 0
        use_bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and device.type == "cuda")
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                         else torch.autocast(device.type, enabled=False))
        # Test hook: stop (as if killed) after this many optimizer steps in this process.
        self._stop_after = int(os.environ.get("ZEBRA_STOP_AFTER_STEPS", "0") or 0)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _trainable_state(self) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().cpu().clone() for p in self.params}

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        atomic_torch_save({
            "step": self.step, "tokens_seen": self.tokens_seen, "params": self._trainable_state(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "stream": self.stream.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": asdict(self.cfg),
        }, self.ckpt_path)

    def maybe_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in ck["params"].items():
                named[n].copy_(t.to(named[n].device))
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        self.stream.load_state_dict(ck["stream"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.step, self.tokens_seen = ck["step"], ck["tokens_seen"]
        self._log({"event": "resumed", "step": self.step, "tokens": self.tokens_seen})
        return True

    def _log(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.maybe_resume():
            seed_everything(self.cfg.seed)
        self.model.train()
        it = iter(self.stream)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                   disable=self.rank != 0, dynamic_ncols=True)
        t_start, tok_start = time.perf_counter(), self.tokens_seen
        steps_here = 0
        last = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            loss_sum, n_tok_sum, agg = 0.0, 0, {}
            for _ in range(self.cfg.grad_accum):
                batch = next(it, None)
                if batch is None:  # data ran out before the token budget: stop cleanly
                    self.total_steps = self.step
                    break
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with self.autocast:
                    loss, n_tok, metrics = self.loss_fn(batch)
                (loss / self.cfg.grad_accum).backward()
                loss_sum += loss.item() / self.cfg.grad_accum
                n_tok_sum += int(n_tok)
                for k, v in metrics.items():
                    agg[k] = agg.get(k, 0.0) + float(v) / self.cfg.grad_accum
                self.tokens_seen += self.stream.tokens_per_batch * self.world
            if self.step >= self.total_steps:
                self.opt.zero_grad(set_to_none=True)
                break
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip) if self.cfg.clip else torch.tensor(0.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            steps_here += 1
            dt = time.perf_counter() - t0
            tps = self.stream.tokens_per_batch * self.cfg.grad_accum * self.world / dt
            last = {"step": self.step, "tokens": self.tokens_seen, "loss": loss_sum, "lr": self.sched.get_last_lr()[0],
                    "grad_norm": float(gnorm), "tokens_per_s": tps, "loss_tokens": n_tok_sum, **agg}
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self._log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}")
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
            if self._stop_after and steps_here >= self._stop_after and self.step < self.total_steps:
                bar.close()
                raise KeyboardInterrupt(f"ZEBRA_STOP_AFTER_STEPS={self._stop_after}")
        bar.close()
        self.model.eval()
        elapsed = time.perf_counter() - t_start
        summary = {"steps": self.step, "tokens": self.tokens_seen, "final": last,
                   "tokens_per_s": (self.tokens_seen - tok_start) / elapsed if elapsed > 0 else 0.0,
                   "seconds": elapsed}
        self._log({"event": "done", **summary})
        return summary
