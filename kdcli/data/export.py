"""`kdcli corrupt-dataset`: write a corrupted copy of a dataset that `--dataset DIR` reads back.

The folder holds parquet files named by split (``train-00000-of-00001.parquet``, ``test-…``), so
``datasets.load_dataset(DIR)`` finds the splits, and ``manifest.json``. Images are kept as they were.
The training split gets the corrupted ``label`` next to ``clean_label``, a ``noisy`` flag and
``source_index`` (the row in the whole source split, for a slice too: corruption is a pure function of it);
the evaluation split (or slice) is copied untouched, so a run on the folder evaluates on clean labels.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from kdcli import __version__
from kdcli.data.bundle import CORRUPTED_MANIFEST, open_data
from kdcli.errors import KdcliError

MANIFEST = CORRUPTED_MANIFEST


def corrupt_dataset(spec: str, out: Path, *, noise: str | None, imbalance: str | None, seed: int = 0,
                    class_order: str | None = None, split: str | None = None, eval_split: str | None = None,
                    image_column: str | None = None, label_column: str | None = None,
                    overwrite: bool = False) -> dict:
    """Write the corrupted dataset folder ``out`` atomically; returns its manifest."""
    import datasets

    datasets.disable_progress_bars()
    if not noise and not imbalance:
        raise KdcliError("nothing to do: give --noise and/or --imbalance")
    if out.exists() and not overwrite:
        raise KdcliError(f"--out {out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        what = "is not a folder" if not out.is_dir() else f"is not a corrupted dataset (no {MANIFEST})"
        raise KdcliError(f"--out {out} {what}: --overwrite only replaces what corrupt-dataset wrote; choose "
                         "another --out")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise KdcliError(f"--out {out}: {parent} is a file, not a folder")
    bundle = open_data(spec, image_column=image_column, label_column=label_column, train_split=split,
                       eval_split=eval_split, augment="none")
    block = bundle.corrupt(noise, imbalance, seed, class_order)
    clean, noisy = bundle.training_labels()
    rows = bundle._rows
    names = datasets.ClassLabel(names=bundle.class_names)

    def labelled(split_ds, labels, extra: dict) -> datasets.Dataset:
        ds = split_ds.select_columns([bundle.image_column])
        if bundle.image_column != "image":
            ds = ds.rename_column(bundle.image_column, "image")
        ds = ds.add_column("label", [int(v) for v in labels]).cast_column("label", names)
        for name, values in extra.items():
            ds = ds.add_column(name, values)
        return ds

    train = labelled(bundle._train.select(rows, keep_in_memory=True), noisy[rows], {
        "clean_label": [int(v) for v in clean[rows]],
        "noisy": [bool(v) for v in noisy[rows] != clean[rows]],
        "source_index": [int(v) for v in rows]})
    evaluation = bundle.eval_split_data()  # the slice or holdout, when the evaluation split is one
    eval_labels = np.asarray(evaluation.select_columns([bundle.label_column]).with_format("numpy")[:][
        bundle.label_column])
    test = labelled(evaluation, eval_labels, {})

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.to_parquet(str(tmp / "train-00000-of-00001.parquet"))
    test.to_parquet(str(tmp / "test-00000-of-00001.parquet"))
    manifest = {
        "kdcli_version": __version__, "source": {"dataset": spec, "train_split": bundle.train_split,
                                                 "eval_split": bundle.eval_split,
                                                 "fingerprint": bundle.content_fingerprint()},
        "num_classes": bundle.num_classes, "class_names": bundle.class_names,
        "num_train": len(train), "num_eval": len(test), "corruption": block,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest
