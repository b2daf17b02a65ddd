#!/usr/bin/env bash
# The README's first command: one single-process debug run of VGG16 transfer learning on CIFAR-10.
# Offline (no CIFAR-10 and no ImageNet weights reachable) it falls back, loudly, to synthetic data and
# random weights: that fallback exists only here, never in a normal `train.py` run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${DEMO_OUT:-runs/demo}

python train.py --debug --model vgg16 --mode transfer --dataset cifar10 --data-dir "${DATA_DIR:-./data}" \
    --output-dir "$OUT" --overwrite "$@"
code=$?
if [ "$code" -eq 2 ]; then
    cat >&2 <<'BANNER'

###############################################################################################
#  OFFLINE DEMO: CIFAR-10 or the ImageNet VGG16 weights could not be found or downloaded (see   #
#  the error above). Running on SYNTHETIC data with RANDOM weights (--mode scratch) instead.     #
#  The numbers below say nothing about CIFAR-10. README "Offline machines" says what to place.  #
###############################################################################################

BANNER
    python train.py --debug --model vgg16 --mode scratch --weights none --dataset synthetic \
        --image-size 32 --output-dir "$OUT" --overwrite "$@"
    code=$?
fi
[ "$code" -eq 0 ] && echo "demo run: $OUT (metrics.jsonl, curves.png, checkpoints/, model.safetensors)"
exit "$code"
