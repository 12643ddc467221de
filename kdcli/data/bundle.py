"""``open_data``: one ``--dataset`` string -> a :class:`DataBundle` the engine trains and evaluates on.

Every item is ``{"image": float32 (C, S, S) in [0, 1], "label": int, "index": int}``, where ``index`` is the
example's row in its split (the same streamed or map-style, on any number of processes), so that label
corruption and augmentation can be pure functions of (seed, index, ...).

Images are read undecoded and decoded here, one example at a time, with the column's own
``datasets.Image`` feature: an example that does not decode (or transform) becomes
``{"image": None, "label": -1, "index": i, "name": NAME}`` instead of failing the whole batch, and
:attr:`DataBundle.collate` (the DataLoader ``collate_fn``) drops it, listing NAME under ``"skipped"``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcli.data.skips import SkipCollate, bad_item, example_name
from kdcli.data.source import resolve, short_reason
from kdcli.data.transforms import ImageTransform, channels_for_mode, check_augment
from kdcli.errors import KdcliError

EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val")
IMAGE_COLUMN_NAMES = ("img", "image")
LABEL_COLUMN_NAMES = ("label", "fine_label", "labels")
HOLDOUT_SPLIT = "train[holdout]"
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
        self.rows = rows  # original row indices this view exposes (a corrupted, subsampled split), or all
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
    """Generator for ``from_generator``: rows ``start..stop`` of a map-style split, each with its row index.

    ``ranges`` is a list of ``(start, stop)``: ``from_generator`` turns it into shards (one range each).
    """
    for start, stop in ranges:
        for low in range(start, stop, chunk):
            high = min(low + chunk, stop)
            batch = split[low:high]
            for j in range(high - low):
                row = {name: values[j] for name, values in batch.items()}
                row[INDEX_COLUMN] = low + j
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
    """An opened dataset: what it is, and how to get torch datasets of its training and evaluation splits."""

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
    augment: str = "none"  # resolved training augmentation: "crop-flip" | "crop" | "none"
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
    _train_sets: list = field(default_factory=list, repr=False, compare=False)  # augmenting map-style views
    _stream_fns: list = field(default_factory=list, repr=False, compare=False)  # augmenting stream functions

    @property
    def collate(self) -> SkipCollate:
        """The DataLoader ``collate_fn`` for this data (picklable): drops unreadable examples, stacks the rest,
        and lists what it dropped under ``"skipped"`` (see :class:`~kdcli.data.skips.SkipCollate`)."""
        return SkipCollate(self.in_chans, self.image_size)

    def corrupt(self, noise: str | None, imbalance: str | None, seed: int = 0,
                class_order: str | None = None, split: str = "train") -> dict[str, Any]:
        """Corrupt the labels (noise) and class balance (imbalance) of the training split (or, when asked,
        the evaluation split: ``split="eval"``); returns the report block.

        Each decision is a pure function of (seed, original index, label): see ``kdcli.data.corruption``.
        """
        from kdcli.data import corruption as cor

        if split == "eval":
            clean = _label_array(self._eval, self.label_column).astype(np.int64)
            keep, noisy, block = _corrupt_labels(cor, clean, self.num_classes, noise, imbalance, seed, class_order)
            self._eval_rows, self._eval_labels = np.nonzero(keep)[0], noisy
            self.num_eval = int(keep.sum())
            return block
        import datasets

        if self.streaming and not isinstance(self._train, datasets.Dataset):  # a true stream (hub, parquet)
            clean = self._stream_labels()
        else:
            clean = _label_array(self._train, self.label_column).astype(np.int64)
        keep, noisy, block = _corrupt_labels(cor, clean, self.num_classes, noise, imbalance, seed, class_order)
        self._rows, self._noisy, self.clean_labels = np.nonzero(keep)[0], noisy, clean
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

    def training_labels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(clean, corrupted) labels by original row index, when the training split was corrupted."""
        return None if self.clean_labels is None else (self.clean_labels, self._noisy)

    def _transform(self, train: bool) -> ImageTransform:
        return ImageTransform(self.in_chans, self.image_size, self.augment, train=train, seed=self.seed,
                              epoch=self._epoch)

    def _indexed_stream(self):
        """The training split as an unshuffled ``datasets.IterableDataset`` with an ``index`` column."""
        if self._stream_base is None:
            import datasets

            if isinstance(self._train, datasets.Dataset):  # built-in or save_to_disk data, streamed
                # Shards are row ranges read by a generator, rather than Dataset.to_iterable_dataset over a
                # table with an added index column: pickling those shards (DataLoader workers under spawn)
                # copies the whole in-memory table or column once per shard.
                split = _undecoded(self._train, self.image_column)
                shards = min(STREAM_SHARDS, len(split))
                edges = [len(split) * k // shards for k in range(shards + 1)]
                self._stream_base = datasets.IterableDataset.from_generator(
                    _rows_in_ranges,
                    features=_with_index_features(split.features, self.image_column),
                    gen_kwargs={"split": split, "ranges": [(edges[k], edges[k + 1]) for k in range(shards)]},
                )
            else:
                self._stream_base = self._train
        return self._stream_base

    def train_dataset(self, rank: int = 0, world_size: int = 1, train: bool = True):
        """The training split: augmented when ``train``, else plain (for diagnostics).

        Map-style (not streaming): a torch ``Dataset`` over the whole split; ``rank``/``world_size`` are
        ignored (the caller shards, e.g. with accelerate). Streaming: a ``datasets.IterableDataset`` (a
        torch ``IterableDataset``) whose rows carry their original index, shuffled with a buffer and
        ``seed`` when ``train`` (reseeded by :meth:`set_epoch`), and split by node when ``world_size > 1``.

        Augmentation (``train``) is a pure function of (``seed``, epoch, original index); the epoch is the
        last :meth:`set_epoch`'s. Items of unreadable examples are bad items: batch with :attr:`collate`.
        """
        if not self.streaming:
            dataset = ImageClassificationDataset(self._train, self.image_column, self.label_column,
                                                 self._transform(train), rows=self._rows, labels=self._noisy,
                                                 image_feature=self._image_feature, root=self.root)
            if train and dataset.transform.augment != "none":
                self._train_sets.append(dataset)
            return dataset
        from datasets.distributed import split_dataset_by_node

        stream = self._indexed_stream()
        if self._rows is not None and len(self._rows) < len(self._noisy):  # imbalance: drop the rows not kept
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
        reseeds the streaming shuffle, and picks every augmented example's crop and flip (map-style and
        streamed). Call it before iterating: DataLoader workers started afterwards (and persistent ones,
        the epoch being in shared memory) use it."""
        self._epoch = int(epoch)
        for stream in self._iterables:
            stream.set_epoch(epoch)
        for holder in (*self._train_sets, *self._stream_fns):
            holder.transform.set_epoch(epoch)

    def eval_dataset(self) -> ImageClassificationDataset:
        """The evaluation split: map-style, known length, no augmentation; unreadable examples are bad items,
        as in training (batch with :attr:`collate`)."""
        return ImageClassificationDataset(self._eval, self.image_column, self.label_column, self._transform(False),
                                          rows=self._eval_rows, labels=self._eval_labels,
                                          image_feature=self._image_feature, root=self.root)


def _corrupt_labels(cor, clean: np.ndarray, c: int, noise: str | None, imbalance: str | None, seed: int,
                    class_order: str | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(kept rows mask, labels by row, report block) for one split's clean labels."""
    n_spec = cor.parse_noise(noise, c) if noise else None
    i_spec = cor.parse_imbalance(imbalance, c, class_order) if imbalance else None
    index = np.arange(len(clean))
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
) -> DataBundle:
    """Open ``spec`` (a built-in name, a local path or a hub id) and describe it as a :class:`DataBundle`."""
    check_augment(augment)
    if image_size is not None and image_size < 1:
        raise KdcliError(f"image size must be a positive number of pixels, got {image_size}: fix --image-size")
    if shuffle_buffer < 1:
        raise KdcliError(f"shuffle buffer must be at least 1, got {shuffle_buffer}: fix --shuffle-buffer")

    raw = resolve(spec, streaming=streaming)
    splits = raw.splits
    available = list(splits.keys())
    train_name, eval_name = _pick_splits(spec, available, train_split, eval_split)
    train = splits[train_name]

    columns = _column_names(train)
    features = train.features
    image_col = _image_column(spec, columns, features, image_column)
    label_col = _label_column(spec, columns, features, label_column, exclude=image_col)
    keep = [image_col, label_col]

    if raw.streamed:
        if eval_name is None:
            raise KdcliError(
                f"dataset {spec!r} has no evaluation split (splits: {', '.join(available)}) and a streamed "
                "dataset cannot hold one out: pass --eval-split NAME, or drop --streaming"
            )
        train = _image_typed(spec, train.select_columns(keep), image_col)
        eval_ = _materialize(spec, _image_typed(spec, splits[eval_name].select_columns(keep), image_col))
        num_train = _stream_num_examples(splits[train_name], train_name)
    else:
        train = _image_typed(spec, train.select_columns(keep), image_col)
        if eval_name is None:
            train, eval_ = _holdout(spec, train, train_name)
            eval_name = HOLDOUT_SPLIT
        else:
            eval_ = _image_typed(spec, splits[eval_name].select_columns(keep), image_col)
        num_train = len(train)
        if len(eval_) == 0:
            raise KdcliError(f"the {eval_name!r} split of dataset {spec!r} is empty: pass another --eval-split")

    train, eval_, class_names = _labels(spec, train, eval_, label_col, train_name, eval_name)
    image_feature = train.features.get(image_col)
    first = _first_image(spec, train, image_col, train_name, _decoder(image_feature))
    in_chans = channels_for_mode(first.mode)
    if image_size is None:
        image_size = min(first.size)
    if augment == "auto":
        augment = raw.default_augment

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
        train_split=train_name,
        eval_split=eval_name,
        streaming=streaming,
        num_train=num_train,
        num_eval=len(eval_),
        augment=augment,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        _train=train,
        _eval=eval_,
        _label_source=label_source,
        root=_data_root(raw),
        _image_feature=image_feature,
    )


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
    spec: str, available: list[str], train_split: str | None, eval_split: str | None
) -> tuple[str, str | None]:
    listed = ", ".join(available) or "none"
    if train_split is None:
        if "train" in available:
            train_split = "train"
        elif len(available) == 1:
            train_split = available[0]
        else:
            raise KdcliError(f"dataset {spec!r} has no 'train' split (splits: {listed}): pass --train-split NAME")
    elif train_split not in available:
        raise KdcliError(f"dataset {spec!r} has no split {train_split!r} (splits: {listed}): fix --train-split")
    if eval_split is None:
        eval_split = next((s for s in EVAL_SPLIT_NAMES if s in available and s != train_split), None)
    elif eval_split not in available:
        raise KdcliError(f"dataset {spec!r} has no split {eval_split!r} (splits: {listed}): fix --eval-split")
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


