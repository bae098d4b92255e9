"""Checkpoints that stand alone (zebra/model/bundle.py): a saved student carries its modeling code, so
transformers loads it with trust_remote_code where zebra is not importable, with the same logits and the same
generated tokens; and lm-eval's HF model class (what `lm_eval --model hf` uses) scores it like `zebra eval`."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_model import tiny_model
from zebra.convert.build import save_model

PROBE = textwrap.dedent('''
    import json, sys, torch

    class Block:  # zebra is not installed, as far as this process can tell
        def find_spec(self, name, path=None, target=None):
            if name == "zebra" or name.startswith("zebra."):
                raise ImportError("zebra is blocked here: " + name)

    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    torch.save({"logits": logits, "generated": gen, "module": type(model).__module__,
                "zebra_loaded": any(m == "zebra" or m.startswith("zebra.") for m in sys.modules)}, sys.argv[3])
''')


def test_saved_student_loads_and_generates_without_zebra(tmp_path):
    model = tiny_model(["mla", "mamba2", "attention", "mamba2"], mamba_z_bias=True,
                       mla_rope_pairs={"0": [0, 2, 5, 7]})
    save_model(model, None, tmp_path / "student", {})
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_zebra.ZebraForCausalLM"
    src = (tmp_path / "student" / "modeling_zebra.py").read_text()
    imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", src, re.M)
    assert not [m for m in imports if m == "zebra" or m.startswith("zebra.")]
    assert [m for m in imports if m.startswith(".")] == [".configuration_zebra"]
    ids = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    r = subprocess.run([sys.executable, str(probe), str(tmp_path / "student"), json.dumps(ids), str(tmp_path / "o.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "o.pt")
    assert got["module"].startswith("transformers_modules") and not got["zebra_loaded"]
    t = torch.tensor(ids)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(t).logits, atol=1e-5, rtol=1e-5)
        ref = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got["generated"], ref)


LM_EVAL_PROBE = textwrap.dedent('''
    import json, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "zebra" or name.startswith("zebra."):
                raise ImportError("zebra is blocked here: " + name)

    sys.meta_path.insert(0, Block())
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=sys.argv[1], trust_remote_code=True, batch_size=2, device="cpu")
    reqs = [Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(json.loads(sys.argv[2]))]
    print(json.dumps({"module": type(lm.model).__module__, "ll": [ll for ll, _ in lm.loglikelihood(reqs)]}))
''')


def test_lm_eval_hf_loader_scores_like_zebra_eval(tmp_path, teacher_tokenizer):
    """HFLM(pretrained=DIR, trust_remote_code=True) -- what `lm_eval --model hf --model_args
    pretrained=DIR,trust_remote_code=True` builds -- in a process without zebra runs the bundled code and gives
    the log-likelihoods that zebra eval's wrapper gives on the package's own class."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from zebra.eval.lm_eval_tasks import make_hflm

    tok = teacher_tokenizer
    model = tiny_model(["mla", "mamba2"], vocab_size=len(tok), mamba_z_bias=True)
    save_model(model, tok, tmp_path / "student", {})
    pairs = [["The capital of France is", " Paris"], ["Two plus two is", " four"], ["A zebra has", " stripes"]]
    probe = tmp_path / "probe.py"
    probe.write_text(LM_EVAL_PROBE)
    r = subprocess.run([sys.executable, str(probe), str(tmp_path / "student"), json.dumps(pairs)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules")
    ours = make_hflm(model, tok, batch_size=2)
    want = [ll for ll, _ in ours.loglikelihood([Instance("loglikelihood", {}, tuple(p), i) for i, p in enumerate(pairs)])]
    assert got["ll"] == pytest.approx(want, abs=1e-4)


def test_readme_python_example_runs_on_the_cpu(tmp_path, teacher_tokenizer, monkeypatch):
    """The README's Python section as a user copies it (its CPU lines: load, chat template, generate, the cache driven
    by hand) runs against a saved student under the installed transformers: an upgrade that changes what
    apply_chat_template returns breaks this test, not the user."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.S).group(1).splitlines()
    gpu = next(i for i, line in enumerate(block) if line.startswith("# On a GPU"))
    by_hand = next(i for i, line in enumerate(block) if "from zebra.model.cache import" in line)
    code = "\n".join(block[:gpu] + block[by_hand:])
    tok = teacher_tokenizer
    save_model(tiny_model(["mla", "mamba2"], vocab_size=len(tok)), tok, tmp_path / "student", {})
    monkeypatch.chdir(tmp_path)
    env = {}
    exec(compile(code.replace('"student"', repr(str(tmp_path / "student"))), "README.md", "exec"), env)
    assert env["logits"].shape[:2] == (1, 1) and env["ids"].dim() == 2
