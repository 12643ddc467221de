#!/usr/bin/env bash
# GPU checks in one command, most telling first, for a short lease of a GPU machine:
#
#   bash benchmarks/gpu_checks.sh CIFAR10_DIR [OUT_DIR]
#
# CIFAR10_DIR is CIFAR-10 in the hub layout (plain_text/train-*.parquet, test-*.parquet). KDCLI (default
# `python3 -m kdcli`) is the command that runs kdcli. Prints each step's images per second as kdcli's epoch
# lines report them, and its wall time.
#  1. Throughput of one run alone on the GPU: one epoch on all 50,000 images, bf16: CE training of
#     cifar_resnet56 (plain, then --channels-last) and of cifar_resnet20, and kd cifar_resnet56 -> cifar_resnet20.
#  2. Two runs sharing the GPU at once (what `kdcli study --jobs 2` does on one GPU): two CE cifar_resnet20 epochs.
#     On an H100 (2026-11-26) a study with --jobs 6 trained cifar_resnet56 at 437-503 img/s and cifar_resnet20
#     at 1,230-1,702 img/s with two runs at once, GPU busy 0-21 % of the time; steps 1 and 2 tell whether sharing
#     the GPU is the cause (README, Speed, "GPU").
#  3. benchmarks/speed_switches.py under bf16: plain, channels-last, compile, both.
#  4. Every method of `kdcli methods` for two short epochs under bf16 and channels-last (a study on 1,024 images).
# Every run is started afresh (--overwrite), so the script can be run again into the same OUT_DIR.
# Needs kdcli and its dependencies importable by python3 (`pip install -e .` in the checkout); run it from the
# checkout's root.
set -u
DATA=${1:?usage: gpu_checks.sh CIFAR10_DIR [OUT_DIR]}
OUT=${2:-/tmp/kdcli-gpu-checks}
K=${KDCLI:-python3 -m kdcli}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

timed() {  # timed NAME COMMAND...: run, keep the log, print its epoch lines and the wall time
    local name=$1; shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    echo "== $name (rc $?, $((SECONDS - start)) s)"; grep -E "^epoch|^done|rror" "$OUT/$name.log" | tail -3
}

nvidia-smi -L 2>/dev/null
ONE=(--dataset "$DATA" --epochs 1 --precision bf16 --workers 4 --overwrite)
echo "# 1. one run alone"
timed ce56 $K train --model cifar_resnet56 "${ONE[@]}" --out "$OUT/ce56"
timed ce56-cl $K train --model cifar_resnet56 "${ONE[@]}" --channels-last --out "$OUT/ce56-cl"
timed ce20 $K train --model cifar_resnet20 "${ONE[@]}" --out "$OUT/ce20"
timed kd56-20 $K distill --teacher cifar_resnet56 --student cifar_resnet20 --method kd "${ONE[@]}" --out "$OUT/kd56-20"

echo "# 2. two runs at once on the one GPU"
start=$SECONDS
for i in 1 2; do $K train --model cifar_resnet20 "${ONE[@]}" --out "$OUT/pair$i" >"$OUT/pair$i.log" 2>&1 & done
wait
echo "== two ce20 at once ($((SECONDS - start)) s)"; grep -h "^epoch" "$OUT"/pair1.log "$OUT"/pair2.log

echo "# 3. speed switches, bf16"
python3 "$(dirname "$0")/speed_switches.py" --precision bf16 --dataset synthetic:32:10:512 --rounds 5 --workers 0 2>&1 \
    | grep -E "^\|"

echo "# 4. every method, bf16 + channels-last"
cat >"$OUT/smoke.yaml" <<EOF
name: gpu-smoke
dataset: "$DATA"
pairs:
  - teacher: cifar_resnet20
    student: cifar_resnet8
methods: all
noise: ["symmetric:0.4"]
seeds: [0]
teacher_options:
  epochs: 1
options:
  train_split: "train[:1024]"
  eval_split: "test[:512]"
  epochs: 2
  precision: bf16
  channels_last: true
  workers: 2
EOF
rm -rf "$OUT/smoke"
start=$SECONDS
$K study "$OUT/smoke.yaml" --out "$OUT/smoke" --jobs 4 >"$OUT/smoke.log" 2>&1
echo "== every method (rc $?, $((SECONDS - start)) s): $(grep -c '^done' "$OUT/smoke.log") runs done, $(grep -c '^failed' "$OUT/smoke.log") failed"
grep "^failed" "$OUT/smoke.log"
