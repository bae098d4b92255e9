"""Teacher -> student conversion: SVD init of MLA (SPEC 3.1), Mamba2 init (SPEC 3.2), `zebra convert` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from zebra import cli
from zebra.convert import svd_mla
from zebra.convert.mamba2_init import in_proj_blocks, init_mamba2_from_attention
from zebra.convert.svd_mla import init_mla_from_attention, svd_reconstruction_error

D, N_H, N_KV, D_H = 64, 4, 2, 16  # n_kv != n_h on purpose: Algorithm 1's W_UV typo only shows under GQA


def weights(seed=0, d=D, n_h=N_H, n_kv=N_KV, d_h=D_H):
    """Random teacher q/k/v/o weights in nn.Linear layout, float64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(n_h * d_h, d), r(n_kv * d_h, d), r(n_kv * d_h, d), r(d, n_h * d_h)


def run_cli(argv, capsys):
    """Run `zebra ARGV` in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- SVD init (SPEC 3.1) -------------------------------------------------------------------------------------
def test_full_rank_factors_reconstruct_kv_and_q():
    """At full rank W_DKV @ W_UKV == [W_K, W_V] and W_DQ @ W_UQR == W_Q."""
    q, k, v, _ = weights()
    W_KV = torch.cat([k.T, v.T], dim=1)  # (d, 2*n_kv*d_h)
    down, up = svd_mla.truncated_svd(W_KV, min(W_KV.shape))
    torch.testing.assert_close(down @ up, W_KV)
    out = init_mla_from_attention(q, k, v, N_H, N_KV, D_H, d_nope=8, d_r=8, r_kv=64, r_q=64)
    # d_nope + d_r = d_h: the per-head [nope | rope] split is the identity, so q_b @ q_a is W_Q itself.
    torch.testing.assert_close(out["q_b_proj.weight"] @ out["q_a_proj.weight"], q)


def test_no_query_compression_keeps_head_dims():
    """r_q None: q_proj rows per head are the teacher's first d_nope dims then its last d_r dims."""
    q, k, v, _ = weights()
    out = init_mla_from_attention(q, k, v, N_H, N_KV, D_H, d_nope=4, d_r=6, r_kv=32, r_q=None)
    got = out["q_proj.weight"].reshape(N_H, 10, D)
    ref = q.reshape(N_H, D_H, D)
    torch.testing.assert_close(got[:, :4], ref[:, :4])
    torch.testing.assert_close(got[:, 4:], ref[:, D_H - 6:])


def test_reconstruction_error_non_increasing_in_rank():
    """Relative error of the rank-r [W_K, W_V] is non-increasing in r, 0 at full rank, and matches a direct SVD."""
    _, k, v, _ = weights()
    errs = [svd_reconstruction_error(k, v, r) for r in range(1, 65)]
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-12 and errs[0] > 0.5
    W = torch.cat([k.T, v.T], dim=1)
    down, up = svd_mla.truncated_svd(W, 16)
    assert abs(float((W - down @ up).norm() / W.norm()) - errs[15]) < 1e-10


def latent_kv(out, x, r_kv, d_nope, d_r, n_kv=N_KV, d_h=D_H):
    """By hand, as the MLA module computes it: C_KV = x W_DKV, then per group [K_C | V] = C_KV W_UKV + b."""
    a = x @ out["kv_a_proj_with_mqa.weight"].T + out.get("kv_a_proj_with_mqa.bias", 0)  # (T, R + d_r)
    c_kv, k_rope = a[:, :r_kv], a[:, r_kv:]
    kv = (c_kv @ out["kv_b_proj.weight"].T + out.get("kv_b_proj.bias", 0)).reshape(-1, n_kv, d_nope + d_h)
    return kv[..., :d_nope], kv[..., d_nope:], k_rope  # (T, n_kv, d_nope), (T, n_kv, d_v), (T, d_r)


