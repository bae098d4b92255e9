"""The tokens-vs-quality curve: power-law fit on the stable phase and the 2x / 4x prediction (hand-computed)."""

import pytest


def test_power_law_fit_and_prediction_hand_computed(tmp_path):
    """KL = 8 * t^-0.5 exactly on the stable phase: the fit recovers a = 8, b = 0.5; a final decay point at half
    the law's value makes the decay gain 0.5, so 2x predicts 8 * (2T)^-0.5 * 0.5."""
    import json as js

    from zebra.eval.curve import curve_points, fit_power_law, plot_curve, predict

    T = 4e6
    lines = [{"step": 1, "loss": 3.0}]
    for t in (0, 1e6, 2e6, 3e6):
        lines.append({"event": "eval", "tokens": t, "heldout_kl": 8 * t ** -0.5 if t else 12.0, "top1": 0.1})
    lines.append({"event": "eval", "tokens": T, "heldout_kl": 0.5 * 8 * T ** -0.5, "top1": 0.2})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(js.dumps(r) for r in lines) + "\n")
    pts = curve_points(path)
    assert [p["tokens"] for p in pts] == [0, 1e6, 2e6, 3e6, T]
    fit = fit_power_law(pts, hi=3e6)
    assert fit["a"] == pytest.approx(8) and fit["b"] == pytest.approx(0.5) and fit["points"] == 3
    pred = predict(fit, pts)
    assert pred["decay_gain"] == pytest.approx(0.5)
    assert pred["2x"] == pytest.approx(8 * (2 * T) ** -0.5 * 0.5)
    assert pred["4x"] == pytest.approx(8 * (4 * T) ** -0.5 * 0.5)
    assert plot_curve(pts, fit, pred, tmp_path / "curve.png").stat().st_size > 1000
    assert fit_power_law(pts[:2], lo=1) is None  # one point with tokens > 0 is not a fit
