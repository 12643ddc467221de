"""``open_data``: one ``--dataset`` string -> a :class:`DataBundle` the engine trains and evaluates on.

Every item is ``{"image": float32 (C, S, S) in [0, 1], "label": int, "index": int}``, where ``index`` is the
example's row in its whole split (the same streamed or map-style, on any number of processes, and for a
slice such as ``train[:10%]`` or the 10% holdout: the row in the full ``train``), so that label corruption and
augmentation are pure functions of (seed, index, ...) and agree, row for row, with a run on the full split.

Splits are named as in ``datasets``: ``train``, ``train[:10%]``, ``test[:2000]``, ``train[5000:]``,
``train[10%:20%]`` (map-style data only). The input size, interpolation and crop fraction the model wants
are set with :meth:`DataBundle.set_input`; the training augmentation recipes are in
:mod:`kdcli.data.transforms`.

Images are read undecoded and decoded here, one example at a time, with the column's own
``datasets.Image`` feature: an example that does not decode (or transform) becomes
``{"image": None, "label": -1, "index": i, "name": NAME}`` instead of failing the whole batch, and
:attr:`DataBundle.collate` (the DataLoader ``collate_fn``) drops it, listing NAME under ``"skipped"``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.data.skips import SkipCollate, bad_item, example_name
from kdcli.data.source import resolve, short_reason
from kdcli.data.transforms import (
    ImageTransform,
    channels_for_mode,
    check_augment,
    check_interpolation,
    resolve_augment,
)
from kdcli.errors import KdcliError

EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val")
IMAGE_COLUMN_NAMES = ("img", "image")
LABEL_COLUMN_NAMES = ("label", "fine_label", "labels")
HOLDOUT_SUFFIX = "[holdout]"  # eval split name when 10% of the training split is held out: "train[holdout]"
HOLDOUT_SPLIT = "train" + HOLDOUT_SUFFIX
HOLDOUT_FRACTION = 0.1
INDEX_COLUMN = "index"
STREAM_SHARDS = 64  # shards for streaming map-backed data: divisible by any power-of-two world size
FIRST_IMAGE_TRIES = 50  # rows open_data tries, in order, to find one image that decodes


def _decoder(feature=None):
    """The ``datasets.Image`` feature that decodes one stored value (``{"bytes", "path"}``) as datasets would."""
    import datasets

    return datasets.Image(mode=getattr(feature, "mode", None))


def _undecoded(split, image_column: str):
    """A map-style split whose image column reads as stored values (``{"bytes", "path"}`` or None)."""
    import datasets

    feature = split.features.get(image_column)
    if isinstance(feature, datasets.Image) and not feature.decode:
        return split
    return split.cast_column(image_column, datasets.Image(mode=getattr(feature, "mode", None), decode=False))


def _decode_or_raise(decoder, value):
    """A stored image value (``{"bytes", "path"}``) decoded as a PIL image; raises if it cannot be."""
    from datasets.utils.file_utils import is_local_path

    if value is None:
        raise ValueError("no image (null value)")
    path = value.get("path") if isinstance(value, dict) and value.get("bytes") is None else None
    if path and is_local_path(path):
        # a local file: read here, so that a file PIL gives up on is closed now rather than when collected
        with open(path, "rb") as file:
            value = {"bytes": file.read(), "path": path}
    return decoder.decode_example(value)


def _decode(decoder, value):
    """A stored image value decoded (a PIL image), or None when it is null or does not decode."""
    try:
        return _decode_or_raise(decoder, value)
    except Exception:  # anything unreadable is skipped (and counted) rather than fatal
        return None


def _item(transform: ImageTransform, image, value, label, index: int, epoch: int | None,
          root: str | None) -> dict[str, Any]:
    """One item: the decoded ``image`` transformed, or, when it is None or that fails, a bad item."""
    if image is not None:
        try:
            return {"image": transform(image, index, epoch), "label": int(label), "index": index}
        except Exception:  # e.g. a truncated file that PIL only notices when converting it
            pass
    return bad_item(example_name(value, index, root), index)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A torch map-style view of one split: ``{"image", "label", "index"}`` items, transformed per example.

    Unreadable examples come out as bad items (``"image": None``, see :mod:`kdcli.data.skips`): use
    :class:`~kdcli.data.skips.SkipCollate` (``DataBundle.collate``) as the DataLoader's ``collate_fn``.
    """

    def __init__(self, split, image_column: str, label_column: str, transform: ImageTransform,
                 rows: np.ndarray | None = None, labels: np.ndarray | None = None, image_feature=None,
                 root: str | None = None):
        self.split = _undecoded(split, image_column)  # datasets.Dataset with the image and label columns
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.rows = rows  # original row indices this view exposes (a slice, a holdout, imbalance), or all
        self.labels = labels  # labels by original row index (corrupted), or the column's
        self.decoder = _decoder(image_feature or split.features.get(image_column))
        self.root = root  # where the data's files are, to name unreadable ones

    def set_epoch(self, epoch: int) -> None:
        """The epoch that picks the augmentation (a pure function of seed, epoch and original index)."""
        self.transform.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.split) if self.rows is None else len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch of items (torch's DataLoader uses this when present): one Arrow read for the batch."""
        n = len(self)
        indices = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        if self.rows is not None:
            indices = [int(self.rows[i]) for i in indices]
        rows = self.split[indices]
        labels = rows[self.label_column] if self.labels is None else [self.labels[i] for i in indices]
        epoch = self.transform.epoch
        values = rows[self.image_column]
        # every image decoded, then every one transformed: measurably faster than one after the other
        images = [_decode(self.decoder, value) for value in values]
        return [
            _item(self.transform, image, value, label, index, epoch, self.root)
            for image, value, label, index in zip(images, values, labels, indices, strict=True)
        ]


class _StreamExample:
    """Picklable ``IterableDataset.map`` function: an undecoded example -> ``{"image", "label", "index"}``
    (or a bad item, see :mod:`kdcli.data.skips`)."""

    def __init__(self, image_column: str, label_column: str, transform: ImageTransform,
                 labels: np.ndarray | None = None, image_feature=None, root: str | None = None):
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.labels = labels  # corrupted labels by original row index, if any
        self.decoder = _decoder(image_feature)
        self.root = root

    def __call__(self, example: dict) -> dict[str, Any]:
        index = int(example[INDEX_COLUMN])
        label = example[self.label_column] if self.labels is None else self.labels[index]
        value = example[self.image_column]
        return _item(self.transform, _decode(self.decoder, value), value, label, index, None, self.root)


class _KeptRow:
    """Picklable ``IterableDataset.filter`` predicate: is this original row kept (imbalance)?"""

    def __init__(self, keep: np.ndarray):
        self.keep = keep

    def __call__(self, example: dict) -> bool:
        return bool(self.keep[int(example[INDEX_COLUMN])])


def _enumerate_rows(source):
    """Generator for ``from_generator``: the rows of a stream in order, each with its row index."""
    for i, row in enumerate(source):
        row = dict(row)
        row[INDEX_COLUMN] = i
        yield row


def _rows_in_ranges(split, ranges, chunk: int = 256):
    """Generator for ``from_generator``: rows of a map-style split, each with its row index.

    ``ranges`` is a list of ``(start, stop)`` row ranges or of arrays of rows (a subset of the split, such as
    a holdout's training rows): ``from_generator`` turns it into shards (one range or array each).
    """
    for part in ranges:
        rows = range(*part) if isinstance(part, tuple) else part
        for low in range(0, len(rows), chunk):
            block = rows[low:low + chunk]
            if isinstance(block, range):
                batch = split[block.start:block.stop]
            else:
                batch = split[[int(r) for r in block]]
            for j, r in enumerate(block):
                row = {name: values[j] for name, values in batch.items()}
                row[INDEX_COLUMN] = int(r)
                yield row


def _with_index_features(features, image_column: str):
    import datasets

    out = features.copy()
    mode = getattr(features.get(image_column), "mode", None)
    out[image_column] = datasets.Image(mode=mode, decode=False)  # decoded by kdcli, after shuffling
    out[INDEX_COLUMN] = datasets.Value("int64")
    return out


@dataclass
class DataBundle:
    """An opened dataset: what it is, and how to get torch datasets of its training and evaluation splits.

    ``train_split`` / ``eval_split`` are the splits as given (``"train[:10%]"``), or as picked
    (``"train[holdout]"``: 10% of the training split held out for evaluation). ``image_size`` is the size
    images come out at: the one :meth:`set_input` set, else ``native_size`` (open_data's ``image_size``, or
    the data's own). ``augment`` is the resolved training recipe (``auto`` resolved). ``warnings`` are lines
    for the user (empty classes, a held-out slice), for the caller to print.
    """

    name: str
    source: str
    num_classes: int
    class_names: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    image_column: str
    label_column: str
    train_split: str
    eval_split: str
    streaming: bool
    num_train: int | None
    num_eval: int
    augment: str = "none"  # resolved training recipe: "cifar" | "crop" | "imagenet" | "randaugment" | "none"
    seed: int = 0
    shuffle_buffer: int = 10_000
    _train: Any = field(default=None, repr=False, compare=False)  # datasets.Dataset or indexed IterableDataset
    _eval: Any = field(default=None, repr=False, compare=False)  # datasets.Dataset
    _stream_base: Any = field(default=None, repr=False, compare=False)
    _iterables: list = field(default_factory=list, repr=False, compare=False)
    _rows: Any = field(default=None, repr=False, compare=False)  # kept training rows (imbalance)
    _noisy: Any = field(default=None, repr=False, compare=False)  # training labels by row (noise)
    clean_labels: Any = field(default=None, repr=False, compare=False)  # the uncorrupted training labels
    _eval_rows: Any = field(default=None, repr=False, compare=False)  # evaluation split, when corrupted on request
    _eval_labels: Any = field(default=None, repr=False, compare=False)
    _label_source: Any = field(default=None, repr=False, compare=False)  # a true stream's label column, in order
    root: str | None = None  # folder of a local dataset (names unreadable files relative to it)
    _image_feature: Any = field(default=None, repr=False, compare=False)  # datasets.Image that decodes the column
    _epoch: int = field(default=0, repr=False, compare=False)
    _recorded_clean: Any = field(default=None, repr=False, compare=False)  # a corrupt-dataset folder's clean labels
    _train_sets: list = field(default_factory=list, repr=False, compare=False)  # augmenting map-style views
    _stream_fns: list = field(default_factory=list, repr=False, compare=False)  # augmenting stream functions
    native_size: int | None = None  # the size before set_input: open_data's image_size, or the data's own
    interpolation: str = "bilinear"  # of every resize (set_input)
    crop_pct: float = 1.0  # evaluation: resize to floor(image_size / crop_pct), centre crop image_size
    warnings: list[str] = field(default_factory=list)
    _augment_request: str | None = field(default=None, repr=False, compare=False)  # as asked ("auto"), else augment
    _default_augment: str | None = field(default=None, repr=False, compare=False)  # a built-in's own recipe
    # rows of the full split that the training / evaluation data are (a slice, a holdout), or None: all of it
    _train_subset: Any = field(default=None, repr=False, compare=False)
    _eval_subset: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.native_size is None:
            self.native_size = self.image_size

    @property
    def collate(self) -> SkipCollate:
        """The DataLoader ``collate_fn`` for this data (picklable): drops unreadable examples, stacks the rest,
        and lists what it dropped under ``"skipped"`` (see :class:`~kdcli.data.skips.SkipCollate`); an
        all-bad batch is ``(0, in_chans, image_size, image_size)``, at the size :meth:`set_input` set."""
        return SkipCollate(self.in_chans, self.image_size)

    def set_input(self, image_size: int, interpolation: str = "bilinear", crop_pct: float = 1.0) -> None:
        """The input the model wants; call it before :meth:`train_dataset` / :meth:`eval_dataset` (datasets
        handed out earlier keep the transform they were made with).

        Training images come out at ``image_size`` (the recipe's crop at that size: ``cifar``/``crop`` resize
        the shorter side to it first if needed, ``imagenet``/``randaugment`` random-resized crop to it).
        Evaluation images (and ``train_dataset(train=False)``) have their shorter side resized to
        ``floor(image_size / crop_pct)`` with ``interpolation``, then are centre-cropped to ``image_size``
        (timm's evaluation convention): with ``crop_pct`` 1.0 and data already that size, they are the
        data's pixels as they are. ``augment="auto"`` stays resolved against the images' own size
        (``native_size``): photographs get random-resized crops even for a small model's input.
        """
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
            raise KdcliError(f"input size must be a positive number of pixels, got {image_size}: fix --image-size")
        check_interpolation(interpolation)
        crop_pct = float(crop_pct)
        if not (crop_pct > 0 and math.isfinite(crop_pct)):
            raise KdcliError(f"crop fraction must be a positive number, got {crop_pct}")
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.augment = resolve_augment(self._augment_request or self.augment, self.native_size, self._default_augment)

    def _label_rows(self, split, subset) -> tuple[np.ndarray, np.ndarray]:
        """(labels of the whole split by row, the rows used: ``subset`` or all)."""
        labels = _label_array(split, self.label_column).astype(np.int64)
        return labels, (np.arange(len(labels)) if subset is None else np.asarray(subset, dtype=np.int64))

    def corrupt(self, noise: str | None, imbalance: str | None, seed: int = 0,
                class_order: str | None = None, split: str = "train") -> dict[str, Any]:
        """Corrupt the labels (noise) and class balance (imbalance) of the training split (or, when asked,
        the evaluation split: ``split="eval"``); returns the report block.

        Each decision is a pure function of (seed, original index, label): see ``kdcli.data.corruption``. The
        index is the row in the whole split, so a slice (``train[:10%]``) gets, row for row, the labels the
        full split gets; imbalance is computed over the rows used (the slice's class counts).
        """
        from kdcli.data import corruption as cor

        if split == "eval":
            full, used = self._label_rows(self._eval, self._eval_subset)
            keep, noisy, block = _corrupt_labels(cor, full[used], used, self.num_classes, noise, imbalance, seed,
                                                 class_order, self.class_names)
            self._eval_rows, self._eval_labels = used[keep], _by_row(len(full), used, noisy)
            self.num_eval = int(keep.sum())
            return block
        import datasets

        if self.streaming and not isinstance(self._train, datasets.Dataset):  # a true stream (hub, parquet)
            full = self._stream_labels()
            used = np.arange(len(full))
        else:
            full, used = self._label_rows(self._train, self._train_subset)
        clean = full[used]
        keep, noisy, block = _corrupt_labels(cor, clean, used, self.num_classes, noise, imbalance, seed, class_order,
                                             self.class_names)
        self._rows = used[keep]
        self._noisy, self.clean_labels = _by_row(len(full), used, noisy), _by_row(len(full), used, clean)
        self.num_train = int(keep.sum())
        return block

    def _stream_labels(self) -> np.ndarray:
        """The clean labels of a true stream, by row index: one pass over its label column.

        Noise alone could be decided per example as rows stream by, but imbalance needs every class's size
        up front, and the report's measured rate and matrix need every label: so one pass it is (only the
        label column is kept; images are not decoded).
        """
        labels = np.fromiter((int(row[self.label_column]) for row in self._label_source), dtype=np.int64)
        if len(labels) == 0:
            raise KdcliError(f"the {self.train_split!r} split of dataset {self.name!r} is empty: "
                             "pass another --train-split")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise KdcliError(
                f"the {self.train_split!r} split of dataset {self.name!r} has labels outside 0..{self.num_classes - 1} "
                f"(min {labels.min()}, max {labels.max()}; -1 usually means unlabelled): pick another split")
        return labels

    def recorded_manifest(self) -> tuple[Path, dict[str, Any]] | None:
        """(path, manifest) when this is a folder ``kdcli corrupt-dataset`` wrote, read map-style with its own
        label column: its ``label`` is corrupted and its ``clean_label`` the truth. None for other data."""
        if self._recorded_clean is None:
            return None
        path = Path(self.root) / CORRUPTED_MANIFEST
        try:
            manifest = json.loads(path.read_text())
            return (path, manifest) if isinstance(manifest.get("corruption"), dict) else None
        except (OSError, ValueError, AttributeError):
            return None

    def recorded_corruption(self) -> dict[str, Any] | None:
        """The corruption of a ``kdcli corrupt-dataset`` folder (:meth:`recorded_manifest`), measured again on
        the rows used, with its ``clean_label`` column set beside the corrupted labels: a run on such a folder
        reports its noise and the memorised / corrected diagnostics, as a run with ``--noise`` does. None for
        other data (and a streamed parquet folder, whose rows are not known ahead)."""
        from kdcli.data import corruption as cor

        found = self.recorded_manifest()
        if found is None:
            return None
        path, manifest = found
        full, used = self._label_rows(self._train, self._train_subset)
        clean, noisy = self._recorded_clean[used], full[used]
        self._rows = used
        self._noisy, self.clean_labels = _by_row(len(full), used, noisy), _by_row(len(full), used, clean)
        block = {**manifest["corruption"], "recorded_in": str(path),  # done by corrupt-dataset, not by this run
                 "class_counts_after": cor.class_counts(noisy, self.num_classes)}
        block.update(cor.noise_report(clean, noisy, self.num_classes))
        return block

    def training_labels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(clean, corrupted) labels by original row index (-1 for rows of the split not used: outside a
        slice, held out), when the training split was corrupted."""
        return None if self.clean_labels is None else (self.clean_labels, self._noisy)

    def train_labels(self, clean: bool = False) -> np.ndarray | None:
        """The labels training uses (after corruption; ``clean``: the true labels of the same rows), by original
        row index, -1 for rows not trained on (outside a slice, held out, dropped by imbalance); None when
        streaming (rows are not known ahead)."""
        if self.streaming:
            return None
        if self._noisy is not None:
            out = np.full(len(self._noisy), -1, dtype=np.int64)
            out[self._rows] = (self.clean_labels if clean else self._noisy)[self._rows]
            return out
        full, used = self._label_rows(self._train, self._train_subset)
        return _by_row(len(full), used, full[used])

    def content_fingerprint(self, samples: int = 64) -> str | None:
        """A hash of what the training split holds that a copy keeps: its rows, every label and the stored image
        of ``samples`` rows spread over it. (datasets' own ``_fingerprint`` follows its cache files, which a copied
        or touched data file renames.) None when streaming. It reads labels and a few images, not every image:
        a change to other images' pixels alone goes unseen."""
        if self.streaming or self._train is None:
            return None
        import hashlib

        split = self._train
        h = hashlib.sha256(f"{len(split)}:{self.image_column}:{self.label_column}".encode())
        h.update(np.ascontiguousarray(self._label_rows(split, None)[0]).tobytes())
        try:
            stored = _undecoded(split, self.image_column)
        except (TypeError, ValueError):  # not an image column datasets can hand over undecoded (arrays)
            stored = split
        for i in np.unique(np.linspace(0, len(split) - 1, num=min(samples, len(split))).astype(np.int64)):
            h.update(_stored_bytes(stored[int(i)][self.image_column]))
        return h.hexdigest()[:16]

    def _transform(self, train: bool) -> ImageTransform:
        return ImageTransform(self.in_chans, self.image_size, self.augment, train=train, seed=self.seed,
                              epoch=self._epoch, interpolation=self.interpolation, crop_pct=self.crop_pct)

    def _indexed_stream(self):
        """The training split as an unshuffled ``datasets.IterableDataset`` with an ``index`` column."""
        if self._stream_base is None:
            import datasets

            if isinstance(self._train, datasets.Dataset):  # built-in or save_to_disk data, streamed
                # Shards are row ranges read by a generator, rather than Dataset.to_iterable_dataset over a
                # table with an added index column: pickling those shards (DataLoader workers under spawn)
                # copies the whole in-memory table or column once per shard.
                split = _undecoded(self._train, self.image_column)
                subset = self._train_subset
                n = len(split) if subset is None else len(subset)
                shards = max(1, min(STREAM_SHARDS, n))
                edges = [n * k // shards for k in range(shards + 1)]
                if subset is None:
                    ranges = [(edges[k], edges[k + 1]) for k in range(shards)]
                else:  # a holdout's training rows: each shard gets its own rows
                    ranges = [np.asarray(subset[edges[k]:edges[k + 1]]) for k in range(shards)]
                self._stream_base = datasets.IterableDataset.from_generator(
                    _rows_in_ranges,
                    features=_with_index_features(split.features, self.image_column),
                    gen_kwargs={"split": split, "ranges": ranges},
                )
            else:
                self._stream_base = self._train
        return self._stream_base

    def train_dataset(self, rank: int = 0, world_size: int = 1, train: bool = True):
        """The training split: augmented when ``train``, else plain (the evaluation transform, for diagnostics).

        Map-style (not streaming): a torch ``Dataset`` over the whole split; ``rank``/``world_size`` are
        ignored (the caller shards, e.g. with accelerate). Streaming: a ``datasets.IterableDataset`` (a
        torch ``IterableDataset``) whose rows carry their original index, shuffled with a buffer and
        ``seed`` when ``train`` (reseeded by :meth:`set_epoch`), and split by node when ``world_size > 1``.

        Augmentation (``train``) is a pure function of (``seed``, epoch, original index); the epoch is the
        last :meth:`set_epoch`'s. Items of unreadable examples are bad items: batch with :attr:`collate`.
        """
        if not self.streaming:
            rows = self._rows if self._rows is not None else self._train_subset
            dataset = ImageClassificationDataset(self._train, self.image_column, self.label_column,
                                                 self._transform(train), rows=rows, labels=self._noisy,
                                                 image_feature=self._image_feature, root=self.root)
            if train and dataset.transform.augment != "none":
                self._train_sets.append(dataset)
            return dataset
        from datasets.distributed import split_dataset_by_node

        stream = self._indexed_stream()
        used = None if self._rows is None else len(self._noisy if self._train_subset is None else self._train_subset)
        if used is not None and len(self._rows) < used:  # imbalance: drop the rows not kept
            keep = np.zeros(len(self._noisy), dtype=bool)
            keep[self._rows] = True
            stream = stream.filter(_KeptRow(keep))
        if train:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if world_size > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        outputs = ("image", "label", INDEX_COLUMN)
        function = _StreamExample(self.image_column, self.label_column, self._transform(train), labels=self._noisy,
                                  image_feature=self._image_feature, root=self.root)
        stream = stream.map(
            function,
            remove_columns=[c for c in (self.image_column, self.label_column) if c not in outputs] or None,
        )
        if train:
            stream.set_epoch(self._epoch)
            self._iterables.append(stream)
            if function.transform.augment != "none":
                self._stream_fns.append(function)
        return stream

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the training datasets handed out so far (and of those handed out later): it
        reseeds the streaming shuffle, and picks every augmented example's augmentation (map-style and
        streamed). Call it before iterating: DataLoader workers started afterwards (and persistent ones,
        the epoch being in shared memory) use it."""
        self._epoch = int(epoch)
        for stream in self._iterables:
            stream.set_epoch(epoch)
        for holder in self._train_sets:
            holder.set_epoch(epoch)
        for holder in self._stream_fns:
            holder.transform.set_epoch(epoch)

    def follow_epoch(self, dataset) -> None:
        """Have :meth:`set_epoch` reach ``dataset`` too (a view of the training split made elsewhere)."""
        self._train_sets.append(dataset)

    def eval_dataset(self) -> ImageClassificationDataset:
        """The evaluation split: map-style, known length, no augmentation (see :meth:`set_input`); unreadable
        examples are bad items, as in training (batch with :attr:`collate`)."""
        rows = self._eval_rows if self._eval_rows is not None else self._eval_subset
        return ImageClassificationDataset(self._eval, self.image_column, self.label_column, self._transform(False),
                                          rows=rows, labels=self._eval_labels,
                                          image_feature=self._image_feature, root=self.root)

    def eval_split_data(self):
        """The evaluation rows as a ``datasets.Dataset`` of their own (the slice or holdout selected, in
        memory: nothing is written next to the data)."""
        if self._eval_subset is None:
            return self._eval
        return self._eval.select(self._eval_subset, keep_in_memory=True)


CORRUPTED_MANIFEST = "manifest.json"  # what kdcli corrupt-dataset writes beside its parquet splits


def _by_row(size: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` of ``rows`` spread over a whole split's rows (-1 for the others)."""
    out = np.full(size, -1, dtype=np.int64)
    out[rows] = values
    return out


def _corrupt_labels(cor, clean: np.ndarray, index: np.ndarray, c: int, noise: str | None, imbalance: str | None,
                    seed: int, class_order: str | None,
                    class_names: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(kept mask, corrupted labels, report block) for the clean labels of one split's rows ``index``."""
    cor.check_class_order(class_order, imbalance)
    n_spec = cor.parse_noise(noise, c, class_names) if noise else None
    i_spec = cor.parse_imbalance(imbalance, c, class_order) if imbalance else None
    keep = cor.keep_mask(i_spec, clean, index, c, seed) if i_spec else np.ones(len(clean), dtype=bool)
    noisy = cor.noisy_labels(n_spec, clean, index, c, seed) if n_spec else clean.copy()
    block = {"noise": n_spec.text if n_spec else None, "imbalance": i_spec.text if i_spec else None,
             "seed": seed, "class_order": class_order,
             "class_counts_before": cor.class_counts(clean, c),
             "class_counts_after": cor.class_counts(noisy[keep], c)}
    block.update(cor.noise_report(clean[keep], noisy[keep], c))
    return keep, noisy, block


# ----------------------------------------------------------------------------------------------------------
# open_data and its helpers


def open_data(
    spec: str,
    *,
    image_size: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    streaming: bool = False,
    augment: str = "auto",
    seed: int = 0,
    shuffle_buffer: int = 10_000,
    num_classes: int | None = None,
) -> DataBundle:
    """Open ``spec`` (a built-in name, a local path or a hub id) and describe it as a :class:`DataBundle`.

    ``train_split`` / ``eval_split``: a split name, or a slice of one in ``datasets``' syntax
    (``train[:10%]``, ``test[:2000]``, ``train[5000:]``, ``train[10%:20%]``; map-style data only). Without an
    evaluation split, 10% of the training split (or of its slice) is held out. ``augment``: a recipe of
    :data:`~kdcli.data.transforms.AUGMENTS` (``auto``: the built-in's own, else ``cifar`` up to 64 px and
    ``imagenet`` above; resolved again by :meth:`DataBundle.set_input`). ``num_classes``: for integer labels
    without class names, how many classes there are (else: the largest label + 1, with a warning when some
    classes below it have no examples).
    """
    augment = check_augment(augment)
    if image_size is not None and image_size < 1:
        raise KdcliError(f"image size must be a positive number of pixels, got {image_size}: fix --image-size")
    if shuffle_buffer < 1:
        raise KdcliError(f"shuffle buffer must be at least 1, got {shuffle_buffer}: fix --shuffle-buffer")
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) != num_classes
                                    or num_classes < 2):
        raise KdcliError(f"the number of classes must be at least 2, got {num_classes}: fix --num-classes")
    train_spec = parse_split(train_split, "--train-split") if train_split is not None else None
    eval_spec = parse_split(eval_split, "--eval-split") if eval_split is not None else None
    for given, option in ((train_spec, "--train-split"), (eval_spec, "--eval-split")):
        if streaming and given is not None and given.sliced:
            raise KdcliError(f"{option} {given.text!r} is a slice, which needs map-style data: a streamed split "
                             f"is read in order and cannot be sliced; drop --streaming, or pass {option} {given.name}")

    raw = resolve(spec, streaming=streaming)
    splits = raw.splits
    available = list(splits.keys())
    train_spec, eval_spec = _pick_splits(spec, available, train_spec, eval_spec)
    train_name = train_spec.name
    train = splits[train_name]

    columns = _column_names(train)
    features = train.features
    image_col = _image_column(spec, columns, features, image_column)
    label_col = _label_column(spec, columns, features, label_column, exclude=image_col)
    keep = [image_col, label_col]
    recorded_clean = None  # the clean_label column of a folder kdcli corrupt-dataset wrote
    warnings: list[str] = []
    train_rows = eval_rows = None

    if raw.streamed:
        if eval_spec is None:
            raise KdcliError(
                f"dataset {spec!r} has no evaluation split (splits: {', '.join(available)}) and a streamed "
                "dataset cannot hold one out: pass --eval-split NAME, or drop --streaming"
            )
        eval_text = eval_spec.text
        train = _image_typed(spec, train.select_columns(keep), image_col)
        eval_ = _materialize(spec, _image_typed(spec, splits[eval_spec.name].select_columns(keep), image_col))
        num_train = _stream_num_examples(splits[train_name], train_name)
    else:
        if label_col == "label" and "clean_label" in columns and _data_root(raw) is not None:  # corrupt-dataset's
            recorded_clean = _label_array(train, "clean_label").astype(np.int64)
        train = _image_typed(spec, train.select_columns(keep), image_col)
        train_rows = slice_rows(spec, train_spec, len(train), "--train-split")
        if eval_spec is None:
            eval_ = train  # the same split: the rows tell training and evaluation apart
            train_rows, eval_rows = _holdout(spec, len(train), train_rows, train_spec.text)
            eval_text = train_spec.text + HOLDOUT_SUFFIX
            if train_spec.sliced:
                warnings.append(
                    f"dataset {spec!r} has no evaluation split: evaluating on {len(eval_rows)} examples held out "
                    f"of the {len(train_rows) + len(eval_rows)} of {train_spec.text!r} (10%, chosen with seed 0), "
                    f"training on the other {len(train_rows)}; pass --eval-split to evaluate elsewhere")
        else:
            eval_text = eval_spec.text
            eval_ = _image_typed(spec, splits[eval_spec.name].select_columns(keep), image_col)
            eval_rows = slice_rows(spec, eval_spec, len(eval_), "--eval-split")
        num_train = len(train) if train_rows is None else len(train_rows)
        if (len(eval_) if eval_rows is None else len(eval_rows)) == 0:
            raise KdcliError(f"the {eval_text!r} split of dataset {spec!r} is empty: pass another --eval-split")

    train, eval_, class_names = _labels(
        spec, train, eval_, label_col, (train_spec, train_rows), (eval_text, eval_rows), num_classes, warnings)
    image_feature = train.features.get(image_col)
    first = _first_image(spec, train, image_col, train_spec.text, _decoder(image_feature), train_rows)
    in_chans = channels_for_mode(first.mode)
    if image_size is None:
        image_size = min(first.size)
    resolved = resolve_augment(augment, int(image_size), raw.default_augment)

    label_source = None
    if raw.streamed:
        import datasets

        # one shard read in order, so that the row index is the position in the split (shards of a hub
        # or parquet stream have no known offsets); shuffling and node splitting come after
        stream = train.decode(False)
        label_source = stream.select_columns([label_col])
        train = datasets.IterableDataset.from_generator(
            _enumerate_rows,
            features=_with_index_features(stream.features, image_col),
            gen_kwargs={"source": stream},
        )

    return DataBundle(
        name=spec,
        source=raw.kind,
        num_classes=len(class_names),
        class_names=class_names,
        in_chans=in_chans,
        image_size=int(image_size),
        mean=raw.mean,
        std=raw.std,
        image_column=image_col,
        label_column=label_col,
        train_split=train_spec.text,
        eval_split=eval_text,
        streaming=streaming,
        num_train=num_train,
        num_eval=len(eval_) if eval_rows is None else len(eval_rows),
        augment=resolved,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        _train=train,
        _eval=eval_,
        _label_source=label_source,
        root=_data_root(raw),
        _image_feature=image_feature,
        warnings=warnings,
        _augment_request=augment,
        _default_augment=raw.default_augment,
        _train_subset=train_rows,
        _eval_subset=eval_rows,
        _recorded_clean=recorded_clean,
    )


