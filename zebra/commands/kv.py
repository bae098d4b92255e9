"""`zebra kv`: KV-cache size of a student layout vs its teacher, from the teacher's config alone (SPEC 2, 9).

    zebra kv --teacher llama-3.2-1b --mla-layers 0,5,10,14 --kv-rank 128 --rope-dim 32 --nope-dim 32 --q-rank 1344
    zebra kv --teacher path/to/config.json --mla-layers all --json

Counts cached values per token summed over layers (elements, not bytes): attention 2*n_kv*d_h, MLA r_kv + d_r,
Mamba2 0 (its state does not grow with the context).
"""

from __future__ import annotations

import json

from ..convert.layout import add_layout_arguments
from ..convert.teacher import shape_names


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_NAME",
                        help="a config.json, a model directory, a .gguf file, the embedded teacher name, or a "
                             f"shipped shape ({', '.join(shape_names())}); no weights are read")
    add_layout_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args) -> int:
    from ..convert.build import build_student_config, kv_message

    _, cfg = build_student_config(args.teacher, args.mla_layers, args.attention_layers, args.kv_rank, args.q_rank,
                                     args.rope_dim, args.nope_dim, args.drop_qk_norm)
    summary = cfg.kv_summary()
    per_layer = cfg.kv_values_per_token_per_layer()
    idx = {k: [i for i, t in enumerate(cfg.mixer_types) if t == k] for k in ("mla", "mamba2", "attention")}
    if args.json:
        obj = {
            "teacher": args.teacher,
            "teacher_model_type": cfg.teacher_model_type,
            **summary,
            "kv_percent": round(summary["kv_percent"], 4),
            "num_layers": cfg.num_hidden_layers,
            "mla_layers": idx["mla"],
            "attention_layers": idx["attention"],
            "mamba2_layers": idx["mamba2"],
            "per_layer": per_layer,
            "geometry": {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                         "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                         "kv_rank": cfg.kv_lora_rank, "q_rank": cfg.q_lora_rank,
                         "rope_dim": cfg.qk_rope_head_dim, "nope_dim": cfg.qk_nope_head_dim},
        }
        print(json.dumps(obj, indent=2))
        return 0
    n_kv, d_h = cfg.num_key_value_heads, cfg.head_dim
    print(f"teacher: {args.teacher} ({cfg.teacher_model_type}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, {n_kv} KV heads x {d_h})")
    rows = [("attention", 2 * n_kv * d_h, f"2*{n_kv}*{d_h}"),
            ("mla", cfg.kv_lora_rank + cfg.qk_rope_head_dim, f"{cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}"),
            ("mamba2", 0, "state only")]
    print(f"{'mixer':<10}{'layers':>7}{'values/token/layer':>20}  {'':<14}{'values/token':>13}  indices")
    for kind, per, how in rows:
        n = len(idx[kind])
        shown = ",".join(map(str, idx[kind])) if n else "-"
        print(f"{kind:<10}{n:>7}{per:>20}  {'(' + how + ')':<14}{n * per:>13}  {shown}")
    print(kv_message(summary))
    return 0
