"""`zebra prepare CONFIG [--loss-on assistant|all]`: tokenise a run's data sources once into the zebra cache
(memory-mapped shards, zebra/data/corpus.py), in bounded memory, with progress, so a later `zebra run` (or every
rank of a torchrun) maps them instead of tokenising. Prints each source's documents and tokens.

    zebra prepare configs/smollm2-135m-quality.yaml
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("config", help="a `zebra run` config: its base model's tokenizer and its data sources")
    p.add_argument("--loss-on", default=None, choices=("assistant", "all"),
                   help="which loss mask to prepare (default: the config's distill.loss_on; ILD uses all)")


def run(args) -> int:
    from transformers import AutoTokenizer

    from ..assets import cache_dir, resolve_teacher
    from ..data.corpus import tokenize_source
    from ..runconfig import load_config

    cfg = load_config(args.config)
    tok = AutoTokenizer.from_pretrained(resolve_teacher(cfg["base"]))
    for loss_on in sorted({args.loss_on or cfg["distill"]["loss_on"], "all"}):
        for spec in cfg["data"]:
            c = tokenize_source(tok, spec, loss_on=loss_on, cache_dir=cache_dir() / "tokenized", verbose=True)
            print(f"{spec}: loss on {loss_on}: {len(c):,} documents, {c.num_tokens:,} tokens")
    return 0