def test_latent_kv_equals_teacher_at_full_rank():
    """At full rank the latent path gives the teacher's K (nope dims, per KV group) and V exactly, with biases."""
    q, k, v, _ = weights()
    g = torch.Generator().manual_seed(1)
    kb, vb = (torch.randn(N_KV * D_H, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.randn(5, D, generator=g, dtype=torch.float64)  # (T, d)
    out = init_mla_from_attention(q, k, v, N_H, N_KV, D_H, d_nope=8, d_r=8, r_kv=64, r_q=None, k_b=kb, v_b=vb)
    k_nope, v_lat, k_rope = latent_kv(out, x, 64, 8, 8)
    K = (x @ k.T + kb).reshape(5, N_KV, D_H)
    V = (x @ v.T + vb).reshape(5, N_KV, D_H)
    torch.testing.assert_close(k_nope, K[..., :8])
    torch.testing.assert_close(v_lat, V)  # regression: W_UV is the V half (split at n_kv*d_h, not n_h*d_h)
    torch.testing.assert_close(k_rope, K[..., 8:].mean(dim=1))  # the shared RoPE key: mean over KV heads


def test_w_uv_taken_from_v_half():
    """kv_b_proj's V rows reproduce v_proj, not a slice of the K half or past the end (Algorithm 1 typo)."""
    q, k, v, _ = weights(seed=3)
    out = init_mla_from_attention(q, k, v, N_H, N_KV, D_H, d_nope=8, d_r=8, r_kv=64, r_q=None)
    W_DKV = out["kv_a_proj_with_mqa.weight"][:64]  # (R, d)
    per_group = out["kv_b_proj.weight"].reshape(N_KV, 8 + D_H, 64)
    torch.testing.assert_close((per_group[:, 8:] @ W_DKV).reshape(N_KV * D_H, D), v)


def test_q_bias_split_per_head_and_latent_bias_zero():
    """Query bias follows the per-head [nope | rope] split; the KV latent carries no bias."""
    q, k, v, _ = weights()
    qb = torch.arange(N_H * D_H, dtype=torch.float64)
    kb = torch.arange(N_KV * D_H, dtype=torch.float64)
    out = init_mla_from_attention(q, k, v, N_H, N_KV, D_H, d_nope=4, d_r=4, r_kv=16, r_q=32, q_b=qb, k_b=kb)
    ref = qb.reshape(N_H, D_H)
    torch.testing.assert_close(out["q_b_proj.bias"].reshape(N_H, 8), torch.cat([ref[:, :4], ref[:, -4:]], dim=1))
    assert out["kv_a_proj_with_mqa.bias"][:16].abs().max() == 0
    torch.testing.assert_close(out["kv_a_proj_with_mqa.bias"][16:], kb.reshape(N_KV, D_H)[:, -4:].mean(0))
    assert out["kv_b_proj.bias"].reshape(N_KV, 4 + D_H)[:, 4:].abs().max() == 0  # no v bias given: zeros


# ---- Mamba2 init (SPEC 3.2) ----------------------------------------------------------------------------------
def test_mamba2_rows_are_v_k_q_and_defaults_kept():
    """in_proj x/B/C rows = W_V/W_K/W_Q, out_proj = W_O; z and dt rows keep their default values."""
    q, k, v, o = (t.float() for t in weights())
    rows = 2 * N_H * D_H + 2 * N_KV * D_H + N_H
    state = {"in_proj.weight": torch.randn(rows, D), "in_proj.bias": torch.randn(rows)}
    qb, kb, vb = torch.randn(N_H * D_H), torch.randn(N_KV * D_H), torch.randn(N_KV * D_H)
    new = init_mamba2_from_attention(state, q, k, v, o, N_H, N_KV, D_H, q_b=qb, k_b=kb, v_b=vb)
    blk = in_proj_blocks(N_H, N_KV, D_H)
    w, b = new["in_proj.weight"], new["in_proj.bias"]
    torch.testing.assert_close(w[blk["x"]], v)
    torch.testing.assert_close(w[blk["B"]], k)
    torch.testing.assert_close(w[blk["C"]], q)
    torch.testing.assert_close(w[blk["z"]], state["in_proj.weight"][blk["z"]])
    torch.testing.assert_close(w[blk["dt"]], state["in_proj.weight"][blk["dt"]])
    torch.testing.assert_close(new["out_proj.weight"], o)
    torch.testing.assert_close(b[blk["x"]], vb)
    torch.testing.assert_close(b[blk["C"]], qb)
    assert b[blk["z"]].abs().max() == 0 and b[blk["dt"]].abs().max() == 0


# ---- tiny teachers on disk -----------------------------------------------------------------------------------
def save_teacher(path, kind="llama", layers=4, tie=False, seed=0):
    """A tiny random HF teacher (hidden 64, 4 heads, 2 KV heads, vocab 128) saved with save_pretrained."""
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    cfg = getattr(transformers, cls[0])(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=128,
                                        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = getattr(transformers, cls[1])(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so copying them is actually checked
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def convert_cli(teacher, out, capsys, *extra):
    return run_cli(["convert", "--teacher", teacher, "--out", out, *extra], capsys)


def test_all_attention_student_matches_teacher(tmp_path, capsys):
    """Keeping every layer as attention copies the teacher exactly: same logits after a save / load round trip."""
    import zebra  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    teacher = save_teacher(tmp_path / "t", "qwen2", tie=True)
    rc, out, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys, "--attention-layers", "all")  # no --mla-layers
    assert rc == 0, err
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(student(x).logits, teacher(x).logits, atol=1e-5, rtol=1e-5)
    assert "(100.00%)" in out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hybrid_conversion_maps_every_weight(kind, tmp_path, capsys):
    """A hybrid student loads with AutoModelForCausalLM; MLA/Mamba2/shared weights are the mapped ones and the
    Mamba2 SSM parameters keep the seeded default init."""
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    from zebra.convert.layout import student_config_from_teacher
    from zebra.model.hybrid import ZebraForCausalLM

    teacher = save_teacher(tmp_path / "t", kind)
    rc, out, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys, "--mla-layers", "0,3",
                               "--attention-layers", "1", "--kv-rank", 64, "--q-rank", 32, "--seed", 5,
                               "--rope-select", "last", "--conv-init", "random", "--gate-init", "random")  # the paper's
    assert rc == 0, err
    assert "KV cache: 208 values/token vs 256 for the teacher (81.25%)" in out
    s = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert s.config.mixer_types == ["mla", "attention", "mamba2", "mla"]
    ts = teacher.state_dict()
    ss = s.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.2.mlp.down_proj.weight", "model.layers.3.post_attention_layernorm.weight",
                 "model.layers.1.self_attn.k_proj.weight"):
        torch.testing.assert_close(ss[name], ts[name])
    a = "model.layers.3.self_attn."
    ref = init_mla_from_attention(ts[a + "q_proj.weight"], ts[a + "k_proj.weight"], ts[a + "v_proj.weight"],
                                  4, 2, 16, 8, 8, 64, 32, q_b=ts.get(a + "q_proj.bias"), k_b=ts.get(a + "k_proj.bias"),
                                  v_b=ts.get(a + "v_proj.bias"))
    for k_, v_ in ref.items():
        torch.testing.assert_close(ss[a + k_], v_.float(), atol=1e-5, rtol=1e-5)
    blk = in_proj_blocks(4, 2, 16)
    m = "model.layers.2.mamba."
    torch.testing.assert_close(ss[m + "in_proj.weight"][blk["B"]], ts["model.layers.2.self_attn.k_proj.weight"])
    torch.testing.assert_close(ss[m + "out_proj.weight"], ts["model.layers.2.self_attn.o_proj.weight"])
    torch.manual_seed(5)
    fresh = ZebraForCausalLM(student_config_from_teacher(teacher.config.to_dict(), [0, 3], [1], 64, 32)).state_dict()
    for k_ in ("A_log", "dt_bias", "D", "conv1d.weight", "norm.weight"):
        torch.testing.assert_close(ss[m + k_], fresh[m + k_])
    torch.testing.assert_close(ss[m + "in_proj.weight"][blk["z"]], fresh[m + "in_proj.weight"][blk["z"]])
    report = json.loads((tmp_path / "s" / "zebra_convert.json").read_text())
    assert set(report["svd_error"]) == {"0", "3"} and report["svd_error"]["0"]["kv"] < 1e-5
    assert report["kv"]["student_per_token"] == 208
    with torch.no_grad():
        assert torch.isfinite(s(torch.randint(0, 128, (1, 6))).logits).all()


def test_random_init_keeps_mla_default_and_force(tmp_path, capsys):
    """--init random leaves MLA weights at the seeded default; a non-empty --out needs --force."""
    from zebra.convert.layout import student_config_from_teacher
    from zebra.model.hybrid import ZebraForCausalLM
    from safetensors.torch import load_file

    teacher = save_teacher(tmp_path / "t", layers=2)
    args = ["--mla-layers", "all", "--kv-rank", 32, "--init", "random"]
    assert convert_cli(tmp_path / "t", tmp_path / "s", capsys, *args)[0] == 0
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys, *args)
    assert rc == 2 and "not empty" in err
    assert convert_cli(tmp_path / "t", tmp_path / "s", capsys, *args, "--force")[0] == 0
    ss = load_file(str(tmp_path / "s" / "model.safetensors"))
    torch.manual_seed(0)
    fresh = ZebraForCausalLM(student_config_from_teacher(teacher.config.to_dict(), [0, 1], [], 32)).state_dict()
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    torch.testing.assert_close(ss[name], fresh[name])
    up = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(ss[up], teacher.state_dict()[up])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind


