#!/usr/bin/env bash
# The study on real CIFAR-10: every method of `kdcli methods` against standard training (CE) under label noise
# (symmetric 0, 0.2, 0.4, 0.6; asymmetric 0.4) and class imbalance (long tail 10, 50, 100), three seeds, each
# teacher trained on the corrupted data of its students. DATA_DIR: CIFAR-10 in the hub layout of uoft-cs/cifar10
# (DATA_DIR/plain_text/{train,test}-*.parquet).
#
# Usage: bash examples/study_cifar10.sh DATA_DIR [OUT_DIR]
#   CPU-sized by default (the -cpu presets: 5,000 training images, ResNet-14 -> ResNet-8, students 8 epochs,
#   teachers 24; 1 h 39 min + about 6 h on 2 idle cores). FULL=1: the full presets (all 50,000, ResNet-56 -> ResNet-20, the
#   field's 240-epoch recipe), for GPUs. JOBS=2 runs at a time by default. Interrupt at will: the same command
#   skips finished runs and resumes the rest. The copies under examples/study_cifar10/ are from this script.
set -euo pipefail
DATA=${1:?usage: bash examples/study_cifar10.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/study_cifar10}
JOBS=${JOBS:-2}
SIZE=-cpu
if [ "${FULL:-0}" = 1 ]; then SIZE=; fi

for study in imbalance noise; do
  kdcli study --preset "cifar10-$study$SIZE" --dataset "$DATA" --out "$OUT/$study$SIZE" --jobs "$JOBS"
  echo "table:  $OUT/$study$SIZE/results.md   plots: $OUT/$study$SIZE/plots/"
done
echo "any set of runs, grouped by what differs: kdcli compare $OUT/noise$SIZE/runs --format md"
