#!/usr/bin/env bash
# The whole study in one command: every method of `kdcli methods` against standard training (CE) on the
# built-in digits set, at symmetric label noise 0, 0.2 and 0.4, three seeds, short schedule (the
# `digits-noise` preset). Interrupt it at will: the same command skips finished runs and resumes the rest.
# Usage: bash examples/study_digits.sh [OUT_DIR]   (JOBS=2 runs at a time by default)
set -euo pipefail
OUT=${1:-runs/study_digits}
JOBS=${JOBS:-2}

kdcli study --preset digits-noise --out "$OUT" --jobs "$JOBS"

echo
echo "table:  $OUT/results.md   (all runs: $OUT/results.csv, $OUT/results.json)"
echo "plots:  $(ls "$OUT"/plots/*.png | tr '\n' ' ')"
echo "any set of runs, grouped by what differs: kdcli compare $OUT/runs --format md"
