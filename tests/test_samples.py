"""Teacher-sampled training data (zebra.data.samples, source type "teacher_samples"): the teacher's greedy answers
equal transformers' own generate on the same chat prompts, are cached (a second load generates nothing), become
chat conversations for training, and bad specs fail with the key's name before any model is loaded."""

import json

import pytest
import torch

from zebra.data.sources import load_conversations, normalize_spec, source_fingerprint
from zebra.errors import ZebraError


def write_prompts(path):
    convs = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "I start the conversation."}],           # no user turn first: skipped
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],  # duplicate
        [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
        [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour."}],
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def test_bad_specs_name_the_key():
    base = {"type": "teacher_samples", "teacher": "t", "prompts": "sharegpt"}
    with pytest.raises(ZebraError, match="needs 'teacher'"):
        normalize_spec({"type": "teacher_samples"})
    for key, bad in (("num", 0), ("max_new_tokens", -1), ("batch_size", 1.5), ("temperature", -0.1), ("seed", "x")):
        with pytest.raises(ZebraError, match=key):
            normalize_spec({**base, key: bad})
    with pytest.raises(ZebraError, match="unknown option"):
        normalize_spec({**base, "top_q": 1})
    with pytest.raises(ZebraError, match="cannot itself"):
        normalize_spec({**base, "prompts": {"type": "teacher_samples", "teacher": "t"}})
    # defaults are filled in: an explicit default fingerprints like an omitted one
    assert normalize_spec({**base, "num": 2000}) == normalize_spec(base)


def test_run_config_gives_the_runs_teacher(tmp_path):
    from zebra.runconfig import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nbase: smollm2-135m-instruct\ndata: [{type: teacher_samples, num: 8}]\n")
    assert load_config(cfg)["data"][0]["teacher"] == "smollm2-135m-instruct"
    cfg.write_text("name: x\nbase: smollm2-135m-instruct\ndata: [{type: teacher_samples, num: 0}]\n")
    with pytest.raises(ZebraError, match="'num' must be a positive integer"):  # at load, before any stage runs
        load_config(cfg)


def test_greedy_samples_equal_transformers_generate_and_are_cached(tmp_path, tmp_zebra_cache, teacher_dir,
                                                                  teacher_model, teacher_tokenizer, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    spec = {"type": "teacher_samples", "teacher": str(teacher_dir), "prompts": f"jsonl:{prompts}", "num": 3,
            "max_new_tokens": 6, "batch_size": 2, "temperature": 0}
    fp = source_fingerprint(spec)
    convs = list(load_conversations(spec))
    assert [c[0]["content"] for c in convs] == ["Name a colour.", "What is two plus two?", "Say hello in French."]
    tok = teacher_tokenizer
    for conv in convs:
        assert [m["role"] for m in conv] == ["user", "assistant"]
        text = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ref = teacher_model.generate(**enc, do_sample=False, max_new_tokens=6,
                                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
        assert conv[1]["content"] == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    files = list((tmp_zebra_cache / "samples").glob("*.jsonl"))
    assert len(files) == 1 and not list((tmp_zebra_cache / "samples").glob("*.tmp*"))

    import zebra.convert.build as build

    monkeypatch.setattr(build, "build_student", lambda *a, **k: pytest.fail("cached samples were generated again"))
    assert list(load_conversations(spec)) == convs
    assert source_fingerprint(spec) == fp
    assert source_fingerprint({**spec, "num": 2}) != fp  # another spec, other samples


def test_continue_style_extends_plain_prefixes_with_the_teachers_greedy_text(tmp_path, tmp_zebra_cache, teacher_dir,
                                                                          teacher_model, teacher_tokenizer):
    tok = teacher_tokenizer
    long_text = ("The river rose slowly through the night, and by morning the old bridge was under water. "
                 "People gathered on the hill to watch the current carry branches past the mill.")
    docs = [{"text": long_text},
            {"text": "Too short."},                                              # under 2 x prefix: skipped
            {"messages": [{"role": "user", "content": "Tell me about the moon and the tides of the sea."},
                          {"role": "assistant", "content": "The moon pulls on the oceans, raising two bulges of "
                                                           "water that the earth turns under every day."}]}]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"type": "teacher_samples", "teacher": str(teacher_dir), "prompts": f"jsonl:{src}", "num": 5,
            "max_new_tokens": 5, "batch_size": 2, "temperature": 0, "style": "continue", "prefix_tokens": 8}
    out = list(load_conversations(spec))
    assert len(out) == 2 and all(isinstance(d, str) for d in out)  # plain documents, not chats
    plain = [long_text, "Tell me about the moon and the tides of the sea.\n\nThe moon pulls on the oceans, raising "
                        "two bulges of water that the earth turns under every day."]
    for doc, text in zip(out, plain):
        prefix = tok(text, add_special_tokens=True)["input_ids"][:8]
        ids = torch.tensor([prefix])
        with torch.no_grad():
            ref = teacher_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=5, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        assert doc == tok.decode(ref[0], skip_special_tokens=True)
        assert doc.startswith(tok.decode(prefix, skip_special_tokens=True)[:20])
    # the style is part of the cache key: the answer style of the same source is another file
    from zebra.data.samples import samples_path

    assert samples_path(spec) != samples_path({**spec, "style": "answer"})
    with pytest.raises(ZebraError, match="'style'"):
        normalize_spec({**spec, "style": "poem"})
    with pytest.raises(ZebraError, match="prefix_tokens"):
        normalize_spec({**spec, "prefix_tokens": 0})
