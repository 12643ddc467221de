"""Results of many runs: one row per report, mean ± std over seeds, the gain over CE, and the tables.

Used by ``kdcli study`` (results.json / .csv / .md for its grid) and ``kdcli compare`` (any set of runs).
Top-1 is on the clean evaluation split: at the final epoch (``top1``) and the best of any epoch (``best_top1``).
Balanced top-1 is the mean per-class top-1; many/medium/few-shot top-1 the mean over the classes with more
than 100, 20 to 100, fewer than 20 training images of their true class (known once a run reports them). Std is the
sample standard deviation over seeds (n − 1); null for a single seed.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdcli.config import CACHE_OPTIONS, DISTILL_ONLY, RunConfig
from kdcli.engine.report import Report
from kdcli.errors import KdcliError
from kdcli.study.plan import arch_name

METRICS = ("top1", "best_top1", "nll", "ece", "memorised", "corrected", "clean_train_top1", "balanced_top1",
           "many_top1", "medium_top1", "few_top1")
SHOTS = ("many", "medium", "few")
# config keys that vary between repeats of one setting, or only name files: never a grouping key
NOT_SETTINGS = ("out", "seed", "corruption_seed", "workers", "teacher", "teacher_weights", "student",
                "student_weights", "command")
# compare's column order: what the data was, then who learnt, then how; other options after
FIRST_KEYS = ("dataset", "noise", "imbalance", "student", "teacher", "method", "method_args")


def read_report(path: Path) -> Report:
    try:
        report = Report.model_validate_json(path.read_text())
        RunConfig.model_validate(report.config)  # a hand-edited config would break the grouping later
        return report
    except (OSError, ValueError, ValidationError) as e:
        first = str(e).splitlines()[0][:120]
        raise KdcliError(f"{path} is not a kdcli run report ({first})") from None


def run_row(report: Report) -> dict[str, Any]:
    """The facts of one run that results compare: what was trained on what, and how well."""
    cfg, m = report.config, report.metrics
    c = report.data.corruption or {}
    diag = c.get("diagnostics") or {}
    shots = m.final.shot_top1 or {}
    teachers = report.teachers or ([report.teacher] if report.teacher else [])
    return {
        "dataset": cfg["dataset"], "noise": cfg.get("noise"), "imbalance": cfg.get("imbalance"),
        "seed": cfg["seed"], "method": cfg["method"],
        "teacher": "+".join(t.name for t in teachers) or None, "student": report.student.name,
        "top1": m.final.top1, "best_top1": m.best.top1 if m.best else None,
        "best_epoch": m.best.epoch if m.best else None, "nll": m.final.nll, "ece": m.final.ece,
        "balanced_top1": m.final.balanced_top1, **{f"{k}_top1": shots.get(k) for k in SHOTS},
        "memorised": diag.get("memorised"), "corrected": diag.get("corrected"),
        "clean_train_top1": diag.get("clean_accuracy"), "noise_rate": c.get("noise_rate"),
        "augment": report.data.augment, "train_split": report.data.train_split,
        "eval_split": report.data.eval_split, "num_train": report.data.num_train, "num_eval": report.data.num_eval,
        "seconds": report.timing.total_seconds,
    }


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def aggregate(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows grouped by ``keys`` (first-seen order): n, seeds, and mean/std of every metric."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(_hashable(row.get(k)) for k in keys)].append(row)
    out = []
    for members in groups.values():
        g = {k: members[0].get(k) for k in keys}
        g["n"] = len(members)
        g["alone"] = all(r.get("teacher") is None for r in members)  # trained without a teacher
        g["seeds"] = sorted(r["seed"] for r in members)
        for metric in METRICS:
            values = [r.get(metric) for r in members]
            g[f"{metric}_mean"], g[f"{metric}_std"] = mean_std(values)
            g[f"{metric}_n"] = sum(v is not None for v in values)  # a run may lack one (an older report)
        unique = len({r["seed"] for r in members}) == len(members)  # compare may be given one seed twice
        g[BY_SEED] = {r["seed"]: r["top1"] for r in members if r.get("top1") is not None} if unique else None
        out.append(g)
    return out


BY_SEED = "_top1_by_seed"  # a group's final top-1 per seed, for the gain over CE; dropped from what is written


def _hashable(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v


def add_gain(groups: list[dict], baseline_keys: list[str]) -> None:
    """``gain_over_ce``: the top-1 gain over the standard-training group (a student trained without a teacher:
    CE) that agrees on ``baseline_keys``; None for such groups or when there is none. Paired by seed: the mean
    of (student − CE) over the seeds both have, so a seed that one of them lacks does not shift the gain; where
    they share no seed (or a group repeats one), the difference of the two means."""
    base = {tuple(_hashable(g.get(k)) for k in baseline_keys): g for g in groups
            if g["alone"] and g.get("role", "student") == "student"}
    for g in groups:
        ce = base.get(tuple(_hashable(g.get(k)) for k in baseline_keys))
        if ce is None or g["alone"] or g["top1_mean"] is None or ce["top1_mean"] is None:
            g["gain_over_ce"] = None
            continue
        mine, theirs = g.get(BY_SEED) or {}, ce.get(BY_SEED) or {}
        shared = [seed for seed in mine if seed in theirs]
        g["gain_over_ce"] = (statistics.fmean(mine[seed] - theirs[seed] for seed in shared) if shared
                             else g["top1_mean"] - ce["top1_mean"])


def _drop_private(groups: list[dict]) -> None:
    for g in groups:
        g.pop(BY_SEED, None)


def cell(g: dict, metric: str, seeds: int) -> str:
    """A group's mean ± std of ``metric``, with ``[n=k]`` when only k of the ``seeds`` runs give it."""
    n = g.get(f"{metric}_n", g["n"])
    return pct(g[f"{metric}_mean"], g[f"{metric}_std"]) + (f" [n={n}]" if 0 < n < seeds else "")


