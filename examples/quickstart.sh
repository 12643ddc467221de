#!/usr/bin/env bash
# kdcli quickstart on the built-in `digits` set (real 8x8 handwritten digits, offline):
# train a teacher, train a baseline student, distill the same student with KD, evaluate all three.
# Usage: bash examples/quickstart.sh [OUT_DIR]   (kdcli must be on PATH: `make demo` does that)
set -euo pipefail
OUT=${1:-runs/quickstart}
EPOCHS=${EPOCHS:-20}
COMMON=(--dataset digits --epochs "$EPOCHS" --batch-size 64 --lr 0.05 --overwrite)

kdcli train   --model cifar_resnet26 "${COMMON[@]}" --out "$OUT/teacher"
kdcli train   --model cifar_resnet8  "${COMMON[@]}" --out "$OUT/student_ce"
kdcli distill --teacher "$OUT/teacher/model.safetensors" --student cifar_resnet8 --method kd \
              "${COMMON[@]}" --out "$OUT/student_kd"

for run in teacher student_ce student_kd; do
  kdcli evaluate "$OUT/$run/model.safetensors" --dataset digits \
        --teacher "$OUT/teacher/model.safetensors" --out "$OUT/$run/eval.json" > /dev/null
done

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"\n{'run':<12} {'model':<15} {'params':>8} {'top-1':>7} {'NLL':>7} {'ECE':>7} {'agree':>7}")
for run in ("teacher", "student_ce", "student_kd"):
    r = json.load(open(f"{out}/{run}/eval.json"))
    m = r["metrics"]["final"]
    print(f"{run:<12} {r['checkpoint']['name']:<15} {r['checkpoint']['params']:>8} {100 * m['top1']:>6.2f}% "
          f"{m['nll']:>7.3f} {m['ece']:>7.3f} {100 * m['teacher_agreement']:>6.1f}%")
print(f"\nreports: {out}/*/report.json   checkpoints: {out}/*/model.safetensors")
PY
