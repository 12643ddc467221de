"""Pretrained weights the timm way: weights files through timm's pretrained loading (classifier re-initialised,
first conv adapted), timm's data config for a model's input, resizing in the classifier, untrained teachers,
and class names that travel with checkpoints."""

import json
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdcli import models
from kdcli.engine.report import ModelInfo
from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt

RGB = models.DataFacts(num_classes=10, in_chans=3, image_size=32, class_names=[f"c{i}" for i in range(10)],
                       mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
GRAY = models.DataFacts(num_classes=10, in_chans=1, image_size=32, class_names=[f"c{i}" for i in range(10)],
                        mean=(0.3,), std=(0.2,))


def _timm_weights(tmp_path, kind: str, num_classes: int = 1000, name: str = "resnet10t"):
    """A timm-format weights file made here (no download): safetensors, or a .pth with a wrapper and a prefix."""
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in timm.create_model(name, num_classes=num_classes).state_dict().items()}
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    return path, sd


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_1000_class_weights_onto_10_classes_reinitialise_the_classifier(tmp_path, kind):
    path, sd = _timm_weights(tmp_path, kind)
    loaded = models.load("resnet10t", RGB, weights=str(path), option="--teacher")
    assert loaded.source == "weights" and loaded.trained and loaded.path == str(path)
    assert loaded.adapted == ["classifier fc re-initialised (weights have 1000 classes, the data 10)"]
    got = loaded.model.net.state_dict()
    assert got["fc.weight"].shape == (10, 512) and not torch.equal(got["fc.weight"], sd["fc.weight"][:10])
    assert set(got) == set(sd)
    for k, v in got.items():
        if not k.startswith("fc."):
            assert torch.equal(v, sd[k]), k
    cfg = loaded.model.net.pretrained_cfg  # describes the net as built, without the loaded state dict
    assert "state_dict" not in cfg and cfg["num_classes"] == 10
    json.dumps(cfg, default=str)
    assert loaded.model(torch.rand(2, 3, 32, 32)).logits.shape == (2, 10)


def test_weights_with_matching_classes_keep_their_classifier(tmp_path):
    path, sd = _timm_weights(tmp_path, "pth", num_classes=10)
    loaded = models.load("resnet10t", RGB, weights=str(path))
    assert loaded.adapted == [] and loaded.class_order is None
    for k, v in loaded.model.net.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_three_channel_weights_onto_grayscale_data_adapt_the_first_conv(tmp_path):
    path, sd = _timm_weights(tmp_path, "safetensors")
    loaded = models.load("resnet10t", GRAY, weights=str(path), option="--teacher")
    net = loaded.model.net
    assert loaded.model.meta.in_chans == 1 and net.conv1[0].weight.shape[1] == 1
    assert torch.equal(net.conv1[0].weight, timm.models.adapt_input_conv(1, sd["conv1.0.weight"]))
    assert loaded.adapted == ["classifier fc re-initialised (weights have 1000 classes, the data 10)",
                              "first conv conv1.0 adapted from 3 channels to 1"]
    assert len(loaded.model.meta.mean) == 1 and net.pretrained_cfg["input_size"][0] == 1
    assert loaded.model(torch.rand(2, 1, 32, 32)).logits.shape == (2, 10)


def test_weights_of_another_architecture_are_one_clear_error(tmp_path):
    # classes differ, so timm loads non-strictly: kdcli still refuses weights that leave tensors unloaded
    path, _ = _timm_weights(tmp_path, "safetensors", num_classes=100, name="cifar_resnet8")
    with pytest.raises(KdcliError, match=r"do not fit cifar_resnet14: \d+ of its tensors missing") as e:
        models.load("cifar_resnet14", RGB, weights=str(path), option="--teacher")
    assert "\n" not in str(e.value)
    path, _ = _timm_weights(tmp_path, "pth", num_classes=10, name="cifar_resnet8")
    with pytest.raises(KdcliError, match="do not fit cifar_resnet14 with 10 classes") as e:
        models.load("cifar_resnet14", RGB, weights=str(path), option="--teacher")
    assert "\n" not in str(e.value)
    with pytest.raises(KdcliError, match="choose one"):
        models.load("resnet10t", RGB, weights=str(path), pretrained=True, option="--teacher")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty cache, whatever the machine has cached."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("spec", ["resnet10t.c3_in1k", "hf-hub:timm/resnet10t.c3_in1k"])
def test_pretrained_offline_is_one_clear_error(offline_hub, spec):
    start = time.monotonic()
    with pytest.raises(KdcliError, match=r"cannot fetch the pretrained weights of --teacher .*offline.*Hub") as e:
        models.load(spec, RGB, pretrained=True, option="--teacher")
    assert "\n" not in str(e.value) and time.monotonic() - start < 30


