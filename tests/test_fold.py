"""Folding eval-mode BatchNorm2d into the preceding Conv2d (kdcli.models.fold): same outputs, same module tree."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdcli.models.cifar  # noqa: F401  (registers the cifar_* nets)
from kdcli.models.checkpoint import ModelMeta
from kdcli.models.classifier import Classifier
from kdcli.models.fold import fold_batchnorm


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that the fold changes the conv weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return net.eval()


def _num_bn(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * max(scale, 1.0))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_fold_keeps_logits_features_and_names(name):
    torch.manual_seed(0)
    net = _randomise_bn(timm.create_model(name, num_classes=10))
    ref = copy.deepcopy(net)  # the unfolded network computes the expected values
    names = [n for n, _ in net.named_modules()]
    bn_names = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    conv_weight = net.conv1.weight.clone()

    folded = fold_batchnorm(net)

    assert folded == len(bn_names) > 0
    assert _num_bn(net) == 0
    assert [n for n, _ in net.named_modules()] == names
    assert all(isinstance(net.get_submodule(n), nn.Identity) for n in bn_names)
    assert net.conv1.bias is not None and not torch.equal(net.conv1.weight, conv_weight)

    x = torch.rand(2, 3, 32, 32)
    hooked = {}
    for model, key in ((ref, "ref"), (net, "fold")):
        model.layer2.register_forward_hook(lambda m, i, o, key=key: hooked.__setitem__(key, o))
    with torch.no_grad():
        _close(net(x), ref(x))
        final, feats = net.forward_intermediates(x)
        ref_final, ref_feats = ref.forward_intermediates(x)
    _close(final, ref_final)
    assert len(feats) == len(ref_feats) > 0
    for f, r in zip(feats, ref_feats, strict=True):
        _close(f, r)
    _close(hooked["fold"], hooked["ref"])


def test_fold_classifier_net_features():
    """Through kdcli's own path: a Classifier's stage features (forward_intermediates) after folding its .net."""
    torch.manual_seed(1)
    net = _randomise_bn(timm.create_model("cifar_resnet8", num_classes=10))
    meta = ModelMeta(architecture="cifar_resnet8", num_classes=10, in_chans=3, input_size=32,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], class_names=[str(i) for i in range(10)])
    model, ref = Classifier(net, meta).eval(), Classifier(copy.deepcopy(net), meta).eval()
    model.stages = ref.stages = [1, 2, 3]
    assert fold_batchnorm(model.net) == 9
    needs = frozenset({"logits", "features"})
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        out, expected = model(x, needs), ref(x, needs)
    _close(out.logits, expected.logits)
    assert len(out.features) == 3
    for f, r in zip(out.features, expected.features, strict=True):
        _close(f, r)


class _SharedOutput(nn.Module):
    """The conv's output feeds the BN and the residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _SharedInIntermediates(nn.Module):
    """``forward`` alone would allow the fold, but ``forward_intermediates`` returns the raw conv output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))

    def forward_intermediates(self, x):
        y = self.conv(x)
        return self.bn(y), [y]


@pytest.mark.parametrize("cls", [_SharedOutput, _SharedInIntermediates])
def test_conv_output_used_elsewhere_is_not_folded(cls):
    net = _randomise_bn(cls())
    ref = copy.deepcopy(net)
    assert fold_batchnorm(net) == 0
    assert isinstance(net.bn, nn.BatchNorm2d)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
        if cls is _SharedInIntermediates:
            torch.testing.assert_close(net.forward_intermediates(x)[1][0], ref.forward_intermediates(x)[1][0])


def test_grouped_and_biased_convs_fold():
    net = _randomise_bn(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8, affine=False)))
    ref = copy.deepcopy(net)
    assert fold_batchnorm(net) == 2
    assert _num_bn(net) == 0
    x = torch.rand(2, 4, 8, 8)
    with torch.no_grad():
        _close(net(x), ref(x))


def test_training_or_statless_bn_is_skipped():
    train_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    train_bn.eval()[1].train()
    statless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    for net in (train_bn, statless):
        assert fold_batchnorm(net) == 0
        assert _num_bn(net) == 1


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: only the structural (name-based) fallback applies."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return F.relu(y) if y.sum() > 0 else -y


def test_untraceable_module_falls_back_to_names():
    net = _randomise_bn(_Untraceable())
    ref = copy.deepcopy(net)
    assert fold_batchnorm(copy.deepcopy(net), structural=False) == 0
    assert fold_batchnorm(net) == 1
    assert isinstance(net.bn1, nn.Identity)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        _close(net(x), ref(x))
