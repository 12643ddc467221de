#!/usr/bin/env bash
# The GPU checks of kdcli in one call that fits 8 minutes on one GPU, printing one table:
#
#   bash benchmarks/gpu_checks.sh CIFAR10_DIR [OUT_DIR]
#
# CIFAR10_DIR is CIFAR-10 in the hub layout (plain_text/train-*.parquet, test-*.parquet). Needs kdcli importable
# by python3 (`pip install -e .` in the checkout, or PYTHON=.venv/bin/python); run it from the checkout's root.
#  1. benchmarks/gpu_step.py: kdcli's kd step (cifar_resnet56 -> cifar_resnet20) against a hand-written KD loop
#     over resident data, eager and compiled (default, reduce-overhead), batch 64 and 256, bf16 and fp32,
#     resident against loader, with nvidia-smi's utilisation beside each row.
#  2. One kdcli run alone against two at once on the one GPU (what `kdcli study --jobs 2` would do): a bf16
#     cifar_resnet20 CE epoch on 20,000 images, images per second from each run's report.
#  3. The host waits a step makes on this GPU: torch.cuda.set_sync_debug_mode("warn") over 20 steady kd steps.
set -u
DATA=${1:?usage: gpu_checks.sh CIFAR10_DIR [OUT_DIR]}
OUT=${2:-/tmp/kdcli-gpu-checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export KDCLI_CACHE_DIR=${KDCLI_CACHE_DIR:-$OUT/cache}
nvidia-smi -L 2>/dev/null
git log -1 --format='commit %h (%cs)' 2>/dev/null
start=$SECONDS

echo "# 1. kd step: kdcli against a hand-written loop"
timeout 330 $PY benchmarks/gpu_step.py --dataset "$DATA" --steps 100 --warmup 15 2>"$OUT/gpu_step.err" \
    || { echo "gpu_step.py stopped (rc $?):"; tail -3 "$OUT/gpu_step.err"; }

echo "# 2. one run alone, then two at once ($((SECONDS - start)) s so far)"
RUN=(train --model cifar_resnet20 --dataset "$DATA" --train-split "train[:20000]" --epochs 1 --precision bf16
     --batch-size 256 --overwrite)
$PY -m kdcli "${RUN[@]}" --out "$OUT/alone" >"$OUT/alone.log" 2>&1
for i in 1 2; do $PY -m kdcli "${RUN[@]}" --out "$OUT/pair$i" >"$OUT/pair$i.log" 2>&1 & done
wait
for run in alone pair1 pair2; do
  $PY - "$OUT/$run/report.json" "$run" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(f"| {sys.argv[2]} | {r['timing']['train_images_per_s']:,.0f} img/s | data path {r['data'].get('data_path')} |")
except (OSError, KeyError, ValueError) as e:
    print(f"| {sys.argv[2]} | no report ({e}) |")
EOF
done

echo "# 3. host waits in 20 steady kd steps ($((SECONDS - start)) s so far)"
timeout 120 $PY - "$DATA" <<'EOF' 2>&1 | grep -c "called a synchronizing CUDA operation" | sed 's/^/synchronizing operations: /'
import sys, tempfile, warnings
import torch
from kdcli.config import RunConfig
from kdcli.engine import loop
warnings.simplefilter("always")
with tempfile.TemporaryDirectory() as out:
    sess = loop.build(RunConfig(command="distill", teacher=["cifar_resnet56"], student="cifar_resnet20", method="kd",
                                dataset=sys.argv[1], train_split="train[:5000]", batch_size=256, precision="bf16",
                                out=out))
    batches = list(sess.train_loader)[:6]
    for b in batches:
        sess.train_step(b["image"], b["label"], b["index"])
    sess.check_finite()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    for k in range(20):
        b = batches[k % len(batches)]
        sess.train_step(b["image"], b["label"], b["index"])
    torch.cuda.set_sync_debug_mode(0)
EOF
echo "done in $((SECONDS - start)) s"
