#!/usr/bin/env bash
# Download, here (a machine that reaches PyPI), the pure-Python wheels that bench/gpu_check.sh
# installs on the bare GPU machine, into .whl/ (git ignores it; the device tool carries it).
#
#   bash bench/fetch_wheels.sh          # then: device run with carry [".whl"]
#
# The GPU machine's image has python3 3.12 with a CUDA torch, transformers, huggingface-hub,
# safetensors, numpy, pillow, regex, requests, filelock, psutil, nvidia-ml-py and pytest, but
# no diffusers and no network. Carried, at the versions requirements.txt pins:
#   diffusers     missing there; its other needs (huggingface-hub>=1.32, safetensors>=0.8,
#                 numpy, Pillow, regex, requests, filelock) are in the image, and
#                 importlib_metadata is needed only before Python 3.8;
#   transformers  the image's is older (5.17 when last seen); carrying the pinned one runs
#                 the check on the code CI runs. gpu_check.sh drops it again if it does not
#                 import there (its own needs: tokenizers>=0.23.1,<0.24, huggingface-hub>=1.31,
#                 regex>=2025.10.22, typer, ...).
# Not carried: gradio, modelscope and altair (only the app and downloads use them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEST=.whl
PACKAGES=(diffusers transformers)

pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -iE "^${name}==" requirements.txt | head -n1 | tr -d '[:space:]')
    if [[ -z $pin ]]; then
        echo "fetch_wheels.sh: requirements.txt pins no version of $name" >&2
        exit 1
    fi
    pins+=("$pin")
done

mkdir -p "$DEST"
# One version of each package: two would stop the whole install there.
for pin in "${pins[@]}"; do
    name=${pin%%==*}; version=${pin#*==}
    for old in "$DEST"/"${name}"-*.whl; do
        [[ -e $old ]] || continue
        [[ $(basename "$old") == "${name}-${version}-"* ]] || { echo "removing $old"; rm -f "$old"; }
    done
done

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --implementation cp --platform any --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$DEST" "${pins[@]}"

echo "wheels in $DEST/:"
total=0
for wheel in "$DEST"/*.whl; do
    size=$(stat -c %s "$wheel")
    total=$((total + size))
    awk -v n="$(basename "$wheel")" -v s="$size" 'BEGIN { printf "  %-48s %7.2f MiB\n", n, s / 1048576 }'
    # What it needs at import (extras left out), to compare with the device image's packages.
    "$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
             if line.startswith("Requires-Dist:") and "extra ==" not in line]
print("      needs: " + (", ".join(needs) or "nothing"))
EOF
done
awk -v s="$total" 'BEGIN { printf "total %.2f MiB (the device tool carries 64 MiB in all)\n", s / 1048576 }'
if (( total > 48 * 1024 * 1024 )); then
    echo "fetch_wheels.sh: more than 48 MiB of wheels; leave room for the working tree" >&2
    exit 1
fi
