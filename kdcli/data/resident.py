"""The resident data path: a training split decoded once, held on the training device, augmented there batch-wise.

A map-style split whose images decode to one shape is decoded once into a uint8 tensor (cached on disk under
``$KDCLI_CACHE_DIR``, default ``~/.cache/kdcli``, keyed by the split's content fingerprint and its rows), moved to
the training device, and each batch's augmentation is one gather there: the pad-crop and flip of the ``cifar`` and
``crop`` recipes, or the centre crop of ``none``, from the same (seed, epoch, row) draws as the per-example
transform (:func:`~kdcli.data.transforms.augment_draws`), then ``to_dtype(float32, scale=True)`` as there. So a run
trains the same weights on either path (airbench's design: shared/reference/gpu-path.md).

The sampler, sharding, resume (``skip_first_batches``) and epoch seeding stay the DataLoader's: the resident
dataset hands the batch's positions to its collate function, which gathers the batch on the device. Unreadable
images are found while decoding and dropped from their batches by name, as :class:`~kdcli.data.skips.SkipCollate`
drops them on the loader path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from kdcli.data.skips import example_name
from kdcli.data.transforms import augment_draws, to_mode

RECIPES = ("cifar", "crop", "none")  # the training recipes the resident path reproduces exactly
BUDGET_FRACTION = 0.25  # of the device's memory (of RAM on a CPU) that auto lets the decoded split take
CHUNK = 512  # rows read from the split at a time while decoding
FORMAT = 1


def cache_dir() -> Path:
    return Path(os.environ.get("KDCLI_CACHE_DIR") or Path.home() / ".cache" / "kdcli") / "decoded"


def memory_budget(device: torch.device) -> int:
    """Bytes ``auto`` lets a decoded split take on ``device``: a quarter of its memory."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 << 30
    return int(total * BUDGET_FRACTION)


def why_not(dataset, streaming: bool, recipe: str, rows: int, in_chans: int, native_size: int,
            image_size: int, padding: int, budget: int | None) -> str | None:
    """Why the resident path cannot serve this training split (None: it can, as far as is known before decoding)."""
    if streaming:
        return "streamed data is read as it comes"
    if recipe not in RECIPES:
        return f"the {recipe!r} recipe runs timm's per-example pipeline (the resident path does cifar, crop, none)"
    if native_size != image_size:
        return f"its {native_size}-px images are resized to {image_size} px per example"
    if not hasattr(dataset, "split") or not hasattr(dataset, "decoder"):
        return "it is not a map-style image split"
    size = rows * in_chans * (native_size + 2 * padding) ** 2
    if budget is not None and size > budget:
        return f"its decoded images ({size / 2**20:.0f} MiB) exceed the budget ({budget / 2**20:.0f} MiB)"
    return None


class Decoded:
    """A split's images decoded: ``images`` uint8 (N, C, H, W) by position (the dataset's index), ``bad`` bool (N,)
    for the unreadable ones, whose names are in ``names``."""

    def __init__(self, images: torch.Tensor, bad: np.ndarray, names: dict[int, str]):
        self.images, self.bad, self.names = images, bad, names


class MixedShapes(ValueError):
    """The split's images decode to more than one shape: they cannot be one tensor."""


