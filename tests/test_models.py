"""Loading models by name, by checkpoint and by weights file; the checkpoint round trip."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdcli import models
from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt

FACTS = models.DataFacts(num_classes=10, in_chans=1, image_size=8, class_names=[str(i) for i in range(10)],
                         mean=(0.3,), std=(0.2,))
RGB = models.DataFacts(num_classes=10, in_chans=3, image_size=16, class_names=[f"c{i}" for i in range(10)])


def test_timm_name_builds_fresh_classifier_fitted_to_data():
    loaded = models.load("cifar_resnet8", FACTS)
    m = loaded.model
    assert loaded.source == "timm" and loaded.path is None
    assert m.meta.in_chans == 1 and m.meta.num_classes == 10 and m.meta.mean == [0.3]
    assert m(torch.rand(3, 1, 8, 8)).logits.shape == (3, 10)
    out = m(torch.rand(3, 1, 8, 8), frozenset({"logits", "pooled"}))
    assert out.pooled.shape == (3, m.net.num_features)


def test_any_timm_model_takes_grayscale_and_uses_its_own_stats_when_data_has_none():
    m = models.load("resnet18", RGB).model
    assert m.meta.mean == pytest.approx([0.485, 0.456, 0.406])
    assert m(torch.rand(2, 3, 16, 16)).logits.shape == (2, 10)


def test_unknown_model_suggests_close_names():
    with pytest.raises(KdcliError, match="unknown model 'cifar_resnet2'.*did you mean: .*cifar_resnet20"):
        models.load("cifar_resnet2", FACTS)
    with pytest.raises(KdcliError, match="--teacher"):
        models.load("resnet_does_not_exist", FACTS, option="--teacher")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = models.load("cifar_resnet8", FACTS).model.eval()
    path = tmp_path / "model.safetensors"
    ckpt.save(path, m.net, m.meta.model_copy(update={"trained": {"method": "kd"}}))
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kdcli"])
    assert meta["architecture"] == "cifar_resnet8" and meta["class_names"][3] == "3"
    assert meta["trained"] == {"method": "kd"}
    back = models.load(str(path), FACTS)
    assert back.source == "checkpoint"
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(back.model.eval()(x).logits, m(x).logits)
    # the weights are plain timm weights: timm alone can load them
    import timm
    net = timm.create_model("cifar_resnet8", num_classes=10, in_chans=1)
    from safetensors.torch import load_model
    load_model(net, str(path))


def test_checkpoint_errors(tmp_path):
    m = models.load("cifar_resnet8", FACTS).model
    good = tmp_path / "good.safetensors"
    ckpt.save(good, m.net, m.meta)
    other = models.DataFacts(num_classes=5, in_chans=1, image_size=8, class_names=list("abcde"))
    with pytest.raises(KdcliError, match="has 10 classes but the dataset has 5"):
        models.load(str(good), other, option="--teacher")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(KdcliError, match="not a kdcli checkpoint.*--teacher ARCH --teacher-weights"):
        models.load(str(foreign), FACTS, option="--teacher")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(KdcliError, match="not a readable safetensors file"):
        models.load(str(junk), FACTS)
    with pytest.raises(KdcliError, match="does not exist"):
        models.load(str(tmp_path / "missing.safetensors"), FACTS)


def test_weights_that_need_unpickling_are_refused_in_one_line_without_torchs_advice(tmp_path):
    """kdcli never unpickles code: torch's own advice (weights_only=False) is not passed on, its reason is."""
    pickled = tmp_path / "w.pth"
    torch.save({"net": print}, str(pickled))
    text = tmp_path / "t.pth"
    text.write_text('{"a": 1}')
    for path, reason in [(pickled, "Unsupported global"), (text, "Unsupported operand")]:
        with pytest.raises(KdcliError) as exc:
            models.load("cifar_resnet8", FACTS, weights=str(path))
        message = str(exc.value)
        assert "loads without unpickling code" in message and reason in message, message
        assert "weights_only" not in message and "\n" not in message
    with pytest.raises(KdcliError, match="is a folder"):
        models.load("cifar_resnet8", FACTS, weights=str(tmp_path))


def test_weights_file_into_named_architecture(tmp_path):
    src = models.load("cifar_resnet8", RGB).model
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.net.state_dict().items()}}, pth)
    loaded = models.load("cifar_resnet8", RGB, weights=str(pth), option="--teacher")
    assert loaded.source == "weights" and loaded.trained and loaded.adapted == []
    assert loaded.model.meta.input_size == 32  # weights for a timm architecture: its pretrained cfg's input
    loaded = models.load("cifar_resnet8", RGB, weights=str(pth), option="--teacher", image_size=16)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.model.eval()(x).logits, src.eval()(x).logits)
    with pytest.raises(KdcliError, match="do not fit cifar_resnet14"):
        models.load("cifar_resnet14", RGB, weights=str(pth), option="--teacher")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(KdcliError, match="cannot read weights"):
        models.load("cifar_resnet8", RGB, weights=str(junk), option="--teacher")
