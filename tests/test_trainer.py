"""The training loop's recipe switches: WSD / cosine schedules (hand-computed), warmup steps, parameter groups with
their own LR, per-token normalisation across micro-batches (equal to one big batch; 'micro' is not), the
evaluator hook (the tokens-vs-quality curve) and bad settings refused by name."""

import json
import math

import pytest
import torch

from zebra.stages.trainer import Trainer, TrainConfig, lr_factor, param_groups


def test_wsd_and_cosine_schedules_hand_computed():
    # 10 steps, 2 warmup, last 30% (3 steps) decay linearly to 0
    got = [lr_factor(s, 10, 2, 0.0, "wsd", 0.3) for s in range(10)]
    assert got == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0])
    # min_lr_frac: the decay ends at it
    assert lr_factor(9, 10, 2, 0.1, "wsd", 0.3) == pytest.approx(0.1)
    # cosine: halfway through the post-warmup steps the factor is 0.5
    assert lr_factor(6, 10, 2, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


class ToyStream:
    """Micro-batches with very different counted-token numbers: 1 counted token, then 7."""

    def __init__(self, steps=1):
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(steps):
            for n in (1, 7):
                x = torch.randn(1, 8, 3, generator=g)
                mask = torch.zeros(1, 8)
                mask[0, :n] = 1
                self.batches.append({"x": x, "loss_mask": mask})
        self.tokens_per_batch, self.pos = 8, 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]


def toy_loss(model):
    def loss_fn(batch):
        m = batch["loss_mask"].bool()
        per_tok = (model(batch["x"]).squeeze(-1) - 1.0) ** 2  # (1, 8)
        n = int(m.sum())
        return per_tok[m].sum() / n, n, {}
    loss_fn.count = lambda batch: int(batch["loss_mask"].sum())
    return loss_fn


def first_step_grads(tmp_path, weighting):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    tr = Trainer(model, model.parameters(), toy_loss(model), ToyStream(),
                 TrainConfig(tokens=16, grad_accum=2, clip=0, token_weighting=weighting, ckpt_every=100),
                 tmp_path / weighting, "toy", torch.device("cpu"))
    seen = []
    real = tr.opt.step
    tr.opt.step = lambda *a, **k: (seen.append([p.grad.clone() for p in model.parameters()]), real(*a, **k))[1]
    tr.fit()
    return seen[0], model


def test_token_weighting_equals_one_big_batch(tmp_path):
    """Two micro-batches with 1 and 7 counted tokens give the gradient of the mean over all 8 tokens ("tokens");
    weighing each micro-batch the same ("micro") gives a different one."""
    tok, _ = first_step_grads(tmp_path, "tokens")
    micro, _ = first_step_grads(tmp_path, "micro")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    s = ToyStream()
    per_tok = torch.cat([((model(b["x"]).squeeze(-1) - 1.0) ** 2)[b["loss_mask"].bool()] for b in s.batches])
    per_tok.mean().backward()
    for got, want in zip(tok, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(micro[0], tok[0])


def test_param_groups_keep_their_lr_through_the_schedule(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2, "name": "mixers"},
              {"params": list(model[1].parameters()), "lr": 1e-4, "name": "rest"}]
    model[1].bias.requires_grad_(False)
    norm = param_groups(groups)
    assert [g["name"] for g in norm] == ["mixers", "rest"] and len(norm[1]["params"]) == 1  # frozen bias dropped
    loss_fn = toy_loss(lambda x: model(x))
    tr = Trainer(model, groups, loss_fn, ToyStream(steps=4),
                 TrainConfig(tokens=64, warmup_steps=2, schedule="wsd", decay_frac=0.5, ckpt_every=100),
                 tmp_path, "toy", torch.device("cpu"))
    assert tr.total_steps == 8 and tr.warmup == 2
    assert tr.sched.get_last_lr() == pytest.approx([0.5e-2, 0.5e-4])  # step 0 of 2 warmup steps
    tr.fit()
    recs = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    # the LR each step used: warmup 1/2, 2/2, stable, then the last 4 of 8 steps decay linearly
    assert [r["lr_mixers"] for r in recs] == pytest.approx([0.5e-2, 1e-2, 1e-2, 1e-2, 0.75e-2, 0.5e-2, 0.25e-2, 0.0])
    assert [r["lr_rest"] for r in recs] == pytest.approx([0.5e-4, 1e-4, 1e-4, 1e-4, 0.75e-4, 0.5e-4, 0.25e-4, 0.0])