def test_pretrained_unknown_or_unpublished(offline_hub):
    with pytest.raises(KdcliError, match="unknown pretrained tag in --teacher resnet10t.nope; resnet10t has: "
                                         "resnet10t.c3_in1k"):
        models.load("resnet10t.nope", RGB, pretrained=True, option="--teacher")
    with pytest.raises(KdcliError, match="unknown pretrained tag"):
        models.load("resnet10t.nope", RGB, option="--teacher")
    with pytest.raises(KdcliError, match="no pretrained weights are published for it; pass --teacher-weights"):
        models.load("cifar_resnet8", RGB, pretrained=True, option="--teacher")


def test_untrained_teachers_are_flagged_and_checkpoints_are_not(tmp_path):
    tagged = models.load("resnet10t.c3_in1k", RGB, option="--teacher")
    assert tagged.trained is False and tagged.source == "timm"
    assert tagged.warnings == ["--teacher resnet10t.c3_in1k has random weights (its pretrained tag is ignored "
                               "without --teacher-pretrained): it teaches nothing useful"]
    bare = models.load("cifar_resnet8", RGB, option="--teacher")
    assert bare.trained is False
    assert bare.warnings == ["--teacher cifar_resnet8 has random weights: pass --teacher-pretrained, "
                             "--teacher-weights FILE or a kdcli checkpoint"]
    assert models.load("cifar_resnet8", RGB, option="--student").warnings == []
    assert models.load("resnet10t.c3_in1k", RGB, option="--model").warnings == [
        "--model resnet10t.c3_in1k starts from random weights: its pretrained tag is ignored without --pretrained"]
    path = tmp_path / "t.safetensors"
    ckpt.save(path, bare.model.net, bare.model.meta)
    back = models.load(str(path), RGB, option="--teacher")
    assert back.trained is True and back.warnings == [] and back.class_order == "same"


def test_input_config_comes_from_timm_for_pretrained_weights_else_from_the_data(tmp_path):
    path, _ = _timm_weights(tmp_path, "safetensors")
    meta = models.load("resnet10t", RGB, weights=str(path)).model.meta
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    assert (meta.input_size, meta.interpolation, meta.crop_pct) == (cfg.input_size[-1], cfg.interpolation,
                                                                     cfg.crop_pct) == (176, "bicubic", 0.875)
    assert meta.mean == pytest.approx(cfg.mean) and meta.std == pytest.approx(cfg.std)
    gray = models.load("resnet10t", GRAY, weights=str(path)).model.meta
    assert gray.mean == pytest.approx([sum(cfg.mean) / 3]) and gray.input_size == 176
    fresh = models.load("resnet10t", RGB).model.meta
    assert (fresh.input_size, fresh.interpolation, fresh.crop_pct) == (32, "bilinear", 1.0)
    assert fresh.mean == pytest.approx(RGB.mean)
    assert models.load("resnet10t", RGB, weights=str(path), image_size=64).model.meta.input_size == 64
    assert models.load("resnet10t", RGB, image_size=48).model.meta.input_size == 48
    # a kdcli checkpoint keeps its own input (and old checkpoints, without interpolation/crop_pct, still load)
    m = models.load("cifar_resnet8", RGB).model
    old = tmp_path / "old.safetensors"
    legacy = m.meta.model_dump(exclude={"interpolation", "crop_pct"})
    from safetensors.torch import save_model
    save_model(m.net, str(old), metadata={ckpt.META_KEY: json.dumps(legacy)})
    back = models.load(str(old), RGB).model.meta
    assert (back.input_size, back.interpolation, back.crop_pct) == (32, "bilinear", 1.0)
    assert models.load(str(old), RGB, image_size=40).model.meta.input_size == 40


def test_kdcli_checkpoint_as_a_weights_file_describes_itself(tmp_path):
    m = models.load("cifar_resnet8", models.DataFacts(10, 3, 24, list("abcdefghij"))).model
    path = tmp_path / "m.safetensors"
    ckpt.save(path, m.net, m.meta.model_copy(update={"interpolation": "bicubic", "crop_pct": 0.9}))
    data = models.DataFacts(10, 3, 24, list("jihgfedcba"))
    loaded = models.load("cifar_resnet8", data, weights=str(path), option="--teacher")
    meta = loaded.model.meta
    assert (meta.input_size, meta.interpolation, meta.crop_pct) == (24, "bicubic", 0.9)
    assert meta.mean == pytest.approx(m.meta.mean) and loaded.class_order == "permuted"
    assert meta.class_names == list("abcdefghij")