def test_qwen3_needs_drop_qk_norm(tmp_path, capsys):
    """A Qwen3 teacher is refused on MLA/Mamba2 layers unless --drop-qk-norm; attention layers keep q/k norms."""
    save_teacher(tmp_path / "t", "qwen3", layers=2)
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys, "--mla-layers", "0", "--kv-rank", 32)
    assert rc == 2 and "q/k RMSNorm (Qwen3)" in err and not (tmp_path / "s").exists()
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys, "--mla-layers", "0",
                             "--attention-layers", "1", "--kv-rank", 32, "--drop-qk-norm")
    assert rc == 0, err
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert "model.layers.1.self_attn.q_norm.weight" in names


# ---- bad input through the CLI -------------------------------------------------------------------------------
def _corrupt(t):
    (t / "model.safetensors").write_bytes(b"\x00garbage" * 10)


def _no_weights(t):
    (t / "model.safetensors").unlink()


def _missing_tensor(t):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(t / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(t / "model.safetensors"), metadata={"format": "pt"})


def _gpt2(t):
    cfg = json.loads((t / "config.json").read_text())
    (t / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))


@pytest.mark.parametrize("breaker,flags,needle", [
    (_gpt2, ["--mla-layers", "0"], "unsupported architecture 'gpt2'"),
    (None, ["--mla-layers", "0", "--kv-rank", 65], "--kv-rank 65 must be in 1..64"),
    (None, ["--mla-layers", "0,2"], "--mla-layers: layer index 2 is out of range"),
    (None, ["--mla-layers", "1,1"], "--mla-layers: layer 1 is listed twice"),
    (None, ["--mla-layers", "0", "--attention-layers", "0"], "in both --mla-layers and --attention-layers"),
    (_no_weights, ["--mla-layers", "0"], "has a config.json but no weights"),
    (_corrupt, ["--mla-layers", "0"], "model.safetensors: the file is corrupt or truncated"),
    (_missing_tensor, ["--mla-layers", "0"], "missing 1 tensor(s) its config implies: model.layers.1.self_attn.k_proj"),
])
def test_bad_input_exit_2_no_output(breaker, flags, needle, tmp_path, capsys):
    """Each bad input exits 2 with a message naming the problem and leaves no output directory."""
    save_teacher(tmp_path / "t", layers=2)
    if breaker is not None:
        breaker(tmp_path / "t")
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "out" / "s", capsys, "--kv-rank", 32, *flags)
    assert rc == 2
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_missing_teacher_and_unwritable_out(tmp_path, capsys):
    """A missing teacher dir and an --out under a regular file are refused before any work."""
    rc, _, err = convert_cli(tmp_path / "nope", tmp_path / "s", capsys, "--mla-layers", "0")
    assert rc == 2 and "does not exist" in err and not (tmp_path / "s").exists()
    save_teacher(tmp_path / "t", layers=2)
    (tmp_path / "t" / "config.json").rename(tmp_path / "t" / "config.bak")
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys, "--mla-layers", "0")
    assert rc == 2 and "no config.json" in err
    (tmp_path / "t" / "config.bak").rename(tmp_path / "t" / "config.json")
    (tmp_path / "file").write_text("x")
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "file" / "s", capsys, "--mla-layers", "0",
                             "--kv-rank", 32)
    assert rc == 2 and "is a file, not a directory" in err
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "t", capsys, "--mla-layers", "0", "--force")
    assert rc == 2 and "overwrite the teacher" in err


