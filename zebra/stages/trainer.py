"""The one training loop every stage uses (ILD, end-to-end distillation, DPO): AdamW (fused on CUDA) over fp32
master weights with bf16 autocast on GPU, parameter groups with their own learning rates, linear warmup then a
cosine or warmup-stable-decay (WSD) schedule, gradient accumulation normalised per token, clipping, seeded, with
a budget in tokens (not steps). SPEC 9's paper recipe (betas (0.9, 0.8), 1% warmup, cosine) is one setting;
the defaults come from our ablations (RESULTS.md).

What a reader sees in `Trainer.fit`: for each optimizer step, fetch the step's micro-batches, weigh each by its
share of the step's counted tokens, loss_fn -> backward; clip; step; log one line to metrics.jsonl; every
`eval_every` steps call the evaluator (held-out KL, accuracy proxy: the tokens-vs-quality curve); checkpoint
every `ckpt_every` steps. A checkpoint (trainable weights, optimizer, step, data position, RNG states) is
written to a temp file and renamed, so a kill at any moment loses at most the work since the last one and never
corrupts it; `fit` resumes from it automatically.

Multi-GPU ready: rank / world size come from torch.distributed when it is initialised (torchrun);
only rank 0 logs and writes checkpoints. The data stream shards itself by rank (PackedStream gives each rank
every world-th batch), so the loop does not. The model may be wrapped (DDP / FSDP2) by the caller; the
loop only needs `parameters()` and the loss function.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


SCHEDULES = ("cosine", "wsd")
TOKEN_WEIGHTING = ("tokens", "micro")


@dataclass
class TrainConfig:
    tokens: int  # budget: tokens seen by the model (packed rows x seq_len, all ranks)
    lr: float = 8e-5  # of parameter groups that set none
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_frac: float = 0.01
    warmup_steps: int = 0  # warmup = max(warmup_steps, warmup_frac * steps)
    schedule: str = "cosine"  # "cosine": warmup then cosine to min_lr_frac; "wsd": warmup, constant, linear decay
    decay_frac: float = 0.2  # wsd: the last decay_frac of the steps decay linearly to lr * min_lr_frac
    min_lr_frac: float = 0.0
    token_weighting: str = "tokens"  # "tokens": a step's loss is the mean over all its counted tokens;
    # "micro": each micro-batch weighs the same whatever its token count (the old behaviour)
    batch_size: int = 4  # rows per micro-batch per rank
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50  # optimizer steps (0: no checkpoints, e.g. benchmarks)
    log_every: int = 1
    bf16: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "yes" / "no"
    grad_checkpointing: bool = False
    eval_every: int = 0  # optimizer steps between evaluator calls (0: only at the start and the end, if given)
    time_budget_s: float = 0.0  # > 0: end the stage within this many seconds (fewer steps than `tokens` allow)
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """ValueError naming the first bad field."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.token_weighting not in TOKEN_WEIGHTING:
            raise ValueError(f"token_weighting must be one of {TOKEN_WEIGHTING}, got {self.token_weighting!r}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lr_factor(step: int, total: int, warmup: int, min_frac: float = 0.0, schedule: str = "cosine",
              decay_frac: float = 0.2) -> float:
    """The LR multiplier of optimizer step `step` (0-based): linear warmup over `warmup` steps, then
    cosine from 1 to min_frac at `total`, or (wsd) 1 until the last decay_frac of the steps and a linear decay
    to min_frac over those (so a run can be stopped or extended without a fresh warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "wsd":
        decay = max(1, round(decay_frac * total)) if decay_frac > 0 else 0
        start = total - decay
        if step < start or decay == 0:
            return 1.0
        return min_frac + (1 - min_frac) * max(0.0, (total - step - 1) / decay)
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


def param_groups(groups) -> list[dict]:
    """Normalise what a stage trains into AdamW parameter groups: an iterable of parameters (one group), or of
    dicts {"params": [...], "lr": x (optional), "name": str (optional)}. Frozen parameters are dropped, and so are
    groups left empty."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for i, g in enumerate(groups):
        ps = [p for p in g["params"] if p.requires_grad]
        if ps:
            out.append({**g, "params": ps, "name": g.get("name", f"group{i}")})
    return out


