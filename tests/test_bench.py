"""zebra bench: roofline byte counts by hand, the exact integration of affine step times, the paper's variant
layouts, training FLOPs, and the command end to end on CPU with a tiny shape (plus its input errors)."""

import json
import re

import pytest
import torch

from zebra import ZebraConfig
from zebra.bench import roofline
from zebra.bench.variants import resolve_shape, variant_config
from zebra.cli import main

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": True}


def test_roofline_bytes_by_hand():
    cfg = ZebraConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, mixer_types=["attention", "mla", "mamba2"], kv_lora_rank=12,
                      qk_rope_head_dim=4)
    # head_dim 8: attention 2*2*8 = 32 values/token, MLA 12 + 4 = 16, Mamba2 none
    assert roofline.cache_bytes_per_token(cfg, 2) == (32 + 16) * 2
    # Mamba2: H=4, P=N=8 fp32 state read+written, conv ring (d_inner 32 + 2*d_xb 16 = 64 ch x 4) read+written
    assert roofline.state_bytes_per_step(cfg, 2) == 2 * (4 * 8 * 8 * 4 + 64 * 4 * 2)
    assert roofline.state_bytes_per_step(cfg, 2, ssm_elem=2) == 2 * (4 * 8 * 8 * 2 + 64 * 4 * 2)  # bf16 state
    s, B, w = 99, 3, 1000
    assert roofline.step_bytes(w, cfg, s, B, 2) == w + B * (100 * 96 + 2 * (1024 + 512))
    llama = {"num_hidden_layers": 16, "num_key_value_heads": 8, "hidden_size": 2048, "num_attention_heads": 32}
    assert roofline.cache_bytes_per_token(llama, 2) == 16 * 2 * 8 * 64 * 2  # 32 KiB per token (Llama-3.2-1B)