def test_evaluator_runs_at_start_every_n_steps_and_end(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    calls = []

    def evaluator():
        assert not model.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"heldout_kl": float(len(calls))}

    tr = Trainer(model, model.parameters(), toy_loss(model), ToyStream(steps=5),
                 TrainConfig(tokens=80, grad_accum=2, eval_every=2, ckpt_every=100), tmp_path, "toy", torch.device("cpu"),
                 evaluator=evaluator)
    summary = tr.fit()
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [(e["step"], e["tokens"]) for e in evals] == [(0, 0), (2, 32), (4, 64), (5, 80)]
    assert [e["heldout_kl"] for e in evals] == [1, 2, 3, 4]
    assert summary["eval_seconds"] >= 0 and summary["tokens_per_step"] == 16


@pytest.mark.parametrize("field,value,msg", [("schedule", "linear", "schedule"), ("token_weighting", "x", "token_weighting"),
                                             ("decay_frac", 1.5, "decay_frac"), ("betas", (0.9, 1.2), "betas"),
                                             ("grad_accum", 0, "grad_accum")])
def test_bad_settings_are_refused_by_name(tmp_path, field, value, msg):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match=msg):
        Trainer(model, model.parameters(), toy_loss(model), ToyStream(), TrainConfig(tokens=16, **{field: value}),
                tmp_path, "toy", torch.device("cpu"))


class EndlessToy(ToyStream):
    def __init__(self):
        super().__init__(steps=1)

    def __iter__(self):
        while True:
            self.pos += 1
            yield self.batches[self.pos % 2]


def test_time_budget_ends_the_stage_in_time_with_a_full_decay(tmp_path):
    """time_budget_s: the token budget would take 2000 steps of ~10 ms; the stage ends within ~1 s instead, and the
    WSD schedule still decays to 0 on the last step (the step count is fixed before the decay starts)."""
    import time as _time

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = toy_loss(model)

    def slow_loss(batch):
        _time.sleep(0.01)
        return inner(batch)
    slow_loss.count = inner.count
    tr = Trainer(model, model.parameters(), slow_loss, EndlessToy(),
                 TrainConfig(tokens=2000 * 8, time_budget_s=1.0, schedule="wsd", decay_frac=0.2, ckpt_every=0),
                 tmp_path, "toy", torch.device("cpu"))
    t0 = _time.perf_counter()
    summary = tr.fit()
    took = _time.perf_counter() - t0
    assert 0.6 < took < 1.6 and 30 < summary["steps"] < 120
    recs = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    assert len(recs) == summary["steps"] and recs[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert any('"budget"' in x for x in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_metrics_log_each_step_once_across_kills_and_restarts(tmp_path, monkeypatch):
    """metrics.jsonl after a kill, a resume from the checkpoint (steps after it are redone) and a restart from
    scratch (no checkpoint): every optimizer step appears exactly once, as in one uninterrupted run."""
    def trainer(out, ckpt_every):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return Trainer(model, model.parameters(), toy_loss(model), ToyStream(steps=6),
                       TrainConfig(tokens=8 * 12, ckpt_every=ckpt_every), out, "toy", torch.device("cpu"))

    def steps(out):
        return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "event" not in r]

    trainer(tmp_path / "whole", ckpt_every=2).fit()
    whole = steps(tmp_path / "whole")
    assert whole == list(range(1, 13))
    monkeypatch.setenv("ZEBRA_STOP_AFTER_STEPS", "5")
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "a", ckpt_every=2).fit()  # killed after step 5; the checkpoint is of step 4
    assert steps(tmp_path / "a") == [1, 2, 3, 4, 5]
    monkeypatch.delenv("ZEBRA_STOP_AFTER_STEPS")
    trainer(tmp_path / "a", ckpt_every=2).fit()
    assert steps(tmp_path / "a") == whole

    monkeypatch.setenv("ZEBRA_STOP_AFTER_STEPS", "3")
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b", ckpt_every=100).fit()  # no checkpoint: the restart begins again at step 1
    monkeypatch.delenv("ZEBRA_STOP_AFTER_STEPS")
    trainer(tmp_path / "b", ckpt_every=100).fit()
    assert steps(tmp_path / "b") == whole
