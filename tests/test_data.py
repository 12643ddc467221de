"""kdcli.data: built-ins, local folders and files, hub errors, columns, splits, streaming, transforms."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from kdcli.data import DataBundle, open_data
from kdcli.data.builtin import digits, parse_synthetic, synthetic
from kdcli.errors import KdcliError

# ------------------------------------------------------------------------------------------------ helpers


def _items(dataset) -> list[dict]:
    """All items of a map-style or iterable dataset."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return list(dataset)
    return [dataset[i] for i in range(len(dataset))]


def _pairs(dataset) -> list[tuple[int, int]]:
    return [(int(item["index"]), int(item["label"])) for item in _items(dataset)]


def _solid(colour, size=(12, 12), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220)}


def _class_of(image: torch.Tensor) -> str:
    """Which class colour a (3, S, S) tensor of a solid image shows."""
    red, blue = image[0].mean().item(), image[2].mean().item()
    return "cat" if red > blue else "dog"


def _labelled_dataset(n: int = 30, size: int = 10, offset: int = 0) -> datasets.Dataset:
    """Images whose colour encodes the label: label k -> grey level 20 + 70 k (3 classes)."""
    labels = [(i + offset) % 3 for i in range(n)]
    images = [_solid((20 + 70 * k,) * 3, (size, size)) for k in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _check_colour_labels(bundle: DataBundle, dataset) -> None:
    for item in _items(dataset):
        level = item["image"].mean().item() * 255
        assert round((level - 20) / 70) == int(item["label"])


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for i in range(10):
            _solid(colour).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    _labelled_dataset(30).to_parquet(str(root / "train-00000.parquet"))
    _labelled_dataset(12, offset=1).to_parquet(str(root / "test-00000.parquet"))
    return root


# ------------------------------------------------------------------------------------------------ digits


def test_digits_sizes_classes_and_stats():
    bundle = open_data("digits")
    assert (bundle.source, bundle.num_train, bundle.num_eval) == ("builtin", 1437, 360)
    assert bundle.num_classes == 10 and bundle.class_names == [str(i) for i in range(10)]
    assert (bundle.in_chans, bundle.image_size) == (1, 8)
    assert (bundle.train_split, bundle.eval_split) == ("train", "test")
    assert (bundle.image_column, bundle.label_column) == ("image", "label")
    assert bundle.augment == "crop"  # digits are not mirror-symmetric: no flip
    assert len(bundle.mean) == len(bundle.std) == 1 and 0 < bundle.mean[0] < 1 and 0 < bundle.std[0] < 1
    assert len(bundle.train_dataset()) == 1437 and len(bundle.eval_dataset()) == 360


def test_digits_stratified_and_deterministic():
    splits = digits().splits
    train, test = np.asarray(splits["train"]["label"]), np.asarray(splits["test"]["label"])
    np.testing.assert_allclose(np.bincount(train) / len(train), np.bincount(test) / len(test), atol=0.01)
    before = [im.tobytes() for im in splits["test"]["image"][:20]]
    digits.cache_clear()
    again = digits().splits
    assert np.array_equal(np.asarray(again["test"]["label"]), test)
    assert [im.tobytes() for im in again["test"]["image"][:20]] == before
    assert digits() is digits()  # cached per process


def test_items_shape_range_index_and_pixels():
    bundle = open_data("digits")
    raw = digits().splits["test"][7]
    item = bundle.eval_dataset()[7]
    assert item["index"] == 7 and item["label"] == raw["label"] and isinstance(item["label"], int)
    image = item["image"]
    assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (1, 8, 8)
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected = torch.from_numpy(np.asarray(raw["image"], dtype=np.float32) / 255.0)[None]
    torch.testing.assert_close(image, expected)
    batch = next(iter(torch.utils.data.DataLoader(bundle.eval_dataset(), batch_size=16)))
    assert batch["image"].shape == (16, 1, 8, 8) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == list(range(16))


def test_augmentation_only_when_training_and_reproducible():
    bundle = open_data("digits")
    plain, augmented = bundle.train_dataset(train=False), bundle.train_dataset(train=True)
    raw = digits().splits["train"]
    torch.manual_seed(0)
    changed = 0
    for i in range(20):
        expected = torch.from_numpy(np.asarray(raw[i]["image"], dtype=np.float32) / 255.0)[None]
        torch.testing.assert_close(plain[i]["image"], expected)
        aug = augmented[i]
        assert aug["image"].shape == (1, 8, 8) and aug["index"] == i and aug["label"] == plain[i]["label"]
        changed += not torch.equal(aug["image"], expected)
    assert changed >= 10
    # a pure function of (seed, epoch, row): the global RNG's state changes nothing, nor does it move
    torch.manual_seed(123)
    first = [augmented[i]["image"] for i in range(5)]
    state = torch.random.get_rng_state()
    torch.manual_seed(456)
    np.random.seed(456)
    assert all(torch.equal(a, augmented[i]["image"]) for i, a in enumerate(first))
    torch.manual_seed(123)
    augmented[0]
    assert torch.equal(torch.random.get_rng_state(), state)
    evaluated = bundle.eval_dataset()
    torch.manual_seed(1)
    once = evaluated[3]["image"]
    torch.manual_seed(2)
    assert torch.equal(once, evaluated[3]["image"])


def test_batched_reads_match_single_items():
    dataset = open_data("synthetic:8:3:30").eval_dataset()
    batch = dataset.__getitems__([4, 0, -1])
    for item, index in zip(batch, [4, 0, 5], strict=True):
        single = dataset[index]
        assert item["index"] == index and item["label"] == single["label"]
        assert torch.equal(item["image"], single["image"])


def test_image_size_resizes():
    bundle = open_data("digits", image_size=16, augment="crop-flip")
    assert bundle.image_size == 16 and bundle.augment == "cifar"  # crop-flip is an alias of cifar
    assert bundle.eval_dataset()[0]["image"].shape == (1, 16, 16)
    assert bundle.train_dataset()[0]["image"].shape == (1, 16, 16)


def test_bad_options():
    with pytest.raises(KdcliError, match="augmentation"):
        open_data("digits", augment="mixup")
    with pytest.raises(KdcliError, match="image size"):
        open_data("digits", image_size=0)


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_spec_parsing():
    assert parse_synthetic("synthetic") == (32, 10, 2000)
    assert parse_synthetic("synthetic:16") == (16, 10, 2000)
    assert parse_synthetic("synthetic:16:4") == (16, 4, 2000)
    assert parse_synthetic("synthetic:32:10:5000") == (32, 10, 5000)
    bad = ["synthetic:", "synthetic:abc", "synthetic:3", "synthetic:8:1", "synthetic:8:10:5", "synthetic:8:2:10:1"]
    for spec in bad:
        with pytest.raises(KdcliError, match="synthetic"):
            open_data(spec)


def test_synthetic_bundle_and_determinism():
    bundle = open_data("synthetic:12:3:60")
    assert (bundle.num_train, bundle.num_eval, bundle.num_classes) == (60, 12, 3)
    assert bundle.class_names == ["class_0", "class_1", "class_2"]
    assert (bundle.in_chans, bundle.image_size, bundle.augment) == (3, 12, "cifar")
    assert len(bundle.mean) == 3 and len(bundle.std) == 3
    assert open_data("synthetic:8:2:4").num_eval == 2  # max(COUNT // 5, CLASSES)
    first = synthetic(12, 3, 60).splits
    synthetic.cache_clear()
    second = synthetic(12, 3, 60).splits
    for split in ("train", "test"):
        assert first[split]["label"][:] == second[split]["label"][:]
        assert [im.tobytes() for im in first[split]["image"]] == [im.tobytes() for im in second[split]["image"]]
    assert bundle.train_dataset(train=False)[0]["image"].shape == (3, 12, 12)


def test_synthetic_is_learnable_but_not_trivial():
    classes = 10
    splits = synthetic(16, classes, 1000).splits

    def arrays(split):
        x = np.stack([np.asarray(im, dtype=np.float32).ravel() for im in split["image"]])
        return x, np.asarray(split["label"][:])

    (x_train, y_train), (x_test, y_test) = arrays(splits["train"]), arrays(splits["test"])
    means = np.stack([x_train[y_train == k].mean(0) for k in range(classes)])
    distances = (x_test**2).sum(1)[:, None] - 2 * x_test @ means.T + (means**2).sum(1)[None]
    accuracy = (distances.argmin(1) == y_test).mean()
    assert 2 / classes < accuracy < 0.99
    assert np.bincount(y_train).min() == np.bincount(y_train).max()  # balanced


# ------------------------------------------------------------------------------------------------ local data


def test_image_folder_with_holdout(image_folder):
    bundle = open_data(str(image_folder))
    assert bundle.source == "local" and bundle.class_names == ["cat", "dog"]
    assert (bundle.in_chans, bundle.image_size, bundle.augment) == (3, 12, "cifar")  # auto: 64 px or less
    assert bundle.mean is None and bundle.std is None
    assert bundle.eval_split == "train[holdout]" and (bundle.num_train, bundle.num_eval) == (18, 2)
    for dataset in (bundle.train_dataset(train=False), bundle.eval_dataset()):
        for item in _items(dataset):
            assert bundle.class_names[item["label"]] == _class_of(item["image"])
    again = open_data(str(image_folder))
    assert _pairs(again.eval_dataset()) == _pairs(bundle.eval_dataset())  # deterministic holdout
    # items keep their row in the whole split: held-out rows are missing from training, not renumbered
    train_rows = sorted(i for i, _ in _pairs(bundle.train_dataset(train=False)))
    eval_rows = sorted(i for i, _ in _pairs(bundle.eval_dataset()))
    assert len(train_rows) == 18 and sorted(train_rows + eval_rows) == list(range(20))


def test_parquet_folder_splits_inferred(parquet_folder):
    bundle = open_data(str(parquet_folder))
    assert (bundle.train_split, bundle.eval_split) == ("train", "test")
    assert (bundle.num_train, bundle.num_eval, bundle.num_classes) == (30, 12, 3)
    assert (bundle.in_chans, bundle.image_size) == (3, 10)
    _check_colour_labels(bundle, bundle.train_dataset(train=False))
    _check_colour_labels(bundle, bundle.eval_dataset())


def test_single_parquet_file(parquet_folder):
    bundle = open_data(str(parquet_folder / "train-00000.parquet"))
    assert bundle.eval_split == "train[holdout]" and (bundle.num_train, bundle.num_eval) == (27, 3)
    _check_colour_labels(bundle, bundle.eval_dataset())


def test_save_to_disk_folders(tmp_path):
    datasets.DatasetDict({"train": _labelled_dataset(15), "validation": _labelled_dataset(6)}).save_to_disk(
        str(tmp_path / "dict")
    )
    bundle = open_data(str(tmp_path / "dict"))
    assert (bundle.eval_split, bundle.num_train, bundle.num_eval) == ("validation", 15, 6)
    _check_colour_labels(bundle, bundle.train_dataset(train=False))
    _labelled_dataset(20).save_to_disk(str(tmp_path / "single"))
    single = open_data(str(tmp_path / "single"))
    assert single.eval_split == "train[holdout]" and single.num_train + single.num_eval == 20
    _check_colour_labels(single, single.eval_dataset())


def test_column_detection_and_override(tmp_path):
    pics = [_solid((20 + 70 * (i % 3),) * 3, (10, 10)) for i in range(12)]
    dataset = datasets.Dataset.from_dict(
        {"pic": pics, "target": [i % 3 for i in range(12)], "note": ["x"] * 12},
        features=datasets.Features(
            {"pic": datasets.Image(), "target": datasets.Value("int64"), "note": datasets.Value("string")}
        ),
    )
    dataset.save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(KdcliError, match=r"columns: pic, target, note.*--label-column"):
        open_data(str(tmp_path / "cols"))
    with pytest.raises(KdcliError, match=r"--image-column"):
        open_data(str(tmp_path / "cols"), image_column="photo", label_column="target")
    bundle = open_data(str(tmp_path / "cols"), image_column="pic", label_column="target")
    assert (bundle.image_column, bundle.label_column) == ("pic", "target")
    assert bundle.num_classes == 3 and bundle.class_names == ["0", "1", "2"]  # plain ints: max + 1
    _check_colour_labels(bundle, bundle.eval_dataset())
    assert open_data(str(tmp_path / "cols"), label_column="target").image_column == "pic"  # by type


def test_split_errors(parquet_folder):
    with pytest.raises(KdcliError, match=r"splits: train, test.*--eval-split"):
        open_data(str(parquet_folder), eval_split="dev")
    with pytest.raises(KdcliError, match=r"splits: train, test.*--train-split"):
        open_data(str(parquet_folder), train_split="training")
    bundle = open_data(str(parquet_folder), train_split="test", eval_split="train")
    assert (bundle.num_train, bundle.num_eval) == (12, 30)


def test_missing_paths():
    for spec in ("./no/such/folder", "/no/such/folder", "no-such-file.parquet", "~/no-such-kdcli-data"):
        with pytest.raises(KdcliError, match="does not exist"):
            open_data(spec)


def test_hub_offline_error():
    with pytest.raises(KdcliError, match="offline") as caught:
        open_data("kdcli-nobody/no-such-dataset")
    message = str(caught.value)
    assert "\n" not in message and "not a built-in" in message and "kdcli-nobody/no-such-dataset" in message


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_image_modes(tmp_path, mode):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            image = _solid((200, 10, 10, 128), (9, 7), "RGBA")
            image = image.convert(mode) if mode != "RGBA" else image
            image.save(tmp_path / name / f"{i}.png")
    bundle = open_data(str(tmp_path), eval_split=None)
    expected = 1 if mode == "L" else 3
    assert bundle.in_chans == expected and bundle.image_size == 7  # shorter side of a 9x7 image
    item = bundle.train_dataset()[0]
    assert item["image"].shape == (expected, 7, 7) and item["image"].dtype == torch.float32
    assert bundle.eval_dataset()[0]["image"].shape == (expected, 7, 7)


def test_non_square_resize_and_crop(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            _solid((10, 200, 10), (20, 10)).save(tmp_path / name / f"{i}.png")
    bundle = open_data(str(tmp_path), image_size=14)
    assert bundle.eval_dataset()[0]["image"].shape == (3, 14, 14)
    item = bundle.train_dataset()[0]["image"]
    assert item.shape == (3, 14, 14) and 0 <= item.min() and item.max() <= 1


def test_palette_with_transparency(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            image = Image.new("P", (8, 8), 1)
            image.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
            image.info["transparency"] = 0
            image.save(tmp_path / name / f"{i}.png", transparency=0)
    bundle = open_data(str(tmp_path))
    image = bundle.eval_dataset()[0]["image"]
    assert bundle.in_chans == 3 and image.shape == (3, 8, 8) and image[0].min() > 0.9


def test_string_labels_are_encoded(tmp_path):
    names = ["zebra", "ant", "moth"]
    for split, n in (("train", 12), ("test", 6)):
        datasets.Dataset.from_dict(
            {
                "image": [_solid((20 + 70 * (i % 3),) * 3, (6, 6)) for i in range(n)],
                "label": [names[i % 3] for i in range(n)],
            },
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
        ).to_parquet(str(tmp_path / f"{split}-00000.parquet"))
    bundle = open_data(str(tmp_path))
    assert bundle.class_names == ["ant", "moth", "zebra"]
    for item in _items(bundle.eval_dataset()):
        level = round((item["image"].mean().item() * 255 - 20) / 70)
        assert bundle.class_names[item["label"]] == names[level]


def test_unlabelled_split_rejected(tmp_path):
    train = _labelled_dataset(9)
    test = train.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    datasets.DatasetDict({"train": train.cast_column("label", datasets.Value("int64")), "test": test}).save_to_disk(
        str(tmp_path / "unlabelled")
    )
    with pytest.raises(KdcliError, match=r"'test' split .*outside 0\.\.2"):
        open_data(str(tmp_path / "unlabelled"))


# ------------------------------------------------------------------------------------------------ streaming


def test_streaming_builtin_matches_map_style():
    streamed = open_data("synthetic:8:3:90", streaming=True, shuffle_buffer=32, seed=1)
    mapped = open_data("synthetic:8:3:90")
    assert streamed.streaming and streamed.num_train == 90 and streamed.num_eval == mapped.num_eval
    map_pairs = _pairs(mapped.train_dataset(train=False))
    train = streamed.train_dataset()
    assert isinstance(train, datasets.IterableDataset) and isinstance(train, torch.utils.data.IterableDataset)
    pairs = _pairs(train)
    assert sorted(pairs) == sorted(map_pairs) and [i for i, _ in pairs] != list(range(90))  # shuffled
    plain = {item["index"]: item["image"] for item in streamed.train_dataset(train=False)}
    reference = mapped.train_dataset(train=False)
    for index in (0, 17, 89):
        assert torch.equal(plain[index], reference[index]["image"])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=10)))
    assert batch["image"].shape == (10, 3, 8, 8) and batch["index"].dtype == torch.int64
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=2)
    assert sorted(torch.cat([b["index"] for b in loader]).tolist()) == list(range(90))
    assert isinstance(streamed.eval_dataset(), torch.utils.data.Dataset) and len(streamed.eval_dataset()) == 18


