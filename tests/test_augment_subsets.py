"""Augmentation recipes (cifar, crop, imagenet, randaugment, none, auto), the model's input (set_input), split
slices (train[:10%]) with their original row indices, and the class count of integer labels (num_classes)."""

from __future__ import annotations

import pickle
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcli.data import open_data
from kdcli.data.builtin import digits
from kdcli.data.transforms import RECIPES, ImageTransform
from kdcli.errors import KdcliError

# ------------------------------------------------------------------------------------------------ helpers


def _noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A random image (width, height): every crop and flip shows."""
    width, height = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _folder(root, size: tuple[int, int], per_class: int = 6, mode: str = "RGB", splits=("train",)):
    """An image folder of noise images: ``root/SPLIT/CLASS/i.png``, classes a and b (or ``root/CLASS`` when
    ``splits`` is empty)."""
    for s, split in enumerate(splits or ("",)):
        for c, name in enumerate("ab"):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                _noise(size, 1000 * s + 100 * c + i, mode).save(folder / f"{i}.png")
    return root


def _grey_dataset(n: int, offset: int = 0, size: int = 10) -> datasets.Dataset:
    """Row r: a grey image of level r + offset (so every row's image is known), label r % 3."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    images = [Image.new("L", (size, size), (r + offset) % 256) for r in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": [r % 3 for r in range(n)]}, features=features)


def _by_index(dataset, workers: int = 0, shuffle: bool = False, batch_size: int = 5, collate=None):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=shuffle, collate_fn=collate)
    out = {}
    for batch in loader:
        assert not batch["skipped"]
        out.update({int(i): x for i, x in zip(batch["index"], batch["image"], strict=True)})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def _items(dataset) -> list[dict]:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return list(dataset)
    return [dataset[i] for i in range(len(dataset))]


