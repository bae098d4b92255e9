"""The whole `zebra run` pipeline on a tiny Llama teacher (with the real SmolLM2 tokenizer) and a small JSONL
chat source: every stage completes, a run interrupted mid-stage and resumed skips finished stages and ends
with exactly the weights of an uninterrupted run with the same seed, and bad configs fail clearly."""

import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from zebra.errors import ZebraError
from zebra.pipeline import STAGES, Run, load_config


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, teacher_tokenizer):
    root = tmp_path_factory.mktemp("pipe")
    tok = teacher_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "tree", "river", "stone", "cloud", "music", "light", "paper", "green"]
    with open(root / "chat.jsonl", "w") as f:
        for i in range(60):
            pick = lambda n: " ".join(words[j] for j in torch.randint(0, 10, (n,), generator=g).tolist())  # noqa: E731
            msgs = [{"role": "user", "content": f"Tell me about {pick(3)}"},
                    {"role": "assistant", "content": f"Sure: {pick(12)}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return root


def write_config(root, name, **over):
    cfg = {
        "name": name, "base": str(root / "teacher"), "data": [{"type": "jsonl", "path": str(root / "chat.jsonl")}],
        "seq_len": 64, "seed": 0, "device": "cpu",
        "student": {"num_mla": 2, "kv_rank": 16, "rope_dim": 8, "nope_dim": 8},
        "ild": {"tokens": 64 * 2 * 4, "lr": 1e-3, "batch_size": 2, "ckpt_every": 1},
        "distill": {"tokens": 64 * 2 * 4, "lr": 1e-3, "batch_size": 2, "ckpt_every": 1, "eval_every": 2,
                    "curve_seqs": 2},
        "sensitivity": {"num_seqs": 2, "seq_len": 32, "batch_size": 2},
        "pairs": {"num_pairs": 4, "max_new_tokens": 6, "batch_size": 4},
        "dpo": {"lr": 1e-4, "batch_size": 2, "max_len": 64, "ckpt_every": 1},
        "eval": {"num_seqs": 2, "seq_len": 32, "batch_size": 2, "plaintext_seqs": 2, "tasks": []},
    }
    for k, v in over.items():
        cfg[k] = v
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "dpo" / "model" / "model.safetensors"))


