"""The practitioner's workflow end to end: pretrained or foreign weights, per-model input sizes, a teacher at
its own resolution, class names that travel with checkpoints, split slices, and an untrained teacher flagged."""

import json

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kdcli.engine.report import EvalReport, Report
from tests.test_cli import fails, kdcli


def _report(folder) -> Report:
    return Report.model_validate_json((folder / "report.json").read_text())


@pytest.mark.parametrize("method", ["kd", "at"])
def test_teacher_at_64_px_and_student_at_32_px(tmp_path, method, capsys):
    """The loader makes the student's 32 px batch; the teacher gets it resized to 64 px on the device."""
    out = tmp_path / method
    kdcli("distill", "--teacher", "cifar_resnet14", "--teacher-image-size", "64", "--student", "cifar_resnet8",
          "--method", method, "--dataset", "synthetic:32:4:64", "--epochs", "1", "--batch-size", "16", "--out", out)
    report = _report(out)
    assert report.teacher.input_size == 64 and report.student.input_size == 32 and report.data.image_size == 32
    assert all(np.isfinite(v) for v in report.history[0].terms.values())
    assert "has random weights" in capsys.readouterr().out  # a bare teacher name: flagged ...
    assert report.teacher.trained is False  # ... and reported


def test_an_online_peer_may_start_from_random_weights(tmp_path, capsys):
    kdcli("distill", "--teacher", "cifar_resnet14", "--student", "cifar_resnet8", "--method", "dml",
          "--dataset", "synthetic:8:4:64", "--epochs", "1", "--out", tmp_path / "dml")
    assert "random weights" not in capsys.readouterr().out


def test_fine_tune_a_1000_class_checkpoint_onto_10_classes(tmp_path):
    net = timm.create_model("resnet10t", num_classes=1000)
    weights = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": weights}, tmp_path / "in1k.pth")
    out = tmp_path / "ft"
    kdcli("train", "--model", "resnet10t", "--model-weights", tmp_path / "in1k.pth", "--image-size", "32",
          "--dataset", "synthetic:32:10:100", "--epochs", "1", "--batch-size", "16", "--lr", "1e-9", "--out", out)
    report = _report(out)
    assert any("re-initialised" in a and "1000" in a for a in report.student.adapted), report.student.adapted
    trained = load_file(str(out / "model.safetensors"))
    assert trained["fc.weight"].shape == (10, 512)
    # lr ~0: every tensor but the classifier (and BN statistics, which move with any forward) is the file's
    source = net.state_dict()
    assert torch.allclose(trained["conv1.0.weight"], source["conv1.0.weight"], atol=1e-6)