# ---- teacher formats -----------------------------------------------------------------------------------------
def test_sharded_and_bin_checkpoints_load_alike(tmp_path):
    """A sharded safetensors teacher and a pytorch_model.bin of the bare model load to the same float32 state."""
    from zebra.convert.teacher import load_teacher

    teacher = save_teacher(tmp_path / "one", layers=2)
    teacher.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    bare = {k[len("model."):]: v for k, v in teacher.state_dict().items() if k.startswith("model.")}
    torch.save({**bare, "lm_head.weight": teacher.lm_head.weight.detach()}, tmp_path / "bin" / "pytorch_model.bin")
    _, ref, _ = load_teacher(str(tmp_path / "one"))
    for name in ("sharded", "bin"):
        _, sd, _ = load_teacher(str(tmp_path / name))
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def write_tiny_gguf(path, layers=2, d=64, n_h=4, n_kv=2, ff=128, vocab=128):
    """A tiny float32 Llama GGUF with a toy vocabulary, written with the gguf package."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_h)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_tensor("token_embd.weight", f(vocab, d))
    w.add_tensor("output_norm.weight", f(d))
    w.add_tensor("output.weight", f(vocab, d))
    dh = d // n_h
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (n_h * dh, d), "attn_k": (n_kv * dh, d),
              "attn_v": (n_kv * dh, d), "attn_output": (d, n_h * dh), "ffn_gate": (ff, d), "ffn_up": (ff, d),
              "ffn_down": (d, ff)}
    for i in range(layers):
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", f(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_teacher_converts(tmp_path, capsys):
    """A .gguf teacher goes through transformers' GGUF reader and converts like an HF directory."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    rc, out, err = convert_cli(tmp_path / "tiny.gguf", tmp_path / "s", capsys, "--mla-layers", "0",
                               "--kv-rank", 32)
    assert rc == 0, err
    assert "KV cache: 40 values/token vs 128 for the teacher (31.25%)" in out
    assert (tmp_path / "s" / "model.safetensors").exists()