# ----------------------------------------------------------------------------------------------------------
# splits and slices


@dataclass(frozen=True)
class SplitSpec:
    """A split as given: ``train``, or a slice of it in ``datasets``' syntax, ``train[10%:20%]``."""

    text: str
    name: str
    start: int | None = None
    stop: int | None = None
    start_pct: bool = False
    stop_pct: bool = False
    rounding: str = "closest"  # of percentages, as in datasets: "closest" or "pct1_dropremainder"
    sliced: bool = False


SPLIT_SYNTAX = ("NAME or NAME[FROM:TO], FROM and TO row numbers or percentages, either may be left out or "
                "negative, e.g. train[:10%], test[:2000], train[5000:], train[10%:20%]")
_SLICED = re.compile(r"^(?P<name>[^\[\]()+]+?)\s*\[(?P<body>[^\[\]]*)\]\s*(?:\((?P<rounding>[^()]*)\))?$")
_BOUNDS = re.compile(r"^\s*(?:(?P<start>[+-]?\d[\d_]*)\s*(?P<start_pct>%)?)?\s*:"
                     r"\s*(?:(?P<stop>[+-]?\d[\d_]*)\s*(?P<stop_pct>%)?)?\s*$")
_ROUNDINGS = ("closest", "pct1_dropremainder")


