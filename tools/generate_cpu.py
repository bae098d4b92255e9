"""Generation speed of a Zebra student against its teacher through transformers' own `generate` (greedy, dynamic
cache), and the tokens fed per forward (prefill once, then exactly one per step).

    python tools/generate_cpu.py --out results/generate-cpu          # CPU, ~2 min

The student is the all-attention conversion of the teacher (`zebra convert --attention-layers all`): the same
weights and maths, so any time difference is the model code's overhead. Also times the hybrid (6 MLA + 24 Mamba2).
Rounds alternate teacher / students so load on the machine hits each alike; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def fed_per_call(model):
    """Register a pre-forward hook that records the input length of every top-level forward call."""
    lengths: list[int] = []

    def hook(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(int(ids.shape[1]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zebra
    from zebra import cli
    from zebra.assets import teacher_cache_dir

    tdir = teacher_cache_dir(args.teacher) if "/" not in args.teacher else Path(args.teacher)
    tmp = Path(tempfile.mkdtemp())
    for name, flags in (("attention", ["--attention-layers", "all"]),
                        ("hybrid", ["--mla-layers", "1,6,11,16,21,26"])):
        rc = cli.main(["convert", "--teacher", args.teacher, "--out", str(tmp / name), *flags])
        if rc:
            raise SystemExit(f"convert {name} failed ({rc})")
    tok = AutoTokenizer.from_pretrained(tdir)
    msgs = [{"role": "user", "content": "What are three good reasons to learn to cook at home?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    models = {"teacher": AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32),
              "zebra-all-attention": AutoModelForCausalLM.from_pretrained(tmp / "attention", dtype=torch.float32),
              "zebra-hybrid": AutoModelForCausalLM.from_pretrained(tmp / "hybrid", dtype=torch.float32)}
    fed = {k: fed_per_call(m) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    outs = {}
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        for k, m in models.items():  # warm-up
            m.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(args.rounds):
            for k, m in models.items():
                fed[k].clear()
                t0 = time.perf_counter()
                outs[k] = m.generate(ids, **gen)
                times[k].append(time.perf_counter() - t0)
    res = {"teacher": args.teacher, "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "zebra": zebra.__version__, "models": {}}
    for k in models:
        med = statistics.median(times[k])
        res["models"][k] = {"seconds_median": med, "seconds": times[k], "tokens_per_s": args.new_tokens / med,
                            "fed_per_forward": sorted(set(fed[k][1:])), "first_forward": fed[k][0],
                            "forwards": len(fed[k])}
    res["attention_vs_teacher"] = res["models"]["zebra-all-attention"]["seconds_median"] / res["models"]["teacher"]["seconds_median"]
    res["attention_same_tokens"] = bool(torch.equal(outs["teacher"], outs["zebra-all-attention"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate-cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    for k, r in res["models"].items():
        print(f"{k:>20}: {r['seconds_median']:.2f} s for {args.new_tokens} tokens ({r['tokens_per_s']:.1f} tok/s), "
              f"first forward {r['first_forward']} tokens, then {r['fed_per_forward']} per forward")
    print(f"all-attention / teacher time: {res['attention_vs_teacher']:.3f}; same tokens: {res['attention_same_tokens']}")


if __name__ == "__main__":
    main()
