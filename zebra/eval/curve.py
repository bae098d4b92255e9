"""The tokens-vs-quality curve of a distillation run: held-out KL logged during training (Trainer evaluator
events in metrics.jsonl), a power-law fit, and what it predicts for a bigger budget.

    points = curve_points(run / "distill" / "metrics.jsonl")         # [(tokens, kl, proxy or None), ...]
    fit = fit_power_law(points, stable_until=0.8 * final_tokens)      # kl ~ a * tokens^-b on the stable phase
    predict(fit, points, [2, 4])                                       # KL at 2x and 4x the budget

With a warmup-stable-decay schedule the last points drop faster than the stable phase (the decay's gain), so the
law is fitted to the stable phase only and the prediction at k x the budget is the law's value there times the
decay gain measured at the end of this run (final KL / the law's value at the final token count). A heuristic:
it assumes a longer run's decay buys the same relative gain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def curve_points(metrics_path: str | Path) -> list[dict]:
    """The evaluator events of a training stage: [{"tokens", "heldout_kl", "top1", "proxy"?}, ...] by tokens."""
    path = Path(metrics_path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("event") == "eval" and "heldout_kl" in r:
            out.append(r)
    out.sort(key=lambda r: r["tokens"])
    return out


def fit_power_law(points: list[dict], lo: float = 0.0, hi: float = math.inf) -> dict | None:
    """Least squares of log KL = log a - b log tokens over the points with lo <= tokens <= hi (tokens > 0);
    None with fewer than 2 such points."""
    pts = [(p["tokens"], p["heldout_kl"]) for p in points if lo <= p["tokens"] <= hi and p["tokens"] > 0
           and p["heldout_kl"] > 0]
    if len(pts) < 2:
        return None
    xs = [math.log(t) for t, _ in pts]
    ys = [math.log(k) for _, k in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"a": math.exp(my - slope * mx), "b": -slope, "points": len(pts), "lo": lo, "hi": hi}


def law(fit: dict, tokens: float) -> float:
    return fit["a"] * tokens ** (-fit["b"])


def predict(fit: dict | None, points: list[dict], factors=(2, 4)) -> dict:
    """{"2x": KL, "4x": KL, "decay_gain": ratio} at factor x the final token count (see the module doc)."""
    if fit is None or not points:
        return {}
    final = points[-1]
    gain = final["heldout_kl"] / law(fit, final["tokens"])
    out = {"final_tokens": final["tokens"], "final_kl": final["heldout_kl"], "decay_gain": gain}
    for f in factors:
        out[f"{f}x"] = law(fit, f * final["tokens"]) * gain
    return out


def plot_curve(points: list[dict], fit: dict | None, pred: dict, path: str | Path) -> Path:
    """Held-out KL vs tokens (log-log) with the fitted law and the 2x / 4x predictions; the accuracy proxy on a
    second axis when logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [p for p in points if p["tokens"] > 0]
    ax.plot([p["tokens"] for p in pts], [p["heldout_kl"] for p in pts], "o-", label="held-out KL")
    if fit is not None and pts:
        xs = [pts[0]["tokens"] * (4 * pts[-1]["tokens"] / pts[0]["tokens"]) ** (i / 50) for i in range(51)]
        ax.plot(xs, [law(fit, x) for x in xs], "--", color="gray",
                label=f"fit {fit['a']:.3g} * tokens^-{fit['b']:.3f} (stable phase)")
        for f in (2, 4):
            if f"{f}x" in pred:
                ax.plot([f * pred["final_tokens"]], [pred[f"{f}x"]], "s", color="C3")
                ax.annotate(f"{f}x: {pred[f'{f}x']:.3f}", (f * pred["final_tokens"], pred[f"{f}x"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.grid(alpha=0.3, which="both")
    proxy = [(p["tokens"], p["proxy"]["avg_acc_norm"]) for p in pts if isinstance(p.get("proxy"), dict)
             and p["proxy"].get("avg_acc_norm") is not None]
    if proxy:
        ax2 = ax.twinx()
        ax2.plot([t for t, _ in proxy], [100 * a for _, a in proxy], "^-", color="C2", label="accuracy proxy")
        ax2.set_ylabel("accuracy proxy (acc_norm %)")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