def parse_split(text: str, option: str = "--train-split") -> SplitSpec:
    """``text`` read as a split or a slice of one (syntax only: whether the split exists is checked later)."""
    given = str(text)
    text = given.strip()
    if not text:
        raise KdcliError(f"empty split name: fix {option} ({SPLIT_SYNTAX})")
    if "+" in text:
        raise KdcliError(f"{option} {given!r} combines splits with '+': kdcli reads one split or one slice of one "
                         f"({SPLIT_SYNTAX})")
    if "[" not in text and "]" not in text and "(" not in text:
        return SplitSpec(text, text)
    match = _SLICED.match(text)
    bounds = _BOUNDS.match(match.group("body")) if match else None
    if bounds is None:
        raise KdcliError(f"cannot read {option} {given!r}: use {SPLIT_SYNTAX}")
    rounding = (match.group("rounding") or "closest").strip()
    start_pct, stop_pct = bool(bounds.group("start_pct")), bool(bounds.group("stop_pct"))
    if rounding not in _ROUNDINGS:
        raise KdcliError(f"cannot read {option} {given!r}: unknown rounding ({rounding}), use (closest) or "
                         "(pct1_dropremainder) after a slice in percentages, or none")
    if match.group("rounding") and not (start_pct or stop_pct):
        raise KdcliError(f"cannot read {option} {given!r}: a rounding, (closest) or (pct1_dropremainder), "
                         f"only follows a slice in percentages ({SPLIT_SYNTAX})")
    start, stop = bounds.group("start"), bounds.group("stop")
    if start is not None and stop is not None and start_pct != stop_pct:
        # datasets reads train[10%:500] as train[10%:500%]: ambiguous, so refused
        raise KdcliError(f"cannot read {option} {given!r}: give both bounds as row numbers or both as "
                         "percentages, e.g. train[10%:20%] or train[1000:5000]")
    return SplitSpec(text, match.group("name").strip(), None if start is None else int(start),
                     None if stop is None else int(stop), start_pct, stop_pct, rounding, sliced=True)


def slice_rows(spec: str, split: SplitSpec, n: int, option: str) -> np.ndarray | None:
    """The rows (of a split of ``n``) that ``split``'s slice selects, in order; None when it is not sliced.

    As ``datasets`` reads ``split=`` (percentages rounded to the closest row by default), except that bounds
    outside the split and empty slices are errors rather than clamped."""
    if not split.sliced:
        return None

    def bound(value: int | None, pct: bool, default: int) -> int:
        if value is None:
            return default
        limit = 100 if pct else n
        if abs(value) > limit:
            unit = "%" if pct else ""
            raise KdcliError(
                f"{option} {split.text!r} is out of range: {value}{unit} is outside -{limit}{unit}..{limit}{unit} "
                f"(the {split.name!r} split of dataset {spec!r} has {n} rows)")
        if pct and split.rounding == "pct1_dropremainder":
            if n < 100:
                raise KdcliError(f"{option} {split.text!r}: (pct1_dropremainder) needs at least 100 rows, the "
                                 f"{split.name!r} split of dataset {spec!r} has {n}: drop the rounding")
            value = value * (n // 100)
        elif pct:
            value = int(round(value * n / 100.0))
        return n + value if value < 0 else value

    start = bound(split.start, split.start_pct, 0)
    stop = bound(split.stop, split.stop_pct, n)
    if stop <= start:
        raise KdcliError(f"{option} {split.text!r} selects no rows (rows {start}..{stop} of the {n} of the "
                         f"{split.name!r} split of dataset {spec!r}): fix the slice")
    return np.arange(start, stop, dtype=np.int64)


def _data_root(raw) -> str | None:
    """The folder a local dataset's files are in (an image folder, a parquet file's folder), else None."""
    if raw.kind != "local":
        return None
    return raw.location if os.path.isdir(raw.location) else os.path.dirname(raw.location)


def _column_names(split) -> list[str]:
    names = split.column_names
    if names is None:  # a stream whose features are not known up front
        names = list(split.features.keys()) if split.features else []
    return list(names)


def _pick_splits(
    spec: str, available: list[str], train_split: SplitSpec | None, eval_split: SplitSpec | None
) -> tuple[SplitSpec, SplitSpec | None]:
    listed = ", ".join(available) or "none"
    if train_split is None:
        if "train" in available:
            train_split = SplitSpec("train", "train")
        elif len(available) == 1:
            train_split = SplitSpec(available[0], available[0])
        else:
            raise KdcliError(f"dataset {spec!r} has no 'train' split (splits: {listed}): pass --train-split NAME")
    elif train_split.name not in available:
        raise KdcliError(
            f"dataset {spec!r} has no split {train_split.name!r} (splits: {listed}): fix --train-split")
    if eval_split is None:
        name = next((s for s in EVAL_SPLIT_NAMES if s in available and s != train_split.name), None)
        eval_split = None if name is None else SplitSpec(name, name)
    elif eval_split.name not in available:
        raise KdcliError(f"dataset {spec!r} has no split {eval_split.name!r} (splits: {listed}): fix --eval-split")
    return train_split, eval_split


def _image_column(spec: str, columns: list[str], features, override: str | None) -> str:
    import datasets

    listed = ", ".join(columns) or "none"
    if override is not None:
        if override not in columns:
            raise KdcliError(f"dataset {spec!r} has no column {override!r} (columns: {listed}): fix --image-column")
        return _check_not_index(override, "--image-column")
    typed = [c for c in columns if features is not None and isinstance(features.get(c), datasets.Image)]
    for name in IMAGE_COLUMN_NAMES:
        if name in typed:
            return name
    if typed:
        return _check_not_index(typed[0], "--image-column")
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    raise KdcliError(
        f"dataset {spec!r} has no image column (none of type Image, none named img/image; columns: {listed}): "
        "pass --image-column NAME"
    )


def _label_column(spec: str, columns: list[str], features, override: str | None, exclude: str) -> str:
    import datasets

    listed = ", ".join(columns) or "none"
    if override is not None:
        if override not in columns:
            raise KdcliError(f"dataset {spec!r} has no column {override!r} (columns: {listed}): fix --label-column")
        if override == exclude:
            raise KdcliError(f"column {override!r} cannot be both the image and the label: fix --label-column")
        return _check_not_index(override, "--label-column")
    for name in LABEL_COLUMN_NAMES:
        if name in columns and name != exclude:
            return name
    for name in columns:
        if name != exclude and features is not None and isinstance(features.get(name), datasets.ClassLabel):
            return _check_not_index(name, "--label-column")
    if columns == [exclude]:  # images alone: what an image folder with a single class sub-folder gives
        raise KdcliError(
            f"dataset {spec!r} has images but no labels: an image folder needs a sub-folder per class, at least "
            "two of them holding images (for a single class there is nothing to classify)")
    raise KdcliError(
        f"dataset {spec!r} has no label column (none named label/fine_label/labels, none of type ClassLabel; "
        f"columns: {listed}): pass --label-column NAME"
    )


def _check_not_index(column: str, option: str) -> str:
    if column == INDEX_COLUMN:
        raise KdcliError(
            f"column name {INDEX_COLUMN!r} is reserved by kdcli for row indices: rename the column or fix {option}"
        )
    return column


def _image_typed(spec: str, split, image_col: str):
    """``split`` with ``image_col`` typed as ``datasets.Image`` (casting bytes/paths columns if needed)."""
    import datasets

    feature = split.features.get(image_col) if split.features is not None else None
    if isinstance(feature, datasets.Image):
        return split if feature.decode else split.cast_column(image_col, datasets.Image())
    try:
        return split.cast_column(image_col, datasets.Image())
    except Exception as exc:  # not image data at all
        raise KdcliError(
            f"column {image_col!r} of dataset {spec!r} does not hold images ({feature}): pass --image-column NAME"
        ) from exc


def _holdout(spec: str, n: int, rows: np.ndarray | None, train_text: str) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, evaluation rows): a deterministic 10% of the training split's rows (all ``n``, or the
    slice's ``rows``) held out for evaluation when there is no evaluation split; sorted row numbers."""
    base = np.arange(n, dtype=np.int64) if rows is None else rows
    if len(base) < 2:
        raise KdcliError(
            f"dataset {spec!r} has no evaluation split and its {train_text!r} split is too small to hold "
            "10% out: pass --eval-split NAME"
        )
    # the same rows as train.train_test_split(test_size=0.1, seed=0) of those rows, kept as row numbers
    # (train_test_split would write index mappings next to the data, e.g. into a user's save_to_disk folder)
    permutation = np.random.default_rng(0).permutation(len(base))
    n_eval = math.ceil(HOLDOUT_FRACTION * len(base))
    return np.sort(base[permutation[n_eval:]]), np.sort(base[permutation[:n_eval]])


