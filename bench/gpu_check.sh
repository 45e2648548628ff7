#!/usr/bin/env bash
# GPU readiness check (a few minutes; CI never runs it, nothing depends on it). On a CUDA machine:
#   1. extract with the default towers (ViT-B-32 + HTSAT-tiny, random init) at --batch-frames 64 and 256:
#      steady-state frames/s through the engine vs the bare batched CLIP tower,
#   2. the paper preset (paper-r50) trained a few steps with AMP: steps/s and peak GPU memory,
#   3. a probe model stage on Ray: one actor per GPU, each holding its own GPU.
# Usage: bench/gpu_check.sh            (from anywhere; PYTHON=... picks the interpreter)
#        GPU_CHECK_CPU=1 bench/gpu_check.sh   runs the same steps at tiny sizes on a CPU (tests this script)
# Exit status: 0 when every check printed OK, 1 when one printed FAIL or crashed, 2 without a CUDA device.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    echo "gpu_check: GPU_CHECK_CPU=1: tiny sizes on the CPU (a test of this script, not a measurement)"
    tiny=(--encoders tiny --size 48 --device cpu) clips=(8 8) preset=tiny steps=2 batch=2 slow=4
elif ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing checked" >&2
    exit 2
else
    "$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
    tiny=() clips=(192 384) preset=paper-r50 steps=10 batch=8 slow=1
fi

failed=0
step() {  # step LABEL SECONDS ARGS...: one check under a time limit; its OK/FAIL line, or why it died
    local label=$1 limit=$(($2 * slow))
    shift 2
    echo "== $label"
    local start=$SECONDS rc=0
    timeout --signal=KILL "$limit" "$PYTHON" bench/gpu_check.py "$@" 2> >(grep -v -e RandomWeightsWarning -e 'RANDOM init' -e meshgrid -e '^ *clip = ' -e '^ *clap = ' -e '_VF.meshgrid' >&2) || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAIL $label: exit status $rc$([ "$rc" -eq 137 ] && echo " (killed after ${limit}s)")"
        failed=1
    fi
    echo "   ($((SECONDS - start)) s)"
}

step "extract, batch 64"  150 extract --batch 64  --clips "${clips[0]}" --unit-size 64 "${tiny[@]}"
step "extract, batch 256" 150 extract --batch 256 --clips "${clips[1]}" --unit-size 128 "${tiny[@]}"
step "train $preset, AMP" 90 train --preset "$preset" --steps "$steps" --batch "$batch" ${tiny[@]:+--device cpu}
step "Ray actors per GPU"  60 actors --clips 16

if [ "$failed" -ne 0 ]; then
    echo "gpu_check: FAILED (see the FAIL lines above)"
    exit 1
fi
echo "gpu_check: all checks OK"