@pytest.mark.teacher
def test_embedded_teacher_all_attention_parity(teacher_dir, teacher_model, tmp_path, capsys):
    """The real SmolLM2 teacher converted with every layer kept as attention reproduces its logits and tokenizer."""
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rc, _, err = convert_cli(teacher_dir, tmp_path / "s", capsys, "--mla-layers", "none", "--attention-layers", "all")
    assert rc == 0, err
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    x = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(student(**x).logits, teacher_model(**x).logits, atol=1e-4, rtol=1e-4)


def test_head_dim_order_hand_checked():
    """Paper layout: nope = first d_nope dims, rope = last d_r (half-pairs under rotate-half). Pairs layout:
    rope = the chosen pairs' first halves then their second halves; nope = the other pairs, best scored first."""
    from zebra.convert.svd_mla import head_dim_order

    assert head_dim_order(8, 4, 4) == ([0, 1, 2, 3], [4, 5, 6, 7])
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0])  # pairs (0,4) (1,5) (2,6) (3,7) of an 8-dim head
    assert head_dim_order(8, 4, 4, [1, 3], scores) == ([2, 6, 0, 4], [1, 3, 5, 7])
    assert head_dim_order(8, 2, 4, [1, 3], scores) == ([2, 6], [1, 3, 5, 7])  # d_nope < the rest: best pairs kept