def _float(image: Image.Image) -> torch.Tensor:
    return F.to_dtype(F.to_image(image), torch.float32, scale=True).as_subclass(torch.Tensor)


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory):
    """80 x 72 RGB images (above 64 px: auto means imagenet), train and test."""
    return _folder(tmp_path_factory.mktemp("large"), (80, 72), splits=("train", "test"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 40 training and 12 test rows as a parquet folder, a save_to_disk folder and a single parquet
    file (train only); and an image folder."""
    root = tmp_path_factory.mktemp("sources")
    train, test = _grey_dataset(40), _grey_dataset(12, offset=100)
    (root / "parquet").mkdir()
    train.to_parquet(str(root / "parquet" / "train-00000.parquet"))
    test.to_parquet(str(root / "parquet" / "test-00000.parquet"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "saved"))
    train.to_parquet(str(root / "single.parquet"))
    _folder(root / "folder", (10, 10), per_class=10, splits=("train", "test"))
    return {"parquet": str(root / "parquet"), "saved": str(root / "saved"), "single": str(root / "single.parquet"),
            "folder": str(root / "folder")}


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("recipe", [*RECIPES, "crop-flip"])
def test_every_recipe_gives_the_size_range_and_channels(recipe, in_chans):
    image = _noise((50, 37), 3, "RGB" if in_chans == 3 else "L")
    for size in (24, 40):  # smaller and larger than the image's shorter side
        for train in (True, False):
            transform = ImageTransform(in_chans, size, recipe, train=train, seed=4)
            for index in range(3):
                x = transform(image, index)
                assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (in_chans, size, size)
                assert 0.0 <= x.min() and x.max() <= 1.0 and x.is_contiguous()
    assert ImageTransform(in_chans, 8, recipe, train=True).augment == ("cifar" if recipe == "crop-flip" else recipe)


@pytest.mark.parametrize("recipe", ["imagenet", "randaugment"])
def test_timm_recipes_through_a_bundle(large_folder, recipe):
    bundle = open_data(str(large_folder), augment=recipe)
    assert bundle.augment == recipe and (bundle.in_chans, bundle.image_size) == (3, 72)
    train = bundle.train_dataset()
    plain = bundle.train_dataset(train=False)
    changed = 0
    for i in range(len(train)):
        x = train[i]["image"]
        assert x.shape == (3, 72, 72) and 0 <= x.min() and x.max() <= 1
        changed += not torch.equal(x, plain[i]["image"])
    assert changed >= len(train) - 1  # a random-resized crop is (almost) never the whole image


def test_randaugment_keeps_one_channel_data_one_channel(tmp_path):
    bundle = open_data(str(_folder(tmp_path, (70, 70), mode="L")), augment="randaugment")
    assert bundle.in_chans == 1
    images = [bundle.train_dataset()[i]["image"] for i in range(4)]
    assert all(x.shape == (1, 70, 70) for x in images)


@pytest.mark.parametrize("recipe", ["imagenet", "randaugment"])
def test_timm_recipes_are_a_function_of_seed_epoch_and_index(large_folder, recipe):
    bundle = open_data(str(large_folder), augment=recipe, seed=3)
    train = bundle.train_dataset()
    bundle.set_epoch(2)
    random.seed(0)
    torch.manual_seed(0)
    reference = _by_index(train, collate=bundle.collate)
    random.seed(1)  # the global RNGs the transforms borrow play no part
    np.random.seed(1)
    torch.manual_seed(1)
    assert _same(reference, _by_index(train, workers=2, shuffle=True, batch_size=3, collate=bundle.collate))
    assert torch.equal(train.__getitems__([7, 2])[0]["image"], reference[7])
    fresh = open_data(str(large_folder), augment=recipe, seed=3)
    fresh.set_epoch(2)
    assert _same(reference, _by_index(fresh.train_dataset(), shuffle=True, collate=fresh.collate))
    bundle.set_epoch(3)
    other = _by_index(train, workers=2, collate=bundle.collate)
    assert sum(not torch.equal(reference[i], other[i]) for i in reference) >= len(reference) - 1
    reseeded = open_data(str(large_folder), augment=recipe, seed=4)
    reseeded.set_epoch(2)
    again = _by_index(reseeded.train_dataset(), collate=reseeded.collate)
    assert sum(not torch.equal(reference[i], again[i]) for i in reference) >= len(reference) - 1
    # a pickled transform (DataLoader workers under spawn) draws the same
    transform = pickle.loads(pickle.dumps(train.transform))
    image = _noise((80, 72), 0)
    assert torch.equal(transform(image, 5, 2), train.transform(image, 5, 2))


@pytest.mark.parametrize("recipe", ["imagenet", "randaugment"])
def test_timm_recipes_leave_the_global_rngs_as_they_were(recipe):
    transform = ImageTransform(3, 32, recipe, train=True, seed=9)
    image = _noise((48, 40), 1)
    random.seed(123)
    np.random.seed(456)
    torch.manual_seed(789)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    outputs = [transform(image, index) for index in range(20)]
    assert random.getstate() == states[0]
    now = np.random.get_state()
    assert now[0] == states[1][0] and np.array_equal(now[1], states[1][1]) and now[2:] == states[1][2:]
    assert torch.equal(torch.get_rng_state(), states[2])
    # and what they draw next is what they would have drawn
    draws = random.random(), np.random.random(), torch.rand(1).item()
    random.seed(123)
    np.random.seed(456)
    torch.manual_seed(789)
    assert draws == (random.random(), np.random.random(), torch.rand(1).item())
    assert sum(not torch.equal(outputs[0], x) for x in outputs[1:]) >= 18  # and the examples differ


def test_auto_picks_cifar_up_to_64_px_and_imagenet_above(tmp_path):
    small = open_data(str(_folder(tmp_path / "s", (64, 64))))
    large = open_data(str(_folder(tmp_path / "l", (65, 70))))
    assert (small.image_size, small.augment) == (64, "cifar")
    assert (large.image_size, large.augment) == (65, "imagenet")
    assert open_data(str(tmp_path / "s"), image_size=96).augment == "imagenet"  # the size asked for counts
    assert open_data(str(tmp_path / "l"), image_size=32).augment == "cifar"
    assert open_data("digits").augment == "crop" and open_data("synthetic:8:2:20").augment == "cifar"
    # auto follows the images' own size, not a model's input set later: photographs keep random-resized
    # crops for a small student, small images keep pad-crop for a large one
    small.set_input(224)
    assert small.augment == "cifar"
    large.set_input(32)
    assert large.augment == "imagenet"
    asked = open_data(str(tmp_path / "s"), augment="randaugment")
    asked.set_input(32)
    assert asked.augment == "randaugment"
    built_in = open_data("digits")  # built-ins keep their own default at any size
    built_in.set_input(224)
    assert built_in.augment == "crop"
    with pytest.raises(KdcliError, match="unknown augmentation 'mixup'.*randaugment"):
        open_data("digits", augment="mixup")


# ------------------------------------------------------------------------------------------------ set_input


@pytest.mark.parametrize("interpolation, crop_pct", [("bilinear", 1.0), ("bicubic", 0.875), ("bilinear", 0.9),
                                                     ("nearest", 0.95)])
def test_set_input_eval_transform_is_resize_then_centre_crop(tmp_path, interpolation, crop_pct):
    _folder(tmp_path, (50, 37), per_class=3)
    bundle = open_data(str(tmp_path), eval_split=None, augment="none")
    assert (bundle.native_size, bundle.image_size) == (37, 37)
    bundle.set_input(32, interpolation, crop_pct)
    assert (bundle.image_size, bundle.native_size, bundle.interpolation, bundle.crop_pct) == (
        32, 37, interpolation, crop_pct)
    evaluated = bundle.eval_dataset()
    raw = bundle.eval_split_data()  # the held-out rows, in the order eval_dataset gives them
    for i, item in enumerate(_items(evaluated)):
        expected = F.resize(_float(raw[i]["image"].convert("RGB")), [int(32 / crop_pct)],
                            interpolation=InterpolationMode(interpolation), antialias=True)
        if interpolation == "bicubic":
            expected = expected.clamp(0, 1)
        expected = F.center_crop(expected, [32, 32])
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=0)
    assert bundle.train_dataset()[0]["image"].shape == (3, 32, 32)
    assert bundle.collate([{"image": None, "label": -1, "index": 0, "name": "x"}])["image"].shape == (0, 3, 32, 32)


def test_set_input_lanczos_resizes_the_pil_image(tmp_path):
    _folder(tmp_path, (50, 37), per_class=2)
    bundle = open_data(str(tmp_path), eval_split=None)
    bundle.set_input(20, "lanczos", 0.8)
    row = int(bundle._eval_subset[0])
    image = bundle._eval[row]["image"].convert("RGB")
    expected = F.center_crop(_float(F.resize(image, [25], interpolation=InterpolationMode.LANCZOS)), [20, 20])
    torch.testing.assert_close(bundle.eval_dataset()[0]["image"], expected, rtol=0, atol=0)


def test_set_input_at_the_data_size_with_crop_1_is_the_data_as_it_is():
    bundle = open_data("digits")
    before = [bundle.eval_dataset()[i]["image"] for i in range(5)]
    train_before = bundle.train_dataset()
    bundle.set_input(8, "bicubic", 1.0)
    assert all(torch.equal(a, bundle.eval_dataset()[i]["image"]) for i, a in enumerate(before))
    raw = digits().splits["test"]
    expected = torch.from_numpy(np.asarray(raw[3]["image"], dtype=np.float32) / 255.0)[None]
    torch.testing.assert_close(bundle.eval_dataset()[3]["image"], expected)
    # training at the same size: the same crops as before
    after = bundle.train_dataset()
    assert all(torch.equal(train_before[i]["image"], after[i]["image"]) for i in range(5))


def test_set_input_sizes_training_and_rejects_bad_values():
    bundle = open_data("synthetic:8:3:30")
    bundle.set_input(20, "bicubic", 0.875)
    assert bundle.augment == "cifar"  # a built-in's own recipe
    x = bundle.train_dataset()[0]["image"]
    assert x.shape == (3, 20, 20) and 0 <= x.min() and x.max() <= 1
    assert bundle.eval_dataset()[0]["image"].shape == (3, 20, 20)
    assert bundle.collate.image_size == 20
    for bad in ({"image_size": 0}, {"image_size": 8, "interpolation": "cubic"}, {"image_size": 8, "crop_pct": 0}):
        with pytest.raises(KdcliError):
            bundle.set_input(**bad)


# ------------------------------------------------------------------------------------------------ slices


@pytest.mark.parametrize("text, rows", [
    ("train[:10%]", range(0, 144)), ("train[1000:]", range(1000, 1437)), ("train[10%:20%]", range(144, 287)),
    ("train[-37:]", range(1400, 1437)), ("train[:-1400]", range(0, 37)),
])
def test_builtin_slices_keep_their_rows(text, rows):
    bundle = open_data("digits", train_split=text, eval_split="test[:200]")
    assert (bundle.train_split, bundle.eval_split) == (text, "test[:200]")
    assert (bundle.num_train, bundle.num_eval) == (len(rows), 200)
    raw = digits().splits["train"]
    items = _items(bundle.train_dataset(train=False))
    assert [it["index"] for it in items] == list(rows)
    for it in items[:: max(1, len(items) // 10)]:
        expected = torch.from_numpy(np.asarray(raw[it["index"]]["image"], dtype=np.float32) / 255.0)[None]
        assert it["label"] == raw[it["index"]]["label"]
        torch.testing.assert_close(it["image"], expected)
    assert [it["index"] for it in _items(bundle.eval_dataset())] == list(range(200))
    assert len(bundle.train_dataset()) == len(rows)


@pytest.mark.parametrize("text", ["train[:10%]", "train[10%:20%]", "train[-15%:]", "train[33%:-5%]", "train[3:-3]",
                                  "train[:10%](pct1_dropremainder)", "train[-5%:](pct1_dropremainder)"])
def test_slices_select_the_rows_datasets_would(text):
    bundle = open_data("digits", train_split=text)
    (absolute,) = datasets.ReadInstruction.from_spec(text).to_absolute({"train": 1437})
    rows = [it["index"] for it in _items(bundle.train_dataset(train=False))]
    assert rows == list(range(absolute.from_, absolute.to)) and bundle.num_train == len(rows)


@pytest.mark.parametrize("kind", ["parquet", "saved", "folder"])
def test_local_slices_keep_their_rows(sources, kind):
    full = open_data(sources[kind])
    sliced = open_data(sources[kind], train_split="train[5:15]", eval_split="test[-4:]")
    assert (sliced.num_train, sliced.num_eval) == (10, 4) and sliced.source == "local"
    full_train = {it["index"]: it for it in _items(full.train_dataset(train=False))}
    full_eval = {it["index"]: it for it in _items(full.eval_dataset())}
    items = _items(sliced.train_dataset(train=False))
    assert [it["index"] for it in items] == list(range(5, 15))
    for it in items:
        reference = full_train[it["index"]]
        assert it["label"] == reference["label"] and torch.equal(it["image"], reference["image"])
    evaluated = _items(sliced.eval_dataset())
    n_eval = full.num_eval
    assert [it["index"] for it in evaluated] == list(range(n_eval - 4, n_eval))
    assert all(torch.equal(it["image"], full_eval[it["index"]]["image"]) for it in evaluated)
    # augmentation is the full split's for the same row, epoch and seed
    augmented, reference = sliced.train_dataset(), full.train_dataset()
    assert all(torch.equal(augmented[j]["image"], reference[5 + j]["image"]) for j in range(10))


@pytest.mark.parametrize("kind", ["parquet", "saved", "builtin"])
def test_corruption_of_a_slice_is_the_full_splits_for_its_rows(sources, kind):
    spec = "synthetic:8:4:300" if kind == "builtin" else sources[kind]
    full = open_data(spec)
    full.corrupt("symmetric:0.5", None, seed=3)
    full_clean, full_noisy = full.training_labels()
    text = "train[100:250]" if kind == "builtin" else "train[10:30]"
    sliced = open_data(spec, train_split=text)
    block = sliced.corrupt("symmetric:0.5", None, seed=3)
    clean, noisy = sliced.training_labels()
    rows = sliced._train_subset
    assert np.array_equal(noisy[rows], full_noisy[rows]) and np.array_equal(clean[rows], full_clean[rows])
    outside = np.setdiff1d(np.arange(len(full_noisy)), rows)
    assert (noisy[outside] == -1).all()
    items = _items(sliced.train_dataset(train=False))
    assert sorted(it["index"] for it in items) == rows.tolist()
    assert all(it["label"] == full_noisy[it["index"]] for it in items)
    assert block["class_counts_before"] == np.bincount(clean[rows], minlength=sliced.num_classes).tolist()
    # imbalance goes by the slice's class counts; the examples kept are a function of (seed, row, label)
    sliced.corrupt(None, "step:2:0.5", seed=1)
    kept = {it["index"] for it in _items(sliced.train_dataset(train=False))}
    assert kept <= set(rows.tolist()) and len(kept) == sliced.num_train < len(rows)
    # the evaluation split, corrupted on request: the same rule
    full.corrupt("symmetric:1.0", None, seed=5, split="eval")
    eval_text = "test[2:9]" if kind != "builtin" else "test[10:30]"
    sliced_eval = open_data(spec, eval_split=eval_text)
    sliced_eval.corrupt("symmetric:1.0", None, seed=5, split="eval")
    full_eval = {it["index"]: it["label"] for it in _items(full.eval_dataset())}
    got = _items(sliced_eval.eval_dataset())
    assert len(got) == sliced_eval.num_eval and all(it["label"] == full_eval[it["index"]] for it in got)


def test_streamed_builtin_corruption_of_a_holdout(sources):
    """A save_to_disk folder with one split, streamed: the holdout's rows stream with their own indices."""
    mapped = open_data(sources["single"])
    saved = str(sources["single"]).replace("single.parquet", "single-saved")
    datasets.load_dataset("parquet", data_files={"train": sources["single"]}, split="train").save_to_disk(saved)
    streamed = open_data(saved, streaming=True, shuffle_buffer=8)
    assert streamed.eval_split == "train[holdout]" and streamed.num_train == mapped.num_train == 36
    rows = sorted(int(it["index"]) for it in streamed.train_dataset())
    assert rows == sorted(it["index"] for it in _items(mapped.train_dataset(train=False)))
    held = sorted(it["index"] for it in _items(streamed.eval_dataset()))
    assert sorted(rows + held) == list(range(40))
    blocks = [b.corrupt("symmetric:0.5", "step:2:0.5", seed=2) for b in (streamed, mapped)]
    assert blocks[0] == blocks[1]
    pairs = [sorted((int(it["index"]), int(it["label"])) for it in _items(b.train_dataset(train=False)))
             for b in (streamed, mapped)]
    assert pairs[0] == pairs[1] and len(pairs[0]) == streamed.num_train < 36


def test_holdout_of_a_slice(sources):
    whole = open_data(sources["single"])
    assert whole.eval_split == "train[holdout]" and (whole.num_train, whole.num_eval) == (36, 4)
    assert not whole.warnings
    half = open_data(sources["single"], train_split="train[:50%]")
    assert (half.train_split, half.eval_split) == ("train[:50%]", "train[:50%][holdout]")
    assert (half.num_train, half.num_eval) == (18, 2)
    train = [it["index"] for it in _items(half.train_dataset(train=False))]
    held = [it["index"] for it in _items(half.eval_dataset())]
    assert sorted(train + held) == list(range(20)) and not set(train) & set(held)
    (warning,) = half.warnings
    assert "held out" in warning and "'train[:50%]'" in warning and "2 examples" in warning and "\n" not in warning
    # grey level = row: the held-out images are those rows'
    for it in _items(half.eval_dataset()):
        assert round(it["image"].mean().item() * 255) == it["index"]


def test_a_slice_can_be_corrupted_and_exported(sources, tmp_path):
    import json

    from kdcli.data.export import corrupt_dataset

    manifest = corrupt_dataset(sources["saved"], tmp_path / "out", noise="symmetric:0.5", imbalance=None, seed=4,
                               split="train[10:30]", eval_split="test[:5]")
    assert manifest["source"]["train_split"] == "train[10:30]" and manifest["num_eval"] == 5
    written = datasets.load_dataset(str(tmp_path / "out"), split="train")
    full = open_data(sources["saved"])
    full.corrupt("symmetric:0.5", None, seed=4)
    _, noisy = full.training_labels()
    assert list(written["source_index"]) == list(range(10, 30))
    assert list(written["label"]) == [int(noisy[i]) for i in range(10, 30)]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_train"] == 20


@pytest.mark.parametrize("option", ["train_split", "eval_split"])
def test_streaming_and_a_slice_is_one_line(option, sources):
    for spec in ("synthetic:8:3:30", sources["parquet"]):
        with pytest.raises(KdcliError, match="cannot be sliced") as caught:
            open_data(spec, streaming=True, **{option: "test[:5]" if option == "eval_split" else "train[:5]"})
        assert "\n" not in str(caught.value) and "--streaming" in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("train[abc]", "cannot read --train-split 'train\\[abc\\]'"),
    ("train[5]", "cannot read"),
    ("train[:2000]", "out of range"),
    ("train[-2000:]", "out of range"),
    ("train[:101%]", "out of range"),
    ("train[10:10]", "selects no rows"),
    ("train[50%:10%]", "selects no rows"),
    ("train[:10](closest)", "percentages"),
    ("train[:10%](nearest)", "unknown rounding"),
    ("train[10%:500]", "row numbers or both as percentages"),
    ("train+test", "'\\+'"),
    ("training[:10]", "no split 'training'"),
])
def test_bad_slices_are_one_line(text, message):
    with pytest.raises(KdcliError, match=message) as caught:
        open_data("digits", train_split=text)
    assert "\n" not in str(caught.value)
    with pytest.raises(KdcliError, match="--eval-split"):
        open_data("digits", eval_split=text.replace("train", "test"))


