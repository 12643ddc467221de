"""The table the real-data examples print: one row per run folder (teacher, CE student, KD student).

Usage: python examples/summary.py OUT_DIR [RUN ...]   (default runs: teacher student_ce student_kd)
"""

import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
runs = sys.argv[2:] or ["teacher", "student_ce", "student_kd"]
print("\n| run | model | input | params | top-1 | best top-1 | EMA top-1 | NLL | ECE | agreement with teacher "
      "| minutes |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for run in runs:
    r = json.loads((out / run / "report.json").read_text())
    m, best = r["metrics"]["final"], r["metrics"]["best"]
    agree = "–" if m["teacher_agreement"] is None else f"{100 * m['teacher_agreement']:.1f}%"
    size = r["student"].get("input_size") or r["data"]["image_size"]
    ema = r.get("ema")  # the student's moving average (--ema), evaluated beside it
    ema_top1 = "–" if not ema else f"{100 * ema['metrics']['final']['top1']:.2f}%"
    print(f"| {run} | {r['student']['name']} | {size} px | {r['student']['params'] / 1e6:.2f}M "
          f"| {100 * m['top1']:.2f}% | {100 * best['top1']:.2f}% (epoch {best['epoch']}) | {ema_top1} | {m['nll']:.3f} "
          f"| {m['ece']:.3f} | {agree} | {r['timing']['total_seconds'] / 60:.1f} |")