def test_full_run_then_interrupted_run_resumes_to_identical_weights(tiny_setup, monkeypatch, capsys):
    """An uninterrupted run completes all stages with a report; a run killed inside ILD and inside
    distillation and then restarted skips what was finished, resumes from checkpoints, and its final
    (DPO) weights equal the uninterrupted run's."""
    root = tiny_setup
    cfg = load_config(write_config(root, "a"))
    # the uninterrupted run also scores teacher and student with lm-eval in its eval stage (a sample of ARC-E)
    with_tasks = load_config(write_config(root, "a-tasks", eval={"num_seqs": 2, "seq_len": 32, "batch_size": 2,
                                                                 "plaintext_seqs": 2, "tasks": ["arc_easy"],
                                                                 "limit": 4, "jobs": 1}))
    Run(with_tasks, root / "run-a").run()
    for s in STAGES[:-1]:
        assert (root / "run-a" / s / "DONE").exists(), s
    report = (root / "run-a" / "report.md").read_text()
    assert "KL to the teacher" in report and "MLA layers" in report
    smart = json.loads((root / "run-a" / "smart" / "smart.json").read_text())
    assert len(smart["layers"]) == 2

    top = json.loads((root / "run-a" / "summary.json").read_text())
    assert top["student"]["kv_percent"] == pytest.approx(smart_kv(cfg))
    assert top["student"]["heldout_kl"] > 0 and top["teacher"]["plaintext_ppl"] > 1 and top["total_seconds"] > 0
    assert set(top["stage_seconds"]) >= {"init", "ild", "distill", "eval"}
    scored = json.loads((root / "run-a" / "eval" / "eval.json").read_text())
    assert [m["results"]["arc_easy"]["n"] for m in scored["models"]] == [4, 4]  # teacher and student, 4 items each
    report = (root / "run-a" / "report.md").read_text()
    assert "| model | ARC-E | avg | % of teacher | KV % |" in report
    # the run's products in bf16 (save_dtype's default), the ILD pools the next stages train from in fp32
    from safetensors.torch import load_file

    for stage, dtype in (("dpo/model", torch.bfloat16), ("distill/model", torch.bfloat16),
                         ("ild/mla", torch.float32), ("compose/model", torch.float32)):
        assert {t.dtype for t in load_file(str(root / "run-a" / stage / "model.safetensors")).values()} == {dtype}

    run_b = root / "run-b"
    monkeypatch.setenv("ZEBRA_STOP_AFTER_STEPS", "2")
    with pytest.raises(KeyboardInterrupt):
        Run(cfg, run_b).run()  # killed in ild after 2 of 4 steps
    assert (run_b / "ild" / "checkpoint" / "meta.pt").exists() and not (run_b / "ild" / "DONE").exists()
    with pytest.raises(KeyboardInterrupt):
        Run(cfg, run_b).run()  # resumes ild, finishes it, then is killed in distill
    assert (run_b / "ild" / "DONE").exists() and (run_b / "distill" / "checkpoint" / "meta.pt").exists()
    assert not (run_b / "ild" / "checkpoint").exists()  # removed once the stage model is saved
    done_mtime = (run_b / "ild" / "DONE").stat().st_mtime
    monkeypatch.delenv("ZEBRA_STOP_AFTER_STEPS")
    capsys.readouterr()
    Run(cfg, run_b).run()
    out = capsys.readouterr().out
    assert "init: done, skipping" in out and "ild: done, skipping" in out
    assert (run_b / "ild" / "DONE").stat().st_mtime == done_mtime
    a, b = final_weights(root / "run-a"), final_weights(run_b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)

    # a re-run with other settings for a finished stage is refused before anything is written (it would reuse it)
    saved = (run_b / "run_config.json").read_text()
    for over, stage, key in (({"student": {**cfg["student"], "kv_rank": 8}}, "init", "student.kv_rank"),
                             ({"distill": {**cfg["distill"], "lr": 5e-4}}, "distill", "distill"),
                             ({"eval": {**cfg["eval"], "num_seqs": 3}}, "compose", "eval.num_seqs")):
        with pytest.raises(ZebraError, match=f"stage '{stage}' is finished with other settings \\({key}"):
            Run({**cfg, **over}, run_b).run()
    assert (run_b / "run_config.json").read_text() == saved


def smart_kv(cfg):
    """KV % of 2 MLA layers (r_kv 16 + d_r 8) of 4 teacher layers (2 KV heads x 16 dims x K and V)."""
    return 100 * 2 * (16 + 8) / (4 * 2 * 2 * 16)


def test_bad_configs_fail_clearly(tmp_path):
    """Unknown keys, non-mappings and impossible budgets are refused with a message naming them."""
    p = tmp_path / "c.yaml"
    p.write_text("ild: {tokens: 10, lrr: 1}\n")
    with pytest.raises(ZebraError, match="lrr"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ZebraError, match="mapping"):
        load_config(p)
    p.write_text("distill: {tokens: 0}\n")
    with pytest.raises(ZebraError, match="distill.tokens"):
        load_config(p)
    p.write_text("distill: {tokens: 1e6, lr: 3e-4}\n")  # YAML reads these as strings: parsed, typed
    cfg = load_config(p)
    assert cfg["distill"]["tokens"] == 1_000_000 and cfg["distill"]["lr"] == 3e-4
    for bad, key in (("distill: {tokens: 2.5}", "distill.tokens"), ("distill: {lr: fast}", "distill.lr"),
                     ("ild: {mode: everything}", "ild.mode"), ("student: {kv_rank: [1]}", "student.kv_rank"),
                     ("distill: {schedule: linear}", "distill.schedule"), ("ild: {betas: [0.9]}", "ild.betas"),
                     ("compile: maybe", "compile"), ("student: {conv_init: zeros}", "student.conv_init"),
                     ("teacher_sharding: half", "teacher_sharding"), ("ild_fraction: 1.5", "ild_fraction"),
                     ("device: tpu", "device"), ("student: {kv_budget: 5}", "student.kv_budget"),
                     ("student: {num_mla: 4, mla_layers: [0, 1]}", "student.mla_layers"),
                     ("{teacher_sharding: shard, parallel: ddp}", "teacher_sharding")):
        p.write_text(bad + "\n")
        with pytest.raises(ZebraError, match=key.replace(".", r"\.")):
            load_config(p)
    with pytest.raises(ZebraError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_ablations_reuse_shared_stages_and_tabulate(tiny_setup, tmp_path):
    """zebra ablate: a variant that changes only distillation links init..compose from the first variant (one ILD
    for both), a variant that changes the init runs its own; every variant gets a row; bad specs fail first."""
    from zebra.ablate import run_ablations, stage_fingerprints, variant_configs, load_spec

    root = tiny_setup
    base = write_config(root, "abl-base", dpo={"enabled": False})
    spec = tmp_path / "abl.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(base), "common": {"distill": {"eval_every": 0}},
        "variants": {"baseline": {}, "betas-paper": {"distill": {"betas": [0.9, 0.8]}},
                     "conv-random": {"student": {"conv_init": "random"}}}}))
    cfgs = variant_configs(load_spec(spec))
    fp = {n: stage_fingerprints(c) for n, c in cfgs.items()}
    assert fp["baseline"]["compose"] == fp["betas-paper"]["compose"] != fp["conv-random"]["compose"]
    assert fp["baseline"]["distill"] != fp["betas-paper"]["distill"]
    out = tmp_path / "abl"
    run_ablations(spec, out)
    assert (out / "betas-paper" / "ild").is_symlink() and (out / "betas-paper" / "compose").is_symlink()
    assert not (out / "betas-paper" / "distill").is_symlink()
    assert not (out / "conv-random" / "init").is_symlink() and not (out / "conv-random" / "ild").is_symlink()
    rows = json.loads((out / "ablations.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert rows[0]["kl_ild"] == rows[1]["kl_ild"] and rows[0]["heldout_kl"] != rows[1]["heldout_kl"]
    assert rows[2]["kl_init"] != rows[0]["kl_init"]
    assert "| betas-paper |" in (out / "ablations.md").read_text()
    # --only one variant again: it resumes (every stage done) and the table keeps the other variants' rows
    run_ablations(spec, out, only=["conv-random"])
    again = json.loads((out / "ablations.json").read_text())["rows"]
    assert [r["variant"] for r in again] == ["baseline", "betas-paper", "conv-random"]
    assert [r["heldout_kl"] for r in again] == [r["heldout_kl"] for r in rows]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(base), "variants": {"x": {"distill": {"betas": "fast"}}}}))
    with pytest.raises(ZebraError, match="variant 'x'"):
        run_ablations(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_one_default_for_the_student_geometry():
    """`zebra run` and `zebra convert` build the same student when neither is told the ranks."""
    from zebra.cli import build_parser
    from zebra.runconfig import DEFAULTS

    args = build_parser().parse_args(["convert", "--teacher", "t", "--out", "o", "--mla-layers", "0"])
    s = DEFAULTS["student"]
    assert (s["kv_rank"], s["q_rank"], s["nope_dim"]) == (args.kv_rank, args.q_rank, args.nope_dim)
    # convert's rope default is min(DEFAULT_ROPE_DIM, head_dim / 2), the same for every head_dim >= 64
    from zebra.convert.layout import DEFAULT_ROPE_DIM

    assert args.rope_dim in (None, DEFAULT_ROPE_DIM) and s["rope_dim"] == DEFAULT_ROPE_DIM


def test_the_eval_stage_scores_the_seven_table1_tasks_by_default():
    """Issue 9: `zebra run`'s eval stage runs lm-eval on the paper's Table 1 tasks unless the config says otherwise."""
    from zebra.runconfig import config_from_dict

    assert config_from_dict({})["eval"]["tasks"] == ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande",
                                                     "openbookqa", "mmlu"]
    assert config_from_dict({"eval": {"tasks": []}})["eval"]["tasks"] == []