# ------------------------------------------------------------------------------------------------ class count


@pytest.fixture(scope="module")
def stray_label(tmp_path_factory):
    """Integer labels 0..9, and one stray 57 in the training split."""
    root = tmp_path_factory.mktemp("stray") / "data"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    labels = [i % 10 for i in range(40)]
    labels[5] = 57
    images = [Image.new("L", (6, 6), i) for i in range(40)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features),
        "test": datasets.Dataset.from_dict({"image": images[:10], "label": list(range(10))}, features=features),
    }).save_to_disk(str(root))
    return str(root)


def test_empty_classes_are_a_warning_naming_them(stray_label):
    bundle = open_data(stray_label)
    assert bundle.num_classes == 58
    (warning,) = bundle.warnings
    assert "10-56" in warning and "47 of them" in warning and "--num-classes N" in warning and "\n" not in warning
    sliced = open_data(stray_label, train_split="train[6:]")  # the class count is the whole splits'
    assert sliced.num_classes == 58 and sliced.warnings[0] == warning
    assert "holds 10 of its 11 classes" in sliced.warnings[1]  # the slice leaves the stray 57 out: said too


def test_num_classes_overrides_and_checks(stray_label, sources):
    bundle = open_data(stray_label, num_classes=58)
    assert bundle.num_classes == 58 and bundle.class_names == [str(i) for i in range(58)] and not bundle.warnings
    wide = open_data(stray_label, num_classes=60)
    assert wide.class_names[-1] == "59" and not wide.warnings
    with pytest.raises(KdcliError, match=r"'train' split .*label 57.*--num-classes is 10") as caught:
        open_data(stray_label, num_classes=10)
    assert "\n" not in str(caught.value)
    sliced = open_data(stray_label, num_classes=10, train_split="train[6:]")  # the stray row left out
    assert sliced.num_classes == 10 and sliced.class_names == [str(i) for i in range(10)]
    # named classes (ClassLabel, strings) are not overridden
    assert open_data("digits", num_classes=10).num_classes == 10
    with pytest.raises(KdcliError, match="names 10 classes.*--num-classes is 12"):
        open_data("digits", num_classes=12)
    with pytest.raises(KdcliError, match="names 3 classes"):
        open_data(sources["parquet"], num_classes=4)
    with pytest.raises(KdcliError, match="at least 2"):
        open_data("digits", num_classes=1)


def test_a_slice_that_misses_classes_is_a_warning(tmp_path):
    """An image folder's rows are sorted by class: its first 30% hold a few classes only. Said, not silent."""
    root = tmp_path / "sorted"
    for k in range(4):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (60 * k, 0, 0)).save(root / f"c{k}" / f"{i}.png")
    bundle = open_data(str(root), train_split="train[:30%]")
    assert any("holds 2 of its 4 classes" in w for w in bundle.warnings), bundle.warnings
    assert not any("classes (are its rows" in w for w in open_data(str(root)).warnings)


def test_an_image_folder_of_one_class_says_so(tmp_path):
    """datasets gives a folder with a single class sub-folder no label column: the message says why."""
    from kdcli.data import open_data
    from kdcli.errors import KdcliError

    folder = tmp_path / "one" / "cats"
    folder.mkdir(parents=True)
    for i in range(4):
        _noise((10, 10), i, "RGB").save(folder / f"{i}.png")
    with pytest.raises(KdcliError, match="has images but no labels: an image folder needs a sub-folder per class"):
        open_data(str(tmp_path / "one"))
