"""`zebra plan`'s memory per GPU against the peaks `zebra bench --what train` measured (same shapes, layouts and
micro-batches, one GPU). Writes a JSON and prints a markdown table for BENCHMARKS.md.

    python tools/plan_check.py results/quality-h200/train-bench/bench.json --out results/plan-check
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from zebra.bench.train import TRAIN_SHAPES
from zebra.plan import stage_plan
from zebra.runconfig import DEFAULTS

SHAPES = {name: (key, mla, rank) for key, (name, mla, rank, _) in TRAIN_SHAPES.items()}


def run_config(shape: str, row: dict) -> dict:
    _, mla, rank = SHAPES[shape]
    cfg = copy.deepcopy(DEFAULTS)
    cfg["_shape"] = cfg["_teacher_shape"] = shape
    cfg["student"].update({"mla_layers": mla, "attention_layers": None, "q_rank": None, **rank})
    cfg["ild"]["mode"] = "mixers"
    for stage in ("ild", "distill"):
        cfg[stage].update(batch_size=row["batch_size"], seq_len=row["seq_len"], grad_accum=row.get("grad_accum", 1),
                          grad_checkpointing=False)
    return cfg


def split(row: dict, gib: dict) -> dict:
    """The peak in two parts, measured against planned, where the bench recorded the memory held after training
    (older bench JSONs did not): the state kept between steps (weights, optimizer, teacher) and the peak above it
    (gradients, activations, the KL's chunks, workspace)."""
    if row.get("held_after_gib") is None:
        return {}
    state = gib["parameters"] + gib["optimizer"] + gib["teacher"]
    return {"measured_state_gib": row["held_after_gib"], "planned_state_gib": state,
            "measured_above_state_gib": row["peak_mem_gib"] - row["held_after_gib"],
            "planned_above_state_gib": gib["total"] - state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", help="a `zebra bench --what train` bench.json")
    ap.add_argument("--out", required=True, help="folder for plan-check.json")
    args = ap.parse_args()
    data = json.loads(Path(args.bench).read_text())
    rows = []
    for r in data.get("train", []):
        if r.get("status") != "ok" or not r.get("peak_mem_gib") or r["shape"] not in SHAPES:
            continue
        p = stage_plan(run_config(r["shape"], r), r["stage"], 1, 139.0, None, fsdp=r["variant"] == "fsdp")
        rows.append({"shape": r["shape"], "stage": r["stage"], "variant": r["variant"],
                     "micro_batch": f"{r['batch_size']} x {r['seq_len']}", "measured_gib": r["peak_mem_gib"],
                     "planned_gib": p["gib"]["total"], "planned": p["gib"],
                     "error": p["gib"]["total"] / r["peak_mem_gib"] - 1, **split(r, p["gib"])})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan-check.json").write_text(json.dumps({"bench": args.bench, "rows": rows}, indent=1) + "\n")
    print("| shape | stage | variant | micro-batch | measured peak GiB | zebra plan GiB | error "
          "| state: measured / planned | above state: measured / planned |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for x in rows:
        parts = ["-", "-"]
        if "measured_state_gib" in x:
            parts = [f"{x['measured_state_gib']:.1f} / {x['planned_state_gib']:.1f}",
                     f"{x['measured_above_state_gib']:.1f} / {x['planned_above_state_gib']:.1f}"]
        print(f"| {x['shape']} | {x['stage']} | {x['variant']} | {x['micro_batch']} | {x['measured_gib']:.1f} | "
              f"{x['planned_gib']:.1f} | {100 * x['error']:+.0f}% | {parts[0]} | {parts[1]} |")


if __name__ == "__main__":
    main()
