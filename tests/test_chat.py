"""`zebra chat` on a tiny random hybrid: streams a reply per turn, keeps the history across turns (the second
prompt contains the first exchange), /reset forgets it, /exit ends with code 0."""

import io

import pytest
import torch

from zebra import ZebraConfig, ZebraForCausalLM
from zebra.cli import main


def test_chat_turns_history_and_reset(tmp_path, teacher_tokenizer, monkeypatch, capsys):
    tok = teacher_tokenizer
    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, mixer_types=["mla", "mamba2"], kv_lora_rank=8,
                      qk_rope_head_dim=4, eos_token_id=tok.eos_token_id)
    ZebraForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    prompts = []
    real_apply = type(tok).apply_chat_template

    def spy(self, conversation, *a, **kw):
        prompts.append([m["content"] for m in conversation])
        return real_apply(self, conversation, *a, **kw)

    monkeypatch.setattr(type(tok), "apply_chat_template", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nsecond turn\n/reset\nthird\n/exit\n"))
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--temperature", "0",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    turns = [p for p in prompts if p and p[-1] in ("hello there", "second turn", "third")]
    assert [p[-1] for p in turns] == ["hello there", "second turn", "third"]
    assert turns[1][0] == "hello there" and len(turns[1]) == 3  # user, assistant, user
    assert turns[2] == ["third"]  # after /reset
    assert "conversation reset" in capsys.readouterr().out


def test_generate_and_chat_fast_path_equal_the_reference(tmp_path, teacher_tokenizer, monkeypatch, capsys):
    """`--fast on` (static engine, CPU: reference ops, no graph) prints what `--fast off` prints, greedy."""
    tok = teacher_tokenizer
    torch.manual_seed(1)
    cfg = ZebraConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, mixer_types=["mla", "mamba2", "attention"],
                      kv_lora_rank=8, qk_rope_head_dim=4, eos_token_id=tok.eos_token_id)
    ZebraForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    outs = {}
    for fast in ("off", "on"):
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi there", "--max-new-tokens", "12",
                     "--device", "cpu", "--dtype", "float32", "--fast", fast]) == 0
        outs[fast] = capsys.readouterr().out.splitlines()[0]
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
        assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "6", "--temperature", "0",
                     "--device", "cpu", "--dtype", "float32", "--fast", fast]) == 0
        outs["chat-" + fast] = capsys.readouterr().out
    assert outs["on"] == outs["off"] and outs["on"].strip()
    assert outs["chat-on"] == outs["chat-off"]


def test_generate_refuses_bad_options_before_loading(capsys, monkeypatch):
    """`zebra generate` with an impossible length, a negative temperature or an unknown device: exit 2 and a message
    naming the option, before any model is loaded."""
    from zebra import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for extra, msg in ((["--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
                       (["--temperature", "-1"], "--temperature must be >= 0"),
                       (["--device", "tpu"], "--device 'tpu'")):
        assert main(["generate", "--model", "m", "--prompt", "hi", *extra]) == 2
        assert msg in capsys.readouterr().err
    assert main(["make-pairs", "--model", "m", "--num-pairs", "0", "--out", "p.jsonl"]) == 2
    assert "--num-pairs must be at least 1" in capsys.readouterr().err
