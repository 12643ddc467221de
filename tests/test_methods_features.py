"""Feature methods (fitnet, at, fsp, ft) against their formulas, on small hand-made tensors."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdcli import methods
from kdcli.errors import KdcliError
from kdcli.methods import Outputs, Shapes, build
from kdcli.methods.features import attention_map, factor_loss, fsp_matrix

NUM_CLASSES = 5
STUDENT = Shapes(NUM_CLASSES, ((8, 8, 8), (16, 4, 4), (32, 2, 2)), 32)
TEACHER = Shapes(NUM_CLASSES, ((16, 8, 8), (32, 4, 4), (64, 2, 2)), 64)
VIT = Shapes(NUM_CLASSES, ((12, 4, 4),) * 3, 12)  # a ViT-like student: every stage on the same token grid
TEACHER_HIRES = Shapes(NUM_CLASSES, ((16, 16, 16), (32, 8, 8), (64, 4, 4)), 64)
FEATURE_METHODS = ["fitnet", "at", "fsp", "ft"]


def _outputs(shapes: Shapes, seed: int, batch: int = 3, grad: bool = False) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, *chw, generator=g).requires_grad_(grad) for chw in shapes.features]
    return Outputs(logits=torch.randn(batch, shapes.num_classes, generator=g).requires_grad_(grad), features=feats)


def _target(batch: int = 3) -> torch.Tensor:
    return torch.arange(batch) % NUM_CLASSES


def _identity_conv_bn(seq: nn.Sequential) -> None:
    """Make a conv + BN connector the identity (square conv, BN in eval with zero mean, unit variance)."""
    conv, bn = seq[0], seq[1]
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        conv.weight[:, :, k, k] = torch.eye(conv.out_channels)
        bn.reset_parameters()
        bn.eps = 0.0
    bn.eval()


# ------------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", FEATURE_METHODS)
@pytest.mark.parametrize("student", [STUDENT, VIT], ids=["cnn", "vit"])
def test_terms_are_finite_and_gradients_reach_student_and_connectors(name, student):
    torch.manual_seed(0)
    m = build(name, {}, student, TEACHER)
    s, t = _outputs(student, 1, grad=True), _outputs(TEACHER, 2)
    assert methods.get(name).family == "features"
    assert "features" in m.needs
    terms = m(s, t, _target())
    assert "ce" in terms and all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
    stage_terms = [terms]
    if m.warmup_epochs(240) > 0:
        stage_terms.append(m.warmup(s, t, _target()))
    loss = next(st[name] for st in stage_terms if name in st)  # the method's own term, named after it
    loss.backward()
    # the method's own term reaches the student's features (for FT: its last stage, through the translator)
    assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in s.features)
    trainable = {"fitnet": "regressor", "fsp": "connectors", "ft": "translator"}.get(name)
    if trainable is not None:
        trainable = getattr(m, trainable)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_args_are_validated(name):
    with pytest.raises(KdcliError, match=f"bad value for {name} argument 'beta'"):
        build(name, {"beta": "-1"}, STUDENT, TEACHER)
    with pytest.raises(KdcliError, match="has no argument 'gamma'"):
        build(name, {"gamma": "1"}, STUDENT, TEACHER)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_needs_feature_shapes(name):
    with pytest.raises(ValueError, match="feature shapes"):
        build(name, {}, Shapes(NUM_CLASSES), TEACHER)
    with pytest.raises(ValueError, match="as many student as teacher stages"):
        build(name, {}, Shapes(NUM_CLASSES, STUDENT.features[:2]), TEACHER)


def test_composes_with_kd():
    m = build("kd+fitnet", {"fitnet.beta": "10"}, STUDENT, TEACHER)
    terms = m(_outputs(STUDENT, 1), _outputs(TEACHER, 2), _target())
    assert set(terms) == {"ce", "kd", "fitnet"}
    assert m.warmup_epochs(240) == 30 and set(m.warmup(_outputs(STUDENT, 1), _outputs(TEACHER, 2), _target())) == {
        "fitnet"}


# ------------------------------------------------------------------------------------------------- AT


def test_at_is_zero_for_identical_features_and_scale_invariant():
    at = build("at", {}, TEACHER, TEACHER)
    s, t = _outputs(TEACHER, 1), _outputs(TEACHER, 2)
    same = Outputs(logits=s.logits, features=[f.clone() for f in s.features])
    assert at(s, same, _target())["at"].item() == pytest.approx(0.0, abs=1e-9)
    scaled = Outputs(logits=t.logits, features=[3.7 * f for f in t.features])
    assert at(s, scaled, _target())["at"].item() == pytest.approx(at(s, t, _target())["at"].item(), rel=1e-5)
    assert at(s, t, _target())["ce"].item() == pytest.approx(F.cross_entropy(s.logits, _target()).item())


def test_at_matches_the_formula_by_hand():
    # one stage, 2 examples, 2 channels on a 1×2 grid (student) against 1 channel (teacher)
    f_s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]], [[[0.0, 1.0]], [[1.0, 1.0]]]])  # (2, 2, 1, 2)
    f_t = torch.tensor([[[[2.0, 1.0]]], [[[1.0, 3.0]]]])  # (2, 1, 1, 2)
    at = build("at", {"beta": "10"}, Shapes(3, ((2, 1, 2),)), Shapes(3, ((1, 1, 2),)))
    logits = torch.zeros(2, 3)
    got = at(Outputs(logits, [f_s]), Outputs(logits, [f_t]), torch.tensor([0, 1]))["at"].item()

    def att(f):  # mean over channels of f², L2-normalised over positions
        q = [sum(f[c][0][j] ** 2 for c in range(len(f))) / len(f) for j in range(2)]
        n = math.sqrt(sum(v * v for v in q))
        return [v / n for v in q]

    sq = [(a - b) ** 2 for i in range(2) for a, b in zip(att(f_s[i].tolist()), att(f_t[i].tolist()), strict=True)]
    assert got == pytest.approx(10 * sum(sq) / len(sq), rel=1e-6)


def test_at_handles_different_resolutions_and_channels():
    at = build("at", {}, STUDENT, TEACHER_HIRES)
    s, t = _outputs(STUDENT, 1), _outputs(TEACHER_HIRES, 2)
    by_hand = sum((attention_map(fs) - attention_map(F.avg_pool2d(ft, 2))).pow(2).mean()
                  for fs, ft in zip(s.features, t.features, strict=True))
    assert at(s, t, _target())["at"].item() == pytest.approx(1000 * by_hand.item(), rel=1e-5)
    vit = build("at", {}, VIT, TEACHER)  # teacher stage 1 at 8×8 is pooled to the student's 4×4
    assert torch.isfinite(vit(_outputs(VIT, 1), _outputs(TEACHER, 2), _target())["at"])


# ------------------------------------------------------------------------------------------------- FitNet


def test_fitnet_regressor_maps_student_channels_to_teacher_channels():
    m = build("fitnet", {}, STUDENT, TEACHER)
    assert m.stage == 1  # the middle of three matched stages
    conv = m.regressor[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 32, (1, 1))
    last = build("fitnet", {"stage": "-1", "kernel": "3"}, STUDENT, TEACHER)
    assert last.stage == 2 and (last.regressor[0].in_channels, last.regressor[0].out_channels) == (32, 64)
    assert last.regressor[0].kernel_size == (3, 3)
    with pytest.raises(ValueError, match="out of range"):
        build("fitnet", {"stage": "3"}, STUDENT, TEACHER)
    with pytest.raises(KdcliError, match="kernel"):
        build("fitnet", {"kernel": "2"}, STUDENT, TEACHER)


@pytest.mark.parametrize("kernel", ["1", "3"])
def test_fitnet_hint_with_identity_regressor_is_beta_mse(kernel):
    m = build("fitnet", {"kernel": kernel}, TEACHER, TEACHER)
    _identity_conv_bn(m.regressor)
    s, t = _outputs(TEACHER, 1), _outputs(TEACHER, 2)
    by_hand = ((s.features[1] - t.features[1]) ** 2).mean().item()
    terms = m(s, t, _target())
    assert terms["fitnet"].item() == pytest.approx(100 * by_hand, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s.logits, _target()).item())


def test_fitnet_warmup_is_hint_only():
    m = build("fitnet", {}, STUDENT, TEACHER)
    s, t = _outputs(STUDENT, 1), _outputs(TEACHER, 2)
    warm = m.warmup(s, t, _target())
    assert set(warm) == {"fitnet"}
    assert m.warmup_epochs(240) == 30 and m.warmup_epochs(4) == 1
    assert build("fitnet", {"warmup": "0"}, STUDENT, TEACHER).warmup_epochs(240) == 0


def test_fitnet_resizes_the_student_to_the_teachers_grid():
    m = build("fitnet", {}, STUDENT, TEACHER_HIRES)  # student 4×4 hint, teacher 8×8: upsampled
    s, t = _outputs(STUDENT, 1, grad=True), _outputs(TEACHER_HIRES, 2)
    m(s, t, _target())["fitnet"].backward()
    assert s.features[1].grad.abs().sum() > 0
    down = build("fitnet", {}, TEACHER_HIRES, STUDENT)  # 8×8 → 4×4: average-pooled
    assert torch.isfinite(down(_outputs(TEACHER_HIRES, 1), _outputs(STUDENT, 2), _target())["fitnet"])


# ------------------------------------------------------------------------------------------------- FSP


def test_fsp_matrix_by_hand():
    a = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # (1, 2, 1, 2)
    b = torch.tensor([[[[3.0, 4.0]]]])  # (1, 1, 1, 2)
    g = fsp_matrix(a, b)
    assert g.shape == (1, 2, 1)
    assert g[0, :, 0].tolist() == pytest.approx([(1 * 3 + 2 * 4) / 2, (0 * 3 - 1 * 4) / 2])
    # different grids: the larger map is average-pooled to the smaller one first
    c = torch.tensor([[[[5.0]]]])  # (1, 1, 1, 1)
    g2 = fsp_matrix(a, c)
    assert g2[0, :, 0].tolist() == pytest.approx([1.5 * 5, -0.5 * 5])


def test_fsp_zero_for_identical_features_and_connectors():
    m = build("fsp", {}, TEACHER, TEACHER)
    assert all(isinstance(c, nn.Identity) for c in m.connectors)  # channels match: no connector
    s = _outputs(TEACHER, 1)
    assert m.warmup(s, Outputs(s.logits, [f.clone() for f in s.features]), _target())["fsp"].item() == pytest.approx(
        0.0, abs=1e-12)
    mixed = build("fsp", {}, STUDENT, TEACHER)
    assert [c[0].out_channels for c in mixed.connectors] == [16, 32, 64]


def test_fsp_warmup_is_fsp_only_then_ce_only():
    m = build("fsp", {"beta": "2"}, STUDENT, TEACHER)
    s, t = _outputs(STUDENT, 1), _outputs(TEACHER, 2)
    assert set(m(s, t, _target())) == {"ce"}
    warm = m.warmup(s, t, _target())
    assert set(warm) == {"fsp"}
    assert warm["fsp"].item() == pytest.approx(2 * m.fsp_loss(s, t).item(), rel=1e-6)
    assert m.warmup_epochs(240) == 30


def test_fsp_loss_by_hand_is_a_sum_over_consecutive_pairs():
    m = build("fsp", {}, TEACHER, TEACHER)
    s, t = _outputs(TEACHER, 1), _outputs(TEACHER, 2)
    by_hand = sum((fsp_matrix(s.features[i], s.features[i + 1]) - fsp_matrix(t.features[i], t.features[i + 1]))
                  .pow(2).mean() for i in range(2))
    assert m.fsp_loss(s, t).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_fsp_needs_two_stages():
    one = Shapes(NUM_CLASSES, ((8, 4, 4),))
    with pytest.raises(ValueError, match="at least 2 matched stages"):
        build("fsp", {}, one, one)


# ------------------------------------------------------------------------------------------------- FT


def test_ft_paraphraser_reconstructs_the_teacher_shape():
    m = build("ft", {}, STUDENT, TEACHER)
    f_t = _outputs(TEACHER, 2).features[-1]
    factor, rec = m.paraphraser(f_t)
    assert factor.shape == (3, 32, 2, 2) and rec.shape == f_t.shape
    assert m.translator(_outputs(STUDENT, 1).features[-1]).shape == (3, 32, 2, 2)
    assert build("ft", {"k": "0.25"}, STUDENT, TEACHER).paraphraser(f_t)[0].shape == (3, 16, 2, 2)


def test_factor_loss_is_zero_for_identical_normalised_factors():
    x = torch.randn(2, 4, 3, 3)
    assert factor_loss(x, 2.5 * x).item() == pytest.approx(0.0, abs=1e-7)
    y = torch.randn(2, 4, 3, 3)
    by_hand = (F.normalize(x.flatten(1)) - F.normalize(y.flatten(1))).abs().mean()
    assert factor_loss(x, y).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert factor_loss(x, F.interpolate(y, size=(6, 6))).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_ft_beta_scales_the_term_and_defaults_to_the_authors_500():
    """The term is β · mean |F_s/‖F_s‖ − F_t/‖F_t‖| over the flattened factors of the translator (student) and
    the frozen paraphraser's encoder (teacher), computed here in float64 numpy; β = 500 as in the authors' code."""
    s, t = _outputs(STUDENT, 1), _outputs(TEACHER, 2)
    torch.manual_seed(0)
    m = build("ft", {}, STUDENT, TEACHER)
    base = m(s, t, _target())["ft"]
    with torch.no_grad():
        f_s = m.translator(s.features[-1]).flatten(1).double().numpy()
        f_t = m.paraphraser.encoder(t.features[-1]).flatten(1).double().numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    assert base.item() == pytest.approx(500 * np.abs(unit(f_s) - unit(f_t)).mean(), rel=1e-5)
    torch.manual_seed(0)
    double = build("ft", {"beta": "1000"}, STUDENT, TEACHER)(s, t, _target())["ft"]
    assert double.item() == pytest.approx(2 * base.item(), rel=1e-6)


def test_ft_paraphraser_trains_in_warmup_and_is_frozen_after():
    m = build("ft", {"paraphraser_bn": "true"}, STUDENT, TEACHER)
    s, t = _outputs(STUDENT, 1, grad=True), _outputs(TEACHER, 2)
    warm = m.warmup(s, t, _target())
    assert set(warm) == {"ft_paraphraser"} and m.warmup_epochs(240) == 30
    warm["ft_paraphraser"].backward()
    assert all(p.grad is not None for p in m.paraphraser.parameters())
    assert all(p.grad is None for p in m.translator.parameters())
    m.zero_grad(set_to_none=True)
    m.train()
    terms = m(s, t, _target())
    assert not m.paraphraser.training  # BN statistics frozen in the main stage
    (terms["ce"] + terms["ft"]).backward()
    assert all(p.grad is None for p in m.paraphraser.parameters())
    assert all(p.grad is not None for p in m.translator.parameters())
    assert s.features[-1].grad.abs().sum() > 0


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_terms_are_float32_under_bf16_autocast(name):
    m = build(name, {}, STUDENT, TEACHER)
    s, t = _outputs(STUDENT, 1), _outputs(TEACHER, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = s.map(lambda x: x.bfloat16())
        terms = m(s, t, _target())
        if m.warmup_epochs(240):
            terms |= m.warmup(s, t, _target())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    assert fsp_matrix(s.features[0], s.features[1]).dtype == torch.float32
