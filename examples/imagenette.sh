#!/usr/bin/env bash
# The practitioner's workflow on real photographs (Imagenette: 10 ImageNet classes, 128x128 JPEGs):
# a teacher at 128 px and a small student at 64 px, a CE baseline and KD, with ImageNet-style augmentation
# (random-resized crop + flip, built by timm). The teacher starts from a 1000-class checkpoint file when
# TEACHER_WEIGHTS=FILE is given (its classifier is re-initialised for the 10 classes), from scratch otherwise.
#
# Usage: bash examples/imagenette.sh DATA_DIR [OUT_DIR]
#   DATA_DIR: a folder of class sub-folders with train/ and val/ (e.g. ../shared/data/imagenette-128)
#   CPU-sized by default (4 epochs each); FULL=1: 40 epochs for the teacher, 30 for the students.
#   (No subset by default: an image folder's rows are sorted by class, so train[:30%] would hold 3 classes.)
#   TEACHER, STUDENT, TEACHER_SIZE, STUDENT_SIZE, T_EPOCHS, S_EPOCHS, SPLIT override.
set -euo pipefail
DATA=${1:?usage: bash examples/imagenette.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/imagenette}
TEACHER=${TEACHER:-resnet18}
STUDENT=${STUDENT:-mobilenetv3_small_100}
TEACHER_SIZE=${TEACHER_SIZE:-128}
STUDENT_SIZE=${STUDENT_SIZE:-64}
if [ "${FULL:-0}" = 1 ]; then
  SPLIT=${SPLIT:-train}; T_EPOCHS=${T_EPOCHS:-40}; S_EPOCHS=${S_EPOCHS:-30}
else
  SPLIT=${SPLIT:-train}; T_EPOCHS=${T_EPOCHS:-4}; S_EPOCHS=${S_EPOCHS:-4}
fi
COMMON=(--dataset "$DATA" --train-split "$SPLIT" --augment imagenet --batch-size 64
        --lr 0.05 --auto-resume)
T_INIT=()
if [ -n "${TEACHER_WEIGHTS:-}" ]; then T_INIT=(--model-weights "$TEACHER_WEIGHTS"); fi

start=$(date +%s)
kdcli train --model "$TEACHER" "${T_INIT[@]}" --image-size "$TEACHER_SIZE" --epochs "$T_EPOCHS" "${COMMON[@]}" \
      --out "$OUT/teacher"
kdcli train --model "$STUDENT" --image-size "$STUDENT_SIZE" --epochs "$S_EPOCHS" "${COMMON[@]}" \
      --out "$OUT/student_ce"
kdcli distill --teacher "$OUT/teacher" --student "$STUDENT" --image-size "$STUDENT_SIZE" --method kd \
      --epochs "$S_EPOCHS" "${COMMON[@]}" --out "$OUT/student_kd"
echo "total: $(( $(date +%s) - start )) s"

python "$(dirname "$0")/summary.py" "$OUT"