def test_distillation_reads_its_own_data_when_given(tiny_setup, tmp_path):
    """distill.data: the distillation stream comes from it while init / ILD keep the run's data; a single source
    is a list of one; an empty or bad list fails at load; in an ablation only the distillation is recomputed."""
    from zebra.ablate import stage_fingerprints

    root = tiny_setup
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"alpha beta gamma delta {i} epsilon zeta eta theta"}) + "\n"
                             for i in range(40)))
    path = write_config(root, "own-data", distill={"tokens": 512, "batch_size": 2,
                                                     "data": {"type": "jsonl", "path": str(other)}})
    cfg = load_config(path)
    assert cfg["distill"]["data"] == [{"type": "jsonl", "path": str(other)}]
    run = Run(cfg, tmp_path / "run")
    tok = run.tokenizer()

    def text(stream):
        return " ".join(tok.decode(b["input_ids"][0]) for b in stream)

    kd, ild = text(run.stream("kd", cfg["distill"])), text(run.stream("ild", cfg["ild"]))
    assert "alpha" in kd and "Tell me about" not in kd
    assert "Tell me about" in ild and "alpha" not in ild
    base = stage_fingerprints(load_config(write_config(root, "run-data")))
    own = stage_fingerprints(cfg)
    assert [base[s] == own[s] for s in ("init", "ild", "compose", "distill")] == [True, True, True, False]
    for bad, match in (([], "distill.data' lists no source"), ([{"type": "bogus"}], "unknown data source type")):
        with pytest.raises(ZebraError, match=match):
            load_config(write_config(root, "bad-data", distill={"data": bad}))


def test_ablation_plot_draws_the_teacher_point(tmp_path, monkeypatch):
    """The accuracy-vs-KV plot: one point per row plus the teacher's proxy accuracy at 100% KV; no teacher point
    when the rows carry none."""
    import matplotlib.axes

    from zebra.ablate import _plot

    drawn = []
    real = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, x, y, *a, **k: drawn.append((x, y)) or real(self, x, y, *a, **k))
    rows = [{"variant": "a", "status": "ok", "kv_percent": 5.0, "proxy_acc_norm": 0.30, "proxy_teacher_acc_norm": 0.5},
            {"variant": "b", "status": "ok", "kv_percent": 0.0, "proxy_acc_norm": 0.35, "proxy_teacher_acc_norm": 0.5}]
    _plot(rows, tmp_path / "p.png")
    assert drawn == [(5.0, 30.0), (0.0, 35.0), (100, 50.0)] and (tmp_path / "p.png").stat().st_size > 1000
    drawn.clear()
    _plot([{k: v for k, v in r.items() if k != "proxy_teacher_acc_norm"} for r in rows], tmp_path / "q.png")
    assert drawn == [(5.0, 30.0), (0.0, 35.0)]


def test_bad_data_fails_before_any_stage_writes(tiny_setup, tmp_path):
    """A missing, empty or corrupt data file is a clear error before init starts: the run folder is not created."""
    root = tiny_setup
    empty, corrupt = tmp_path / "empty.jsonl", tmp_path / "corrupt.jsonl"
    empty.write_text("")
    corrupt.write_text('{"text": "fine"}\n{"text": "broken\n')
    for path in (tmp_path / "missing.jsonl", empty, corrupt):
        cfg = load_config(write_config(root, "bad-data-" + path.stem))
        cfg["data"] = [{"type": "jsonl", "path": str(path)}]
        out = tmp_path / f"run-{path.stem}"
        with pytest.raises(ZebraError, match="missing|empty|corrupt|JSON|no tokens"):
            Run(cfg, out).run()
        assert not out.exists(), path
    # an --out that cannot be a folder is refused first, naming it
    (tmp_path / "afile").write_text("x")
    cfg = load_config(write_config(root, "bad-out"))
    for out, match in ((tmp_path / "afile", "exists and is not a directory"),
                       (tmp_path / "afile" / "run", "afile is a file")):
        with pytest.raises(ZebraError, match=match):
            Run(cfg, out).run()


def test_student_settings_are_checked_against_the_teacher_first(tiny_setup, tmp_path):
    """Ranks, layer lists and num_mla that the 4-layer teacher cannot take: an error naming the config key before
    any work (no run folder)."""
    root = tiny_setup
    base = load_config(write_config(root, "geom"))
    for over, match in (({"kv_rank": 100000}, r"config key 'student.kv_rank' 100000 must be in 1\.\.64"),
                        ({"mla_layers": [99]}, r"student.mla_layers.*\[99\]"),
                        ({"num_mla": 99}, r"student.num_mla' is 99: the teacher has 4 layers"),
                        ({"num_mla": 3, "attention_layers": [0, 1]}, r"at most 2 can be MLA"),
                        ({"rope_dim": 7}, r"config key 'student.rope_dim' 7")):
        cfg = {**base, "student": {**base["student"], **over}}
        out = tmp_path / f"run-{len(str(over))}"
        with pytest.raises(ZebraError, match=match):
            Run(cfg, out).run()
        assert not out.exists()
