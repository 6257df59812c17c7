#!/usr/bin/env bash
# The GPU check: everything that needs a GPU, in one command, on a bare machine (no network,
# no diffusers). Here first: `bash bench/fetch_wheels.sh` (fills .whl/). There, from the
# repository's root, with .whl carried (device tool: carry [".whl"]):
#
#   bash bench/gpu_check.sh
#
# Steps, each timed, each under its own timeout, all within GPU_CHECK_TOTAL_S (default 470 s,
# so the whole fits 8 minutes on an H100/H200); a failing step does not stop the next, and
# the exit status is 1 if any failed:
#   1. tests/test_cuda.py (the cuda-marked tests)
#   2. bench/core_gpu.py --quick (6-layer Z-Image transformer, 512 px, every core row)
#   3. bench/gpu_e2e.py (one Z-Image generation, random weights, 8-layer transformer at the
#      published width, 1024 px, under every preset and caps of 25% and 50% of the weights)
# The log and the tables go to $OUT when it is set (the device tool returns what is there),
# else bench/out/gpu_check/. Models and weights are written under bench/out/ (not $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
REPORT=${OUT:-bench/out/gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/lowvram-site}
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
mkdir -p "$REPORT"
START=$(date +%s)
FAILED=()
SUMMARY=()

note() { printf '\n==== %s (%ds) ====\n' "$*" "$(( $(date +%s) - START ))"; }

# run_step NAME SECONDS COMMAND...: the command under `timeout`, cut to what the total allows.
run_step() {
    local name=$1 budget=$2; shift 2
    local left=$(( TOTAL_S - ($(date +%s) - START) ))
    if (( left < 30 )); then
        echo "$name: not run, ${left}s of the ${TOTAL_S}s total left"
        FAILED+=("$name (not run: out of time)"); SUMMARY+=("| $name | not run | - | out of time |")
        return
    fi
    (( budget > left )) && budget=$left
    note "$name (timeout ${budget}s)"
    echo "+ $*"
    local t0=$(date +%s) rc
    timeout -k 15 "$budget" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 )) verdict=ok
    if (( rc == 124 || rc == 137 )); then
        verdict="TIMED OUT after ${budget}s"
    elif (( rc )); then
        verdict="FAILED (exit $rc)"
    fi
    echo "---- $name: $verdict in ${took}s"
    SUMMARY+=("| $name | $verdict | ${took} s | $* |")
    (( rc )) && FAILED+=("$name: $verdict")
}

main() {
    note "setup"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
        TOKENIZERS_PARALLELISM=false
    # The carried wheels go to a folder of their own on PYTHONPATH: nothing of the image's
    # Python is changed, and PEP 668 ("externally managed") does not apply to --target.
    local wheels=(.whl/*.whl)
    if [[ -e ${wheels[0]} ]]; then
        rm -rf "$SITE"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
                --target "$SITE" "${wheels[@]}"; then
            echo "installed into $SITE: ${wheels[*]##*/}"
        else
            FAILED+=("setup: pip install of .whl/*.whl failed")
        fi
    else
        echo "no .whl/*.whl here: run bash bench/fetch_wheels.sh on a machine with PyPI and carry .whl"
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # A carried transformers that does not import with the image's packages (its runtime
    # version checks) is dropped again: the image's own is then used.
    if [[ -d $SITE/transformers ]] && ! "$PY" -c "import transformers" 2>"$REPORT/transformers-import.txt"; then
        echo "the carried transformers does not import here; using the image's:"
        tail -n 3 "$REPORT/transformers-import.txt"
        rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
    fi
    rm -f "$REPORT/transformers-import.txt"

    note "machine"
    nvidia-smi || FAILED+=("nvidia-smi failed")
    "$PY" - <<'EOF' || FAILED+=("CUDA is not usable from torch, or diffusers/transformers do not import")
import platform, sys, torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
for name in ("diffusers", "transformers", "huggingface_hub", "tokenizers", "safetensors", "accelerate", "numpy",
             "psutil", "pynvml", "pytest"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:  # noqa: BLE001 - report every missing package, then fail
        print(f"  {name}: not importable: {type(error).__name__}: {error}")
        if name in ("diffusers", "transformers"):
            sys.exit(1)
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False")
props = torch.cuda.get_device_properties(0)
free, total = torch.cuda.mem_get_info()
print(f"GPU: {props.name}, sm_{props.major}{props.minor}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")
EOF

    local pytest_args=(-q -p no:cacheprovider -rA --durations=10 tests/test_cuda.py -m cuda)
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        pytest_args+=(--timeout=120)   # one test that hangs (a wait that never ends) fails alone
    fi
    run_step "tests/test_cuda.py" 150 "$PY" -m pytest "${pytest_args[@]}"

    local skip=()
    "$PY" -c "import diffsynth" 2>/dev/null || skip=(--skip diffsynth_limit25,diffsynth_limit50,diffsynth_disk)
    run_step "bench/core_gpu.py --quick" 170 "$PY" bench/core_gpu.py --quick "${skip[@]}" --timeout 100 \
        --markdown "$REPORT/core_gpu.md" --json "$REPORT/core_gpu.json"

    run_step "bench/gpu_e2e.py" 200 "$PY" bench/gpu_e2e.py --timeout 100 --budget-s 185 --report-dir "$REPORT"

    note "summary"
    {
        echo "| step | result | time | command |"
        echo "|---|---|---|---|"
        printf '%s\n' "${SUMMARY[@]}"
        echo
        if (( ${#FAILED[@]} )); then printf 'FAILED: %s\n' "${FAILED[@]}"; else echo "every step passed"; fi
        echo "total $(( $(date +%s) - START )) s"
    } | tee "$REPORT/summary.md"
    (( ${#FAILED[@]} == 0 ))
}

main "$@" 2>&1 | tee "$REPORT/gpu_check.log"
exit "${PIPESTATUS[0]}"
