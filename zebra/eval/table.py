"""The results table of `zebra eval`: one row per model, one column per task (its default metric, in %),
the average, % of a reference model (the teacher) and KV %, plus teacher-agreement columns when measured.

Pure arithmetic on plain dicts (no torch, no lm-eval), so the report and the tests can use it directly:

    from zebra.eval.table import summarize, markdown_table
    rows = summarize(models, tasks=["arc_easy", "piqa"], reference=0)
    print(markdown_table(rows, tasks=["arc_easy", "piqa"]))

A model dict is {"model": str, "kv_percent": float, "results": {task: {"score": fraction in [0, 1], ...}},
optionally "agreement": {"kl", "top1_agreement", "ppl_student"}}; summarize() returns copies with
"average" (mean of the task scores, in %) and "percent_of_reference" added.
"""

from __future__ import annotations

import math

# Column headers for the known tasks (lm_eval_tasks.TASKS has the same labels; kept here so that this
# module needs nothing else).
LABELS = {
    "arc_challenge": "ARC-C", "arc_easy": "ARC-E", "hellaswag": "HellaSwag", "mmlu": "MMLU",
    "openbookqa": "OBQA", "piqa": "PIQA", "winogrande": "WinoGrande", "boolq": "BoolQ",
}


def task_score(model: dict, task: str) -> float | None:
    """A task's default-metric score in % (None when the model has no result for it)."""
    r = model.get("results", {}).get(task)
    if not r or r.get("score") is None:
        return None
    return 100.0 * float(r["score"])


def average(scores: list[float | None]) -> float | None:
    """Mean of the given scores; None if any is missing (an average over different task sets misleads)."""
    if not scores or any(s is None for s in scores):
        return None
    return sum(scores) / len(scores)


def percent_of(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0 or math.isnan(reference):
        return None
    return 100.0 * value / reference


# Chance accuracy (%) of each task's default metric: 1 / number of choices (BoolQ: yes / no).
CHANCE = {
    "arc_challenge": 25.0, "arc_easy": 25.0, "hellaswag": 25.0, "mmlu": 25.0, "openbookqa": 25.0,
    "piqa": 50.0, "winogrande": 50.0, "boolq": 50.0,
}


def above_chance(reference: dict, tasks: list[str], margin: float = 3.0) -> list[str]:
    """The tasks on which the reference model scores clearly above chance: by more than two standard errors of its
    score when lm-eval gave one, else by `margin` points. A small teacher is at chance on some tasks (SmolLM2-135M:
    WinoGrande, MMLU); there "% of the teacher" measures noise, so the dev average leaves them out."""
    out = []
    for t in tasks:
        s, chance = task_score(reference, t), CHANCE.get(t)
        if s is None or chance is None:
            continue
        se = (reference.get("results", {}).get(t) or {}).get("score_stderr")
        if s - chance > (2 * 100.0 * float(se) if se is not None else margin):
            out.append(t)
    return out


def summarize(models: list[dict], tasks: list[str], reference: int = 0) -> list[dict]:
    """Rows with "scores" (task -> %), "average" and "percent_of_reference" (against models[reference]) filled in,
    and per task "task_percent_of_reference"; "dev_tasks" are the tasks where the reference is above chance
    (above_chance) and "dev_percent_of_reference" the row's average over them as % of the reference's."""
    if not models:
        return []
    if not 0 <= reference < len(models):
        raise IndexError(f"reference {reference} out of range for {len(models)} models")
    rows = []
    for m in models:
        row = dict(m)
        row["scores"] = {t: task_score(m, t) for t in tasks}
        row["average"] = average(list(row["scores"].values()))
        rows.append(row)
    ref = rows[reference]
    dev = above_chance(ref, tasks)
    for i, row in enumerate(rows):
        row["percent_of_reference"] = percent_of(row["average"], ref["average"])
        row["task_percent_of_reference"] = {t: percent_of(row["scores"][t], ref["scores"][t]) for t in tasks}
        row["dev_tasks"] = dev
        row["dev_percent_of_reference"] = percent_of(average([row["scores"][t] for t in dev]),
                                                     average([ref["scores"][t] for t in dev])) if dev else None
        row["is_reference"] = i == reference
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: list[dict], tasks: list[str], agreement: bool | None = None,
                   reference_name: str = "teacher") -> str:
    """Markdown: model | tasks... | avg | % of <reference_name> | KV % [| KL | top-1 | ppl]."""
    if agreement is None:
        agreement = any(r.get("agreement") for r in rows)
    head = ["model"] + [LABELS.get(t, t) for t in tasks] + ["avg", f"% of {reference_name}", "KV %"]
    if agreement:
        head += ["KL(teacher‖model)", "top-1 agree", "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = str(r.get("model", "?")) + (" (ref)" if r.get("is_reference") else "")
        cells = [name] + [_fmt(task_score(r, t)) for t in tasks]
        cells += [_fmt(r.get("average")), _fmt(r.get("percent_of_reference")), _fmt(r.get("kv_percent"))]
        if agreement:
            a = r.get("agreement") or {}
            cells += [_fmt(a.get("kl"), 4), _fmt(a.get("top1_agreement"), 3), _fmt(a.get("ppl_student"))]
        lines.append("| " + " | ".join(cells) + " |")
    relative = percent_table(rows, tasks, reference_name)
    return "\n".join(lines) + ("\n\n" + relative if relative else "")


def percent_table(rows: list[dict], tasks: list[str], reference_name: str = "teacher") -> str:
    """Markdown: each non-reference model's score per task as % of the reference's, and its average over the tasks
    where the reference is above chance ("dev avg"), when summarize() filled those in; "" otherwise."""
    others = [r for r in rows if not r.get("is_reference") and "task_percent_of_reference" in r]
    if not others:
        return ""
    dev = others[0].get("dev_tasks") or []
    dev_names = ", ".join(LABELS.get(t, t) for t in dev) or "none"
    head = ["% of " + reference_name] + [LABELS.get(t, t) for t in tasks] + [f"dev avg ({dev_names})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in others:
        cells = [str(r.get("model", "?"))] + [_fmt(r["task_percent_of_reference"].get(t), 1) for t in tasks]
        lines.append("| " + " | ".join(cells + [_fmt(r.get("dev_percent_of_reference"), 1)]) + " |")
    return "\n".join(lines)


def stderr_table(rows: list[dict], tasks: list[str]) -> str:
    """Markdown: each task's score ± standard error (in %) and its sample count, per model."""
    head = ["model"] + [LABELS.get(t, t) for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(tasks)) + "|"]
    for r in rows:
        cells = [str(r.get("model", "?"))]
        for t in tasks:
            res = r.get("results", {}).get(t)
            if not res or res.get("score") is None:
                cells.append("-")
                continue
            se = res.get("score_stderr")
            cells.append(f"{100 * res['score']:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")
                         + f" (n={res.get('n', '?')})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
