"""Unreadable examples: how they are named, dropped from batches (:class:`SkipCollate`) and counted
(:class:`SkipTracker`).

A dataset item whose image could not be read (a null value, bytes or a file that do not decode, a
transform that fails) comes out as ``{"image": None, "label": -1, "index": i, "name": NAME}``. The collate
function drops such items from the batch and lists their names under ``"skipped"``; the tracker counts
them per split and stops the run, as one readable line, once more than a fraction of the split is bad.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from kdcli.errors import KdcliError

DEFAULT_MAX_BAD_FRACTION = 0.01
REPORT_EXAMPLES = 20  # names kept in a report
LINE_EXAMPLES = 3  # names shown in a log line or an error
UNKNOWN_TOTAL_MIN = 1000  # a split of unknown size is checked as it goes once this many examples were seen


def example_name(value: Any, index: int, root: str | None = None) -> str:
    """How a bad example is named: its file (relative to ``root`` when inside it) for data read from
    files, such as an image folder, else ``row INDEX``."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    if isinstance(value, dict) and value.get("bytes") is not None:
        path = None  # embedded bytes (parquet, arrow): the row is what finds it
    if not path:
        return f"row {index}"
    if root and "://" not in path:
        try:
            relative = os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            relative = os.pardir
        if not relative.startswith(os.pardir):
            return relative.replace(os.sep, "/")
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:])  # class folder and file name


def bad_item(name: str, index: int) -> dict[str, Any]:
    """The item standing for an unreadable example: :class:`SkipCollate` drops it and reports ``name``."""
    return {"image": None, "label": -1, "index": int(index), "name": name}


class SkipCollate:
    """Picklable DataLoader ``collate_fn``: drops unreadable items, stacks the rest.

    Returns ``{"image": float32 (B, C, S, S), "label": int64 (B,), "index": int64 (B,), "skipped": [names]}``
    where B counts the readable items; an all-bad batch has B = 0 (``image`` of shape (0, C, S, S)).
    """

    def __init__(self, in_chans: int, image_size: int):
        self.in_chans = int(in_chans)
        self.image_size = int(image_size)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [item for item in items if item["image"] is not None]
        skipped = [str(item.get("name") or f"row {item['index']}") for item in items if item["image"] is None]
        if good:
            image = torch.stack([item["image"] for item in good])
        else:
            image = torch.empty((0, self.in_chans, self.image_size, self.image_size), dtype=torch.float32)
        return {
            "image": image,
            "label": torch.tensor([int(item["label"]) for item in good], dtype=torch.int64),
            "index": torch.tensor([int(item["index"]) for item in good], dtype=torch.int64),
            "skipped": skipped,
        }

    def __repr__(self) -> str:
        return f"SkipCollate(in_chans={self.in_chans}, image_size={self.image_size})"


def skipped_line(split: str, count: int, names: list[str], shown: int = LINE_EXAMPLES) -> str:
    """``skipped 3 unreadable images in train: a.png, b.png, c.png`` (``... and 12 more`` past ``shown``)."""
    noun = "image" if count == 1 else "images"
    listed = ", ".join(names[:shown])
    more = count - min(len(names), shown)
    tail = f" and {more} more" if more > 0 else ""
    return f"skipped {count} unreadable {noun} in {split}" + (f": {listed}{tail}" if listed else "")


def check_max_bad_fraction(max_fraction: float) -> float:
    value = float(max_fraction)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise KdcliError(f"the fraction of unreadable images allowed must be in [0, 1], got {max_fraction}: "
                         "fix --max-bad-fraction")
    return value


class SkipTracker:
    """Counts the unreadable examples of one split (say, per epoch) and stops the run when there are too many.

    :meth:`add` raises :class:`KdcliError` as soon as the count exceeds ``max_fraction * total``. When the
    split's size is unknown (``total=None``, a stream), the limit is ``max_fraction`` of the examples seen so
    far (pass ``seen=`` to :meth:`add`), checked once :data:`UNKNOWN_TOTAL_MIN` were seen and by
    :meth:`check`. Counts from several processes combine with :meth:`merge` (of trackers or their reports).
    """

    def __init__(self, split: str, total: int | None, max_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        self.split = split
        self.total = None if total is None else int(total)
        self.max_fraction = check_max_bad_fraction(max_fraction)
        self.count = 0
        self.seen = 0  # examples read, good and bad (only needed when total is None)
        self.examples: list[str] = []

    @property
    def limit(self) -> int | None:
        """The most bad examples allowed, or None while it is unknown (no total, nothing seen)."""
        base = self.total if self.total is not None else self.seen
        if self.total is None and self.seen == 0:
            return None
        return math.floor(self.max_fraction * base + 1e-9)

    def add(self, names: list[str], seen: int = 0) -> None:
        """Count ``names`` (the ``"skipped"`` of a batch); ``seen``: examples in the batch, good and bad."""
        self.seen += int(seen)
        if not names:
            return
        self.count += len(names)
        room = REPORT_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(str(n) for n in names[:room])
        if self.total is not None or self.seen >= UNKNOWN_TOTAL_MIN:
            self.check()

    def merge(self, other: SkipTracker | dict[str, Any]) -> None:
        """Add the counts of another tracker, or of a :meth:`report` (e.g. gathered from other processes)."""
        report = other.report() if isinstance(other, SkipTracker) else other
        self.count += int(report.get("count", 0))
        self.seen += int(report.get("seen", 0))
        room = REPORT_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(str(n) for n in list(report.get("examples", []))[:room])
        if self.total is not None or self.seen >= UNKNOWN_TOTAL_MIN:
            self.check()

    def check(self) -> None:
        """Raise :class:`KdcliError` if more examples than allowed were bad."""
        limit = self.limit
        if limit is None or self.count <= limit:
            return
        of = f"{self.total} examples" if self.total is not None else f"{self.seen} examples read so far"
        names = ", ".join(self.examples[:LINE_EXAMPLES])
        more = self.count - min(len(self.examples), LINE_EXAMPLES)
        noun = "image" if self.count == 1 else "images"
        raise KdcliError(
            f"{self.count} unreadable {noun} in the {self.split!r} split, more than the {limit} allowed "
            f"(max bad fraction {self.max_fraction:g} of {of}): {names}{f' and {more} more' if more > 0 else ''}; "
            "fix or remove those files, or allow more with --max-bad-fraction"
        )

    def report(self) -> dict[str, Any]:
        """``{"count": n, "examples": first 20 names}`` (and ``"seen"`` when the split's size is unknown)."""
        out: dict[str, Any] = {"count": self.count, "examples": list(self.examples)}
        if self.total is None:
            out["seen"] = self.seen
        return out

    def line(self) -> str | None:
        """The log line for what was skipped (see :func:`skipped_line`), or None when nothing was."""
        return skipped_line(self.split, self.count, self.examples) if self.count else None


__all__ = [
    "DEFAULT_MAX_BAD_FRACTION",
    "SkipCollate",
    "SkipTracker",
    "bad_item",
    "check_max_bad_fraction",
    "example_name",
    "skipped_line",
]