def test_streaming_set_epoch_reshuffles_reproducibly():
    bundle = open_data("synthetic:8:3:90", streaming=True, shuffle_buffer=32)
    train = bundle.train_dataset()
    epoch0 = [i for i, _ in _pairs(train)]
    bundle.set_epoch(1)
    epoch1 = [i for i, _ in _pairs(train)]
    bundle.set_epoch(0)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    assert [i for i, _ in _pairs(train)] == epoch0
    open_data("digits").set_epoch(3)  # map-style: a no-op


def test_streaming_local_parquet_matches_map_style(parquet_folder):
    streamed = open_data(str(parquet_folder), streaming=True, shuffle_buffer=8, seed=3)
    mapped = open_data(str(parquet_folder))
    assert streamed.source == "local" and streamed.eval_split == "test" and streamed.num_eval == 12
    assert streamed.num_classes == 3 and streamed.in_chans == 3 and streamed.image_size == 10
    pairs = _pairs(streamed.train_dataset())
    assert sorted(pairs) == sorted(_pairs(mapped.train_dataset(train=False)))
    assert [i for i, _ in pairs] != list(range(30))
    _check_colour_labels(streamed, streamed.train_dataset(train=False))
    _check_colour_labels(streamed, streamed.eval_dataset())


def test_streaming_needs_an_eval_split(image_folder):
    with pytest.raises(KdcliError, match="--eval-split"):
        open_data(str(image_folder), streaming=True)