def _materialize(spec: str, stream):
    """A streamed split as an in-memory map-style ``datasets.Dataset`` (image bytes or paths, not decoded)."""
    import datasets

    features = stream.features
    raw = stream.decode(False)
    try:
        rows = list(raw)
    except Exception as exc:  # a damaged file (pyarrow, OSError): what the map-style path says, in one line
        raise KdcliError(f"could not read the evaluation split of dataset {spec!r} ({short_reason(exc)})") from None
    if not rows:
        raise KdcliError(f"the evaluation split of dataset {spec!r} is empty: pass another --eval-split")
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    return datasets.Dataset.from_dict(columns, features=features)


def _stream_num_examples(stream, split: str) -> int | None:
    info = getattr(stream, "info", None)
    splits = getattr(info, "splits", None)
    if splits and split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    return None


def _stored_bytes(value) -> bytes:
    """The bytes an image is stored as: encoded bytes, else its file's, else its pixels (arrays, PIL images)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
        try:
            return Path(path).read_bytes() if path else b""
        except OSError:
            return str(path).encode()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return np.asarray(value).tobytes()


def _label_array(split, label_col: str) -> np.ndarray:
    return np.asarray(split.select_columns([label_col]).with_format("numpy")[:][label_col])


def _check_no_null_labels(spec: str, split, label_col: str, name: str) -> None:
    """One clear line for examples without a label (null) in a map-style split (the whole split: its labels
    name the classes): they would otherwise fail to convert, be counted as unreadable images, or become a
    class called 'None'."""
    import pyarrow.compute as pc

    column = split.select_columns([label_col]).with_format("arrow")[:].column(label_col)
    if not column.null_count:
        return
    missing = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))
    n = len(missing)
    raise KdcliError(
        f"the {name!r} split of dataset {spec!r} has {n} example{'s' if n > 1 else ''} without a label (null) in "
        f"column {label_col!r} (row{'s' if n > 1 else ''} {_id_ranges(missing[:5].tolist())}"
        f"{', ...' if n > 5 else ''}): drop them from the data, or pick another --label-column")


def _id_ranges(ids: list[int], limit: int = 12) -> str:
    """``[3, 10, 11, 12, 40]`` -> ``"3, 10-12, 40"`` (at most ``limit`` runs, then ``"..."``)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def _labels(spec: str, train, eval_, label_col: str, train_side: tuple, eval_side: tuple,
            num_classes: int | None, warnings: list[str]):
    """Class names, label columns made integer (class names are encoded), and labels checked.

    ``train_side`` is (SplitSpec, rows or None), ``eval_side`` (text, rows or None): the rows used of each
    whole split. Class names come from the whole splits (a slice has the classes of its split); the range
    of labels is checked on the rows used. ``eval_`` may be ``train`` itself (a holdout).
    """
    import datasets

    (train_spec, train_rows), (eval_text, eval_rows) = train_side, eval_side
    same = eval_ is train
    streamed = isinstance(train, datasets.IterableDataset)
    feature = train.features.get(label_col) if train.features is not None else None
    kind = getattr(feature, "dtype", None)
    if not streamed:
        _check_no_null_labels(spec, train, label_col, train_spec.name)
    if not same and isinstance(eval_, datasets.Dataset):
        _check_no_null_labels(spec, eval_, label_col, eval_text.split("[")[0])
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and kind in ("string", "large_string"):
        if streamed:
            raise KdcliError(
                f"label column {label_col!r} of dataset {spec!r} holds class names, which a streamed dataset "
                "cannot encode up front: drop --streaming, or use a dataset with integer or ClassLabel labels"
            )
        names = sorted({str(v) for v in _label_array(train, label_col)})
        try:
            train = train.cast_column(label_col, datasets.ClassLabel(names=names))
            eval_ = train if same else eval_.cast_column(label_col, datasets.ClassLabel(names=names))
        except Exception as exc:
            raise KdcliError(
                f"the {eval_text!r} split of dataset {spec!r} has class names that {train_spec.text!r} does not: "
                "pick matching splits with --train-split / --eval-split"
            ) from exc
    elif isinstance(feature, datasets.Value) and kind is not None and kind.startswith(("int", "uint")):
        names = None
    else:
        raise KdcliError(
            f"label column {label_col!r} of dataset {spec!r} has type {feature}; expected integer class ids, "
            "ClassLabel or class-name strings: pass another --label-column"
        )
    if names is not None and num_classes is not None and num_classes != len(names):
        raise KdcliError(
            f"dataset {spec!r} names {len(names)} classes in its label column {label_col!r}, but --num-classes "
            f"is {num_classes}: drop --num-classes (it is for integer labels without class names)"
        )

    # whole splits: (split name, labels); the eval split is the training split itself for a holdout
    whole = [] if streamed else [(train_spec.name, _label_array(train, label_col))]
    eval_labels = whole[0][1] if same else _label_array(eval_, label_col)
    if not same:
        whole.append((eval_text.split("[")[0], eval_labels))
    checked = [(eval_text, eval_labels if eval_rows is None else eval_labels[eval_rows])]
    if not streamed:
        labels = whole[0][1]
        checked.insert(0, (train_spec.text, labels if train_rows is None else labels[train_rows]))

    if names is None and num_classes is not None:
        names = [str(i) for i in range(num_classes)]
    elif names is None:
        nonempty = [labels for _, labels in whole if len(labels)]
        top = max((int(labels.max()) for labels in nonempty), default=-1)
        names = [str(i) for i in range(top + 1)]
        present = np.zeros(top + 1, dtype=bool)
        for labels in nonempty:
            present[labels[(labels >= 0) & (labels <= top)]] = True
        empty = np.nonzero(~present)[0].tolist()
        if top >= 0 and empty:
            where = " and ".join(repr(name) for name, _ in whole)
            warnings.append(
                f"the integer labels of dataset {spec!r} go up to {top}, which makes {top + 1} classes, but "
                f"{len(empty)} of them have no examples in the {where} split{'s' if len(whole) > 1 else ''}: "
                f"{_id_ranges(empty)}; if the data has N classes, pass --num-classes N "
                "(a label of N or more is then an error)")
    for split_name, labels in checked:
        if not len(labels):
            continue
        if split_name == train_spec.text and "[" in split_name and whole:
            # a slice of rows sorted by class (an image folder's) holds only some of the split's classes
            held, of = len(np.unique(labels)), len(np.unique(whole[0][1]))
            if held < of:
                warnings.append(
                    f"the {split_name!r} slice of dataset {spec!r} holds {held} of its {of} "
                    "classes (are its rows sorted by class, as an image folder's are?): use the whole split, or a "
                    "source whose rows are shuffled")
        if num_classes is not None and labels.max() >= num_classes:
            raise KdcliError(
                f"the {split_name!r} split of dataset {spec!r} has label {labels.max()}, but --num-classes is "
                f"{num_classes} (labels 0..{num_classes - 1}): fix --num-classes, or the data")
        if labels.min() < 0 or labels.max() >= len(names):
            raise KdcliError(
                f"the {split_name!r} split of dataset {spec!r} has labels outside 0..{len(names) - 1} "
                f"(min {labels.min()}, max {labels.max()}; -1 usually means unlabelled): pick another split"
            )
    return train, eval_, names


