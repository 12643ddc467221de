"""Unreadable images are skipped, named and counted (kdcli.data.skips); augmentation is a pure function of
(seed, epoch, original index), whichever worker reads an example, in whatever order."""

from __future__ import annotations

import io
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdcli.data import DataBundle, SkipCollate, SkipTracker, open_data
from kdcli.data.skips import bad_item, example_name, skipped_line
from kdcli.data.transforms import ImageTransform, augment_draws
from kdcli.errors import KdcliError

COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220)}
SIZE = 12
GOOD_PER_CLASS = 20
TRAIN_BAD = {"train/cat/000_truncated.png", "train/dog/notes.jpg"}  # the truncated PNG sorts first
EVAL_BAD = {"test/dog/broken.png"}
PARQUET_BAD_ROWS = (0, 7)  # row 0: a null image; row 7: bytes that are not an image
PARQUET_EVAL_BAD_ROWS = (3,)


def _truncated_png() -> bytes:
    """A PNG cut short inside its pixel data: it opens (the header is whole) but does not load."""
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: int(len(data) * 0.7)]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """An image folder (train/ and test/, classes cat and dog) with unreadable files among the images."""
    root = tmp_path_factory.mktemp("badfolder")
    for split, count in (("train", GOOD_PER_CLASS), ("test", 4)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (SIZE, SIZE), colour).save(root / split / name / f"{i + 1:03d}.png")
    (root / "train" / "cat" / "000_truncated.png").write_bytes(_truncated_png())
    (root / "train" / "dog" / "notes.jpg").write_text("shopping list: not an image\n")
    (root / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def _grey_split(n: int, bad_rows: tuple[int, ...]) -> datasets.Dataset:
    """Images whose grey level encodes the label (3 classes), with a null at bad row 0 and garbage elsewhere."""
    labels = [i % 3 for i in range(n)]
    images = [Image.new("RGB", (10, 10), (20 + 70 * k,) * 3) for k in labels]
    for row in bad_rows:
        images[row] = None if row == 0 else {"bytes": b"definitely not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def bad_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("badparquet")
    _grey_split(30, PARQUET_BAD_ROWS).to_parquet(str(root / "train-00000.parquet"))
    _grey_split(12, PARQUET_EVAL_BAD_ROWS).to_parquet(str(root / "test-00000.parquet"))
    return root


@pytest.fixture(scope="module")
def bad_saved(tmp_path_factory):
    """The same rows as ``bad_parquet``, as a save_to_disk folder (streamed by kdcli's own row generator)."""
    root = tmp_path_factory.mktemp("badsaved") / "saved"
    datasets.DatasetDict({"train": _grey_split(30, PARQUET_BAD_ROWS),
                          "test": _grey_split(12, PARQUET_EVAL_BAD_ROWS)}).save_to_disk(str(root))
    return root


def _run(dataset, collate, workers: int, batch_size: int = 8, shuffle: bool = False):
    """(good items as (index, label, image), skipped names, batches) from a DataLoader over ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        shuffle=shuffle and not isinstance(dataset, torch.utils.data.IterableDataset))
    good, skipped, batches = [], [], []
    for batch in loader:
        assert set(batch) == {"image", "label", "index", "skipped"}
        n = batch["image"].shape[0]
        assert batch["label"].shape == batch["index"].shape == (n,) and batch["index"].dtype == torch.int64
        assert all(isinstance(name, str) for name in batch["skipped"])
        good += [(int(i), int(y), x) for i, y, x in zip(batch["index"], batch["label"], batch["image"], strict=True)]
        skipped += batch["skipped"]
        batches.append(batch)
    return good, skipped, batches


def _colour_class(image: torch.Tensor) -> str:
    return "cat" if image[0].mean() > image[2].mean() else "dog"


# ------------------------------------------------------------------------------------------------ image folder


def test_open_data_skips_unreadable_leading_rows(bad_folder):
    bundle = open_data(str(bad_folder))
    assert (bundle.in_chans, bundle.image_size) == (3, SIZE)  # learnt from the first image that decodes
    assert (bundle.num_train, bundle.num_eval) == (2 * GOOD_PER_CLASS + 2, 8 + 1)
    assert bundle.class_names == ["cat", "dog"]


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_every_good_example_once(bad_folder, workers):
    bundle = open_data(str(bad_folder), augment="none")
    train = bundle.train_dataset()
    good, skipped, _ = _run(train, bundle.collate, workers, shuffle=True)
    assert sorted(skipped) == sorted(TRAIN_BAD)
    counts = Counter(i for i, _, _ in good)
    assert len(counts) == 2 * GOOD_PER_CLASS and set(counts.values()) == {1}
    bad_rows = set(range(len(train))) - set(counts)
    assert len(bad_rows) == 2
    assert {train[i]["name"] for i in bad_rows} == TRAIN_BAD and all(train[i]["image"] is None for i in bad_rows)
    for _, label, image in good:
        assert image.shape == (3, SIZE, SIZE) and bundle.class_names[label] == _colour_class(image)
    # evaluation: the same collate, the same rule
    good, skipped, _ = _run(bundle.eval_dataset(), bundle.collate, workers)
    assert skipped == sorted(EVAL_BAD) and len(good) == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_image_folder(bad_folder, workers):
    bundle = open_data(str(bad_folder), streaming=True, shuffle_buffer=8, augment="none")
    good, skipped, _ = _run(bundle.train_dataset(), bundle.collate, workers)
    assert sorted(skipped) == sorted(TRAIN_BAD)
    assert len(good) == 2 * GOOD_PER_CLASS and len({i for i, _, _ in good}) == len(good)
    assert all(bundle.class_names[label] == _colour_class(image) for _, label, image in good)
    _, skipped, _ = _run(bundle.eval_dataset(), bundle.collate, workers)
    assert skipped == sorted(EVAL_BAD)


# ------------------------------------------------------------------------------------------------ parquet, saved


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_null_and_garbage_rows(kind, workers, streaming, request):
    path = request.getfixturevalue("bad_parquet" if kind == "parquet" else "bad_saved")
    bundle = open_data(str(path), streaming=streaming, shuffle_buffer=8, augment="none")
    assert (bundle.in_chans, bundle.image_size) == (3, 10)  # row 0 is null: open_data read row 1
    good, skipped, _ = _run(bundle.train_dataset(), bundle.collate, workers)
    assert sorted(skipped) == [f"row {r}" for r in PARQUET_BAD_ROWS]
    assert sorted(i for i, _, _ in good) == [i for i in range(30) if i not in PARQUET_BAD_ROWS]
    for _, label, image in good:
        assert round((image.mean().item() * 255 - 20) / 70) == label
    good, skipped, _ = _run(bundle.eval_dataset(), bundle.collate, workers)
    assert skipped == [f"row {r}" for r in PARQUET_EVAL_BAD_ROWS] and len(good) == 11


def test_all_bad_batch(bad_parquet):
    bundle = open_data(str(bad_parquet))
    train = bundle.train_dataset()
    loader = DataLoader(train, batch_size=2, sampler=list(PARQUET_BAD_ROWS), collate_fn=bundle.collate)
    (batch,) = list(loader)
    assert batch["image"].shape == (0, 3, 10, 10) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == batch["index"].shape == (0,) and batch["label"].dtype == torch.int64
    assert batch["skipped"] == [f"row {r}" for r in PARQUET_BAD_ROWS]
    empty = SkipCollate(1, 8)([bad_item("a.png", 3)])
    assert empty["image"].shape == (0, 1, 8, 8) and empty["skipped"] == ["a.png"]


def test_nothing_readable_is_one_line(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": b"junk", "path": None}] * 60, "label": [0, 1] * 30}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "junk"))
    with pytest.raises(KdcliError, match=r"could not read an image .* first 50 rows") as caught:
        open_data(str(tmp_path / "junk"))
    assert "\n" not in str(caught.value)


def test_collate_pickles_and_names():
    import pickle

    collate = pickle.loads(pickle.dumps(SkipCollate(3, 4)))
    batch = collate([{"image": torch.zeros(3, 4, 4), "label": 1, "index": 5}, bad_item("row 9", 9)])
    assert batch["image"].shape == (1, 3, 4, 4) and batch["index"].tolist() == [5]
    assert batch["label"].tolist() == [1] and batch["skipped"] == ["row 9"]
    assert example_name({"bytes": None, "path": "/data/x/cat/a.png"}, 3, "/data/x") == "cat/a.png"
    assert example_name({"bytes": None, "path": "/cache/train/cat/a.png"}, 3, "/elsewhere") == "cat/a.png"
    assert example_name({"bytes": b"..", "path": "a.png"}, 3, None) == "row 3"
    assert example_name(None, 12, "/data") == "row 12"


# ------------------------------------------------------------------------------------------------ tracker


def test_tracker_limit_is_one_line_naming_offenders():
    tracker = SkipTracker("train", 200, 0.01)  # at most 2 of 200
    tracker.add(["cat/a.png"])
    tracker.add([])
    tracker.add(["cat/b.png"])
    assert tracker.report() == {"count": 2, "examples": ["cat/a.png", "cat/b.png"]}
    assert tracker.line() == "skipped 2 unreadable images in train: cat/a.png, cat/b.png"
    with pytest.raises(KdcliError) as caught:
        tracker.add(["dog/c.png", "dog/d.png"])
    message = str(caught.value)
    assert "\n" not in message and "'train'" in message and "4 unreadable" in message and "2 allowed" in message
    assert "cat/a.png, cat/b.png, dog/c.png and 1 more" in message and "--max-bad-fraction" in message
    assert SkipTracker("train", 200, 0.01).line() is None


def test_tracker_report_merge_and_defaults():
    a, b = SkipTracker("eval", 1000, 0.05), SkipTracker("eval", 1000, 0.05)
    a.add([f"row {i}" for i in range(15)])
    b.add([f"row {i}" for i in range(100, 130)])
    a.merge(b.report())
    report = a.report()
    assert report["count"] == 45 and len(report["examples"]) == 20 and report["examples"][15] == "row 100"
    with pytest.raises(KdcliError, match="51 unreadable images in the 'eval' split"):
        a.merge(SkipTracker("eval", 1000, 1.0).report() | {"count": 6})
    assert SkipTracker("train", 10).max_fraction == 0.01
    with pytest.raises(KdcliError, match="--max-bad-fraction"):
        SkipTracker("train", 10, 1.5)
    zero = SkipTracker("train", 10, 0.0)
    with pytest.raises(KdcliError, match="0 allowed"):
        zero.add(["x.png"])


def test_tracker_unknown_total():
    tracker = SkipTracker("train", None, 0.01)
    tracker.add(["a", "b"], seen=64)  # too few seen to judge yet
    assert tracker.report() == {"count": 2, "examples": ["a", "b"], "seen": 64}
    with pytest.raises(KdcliError, match="2 unreadable .*of 64 examples read so far"):
        tracker.check()
    streamed = SkipTracker("train", None, 0.01)
    for _ in range(20):
        streamed.add(["x"] if _ % 4 == 0 else [], seen=64)  # 5 of 1280: fine
    with pytest.raises(KdcliError):
        streamed.add(["y"] * 20, seen=64)


def test_skipped_line():
    assert skipped_line("train", 3, ["a.png", "b.png", "c.png"]) == (
        "skipped 3 unreadable images in train: a.png, b.png, c.png")
    assert skipped_line("train", 15, [f"{c}.png" for c in "abcdefgh"]) == (
        "skipped 15 unreadable images in train: a.png, b.png, c.png and 12 more")
    assert skipped_line("test", 1, ["row 4"]) == "skipped 1 unreadable image in test: row 4"


# ------------------------------------------------------------------------------------------------ augmentation


def _by_index(dataset, collate, workers: int, shuffle: bool, batch_size: int = 16) -> dict[int, torch.Tensor]:
    good, skipped, _ = _run(dataset, collate, workers, batch_size=batch_size, shuffle=shuffle)
    assert not skipped
    return {i: x for i, _, x in good}


def _same(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    bundle = open_data("synthetic:16:3:96", seed=7)
    train = bundle.train_dataset()
    bundle.set_epoch(3)
    torch.manual_seed(0)
    reference = _by_index(train, bundle.collate, 0, shuffle=False)
    torch.manual_seed(1)  # torch's global RNG plays no part
    assert _same(reference, _by_index(train, bundle.collate, 2, shuffle=True, batch_size=5))
    assert all(torch.equal(train[i]["image"], reference[i]) for i in (0, 50, 95))
    assert torch.equal(train.__getitems__([95, 3])[0]["image"], reference[95])
    fresh = open_data("synthetic:16:3:96", seed=7)
    fresh.set_epoch(3)  # set before the dataset is handed out: it starts at that epoch
    assert _same(reference, _by_index(fresh.train_dataset(), fresh.collate, 0, shuffle=True))
    bundle.set_epoch(4)
    other = _by_index(train, bundle.collate, 2, shuffle=True)
    differ = sum(not torch.equal(reference[i], other[i]) for i in reference)
    assert differ >= 0.8 * len(reference)
    reseeded = open_data("synthetic:16:3:96", seed=8)
    reseeded.set_epoch(3)
    again = _by_index(reseeded.train_dataset(), reseeded.collate, 0, shuffle=False)
    assert sum(not torch.equal(reference[i], again[i]) for i in reference) >= 0.8 * len(reference)
    # evaluation and plain training views: never augmented
    plain = bundle.train_dataset(train=False)
    evaluated = bundle.eval_dataset()
    first = [evaluated[i]["image"] for i in range(5)], [plain[i]["image"] for i in range(5)]
    bundle.set_epoch(9)
    assert all(torch.equal(a, evaluated[i]["image"]) for i, a in enumerate(first[0]))
    assert all(torch.equal(a, plain[i]["image"]) for i, a in enumerate(first[1]))


def test_set_epoch_reaches_persistent_workers():
    bundle = open_data("synthetic:8:2:40", seed=1)
    train = bundle.train_dataset()
    loader = DataLoader(train, batch_size=8, num_workers=2, persistent_workers=True, collate_fn=bundle.collate)
    seen = []
    for epoch in (0, 1):
        bundle.set_epoch(epoch)
        seen.append({int(i): x for b in loader for i, x in zip(b["index"], b["image"], strict=True)})
    for epoch in (0, 1):
        bundle.set_epoch(epoch)
        assert _same(seen[epoch], _by_index(train, bundle.collate, 0, shuffle=False))
    assert not _same(seen[0], seen[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_augmentation_matches_map_style(workers):
    streamed = open_data("synthetic:8:3:90", streaming=True, shuffle_buffer=16, seed=5)
    mapped = open_data("synthetic:8:3:90", seed=5)
    stream, dataset = streamed.train_dataset(), mapped.train_dataset()
    for epoch in (0, 2):
        streamed.set_epoch(epoch)
        mapped.set_epoch(epoch)
        assert _same(_by_index(stream, streamed.collate, workers, shuffle=False),
                     _by_index(dataset, mapped.collate, 0, shuffle=False))


def _position_image(size: int = 12) -> Image.Image:
    """A grayscale image whose every pixel value is distinct (1..size*size): crops can be located."""
    return Image.fromarray((np.arange(size * size).reshape(size, size) + 1).astype(np.uint8), mode="L")


def test_crop_offsets_uniform_and_flips_fair():
    size, n = 12, 3000
    transform = ImageTransform(1, size, "crop-flip", train=True, seed=11)
    pad = transform.padding
    image = _position_image(size)
    marker = (size // 2) * size + size // 2 + 1  # the value of pixel (6, 6)
    offsets, flips = Counter(), 0
    for index in range(n):
        out = (transform(image, index) * 255).round().to(torch.int64)[0]
        rows, cols = torch.nonzero(out == marker, as_tuple=True)
        (r,), (c,) = rows.tolist(), cols.tolist()
        top = size // 2 + pad - r
        flipped = bool(out[r, c + 1] == marker - 1)  # pixel (6, 5) is to the right: mirrored
        flips += flipped
        left = size // 2 + pad - ((size - 1 - c) if flipped else c)
        offsets[(top, left)] += 1
    cells = (2 * pad + 1) ** 2
    assert set(offsets) == {(t, s) for t in range(2 * pad + 1) for s in range(2 * pad + 1)}
    assert min(offsets.values()) > 0.7 * n / cells and max(offsets.values()) < 1.3 * n / cells
    assert 0.45 * n < flips < 0.55 * n
    # the draws themselves: uniform, and a pure function of (seed, epoch, index)
    u = np.array([augment_draws(3, 1, i) for i in range(20_000)])
    assert u.min() >= 0 and u.max() < 1 and np.abs(u.mean(0) - 0.5).max() < 0.01
    assert np.histogram(u[:, 0], bins=10, range=(0, 1))[0].min() > 1800
    assert augment_draws(3, 1, 5) == tuple(u[5]) and augment_draws(3, 2, 5) != augment_draws(3, 1, 5)
    assert augment_draws(-1, 0, 2**40) == augment_draws(-1, 0, 2**40)


def test_bundle_collate_is_exported():
    bundle = open_data("synthetic:8:2:4")
    assert isinstance(bundle, DataBundle) and isinstance(bundle.collate, SkipCollate)
    assert (bundle.collate.in_chans, bundle.collate.image_size) == (3, 8)


# ----------------------------------------------------------------------------- through the engine and the CLI


def _cli(*args):
    from tests.test_cli import kdcli

    kdcli(*args)


def test_a_run_skips_names_and_counts_bad_images(bad_folder, tmp_path, capsys):
    from kdcli.engine.report import EvalReport, Report

    out = tmp_path / "run"
    _cli("train", "--model", "cifar_resnet8", "--dataset", bad_folder, "--epochs", "2", "--batch-size", "7",
         "--workers", "2", "--max-bad-fraction", "0.2", "--out", out)  # 6 batches of 7: no example left out
    printed = capsys.readouterr().out
    assert "skipped 2 unreadable images in train" in printed and "skipped 1 unreadable image in eval" in printed
    assert printed.count("unreadable images in train") == 1  # said once, not every epoch
    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.data.skipped["train"]["count"] == 2
    assert set(report.data.skipped["train"]["examples"]) == TRAIN_BAD
    assert report.data.skipped["eval"] == {"count": 1, "examples": sorted(EVAL_BAD)}
    assert report.metrics.final.num_examples == 8  # the 8 readable test images
    assert sum(h.images for h in report.history) == 2 * 40  # every readable training image, each epoch

    _cli("evaluate", out, "--dataset", bad_folder, "--max-bad-fraction", "0.2", "--out", tmp_path / "eval.json")
    ev = EvalReport.model_validate_json((tmp_path / "eval.json").read_text())
    assert ev.data.skipped == {"eval": {"count": 1, "examples": sorted(EVAL_BAD)}}
    assert ev.metrics.final.num_examples == 8


def test_too_many_bad_images_stop_the_run_with_one_line(bad_folder, tmp_path, capsys):
    from tests.test_cli import fails

    err = fails(capsys, "train", "--model", "cifar_resnet8", "--dataset", bad_folder, "--epochs", "1",
                "--batch-size", "8", "--out", tmp_path / "run")  # default: at most 1% of 42
    # it stops as soon as the limit (0 of 42) is passed, naming the first offender met
    assert "1 unreadable image in the 'train' split, more than the 0 allowed" in err and "--max-bad-fraction" in err
    assert any(name in err for name in TRAIN_BAD)
    assert not (tmp_path / "run" / "report.json").exists()


def test_mid_epoch_resume_is_exact_with_workers_and_random_augmentation(bad_folder, tmp_path, monkeypatch, capsys):
    """Augmentation is a function of (seed, epoch, index), so a resumed epoch draws what an uninterrupted one
    draws, whichever worker reads which batch."""
    import os
    import signal

    from safetensors.torch import load_file

    from kdcli.engine import session

    args = ["train", "--model", "cifar_resnet8", "--dataset", bad_folder, "--epochs", "3", "--batch-size", "8",
            "--workers", "2", "--max-bad-fraction", "0.2", "--augment", "crop-flip"]
    _cli(*args, "--out", tmp_path / "whole")
    real, count = session.Session.train_step, {"n": 0}

    def step(self, images, labels, index=None, **kw):
        terms = real(self, images, labels, index, **kw)
        count["n"] += 1
        if count["n"] == 7:  # epoch 2, step 2 (5 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    monkeypatch.setattr(session.Session, "train_step", step)
    with pytest.raises(SystemExit) as exc:
        _cli(*args, "--out", tmp_path / "parts")
    assert exc.value.code == 143 and "at epoch 2, step 2" in capsys.readouterr().err
    monkeypatch.undo()
    _cli(*args, "--out", tmp_path / "parts", "--auto-resume")
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_count_bad_images_once(bad_folder, tmp_path):
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(29650 + os.getpid() % 50), "-m", "kdcli", "train", "--model", "cifar_resnet8", "--dataset",
           str(bad_folder), "--epochs", "1", "--batch-size", "4", "--max-bad-fraction", "0.2", "--out",
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "ddp" / "report.json").read_text())["data"]
    assert data["skipped"]["train"]["count"] == 2 and set(data["skipped"]["train"]["examples"]) == TRAIN_BAD
    assert data["skipped"]["eval"]["count"] == 1
    metrics = json.loads((tmp_path / "ddp" / "report.json").read_text())["metrics"]["final"]
    assert metrics["num_examples"] == 8  # each readable test image once, none twice


def test_a_streamed_run_skips_and_counts_bad_images(bad_folder, tmp_path):
    from kdcli.engine.report import Report

    out = tmp_path / "run"
    _cli("train", "--model", "cifar_resnet8", "--dataset", bad_folder, "--streaming", "--epochs", "1",
         "--batch-size", "7", "--workers", "2", "--max-bad-fraction", "0.2", "--out", out)
    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.data.streaming and set(report.data.skipped["train"]["examples"]) == TRAIN_BAD
    assert report.data.skipped["train"]["count"] == 2 and report.data.skipped["eval"]["count"] == 1
    assert report.history[0].images == 40
