"""`zebra kv` and the layer-spec / layout parsing behind it (SPEC 9 KV table, SPEC 2 geometry checks)."""

from __future__ import annotations

import json

import pytest

from zebra import cli
from zebra.convert import layout
from zebra.convert.teacher import SHAPES_DIR
from zebra.errors import ZebraError


def run_cli(argv, capsys):
    """Run `zebra ARGV` in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def evens(stop: int) -> str:
    return ",".join(str(i) for i in range(0, stop + 1, 2))


# SPEC section 9, all eight rows: (shape, MLA layers, r_kv, r_q, d_nope, d_r, KV % vs base).
SPEC9 = [
    ("llama-3.2-1b", "0,2,4,6,8,10,12,14", 128, 1344, 32, 32, 7.81),
    ("llama-3.2-1b", "0,2,5,8,11,14", 128, 1344, 32, 32, 5.86),
    ("llama-3.2-1b", "0,5,10,14", 128, 1344, 32, 32, 3.91),
    ("llama-3.2-3b", evens(24) + ",27", 128, 1536, 64, 64, 4.69),
    ("llama-3.2-3b", "0,4,8,12,16,20,24,27", 128, 1536, 64, 64, 2.68),
    ("llama-3.2-3b", "0,5,11,17,22,27", 128, 1536, 64, 64, 2.01),
    ("llama-3.1-8b", evens(28) + ",31", 160, 2048, 64, 64, 5.47),
    ("llama-3.1-8b", "0,4,8,13,18,23,27,31", 160, 2048, 64, 64, 2.73),
]


@pytest.mark.parametrize("shape,mla,r_kv,r_q,nope,rope,percent", SPEC9)
def test_spec9_table_kv_percent(shape, mla, r_kv, r_q, nope, rope, percent, capsys):
    """Every row of SPEC 9's table: `zebra kv --json` reproduces the paper's KV % to 2 decimals."""
    rc, out, _ = run_cli(["kv", "--teacher", shape, "--mla-layers", mla, "--kv-rank", r_kv, "--q-rank", r_q,
                          "--nope-dim", nope, "--rope-dim", rope, "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    assert round(obj["kv_percent"], 2) == percent
    n_mla = len(mla.split(","))
    assert obj["layers"] == {"mla": n_mla, "mamba2": obj["num_layers"] - n_mla, "attention": 0}
    assert obj["student_per_token"] == n_mla * (r_kv + rope)


def test_human_output_prints_percent(capsys):
    """The table output ends with the one-line summary for Llama-3.2-1B 4MLA (3.91%)."""
    rc, out, _ = run_cli(["kv", "--teacher", "llama-3.2-1b", "--mla-layers", "0,5,10,14", "--kv-rank", 128,
                          "--rope-dim", 32, "--nope-dim", 32, "--q-rank", 1344], capsys)
    assert rc == 0
    assert "KV cache: 640 values/token vs 16384 for the teacher (3.91%)" in out


def test_attention_layers_count_full_kv(tmp_path, capsys):
    """Kept attention layers cost 2*n_kv*d_h per token; a config.json path works without weights."""
    cfg = json.loads((SHAPES_DIR / "llama-3.2-1b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc, out, _ = run_cli(["kv", "--teacher", tmp_path / "config.json", "--mla-layers", "none",
                          "--attention-layers", "0,1", "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    assert obj["student_per_token"] == 2 * 1024 and round(obj["kv_percent"], 2) == 12.5
    rc, out2, _ = run_cli(["kv", "--teacher", tmp_path, "--mla-layers", "none", "--attention-layers", "0,1",
                           "--json"], capsys)
    assert rc == 0 and json.loads(out2)["student_per_token"] == 2048


@pytest.mark.parametrize("argv,needle", [
    (["--mla-layers", "0,16"], "--mla-layers: layer index 16 is out of range"),
    (["--mla-layers", "-1"], "--mla-layers: layer index -1 is negative"),
    (["--mla-layers", "0,3,3"], "--mla-layers: layer 3 is listed twice"),
    (["--mla-layers", "0,x"], "--mla-layers: 'x' is not a layer index"),
    (["--mla-layers", "0,,1"], "--mla-layers: empty entry"),
    (["--mla-layers", "0,1", "--attention-layers", "1,2"], "[1] are in both --mla-layers and --attention-layers"),
    (["--mla-layers", "none", "--attention-layers", "99"], "--attention-layers: layer index 99 is out of range"),
    (["--mla-layers", "0", "--kv-rank", 1025], "--kv-rank 1025 must be in 1..1024"),
    (["--mla-layers", "0", "--q-rank", 4096], "--q-rank 4096 must be in 1..2048"),
    (["--mla-layers", "0", "--rope-dim", 31], "--rope-dim 31 must be a positive even number"),
    (["--mla-layers", "0", "--rope-dim", 32, "--nope-dim", 40], "must be <= head_dim (64)"),
])
def test_bad_layout_flags_exit_2(argv, needle, capsys):
    """Bad layer specs and impossible ranks give exit code 2 and a message naming the flag."""
    rc, _, err = run_cli(["kv", "--teacher", "llama-3.2-1b", *argv], capsys)
    assert rc == 2
    assert needle in err


def test_parse_layer_spec_forms():
    """'all', 'none', '' and unsorted lists parse to sorted 0-based indices."""
    assert layout.parse_layer_spec("all", 4, "--x") == [0, 1, 2, 3]
    assert layout.parse_layer_spec("none", 4, "--x") == []
    assert layout.parse_layer_spec("", 4, "--x") == []
    assert layout.parse_layer_spec(" 3, 0 ", 4, "--x") == [0, 3]
    assert layout.layer_types_from_flags(4, [0], [3]) == ["mla", "mamba2", "mamba2", "attention"]


def tiny_cfg(model_type="llama", **kw) -> dict:
    cfg = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128}
    cfg.update(kw)
    return cfg


def test_rope_v4_and_v5_forms_agree():
    """v4 rope_theta + rope_scaling and v5 rope_parameters map to the same llama3 rope_parameters."""
    scaling = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
    v4 = tiny_cfg(rope_theta=500000.0, rope_scaling={**scaling, "rope_type": "llama3"})
    v5 = tiny_cfg(rope_parameters={**scaling, "rope_type": "llama3", "rope_theta": 500000.0})
    a = layout.student_config_from_teacher(v4, [0], [], kv_rank=32).rope_config
    b = layout.student_config_from_teacher(v5, [0], [], kv_rank=32).rope_config
    assert a == b == {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    legacy = tiny_cfg(rope_scaling={"type": "linear", "factor": 2.0})
    assert layout.rope_parameters_from_teacher(legacy) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("cfg,needle", [
    (tiny_cfg("gpt2"), "unsupported architecture 'gpt2' (supported: llama, mistral, qwen2, qwen3)"),
    (tiny_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE type 'yarn' is not supported"),
    (tiny_cfg(partial_rotary_factor=0.5), "partial rotary"),
    (tiny_cfg(attention_bias=True), "attention biases on o_proj"),
    (tiny_cfg("qwen3", head_dim=16), "q/k RMSNorm (Qwen3)"),
])
def test_unrepresentable_teachers_refused(cfg, needle):
    """Teacher features the student cannot express are refused with a ZebraError naming them."""
    with pytest.raises(ZebraError) as e:
        layout.student_config_from_teacher(cfg, [0], [], kv_rank=32)
    assert needle in str(e.value)


def test_qwen3_qk_norm_dropped_or_kept(capsys):
    """Qwen3: --drop-qk-norm converts with a warning; an all-attention layout needs no flag and keeps the norm."""
    cfg = tiny_cfg("qwen3", head_dim=16)
    z = layout.student_config_from_teacher(cfg, [0], [], kv_rank=32, drop_qk_norm=True)
    assert z.qk_norm and z.mixer_types == ["mla", "mamba2"]
    assert "q/k RMSNorm" in capsys.readouterr().err
    z = layout.student_config_from_teacher(cfg, [], [0, 1])
    assert z.qk_norm and z.mixer_types == ["attention", "attention"]


def test_qwen2_biases_and_mistral_window(capsys):
    """Qwen2 maps to q/k/v biases; Mistral's sliding window is reported, not silently ignored."""
    assert layout.student_config_from_teacher(tiny_cfg("qwen2"), [0], [], kv_rank=32).attention_bias
    layout.student_config_from_teacher(tiny_cfg("mistral", sliding_window=16, max_position_embeddings=64), [0], [],
                                       kv_rank=32)
    assert "sliding-window" in capsys.readouterr().err


def test_default_geometry():
    """Defaults: rope dim min(32, d_h/2), nope = d_h - rope, no query compression."""
    z = layout.student_config_from_teacher(tiny_cfg(), [0], [], kv_rank=64)
    assert (z.qk_rope_head_dim, z.qk_nope_head_dim, z.q_lora_rank, z.head_dim) == (8, 8, None, 16)
