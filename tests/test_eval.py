"""lm-eval on the offline data: every task's loader maps the offline dataset so that an oracle LM (gold
continuation most likely) scores 100% and a uniform LM scores exactly the fraction of documents whose gold is
the first choice (lm-eval's argmax tie-break); table arithmetic; clear errors; one end-to-end CLI run."""

import json

import pytest

pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402

from zebra.cli import main  # noqa: E402
from zebra.errors import ZebraError  # noqa: E402
from zebra.eval import lm_eval_tasks as LT  # noqa: E402
from zebra.eval.table import average, markdown_table, percent_of, summarize  # noqa: E402

ALL = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq", "mmlu"]
LIMIT = 6


def gold_index(task, doc) -> int:
    """The gold choice index as lm-eval's own multiple-choice scoring defines it."""
    if task.multiple_input:  # winogrande: the choices are contexts, doc_to_text gives the gold index
        return int(task.doc_to_text(doc))
    g = task.doc_to_target(doc)
    return task.doc_to_choice(doc).index(g) if isinstance(g, str) else int(g)


class ScriptedLM(LM):
    """loglikelihood from a rule: 'oracle' (0 for the gold choice, -10 otherwise) or 'uniform' (all -1)."""

    def __init__(self, tasks, mode):
        super().__init__()
        self.by_name = {t.task_name: t for obj in tasks.values() for t in LT.leaf_tasks(obj)}
        self.mode = mode

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            if self.mode == "uniform":
                out.append((-1.0, False))
            else:
                task = self.by_name[r.task_name]
                out.append((0.0 if r.idx == gold_index(task, r.doc) else -10.0, r.idx == gold_index(task, r.doc)))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


@pytest.fixture(scope="module")
def tasks(olmo_datasets_dir):
    return LT.build_tasks(ALL, data_root=olmo_datasets_dir)


def test_oracle_scores_100_on_every_task(tasks):
    """A model that prefers the gold answer gets acc = acc_norm = 100% on every task (incl. all MMLU subjects)."""
    res = LT.run_tasks(ScriptedLM(tasks, "oracle"), tasks, limit=LIMIT, bootstrap_iters=0)
    for name in ALL:
        assert res[name]["acc"] == pytest.approx(1.0), name
        assert res[name]["n"] >= LIMIT, name
        if res[name]["acc_norm"] is not None:
            assert res[name]["acc_norm"] == pytest.approx(1.0), name
    assert len(res["mmlu"]["subtasks"]) == 57


def test_uniform_model_scores_first_choice_rate(tasks):
    """With all choices tied, lm-eval picks the first: acc == the share of documents whose gold index is 0,
    computed independently from the same documents."""
    res = LT.run_tasks(ScriptedLM(tasks, "uniform"), tasks, limit=LIMIT, bootstrap_iters=0)
    for name in ["arc_easy", "hellaswag", "piqa", "winogrande", "boolq"]:
        task = tasks[name]
        docs = list(task.eval_docs)[:LIMIT]
        expected = sum(gold_index(task, d) == 0 for d in docs) / len(docs)
        assert res[name]["acc"] == pytest.approx(expected), name


def test_table_arithmetic():
    """Average, % of the reference model and KV % from hand-written scores."""
    models = [{"model": "teacher", "kv_percent": 100.0, "results": {"arc_easy": {"score": 0.5}, "piqa": {"score": 0.7}}},
              {"model": "student", "kv_percent": 5.0, "results": {"arc_easy": {"score": 0.42}, "piqa": {"score": 0.75}}}]
    rows = summarize(models, ["arc_easy", "piqa"], reference=0)
    assert average([50.0, None]) is None  # an average over a different task set would mislead
    assert rows[0]["average"] == pytest.approx(60.0) and rows[0]["percent_of_reference"] == pytest.approx(100.0)
    assert rows[1]["average"] == pytest.approx(58.5) and rows[1]["percent_of_reference"] == pytest.approx(97.5)
    assert percent_of(58.5, 0) is None
    md = markdown_table(rows, ["arc_easy", "piqa"])
    assert "student" in md and "5.00" in md


def test_per_task_percent_of_the_teacher_and_the_dev_average():
    """Per task % of the teacher, and the dev average over the tasks where the teacher is above chance: WinoGrande
    at 50.5 +- 1.4 (chance 50) is left out, ARC-E (chance 25) and PIQA (chance 50) stay. Hand-computed values."""
    tasks = ["arc_easy", "piqa", "winogrande"]
    models = [{"model": "teacher", "results": {"arc_easy": {"score": 0.5, "score_stderr": 0.02},
                                               "piqa": {"score": 0.7}, "winogrande": {"score": 0.505, "score_stderr": 0.014}}},
              {"model": "student", "results": {"arc_easy": {"score": 0.42}, "piqa": {"score": 0.75},
                                               "winogrande": {"score": 0.52}}}]
    rows = summarize(models, tasks, reference=0)
    s = rows[1]
    assert s["scores"] == pytest.approx({"arc_easy": 42.0, "piqa": 75.0, "winogrande": 52.0})
    assert s["task_percent_of_reference"] == pytest.approx({"arc_easy": 84.0, "piqa": 75 / 0.7, "winogrande": 5200 / 50.5})
    assert s["dev_tasks"] == ["arc_easy", "piqa"]
    assert s["dev_percent_of_reference"] == pytest.approx(100 * 58.5 / 60.0)
    assert s["percent_of_reference"] == pytest.approx(100 * 169 / 170.5)
    md = markdown_table(rows, tasks)
    assert "| student | 84.0 | 107.1 | 103.0 | 97.5 |" in md and "dev avg (ARC-E, PIQA)" in md
    # a teacher at chance everywhere: no dev tasks, no dev average
    flat = summarize([{"model": "t", "results": {"piqa": {"score": 0.51}}},
                      {"model": "s", "results": {"piqa": {"score": 0.5}}}], ["piqa"])
    assert flat[1]["dev_tasks"] == [] and flat[1]["dev_percent_of_reference"] is None


