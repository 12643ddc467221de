"""Publish the finished columns of a CIFAR-10 study into ``examples/study_cifar10/<name>/``.

    python examples/study_cifar10/publish.py STUDY_DIR examples/study_cifar10/noise-cpu \
        --preset cifar10-noise-cpu --dataset /work/shared/data/cifar10

STUDY_DIR is a ``kdcli study --out`` folder (finished or not). Every run's ``report.json`` is copied into
DEST/runs/ (the same layout, nothing else of a run: no checkpoints, no caches), so DEST holds what the tables are
made of and a copy of DEST resumes the study (finished runs are skipped). Then results.md, results.csv, gain.png
and top1.png are rewritten from the settings whose every run has finished (a column short of one run is left
out, not shown half done), and a summary per setting is printed for README. Run it from the repository root with
kdcli installed; it uses kdcli's own study code, nothing of its own but the copying and the summary.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kdcli.study import plan, results
from kdcli.study import spec as study_spec


def copy_reports(src: Path, dst: Path) -> int:
    n = 0
    if src.resolve() == dst.resolve():
        return n
    for report in sorted((src / "runs").glob("*/*/seed-*/*/report.json")):
        target = dst / report.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, target)
        n += 1
    return n


def summary(res: dict) -> None:
    for setting in dict.fromkeys(g["setting"] for g in res["groups"]):
        groups = [g for g in res["groups"] if g["setting"] == setting]
        teacher = next(g for g in groups if g["role"] == "teacher")
        ce = next(g for g in groups if g["role"] == "student" and g["alone"])
        students = [g for g in groups if g["gain_over_ce"] is not None]
        ahead = [g for g in students if g["gain_over_ce"] > 0]
        every = [g for g in students if g["seeds_ahead"] and g["seeds_ahead"][0] == g["seeds_ahead"][1]]
        by_gain = sorted(students, key=lambda g: -g["gain_over_ce"])
        print(f"## {setting}: teacher {results.pct(teacher['top1_mean'], teacher['top1_std'])}, "
              f"CE {results.pct(ce['top1_mean'], ce['top1_std'])}")
        print(f"  above CE on average {len(ahead)}/{len(students)}, on every seed {len(every)}")
        for g in by_gain:
            print(f"  {g['method']:8s} {results.signed(g['gain_over_ce']):>7s} "
                  f"{g['seeds_ahead'][0]}/{g['seeds_ahead'][1]}  best {results.pct(g['best_top1_mean'])}")
        for what in ("memorised", "corrected"):
            if ce.get(f"{what}_mean") is None:
                continue
            vals = [g[f"{what}_mean"] for g in students if g.get(f"{what}_mean") is not None]
            more = sum(v > ce[f"{what}_mean"] for v in vals)
            print(f"  {what}: CE {100 * ce[f'{what}_mean']:.1f} %, teacher {100 * teacher[f'{what}_mean']:.1f} %, "
                  f"students {100 * min(vals):.1f}-{100 * max(vals):.1f} % ({more}/{len(vals)} more than CE)")
        rows = [r for r in res["runs"] if r["setting"] == setting]
        secs: dict[str, list[float]] = {}
        for r in rows:
            secs.setdefault("teacher" if r["role"] == "teacher" else r["method"], []).append(r["seconds"])
        mean = sorted((sum(v) / len(v), k) for k, v in secs.items())
        print(f"  run time {sum(r['seconds'] for r in rows) / 3600:.2f} h in all; per run: "
              + ", ".join(f"{k} {s:.0f} s" for s, k in mean))

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--dataset", required=True)
    a = ap.parse_args()
    print(f"copied {copy_reports(a.study, a.dest)} reports")
    spec, _ = study_spec.load(preset=a.preset, dataset=a.dataset)
    done_settings = []
    for noise, imbalance in spec.settings:
        label = plan.setting_label(noise, imbalance)
        runs = [r for r in plan.plan(spec, a.dest) if r.setting == label]
        if all((r.out / "report.json").is_file() for r in runs):
            done_settings.append((noise, imbalance))
    keep = {"noise": list(dict.fromkeys(n for n, _ in done_settings)),
            "imbalance": list(dict.fromkeys(i for _, i in done_settings))}
    spec = spec.model_copy(update=keep)
    print("finished settings:", ", ".join(plan.setting_label(n, i) for n, i in spec.settings))
    res = results.write_study(a.dest, plan.plan(spec, a.dest), spec)
    (a.dest / "results.json").unlink()
    plots = a.dest / "plots"
    for png in plots.glob("*.png"):
        png.replace(a.dest / ("gain.png" if png.stem.endswith("_gain") else "top1.png"))
    plots.rmdir()
    summary(res)


if __name__ == "__main__":
    main()