def _key(dataset, fingerprint: str, in_chans: int) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "fingerprint": fingerprint, "in_chans": in_chans,
                                   "column": dataset.image_column, "mode": getattr(dataset.decoder, "mode", None)},
                                  sort_keys=True).encode())
    rows = dataset.rows if dataset.rows is not None else np.arange(len(dataset))
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def decode(dataset, in_chans: int, fingerprint: str | None = None, progress: bool | None = None) -> Decoded:
    """Every image of ``dataset`` (an :class:`~kdcli.data.bundle.ImageClassificationDataset`) as uint8, read from the
    disk cache when ``fingerprint`` names a split decoded before. Raises :class:`MixedShapes`."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"{_key(dataset, fingerprint, in_chans)}.safetensors" if fingerprint else None
    if path is not None and path.is_file():
        try:
            stored = load_file(str(path))
            names = json.loads(Path(str(path) + ".json").read_text())
            return Decoded(stored["images"], stored["bad"].numpy().astype(bool), {int(k): v for k, v in names.items()})
        except Exception:  # unreadable (safetensors' own error included): decoded again and rewritten
            pass
    decoded = _decode_all(dataset, in_chans, progress)
    if path is not None:
        from kdcli.models import checkpoint as ckpt

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(Path(str(path) + ".json"), json.dumps({str(k): v for k, v in decoded.names.items()}))
            tmp = ckpt.atomic_path(path)
            try:
                save_file({"images": decoded.images, "bad": torch.from_numpy(decoded.bad.astype(np.uint8))}, str(tmp))
                ckpt.replace_atomic(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a cache that cannot be written costs the next run a decode, nothing else
    return decoded


def _decode_all(dataset, in_chans: int, progress: bool | None) -> Decoded:
    from rich.progress import Progress

    from kdcli.data.bundle import _decode

    n = len(dataset)
    rows = dataset.rows if dataset.rows is not None else np.arange(n)
    images: torch.Tensor | None = None
    bad = np.zeros(n, dtype=bool)
    names: dict[int, str] = {}
    show = sys.stderr.isatty() if progress is None else progress
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task("decoding the training images once", total=n)
        for start in range(0, n, CHUNK):
            chunk = [int(r) for r in rows[start:start + CHUNK]]
            values = dataset.split[chunk][dataset.image_column]
            for j, (row, value) in enumerate(zip(chunk, values, strict=True)):
                pos = start + j
                image = _decode(dataset.decoder, value)
                try:
                    x = F.to_image(to_mode(image, in_chans)).as_subclass(torch.Tensor) if image is not None else None
                except Exception:  # e.g. a truncated file that PIL only notices when converting it
                    x = None
                if x is None or x.dtype != torch.uint8:
                    bad[pos] = True
                    names[pos] = example_name(value, row, dataset.root)
                    continue
                if images is None:
                    images = torch.zeros((n, *x.shape), dtype=torch.uint8)
                elif x.shape != images.shape[1:]:
                    raise MixedShapes(f"images of shapes {tuple(images.shape[1:])} and {tuple(x.shape)}")
                images[pos] = x
            bar.advance(task, len(chunk))
    if images is None:
        images = torch.zeros((n, in_chans, 1, 1), dtype=torch.uint8)
    return Decoded(images, bad, names)


class ResidentDataset(torch.utils.data.Dataset):
    """The training split as positions: the DataLoader samples and batches them as it would a map-style dataset,
    and :meth:`collate` makes each batch on the device. Use with ``num_workers=0`` and no pinned memory."""

    def __init__(self, dataset, decoded: Decoded, device: torch.device, recipe: str, image_size: int, seed: int):
        self.recipe, self.size, self.seed = recipe, int(image_size), int(seed)
        self.padding = max(1, self.size // 8) if recipe != "none" else 0
        n = len(dataset)
        self.rows = np.asarray(dataset.rows if dataset.rows is not None else np.arange(n), dtype=np.int64)
        if dataset.labels is not None:
            labels = np.asarray([dataset.labels[r] for r in self.rows], dtype=np.int64)
        else:
            labels = np.asarray(dataset.split[[int(r) for r in self.rows]][dataset.label_column], dtype=np.int64)
        self.bad, self.names = decoded.bad, decoded.names
        images = decoded.images
        if self.padding:  # padded once, as airbench does: a crop is then one gather
            images = torch.nn.functional.pad(images, [self.padding] * 4)
        self.images = images.to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.index = torch.from_numpy(self.rows).to(device)
        self.device = device
        self.epoch, self._draws_epoch, self._offsets = 0, None, None
        self.in_chans = images.shape[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> int:
        return int(position)

    def __getitems__(self, positions: list[int]) -> list[int]:
        n = len(self)
        return [int(p) + n if int(p) < 0 else int(p) for p in positions]

    def _epoch_offsets(self) -> torch.Tensor:
        """(N, 3) int64 on the device: each position's crop top, left and flip for this epoch, from its draws."""
        if self._draws_epoch != self.epoch:
            h, w = self.images.shape[-2:]
            span_h, span_w = h - self.size + 1, w - self.size + 1
            table = np.empty((len(self.rows), 3), dtype=np.int64)
            flip = self.recipe == "cifar"
            for pos, row in enumerate(self.rows.tolist()):
                u_top, u_left, u_flip = augment_draws(self.seed, self.epoch, row)
                table[pos] = (int(u_top * span_h), int(u_left * span_w), flip and u_flip < 0.5)
            self._offsets = torch.from_numpy(table).to(self.device)
            self._draws_epoch = self.epoch
        return self._offsets

    def collate(self, positions: list[int]) -> dict[str, Any]:
        """The batch of these positions, on the device: unreadable ones dropped and named under ``skipped``."""
        skipped = [self.names[p] for p in positions if self.bad[p]]
        if skipped:
            positions = [p for p in positions if not self.bad[p]]
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        if self.recipe == "none":
            h, w = self.images.shape[-2:]
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))  # torchvision's
            batch = self.images[pos][..., top:top + self.size, left:left + self.size]
        else:
            offsets = self._epoch_offsets()[pos]
            span = torch.arange(self.size, device=self.device)
            rows = offsets[:, :1] + span  # (B, S)
            cols = torch.where(offsets[:, 2:].bool(), offsets[:, 1:2] + self.size - 1 - span, offsets[:, 1:2] + span)
            chans = torch.arange(self.in_chans, device=self.device)
            batch = self.images[pos[:, None, None, None], chans[None, :, None, None], rows[:, None, :, None],
                                cols[:, None, None, :]]
        return {"image": F.to_dtype(batch.contiguous(), torch.float32, scale=True), "label": self.labels[pos],
                "index": self.index[pos], "rows": self.rows[positions], "skipped": skipped}
