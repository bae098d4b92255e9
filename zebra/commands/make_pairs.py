"""`zebra make-pairs`: DPO pairs from chat data: chosen = the dataset's reply, rejected = the model's sample.

    zebra make-pairs --model runs/x/distill/model --num-pairs 256 --out pairs.jsonl
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="sharegpt", help="data source (default: the embedded ShareGPT, held-out excluded)")
    p.add_argument("--num-pairs", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def run(args) -> int:
    from ..data.sources import load_conversations
    from ..errors import ZebraError
    from ..loading import load_model
    from ..stages.pairs import make_pairs

    for name in ("num_pairs", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ZebraError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.temperature < 0:
        raise ZebraError(f"--temperature must be >= 0, not {args.temperature}")
    model, tok = load_model(args.model)
    n = make_pairs(model, tok, load_conversations(args.data), args.num_pairs, args.out, args.max_new_tokens,
                   args.temperature, args.batch_size, args.seed)
    print(f"{n} pairs -> {args.out}")
    return 0