def test_clear_errors(tmp_path, capsys):
    """Unknown task, missing data, a model that cannot load: exit 2 with a message naming the problem."""
    with pytest.raises(ZebraError, match="nope"):
        LT.parse_tasks("arc_easy,nope")
    with pytest.raises(ZebraError, match="does not exist"):
        LT.build_tasks(["arc_easy"], data_root=tmp_path / "missing")
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "arc_easy", "--limit", "2"]) == 2
    assert "no-model" in capsys.readouterr().err


def test_cli_end_to_end_on_a_tiny_student(tmp_path, teacher_tokenizer):
    """`zebra eval` on a tiny random Zebra student: runs lm-eval offline, writes the JSON with metrics, stderr,
    sample counts, KV % and the lm-eval version."""
    import torch

    from zebra import ZebraConfig, ZebraForCausalLM

    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=len(teacher_tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, mixer_types=["mla", "mamba2"], kv_lora_rank=8,
                      qk_rope_head_dim=4, eos_token_id=teacher_tokenizer.eos_token_id)
    ZebraForCausalLM(cfg).save_pretrained(tmp_path / "m")
    teacher_tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "arc_easy", "--limit", "5", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    text = json.dumps(data)
    for key in ("acc_norm", "stderr", "lm_eval", "kv_percent"):
        assert key in text, key


def test_partition_balances_by_requests():
    """The largest task goes alone, the small ones share the other workers; order within a worker is kept."""
    from zebra.eval.harness import partition

    counts = {"arc_easy": 2280, "mmlu": 56168, "piqa": 3676, "hellaswag": 40168, "winogrande": 2534}
    parts = partition(counts, 3)
    assert parts[0] == ["mmlu"] and parts[1] == ["hellaswag"] and sorted(parts[2]) == ["arc_easy", "piqa", "winogrande"]
    assert partition(counts, 8) == [["mmlu"], ["hellaswag"], ["piqa"], ["winogrande"], ["arc_easy"]]
    assert partition({"arc_easy": 1}, 4) == [["arc_easy"]]


def test_jobs_2_gives_the_numbers_of_jobs_1(tmp_path, teacher_dir, capsys):
    """`zebra eval --jobs 2` (two spawned workers, one task each, each loading the teacher) reports exactly what
    one process does: same metrics, stderr, n, table."""
    runs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}.json"
        assert main(["eval", "--model", str(teacher_dir), "--tasks", "arc_easy,piqa", "--limit", "4", "--jobs", jobs,
                     "--device", "cpu", "--json", str(out)]) == 0
        runs[jobs] = json.loads(out.read_text())
    assert "2 worker processes per model: arc_easy | piqa" in capsys.readouterr().err
    one, two = runs["1"], runs["2"]
    assert one["format"] == two["format"] == "zebra-eval/1" and list(one) == list(two)
    for key in ("results", "kv_percent", "params", "versions", "n_shot", "batch_sizes", "average"):
        assert one["models"][0][key] == two["models"][0][key], key
    assert one["table_markdown"] == two["table_markdown"] and one["stderr_markdown"] == two["stderr_markdown"]


def test_worker_error_names_the_task(tmp_path, teacher_dir, olmo_datasets_dir):
    """A failure inside a worker comes back as a ZebraError naming the model and the task (here: ARC-E's data is
    missing), without waiting for the other worker (PIQA, whose data is there)."""
    from zebra.eval.harness import evaluate_models

    (tmp_path / "piqa").symlink_to(olmo_datasets_dir / "piqa")
    with pytest.raises(ZebraError, match=r"evaluating arc_easy failed in a worker process: no offline data for arc_easy"):
        evaluate_models([str(teacher_dir)], ["arc_easy", "piqa"], limit=50, device="cpu", jobs=2, data_dir=tmp_path)



def test_integer_options_name_the_flag():
    """--batch-size / --jobs / --num-fewshot: one parser, a clear error naming the flag."""
    from zebra.eval.harness import _batch_size, _jobs
    from zebra.eval.lm_eval_tasks import fewshot_for

    import torch

    cpu = torch.device("cpu")
    assert _batch_size("16", cpu) == 16 and _batch_size("auto", cpu) == "auto"
    with pytest.raises(ZebraError, match=r"--batch-size must be an integer or 'auto'"):
        _batch_size("big", cpu)
    with pytest.raises(ZebraError, match="--jobs must be >= 1"):
        _jobs("0", cpu, 3)
    assert _jobs("9", cpu, 3) == 3
    assert fewshot_for(["arc_easy"], "5") == {"arc_easy": 5}
    with pytest.raises(ZebraError, match="--num-fewshot must be >= 0"):
        fewshot_for(["arc_easy"], "-1")