def test_classifier_resizes_a_batch_of_another_size_on_the_fly():
    torch.manual_seed(0)
    m = models.load("cifar_resnet8", RGB, image_size=64).model.eval()
    assert m.meta.input_size == 64
    x = torch.rand(2, 3, 32, 32)
    by_hand = (F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False) - m.mean) / m.std
    with torch.no_grad():
        assert torch.allclose(m(x).logits, m.net(by_hand), rtol=0, atol=1e-6)
        m.stages = [1, 2, 3]
        feats = m(x, frozenset({"features"})).features
        _, want = m.net.forward_intermediates(by_hand, indices=[1, 2, 3], output_fmt="NCHW")
        assert len(feats) == 3
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(feats, want, strict=True))
        big = torch.rand(2, 3, 128, 128)  # shrinking is antialiased
        by_hand = (F.interpolate(big, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
                   - m.mean) / m.std
        assert torch.allclose(m(big).logits, m.net(by_hand), rtol=0, atol=1e-6)
        m.meta = m.meta.model_copy(update={"interpolation": "bicubic"})
        by_hand = (F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1) - m.mean) / m.std
        assert torch.allclose(m(x).logits, m.net(by_hand), rtol=0, atol=1e-6)
    s = m.shapes(frozenset({"logits", "features", "pooled"}))
    assert s.num_classes == 10 and s.pooled == m.net.num_features
    assert [f[1:] for f in s.features] == [(64, 64), (32, 32), (16, 16)]
    assert m.shapes(frozenset({"logits", "features"}), 32).features == s.features


def _saved(tmp_path, names, **meta_update):
    torch.manual_seed(0)
    m = models.load("cifar_resnet8", models.DataFacts(len(names), 3, 16, list(names))).model.eval()
    path = tmp_path / "ckpt.safetensors"
    ckpt.save(path, m.net, m.meta.model_copy(update=meta_update))
    return m, path


def test_class_names_permuted_into_the_datasets_order(tmp_path):
    m, path = _saved(tmp_path, "abcd")
    data = models.DataFacts(4, 3, 16, list("cadb"))
    loaded = models.load(str(path), data, option="--teacher")
    assert loaded.class_order == "permuted"
    assert loaded.warnings == [f"--teacher {path}: class names permuted into the dataset's order"]
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = m(x).logits
        got = loaded.model.eval()(x, frozenset({"logits", "pooled"}))
        for j, name in enumerate("cadb"):
            assert torch.equal(got.logits[:, j], want[:, "abcd".index(name)])
        assert torch.equal(got.pooled, m(x, frozenset({"pooled"})).pooled)  # features are the net's own
        assert torch.equal(loaded.model(x).logits, got.logits)
    assert loaded.model.meta.class_names == list("abcd")  # the network's own order, as saved again


def test_other_class_names_are_refused_unless_ignored(tmp_path):
    _, path = _saved(tmp_path, "abcd")
    other = models.DataFacts(4, 3, 16, ["a", "b", "c", "zebra"])
    with pytest.raises(KdcliError, match="other class names than the dataset .*d not in the dataset; zebra not in "
                                         "the model.*--ignore-class-names") as e:
        models.load(str(path), other, option="--teacher")
    assert "\n" not in str(e.value)
    loaded = models.load(str(path), other, option="--teacher", ignore_class_names=True)
    assert loaded.class_order == "ignored" and loaded.model.class_index is None and len(loaded.warnings) == 1
    with pytest.raises(KdcliError, match="has 4 classes but the dataset has 3"):
        models.load(str(path), models.DataFacts(3, 3, 16, list("abc")), ignore_class_names=True)


def test_generic_class_names_are_accepted_with_a_warning(tmp_path):
    _, path = _saved(tmp_path, ["0", "1", "2", "3"])
    loaded = models.load(str(path), models.DataFacts(4, 3, 16, list("cadb")), option="--teacher")
    assert loaded.class_order == "generic" and loaded.model.class_index is None
    assert len(loaded.warnings) == 1 and "generic class names (0, 1, 2, …)" in loaded.warnings[0]
    _, path = _saved(tmp_path, "abcd")
    loaded = models.load(str(path), models.DataFacts(4, 3, 16, [f"class_{i}" for i in range(4)]))
    assert loaded.class_order == "generic" and "the dataset's are generic" in loaded.warnings[0]
    _, path = _saved(tmp_path, ["0", "1", "2", "3"])
    quiet = models.load(str(path), models.DataFacts(4, 3, 16, [f"class_{i}" for i in range(4)]))
    assert quiet.class_order == "generic" and quiet.warnings == []


def test_model_info_carries_the_new_fields():
    info = ModelInfo(name="resnet10t", source="weights", params=1)
    assert info.trained is None and info.adapted == [] and info.class_order is None and info.input_size is None
    info = ModelInfo(name="resnet10t", source="weights", params=1, trained=True, adapted=["x"],
                     class_order="permuted", input_size=176)
    assert ModelInfo.model_validate_json(info.model_dump_json()) == info