def test_weight_bytes_skip_an_untied_embedding_but_count_a_tied_one():
    from test_model import tiny_model

    untied = tiny_model(["mla", "mamba2"])
    n_all = sum(p.numel() for p in untied.parameters())
    assert roofline.weight_bytes(untied) == (n_all - untied.model.embed_tokens.weight.numel()) * 4
    tied = tiny_model(["mla", "mamba2"], tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert roofline.weight_bytes(tied) == sum(p.numel() for p in tied.parameters()) * 4


@pytest.mark.parametrize("L", [2, 3, 1024, 32768])
def test_integration_is_exact_for_affine_step_times(L):
    a, b = 5e-3, 2e-7
    pos = sorted({0, L // 2, L - 1})
    got = roofline.integrate(pos, [a + b * s for s in pos])
    assert got == pytest.approx(L * a + b * L * (L - 1) / 2, rel=1e-12)


def test_paper_variants_for_the_8b_shape():
    name, cfg = resolve_shape("8b")
    z = variant_config(name, cfg, "zebra")
    assert [i for i, t in enumerate(z.mixer_types) if t == "mla"] == [0, 4, 8, 13, 18, 23, 27, 31]
    assert set(z.mixer_types) == {"mla", "mamba2"} and z.kv_lora_rank == 160 and z.q_lora_rank == 2048
    kv = roofline.cache_bytes_per_token(z, 1) / roofline.cache_bytes_per_token(cfg, 1)
    assert 100 * kv == pytest.approx(2.734375)  # SPEC 9: 8 * (160 + 64) / (32 * 2 * 8 * 128)
    assert variant_config(name, cfg, "zebra-16mla").mixer_types.count("mla") == 16
    assert variant_config(name, cfg, "mil25").mixer_types.count("attention") == 8
    assert variant_config(name, cfg, "mil50").mixer_types[:4] == ["attention", "mamba2", "attention", "mamba2"]
    assert set(variant_config(name, cfg, "llama").mixer_types) == {"attention"}
    assert set(variant_config(name, cfg, "mamba2").mixer_types) == {"mamba2"}


def test_training_flops_count_six_per_trained_parameter():
    """MFU's numerator: 2 x params for the teacher's forward, 6 x trained params (+ attention scores / SSD terms);
    for mixer-only ILD only the mixers' parameters count as trained."""
    from zebra.bench.train import model_flops_per_token
    from test_model import tiny_model

    t, s = tiny_model(["attention"]), tiny_model(["mamba2"])
    n_t = sum(p.numel() for p in t.model.layers.parameters())
    n_s = sum(p.numel() for p in s.model.layers.parameters())
    m = s.model.layers[0].mamba
    T = 64
    attn = 4 * (T / 2) * 4 * 16  # scores + values, causal half, 4 heads x head_dim 16
    assert model_flops_per_token("ild", t, s, T) == pytest.approx(2 * n_t + attn + 6 * n_s + 3 * 2 * 2 * m.d_inner * m.d_state)
    n_mix = sum(p.numel() for p in m.parameters())
    assert model_flops_per_token("ild", t, {"mamba2": s}, T) == pytest.approx(
        2 * n_t + attn + 6 * n_mix + 3 * 2 * 2 * m.d_inner * m.d_state)


@pytest.mark.parametrize("stage", ["ild", "distill"])
def test_train_throughput_drives_the_trainer_on_cpu(stage, monkeypatch):
    """The benchmark runs the real Trainer (its metrics) with the stage's own loss function: the loss functions
    are called once per micro-batch of every step, warmup included."""
    from zebra.bench import train as bt
    from zebra.stages import distill, ild
    from test_model import tiny_model

    calls = []
    for mod, name in ((distill, "make_distill_loss"), (ild, "make_ild_loss")):
        real = getattr(mod, name)

        def spy(*a, _real=real, **k):
            fn = _real(*a, **k)

            def wrapped(batch):
                calls.append(batch["input_ids"].shape)
                return fn(batch)
            wrapped.count = fn.count
            return wrapped
        monkeypatch.setattr(mod, name, spy)
    teacher = tiny_model(["attention"] * 2)
    students = ({"mla": tiny_model(["mla"] * 2, seed=1), "mamba2": tiny_model(["mamba2"] * 2, seed=2)}
                if stage == "ild" else tiny_model(["mla", "mamba2"], seed=1))
    r = bt.train_throughput(stage, teacher, students, 2, 32, steps=2, warmup=1, grad_accum=2, variant="eager")
    assert len(calls) == (2 + 1) * 2 and calls[0] == (2, 32)
    assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["steps_timed"] == 2 and r["tokens_per_step"] == 128
    assert torch.isfinite(torch.tensor(r["loss"]))


@pytest.mark.parametrize("stage", ["ild", "distill"])
def test_fsdp_variant_wraps_the_stage_loss_at_one_rank_and_trains_like_the_plain_one(stage):
    """--train-variants fsdp: the trained models inside StageLoss under FSDP2 with one process (a private one-rank
    gloo group here; torchrun's under `torchrun --nproc-per-node 1`): every decoder layer a unit, and the same final
    loss as the unwrapped run from the same weights and batches (fp32 on the CPU)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from zebra.bench import train as bt
    from test_model import tiny_model

    def models():
        return ({"mla": tiny_model(["mla"] * 2, seed=1), "mamba2": tiny_model(["mamba2"] * 2, seed=2)}
                if stage == "ild" else tiny_model(["mla", "mamba2"], seed=1))

    def state(m):  # {name: full tensor} of one model or a dict of them
        ms = m if isinstance(m, dict) else {"": m}
        return {f"{k}.{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for k, mm in ms.items() for n, p in mm.named_parameters()}

    teacher = tiny_model(["attention"] * 2)
    init = state(models())
    ref = models()
    plain = bt.train_throughput(stage, teacher, ref, 2, 32, steps=2, warmup=1, variant="eager")
    students = models()
    try:
        r = bt.train_throughput(stage, teacher, students, 2, 32, steps=2, warmup=1, variant="fsdp")
        one = students["mla"] if stage == "ild" else students
        units = [m for m in one.model.layers.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 2  # the mixers (ILD trains the mixers alone) or the layers
        assert r["variant"] == "fsdp" and r["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        after, want = state(students), state(ref)
        assert any(not torch.equal(after[k], init[k]) for k in init)  # it trained
        for k in want:
            torch.testing.assert_close(after[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bench_cli_end_to_end_on_cpu(tmp_path):
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY))
    out = tmp_path / "b"
    rc = main(["bench", "--shapes", str(shape), "--variants", "hf,llama,zebra,mamba2", "--lengths", "40,80",
               "--hf-lengths", "40", "--batches", "2", "--batch-length", "24", "--prefill", "16", "--steps", "2",
               "--warmup", "1", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    ok = [(p["variant"], p["kind"], p["length"]) for p in res["points"] if p["status"] == "ok"]
    assert ("hf", "decode", 40) in ok and ("zebra", "decode", 80) in ok and ("mamba2", "batch", 24) in ok
    assert ("llama", "prefill", 16) in ok and len(ok) == len(res["points"]) == 1 + 2 * 3 + 3 * 1 + 4
    kv = {v["variant"]: v["kv_percent"] for v in res["variants"]}
    assert kv["llama"] == 100 and kv["mamba2"] == 0 and 0 < kv["zebra"] < 100
    for p in res["points"]:
        if p["kind"] != "prefill":
            assert 0 < p["roofline_fraction"] and p["roofline_tokens_per_s"] > 0
    assert all((out / f"{k}-tiny.png").stat().st_size > 1000 for k in ("decode", "batch", "prefill"))
    assert "| zebra |" in (out / "bench.md").read_text()
    assert main(["report", str(out)]) == 0  # zebra report picks the decode points up as Fig. 4 curves
    assert "| tiny/zebra | 80 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv", [
    ["--shapes", "70b"], ["--variants", "llama,gpt"], ["--lengths", "0,5"], ["--batches", "x"],
    ["--what", "decode,fly"], ["--what", "train", "--shapes", "8b"], ["--fit-step", "-1"],
    ["--what", "kernels", "--device", "cpu"],
])
def test_bench_bad_input_exits_2(argv, tmp_path, capsys):
    assert main(["bench", *argv, "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_bench_with_a_bf16_ssm_state_counts_half_the_state_bytes(tmp_path):
    """--ssm-dtype bf16: the engine decodes with a bf16 Mamba2 state and the roofline counts 2 bytes per entry."""
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY))
    runs = {}
    for dt in ("fp32", "bf16"):
        out = tmp_path / dt
        assert main(["bench", "--shapes", str(shape), "--variants", "mamba2", "--what", "decode", "--lengths", "16",
                     "--steps", "1", "--warmup", "1", "--dtype", "fp32", "--ssm-dtype", dt, "--out", str(out)]) == 0
        runs[dt] = json.loads((out / "bench.json").read_text())
    assert runs["bf16"]["ssm_dtype"] == "bf16"
    b32, b16 = (r["points"][0]["bytes_per_step"]["0"] for r in (runs["fp32"], runs["bf16"]))
    assert b16 < b32  # only the Mamba2 state differs between the two runs


@pytest.mark.parametrize("limit,step,expect", [(13, 1, 13), (13, 4, 12), (200, 8, 200), (3, 8, 0), (100, 8, 96)])
def test_fit_search_finds_the_largest_batch_that_fits(limit, step, expect):
    from zebra.commands.bench import fit_search

    tried = []

    def fits(B):
        tried.append(B)
        return B <= limit

    lo = max((b for b in (8, 16, 32, 64, 128) if b <= limit), default=0)
    hi = min((b for b in (8, 16, 32, 64, 128, 256) if b > limit), default=512)
    assert fit_search(lo, hi, step, fits) == expect
    assert all(lo < b < hi for b in tried) and len(tried) <= 8  # bisection, inside the bracket


def test_batch_sweep_bisects_below_the_first_out_of_memory_batch(tmp_path, monkeypatch):
    """A variant whose batch 64 runs out of memory: the sweep marks 64 and 128 OOM, bisects 32..64 to the largest
    batch that fits (48 at --fit-step 8, memory faked at 50 rows), and the report names each variant's best batch."""
    from zebra.bench.runner import Bench

    real = Bench.generation_point

    def limited(self, model, zc, batch, length):
        if zc.mixer_types.count("attention") == len(zc.mixer_types) and batch > 50:
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return real(self, model, zc, min(batch, 2), length)  # small on the CPU; the batch is relabelled below

    monkeypatch.setattr(Bench, "generation_point",  # the timing of batch 2 on a CPU says nothing: B tokens/s
                        lambda self, model, zc, batch, length: {**limited(self, model, zc, batch, length),
                                                                "batch": batch, "tokens_per_s": float(batch)})
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY))
    out = tmp_path / "b"
    assert main(["bench", "--shapes", str(shape), "--variants", "llama,zebra", "--what", "batch", "--batches",
                 "32,64,128", "--batch-length", "8", "--steps", "1", "--warmup", "0", "--dtype", "fp32",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    llama = [(p["batch"], p["status"], p.get("fit_search", False)) for p in res["points"] if p["variant"] == "llama"]
    assert llama[:3] == [(32, "ok", False), (64, "oom", False), (128, "oom", False)]
    assert [b for b, st, fs in llama if fs] == [48, 56] and ("48", "ok") == (str(llama[3][0]), llama[3][1])
    assert [p["batch"] for p in res["points"] if p["variant"] == "zebra"] == [32, 64, 128]  # nothing to search
    md = (out / "bench.md").read_text()
    assert "llama B=48 48 tokens/s" in md and "zebra B=128 128 tokens/s (2.67x llama)" in md


def test_report_elsewhere_links_the_run_plots_where_they_are(tmp_path):
    """`zebra report RUN --out DIR`: the run's own section keeps working image links (relative to DIR now)."""
    from zebra.eval.report import write_report

    run = tmp_path / "run"
    (run / "sensitivity").mkdir(parents=True)
    for f in ("curve.png", "sensitivity/sensitivity.png"):
        (run / f).write_bytes(b"png")
    head = "# run\n\n![curve](curve.png)\n![sensitivity](sensitivity/sensitivity.png)\n![web](https://x/y.png)\n"
    for out in (run, tmp_path / "elsewhere" / "rep"):
        md = write_report(run, out, head=head).read_text()
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
        assert len(links) == 3 and links[2] == "https://x/y.png"
        assert all((out / link).resolve().is_file() for link in links[:2]), (out, links)
