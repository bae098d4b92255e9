#!/usr/bin/env bash
# The long GPU job, started in the background by `tools/gpu_session.sh start` (setsid: it outlives the device
# call; later calls follow it with `tools/gpu_session.sh wait`). Steps, each logged to /tmp/<step>.log and
# /tmp/job.log:
#   smoke    configs/gpu-smoke.yaml: every stage in about a minute; on failure nothing else runs (not by default)
#   bench    zebra bench --what train (SmolLM2 pair and the Llama-3.2-1B shape) -> /tmp/results/train-bench
#   quality  zebra run configs/smollm2-135m-quality.yaml -> /tmp/quality (lm-eval of teacher and student inside)
#   ablate   zebra ablate configs/ablations-smollm2.yaml -> /tmp/ablations, until JOB_DEADLINE (epoch seconds)
#   decode   zebra bench (issue 10 item 5): 8B / 1B batch-1 decode at 1k-32k, the 8B batch sweep at 8k
#            -> /tmp/results/bench-decode (DECODE_S: its time limit, default 360; DECODE_BATCHES: the sweep, default
#            96,128,256; below a batch that runs out of memory the bench bisects to the largest that fits, e.g.
#            Llama-8B at 8k on an 80 GB card)
#   fsdp     torchrun --nproc-per-node 1 -m zebra.cli bench --what train --shapes 1b --train-variants fast,fsdp
#            (issue 11 item 7: the 1B stages under FSDP2, peak memory against zebra plan) -> /tmp/results/fsdp-bench
#   gputests every GPU test (GPU_TESTS, default tests/test_*_gpu.py) within GPU_TEST_S (default 300) seconds; each test
#            also under its own limit (tests/conftest.py)
# JOB_STEPS (default "quality bench ablate": the run first, it is the result that matters) picks steps.
# /tmp/job.done marks the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=/tmp/results
mkdir -p "$R"
: > /tmp/job.log
say() { echo "$(date +%T) $*" | tee -a /tmp/job.log; }
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log, return its status
    local name=$1 limit=$2; shift 2
    say "start $name"
    timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
    local rc=$?
    say "end $name rc=$rc"
    return $rc
}
deadline=${JOB_DEADLINE:-$(( $(date +%s) + 1500 ))}
for s in ${JOB_STEPS:-quality bench ablate}; do
    case $s in
    smoke)
        step smoke 420 python3 -m zebra.cli run configs/gpu-smoke.yaml --out /tmp/smoke \
            || { say "SMOKE FAILED: nothing else runs"; tail -40 /tmp/smoke.log >> /tmp/job.log; break; } ;;
    bench)
        step bench 300 python3 -m zebra.cli bench --what train --shapes smollm2,1b --train-variants fast,fla \
            --steps 5 --warmup 2 --out "$R/train-bench"
        # the compiled path failed (a compiler crash is not a Python error): the runs go on without torch.compile
        python3 - <<'PY' || { export ZEBRA_COMPILE=0; say "compiled training failed in the bench: ZEBRA_COMPILE=0"; }
import json, sys
rows = json.load(open("/tmp/results/train-bench/bench.json"))["train"]
sys.exit(0 if any(r["variant"] == "fast" and r.get("status") == "ok" for r in rows) else 1)
PY
        ;;
    decode)
        step decode $(( ${DECODE_S:-360} + 60 )) python3 -m zebra.cli bench --shapes 8b,1b --variants llama,zebra \
            --lengths 1024,8192,32768 --batches "${DECODE_BATCHES:-96,128,256}" --batch-length 8192 \
            --what decode,batch --steps 8 --time-limit "${DECODE_S:-360}" --out "$R/bench-decode" ;;
    fsdp)
        step fsdp 300 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m zebra.cli bench --what train \
            --shapes 1b --train-variants fast,fsdp --steps 5 --warmup 2 --out "$R/fsdp-bench"
        python3 tools/plan_check.py "$R/fsdp-bench/bench.json" --out "$R/fsdp-bench" >> /tmp/fsdp.log 2>&1 ;;
    gputests)
        # -v: each test's name and result as it ends, so a suite cut off by GPU_TEST_S still says where it was
        step gputests "${GPU_TEST_S:-300}" python3 -m pytest -v -rA --durations=15 -p no:cacheprovider -m gpu \
            ${GPU_TESTS:-tests/test_*_gpu.py} ;;
    quality)
        step quality 1200 python3 -m zebra.cli run configs/smollm2-135m-quality.yaml --out /tmp/quality ;;
    ablate)
        left=$(( deadline - $(date +%s) - 60 ))
        if [ "$left" -gt 120 ]; then
            step ablate "$left" python3 -m zebra.cli ablate configs/ablations-smollm2.yaml --out /tmp/ablations \
                --time-limit $(( left - 100 ))
        else
            say "ablate: skipped, ${left}s left before the deadline"
        fi ;;
    esac
done
touch /tmp/job.done
say "job done"
