#!/usr/bin/env bash
# The field's training recipe against a modern one, for the same teacher, student and epochs, on real data:
#   field:  SGD 0.05 with momentum, weight decay 5e-4 on every parameter, cosine (RepDistiller's CIFAR recipe)
#   modern: AdamW 2e-3, weight decay 0.05 off norms and biases, 2 warm-up epochs, cosine per update, mixup 0.8 (the teacher
#           sees the same mixed images: Beyer et al.'s "consistent" teaching), EMA of the student (decay 0.998)
# Each recipe trains a CE student and a KD student from one teacher (trained once, with the field's recipe).
#
# Usage: bash examples/recipes.sh DATA_DIR [OUT_DIR]
#   DATA_DIR: CIFAR-10 in the hub layout (DATA_DIR/plain_text/*.parquet) or an image folder (Imagenette).
#   CPU-sized by default: the first 10,000 training images (SPLIT), 15 epochs (EPOCHS), cifar_resnet20 ->
#   cifar_resnet8 (TEACHER, STUDENT); TEACHER_RUN=DIR reuses a finished teacher run (e.g. examples/cifar10.sh's).
set -euo pipefail
DATA=${1:?usage: bash examples/recipes.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/recipes}
TEACHER=${TEACHER:-cifar_resnet20}; STUDENT=${STUDENT:-cifar_resnet8}; EPOCHS=${EPOCHS:-15}
SPLIT=${SPLIT:-train[:10000]}; AUGMENT=${AUGMENT:-cifar}
COMMON=(--dataset "$DATA" --train-split "$SPLIT" --augment "$AUGMENT" --epochs "$EPOCHS" --batch-size 64
        --auto-resume)
FIELD=(--opt momentum --lr 0.05 --weight-decay 5e-4 --sched cosine)
MODERN=(--opt adamw --lr 0.002 --weight-decay 0.05 --no-decay-norm-bias --warmup-epochs 2 --sched cosine --sched-on-updates
        --mixup 0.8 --ema 0.998)

start=$(date +%s)
T=${TEACHER_RUN:-$OUT/teacher}
[ -n "${TEACHER_RUN:-}" ] || kdcli train --model "$TEACHER" "${COMMON[@]}" "${FIELD[@]}" --out "$T"
for recipe in field modern; do
  if [ "$recipe" = field ]; then ARGS=("${FIELD[@]}"); else ARGS=("${MODERN[@]}"); fi
  kdcli train   --model "$STUDENT" "${COMMON[@]}" "${ARGS[@]}" --out "$OUT/ce_$recipe"
  kdcli distill --teacher "$T" --student "$STUDENT" --method kd "${COMMON[@]}" "${ARGS[@]}" --out "$OUT/kd_$recipe"
done
echo "total: $(( $(date +%s) - start )) s"

python "$(dirname "$0")/summary.py" "$OUT" ce_field kd_field ce_modern kd_modern
