"""The paper's figures as PNGs (matplotlib, Agg backend: no display needed), for `zebra report` and the
pipeline's own report stage.

    from zebra.eval.plots import plot_sensitivity, plot_accuracy_vs_kv, plot_throughput
    plot_sensitivity(scores, chosen=[0, 6, 12], path="sensitivity.png")        # Fig. 3: score per layer
    plot_accuracy_vs_kv(rows, "accuracy_vs_kv.png")    # Fig. 1: rows of {"model", "kv_percent", "average"}
    plot_throughput(results, "throughput.png")         # Fig. 4: {"variant", "gen_len", "tokens_per_s"}

Each function writes `path` (parent folders created) and returns it as a Path.
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def plot_sensitivity(scores, chosen=None, path="sensitivity.png", title: str | None = None,
                     kl_all_mamba2: float | None = None) -> Path:
    """Bar plot of the per-layer sensitivity score s_i (KL drop when layer i is MLA instead of Mamba2),
    the chosen MLA layers in a second colour."""
    plt = _plt()
    chosen = set(int(i) for i in (chosen or []))
    n = len(scores)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 3.6))
    colors = ["tab:red" if i in chosen else "tab:blue" for i in range(n)]
    ax.bar(range(n), [float(s) for s in scores], color=colors, width=0.8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("sensitivity  s_i = KL_0 - KL_i")
    ax.set_xticks(range(n))
    ax.tick_params(axis="x", labelsize=7 if n > 24 else 9)
    ttl = title or "Per-layer sensitivity"
    if kl_all_mamba2 is not None:
        ttl += f"  (KL all-Mamba2 = {kl_all_mamba2:.4f})"
    ax.set_title(ttl, fontsize=10)
    if chosen:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:red", label=f"chosen MLA layers ({len(chosen)})"),
                           Patch(color="tab:blue", label="Mamba2 layers")], fontsize=8, loc="best")
    return _save(fig, path)


def plot_accuracy_vs_kv(rows, path="accuracy_vs_kv.png", title: str | None = None) -> Path:
    """Average accuracy (%) against KV cache size (% of the teacher), one labelled point per model."""
    plt = _plt()
    pts = [r for r in rows if r.get("average") is not None and r.get("kv_percent") is not None]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for r in pts:
        ax.scatter(float(r["kv_percent"]), float(r["average"]), s=40,
                   marker="*" if float(r["kv_percent"]) >= 100 else "o")
        ax.annotate(str(r.get("label") or r.get("model")), (float(r["kv_percent"]), float(r["average"])),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    kvs = [float(r["kv_percent"]) for r in pts]
    if kvs and min(kvs) > 0 and max(kvs) / min(kvs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("KV cache size (% of the teacher)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title or "Average accuracy vs KV cache size", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_throughput(results, path="throughput.png", title: str | None = None) -> Path:
    """Generation throughput (tokens/s) against generation length, one line per variant."""
    plt = _plt()
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.get("gen_len") is None or r.get("tokens_per_s") is None:
            continue
        by_variant.setdefault(str(r.get("variant", "?")), []).append((float(r["gen_len"]), float(r["tokens_per_s"])))
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, pts in by_variant.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    lens = [p[0] for pts in by_variant.values() for p in pts]
    if lens and min(lens) > 0 and max(lens) / min(lens) > 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("generation length (tokens)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(title or "Generation throughput", fontsize=10)
    ax.grid(alpha=0.3)
    if by_variant:
        ax.legend(fontsize=8)
    return _save(fig, path)