@pytest.mark.parametrize("spec", ["synthetic:8:2:100", "parquet"])
def test_split_by_node_disjoint_and_complete(spec, parquet_folder):
    spec = str(parquet_folder) if spec == "parquet" else spec
    bundle = open_data(spec, streaming=True, shuffle_buffer=16)
    shards = [_pairs(bundle.train_dataset(rank=rank, world_size=2)) for rank in range(2)]
    first, second = ({i for i, _ in shard} for shard in shards)
    assert first and second and not first & second
    expected = _pairs(open_data(spec).train_dataset(train=False))
    assert Counter(shards[0] + shards[1]) == Counter(expected)


def _image_dataset(labels) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * len(labels), "label": labels}) \
        .cast_column("image", datasets.Image())


@pytest.mark.parametrize("labels", [[0, None, 1, 0, 1, 1], ["a", None, "b", "a", "b", "b"]])
@pytest.mark.parametrize("where", ["train", "test"])
def test_examples_without_a_label_are_one_line(labels, where, tmp_path):
    """A null label would fail to convert (integers), count as an unreadable image (ClassLabel) or become a class
    named 'None' (names): refused when the data is opened, naming the split and the row, also for a slice that
    leaves the row out (the whole split's labels name the classes)."""
    datasets.disable_progress_bars()
    bad, good = _image_dataset(labels), _image_dataset([x for x in labels if x is not None])
    splits = {"train": bad, "test": good} if where == "train" else {"train": good, "test": bad}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "d"))
    for split in ("train", "train[2:]"):
        with pytest.raises(KdcliError, match=f"the '{where}' split .* has 1 example without a label \\(null\\) in "
                                             "column 'label' \\(row 1\\)"):
            open_data(str(tmp_path / "d"), train_split=split)


