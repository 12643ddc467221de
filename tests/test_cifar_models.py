"""The CIFAR ResNets / WRNs registered in timm by ``kdcli.models.cifar``."""

import pytest
import timm
import torch
from timm.data import resolve_data_config

import kdcli.models.cifar  # noqa: F401  (registers the models)
from kdcli.models.cifar import CIFAR_MEAN, CIFAR_STD

NAMES = [
    *(f"cifar_resnet{d}" for d in (8, 14, 20, 26, 32, 44, 56, 110)),
    "cifar_resnet8x4",
    "cifar_resnet32x4",
    "cifar_wrn_16_1",
    "cifar_wrn_16_2",
    "cifar_wrn_40_1",
    "cifar_wrn_40_2",
    "cifar_wrn_28_4",
]

# Parameter counts (millions, 100 classes) reported for the CIFAR-100 distillation benchmark. The figures are
# rounded to two decimals, so allow that rounding as well as 3% (resnet8 has 83,892 parameters, "0.08M").
KNOWN_PARAMS = {
    "cifar_resnet8": 0.08,
    "cifar_resnet20": 0.28,
    "cifar_resnet56": 0.86,
    "cifar_resnet110": 1.73,
    "cifar_resnet32x4": 7.43,
    "cifar_resnet8x4": 1.23,
    "cifar_wrn_40_2": 2.26,
    "cifar_wrn_16_2": 0.70,
    "cifar_wrn_40_1": 0.57,
    "cifar_wrn_28_4": 5.9,
}

# One post-activation ResNet, one wide x4 ResNet, one WRN with a conv shortcut in group 1, one without.
REPRESENTATIVE = ["cifar_resnet20", "cifar_resnet8x4", "cifar_wrn_16_2", "cifar_wrn_16_1"]


def _make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


VITS = ["cifar_vit_micro_p4", "cifar_vit_tiny_p4"]


def test_all_names_registered():
    assert sorted(timm.list_models("cifar_*")) == sorted(NAMES + VITS)
    assert all(timm.is_model(name) for name in NAMES + VITS)


@pytest.mark.parametrize("name", VITS)
def test_cifar_vits_are_timm_vits_with_4x4_patches(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    final, maps = model.forward_intermediates(x, indices=2, output_fmt="NCHW")
    assert [tuple(m.shape[2:]) for m in maps] == [(8, 8), (8, 8)]  # 32/4 tokens a side, as NCHW maps
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)
    gray = timm.create_model(name, num_classes=10, in_chans=1)
    assert gray(torch.rand(2, 1, 8, 8)).shape == (2, 10)  # dynamic size: digits-sized input works
    with pytest.raises(ValueError):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", NAMES)
def test_create_and_forward(name):
    model = _make(name, num_classes=10)
    assert model.num_classes == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = _make(name, num_classes=10, in_chans=1)
    with torch.no_grad():
        assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert small.pretrained_cfg["input_size"] == (1, 32, 32)
    assert len(small.pretrained_cfg["mean"]) == len(small.pretrained_cfg["std"]) == 1


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_parameter_counts(name):
    model = timm.create_model(name)  # default: 100 classes
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(KNOWN_PARAMS[name], rel=0.03, abs=0.005)


def test_pretrained_without_weights_source_raises():
    # no weights are published: pretrained=True needs a source (local-dir:, hf-hub:, or a file in the overlay;
    # those load through timm's own machinery, see tests/test_model_folder.py)
    for name in ("cifar_resnet20", "cifar_vit_micro_p4"):
        with pytest.raises(ValueError, match="No pretrained weights are published.*local-dir:"):
            timm.create_model(name, pretrained=True)


def test_features_only():
    for name in ("cifar_resnet8", "cifar_wrn_16_1"):
        model = _make(name, features_only=True)
        with torch.no_grad():
            maps = model(torch.randn(2, 3, 32, 32))
        assert [m.shape[1] for m in maps] == model.feature_info.channels()
        assert [32 // m.shape[-1] for m in maps] == [1, 1, 2, 4]


def test_timm_plumbing_kwargs_accepted_and_unknown_rejected():
    model = timm.create_model(
        "cifar_resnet8", pretrained_cfg_overlay={"crop_pct": 0.9}, cache_dir="/nonexistent", drop_rate=0.2
    )
    assert model.head_drop.p == 0.2
    with pytest.raises(TypeError):
        timm.create_model("cifar_resnet8", no_such_option=1)


def test_cfg_and_data_config():
    model = _make("cifar_wrn_40_1", num_classes=10)
    assert model.default_cfg is model.pretrained_cfg
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "cifar_wrn_40_1"
    assert cfg["num_classes"] == 10
    assert cfg["classifier"] == "fc" and isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32)
    assert data["mean"] == CIFAR_MEAN and data["std"] == CIFAR_STD


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_feature_info_matches_intermediates(name):
    model = _make(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    info = model.feature_info
    assert [f["reduction"] for f in info] == [1, 1, 2, 4]
    assert info[-1]["num_chs"] == model.num_features
    for f in info:
        model.get_submodule(f["module"])  # names a real module
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert len(feats) == len(info)
        for f, t in zip(info, feats, strict=True):
            assert t.shape == (2, f["num_chs"], 32 // f["reduction"], 32 // f["reduction"])
        torch.testing.assert_close(final, model.forward_features(x))

        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert isinstance(last_two, list) and len(last_two) == 2
        torch.testing.assert_close(last_two[0], feats[-2])
        torch.testing.assert_close(last_two[1], feats[-1])

        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(picked[0], feats[0])
        torch.testing.assert_close(picked[1], feats[-1])

        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], feats[1])


def test_wrn_norm_flag_applies_final_norm():
    model = _make("cifar_wrn_16_2", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, (raw,) = model.forward_intermediates(x, indices=1)
        (normed,) = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    torch.testing.assert_close(normed, final)
    assert not torch.allclose(raw, final)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_head_and_classifier(name):
    model = _make(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(model(x), model.forward_head(feats))

    assert model.get_classifier() is model.fc
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


def test_init():
    model = _make("cifar_resnet8")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
