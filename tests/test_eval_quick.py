"""QuickMC (zebra/eval/quick.py) against lm-eval itself: on the embedded teacher (fp32, CPU) every request's
loglikelihood equals what lm-eval's HFLM computed for it inside `zebra eval`'s run_tasks, and acc / acc_norm
equal lm-eval's per task; the model comes back in the mode it was given in."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from zebra.errors import ZebraError  # noqa: E402
from zebra.eval import lm_eval_tasks as LT  # noqa: E402
from zebra.eval.quick import QuickMC  # noqa: E402

TASKS = ("arc_easy", "piqa")
LIMIT = 10


@pytest.fixture(scope="module")
def lm_eval_run(teacher_model, teacher_tokenizer, olmo_datasets_dir):
    """What `zebra eval` reports (run_tasks through HFLM), with lm-eval's per-sample responses."""
    lm = LT.make_hflm(teacher_model, teacher_tokenizer, batch_size=16)
    return LT.run_tasks(lm, LT.build_tasks(list(TASKS), olmo_datasets_dir), limit=LIMIT, log_samples=True,
                        bootstrap_iters=0)


def test_matches_lm_eval(lm_eval_run, teacher_model, teacher_tokenizer, olmo_datasets_dir):
    quick = QuickMC.build(teacher_tokenizer, tasks=TASKS, limit=LIMIT, data_root=olmo_datasets_dir)
    assert len({(r.task, r.doc) for r in quick.requests}) == LIMIT * len(TASKS)
    teacher_model.train()
    lls = quick.loglikelihoods(teacher_model, batch_size=16)
    assert teacher_model.training  # handed back as it came (eval mode only inside the call)
    teacher_model.eval()

    # lm-eval's loglikelihood of each (doc, choice), from the samples it logged
    ref = {(name, s["doc_id"], c): resp[0][0]
           for name in TASKS for s in lm_eval_run["_raw"]["samples"][name] for c, resp in enumerate(s["resps"])}
    assert len(ref) == len(quick.requests)
    ours = np.array([lls[i] for i, r in enumerate(quick.requests)])
    theirs = np.array([ref[(r.task, r.doc, r.choice)] for r in quick.requests])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

    scores = quick.metrics(lls)
    for name in TASKS:
        assert scores[name]["acc"] == lm_eval_run[name]["acc"], name
        assert scores[name]["acc_norm"] == lm_eval_run[name]["acc_norm"], name
    assert scores["avg_acc_norm"] == pytest.approx(np.mean([lm_eval_run[n]["acc_norm"] for n in TASKS]))


def test_rejects_what_it_cannot_mirror(teacher_tokenizer, olmo_datasets_dir):
    """A group (MMLU) has no single request list: a clear error rather than a wrong number."""
    with pytest.raises(ZebraError, match="group"):
        QuickMC.build(teacher_tokenizer, tasks=("mmlu",), limit=1, data_root=olmo_datasets_dir)
