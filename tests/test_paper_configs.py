"""configs/paper/: the paper's five recipes (SPEC 9) load as checked run configs, with the paper's layers, ranks and
budgets, and give the paper's KV-cache sizes on the shipped shapes of their base models."""

import pytest

from zebra.convert.build import build_student_config
from zebra.convert.teacher import load_teacher_config
from zebra.runconfig import load_config

PAPER = {  # config -> (shipped shape, KV % in SPEC 9, KD tokens, global KD batch in sequences on 8 GPUs)
    "llama-3.2-1b-8mla8m2": ("llama-3.2-1b", 7.81, 5.4e9, 192),
    "llama-3.2-1b-4mla12m2": ("llama-3.2-1b", 3.91, 5.4e9, 192),
    "llama-3.2-3b-8mla20m2": ("llama-3.2-3b", 2.68, 7.4e9, 96),
    "llama-3.2-3b-6mla22m2": ("llama-3.2-3b", 2.01, 7.4e9, 96),
    "llama-3.1-8b-8mla24m2": ("llama-3.1-8b", 2.73, 9.4e9, 64),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config(name):
    shape, kv, kd_tokens, kd_batch = PAPER[name]
    cfg = load_config(f"configs/{'paper'}/{name}.yaml")
    s = cfg["student"]
    _, zc = build_student_config(shape, s["mla_layers"], None, s["kv_rank"], s["q_rank"], s["rope_dim"], s["nope_dim"],
                                 teacher_cfg=load_teacher_config(shape))
    assert zc.kv_summary()["kv_percent"] == pytest.approx(kv, abs=0.005)
    assert cfg["distill"]["tokens"] == kd_tokens and cfg["ild"]["tokens"] == 1_360_000_000
    assert cfg["distill"]["batch_size"] * cfg["distill"]["grad_accum"] * 8 == kd_batch
    assert cfg["distill"]["betas"] == [0.9, 0.8] and cfg["distill"]["schedule"] == "cosine"
    assert cfg["base"].startswith("models/") and cfg["teacher"] == "models/Llama-3.1-8B-Instruct"
