"""report.md + PNG plots from whatever results a folder holds (`zebra report RUN_DIR`; the pipeline's report stage).

    zebra report runs/demo                 # writes runs/demo/report.md and runs/demo/plots/*.png
    zebra report runs/demo --out /tmp/rep  # somewhere else

Looks (recursively) for
    sensitivity.json   {"scores": [per layer], "kl_all_mamba2", "kl_with_mla", "num_tokens"}  -> Fig. 3 bar plot,
                       the MLA layers of the nearest smart.json ({"layers": [...]}) marked
    zebra eval --json  files (they start with "format": "zebra-eval/1")  -> their tables + Fig. 1
                       (average accuracy vs KV cache size, every evaluated model of every file)
    agreement JSON     `zebra agreement --json` output ({"teacher", "results": [{"kl", ...}]})  -> a table
    bench*.json        `zebra bench` output, or {"results": [{"variant", "gen_len", "tokens_per_s", ...}]}
                       -> Fig. 4 throughput curves
and skips any of them that is absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import ZebraError

EVAL_FORMAT = "zebra-eval/"


def _say(msg: str) -> None:
    print(f"zebra report: {msg}", file=sys.stderr, flush=True)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _say(f"skipping {path}: {e}")
        return None


def _head(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


def _walk(root: Path, skip: Path | None):
    """*.json files under root (not under `skip`, the report's own output), sorted, following no links."""
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(x for x in dirnames if not x.startswith(".") and (skip is None or d / x != skip))
        for f in sorted(filenames):
            if f.endswith(".json"):
                yield d / f


def find_results(root: Path, skip: Path | None = None) -> dict:
    """{"sensitivity": [(path, data)], "smart": [...], "eval": [...], "agreement": [...], "bench": [...]}"""
    found = {"sensitivity": [], "smart": [], "eval": [], "agreement": [], "bench": []}
    for path in _walk(root, skip):
        name = path.name
        if name == "sensitivity.json":
            kind = "sensitivity"
        elif name == "smart.json":
            kind = "smart"
        elif name.startswith("bench"):
            kind = "bench"
        elif EVAL_FORMAT in _head(path, 256):
            kind = "eval"
        elif name in ("config.json", "generation_config.json", "summary.json", "run_config.json", "run_start.json",
                      "curve.json", "stages.json", "zebra_convert.json") or name.startswith("tokenizer"):
            continue
        elif '"teacher"' in _head(path) and '"kl"' in _head(path, 1 << 16):
            kind = "agreement"
        else:
            continue
        data = _load(path)
        if data is None:
            continue
        if kind == "bench" and isinstance(data, dict) and data.get("format") == "zebra-bench/1":
            data = {"results": [  # `zebra bench` output: its batch-1 decode points are the Fig. 4 curves
                {"variant": f"{p['shape']}/{p['variant']}", "gen_len": p["length"], "tokens_per_s": p["tokens_per_s"]}
                for p in data.get("points", []) if p.get("kind") == "decode" and p.get("status") == "ok"]}
        ok = {
            "sensitivity": isinstance(data, dict) and isinstance(data.get("scores"), list),
            "smart": isinstance(data, dict) and isinstance(data.get("layers"), list),
            "bench": isinstance(data, dict) and isinstance(data.get("results"), list),
            "eval": isinstance(data, dict) and isinstance(data.get("models"), list),
            "agreement": isinstance(data, dict) and isinstance(data.get("results"), list),
        }[kind]
        if ok:
            found[kind].append((path, data))
        else:
            _say(f"skipping {path}: not the expected {kind} format")
    return found


def _nearest(path: Path, candidates: list[tuple[Path, dict]]):
    """The candidate sharing the longest folder prefix with `path` (ties: the first)."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: len(os.path.commonpath([str(path.parent), str(c[0].parent)])))


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _relink(md: str, root: Path, out: Path) -> str:
    """Markdown written for `root` with its relative image links pointing at the same files from `out`."""
    import os
    import re

    if out.resolve() == root.resolve():
        return md

    def fix(m):
        target = m.group(2)
        if re.match(r"^[a-z]+:|^/", target):
            return m.group(0)
        return f"![{m.group(1)}]({Path(os.path.relpath(root.resolve() / target, out.resolve())).as_posix()})"
    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", fix, md)


def write_report(run_dir: str | Path, out: str | Path | None = None, head: str | None = None) -> Path:
    """Write OUT/report.md and OUT/plots/*.png; returns the report path. head: markdown that opens the report (a
    pipeline run's own section, zebra.stages.report.render_report), in place of the generic title."""
    from ..eval.plots import plot_accuracy_vs_kv, plot_sensitivity, plot_throughput
    from ..eval.table import markdown_table, summarize

    root = Path(run_dir)
    if not root.is_dir():
        raise ZebraError(f"run folder {root} does not exist")
    out = Path(out) if out else root
    plots = out / "plots"
    found = find_results(root, skip=plots)
    md = [f"# Zebra report: {root}", ""]
    pipeline_run = head is not None
    if pipeline_run:  # a `zebra run` folder: its own report first (it has the sensitivity section)
        md = _relink(head, root, out).splitlines() + [""]

    # Fig. 3: per-layer sensitivity
    if found["sensitivity"] and not pipeline_run:
        md += ["## Per-layer sensitivity (Fig. 3)", ""]
        for i, (path, data) in enumerate(found["sensitivity"]):
            smart = _nearest(path, found["smart"])
            chosen = sorted(int(x) for x in smart[1]["layers"]) if smart else []
            png = plots / ("sensitivity.png" if len(found["sensitivity"]) == 1 else f"sensitivity-{i + 1}.png")
            plot_sensitivity(data["scores"], chosen, png, kl_all_mamba2=data.get("kl_all_mamba2"))
            scores = [float(s) for s in data["scores"]]
            ranked = sorted(range(len(scores)), key=lambda j: -scores[j])
            md += [f"From `{_rel(path, out)}`"
                   + (f", {data['num_tokens']} tokens" if data.get("num_tokens") is not None else "")
                   + (f"; KL with all layers Mamba2: {float(data['kl_all_mamba2']):.4f}" if data.get("kl_all_mamba2") is not None else "")
                   + ".", "",
                   f"![sensitivity]({_rel(png, out)})", "",
                   f"- layers by score: {', '.join(str(j) for j in ranked)}",
                   f"- chosen MLA layers: {', '.join(map(str, chosen))} (from `{_rel(smart[0], out)}`)" if smart
                   else "- chosen MLA layers: no smart.json found", ""]

    # Tables of every eval file, and Fig. 1 over all of them
    if found["eval"]:
        md += ["## Accuracy (lm-eval)", ""]
        points = []
        for path, data in found["eval"]:
            md += [f"From `{_rel(path, out)}` (lm-eval {data.get('lm_eval_version', '?')}, limit {data.get('limit')}, "
                   f"few-shot {data.get('num_fewshot')}):", ""]
            tasks = list(data.get("tasks") or {})
            if tasks and all("results" in m for m in data["models"]):  # from the scores: tables of older JSON too
                ref = next((i for i, m in enumerate(data["models"]) if m.get("is_reference")), 0)
                table = markdown_table(summarize(data["models"], tasks, ref), tasks)
            else:
                table = data.get("table_markdown") or markdown_table(data["models"], tasks)
            md += [table, ""]
            for m in data["models"]:
                points.append({"model": m.get("model"), "kv_percent": m.get("kv_percent"), "average": m.get("average")})
        if any(p["average"] is not None for p in points):
            png = plot_accuracy_vs_kv(points, plots / "accuracy_vs_kv.png")
            md += ["### Average accuracy vs KV cache size (Fig. 1)", "", f"![accuracy vs KV]({_rel(png, out)})", ""]

    if found["agreement"]:
        md += ["## Teacher agreement on held-out chat", ""]
        for path, data in found["agreement"]:
            md += [f"From `{_rel(path, out)}` (teacher {data.get('teacher')}):", "",
                   "| model | KV % | KL(teacher‖model) | top-1 agree | ppl |", "|---|---:|---:|---:|---:|"]
            for r in data["results"]:
                def f(k, d=2):
                    v = r.get(k)
                    return "-" if v is None else f"{float(v):.{d}f}"
                md.append(f"| {r.get('model')} | {f('kv_percent')} | {f('kl', 4)} | {f('top1_agreement', 3)} | {f('ppl_student')} |")
            md.append("")

    # Fig. 4: throughput
    bench = [r for _, data in found["bench"] for r in data["results"] if isinstance(r, dict)]
    if bench:
        png = plot_throughput(bench, plots / "throughput.png")
        md += ["## Throughput (Fig. 4)", "", f"![throughput]({_rel(png, out)})", "",
               "| variant | gen len | tokens/s |", "|---|---:|---:|"]
        for r in sorted(bench, key=lambda r: (str(r.get("variant")), r.get("gen_len") or 0)):
            tps = r.get("tokens_per_s")
            md.append(f"| {r.get('variant')} | {r.get('gen_len')} | {'-' if tps is None else f'{float(tps):.1f}'} |")
        md.append("")

    if len(md) == 2 and not pipeline_run:
        md += ["Nothing to report yet: no sensitivity.json, eval JSON, agreement JSON or bench*.json under this folder.", ""]
        _say(f"no results found under {root}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
