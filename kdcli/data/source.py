"""Resolving a ``--dataset`` string to Hugging Face ``datasets`` splits.

Order: a built-in name, an existing local path (``save_to_disk`` folder, image folder, parquet folder or
file), else a Hugging Face Hub id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kdcli.data.builtin import BUILTIN_HELP, is_builtin, load_builtin
from kdcli.errors import KdcliError


@dataclass
class RawSource:
    """Splits as opened: map-style (``DatasetDict``) or, for streamed hub/local data, ``IterableDatasetDict``.

    Built-ins and ``save_to_disk`` folders are always map-style here, even when streaming is asked for:
    the bundle turns their training split into an iterable dataset itself.
    """

    kind: str  # "builtin" | "local" | "hub"
    splits: object  # datasets.DatasetDict | datasets.IterableDatasetDict
    location: str  # what was opened (expanded path, or the spec)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    default_augment: str | None = None  # a built-in's own recipe; None: augment="auto" goes by image size

    @property
    def streamed(self) -> bool:
        import datasets

        return isinstance(self.splits, datasets.IterableDatasetDict)


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception message, shortened, or its type name when it has none."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a local path (as opposed to a hub id such as ``uoft-cs/cifar10``)."""
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~", ".\\", "..\\")) or os.path.isabs(spec):
        return True
    if spec.endswith(".parquet"):
        return True
    for sep in {os.sep, "/"}:
        if sep in spec:
            first = spec.split(sep)[0]
            if first and os.path.isdir(first):  # partly exists: data/missing-folder
                return True
    return False


def resolve(spec: str, streaming: bool = False) -> RawSource:
    """Open ``spec``: a built-in, a local path or a hub id (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        raise KdcliError(f"empty dataset name: give a built-in ({BUILTIN_HELP}), a local path or a hub id")
    if is_builtin(spec):
        builtin = load_builtin(spec)
        return RawSource("builtin", builtin.splits, spec, builtin.mean, builtin.std, builtin.default_augment)
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return RawSource("local", open_local(path, streaming), os.path.abspath(path))
    if looks_like_path(spec):
        raise KdcliError(
            f"dataset path {spec} does not exist: check the path, or give a built-in ({BUILTIN_HELP}) "
            "or a Hugging Face Hub id"
        )
    return RawSource("hub", open_hub(spec, streaming), spec)


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def open_local(path: str, streaming: bool = False):
    """A local dataset: ``save_to_disk`` folder, image folder, folder of parquet files or one parquet file.

    ``save_to_disk`` folders come back map-style (a ``DatasetDict``) whatever ``streaming`` says.
    """
    import datasets

    what = (
        "expected a save_to_disk folder, a folder of class sub-folders of images, "
        "a folder of parquet files or a .parquet file"
    )
    try:
        if os.path.isdir(path) and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.Dataset):
                split = str(loaded.split) if loaded.split is not None else "train"
                loaded = datasets.DatasetDict({split: loaded})
            return loaded
        if os.path.isfile(path):
            if not path.endswith(".parquet"):
                raise KdcliError(f"cannot read dataset file {path}: {what}")
            return datasets.load_dataset("parquet", data_files={"train": path}, streaming=streaming)
        return datasets.load_dataset(path, streaming=streaming)
    except KdcliError:
        raise
    except Exception as exc:  # any failure to read is the user's data: one line
        raise KdcliError(f"could not read dataset at {path} ({short_reason(exc)}): {what}") from exc


def open_hub(spec: str, streaming: bool = False):
    """A Hugging Face Hub dataset; any failure to load it is reported as one readable line."""
    import datasets

    try:
        loaded = datasets.load_dataset(spec, streaming=streaming)
    except Exception as exc:  # offline, unknown id, gated, network...: one line
        raise KdcliError(
            f"dataset {spec!r} is not a built-in ({BUILTIN_HELP}), not a local path, and could not be "
            f"loaded from the Hugging Face Hub (offline?): {short_reason(exc)}"
        ) from exc
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):  # a single split
        loaded = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": loaded})
    return loaded
