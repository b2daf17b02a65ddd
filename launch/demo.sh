#!/usr/bin/env bash
# The README's first command (`make demo`). Which run a machine gets:
#   - a GPU, with CIFAR-10 and the ImageNet VGG16 weights (found or downloaded): the reference recipe, VGG16
#     transfer learning on CIFAR-10 at 224 px for 3 epochs (minutes on a recent GPU);
#   - no GPU, with the data and weights: a debug-sized VGG16 transfer run (1 epoch of 256 images; a full
#     epoch at 224 px takes hours on a CPU);
#   - offline (no CIFAR-10 or no weights): after a loud banner, a small ResNet-18 trained from scratch on the
#     learnable synthetic set at 32 px, which visibly learns in under a minute on a CPU (test accuracy from
#     chance, 10 %, to about 85 %). That fallback exists only here, never in a normal `train.py` run.
# Knobs: DEMO_OUT (runs/demo), DATA_DIR (./data), DEMO_OFFLINE=1 (go straight to the offline run),
# DEMO_EPOCHS / DEMO_TRAIN / DEMO_EVAL (the offline run's epochs and image counts: 2 / 1000 / 300).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${DEMO_OUT:-runs/demo}

summary() { # the epochs' test accuracy from metrics.jsonl, against chance
    python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
accs = " -> ".join(f"{r['test_acc']:.2f}" for r in rows)
print(f"demo: test accuracy by epoch {accs} (chance 0.10)")
PY
}

code=2
if [[ ${DEMO_OFFLINE:-0} != 1 ]]; then
    if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        size=(--image-size 224 --epochs 3) # the reference recipe (global batch 32, SGD lr 1e-3 momentum 0.9)
    else
        size=(--debug)
    fi
    python train.py "${size[@]}" --model vgg16 --mode transfer --dataset cifar10 --data-dir "${DATA_DIR:-./data}" \
        --output-dir "$OUT" --overwrite "$@"
    code=$?
fi
if [[ $code -eq 2 ]]; then
    cat >&2 <<'BANNER'

###############################################################################################
#  OFFLINE DEMO: CIFAR-10 or the ImageNet VGG16 weights could not be found or downloaded (see   #
#  the error above). Training a small ResNet-18 FROM SCRATCH on SYNTHETIC data at 32 px instead #
#  (it learns in about a minute on a CPU). The numbers say nothing about CIFAR-10.              #
#  README "Offline machines" says what to place where for the real demo.                        #
###############################################################################################

BANNER
    python train.py --model resnet18 --mode scratch --dataset synthetic --image-size 32 \
        --epochs "${DEMO_EPOCHS:-2}" --train-subset "${DEMO_TRAIN:-1000}" --eval-subset "${DEMO_EVAL:-300}" \
        --batch-size 32 --lr 0.01 --output-dir "$OUT" --overwrite "$@"
    code=$?
fi
if [[ $code -eq 0 ]]; then
    summary
    echo "demo run: $OUT (metrics.jsonl, curves.png, checkpoints/, model.safetensors)"
fi
exit "$code"