def _first_image(spec: str, train, image_col: str, train_name: str, decoder, rows: np.ndarray | None = None):
    """The first image of the training split (of its ``rows``, when a slice or holdout) that decodes (to learn
    channels and size): unreadable leading rows are passed over, up to :data:`FIRST_IMAGE_TRIES` rows (read
    one at a time, for streams)."""
    import itertools

    import datasets

    def unreadable(exc: Exception) -> KdcliError:
        return KdcliError(
            f"could not read an image from column {image_col!r} of dataset {spec!r} ({short_reason(exc)}): "
            "pass the right --image-column"
        )

    try:
        if isinstance(train, datasets.IterableDataset):
            streamed = itertools.islice(iter(train.select_columns([image_col]).decode(False)), FIRST_IMAGE_TRIES)
            values = (row[image_col] for row in streamed)
        elif rows is not None:
            values = iter(_undecoded(train, image_col)[[int(r) for r in rows[:FIRST_IMAGE_TRIES]]][image_col])
        else:
            values = iter(_undecoded(train, image_col)[:FIRST_IMAGE_TRIES][image_col])
    except Exception as exc:  # the column cannot even be read
        raise unreadable(exc) from exc
    tried, first_error = 0, None
    while True:
        try:
            value = next(values, _END)
        except Exception as exc:  # a stream that fails to read its next row
            raise unreadable(exc) from exc
        if value is _END:
            break
        tried += 1
        try:
            image = _decode_or_raise(decoder, value)
        except Exception as exc:  # e.g. strings that are not image paths, bytes that are not images
            first_error = first_error or exc
            continue
        if not hasattr(image, "mode"):
            raise KdcliError(f"column {image_col!r} of dataset {spec!r} does not hold images: pass --image-column")
        return image
    if tried == 0:
        raise KdcliError(f"the {train_name!r} split of dataset {spec!r} is empty: pass another --train-split")
    raise KdcliError(
        f"could not read an image from column {image_col!r} of dataset {spec!r} in its first {tried} rows "
        f"({short_reason(first_error)}): pass the right --image-column, or fix the data"
    )


_END = object()


__all__ = ["DataBundle", "ImageClassificationDataset", "open_data"]