class Trainer:
    """fit() trains `params` of `model` with `loss_fn(batch) -> (loss, n_tokens, metrics)` on `stream`.

    params: parameters, or parameter groups (see param_groups) with their own "lr".
    stream: an iterable of batches with `state_dict()` / `load_state_dict()` (resumable) and
    `tokens_per_batch`; loss is the mean over the batch's counted tokens. When loss_fn has a `count(batch)`
    method (the number of counted tokens, known before the forward), micro-batches are weighed by their share
    of the step's tokens (cfg.token_weighting "tokens"), so a step's loss is the per-token mean over the step.
    evaluator: optional `fn() -> dict` of held-out metrics, called every `eval_every` steps, at the start of a
    fresh run and at the end; its time is excluded from tokens/s.
    """

    def __init__(self, model: torch.nn.Module, params, loss_fn: Callable | None, stream, cfg: TrainConfig,
                 out_dir: str | Path, name: str, device: torch.device, evaluator: Callable | None = None):
        cfg.check()
        # loss_fn None: the model is the loss (a StageLoss, possibly wrapped by FSDP2 / DDP): model(batch)
        self.model, self.loss_fn, self.stream, self.cfg = model, loss_fn if loss_fn is not None else model, stream, cfg
        self.groups = param_groups(params)
        self.params = [p for g in self.groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"{name}: nothing to train (every parameter is frozen)")
        self.out_dir, self.name, self.device = Path(out_dir), name, device
        self.evaluator = evaluator
        self.rank, self.world = dist_info()
        self.ckpt_dir = self.out_dir / "checkpoint"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        tokens_per_step = stream.tokens_per_batch * cfg.grad_accum * self.world
        self.total_steps = self._token_steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
        self.warmup = self._warmup_for(self.total_steps)
        cuda = device.type == "cuda"
        if cuda:  # fp32 matmuls that stay fp32 under autocast (the SSD scan) may use TF32
            torch.backends.cuda.matmul.allow_tf32 = True
        self.opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in self.groups], lr=cfg.lr,
                                     betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                     **({"fused": True} if cuda else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, self.warmup, cfg.min_lr_frac, cfg.schedule,
                                          cfg.decay_frac))
        self.step = 0
        self.tokens_seen = 0
        self.budget_frozen = False  # time budget: the step count is fixed once the schedule nears its decay
        use_bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and device.type == "cuda")
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                         else torch.autocast(device.type, enabled=False))
        # Test hook: stop (as if killed) after this many optimizer steps in this process.
        self._stop_after = int(os.environ.get("ZEBRA_STOP_AFTER_STEPS", "0") or 0)

    def _warmup_for(self, total: int) -> int:
        """max(warmup_steps, warmup_frac * total), but at most a quarter of the run: a run cut short (a small
        budget, or a time budget on a slow machine) must still reach its peak LR and decay."""
        cfg = self.cfg
        return max(1, min(max(cfg.warmup_steps, round(cfg.warmup_frac * total)), total // 4))

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        t = getattr(self, "_t_fit", None)
        return self._resumed_s + (time.perf_counter() - t if t is not None else 0.0)

    def _dcp_state(self) -> dict:
        """Model (trained parameters only) and optimizer state in torch.distributed.checkpoint's form: sharded
        DTensors under FSDP2, plain tensors otherwise; the same keys at any world size."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(ignore_frozen_params=True)
        return {"model": get_model_state_dict(self.model, options=opts),
                "optim": get_optimizer_state_dict(self.model, self.opt, options=opts)}

    def save_checkpoint(self) -> None:
        """Every rank writes its shards (torch.distributed.checkpoint) into checkpoint.tmp/, rank 0 adds meta.pt
        (step, data position, schedule, time), each rank its RNG state; then rank 0 renames the folder to
        checkpoint/ (after removing the previous one): a kill at any moment leaves the last complete checkpoint."""
        import shutil

        import torch.distributed.checkpoint as dcp

        from .parallel import barrier

        tmp, final = self.out_dir / "checkpoint.tmp", self.ckpt_dir
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        with _single_process_quiet():
            dcp.save(self._dcp_state(), checkpoint_id=str(tmp))
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                   tmp / f"rng-{self.rank}.pt")
        if self.rank == 0:
            torch.save({"step": self.step, "tokens_seen": self.tokens_seen, "total_steps": self.total_steps,
                        "budget_frozen": self.budget_frozen, "elapsed_s": self._elapsed(), "world": self.world,
                        "sched": self.sched.state_dict(), "stream": self.stream.state_dict(),
                        "config": asdict(self.cfg)}, tmp / "meta.pt")
        barrier()
        if self.rank == 0:
            old = self.out_dir / "checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        barrier()

    _resumed_s = 0.0  # stage seconds spent before the last resume (time budget)

    def maybe_resume(self) -> bool:
        """Resume from checkpoint/ if there is one: at any world size (the shards are resharded on load); the RNG
        state of each rank is restored when the world size is the one it was saved at."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (self.ckpt_dir / "meta.pt").exists():
            return False
        meta = torch.load(self.ckpt_dir / "meta.pt", map_location="cpu", weights_only=False)
        state = self._dcp_state()
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(self.ckpt_dir))
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.opt, state["optim"], options=opts)
        self.sched.load_state_dict(meta["sched"])
        self.stream.load_state_dict(meta["stream"])
        rng = self.ckpt_dir / f"rng-{self.rank}.pt"
        if meta.get("world") == self.world and rng.exists():
            r = torch.load(rng, map_location="cpu", weights_only=False)
            torch.set_rng_state(r["torch"])
            random.setstate(r["python"])
            if r["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(r["cuda"], self.device)
        else:
            seed_everything(self.cfg.seed + meta["step"] + self.rank)
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.total_steps = meta.get("total_steps", self.total_steps)
        self._resumed_s = meta.get("elapsed_s", 0.0)
        self.budget_frozen = meta.get("budget_frozen", False)
        self._log({"event": "resumed", "step": self.step, "tokens": self.tokens_seen, "world": self.world,
                   "saved_world": meta.get("world")})
        return True

    def remove_checkpoint(self) -> None:
        """After the stage's model is saved: its checkpoint is no longer needed."""
        import shutil

        from .parallel import barrier

        barrier()
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)

    def _trim_metrics(self, step: int) -> None:
        """metrics.jsonl holds only what led to the state training goes on from: a fresh start empties it, a resume
        drops the lines of steps after the checkpoint (a killed run logged them; they will be logged again)."""
        if self.rank != 0 or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut off by the kill
                continue
            if step and rec.get("step", 0) <= step and rec.get("event") != "done":
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(x + "\n" for x in keep))

    def _log(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _evaluate(self) -> float:
        """Call the evaluator (model in eval mode, no grad), log it; returns the seconds it took."""
        if self.evaluator is None:
            return 0.0
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            res = self.evaluator()
        self.model.train()
        dt = time.perf_counter() - t0
        self._log({"event": "eval", "step": self.step, "tokens": self.tokens_seen, "seconds": round(dt, 2), **res})
        return dt

    def _fit_time_budget(self, elapsed: float, step_times: list[float], eval_s: float) -> None:
        """With cfg.time_budget_s: set total_steps so that the stage ends within the budget, from the median step
        time so far (compile steps excluded) and the evaluator's share. Re-estimated every 20 steps until 75% of
        the run, then frozen, so a WSD decay or a cosine tail is not moved once it matters. Never more steps than
        the token budget gives."""
        budget = self.cfg.time_budget_s
        if not budget or self.budget_frozen or len(step_times) < 8 or self.step % 20 not in (0, 8):
            return
        per_step = sorted(step_times[3:])[len(step_times[3:]) // 2]
        evals_left = 0.0
        if self.cfg.eval_every and self._evals:
            evals_left = eval_s / self._evals / self.cfg.eval_every  # evaluator seconds per step
        fit = self.step + int(max(0.0, budget - elapsed) / (per_step + evals_left))
        total = max(self.step + 1, min(self._token_steps, fit))
        if total != self.total_steps:
            self.total_steps = total
            self.warmup = self._warmup_for(total)
            self._log({"event": "budget", "step": self.step, "total_steps": total, "sec_per_step": per_step})
        if self.step >= 0.75 * self.total_steps:
            self.budget_frozen = True

    def _weights(self, batches: list) -> list[float]:
        """Each micro-batch's weight in the step's loss: its share of the counted tokens ("tokens"), or 1/n."""
        count = getattr(self.loss_fn, "count", None)
        if self.cfg.token_weighting == "tokens" and count is not None:
            n = [int(count(b)) for b in batches]
            if self.world > 1:  # every rank's tokens count: normalise by the global total
                t = torch.tensor(sum(n), dtype=torch.float64, device=self.device)
                torch.distributed.all_reduce(t)
                total = float(t)
            else:
                total = float(sum(n))
            return [k * self.world / total if total > 0 else 0.0 for k in n]
        return [1.0 / len(batches)] * len(batches)

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        if not resumed:
            seed_everything(self.cfg.seed)
        self._trim_metrics(self.step if resumed else 0)
        self.model.train()
        self._evals = 0
        t_fit = self._t_fit = time.perf_counter()
        eval_out = self._evaluate() if self.step == 0 else 0.0  # outside the timed loop
        eval_s = 0.0  # inside it
        step_times: list[float] = []
        it = iter(self.stream)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                   disable=self.rank != 0, dynamic_ncols=True)
        t_start, tok_start = time.perf_counter(), self.tokens_seen
        steps_here = 0
        last = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            batches = []
            for _ in range(self.cfg.grad_accum):
                batch = next(it, None)
                if batch is None:  # data ran out before the token budget: stop cleanly
                    break
                batches.append({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                for k, v in batch.items()})
            if len(batches) < self.cfg.grad_accum:
                self.total_steps = self.step
                break
            loss_sum, n_tok_sum, agg = 0.0, 0, {}
            for batch, w in zip(batches, self._weights(batches)):
                with self.autocast:
                    loss, n_tok, metrics = self.loss_fn(batch)
                (loss * w).backward()
                loss_sum += loss.item() * w
                n_tok_sum += int(n_tok)
                for k, v in metrics.items():
                    agg[k] = agg.get(k, 0.0) + float(v) * w
                self.tokens_seen += self.stream.tokens_per_batch * self.world
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip) if self.cfg.clip else torch.tensor(0.0)
            lrs = self.sched.get_last_lr()  # the learning rates this step uses
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            steps_here += 1
            dt = time.perf_counter() - t0
            tps = self.stream.tokens_per_batch * self.cfg.grad_accum * self.world / dt
            last = {"step": self.step, "tokens": self.tokens_seen, "loss": loss_sum, "lr": lrs[0],
                    **({f"lr_{g['name']}": lr for g, lr in zip(self.groups, lrs)} if len(lrs) > 1 else {}),
                    "grad_norm": float(gnorm), "tokens_per_s": tps, "loss_tokens": n_tok_sum, **agg}
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self._log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}")
            step_times.append(dt)
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                eval_s += self._evaluate()
                self._evals += 1
            self._fit_time_budget(time.perf_counter() - t_fit + self._resumed_s, step_times, eval_s)
            bar.total = self.total_steps
            if self.cfg.ckpt_every and (self.step % self.cfg.ckpt_every == 0 or self.step == self.total_steps):
                self.save_checkpoint()
            if self._stop_after and steps_here >= self._stop_after and self.step < self.total_steps:
                bar.close()
                raise KeyboardInterrupt(f"ZEBRA_STOP_AFTER_STEPS={self._stop_after}")
        bar.close()
        elapsed = time.perf_counter() - t_start
        eval_out += self._evaluate()
        self.model.eval()
        train_s = max(elapsed - eval_s, 1e-9)
        summary = {"steps": self.step, "tokens": self.tokens_seen, "final": last,
                   "tokens_per_s": (self.tokens_seen - tok_start) / train_s, "seconds": elapsed + eval_out,
                   "eval_seconds": eval_s + eval_out, "world_size": self.world,
                   "tokens_per_step": self.stream.tokens_per_batch * self.cfg.grad_accum * self.world,
                   "warmup_steps": self.warmup, "schedule": self.cfg.schedule}
        self._log({"event": "done", **summary})
        return summary


@contextlib.contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns on every save / load without a process group ("assuming the intent is
    to save in a single process"): that is what we intend, so the warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield
