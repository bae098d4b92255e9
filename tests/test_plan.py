"""zebra plan: per-GPU memory of a run's training stages from the configs alone (parameter, gradient and optimizer
bytes hand-computed from exact parameter counts; sharding divides them by N; the time from tokens/s), and its
CLI on the paper's 8B recipe for 8 GPUs."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zebra import cli
from zebra.plan import GiB, plan


def tiny_run(tmp_path, **over):
    from test_convert import save_teacher

    save_teacher(tmp_path / "t")
    cfg = {"base": str(tmp_path / "t"), "seq_len": 64,
           "student": {"mla_layers": [0, 3], "kv_rank": 16, "rope_dim": 8, "nope_dim": 8},
           "ild": {"tokens": 6400, "batch_size": 2, "mode": "full"},
           "distill": {"tokens": 12800, "batch_size": 2, "grad_accum": 2}}
    cfg.update(over)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_plan_counts_state_bytes_and_shards_them(tmp_path):
    from zebra.convert.build import build_student_config
    from zebra.model.hybrid import ZebraForCausalLM

    path = tiny_run(tmp_path)
    with torch.device("meta"):
        hybrid = ZebraForCausalLM(build_student_config(str(tmp_path / "t"), [0, 3], None, kv_rank=16, rope_dim=8,
                                                        nope_dim=8)[1])
    n = sum(p.numel() for p in hybrid.parameters())
    one, four = plan(path, 1, tokens_per_s=1000.0), plan(path, 4, tokens_per_s=1000.0)
    d1 = next(s for s in one["stages"] if s["stage"] == "distill")
    d4 = next(s for s in four["stages"] if s["stage"] == "distill")
    assert d1["student_params"] == d1["trained_params"] == n
    assert d1["gib"]["parameters"] * GiB == pytest.approx(4 * n)
    assert d1["gib"]["gradients"] * GiB == pytest.approx(4 * n) and d1["gib"]["optimizer"] * GiB == pytest.approx(8 * n)
    assert d4["gib"]["optimizer"] == pytest.approx(d1["gib"]["optimizer"] / 4)
    assert d4["gib"]["gradients"] == pytest.approx(d1["gib"]["gradients"] / 4)
    assert d1["micro_batch_tokens"] == 128 and d4["global_batch_tokens"] == 128 * 2 * 4
    assert d1["hours"] == pytest.approx(12800 / 1000 / 3600) and d4["hours"] == pytest.approx(12800 / (4000 * 0.9) / 3600)
    ild = next(s for s in one["stages"] if s["stage"] == "ild")
    assert ild["trains"] == "layers" and ild["trained_params"] < ild["student_params"]  # embeddings / head frozen
    assert d1["fits"] and not plan(path, 1, gpu_mem_gib=1e-3)["stages"][1]["fits"]
    # teacher_sharding auto: a tiny teacher stays whole on every rank, whatever N
    assert d4["gib"]["teacher"] == pytest.approx(d1["gib"]["teacher"]) and d4["teacher_mode"] == "replicated"


def test_plan_has_a_dpo_row_when_dpo_is_on(tmp_path):
    """dpo.enabled: a third row for the hybrid trained on batch_size x 2 x max_len tokens, its fp32 reference in the
    teacher column (4 B x params), the full logits (12 B x vocab a token) instead of the fused KL; no row without."""
    from zebra.convert.build import build_student_config
    from zebra.model.hybrid import ZebraForCausalLM

    assert [s["stage"] for s in plan(tiny_run(tmp_path, dpo={"enabled": False}), 1)["stages"]] == ["ild", "distill"]
    path = tiny_run(tmp_path, dpo={"enabled": True, "batch_size": 3, "max_len": 40})
    with torch.device("meta"):
        cfg = build_student_config(str(tmp_path / "t"), [0, 3], None, kv_rank=16, rope_dim=8, nope_dim=8)[1]
        n = sum(p.numel() for p in ZebraForCausalLM(cfg).parameters())
    d = plan(path, 1)["stages"][2]
    assert d["stage"] == "dpo" and d["trained_params"] == n and d["micro_batch_tokens"] == 3 * 2 * 40
    assert d["gib"]["teacher"] * GiB == pytest.approx(4 * n) and d["teacher_mode"] == "replicated"
    assert d["gib"]["fused_kl"] * GiB == pytest.approx(3 * 2 * 40 * cfg.vocab_size * 12)
    assert d["gib"]["optimizer"] * GiB == pytest.approx(8 * n) and "hours" not in d


def test_plan_of_a_sharded_teacher(tmp_path):
    """teacher_sharding: shard: 2 B x (embeddings + head + final norm, whole) + 2 B x layers / N + 2 gathered
    layers, from the teacher's exact counts; with one GPU it stays replicated (nothing to shard over)."""
    from zebra.convert.build import build_student_config
    from zebra.model.hybrid import ZebraForCausalLM

    path = tiny_run(tmp_path, teacher_sharding="shard")
    with torch.device("meta"):
        t = ZebraForCausalLM(build_student_config(str(tmp_path / "t"), "none", "all")[1])
    total = sum(p.numel() for p in t.parameters())
    layers = sum(p.numel() for p in t.model.layers.parameters())
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in t.model.layers)
    d4 = next(s for s in plan(path, 4)["stages"] if s["stage"] == "distill")
    assert d4["teacher_mode"] == "sharded"
    assert d4["gib"]["teacher"] * GiB == pytest.approx(2 * (total - layers) + 2 * layers / 4 + 4 * largest)
    d1 = next(s for s in plan(path, 1)["stages"] if s["stage"] == "distill")
    assert d1["teacher_mode"] == "replicated" and d1["gib"]["teacher"] * GiB == pytest.approx(2 * total)


def test_plan_cli_for_the_paper_8b_recipe_on_8_gpus(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "configs/paper/llama-3.1-8b-8mla24m2.yaml", "--gpus", "8", "--shape", "llama-3.1-8b",
                   "--tokens-per-s", "5000", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    d = next(s for s in res["stages"] if s["stage"] == "distill")
    assert d["fits"] and d["global_batch_tokens"] == 64 * 2048 and 7e9 < d["student_params"] < 9e9
    assert "| distill |" in capsys.readouterr().out
    assert cli.main(["plan", "configs/paper/llama-3.1-8b-8mla24m2.yaml", "--gpus", "0", "--shape", "llama-3.1-8b"]) == 2


def test_plan_without_the_weights_says_to_pass_a_shape(tmp_path, monkeypatch, capsys):
    """A paper config whose base directory is not there (the user has not downloaded it yet): exit 2 with the
    loading error and how to plan from a shipped shape instead; with --shape the same config plans."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub retries in the test
    monkeypatch.chdir(tmp_path)
    cfg = "configs/paper/llama-3.2-1b-8mla8m2.yaml"
    (tmp_path / "configs" / "paper").mkdir(parents=True)
    (tmp_path / cfg).write_text((Path(__file__).parent.parent / cfg).read_text())
    assert cli.main(["plan", cfg, "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "models/Llama-3.2-1B-Instruct" in err and "--shape (llama-3.1-8b, llama-3.2-1b" in err
    assert cli.main(["plan", cfg, "--gpus", "2", "--shape", "llama-3.2-1b"]) == 0
    capsys.readouterr()
    # a bad --bench file is named as such, not blamed on the missing weights
    (tmp_path / "bad.json").write_text("{not json")
    for bench in ("bad.json", "missing.json"):
        assert cli.main(["plan", cfg, "--gpus", "2", "--shape", "llama-3.2-1b", "--bench", bench]) == 2
        err = capsys.readouterr().err
        assert f"--bench {bench}" in err and "--shape (" not in err


def test_plan_check_splits_the_peak_into_state_and_what_is_above_it(tmp_path, monkeypatch):
    """tools/plan_check.py: a bench row's peak against zebra plan, and, where the bench recorded the memory held
    after training, its two parts (state kept between steps / the peak above it) against the plan's same parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_check", Path(__file__).parents[1] / "tools" / "plan_check.py")
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    row = {"shape": "smollm2-135m", "stage": "ild", "variant": "fast", "status": "ok", "batch_size": 16,
           "seq_len": 2048, "grad_accum": 1, "peak_mem_gib": 40.0, "held_before_gib": 1.0, "held_after_gib": 3.0}
    old = {**row, "stage": "distill"}
    del old["held_before_gib"], old["held_after_gib"]
    (tmp_path / "bench.json").write_text(json.dumps({"train": [row, old, {**row, "status": "oom"}]}))
    monkeypatch.setattr(sys, "argv", ["plan_check", str(tmp_path / "bench.json"), "--out", str(tmp_path / "out")])
    pc.main()
    rows = json.loads((tmp_path / "out" / "plan-check.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["ild", "distill"]  # the OOM row is not a peak
    new, old_row = rows
    g = new["planned"]
    assert new["measured_state_gib"] == 3.0 and new["measured_above_state_gib"] == 37.0
    assert new["planned_state_gib"] == pytest.approx(g["parameters"] + g["optimizer"] + g["teacher"])
    assert new["planned_state_gib"] + new["planned_above_state_gib"] == pytest.approx(g["total"])
    assert new["error"] == pytest.approx(g["total"] / 40.0 - 1)
    assert "measured_state_gib" not in old_row


def test_plan_times_from_the_bench_row_of_the_same_shape_or_says_why_not(tmp_path, monkeypatch):
    """--bench: the time comes from the bench row whose shape has the base model's dimensions (a bench of a shipped
    shape times any checkpoint of that architecture); with no such row the plan says so instead of a bare '-'."""
    from zebra.convert import teacher as tmod
    from zebra.plan import markdown

    cfg = tiny_run(tmp_path)
    bench = tmp_path / "bench.json"
    rows = [{"shape": "tinyshape", "stage": s, "status": "ok", "tokens_per_s": 1000.0} for s in ("ild", "distill")]
    bench.write_text(json.dumps({"train": rows}))
    res = plan(cfg, 1, bench=bench)
    assert all("hours" not in s for s in res["stages"])
    assert [n.split(":")[0] for n in res["notes"]] == [f"no time for {s['stage']}" for s in res["stages"]]
    assert "no measured ild row of shape 't'" in markdown(res) and "tinyshape ild" in markdown(res)

    real = tmod.load_teacher_config
    monkeypatch.setattr(tmod, "shape_names", lambda: ["tinyshape"])
    monkeypatch.setattr(tmod, "load_teacher_config",
                        lambda name: real(str(tmp_path / "t")) if name == "tinyshape" else real(name))
    res = plan(cfg, 1, bench=bench)
    ild = res["stages"][0]
    assert [n for n in res["notes"] if "dpo" not in n] == [] and ild["hours"] == pytest.approx(6400 / (1000.0 * 3600))
    assert "min |" in markdown(res)  # under an hour: minutes, not "0.0 h"
