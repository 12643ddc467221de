"""Teacher cache: the teacher's logits stored per (example's original row, view), so that logit methods train at the
cost of the student alone (in the spirit of FKD: Shen & Xing, ECCV 2022, "A Fast Knowledge Distillation Framework
for Visual Recognition", which stores soft labels of pre-drawn crops).

A view is an epoch of augmentation: random augmentation in kdcli is a pure function of (seed, epoch, row), so view
v is exactly the images an epoch v would draw, and a cached run's epoch e trains on view e mod K (``--cache-views
K``): teacher and student see the same image. With ``--augment none`` one view is exact for every epoch.

On disk (``--teacher-cache DIR``): ``manifest.json`` (what the cache is for: teachers' sha256, data, corruption,
augmentation, views, storage) and one safetensors file per view, ``view-<v>.safetensors``, holding ``filled``
(rows known, uint8) and either ``logits`` (rows × teachers × classes, float16 or float32) or, with ``--cache-topk
K``, ``top_values``/``top_index`` (the K largest logits and their classes) and ``rest_lse`` (the log-sum-exp of the
others). Files are written atomically and merged under a lock with what other runs wrote meanwhile, so an
interrupted fill resumes and runs sharing one cache (a study's students) add to each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt

MANIFEST = "manifest.json"
FORMAT = 1


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a network's weights (names, shapes, dtypes and bytes, in name order): identifies a teacher that
    has no weights file of its own (a timm name, pretrained or fresh)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _first_difference(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class TeacherCache:
    """The teacher's logits of every training row, per view, in memory; flushed to ``root`` after each epoch."""

    def __init__(self, root: Path, key: dict[str, Any], rows: int, teachers: int, classes: int, views: int,
                 dtype: str = "float16", topk: int | None = None):
        self.root, self.key, self.rows, self.teachers, self.classes = Path(root), key, rows, teachers, classes
        self.views, self.dtype, self.topk = views, dtype, (topk if topk and topk < classes else None)
        self.hits = self.misses = 0
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._dirty: set[int] = set()
        self._held: tuple[tuple[int, str], torch.Tensor] | None = None  # a complete view's logits on the device
        self._check_manifest()

    # -------------------------------------------------------------------------------------------- identity
    def describe(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "rows": self.rows, "teachers": self.teachers,
                "classes": self.classes, "views": self.views, "dtype": self.dtype, "topk": self.topk}

    def _check_manifest(self) -> None:
        path = self.root / MANIFEST
        mine = self.describe()
        for folder in (self.root, *self.root.absolute().parents):
            if folder.exists() and not folder.is_dir():
                raise KdcliError(f"--teacher-cache {self.root}: {folder} is a file, not a folder")
        if path.is_file():
            try:
                theirs = json.loads(path.read_text())
                if not isinstance(theirs, dict):
                    raise ValueError(f"expected a JSON object, got {type(theirs).__name__}")
            except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
                raise KdcliError(f"--teacher-cache {self.root}: unreadable {MANIFEST} ({e}); delete the "
                                 "folder") from None
            if theirs != mine:
                # the key's fields, then the storage's (kept apart: "teachers" is the key's sha256 list and the
                # storage's count, and a merged dict would name neither when only the shas differ)
                key_a = theirs.get("key") if isinstance(theirs.get("key"), dict) else {}
                rest_a = {k: v for k, v in theirs.items() if k != "key"}
                rest_b = {k: v for k, v in mine.items() if k != "key"}
                names = _first_difference(key_a, mine["key"]) + _first_difference(rest_a, rest_b)
                diff = ", ".join(list(dict.fromkeys(names))[:4])
                raise KdcliError(f"--teacher-cache {self.root} holds logits of another teacher, data or recipe "
                                 f"(differs in: {diff}); give another folder, or delete this one")
            return
        if self.root.exists() and any(not f.name.startswith(".") for f in self.root.iterdir()):
            if path.is_file():  # another process (of this run, or a study's other student) wrote it meanwhile
                return self._check_manifest()
            raise KdcliError(f"--teacher-cache {self.root} is a folder with other files and no {MANIFEST}; give an "
                             "empty or new folder")
        try:
            ckpt.write_text_atomic(path, json.dumps(mine, indent=2, sort_keys=True))
        except OSError as e:
            raise KdcliError(f"--teacher-cache {self.root} cannot be written: {e.strerror or e}") from None

    def view_of(self, epoch: int) -> int:
        return epoch % self.views

    # ------------------------------------------------------------------------------------------- storage
    def _file(self, view: int) -> Path:
        return self.root / f"view-{view}.safetensors"

    def _empty(self) -> dict[str, torch.Tensor]:
        n, m, c = self.rows, self.teachers, self.classes
        if self.topk is None:
            return {"filled": torch.zeros(n, dtype=torch.uint8),
                    "logits": torch.zeros(n, m, c, dtype=getattr(torch, self.dtype))}
        k = self.topk
        return {"filled": torch.zeros(n, dtype=torch.uint8),
                "top_values": torch.zeros(n, m, k, dtype=getattr(torch, self.dtype)),
                "top_index": torch.zeros(n, m, k, dtype=torch.int32),
                "rest_lse": torch.zeros(n, m, dtype=torch.float32)}

    def _load(self, view: int) -> dict[str, torch.Tensor]:
        if view not in self._views:
            path = self._file(view)
            self._views[view] = load_file(str(path)) if path.is_file() else self._empty()
        return self._views[view]

    def filled(self, view: int) -> int:
        return int(self._load(view)["filled"].sum())

    def known(self, view: int) -> torch.Tensor:
        """(rows,) bool: the rows of ``view`` whose logits are stored (in memory: this run's and what was on disk
        when the view was first read or last flushed)."""
        return self._load(view)["filled"].bool()

    def lookup(self, index: torch.Tensor, view: int, count: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, teachers, classes) float32, with zeros where not known; known (B,) bool)."""
        data = self._load(view)
        idx = index.detach().cpu().long()
        known = data["filled"][idx].bool()
        if count:
            hits = int(known.sum())
            self.hits, self.misses = self.hits + hits, self.misses + len(idx) - hits
        if self.topk is None:
            return data["logits"][idx].float(), known
        values, where, rest = data["top_values"][idx].float(), data["top_index"][idx].long(), data["rest_lse"][idx]
        others = self.classes - self.topk  # each other class gets an equal share of the rest's probability mass
        logits = (rest - math.log(others)).unsqueeze(-1).expand(*where.shape[:2], self.classes).clone()
        logits.scatter_(2, where, values)
        logits[~known] = 0.0  # as documented (an unfilled row's zeros would otherwise read as uniform logits)
        return logits, known

    def held(self, view: int, device: torch.device, budget: int) -> torch.Tensor | None:
        """``view``'s logits (rows, teachers, classes) on ``device`` once every row of it is stored whole (not
        top-k) and they fit ``budget`` bytes: a lookup is then one gather there, with no copy from the host."""
        key = (view, str(device))
        if self._held is not None and self._held[0] == key:
            return self._held[1]
        if self.topk is not None:
            return None
        data = self._load(view)
        if data["logits"].numel() * data["logits"].element_size() > budget or not bool(data["filled"].all()):
            return None
        self._held = (key, data["logits"].to(device))
        return self._held[1]

    def count_hits(self, n: int) -> None:
        self.hits += int(n)

    def store(self, index: torch.Tensor, view: int, logits: torch.Tensor) -> None:
        """Remember the teacher's ``logits`` (B, teachers, classes) of these rows in ``view``."""
        data = self._load(view)
        idx = index.detach().cpu().long()
        z = logits.detach().float().cpu()
        if self.topk is None:
            data["logits"][idx] = z.to(data["logits"].dtype)
        else:
            top = z.topk(self.topk, dim=2)
            rest = z.scatter(2, top.indices, float("-inf")).logsumexp(dim=2)
            data["top_values"][idx] = top.values.to(data["top_values"].dtype)
            data["top_index"][idx] = top.indices.int()
            data["rest_lse"][idx] = rest
        data["filled"][idx] = 1
        self._dirty.add(view)

    def flush(self) -> None:
        """Write the views filled since the last flush, merged (under a lock) with what is on disk."""
        if not self._dirty:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                for view in sorted(self._dirty):
                    mine, path = self._views[view], self._file(view)
                    if path.is_file():  # rows another run filled meanwhile
                        disk = load_file(str(path))
                        theirs = disk["filled"].bool() & ~mine["filled"].bool()
                        for name in mine:
                            mine[name][theirs] = disk[name][theirs]
                    tmp = ckpt.atomic_path(path)
                    try:
                        save_file(mine, str(tmp), metadata={"kdcli": "teacher-cache", "view": str(view)})
                        ckpt.replace_atomic(tmp, path)
                    finally:
                        tmp.unlink(missing_ok=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._dirty.clear()

    def report(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"path": str(self.root), "views": self.views, "dtype": self.dtype, "topk": self.topk,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "key": self.key}