def short_of_seeds(groups: list[dict], seeds: int) -> bool:
    """Whether some group's metric is over fewer runs than the seeds (so the tables show ``[n=k]``)."""
    return any(0 < g.get(f"{m}_n", g["n"]) < seeds for g in groups for m in METRICS)


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def signed(gain: float | None) -> str:
    if gain is None:
        return ""
    text = f"{100 * gain:+.2f}"
    return "+0.00" if text == "-0.00" else text


# ---------------------------------------------------------------------------------------- study outputs


def study_results(runs, spec_dict: dict) -> dict:
    """Everything ``results.json`` holds: per-run rows, per-cell groups with gain over CE, missing runs."""
    rows, missing = [], []
    for run in runs:
        path = run.out / "report.json"
        if not path.is_file():
            missing.append(str(run.out))
            continue
        row = run_row(read_report(path))
        row.update(setting=run.setting, role=run.role, arch=run.arch, teacher_arch=run.teacher_arch,
                   run=str(run.out))
        rows.append(row)
    keys = ["dataset", "setting", "noise", "imbalance", "role", "method", "teacher_arch", "arch"]
    groups = aggregate(rows, keys)
    add_gain(groups, ["dataset", "setting", "arch"])
    add_seeds_ahead(groups, rows, keys)
    for g in groups:  # a teacher is trained without a teacher: it is no baseline, and has no gain
        if g["role"] == "teacher":
            g["gain_over_ce"] = g["seeds_ahead"] = None
    _drop_private(groups)
    return {"spec": spec_dict, "runs": rows, "groups": groups, "missing": missing}


def add_seeds_ahead(groups: list[dict], rows: list[dict], keys: list[str]) -> None:
    """``seeds_ahead``: [ahead, paired], the seeds on which a student's final top-1 is above that of the CE
    student of the same dataset, setting, architecture and seed (the same corruption and, in a study, the same
    teacher), of those that have one; None for CE and teachers. A gain in the mean can come from one seed:
    this says whether it held on each."""
    pair = ("dataset", "setting", "arch", "seed")
    ce = {tuple(_hashable(r.get(k)) for k in pair): r["top1"] for r in rows
          if r.get("teacher") is None and r.get("role") == "student" and r.get("top1") is not None}
    for g in groups:
        mine = [r for r in rows if all(_hashable(r.get(k)) == _hashable(g.get(k)) for k in keys)]
        base = [(r["top1"], ce.get(tuple(_hashable(r.get(k)) for k in pair))) for r in mine]
        base = [(a, b) for a, b in base if a is not None and b is not None]
        g["seeds_ahead"] = None if g["alone"] or not base else [sum(a > b for a, b in base), len(base)]