def test_rope_pairs_by_norm_picks_the_heaviest_pairs():
    """Pair j's score is sum over heads of ||W_Q pair j|| * ||W_K pair j of the head's group||: pairs whose
    query or key rows are zero score 0 and are never chosen."""
    from zebra.convert.svd_mla import rope_pair_scores, rope_pairs_by_norm

    g = torch.Generator().manual_seed(0)
    n_h, n_kv, d_h, d = 4, 2, 8, 16
    q, k = torch.randn(n_h * d_h, d, generator=g), torch.randn(n_kv * d_h, d, generator=g)
    qv = q.view(n_h, d_h, d)
    qv[:, [0, 4]] = 0  # pair 0 dead in the queries
    k.view(n_kv, d_h, d)[:, [2, 6]] = 0  # pair 2 dead in the keys
    s = rope_pair_scores(q, k, n_h, n_kv, d_h)
    assert s[0] == 0 and s[2] == 0 and s[1] > 0 and s[3] > 0
    want = sum(qv[i, [1, 5]].norm() * k.view(n_kv, d_h, d)[i // 2, [1, 5]].norm() for i in range(n_h))
    assert s[1].item() == pytest.approx(want.item(), rel=1e-6)
    assert rope_pairs_by_norm(q, k, n_h, n_kv, d_h, 4) == [1, 3]


def test_pair_preserving_rope_init_is_exact_where_the_paper_layout_is_not(tmp_path, capsys):
    """An MQA teacher whose rotary pairs 1, 3, 5, 7 (of 8) carry nothing: with whole pairs (the heaviest ones, at the
    teacher's frequencies: --rope-select norm) and full rank, the all-MLA student computes exactly the teacher's
    function; the paper's 'last d_r dims' layout at the same ranks does not (it rotates half-pairs at re-derived
    frequencies)."""
    import transformers

    from zebra.model.hybrid import ZebraForCausalLM

    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=16, intermediate_size=128, vocab_size=128, rope_theta=100.0)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in teacher.model.layers:
            for proj, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, 1)):
                w = proj.weight.view(heads, 16, 64)
                w[:, [1, 3, 5, 7, 9, 11, 13, 15]] = 0  # rotary pairs 1, 3, 5, 7 (dims j, j + 8) of every head
                w.mul_(3.0)  # large scores, so a wrong rotation shows
    teacher.save_pretrained(tmp_path / "t")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = teacher(ids).logits
    errs = {}
    for sel in ("norm", "last"):
        rc, out, err = convert_cli(tmp_path / "t", tmp_path / sel, capsys, "--mla-layers", "all", "--kv-rank", 32,
                                   "--rope-dim", 8, "--nope-dim", 8, "--rope-select", sel)
        assert rc == 0, err
        s = ZebraForCausalLM.from_pretrained(tmp_path / sel).eval()
        if sel == "norm":
            assert s.config.mla_rope_pairs == {"0": [0, 2, 4, 6], "1": [0, 2, 4, 6]}
        with torch.no_grad():
            errs[sel] = ((s(ids).logits - ref).norm() / ref.norm()).item()
    assert errs["norm"] < 1e-5
    assert errs["last"] > 1e-2


def test_identity_conv_init(tmp_path, capsys):
    """--conv-init identity: every Mamba2 conv is the identity (last tap 1, the rest and the bias 0), so the
    conv passes the teacher-mapped x, B, C through unchanged; random keeps Mamba2's default init."""
    from zebra.model.hybrid import ZebraForCausalLM
    from zebra.ops.conv import causal_conv1d

    save_teacher(tmp_path / "t")
    for init in ("identity", "random"):
        rc, _, err = convert_cli(tmp_path / "t", tmp_path / init, capsys, "--mla-layers", "none",
                                 "--conv-init", init)
        assert rc == 0, err
    conv = ZebraForCausalLM.from_pretrained(tmp_path / "identity").model.layers[1].mamba.conv1d
    x = torch.randn(2, 9, conv.weight.shape[0])
    with torch.no_grad():
        y, _ = causal_conv1d(x, conv.weight, conv.bias)
    torch.testing.assert_close(y, x)
    rand = ZebraForCausalLM.from_pretrained(tmp_path / "random").model.layers[1].mamba.conv1d
    assert rand.weight[:, 0, :-1].abs().sum() > 0 and rand.bias.abs().sum() > 0


