"""`zebra compose`: the hybrid from an all-MLA and an all-Mamba2 model (e.g. the ILD-refined ones).

    zebra compose --mla-model runs/x/ild-mla/model --mamba-model runs/x/ild-mamba2/model \
        --mla-layers 0,6,12,18,24,29 --out hybrid
    zebra compose ... --scores runs/x/sensitivity/sensitivity.json --num-mla 6 --out hybrid   # SMART choice
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--mla-model", required=True)
    p.add_argument("--mamba-model", required=True)
    p.add_argument("--mla-layers", default=None, help="comma-separated 0-based indices")
    p.add_argument("--scores", default=None, help="sensitivity.json or JSON list: choose layers with SMART")
    p.add_argument("--num-mla", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    from pathlib import Path

    from ..convert.build import check_out_dir, kv_message, save_model
    from ..convert.layout import parse_layer_spec
    from ..errors import ZebraError
    from ..loading import load_model
    from ..stages.compose import compose

    if (args.mla_layers is None) == (args.scores is None):
        raise ZebraError("give exactly one of --mla-layers or --scores (with --num-mla)")
    if args.scores is not None and args.num_mla is None:
        raise ZebraError("--scores needs --num-mla")
    for src in (args.mla_model, args.mamba_model):  # before loading anything: the output location, not a source
        check_out_dir(Path(args.out), args.force, src)
    mla, tok = load_model(args.mla_model, dtype="float32", device="cpu")
    mamba, _ = load_model(args.mamba_model, dtype="float32", device="cpu")
    L = mamba.config.num_hidden_layers
    if args.scores is not None:
        from ..stages.smart import load_scores, smart_select

        layers = smart_select(load_scores(args.scores), args.num_mla)
    else:
        layers = parse_layer_spec(args.mla_layers, L, "--mla-layers")
    hybrid = compose(mla, mamba, layers)
    save_model(hybrid, tok, args.out, {"stage": "compose", "layers": layers}, force=args.force)
    print(f"MLA layers {layers} -> {args.out}. {kv_message(hybrid.config.kv_summary())}")
    return 0
