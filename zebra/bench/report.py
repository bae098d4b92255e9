"""bench.json -> markdown tables (ratios vs our Llama and vs transformers' generate, roofline fractions) and
PNG plots: decode throughput vs generation length (paper Fig. 4/7), batch sweep throughput and peak memory
(Fig. 8/9), prefill time to first token, achieved fraction of the roofline."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _pts(res, shape, kind):
    return [p for p in res["points"] if p["shape"] == shape and p["kind"] == kind]


def _fmt_tps(p, base):
    if p["status"] != "ok":
        return p["status"].upper()
    s = f"{p['tokens_per_s']:,.0f}"
    if base and base.get("status") == "ok":
        s += f" ({p['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
    if p.get("roofline_fraction") is not None:
        s += f" [{100 * p['roofline_fraction']:.0f}%]"
    return s


def best_batches(res, shape) -> dict:
    """Per variant, the batch-sweep point with the most tokens/s among those that fitted."""
    best = {}
    for p in _pts(res, shape, "batch"):
        if p["status"] == "ok" and p["tokens_per_s"] > best.get(p["variant"], {}).get("tokens_per_s", 0):
            best[p["variant"]] = p
    return best


def markdown(res) -> str:
    out = [f"device: {res['device']}; copy bandwidth {res['bandwidth_gbs']:.0f} GB/s; torch {res['torch']}, "
           f"triton {res.get('triton')}, transformers {res['transformers']}; commit {res.get('commit')}; {res['date']}",
           ""]
    if res.get("kernels"):
        out += ["### decode kernels alone (8B geometry, 8192 cached tokens): bytes / time vs copy bandwidth", "",
                "| kernel | batch | bytes moved | time (us) | achieved GB/s | % of copy bandwidth |",
                "|---|---:|---:|---:|---:|---:|"]
        for k in res["kernels"]:
            out.append(f"| {k['kernel']} | {k['batch']} | {k['bytes'] / 2**20:,.0f} MiB | {k['us']:,.0f} | "
                       f"{k['bytes'] / k['us'] / 1e3:,.0f} | {100 * k['bandwidth_fraction']:.0f}% |")
        out.append("")
    if res.get("train"):
        variants = list(dict.fromkeys(r["variant"] for r in res["train"]))
        out += ["### training throughput through the Trainer (fp32 master weights, bf16 autocast, fused AdamW): "
                "tokens/s (MFU)", "",
                "| teacher shape | stage | micro-batch | " + " | ".join(variants) + " | peak memory |",
                "|---|---|---|" + "---:|" * len(variants) + "---:|"]
        runs = {}
        for r in res["train"]:
            runs.setdefault((r["shape"], r["stage"]), {})[r["variant"]] = r
        for (shape, stage), by in runs.items():
            def cell(r):
                if r is None:
                    return "-"
                if r.get("status") != "ok":
                    return r.get("status", "-").upper()
                return f"{r['tokens_per_s']:,.0f}" + (f" ({100 * r['mfu']:.1f}%)" if r.get("mfu") else "")
            any_r = next(iter(by.values()))
            mem = [f"{r['peak_mem_gib']:.1f} GiB" for r in by.values() if r.get("peak_mem_gib")]
            out.append(f"| {shape} | {stage} | {any_r.get('batch_size')} x {any_r.get('seq_len')} | "
                       + " | ".join(cell(by.get(v)) for v in variants) + f" | {mem[0] if mem else '-'} |")
        out.append("")
    for shape in res["shapes"]:
        variants = [v["variant"] for v in res["variants"] if v["shape"] == shape]
        info = {v["variant"]: v for v in res["variants"] if v["shape"] == shape}
        dec = _pts(res, shape, "decode")
        if dec:
            lengths = sorted({p["length"] for p in dec})
            out += [f"### {shape}: decode tokens/s, batch 1, prompt 1 (x our llama) [% of roofline]", "",
                    "| variant | KV % | " + " | ".join(_k(L) for L in lengths) + " |",
                    "|---|---:|" + "---:|" * len(lengths)]
            for v in variants:
                row = []
                for L in lengths:
                    p = next((q for q in dec if q["variant"] == v and q["length"] == L), None)
                    base = next((q for q in dec if q["variant"] == "llama" and q["length"] == L), None)
                    row.append(_fmt_tps(p, base) if p else "-")
                out.append(f"| {v} | {info[v].get('kv_percent', 0):.2f} | " + " | ".join(row) + " |")
            hf = {q["length"]: q for q in dec if q["variant"] == "hf" and q["status"] == "ok"}
            if hf:
                out += ["", "Speed-up over transformers `generate` (hf) at the same length:", "",
                        "| variant | " + " | ".join(_k(L) for L in sorted(hf)) + " |",
                        "|---|" + "---:|" * len(hf)]
                for v in variants:
                    if v == "hf":
                        continue
                    cells = []
                    for L in sorted(hf):
                        p = next((q for q in dec if q["variant"] == v and q["length"] == L and q["status"] == "ok"), None)
                        cells.append(f"{p['tokens_per_s'] / hf[L]['tokens_per_s']:.1f}x" if p else "-")
                    out.append(f"| {v} | " + " | ".join(cells) + " |")
            out.append("")
        bat = _pts(res, shape, "batch")
        if bat:
            batches = sorted({p["batch"] for p in bat})
            L = bat[0]["length"]
            out += [f"### {shape}: batch sweep, prompt 1, {L} generated: tokens/s [% of roofline], peak GiB", "",
                    "| variant | " + " | ".join(str(b) for b in batches) + " |", "|---|" + "---:|" * len(batches)]
            for v in variants:
                row = []
                for b in batches:
                    p = next((q for q in bat if q["variant"] == v and q["batch"] == b), None)
                    if p is None:
                        row.append("-")
                    elif p["status"] != "ok":
                        row.append(p["status"].upper())
                    else:
                        row.append(f"{p['tokens_per_s']:,.0f} [{100 * p['roofline_fraction']:.0f}%] "
                                   f"{p['peak_mem_gib']:.1f}G" if p.get("peak_mem_gib") is not None else
                                   f"{p['tokens_per_s']:,.0f}")
                if any(c != "-" for c in row):
                    out.append(f"| {v} | " + " | ".join(row) + " |")
            best = best_batches(res, shape)
            if best:
                base = best.get("llama")
                out += ["", "Best batch that fits this GPU (the sweep, plus bisection below the first out-of-memory "
                        "batch): " + "; ".join(
                            f"{v} B={p['batch']} {p['tokens_per_s']:,.0f} tokens/s"
                            + (f" ({p['tokens_per_s'] / base['tokens_per_s']:.2f}x llama)" if base and v != "llama" else "")
                            for v, p in best.items())]
            out.append("")
        pre = _pts(res, shape, "prefill")
        if pre:
            lengths = sorted({p["length"] for p in pre})
            out += [f"### {shape}: prefill, time to first token (ms), batch 1", "",
                    "| variant | " + " | ".join(_k(T) for T in lengths) + " |", "|---|" + "---:|" * len(lengths)]
            for v in variants:
                row = []
                for T in lengths:
                    p = next((q for q in pre if q["variant"] == v and q["length"] == T), None)
                    row.append("-" if p is None else (f"{p['ttft_ms']:,.1f}" if p["status"] == "ok" else p["status"].upper()))
                if any(c != "-" for c in row):
                    out.append(f"| {v} | " + " | ".join(row) + " |")
            out.append("")
    return "\n".join(out)


def plots(res, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for shape in res["shapes"]:
        variants = [v["variant"] for v in res["variants"] if v["shape"] == shape]
        dec, bat = _pts(res, shape, "decode"), _pts(res, shape, "batch")
        if dec:
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
            for v in variants:
                ps = sorted((p for p in dec if p["variant"] == v and p["status"] == "ok"), key=lambda p: p["length"])
                if ps:
                    a1.plot([p["length"] for p in ps], [p["tokens_per_s"] for p in ps], "o-", label=v)
                    if ps[0].get("roofline_fraction") is not None:
                        a2.plot([p["length"] for p in ps], [100 * p["roofline_fraction"] for p in ps], "o-", label=v)
            for a, yl in ((a1, "decode tokens/s (batch 1)"), (a2, "% of memory roofline")):
                a.set_xscale("log", base=2)
                a.set_xlabel("generation length")
                a.set_ylabel(yl)
                a.grid(alpha=0.3)
            a1.legend(fontsize=8)
            a1.set_title(f"{shape}: decode throughput (cf. paper Fig. 4/7)")
            a2.set_title("achieved fraction of the roofline")
            files.append(out_dir / f"decode-{shape}.png")
            fig.tight_layout()
            fig.savefig(files[-1], dpi=120)
            plt.close(fig)
        if bat:
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
            for v in variants:
                ps = sorted((p for p in bat if p["variant"] == v), key=lambda p: p["batch"])
                ok = [p for p in ps if p["status"] == "ok"]
                if ok:
                    line = a1.plot([p["batch"] for p in ok], [p["tokens_per_s"] for p in ok], "o-", label=v)[0]
                    if ok[0].get("peak_mem_gib") is not None:
                        a2.plot([p["batch"] for p in ok], [p["peak_mem_gib"] for p in ok], "o-", label=v, color=line.get_color())
                    oom = [p["batch"] for p in ps if p["status"] == "oom"]
                    if oom:
                        a1.plot(oom, [ok[-1]["tokens_per_s"]] * len(oom), "x", color=line.get_color())
            for a, yl in ((a1, "tokens/s"), (a2, "peak memory (GiB)")):
                a.set_xscale("log", base=2)
                a.set_xlabel("batch size")
                a.set_ylabel(yl)
                a.grid(alpha=0.3)
            a1.legend(fontsize=8)
            a1.set_title(f"{shape}: {bat[0]['length']} generated tokens (cf. Fig. 8/9; x = out of memory)")
            files.append(out_dir / f"batch-{shape}.png")
            fig.tight_layout()
            fig.savefig(files[-1], dpi=120)
            plt.close(fig)
        pre = _pts(res, shape, "prefill")
        if pre:
            lengths = sorted({p["length"] for p in pre})
            fig, ax = plt.subplots(figsize=(7, 4))
            w = 0.8 / max(1, len(variants))
            for i, v in enumerate(variants):
                ys = [next((p["ttft_ms"] for p in pre if p["variant"] == v and p["length"] == T and p["status"] == "ok"), 0)
                      for T in lengths]
                ax.bar([j + i * w for j in range(len(lengths))], ys, w, label=v)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(lengths))], [_k(T) for T in lengths])
            ax.set_ylabel("time to first token (ms)")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.set_title(f"{shape}: prefill")
            files.append(out_dir / f"prefill-{shape}.png")
            fig.tight_layout()
            fig.savefig(files[-1], dpi=120)
            plt.close(fig)
    return files
