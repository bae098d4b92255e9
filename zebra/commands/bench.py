"""`zebra bench`: decode / batch / prefill throughput and memory of the hybrids vs their baselines, on random-
weight models of real Llama shapes (paper Fig. 4/7/8/9), each point with its memory roofline; and training
throughput (`--what train`). Writes OUT/bench.json (after every point, atomically), OUT/bench.md and plots.

    zebra bench --shapes 8b --variants llama,zebra,hf --what decode,batch --out bench-8b
    zebra bench --shapes 1b --what prefill --prefill 2048,8192,32768
    zebra bench --shapes smollm2,1b --what train --out results/x/train-bench   # ILD / distillation tokens/s + MFU
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from pathlib import Path

from ..errors import ZebraError

KINDS = ("decode", "batch", "prefill", "train", "kernels")


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ZebraError(f"{flag} takes a comma-separated list of integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise ZebraError(f"{flag} needs positive integers, got {text!r}")
    return vals


def add_arguments(p):
    p.add_argument("--shapes", default="8b", help="1b,3b,8b (Llama-3.2-1B/3B, Llama-3.1-8B), shipped names or "
                   "config.json paths; for --what train also 'smollm2' (the SmolLM2-135M shape)")
    p.add_argument("--variants", default="hf,llama,mil50,mil25,mla,zebra,mamba2",
                   help="hf, llama, mil50, mil25, mla, zebra (smallest-KV paper config), zebra-<n>mla, mamba2")
    p.add_argument("--what", default="decode,batch,prefill", help=f"any of {', '.join(KINDS)}")
    p.add_argument("--lengths", default="1024,4096,8192,16384,32768", help="decode: generation lengths (batch 1)")
    p.add_argument("--hf-lengths", default="1024,8192,32768", help="decode lengths measured for hf (slow)")
    p.add_argument("--batches", default="8,16,32,64,128,256", help="batch sweep sizes")
    p.add_argument("--batch-length", type=int, default=8192, help="batch sweep: tokens generated")
    p.add_argument("--fit-step", type=int, default=8,
                   help="batch sweep: when a batch runs out of memory, bisect down to the largest batch that fits, "
                        "to this granularity (0: off), so each variant's best batch on this GPU is measured")
    p.add_argument("--prefill", default="2048,8192,32768", help="prefill prompt lengths (batch 1)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per position")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-graph", action="store_true", help="decode without the CUDA graph")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ssm-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="Mamba2's decode state (bf16 halves its traffic; its accuracy over 8k steps is in RESULTS.md)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--train-batch", type=int, default=None,
                   help="--what train: rows of --train-seq tokens per micro-batch (default: 16 for smollm2, 8 for 1b)")
    p.add_argument("--train-seq", type=int, default=2048)
    p.add_argument("--train-accum", type=int, default=1, help="--what train: micro-batches per optimizer step")
    p.add_argument("--train-variants", default="fast,eager",
                   help="--what train: fast (torch.compile, chunked PyTorch SSD), eager (no compile), fla (compiled, "
                        "fla's parallel Mamba2 kernel), fsdp (fast inside FSDP2, as zebra run with several ranks; "
                        "one process: `torchrun --nproc-per-node 1 -m zebra.cli bench ...`)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: start no new point after this")
    p.add_argument("--out", default="bench", help="output folder")


def fit_search(lo: int, hi: int, step: int, fits) -> int:
    """The largest batch in (lo, hi) that fits, to `step`: lo fitted (0: none did), hi ran out of memory; fits(B)
    measures batch B and says whether it fitted. Bisection over multiples of step; returns lo when none does."""
    while hi - lo > step:
        mid = max(lo + step, (lo + hi) // 2 // step * step)
        if mid >= hi:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _commit():
    if os.environ.get("ZEBRA_COMMIT"):  # a code snapshot without .git (GPU runs) names its commit
        return os.environ["ZEBRA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(args) -> int:
    import torch
    import transformers

    from ..bench import report
    from ..bench.runner import Bench, free, is_oom
    from ..bench.variants import resolve_shape, variant_names

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in what if w not in KINDS]
    if bad or not what:
        raise ZebraError(f"--what takes {', '.join(KINDS)}, got {args.what!r}")
    lengths, hf_lengths = _ints(args.lengths, "--lengths"), _ints(args.hf_lengths, "--hf-lengths")
    batches, prefill = _ints(args.batches, "--batches"), _ints(args.prefill, "--prefill")
    if args.batch_length <= 1 or args.steps <= 0 or args.warmup < 0 or args.fit_step < 0:
        raise ZebraError("--batch-length must be > 1, --steps > 0, --warmup >= 0 and --fit-step >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "kernels" in what and device.type != "cuda":
        raise ZebraError("--what kernels times the Triton decode kernels at 8B size against the copy bandwidth: it "
                         "needs a CUDA GPU (on the CPU the reference ops would take hours and say nothing)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    shape_specs = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not variants or not shape_specs:
        raise ZebraError("--shapes and --variants must not be empty")
    shapes = []
    for spec in shape_specs:
        if what == ["train"]:
            from ..bench.train import TRAIN_SHAPES

            if spec not in TRAIN_SHAPES:
                raise ZebraError(f"--what train runs on {', '.join(TRAIN_SHAPES)}, got {spec!r}")
            shapes.append((spec, None))
            continue
        if "train" in what:
            raise ZebraError("--what train runs on its own (its shapes are the training pairs: smollm2, 1b)")
        name, cfg = resolve_shape(spec)
        unknown = [v for v in variants if v not in variant_names(name)]
        if unknown:
            raise ZebraError(f"unknown variant(s) {unknown} for {name} (have: {', '.join(variant_names(name))})")
        shapes.append((name, cfg))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bench = Bench(device, dtype, steps=args.steps, warmup=args.warmup, graph=not args.no_graph,
                  ssm_dtype=torch.bfloat16 if args.ssm_dtype == "bf16" else torch.float32)
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    res = {"format": "zebra-bench/1", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "bandwidth_gbs": bench.bw / 1e9, "torch": torch.__version__, "triton": triton_v,
           "transformers": transformers.__version__, "commit": _commit(), "dtype": args.dtype,
           "ssm_dtype": args.ssm_dtype,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "zebra bench " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                if k not in ("_module", "command") and v not in (None, False)),
           "shapes": [s for s, _ in shapes], "variants": [], "points": [], "train": []}
    print(f"zebra bench: {res['device']}, copy bandwidth {res['bandwidth_gbs']:.0f} GB/s", flush=True)

    def over_time():
        return args.time_limit is not None and time.perf_counter() - t_start > args.time_limit

    def add(shape, variant, kind, point):
        point = {"shape": shape, "variant": variant, "kind": kind, **point}
        res["points"].append(point)
        report.write_json_atomic(out / "bench.json", res)
        tps = point.get("tokens_per_s")
        extra = (f"{tps:,.0f} tok/s" if tps else "") + (f", {100 * point['roofline_fraction']:.0f}% of roofline"
                                                         if point.get("roofline_fraction") else "")
        extra += f", TTFT {point['ttft_ms']:.1f} ms" if point.get("ttft_ms") else ""
        print(f"  {shape} {variant:>10} {kind:>7} B={point.get('batch')} L={point.get('length')}: "
              f"{point['status']} {extra}", flush=True)

    def guarded(shape, variant, kind, meta, fn):
        if over_time():
            add(shape, variant, kind, {**meta, "status": "skipped"})
            return "skipped"
        try:
            add(shape, variant, kind, fn())
            return "ok"
        except Exception as e:  # noqa: BLE001  (a failed point is a result; the run goes on)
            status = "oom" if is_oom(e) else "error"
            add(shape, variant, kind, {**meta, "status": status, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            free()
            return status

    if "kernels" in what:
        from ..bench.runner import kernel_points

        res["kernels"] = kernel_points(bench)
        report.write_json_atomic(out / "bench.json", res)
        what = [w for w in what if w != "kernels"]
    for shape, cfg in shapes:
        if "train" in what:
            from ..bench.train import run_train

            res["train"] += run_train(shape, cfg, variants, device, args)
            report.write_json_atomic(out / "bench.json", res)
        gen_kinds = [k for k in what if k != "train"]
        if not gen_kinds or cfg is None:
            continue
        for variant in variants:
            if over_time():
                for k in gen_kinds:
                    add(shape, variant, k, {"status": "skipped"})
                continue
            try:
                model, zc = bench.build(shape, cfg, variant)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                add(shape, variant, gen_kinds[0], {"status": "oom", "error": "model does not fit"})
                free()
                continue
            from ..bench.roofline import cache_bytes_per_token

            teacher_tok = cache_bytes_per_token(cfg, 1)
            res["variants"].append({"shape": shape, "variant": variant,
                                    "mixer_types": None if variant == "hf" else list(zc.mixer_types),
                                    "params": sum(p.numel() for p in model.parameters()),
                                    "kv_percent": 100 * cache_bytes_per_token(zc, 1) / teacher_tok})
            hf = variant == "hf"
            if "decode" in what:
                for L in (hf_lengths if hf else lengths):
                    meta = {"batch": 1, "length": L}
                    guarded(shape, variant, "decode", meta,
                            (lambda L=L: bench.hf_generation_point(model, cfg, 1, L)) if hf else
                            (lambda L=L: bench.generation_point(model, zc, 1, L)))
            if "batch" in what and not hf:
                def batch_point(B, **extra):
                    return guarded(shape, variant, "batch", {"batch": B, "length": args.batch_length, **extra},
                                   lambda: {**bench.generation_point(model, zc, B, args.batch_length), **extra})

                failed, largest_ok = None, 0
                for B in batches:
                    if failed is not None:  # a larger batch needs more memory still
                        add(shape, variant, "batch", {"batch": B, "length": args.batch_length, "status": "oom",
                                                      "error": "a smaller batch did not fit"})
                        continue
                    st = batch_point(B)
                    if st == "ok":
                        largest_ok = B
                    elif st == "oom":
                        failed = B
                if failed is not None and args.fit_step > 0:
                    fit_search(largest_ok, failed, args.fit_step, lambda B: batch_point(B, fit_search=True) == "ok")
            if "prefill" in what:
                for T in prefill:
                    guarded(shape, variant, "prefill", {"batch": 1, "length": T},
                            lambda T=T: bench.prefill_point(model, zc, T, hf=hf))
            del model
            free()

    (out / "bench.md").write_text(report.markdown(res) + "\n")
    files = report.plots(res, out)
    print(report.markdown(res))
    print(f"zebra bench: wrote {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {f}" for f in files))
    return 0
