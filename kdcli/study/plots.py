"""A study's pictures (PNG, matplotlib, no display needed): per dataset and pair, top-1 against the
corruption level (one line per method, CE highlighted, error bars over seeds), and a heat map of the
gain over CE per method × setting."""

from __future__ import annotations

import re
from pathlib import Path

from kdcli.study.plan import slug


def level(setting: str) -> tuple[str, float] | None:
    """A setting's position on a numeric axis: ("noise rate", R) or ("imbalance factor", F); None if mixed."""
    if setting == "clean":
        return None
    if " + " in setting:
        return ("mixed", float("nan"))
    kind, _, rest = setting.partition(":")
    number = re.match(r"[0-9.]+", rest)
    if number is None:
        return ("mixed", float("nan"))
    if kind in ("longtail", "step"):
        return ("imbalance factor", float(number.group()))
    return ("noise rate", float(number.group()))


def axis(settings: list[str]) -> tuple[str, list[float]] | None:
    """A numeric x axis when every setting lies on one (clean is rate 0 or factor 1), else None."""
    levels = [level(s) for s in settings]
    kinds = {lv[0] for lv in levels if lv is not None}
    if len(kinds) != 1 or "mixed" in kinds:
        return None
    kind = kinds.pop()
    clean = 0.0 if kind == "noise rate" else 1.0
    xs = [clean if lv is None else lv[1] for lv in levels]
    return (kind, xs) if len(set(xs)) == len(xs) else None


def study_plots(folder: Path, tables: list[dict]) -> list[str]:
    """Write the two pictures of every table; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        stem = slug(f"{table['dataset']}_{table['teacher']}-{table['student']}")
        for name, draw in (("top1", _top1), ("gain", _gain)):
            fig = draw(plt, table)
            if fig is None:
                continue
            path = folder / f"{stem}_{name}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(str(path))
    return written


def _top1(plt, table: dict):
    settings = table["settings"]
    numeric = axis(settings)
    xs = numeric[1] if numeric else list(range(len(settings)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # rows: the teacher (grey, dashed), CE (thick black), then the methods in colours that are neither
    palette = plt.get_cmap("tab20").colors
    colours = [c for i, c in enumerate(palette) if i % 2 == 0 and i != 14] + \
              [c for i, c in enumerate(palette) if i % 2 == 1 and i != 15]
    methods = 0
    for kind, (label, cells) in zip(table["kinds"], table["rows"], strict=True):
        points = [(x, c["top1_mean"], c["top1_std"] or 0.0) for x, c in zip(xs, cells, strict=True)
                  if c is not None and c["top1_mean"] is not None]
        if not points:
            continue
        x, y, e = zip(*sorted(points), strict=True)
        style = (dict(color="grey", linestyle="--", linewidth=1.2) if kind == "teacher" else
                 dict(color="black", linewidth=2.5, zorder=5) if kind == "ce" else
                 dict(color=colours[methods % len(colours)], linewidth=1.2))
        methods += kind == "method"
        ax.errorbar(x, [100 * v for v in y], yerr=[100 * v for v in e], label=label, marker="o", markersize=3,
                    capsize=2, **style)
    if numeric:
        ax.set_xlabel(numeric[0])
        if numeric[0] == "imbalance factor":
            ax.set_xscale("log")
    else:
        ax.set_xticks(xs, settings, rotation=20, ha="right")
        ax.set_xlabel("setting")
    ax.set_ylabel("clean-test top-1 (%)")
    ax.set_title(f"{table['dataset']}: {table['teacher']} → {table['student']} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # nothing finished yet: no lines, no legend
        ax.legend(fontsize=7, ncol=2)
    return fig


def _gain(plt, table: dict):
    rows = [row for kind, row in zip(table["kinds"], table["rows"], strict=True) if kind == "method"]
    if not rows:
        return None
    grid = [[(c["gain_over_ce"] * 100 if c is not None and c.get("gain_over_ce") is not None else float("nan"))
             for c in cells] for _, cells in rows]
    finite = [abs(v) for row in grid for v in row if v == v]
    if not finite:  # no gain known yet
        return None
    span = max(finite) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 * len(table["settings"]) + 3, 0.4 * len(rows) + 1.5))
    image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    ax.set_xticks(range(len(table["settings"])), table["settings"], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * span else "black")
    fig.colorbar(image, ax=ax, label="top-1 gain over CE (points)")
    ax.set_title(f"{table['dataset']}: {table['teacher']} → {table['student']}")
    return fig
