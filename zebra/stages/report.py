"""report.md for a `zebra run`: KL to the teacher after each stage, the chosen layers, the KV cache, training
throughput, and plots (sensitivity per layer, training loss curves).

    zebra report RUN_DIR      (also written as the run's last stage)
"""

from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _loss_curves(run: Path, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("ild", "distill", "dpo") if (run / s / "metrics.jsonl").exists()]
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, s in zip(axes[0], stages):
        recs = [json.loads(line) for line in (run / s / "metrics.jsonl").read_text().splitlines() if line.strip()]
        recs = [r for r in recs if "loss" in r and "event" not in r]
        ax.plot([r["tokens"] for r in recs], [r["loss"] for r in recs])
        ax.set_title(s)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir, cfg: dict | None = None) -> Path:
    """The pipeline's report plus any evaluations / benchmarks found in the run folder (zebra report)."""
    from ..eval.report import write_report as write_full

    return write_full(run_dir, head=render_report(run_dir, cfg))


def render_report(run_dir, cfg: dict | None = None) -> str:
    """The pipeline part of report.md (KL per stage, layers, KV, final evaluation, curve, training, sensitivity)."""
    from ..eval.curve import curve_points, fit_power_law, plot_curve, predict

    run = Path(run_dir)
    cfg = cfg or _read(run / "run_config.json") or {}
    s = {name: _read(run / name / "summary.json") or {} for name in
         ("init", "ild", "sensitivity", "smart", "compose", "distill", "pairs", "dpo", "eval")}
    lines = [f"# Zebra run: {cfg.get('name', run.name)}", ""]
    own = (cfg.get("distill") or {}).get("data")
    lines += [f"base `{cfg.get('base')}`, teacher `{cfg.get('teacher')}`, data {cfg.get('data')}, "
              + (f"distillation data {own}, " if own else "")
              + f"seq_len {cfg.get('seq_len')}, seed {cfg.get('seed')}", ""]
    comp = s["compose"]
    if comp.get("layers") is not None:
        kv = comp.get("kv", {})
        att = comp.get("attention_layers") or []
        lines += [f"**MLA layers** ({s['smart'].get('how', '?')}): {comp['layers']}  "]
        if att:
            lines += [f"**attention layers** (the teacher's own): {att}  "]
        lines += [f"**KV cache**: {kv.get('student_per_token')} values/token vs {kv.get('teacher_per_token')} "
                  f"for the teacher = **{kv.get('kv_percent', float('nan')):.2f}%**", ""]
    top = _read(run / "summary.json")
    if top:
        st, te = top["student"], top["teacher"]
        lines += ["## Final student vs teacher", "",
                  "| | held-out chat KL | top-1 agreement | chat ppl | plain-text ppl | KV % |", "|---|---:|---:|---:|---:|---:|",
                  f"| teacher | 0 | 1 | {te['heldout_ppl']:.2f} | {te['plaintext_ppl']:.2f} | 100 |",
                  f"| student | {st['heldout_kl']:.4f} | {st['top1']:.3f} | {st['heldout_ppl']:.2f} | "
                  f"{st['plaintext_ppl']:.2f} ({top['plaintext_ppl_ratio']:.2f}x) | {st['kv_percent']:.2f} |", "",
                  f"Total {top['total_seconds']:.0f} s; stages: " + ", ".join(
                      f"{k} {v:.0f} s" for k, v in top["stage_seconds"].items() if v is not None), ""]
        if s["eval"].get("lm_eval"):
            lines += ["lm-eval of the teacher and the final student: the Accuracy section below (eval/eval.json).", ""]
    init_err = s["init"].get("mixer_rel_err")
    lines += ["## KL to the teacher on held-out chat (per token)", "",
              "| after | KL(teacher‖student) | top-1 agreement | student ppl | teacher ppl |", "|---|---|---|---|---|"]
    for label, rec in (("init (composed from initialised layers)", comp.get("kl_init")),
                       ("ILD (composed from ILD-refined layers)", comp.get("kl_ild")),
                       ("end-to-end distillation", s["distill"].get("kl")), ("DPO", s["dpo"].get("kl"))):
        if rec:
            lines.append(f"| {label} | {rec['kl']:.4f} | {rec['top1_agreement']:.3f} | {rec['ppl_student']:.2f} | "
                         f"{rec['ppl_teacher']:.2f} |")
    if init_err:
        lines += ["", "Initialised mixers, relative squared error of the mixer output vs the teacher's attention "
                  "(mean over layers, held-out chat): " + ", ".join(f"{k[8:]} {v:.4f}" for k, v in init_err.items())]
    pts = curve_points(run / "distill" / "metrics.jsonl")
    if len(pts) >= 3:
        dcfg = cfg.get("distill", {})
        total = pts[-1]["tokens"]
        hi = total * (1 - dcfg.get("decay_frac", 0.0)) if dcfg.get("schedule") == "wsd" else total
        fit = fit_power_law(pts, lo=0.1 * total, hi=hi)
        pred = predict(fit, pts)
        png = plot_curve(pts, fit, pred, run / "curve.png")
        lines += ["", "## Tokens vs quality (distillation)", "", f"![curve]({png.name})", "",
                  "| tokens | held-out KL | top-1 | accuracy proxy |", "|---:|---:|---:|---:|"]
        for p in pts:
            proxy = p.get("proxy", {}).get("avg_acc_norm") if isinstance(p.get("proxy"), dict) else None
            lines.append(f"| {p['tokens']:,} | {p['heldout_kl']:.4f} | {p['top1']:.3f} | "
                         f"{'-' if proxy is None else f'{100 * proxy:.2f}'} |")
        if pred:
            lines += ["", f"Fit on the stable phase: KL = {fit['a']:.4g} * tokens^-{fit['b']:.3f}; with this run's "
                      f"decay gain ({pred['decay_gain']:.3f}) it predicts KL {pred['2x']:.3f} at 2x and "
                      f"{pred['4x']:.3f} at 4x the budget ({pred['final_tokens']:,} tokens)."]
            (run / "curve.json").write_text(json.dumps({"fit": fit, "prediction": pred}, indent=2) + "\n")
    lines += ["", "## Training", "", "| stage | tokens | steps | final loss | tokens/s | seconds |", "|---|---|---|---|---|---|"]
    for st in TRAINED_STAGES:
        r = s[st]
        if r and "steps" in r:
            fin = r.get("final", {})
            lines.append(f"| {st} | {r.get('tokens')} | {r.get('steps')} | {fin.get('loss', float('nan')):.4f} | "
                         f"{r.get('tokens_per_s', 0):,.0f} | {r.get('seconds')} |")
    if s["pairs"].get("pairs"):
        lines += ["", f"Preference pairs made: {s['pairs'].get('pairs')}"]
    sens = _read(run / "sensitivity" / "sensitivity.json")
    if sens:
        lines += ["", "## Layer sensitivity (SPEC 5)", "",
                  f"KL of the all-Mamba2 model: {sens['kl_all_mamba2']:.4f}; score s_i = KL_0 - KL_i "
                  f"over {sens['num_tokens']} tokens.", ""]
        if (run / "sensitivity" / "sensitivity.png").exists():
            lines.append("![sensitivity](sensitivity/sensitivity.png)")
        lines += ["", "| layer | " + " | ".join(str(i) for i in range(len(sens["scores"]))) + " |",
                  "|---" * (len(sens["scores"]) + 1) + "|",
                  "| s_i | " + " | ".join(f"{v:.3f}" for v in sens["scores"]) + " |"]
    if _loss_curves(run, run / "loss_curves.png"):
        lines += ["", "## Loss curves", "", "![loss curves](loss_curves.png)"]
    return "\n".join(lines) + "\n"


TRAINED_STAGES = ("ild", "distill", "dpo")