def test_a_damaged_streamed_evaluation_split_is_one_line(tmp_path):
    datasets.disable_progress_bars()
    (tmp_path / "d").mkdir()
    data = _image_dataset([0, 1] * 3)
    data.to_parquet(str(tmp_path / "d" / "train-00000.parquet"))
    data.to_parquet(str(tmp_path / "d" / "test-00000.parquet"))
    raw = (tmp_path / "d" / "test-00000.parquet").read_bytes()
    (tmp_path / "d" / "test-00000.parquet").write_bytes(raw[: len(raw) // 2] + b"x" * 100 + raw[len(raw) // 2 + 100:])
    with pytest.raises(KdcliError, match="could not read the evaluation split of dataset"):
        open_data(str(tmp_path / "d"), streaming=True)


def test_trained_class_counts_are_by_true_class_under_noise_and_imbalance():
    """The many/medium/few-shot groups count the images of each class trained on: label noise moves labels
    between classes, not images, so the counts are the imbalance's (the noisy labels' counts are not)."""
    from kdcli.data import corruption as cor
    from kdcli.engine.metrics import train_class_counts

    bundle = open_data("digits")
    clean_all = bundle.train_labels()
    block = bundle.corrupt("symmetric:0.4", "longtail:10", seed=0)
    by_true_class = train_class_counts(bundle.train_labels(clean=True), 10)
    profile = cor.parse_imbalance("longtail:10", 10)
    expected = cor.target_counts(profile, cor.class_counts(clean_all[clean_all >= 0], 10))
    assert by_true_class == expected and max(expected) / min(expected) == pytest.approx(10, rel=0.15)
    assert train_class_counts(bundle.train_labels(), 10) == block["class_counts_after"] != expected  # noisy labels


def test_content_fingerprint_survives_a_copy_and_sees_a_changed_label(parquet_folder, image_folder, tmp_path):
    """The teacher cache's data key: the same after copying the files (new modification times, which give
    datasets' own fingerprint new cache files), different when a label or a sampled image changes."""
    import os
    import shutil

    for source in (parquet_folder, image_folder):
        copy = tmp_path / source.name
        shutil.copytree(source, copy)
        for f in copy.rglob("*.*"):
            os.utime(f, (1_000_000_000, 1_000_000_000))  # a copy made at another time
        assert open_data(str(copy)).content_fingerprint() == open_data(str(source)).content_fingerprint()
    before = open_data(str(parquet_folder)).content_fingerprint()
    changed = tmp_path / "changed"
    changed.mkdir()
    data = _labelled_dataset(30)
    data.map(lambda e, i: {"label": (e["label"] + (i == 7)) % 3}, with_indices=True).to_parquet(
        str(changed / "train-00000.parquet"))
    shutil.copy(parquet_folder / "test-00000.parquet", changed)
    assert open_data(str(changed)).content_fingerprint() != before
    other = tmp_path / "other"
    other.mkdir()
    _labelled_dataset(30, size=11).to_parquet(str(other / "train-00000.parquet"))  # same labels, other images
    shutil.copy(parquet_folder / "test-00000.parquet", other)
    assert open_data(str(other)).content_fingerprint() != before
    assert open_data("synthetic:8:4:64", streaming=True).content_fingerprint() is None