def pair_tables(results: dict, spec) -> list[dict]:
    """One table per (dataset, pair): rows teacher, ce, methods…; columns the settings."""
    settings = []
    for g in results["groups"]:
        if g["setting"] not in settings:
            settings.append(g["setting"])
    tables = []
    for dataset in spec.dataset:
        for pair in spec.pairs:
            members = [arch_name(a) for a in pair.teachers]
            t, s = "+".join(members), arch_name(pair.student)

            def find(role, method, teacher_arch, arch, setting, dataset=dataset):
                return next((g for g in results["groups"] if g["dataset"] == dataset and g["setting"] == setting
                             and g["role"] == role and g["method"] == method and g["teacher_arch"] == teacher_arch
                             and g["arch"] == arch), None)

            rows = [(f"teacher ({m})", [find("teacher", "ce", None, m, st) for st in settings]) for m in members]
            rows += [(f"ce ({s})", [find("student", "ce", None, s, st) for st in settings])]
            rows += [(m, [find("student", m, t, s, st) for st in settings]) for m in spec.methods]
            kinds = ["teacher"] * len(members) + ["ce"] + ["method"] * len(spec.methods)  # what each row is
            tables.append({"dataset": dataset, "teacher": t, "student": s, "settings": settings, "rows": rows,
                           "kinds": kinds, "seeds": len(spec.seeds)})
    return tables