def _holdout(spec: str, train, train_name: str):
    """A deterministic 10% holdout of the training split, used for evaluation when there is no eval split."""
    if len(train) < 2:
        raise KdcliError(
            f"dataset {spec!r} has no evaluation split and its {train_name!r} split is too small to hold "
            "10% out: pass --eval-split NAME"
        )
    # the same rows as train.train_test_split(test_size=0.1, seed=0), but with the index mappings kept in
    # memory: train_test_split would write them next to the data (e.g. into a user's save_to_disk folder)
    permutation = np.random.default_rng(0).permutation(len(train))
    n_eval = math.ceil(HOLDOUT_FRACTION * len(train))
    return (
        train.select(permutation[n_eval:], keep_in_memory=True),
        train.select(permutation[:n_eval], keep_in_memory=True),
    )


def _materialize(spec: str, stream):
    """A streamed split as an in-memory map-style ``datasets.Dataset`` (image bytes or paths, not decoded)."""
    import datasets

    features = stream.features
    raw = stream.decode(False)
    rows = list(raw)
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


def _label_array(split, label_col: str) -> np.ndarray:
    return np.asarray(split.select_columns([label_col]).with_format("numpy")[:][label_col])


def _labels(spec: str, train, eval_, label_col: str, train_name: str, eval_name: str):
    """Class names, label columns made integer (class names are encoded), and labels checked."""
    import datasets

    streamed = isinstance(train, datasets.IterableDataset)
    feature = train.features.get(label_col) if train.features is not None else None
    kind = getattr(feature, "dtype", None)
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
            eval_ = eval_.cast_column(label_col, datasets.ClassLabel(names=names))
        except Exception as exc:
            raise KdcliError(
                f"the {eval_name!r} split of dataset {spec!r} has class names that {train_name!r} does not: "
                "pick matching splits with --train-split / --eval-split"
            ) from exc
    elif isinstance(feature, datasets.Value) and kind is not None and kind.startswith(("int", "uint")):
        names = None
    else:
        raise KdcliError(
            f"label column {label_col!r} of dataset {spec!r} has type {feature}; expected integer class ids, "
            "ClassLabel or class-name strings: pass another --label-column"
        )

    checked = [(eval_name, _label_array(eval_, label_col))]
    if not streamed:
        checked.insert(0, (train_name, _label_array(train, label_col)))
    if names is None:
        top = max(int(labels.max()) for _, labels in checked if len(labels))
        names = [str(i) for i in range(top + 1)]
    for split_name, labels in checked:
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise KdcliError(
                f"the {split_name!r} split of dataset {spec!r} has labels outside 0..{len(names) - 1} "
                f"(min {labels.min()}, max {labels.max()}; -1 usually means unlabelled): pick another split"
            )
    return train, eval_, names


def _first_image(spec: str, train, image_col: str, train_name: str, decoder):
    """The first image of the training split that decodes (to learn channels and size): unreadable leading
    rows are passed over, up to :data:`FIRST_IMAGE_TRIES` rows (read one at a time, for streams)."""
    import itertools

    import datasets

    def unreadable(exc: Exception) -> KdcliError:
        return KdcliError(
            f"could not read an image from column {image_col!r} of dataset {spec!r} ({short_reason(exc)}): "
            "pass the right --image-column"
        )

    try:
        if isinstance(train, datasets.IterableDataset):
            rows = itertools.islice(iter(train.select_columns([image_col]).decode(False)), FIRST_IMAGE_TRIES)
            values = (row[image_col] for row in rows)
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
