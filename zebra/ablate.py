"""`zebra ablate SPEC.yaml`: one recipe change at a time, at the same budget, with held-out KL and accuracy before
and after (RESULTS.md's ablation table).

    base: configs/smollm2-135m-quality.yaml      # the recipe under test (a `zebra run` config)
    common: {distill: {tokens: 4000000}, eval: {tasks: []}}   # applied to every variant (the fixed small budget)
    variants:
      baseline: {}
      betas-paper: {distill: {betas: [0.9, 0.8]}}
      uniform-layers: {student: {mla_layers: [0, 6, 12, 18, 24, 29]}}

Each variant is a `zebra run` in OUT/<variant>/ with config = base + common + the variant's overrides. Stages are
reused across variants: a stage's fingerprint is the hash of the config keys it reads plus its predecessor's
fingerprint, and a variant whose stage has the fingerprint of a finished stage of an earlier variant links that
folder instead of running it (changing only distill settings costs one distillation, not a new ILD). Rows:
held-out chat KL / top-1, plain-text perplexity vs the teacher's, the multiple-choice proxy (eval.proxy_tasks)
and its % of the teacher, KV %, tokens, seconds. Writes OUT/ablations.json (after every variant) and
OUT/ablations.md, plus OUT/accuracy_vs_kv.png (the Table 1 analog: accuracy vs KV cache of every variant).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path

from .errors import ZebraError

# the config keys each stage reads (besides its predecessor's outputs)
STAGE_KEYS = {
    "init": ["base", "seed", "student.kv_rank", "student.q_rank", "student.rope_dim", "student.nope_dim",
             "student.rope_select", "student.conv_init", "student.gate_init", "student.calibrate_tokens", "data",
             "ild_fraction"],
    "ild": ["ild", "data", "seq_len", "ild_fraction"],
    "sensitivity": ["sensitivity"],
    "smart": ["student.num_mla", "student.placement", "student.mla_layers", "student.attention_layers",
              "student.kv_budget"],
    "compose": ["eval.num_seqs", "eval.seq_len"],
    "distill": ["distill", "teacher", "data", "seq_len", "ild_fraction"],
    "pairs": ["pairs", "dpo"],
    "dpo": ["dpo"],
    "eval": ["eval"],
}


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def changed_stage(old: dict, new: dict, done) -> tuple[str, list[str]] | None:
    """The first stage that `done(stage)` says is finished and whose own settings differ between two run configs,
    with the keys that differ; None if every finished stage would compute the same again."""
    for stage, keys in STAGE_KEYS.items():
        diff = [k for k in keys if json.dumps(_get(old, k), sort_keys=True, default=str)
                != json.dumps(_get(new, k), sort_keys=True, default=str)]
        if diff and done(stage):
            return stage, diff
    return None


def stage_fingerprints(cfg: dict) -> dict[str, str]:
    """stage -> fingerprint of what it computes (the keys it reads and its predecessor's fingerprint)."""
    out, prev = {}, ""
    for stage, keys in STAGE_KEYS.items():
        h = hashlib.sha256(prev.encode())
        h.update(json.dumps({k: _get(cfg, k) for k in keys}, sort_keys=True, default=str).encode())
        prev = out[stage] = h.hexdigest()[:16]
    return out


def _deep_update(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_spec(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ZebraError(f"ablation spec {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or "base" not in spec or not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise ZebraError(f"{path}: an ablation spec needs `base` (a run config) and a mapping of `variants`")
    base = Path(spec["base"])
    if not base.is_absolute() and not base.exists():
        base = path.parent / base
    spec["base"] = str(base)
    return spec


def variant_configs(spec: dict) -> dict[str, dict]:
    """name -> the resolved, checked run config of every variant (all checked before any work starts)."""
    from .runconfig import load_config

    out = {}
    for name, over in spec["variants"].items():
        if not isinstance(over, dict):
            raise ZebraError(f"variant {name!r} must be a mapping of config overrides (use {{}} for none)")
        overrides = _deep_update(spec.get("common") or {}, over)
        try:
            cfg = load_config(spec["base"], overrides)
        except ZebraError as e:
            raise ZebraError(f"variant {name!r}: {e}") from None
        cfg["name"] = name
        out[name] = cfg
    return out


def _row(name: str, change, run: Path) -> dict:
    top = json.loads((run / "summary.json").read_text())
    d = json.loads((run / "distill" / "summary.json").read_text())
    row = {"variant": name, "change": change, "heldout_kl": top["student"]["heldout_kl"],
           "top1": top["student"]["top1"], "plaintext_ppl_ratio": top["plaintext_ppl_ratio"],
           "kv_percent": top["student"]["kv_percent"], "distill_tokens": d.get("tokens"),
           "distill_tokens_per_s": d.get("tokens_per_s"), "seconds": top["stage_seconds"]}
    comp = json.loads((run / "compose" / "summary.json").read_text())
    row["kl_init"], row["kl_ild"] = comp["kl_init"]["kl"], comp["kl_ild"]["kl"]
    row["layers"], row["attention_layers"] = comp.get("layers"), comp.get("attention_layers")
    if "proxy" in top:
        row["proxy_acc_norm"] = top["proxy"]["student"].get("avg_acc_norm")
        row["proxy_percent_of_teacher"] = top["proxy"].get("percent_of_teacher")
        row["proxy_teacher_acc_norm"] = top["proxy"].get("teacher", {}).get("avg_acc_norm")
        row["proxy_tasks"] = {k: v for k, v in top["proxy"]["student"].items() if isinstance(v, dict)}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | change | KV % | init KL | ILD KL | held-out KL | top-1 | plain-text ppl / teacher | "
             "proxy acc_norm | % of teacher | distill tok/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r.get('change', '')} | | | | {r.get('status')} | | | | | |")
            continue
        f = lambda k, d=4, scale=1: "-" if r.get(k) is None else f"{scale * r[k]:.{d}f}"  # noqa: E731
        lines.append(f"| {r['variant']} | {r['change']} | {r['kv_percent']:.2f} | {f('kl_init', 3)} | "
                     f"{f('kl_ild', 3)} | {f('heldout_kl')} | {f('top1', 3)} | {f('plaintext_ppl_ratio', 2)} | "
                     f"{f('proxy_acc_norm', 2, 100)} | {f('proxy_percent_of_teacher', 1)} | "
                     f"{r.get('distill_tokens_per_s') or 0:,.0f} |")
    return "\n".join(lines) + "\n"


def run_ablations(spec_path: str | Path, out_dir: str | Path, only: list[str] | None = None,
                  time_limit: float | None = None) -> Path:
    from .pipeline import Run
    from .stages.trainer import atomic_write_text

    spec = load_spec(spec_path)
    cfgs = variant_configs(spec)
    if only:
        missing = [n for n in only if n not in cfgs]
        if missing:
            raise ZebraError(f"unknown variant(s) {missing}; the spec has {', '.join(cfgs)}")
        cfgs = {n: cfgs[n] for n in only}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "stages.json"  # fingerprint -> finished stage folder
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    rows, t0 = [], time.perf_counter()
    for name, cfg in cfgs.items():
        change = spec["variants"][name] or "(the recipe as is)"
        run = out / name
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            rows.append({"variant": name, "change": change, "status": "not run (time limit)"})
            continue
        fps = stage_fingerprints(cfg)
        run.mkdir(parents=True, exist_ok=True)
        for stage, fp in fps.items():  # link every leading stage an earlier variant already computed
            src = index.get(fp)
            dst = run / stage
            if dst.exists() or dst.is_symlink():
                if (dst / "DONE").exists():
                    continue
                break
            if src and (Path(src) / "DONE").exists():
                os.symlink(os.path.relpath(src, run), dst)
            else:
                break
        print(f"[zebra ablate] {name}: {change}", flush=True)
        try:
            Run(cfg, run).run()
            row = {**_row(name, change, run), "status": "ok"}
        except Exception as e:  # noqa: BLE001  (a failed variant is a row; the others still run)
            row = {"variant": name, "change": change, "status": f"failed: {type(e).__name__}: {str(e)[:200]}"}
            print(f"[zebra ablate] {name} failed: {e}", flush=True)
        for stage, fp in fps.items():
            d = run / stage
            if (d / "DONE").exists() and not d.is_symlink():
                index[fp] = str(d.resolve())
        atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")
        rows.append(row)
        table = _with_earlier(spec, out, rows)
        atomic_write_text(out / "ablations.json", json.dumps({"spec": spec, "rows": table}, indent=2, default=str) + "\n")
        atomic_write_text(out / "ablations.md", markdown(table))
        _plot(table, out / "accuracy_vs_kv.png")
    return out / "ablations.md"


def _with_earlier(spec: dict, out: Path, rows: list[dict]) -> list[dict]:
    """The table of every variant of the spec, in its order: this invocation's rows, and the finished runs an earlier
    invocation left in `out` (so `--only` adds rows to the table instead of replacing it)."""
    now = {r["variant"]: r for r in rows}
    table = []
    for name, change in spec["variants"].items():
        if name in now:
            table.append(now[name])
        elif (out / name / "summary.json").exists():
            try:
                table.append({**_row(name, change or "(the recipe as is)", out / name), "status": "ok"})
            except (OSError, KeyError, ValueError):  # an unfinished or foreign folder is not a row
                pass
    return table


def _plot(rows: list[dict], path: Path) -> None:
    pts = [r for r in rows if r.get("status") == "ok" and r.get("proxy_acc_norm") is not None]
    if not pts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pts:
        ax.scatter(r["kv_percent"], 100 * r["proxy_acc_norm"])
        ax.annotate(r["variant"], (r["kv_percent"], 100 * r["proxy_acc_norm"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    teacher = next((r["proxy_teacher_acc_norm"] for r in pts if r.get("proxy_teacher_acc_norm")), None)
    if teacher is not None:  # the reference: the teacher's own accuracy (the same for every row) at its full cache
        ax.scatter(100, 100 * teacher, marker="*", s=120, color="black")
        ax.annotate("teacher", (100, 100 * teacher), fontsize=7, textcoords="offset points", xytext=(-30, 5))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("KV cache, % of the teacher")
    ax.set_ylabel("accuracy proxy (avg acc_norm, %)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