def table_markdown(table: dict, metric: str = "top1", gain: bool = True, heading: bool = True) -> str:
    """Methods × settings, ``metric`` mean ± std; with ``gain``, the gain over CE in brackets; the best student
    of each column in bold."""
    settings, rows = table["settings"], table["rows"]
    best = {}
    for j in range(len(settings)):
        cells = [c[j] for _, c in rows if c[j] is not None and c[j]["role"] == "student"
                 and c[j][f"{metric}_mean"] is not None]
        best[j] = max((c[f"{metric}_mean"] for c in cells), default=None)
    lines = [f"## {table['dataset']}: {table['teacher']} → {table['student']}", ""] if heading else []
    lines += ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for label, cells in rows:
        out = []
        for j, g in enumerate(cells):
            if g is None:
                out.append("–")
                continue
            text = cell(g, metric, table.get("seeds", 0))  # not every seed finished: says over how many
            if gain and g.get("gain_over_ce") is not None:
                ahead = g.get("seeds_ahead")
                text += f" ({signed(g['gain_over_ce'])}" + (f", {ahead[0]}/{ahead[1]})" if ahead else ")")
            if g["role"] == "student" and best[j] is not None and g[f"{metric}_mean"] == best[j]:
                text = f"**{text}**"
            out.append(text)
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def split_table_markdown(table: dict, metrics: list[tuple[str, str]]) -> str | None:
    """Methods × (setting, metric), mean ± std, for the ``metrics`` (label, key) that some run of a setting
    has; None when no setting has any."""
    columns = [(j, setting, label, key) for j, setting in enumerate(table["settings"]) for label, key in metrics
               if any(c[j] is not None and c[j][f"{key}_mean"] is not None for _, c in table["rows"])]
    if not columns:
        return None
    lines = ["| method | " + " | ".join(f"{setting} {label}" for _, setting, label, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, cells in table["rows"]:
        out = ["–" if cells[j] is None else cell(cells[j], key, table.get("seeds", 0)) for j, _, _, key in columns]
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def is_imbalanced(setting: str) -> bool:
    return any(part.split(":", 1)[0] in ("longtail", "step") for part in setting.split(" + "))


def pair_markdown(table: dict) -> str:
    """Every table of one (dataset, pair): final top-1, best-epoch top-1 and, where the runs have them, the noisy
    labels memorised / corrected, balanced top-1 and many/medium/few-shot top-1 (imbalanced settings)."""
    parts = [f"## {table['dataset']}: {table['teacher']} → {table['student']}", "",
             "Final-epoch top-1 (%); in brackets the gain over the CE student of the same seed in the same setting "
             "(the same corruption and teacher), in points, averaged over the seeds both finished, and on how many "
             "of those seeds the student is above that CE student; **bold**: the best student of each column.", "",
             table_markdown(table, heading=False), "",
             "Best-epoch top-1 (%): the highest evaluation top-1 of any epoch (picked on the evaluation split "
             "itself, so optimistic: the final epoch is the honest number).", "",
             table_markdown(table, "best_top1", gain=False, heading=False), ""]
    noisy = split_table_markdown(table, [("memorised", "memorised"), ("corrected", "corrected")])
    if noisy is not None:
        parts += ["Noisy training labels at the end of training (%): among the training examples whose label the "
                  "noise changed, the fraction the model predicts as the noisy label (memorised) and as the clean "
                  "one (corrected); training images without augmentation.", "", noisy, ""]
    imbalanced = [j for j, s in enumerate(table["settings"]) if is_imbalanced(s)]
    if any(c[j] is not None and c[j]["balanced_top1_mean"] is not None for _, c in table["rows"] for j in imbalanced):
        parts += ["Balanced top-1 (%): the mean per-class top-1 over the classes of the evaluation split.", "",
                  table_markdown(table, "balanced_top1", gain=False, heading=False), ""]
        shots = split_table_markdown(table, [(k, f"{k}_top1") for k in SHOTS])
        if shots is not None:
            parts += ["Many / medium / few-shot top-1 (%) (Liu et al. 2019): the mean per-class top-1 over the "
                      "classes with more than 100, 20 to 100, fewer than 20 training images (by true class); a group "
                      "no class falls in is left out.", "", shots, ""]
    return "\n".join(parts).rstrip()


def recipe_lines(results: dict, spec) -> list[str]:
    """What every run shared: the spec's options (the recipe), and the augmentation and data as the runs
    resolved them."""

    def listed(options: dict) -> str:
        return ", ".join(f"`{k}: {v}`" for k, v in options.items())

    lines = [f"**Recipe** (the spec's options; the rest at kdcli's defaults): {listed(spec.options) or 'none'}."]
    if spec.teacher_options:
        lines.append(f"**Teachers**: {listed(spec.teacher_options)}.")
    if spec.method_args:
        lines.append("**Method arguments**: " + "; ".join(f"{m}: {listed(a)}" for m, a in spec.method_args.items())
                     + ".")
    if spec.teacher_cache:
        lines.append("**Teacher cache**: one per teacher and cell, shared by its logit students.")
    runs = results["runs"]
    augment = sorted({r["augment"] for r in runs if r.get("augment")})
    if augment:
        lines.append(f"**Augmentation**: {', '.join(augment)} (as the runs resolved it).")
    else:
        lines.append(f"**Augmentation**: {spec.options.get('augment', 'auto')} (no finished run has resolved it).")
    for dataset in spec.dataset:
        mine = [r for r in runs if r["dataset"] == dataset and r.get("train_split")]
        if mine:
            sizes = sorted({r["num_train"] for r in mine if r.get("num_train") is not None})
            trained = (f" ({sizes[0]} images trained on)" if len(sizes) == 1 else
                       f" ({sizes[0]}–{sizes[-1]} images trained on)" if sizes else "")
            lines.append(f"**Data** {dataset}: training split {mine[0]['train_split']}{trained}, evaluation split "
                         f"{mine[0]['eval_split']} ({mine[0]['num_eval']} images).")
    return lines


def study_markdown(results: dict, spec) -> str:
    seeds = ", ".join(str(s) for s in spec.seeds)
    parts = [f"# Study{': ' + spec.name if spec.name else ''}", ""]
    parts += [line + "  " for line in recipe_lines(results, spec)]  # two spaces: a line break in Markdown
    short = short_of_seeds(results["groups"], len(spec.seeds))
    parts += ["", f"Clean-test top-1 (%), mean ± std over seeds {seeds} (sample std, n − 1)"
              f"{'; [n=k]: over the k seeds whose runs finished (and report it)' if short else ''}; – : no "
              "finished run.",
              ""]
    for table in pair_tables(results, spec):
        parts += [pair_markdown(table), ""]
    if results["missing"]:
        parts.append(f"{len(results['missing'])} runs are not finished yet and are left out.")
    return "\n".join(parts).rstrip() + "\n"


def rows_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_study(out: Path, runs, spec) -> dict:
    """results.json, results.csv, results.md and the plots; returns the results."""
    from kdcli.models.checkpoint import write_text_atomic
    from kdcli.study import plots

    results = study_results(runs, spec.model_dump())
    columns = ["dataset", "setting", "noise", "imbalance", "seed", "role", "method", "teacher_arch", "arch",
               "top1", "best_top1", "best_epoch", "balanced_top1", "many_top1", "medium_top1", "few_top1", "nll",
               "ece", "noise_rate", "memorised", "corrected", "clean_train_top1", "num_train", "seconds", "run"]
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    write_text_atomic(out / "results.csv", rows_csv(results["runs"], columns))
    write_text_atomic(out / "results.md", study_markdown(results, spec))
    results["plots"] = plots.study_plots(out / "plots", pair_tables(results, spec))
    return results


# ---------------------------------------------------------------------------------------------- compare


def collect_reports(paths: list[Path]) -> list[tuple[Path, Report]]:
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            inside = sorted(q for q in p.rglob("report.json"))
            if not inside:
                raise KdcliError(f"{p} holds no report.json")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise KdcliError(f"{p} does not exist")
    seen, unique = set(), []
    for p in found:  # a report named twice (a folder and a file in it, or two spellings of one path) counts once
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return [(p, read_report(p)) for p in unique]


def _cache_settings(settings: dict) -> None:
    """A teacher cache is where the teacher's outputs were kept, not how the student learnt: its path is no
    setting, and an exact cache (float32, a view per epoch: the very images an uncached run draws) trains what
    no cache does, so its options are dropped too. A lossy one (float16, or fewer views than epochs, reusing
    augmented views) keeps them: it is a different run."""
    cache = settings.pop("teacher_cache", None)
    exact = settings.get("cache_dtype") == "float32" and settings.get("cache_views", 1) >= settings.get("epochs", 1)
    if cache is None or exact:
        settings.pop("cache_views", None)
        settings.pop("cache_dtype", None)


def compare_groups(reports: list[tuple[Path, Report]]) -> tuple[list[str], list[dict]]:
    """Group runs by the settings that differ between them (seeds pooled); gain over the CE group that
    agrees on everything but the method."""
    rows = []
    for path, report in reports:
        row = run_row(report)
        settings = {k: v for k, v in report.config.items() if k not in NOT_SETTINGS}
        _cache_settings(settings)
        settings.update(teacher=row["teacher"], student=row["student"])
        if isinstance(settings.get("method_args"), dict):
            settings["method_args"] = ",".join(f"{k}={v}" for k, v in sorted(settings["method_args"].items()))
        row.update({f"cfg.{k}": v for k, v in settings.items()}, report=str(path))
        rows.append(row)
    names = list(dict.fromkeys(k for r in rows for k in r if k.startswith("cfg.")))
    names.sort(key=lambda k: FIRST_KEYS.index(k[4:]) if k[4:] in FIRST_KEYS else len(FIRST_KEYS))
    keys = [k for k in names if len({_hashable(r.get(k)) for r in rows}) > 1]
    groups = aggregate(rows, keys)
    for g in groups:
        for k in keys:
            g[k.removeprefix("cfg.")] = g.pop(k)
    shown = [k.removeprefix("cfg.") for k in keys]
    # how a student was taught (train has none of these): not part of the setting its CE baseline must share
    method_keys = {*DISTILL_ONLY, *CACHE_OPTIONS}
    setting_keys = [k for k in shown if k not in method_keys]
    add_gain(groups, setting_keys)
    _drop_private(groups)
    # each setting together, its CE baseline first, then the methods by name
    groups.sort(key=lambda g: ([_order(g.get(k)) for k in setting_keys],
                               not g["alone"],
                               [_order(g.get(k)) for k in shown if k in method_keys]))
    return shown, groups


def _order(v) -> tuple:
    """A sort key for mixed values: None first, numbers by value, the rest as text."""
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(_hashable(v)))


def compare_table(keys: list[str], groups: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = keys + ["n", "top-1 %", "Δ vs CE"]
    body = [[("–" if g[k] in (None, "") else str(g[k])) for k in keys]
            + [str(g["n"]), pct(g["top1_mean"], g["top1_std"]), signed(g["gain_over_ce"]) or "–"] for g in groups]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"
