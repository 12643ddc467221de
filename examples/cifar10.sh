#!/usr/bin/env bash
# The field's CIFAR pair on real CIFAR-10 (hub layout: DATA_DIR/plain_text/{train,test}-*.parquet, or the hub
# id uoft-cs/cifar10 where the hub is reachable): a cifar_resnet20 teacher, a cifar_resnet8 CE baseline and a
# cifar_resnet8 KD student, with the CIFAR recipe (pad-crop + flip, SGD with momentum, cosine schedule).
#
# Usage: bash examples/cifar10.sh DATA_DIR [OUT_DIR]
#   CPU-sized by default: the first 10,000 training images, 15 epochs. FULL=1: all 50,000, the field's
#   240-epoch step recipe, cifar_resnet56 -> cifar_resnet20 (for a GPU).
#   TEACHER, STUDENT, EPOCHS, SPLIT, SCHEDULE override.
set -euo pipefail
DATA=${1:?usage: bash examples/cifar10.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/cifar10}
if [ "${FULL:-0}" = 1 ]; then
  TEACHER=${TEACHER:-cifar_resnet56}; STUDENT=${STUDENT:-cifar_resnet20}; EPOCHS=${EPOCHS:-240}
  SPLIT=${SPLIT:-train}; SCHEDULE=${SCHEDULE:-step}
else
  TEACHER=${TEACHER:-cifar_resnet20}; STUDENT=${STUDENT:-cifar_resnet8}; EPOCHS=${EPOCHS:-15}
  SPLIT=${SPLIT:-train[:10000]}; SCHEDULE=${SCHEDULE:-cosine}
fi
COMMON=(--dataset "$DATA" --train-split "$SPLIT" --augment cifar --epochs "$EPOCHS" --schedule "$SCHEDULE"
        --batch-size 64 --lr 0.05 --auto-resume)

start=$(date +%s)
kdcli train   --model "$TEACHER" "${COMMON[@]}" --out "$OUT/teacher"
kdcli train   --model "$STUDENT" "${COMMON[@]}" --out "$OUT/student_ce"
kdcli distill --teacher "$OUT/teacher" --student "$STUDENT" --method kd "${COMMON[@]}" --out "$OUT/student_kd"
echo "total: $(( $(date +%s) - start )) s"

python "$(dirname "$0")/summary.py" "$OUT"
