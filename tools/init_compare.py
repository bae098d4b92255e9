"""Initialisation choices compared before any training (SPEC 3.1's RoPE comparison, the Mamba2 conv and gate
inits): per-layer relative error and cosine of each initialised mixer's output vs the teacher's attention on
held-out chat, and the KL of the initialised hybrid. CPU is enough (no training).

    python tools/init_compare.py --out results/init-compare [--seqs 8] [--layers 0,6,11,16,21,26]

MLA RoPE layouts: "freq" (the teacher's fastest rotary pairs at the teacher's frequencies), "norm" (the heaviest
pairs by weight norm, MHA2MLA's criterion), "last" (the paper's last d_r dims, frequencies recomputed over d_r),
each at r_kv 64 and at full rank (2 * n_kv * d_h = 384, where only the RoPE layout and the shared RoPE key
remain as error sources). Mamba2: conv init identity / random x gate init constant / random, with and without the
output-scale calibration on 64k tokens of the ILD share (zebra.convert.calibrate). Per mixer: mean
over layers of ||mixer - attention||^2 / ||attention||^2 and of the per-token cosine; per hybrid: KL(teacher ||
hybrid) and top-1 agreement. Writes OUT/init-compare.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from zebra.convert.build import build_student
    from zebra.data.chat import heldout_sequences
    from zebra.eval.agreement import agreement, pad_batch
    from zebra.stages.compose import compose

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--out", default="results/init-compare")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", default="0,6,11,16,21,26", help="MLA layers of the hybrid whose init KL is measured")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    layers = [int(i) for i in args.layers.split(",")]
    teacher, tok, _ = build_student(args.teacher, "none", "all")
    teacher.eval()
    seqs = heldout_sequences(tok, args.seqs, args.seq_len)
    ids, mask = pad_batch(seqs)
    batch = {"input_ids": ids, "attention_mask": mask}

    def per_layer(model):
        """Per layer: ||mixer(x_l) - attn(x_l)||^2 / ||attn(x_l)||^2 and the mean per-token cosine (masked)."""
        from zebra.stages.ild import _mixer, teacher_layer_targets
        from zebra.stages.losses import _masked_mse

        keys = {layer.self_attn.rope_key for layer in model.model.layers if layer.mixer_type == "mla"}
        keep = mask.bool()
        with torch.no_grad():
            ctx, targets = teacher_layer_targets(teacher, batch, keys)
            err, cos = [], []
            for layer, (_, x, _, t_mix) in zip(model.model.layers, targets):
                m = _mixer(layer, x, ctx)
                err.append((_masked_mse(m, t_mix, mask) / _masked_mse(t_mix, torch.zeros_like(t_mix), mask)).item())
                cos.append(torch.nn.functional.cosine_similarity(m[keep], t_mix[keep], dim=-1).mean().item())
        return err, cos

    rows = []
    t0 = time.time()
    for rope in ("freq", "norm", "last"):
        for rank in (64, 384):
            mla, _, rep = build_student(args.teacher, "all", "none", kv_rank=rank, rope_dim=32, nope_dim=32,
                                        rope_select=rope)
            errs, cos = per_layer(mla.eval())
            rows.append({"mixer": "mla", "rope_select": rope, "kv_rank": rank, "mean_rel_err": sum(errs) / len(errs),
                         "mean_cos": sum(cos) / len(cos), "per_layer": errs, "rope_pairs": rep.get("mla_rope_pairs")})
            print(f"mla rope={rope} r_kv={rank}: mean rel err {rows[-1]['mean_rel_err']:.4f}", flush=True)
    from zebra.assets import cache_dir
    from zebra.convert.calibrate import calibrate_mamba2_norms
    from zebra.data.packing import build_dataset

    calib = list(build_dataset(tok, ["sharegpt"], seq_len=512, split="ild", max_tokens=65536, batch_size=8,
                               cache_dir=cache_dir() / "tokenized"))  # training (ILD-share) text, not held-out

    def mamba2(conv, gate, calibrated):
        m, _, _ = build_student(args.teacher, "none", "none", conv_init=conv, gate_init=gate)
        if calibrated:
            calibrate_mamba2_norms(teacher, m.eval(), calib)
        return m.eval()

    for conv, gate, cal in (("identity", "constant", True), ("identity", "constant", False),
                            ("identity", "random", False), ("random", "constant", False),
                            ("random", "random", False), ("random", "random", True)):
        errs, cos = per_layer(mamba2(conv, gate, cal))
        rows.append({"mixer": "mamba2", "conv_init": conv, "gate_init": gate, "calibrated": cal,
                     "mean_rel_err": sum(errs) / len(errs), "mean_cos": sum(cos) / len(cos), "per_layer": errs})
        print(f"mamba2 conv={conv} gate={gate} calibrated={cal}: mean rel err {rows[-1]['mean_rel_err']:.4f}, "
              f"cos {rows[-1]['mean_cos']:.3f}", flush=True)
    hybrids = []
    for rope, conv, gate, cal in (("freq", "identity", "constant", True), ("freq", "identity", "constant", False),
                                  ("last", "identity", "constant", True), ("freq", "random", "constant", True),
                                  ("freq", "identity", "random", True), ("last", "random", "random", False)):
        mla, _, _ = build_student(args.teacher, "all", "none", kv_rank=64, rope_dim=32, nope_dim=32, rope_select=rope)
        h = compose(mla, mamba2(conv, gate, cal), layers)
        a = agreement(teacher, h, seqs, batch_size=4)
        hybrids.append({"rope_select": rope, "conv_init": conv, "gate_init": gate, "calibrated": cal, "layers": layers,
                        "kl": a["kl"], "top1": a["top1_agreement"]})
        print(f"hybrid rope={rope} conv={conv} gate={gate} calibrated={cal}: init KL {a['kl']:.3f}, "
              f"top-1 {a['top1_agreement']:.3f}", flush=True)
    res = {"teacher": args.teacher, "seqs": len(seqs), "seq_len": args.seq_len, "mixers": rows, "hybrids": hybrids,
           "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "init-compare.json").write_text(json.dumps(res, indent=2) + "\n")
    print("\n| mixer | setting | r_kv | mean rel. squared error | mean cosine |\n|---|---|---:|---:|---:|")
    for r in rows:
        setting = (f"rope {r['rope_select']}" if r["mixer"] == "mla" else
                   f"conv {r['conv_init']}, gate {r['gate_init']}" + (", calibrated" if r["calibrated"] else ""))
        print(f"| {r['mixer']} | {setting} | {r.get('kv_rank', '-')} | {r['mean_rel_err']:.4f} | {r['mean_cos']:.3f} |")
    print("\n| RoPE | conv | gate | calibrated | init KL of the hybrid | top-1 |\n|---|---|---|---|---:|---:|")
    for h in hybrids:
        print(f"| {h['rope_select']} | {h['conv_init']} | {h['gate_init']} | {h['calibrated']} | {h['kl']:.3f} | "
              f"{h['top1']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