def test_rope_pairs_by_frequency_picks_the_fastest_pairs():
    """With default RoPE, inverse frequencies fall with the pair index: the fastest d_r/2 pairs are the first ones;
    with llama3 scaling the order is the same (slow pairs slowed further)."""
    from zebra.convert.svd_mla import rope_pairs_by_frequency
    from zebra.model.common import rope_inv_freq

    assert rope_pairs_by_frequency(rope_inv_freq({"rope_theta": 1e5}, 64), 32) == list(range(16))
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert rope_pairs_by_frequency(rope_inv_freq(llama3, 64), 16) == list(range(8))
    assert rope_pairs_by_frequency(torch.tensor([0.1, 1.0, 0.5, 0.01]), 4) == [1, 2]


def test_constant_gate_init(tmp_path, capsys):
    """--gate-init constant (default): Mamba2's z rows are zero and z_bias = 1, so the gate silu(z) is the same
    constant on every channel and token; the gated norm then sees y alone. random keeps the paper's init."""
    from zebra.model.hybrid import ZebraForCausalLM
    from zebra.convert.mamba2_init import in_proj_blocks

    save_teacher(tmp_path / "t")
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "c", capsys, "--mla-layers", "none")
    assert rc == 0, err
    m = ZebraForCausalLM.from_pretrained(tmp_path / "c").model.layers[0].mamba
    z = in_proj_blocks(4, 2, 16)["z"]
    assert m.in_proj.weight[z].abs().sum() == 0 and torch.all(m.z_bias == 1.0)
    h = torch.randn(1, 5, 64)
    with torch.no_grad():
        gate = torch.nn.functional.silu(m.in_proj(h)[..., z] + m.z_bias)
    assert torch.allclose(gate, torch.full_like(gate, torch.nn.functional.silu(torch.tensor(1.0)).item()))
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "r", capsys, "--mla-layers", "none", "--gate-init", "random")
    assert rc == 0, err
    r = ZebraForCausalLM.from_pretrained(tmp_path / "r").model.layers[0].mamba
    assert r.z_bias is None and r.in_proj.weight[z].abs().sum() > 0


def test_mla_layers_required_without_attention_layers(tmp_path, capsys):
    save_teacher(tmp_path / "t")
    rc, out, err = convert_cli(tmp_path / "t", tmp_path / "s", capsys)
    assert rc == 2 and "--mla-layers is required" in err and not (tmp_path / "s").exists()


def test_save_model_dtype_leaves_the_model_alone(tmp_path, capsys):
    """save_model(dtype=bfloat16) writes bf16 tensors (half the bytes) that load back to the rounded weights, and
    does not change the in-memory fp32 model that training goes on with."""
    from safetensors import safe_open

    from zebra.convert.build import save_model
    from zebra.model.hybrid import ZebraForCausalLM

    save_teacher(tmp_path / "t")
    rc, _, err = convert_cli(tmp_path / "t", tmp_path / "c", capsys, "--mla-layers", "0", "--kv-rank", "32")
    assert rc == 0, err
    model = ZebraForCausalLM.from_pretrained(tmp_path / "c")
    save_model(model, None, tmp_path / "bf16", {"stage": "test"}, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    files = list((tmp_path / "bf16").glob("*.safetensors"))
    assert files
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back = ZebraForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    for (k, p), q in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), msg=k)


def test_compose_refuses_a_used_out_before_loading(tmp_path, monkeypatch, capsys):
    """`zebra compose --out DIR` with DIR already holding files: exit 2 at once (not after composing), unless --force."""
    from zebra import loading
    from zebra.cli import main

    out = tmp_path / "hybrid"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    args = ["compose", "--mla-model", "a", "--mamba-model", "b", "--mla-layers", "0", "--out", str(out)]
    assert main(args) == 2
    assert "exists and is not empty (pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
