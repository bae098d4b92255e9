"""`zebra smart`: choose the MLA layers from per-layer sensitivity scores with SMART (SPEC 6, Algorithm 2).

    zebra smart --scores sensitivity.json --num-mla 4
    zebra smart --scores scores.json --kv-budget 0.04 --teacher llama-3.2-1b --kv-rank 128 --rope-dim 32 --json

The scores file is a JSON list (one score per layer, 0-based) or an object with a "scores" list (what the
sensitivity stage writes). The output ends with the `--mla-layers` value to pass to `zebra convert`.
"""

from __future__ import annotations

import argparse
import json

EDGE_CASES = """\
SMART (0-based): p = floor(L/N); L1 = argmax of the scores in layers [0, p-1], LN = argmax in [L-p, L-1];
the N-2 middle layers split the T = LN - L1 - N + 1 free layers into near-equal gaps (floor/ceil of T/(N-1))
and maximise the sum of their scores.

cases the paper leaves open:
  N = 0       no MLA layers (empty list)
  N = 1       the single highest-scoring layer
  N = 2       terminal preservation only: [L1, LN] with p = floor(L/2) (disjoint windows, so L1 < LN)
  N = L       every layer; N > L or N < 0 is an error
  ties        argmax ties go to the lowest layer; equal-score middle sets to the lexicographically smallest
  no fit      cannot happen: T >= 0 for every 2 <= N <= L, and any T >= 0 splits into N-1 floor/ceil gaps
  --kv-budget the largest N with N*(r_kv + d_r) / (L*2*n_kv*d_h) <= FRACTION; an error if that is 0
"""


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EDGE_CASES
    parser.add_argument("--scores", required=True, metavar="FILE",
                        help="JSON list of per-layer sensitivity scores, or an object with a \"scores\" list")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--num-mla", type=int, metavar="N", help="number of MLA layers to choose")
    how.add_argument("--kv-budget", type=float, metavar="FRACTION",
                     help="choose the most MLA layers whose KV cache fits this fraction of the teacher's "
                          "(e.g. 0.04 for 4%%); needs --teacher")
    parser.add_argument("--teacher", metavar="CONFIG",
                        help="teacher config.json / model dir / shipped shape (e.g. llama-3.2-1b); needed for "
                             "--kv-budget, optional otherwise (then the KV %% is shown and the score count checked)")
    parser.add_argument("--kv-rank", type=int, default=None, metavar="R",
                        help="MLA KV latent rank r_kv for the KV accounting (default: 128, as zebra convert)")
    parser.add_argument("--rope-dim", type=int, default=None, metavar="D",
                        help="MLA decoupled RoPE dim d_r (default: min(32, head_dim/2), as zebra convert)")
    parser.add_argument("--num-layers", type=int, default=None, metavar="L",
                        help="check that the score list has exactly L entries")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with \"layers\") instead of text")


def run(args) -> int:
    from ..errors import ZebraError
    from ..stages.smart import kv_geometry, kv_budget_num_mla, load_scores, smart_plan

    teacher_cfg = None
    if args.teacher is not None:
        from ..convert.teacher import load_teacher_config

        teacher_cfg = load_teacher_config(args.teacher)
    elif args.kv_budget is not None:
        raise ZebraError("--kv-budget needs --teacher (the KV cache size depends on its layers and KV heads)")

    num_layers = args.num_layers
    geometry = None
    if teacher_cfg is not None:
        geometry = kv_geometry(teacher_cfg, args.kv_rank, args.rope_dim)  # (L, teacher values, per MLA)
        if num_layers is not None and num_layers != geometry[0]:
            raise ZebraError(f"--num-layers {num_layers} but the teacher {args.teacher} has {geometry[0]} layers")
        num_layers = geometry[0]
    scores = load_scores(args.scores, num_layers)

    if args.kv_budget is not None:
        num_mla = kv_budget_num_mla(teacher_cfg, args.kv_budget, args.kv_rank, args.rope_dim)
        if num_mla == 0:
            L, teacher, per = geometry
            raise ZebraError(f"a KV budget of {100 * args.kv_budget:.3g}% allows no MLA layer: one costs "
                             f"{per}/{teacher} = {100 * per / teacher:.3g}% of the teacher's KV cache")
    else:
        num_mla = args.num_mla
    plan = smart_plan(scores, num_mla)

    kv = None
    if geometry is not None:
        _, teacher, per = geometry
        kv = {"student_per_token": plan.num_mla * per, "teacher_per_token": teacher,
              "kv_percent": 100.0 * plan.num_mla * per / teacher}
    mla_arg = ",".join(map(str, plan.layers)) if plan.layers else "none"

    if args.json:
        obj = {**plan.to_dict(), "mla_layers": mla_arg, "scores_file": str(args.scores),
               "kv_budget": args.kv_budget, **(kv or {"kv_percent": None})}
        print(json.dumps(obj, indent=2))
        return 0

    L, n = plan.num_layers, plan.num_mla
    print(f"SMART: {n} MLA layer(s) of {L} from {args.scores} (rule: {plan.rule})")
    if args.kv_budget is not None:
        print(f"  KV budget {100 * args.kv_budget:.3g}% -> N = {n}")
    if plan.p is not None and n >= 2:
        print(f"  terminal preservation: p = {plan.p}; L1 = {plan.l1} (best of 0..{plan.p - 1}), "
              f"LN = {plan.ln} (best of {L - plan.p}..{L - 1})")
        print(f"  middle: T = {plan.total_gap} free layers, gaps in [{plan.gap_min}, {plan.gap_max}], "
              f"{plan.num_candidates} candidate set(s); best middle score {plan.middle_score:.6g}")
    elif n == 1:
        print(f"  the highest-scoring layer is {plan.layers[0]} (score {scores[plan.layers[0]]:.6g})")
    print(f"  layers: {plan.layers}")
    if kv is not None:
        print(f"  KV cache: {kv['student_per_token']} values/token vs {kv['teacher_per_token']} for the teacher "
              f"({kv['kv_percent']:.2f}%)")
    else:
        print("  KV cache: pass --teacher to see the size vs the teacher")
    print(f"  use: --mla-layers {mla_arg}")
    return 0
