#!/usr/bin/env bash
# The study's method comparison, small: on the built-in `digits` set (real 8x8 handwritten digits),
# train a teacher, a CE student, and one student per distillation method, then print top-1 per method.
# Single seed, short schedule: minutes on a laptop CPU. Usage:
#   bash examples/study_methods.sh [OUT_DIR]        (kdcli on PATH; EPOCHS=10 TEACHER=... STUDENT=... to change)
set -euo pipefail
OUT=${1:-runs/study_methods}
EPOCHS=${EPOCHS:-10}
TEACHER=${TEACHER:-cifar_resnet26}
STUDENT=${STUDENT:-cifar_resnet8}
COMMON=(--dataset digits --epochs "$EPOCHS" --batch-size 64 --overwrite)

kdcli train --model "$TEACHER" "${COMMON[@]}" --out "$OUT/teacher"
kdcli train --model "$STUDENT" "${COMMON[@]}" --out "$OUT/ce"
# every registered method but the baseline; online methods (dml) train a fresh peer of the teacher's
# architecture instead of distilling the trained teacher
LIST='from kdcli import methods as m; print(" ".join(f"{n}:{int(m.get(n).online)}" for n in m.available() if n != "ce"))'
for entry in $(python -c "$LIST"); do
  method=${entry%%:*}
  if [ "${entry##*:}" = 1 ]; then teacher=$TEACHER; else teacher=$OUT/teacher/model.safetensors; fi
  kdcli distill --teacher "$teacher" --student "$STUDENT" --method "$method" "${COMMON[@]}" --out "$OUT/$method"
done

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for rep in sorted(out.glob("*/report.json")):
    r = json.loads(rep.read_text())
    if rep.parent.name == "teacher":
        continue
    m = r["metrics"]["final"]
    rows.append((r["method"]["name"], r["method"]["family"], m["top1"], m["nll"], m["ece"], r["timing"]["total_seconds"]))
ce = next(row[2] for row in rows if row[0] == "ce")
t = json.loads((out / "teacher" / "report.json").read_text())["metrics"]["final"]["top1"]
print(f"\nteacher top-1 {100 * t:.2f}%\n")
print(f"| method | family | top-1 | vs CE | NLL | ECE | seconds |\n|---|---|---|---|---|---|---|")
for name, family, top1, nll, ece, secs in sorted(rows, key=lambda r: -r[2]):
    print(f"| {name} | {family} | {100 * top1:.2f}% | {100 * (top1 - ce):+.2f} | {nll:.3f} | {ece:.3f} | {secs:.0f} |")
PY