def _named_parquet(folder, names: list[str], order: list[int]):
    """A tiny 4-class dataset (train/test parquet) whose class k is drawn with colour k, labelled with
    ``names`` listed in ``order``: the same images and true classes, another ClassLabel order."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[names[i] for i in order])})
    for split, n in (("train", 160), ("test", 40)):
        images, labels = [], []
        for i in range(n):
            k = i % 4
            pixels = np.full((8, 8, 3), 40 + 50 * k, dtype=np.uint8) + rng.integers(0, 30, (8, 8, 3), dtype=np.uint8)
            images.append(Image.fromarray(pixels))
            labels.append(order.index(k))  # the class drawn, under the permuted names
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        (folder / split).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / split / f"{split}.parquet"))
    return folder


def test_class_names_travel_with_checkpoints(tmp_path, capsys):
    names = ["apple", "bear", "cloud", "dune"]
    original = _named_parquet(tmp_path / "original", names, [0, 1, 2, 3])
    permuted = _named_parquet(tmp_path / "permuted", names, [2, 0, 3, 1])
    other = _named_parquet(tmp_path / "other", ["w", "x", "y", "z"], [0, 1, 2, 3])
    teacher = tmp_path / "teacher"
    kdcli("train", "--model", "cifar_resnet8", "--dataset", original, "--epochs", "3", "--batch-size", "16",
          "--out", teacher)
    for name, data in (("same", original), ("perm", permuted)):
        kdcli("evaluate", teacher, "--dataset", data, "--out", tmp_path / f"{name}.json")
    same = EvalReport.model_validate_json((tmp_path / "same.json").read_text())
    perm = EvalReport.model_validate_json((tmp_path / "perm.json").read_text())
    assert perm.metrics.final.top1 == same.metrics.final.top1 and perm.metrics.final.nll == pytest.approx(
        same.metrics.final.nll, abs=1e-6)
    assert perm.checkpoint.class_order == "permuted" and same.checkpoint.class_order == "same"
    err = fails(capsys, "evaluate", teacher, "--dataset", other)
    assert "class names" in err and "--ignore-class-names" in err
    kdcli("evaluate", teacher, "--dataset", other, "--ignore-class-names", "--out", tmp_path / "other.json")
    ignored = EvalReport.model_validate_json((tmp_path / "other.json").read_text())
    assert ignored.checkpoint.class_order == "ignored"  # used in index order, as asked: classes 0..3 are 0..3
    assert ignored.metrics.final.top1 == same.metrics.final.top1
    # distilling from the teacher onto the permuted copy teaches the right classes
    kdcli("distill", "--teacher", teacher, "--student", "cifar_resnet8", "--dataset", permuted, "--epochs", "1",
          "--batch-size", "16", "--out", tmp_path / "kd")
    kd = _report(tmp_path / "kd")
    assert kd.teacher.class_order == "permuted"
    assert kd.metrics.final.teacher_agreement is not None


def test_a_slice_resumes_bit_for_bit(tmp_path):
    common = ["train", "--model", "cifar_resnet8", "--dataset", "digits", "--train-split", "train[:50%]",
              "--eval-split", "test[:100]", "--epochs", "3", "--batch-size", "32"]
    kdcli(*common, "--out", tmp_path / "whole")
    kdcli(*common, "--out", tmp_path / "parts", "--stop-after-epoch", "1")
    kdcli(*common, "--out", tmp_path / "parts", "--auto-resume")
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = _report(tmp_path / "whole")
    assert report.data.train_split == "train[:50%]" and report.data.num_train == 718  # 50% of 1,437, down
    assert report.data.eval_split == "test[:100]" and report.metrics.final.num_examples == 100


@pytest.mark.parametrize("augment, expected", [("auto", "imagenet"), ("randaugment", "randaugment")])
def test_imagenet_style_recipes_on_photographs(tmp_path, augment, expected):
    """An image folder of 80 px photographs: auto picks the ImageNet recipe (above 64 px); the student runs at
    its own 48 px; the report and the timm config record both."""
    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / "data" / f"c{k}").mkdir(parents=True)
        for i in range(6):
            pixels = (np.full((80, 80, 3), 50 * k, dtype=np.uint8) + rng.integers(0, 40, (80, 80, 3), dtype=np.uint8))
            Image.fromarray(pixels).save(tmp_path / "data" / f"c{k}" / f"{i}.jpg")
    out = tmp_path / "r"
    kdcli("train", "--model", "resnet10t", "--dataset", tmp_path / "data", "--image-size", "48", "--augment", augment,
          "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", out)
    report = _report(out)
    assert report.data.augment == expected and report.data.image_size == 48 and report.student.input_size == 48
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 48, 48]


def test_pretrained_offline_is_one_line(tmp_path, capsys):
    err = fails(capsys, "distill", "--teacher", "resnet10t.c3_in1k", "--teacher-pretrained", "--student",
                "cifar_resnet8", "--dataset", "synthetic:8:4:64", "--epochs", "1", "--out", tmp_path / "x")
    assert "pretrained" in err and not (tmp_path / "x").exists()


def test_a_weights_file_for_a_student_goes_through_timm(tmp_path):
    net = timm.create_model("resnet10t", num_classes=4, in_chans=3)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    kdcli("train", "--model", "resnet10t", "--model-weights", tmp_path / "w.safetensors", "--image-size", "16",
          "--dataset", "synthetic:16:4:64", "--epochs", "1", "--out", tmp_path / "r")
    assert _report(tmp_path / "r").student.adapted == []  # classes match: nothing re-initialised
