"""ReviewKD (knowledge review) against its formula on small hand-made tensors, and its ABF plumbing."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kdcli import methods
from kdcli.errors import KdcliError
from kdcli.methods import Outputs, Shapes, build
from kdcli.methods.review import ABF, hcl, hcl_level

NUM_CLASSES = 5
STUDENT = Shapes(NUM_CLASSES, ((8, 8, 8), (16, 4, 4), (32, 2, 2)), 32)
TEACHER = Shapes(NUM_CLASSES, ((16, 8, 8), (32, 4, 4), (64, 2, 2)), 64)
VIT = Shapes(NUM_CLASSES, ((12, 4, 4),) * 3, 12)  # a ViT: every stage on the same token grid
TEACHER_HIRES = Shapes(NUM_CLASSES, ((16, 16, 16), (32, 8, 8), (64, 4, 4)), 64)
PAIRS = {"cnn-cnn": (STUDENT, TEACHER), "cnn-vit": (STUDENT, VIT), "vit-cnn": (VIT, TEACHER_HIRES)}


def _outputs(shapes: Shapes, seed: int, batch: int = 3, grad: bool = False) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, *chw, generator=g).requires_grad_(grad) for chw in shapes.features]
    return Outputs(logits=torch.randn(batch, shapes.num_classes, generator=g).requires_grad_(grad), features=feats,
                   pooled=torch.randn(batch, shapes.pooled, generator=g).requires_grad_(grad))


def _target(batch: int = 3) -> torch.Tensor:
    return torch.arange(batch) % NUM_CLASSES


# ------------------------------------------------------------------------------------------------- HCL by hand


def _block_means(a: np.ndarray, n: int) -> np.ndarray:
    """Average an (..., H, W) array over an n×n grid of equal blocks, by explicit loops."""
    h, w = a.shape[-2:]
    bh, bw = h // n, w // n
    out = np.zeros(a.shape[:-2] + (n, n))
    for i in range(n):
        for j in range(n):
            out[..., i, j] = a[..., i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].mean(axis=(-2, -1))
    return out


def _hcl_by_hand(s: np.ndarray, t: np.ndarray) -> float:
    """The reference hcl of one level: full MSE + MSEs pooled to 4, 2, 1 (sizes < H), weights 1, ½, ¼, ⅛ in the
    order used, divided by the weights' sum."""
    terms = [(1.0, float(((s - t) ** 2).mean()))]
    for n in (4, 2, 1):
        if n < s.shape[-1]:
            terms.append((0.5 ** len(terms), float(((_block_means(s, n) - _block_means(t, n)) ** 2).mean())))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


def test_hcl_level_of_a_2x2_map_worked_by_hand():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.zeros_like(s)
    # full: (1 + 4 + 9 + 16) / 4 = 7.5; pooled to 1×1: 2.5² = 6.25 with weight ½; 4 and 2 are not smaller than 2
    assert hcl_level(s, t).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5, abs=1e-5)


@pytest.mark.parametrize("size, weights", [(1, [1.0]), (2, [1.0, 0.5]), (4, [1.0, 0.5, 0.25]),
                                           (8, [1.0, 0.5, 0.25, 0.125])])
def test_hcl_level_matches_the_formula(size, weights):
    rng = np.random.default_rng(size)
    s = rng.normal(size=(2, 3, size, size))
    t = rng.normal(size=(2, 3, size, size))
    got = hcl_level(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)).item()
    assert got == pytest.approx(_hcl_by_hand(s, t), abs=1e-5)
    # the same from the table of weights: full resolution, then each pooled size smaller than the map
    mses = [((s - t) ** 2).mean()] + [((_block_means(s, n) - _block_means(t, n)) ** 2).mean()
                                      for n in (4, 2, 1) if n < size]
    assert got == pytest.approx(sum(w * v for w, v in zip(weights, mses, strict=True)) / sum(weights), abs=1e-5)


def test_hcl_sums_levels_and_an_identical_level_adds_nothing():
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(2, 3, 4, 4)) for _ in range(3))
    p, q = rng.normal(size=(2, 5, 1, 1)), rng.normal(size=(2, 5, 1, 1))
    ts = [torch.tensor(x, dtype=torch.float32) for x in (a, b, c, p, q)]
    assert hcl_level(ts[0], ts[0].clone()).item() == 0.0
    got = hcl([ts[0], ts[1], ts[3]], [ts[0].clone(), ts[2], ts[4]]).item()
    assert got == pytest.approx(_hcl_by_hand(b, c) + float(((p - q) ** 2).mean()), abs=1e-5)


# ------------------------------------------------------------------------------------------------- ABF plumbing


def test_is_registered_as_a_one_teacher_feature_method():
    cls = methods.get("reviewkd")
    assert cls.family == "features" and cls.teachers == "one"
    assert cls.needs == frozenset({"logits", "features", "pooled"})
    assert cls.defaults() == {"weight": 5.0, "ce_weight": 1.0, "ramp": pytest.approx(20 / 240),
                              "max_mid_channels": 512}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_abf_outputs_have_the_teachers_shape_per_level(pair):
    student, teacher = PAIRS[pair]
    torch.manual_seed(0)
    m = build("reviewkd", {}, student, teacher)
    assert len(m.abfs) == len(student.features) + 1
    assert [a.att is not None for a in m.abfs] == [True] * len(student.features) + [False]  # deepest: no fusion
    assert all(a.conv1[0].in_channels == c for a, (c, _, _) in zip(m.abfs, student.features, strict=False))
    assert m.abfs[-1].conv1[0].in_channels == student.pooled
    assert {a.conv1[0].out_channels for a in m.abfs} == {min(512, student.pooled)}
    s, t = _outputs(student, 1, grad=True), _outputs(teacher, 2)
    out = m.review(s)
    expected = [(3, *chw) for chw in teacher.features] + [(3, teacher.pooled, 1, 1)]
    assert [tuple(o.shape) for o in out] == expected
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) > 0
    terms = m(s, t, _target())
    assert set(terms) == {"ce", "reviewkd"}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
    terms["reviewkd"].backward()
    for a in m.abfs:  # every level's ABF learns
        assert a.conv2[0].weight.grad is not None and a.conv2[0].weight.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in [*s.features, s.pooled])


def test_mid_channels_are_capped_at_512():
    wide = Shapes(NUM_CLASSES, STUDENT.features, 600)
    assert {a.conv1[0].out_channels for a in build("reviewkd", {}, wide, TEACHER).abfs} == {512}
    capped = build("reviewkd", {"max_mid_channels": "16"}, STUDENT, TEACHER)
    assert {a.conv1[0].out_channels for a in capped.abfs} == {16}


def test_abf_fuses_with_the_sigmoid_attention_and_upsamples_nearest():
    abf = ABF(2, 2, 3, fuse=True).eval()
    with torch.no_grad():  # conv1 + BN the identity; attention constant: σ(0) = ½ for x, σ(ln 3) = ¾ for the residual
        abf.conv1[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        abf.conv1[1].reset_parameters()
        abf.conv1[1].eps = 0.0
        abf.att[0].weight.zero_()
        abf.att[0].bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [2.0, 5.0]]]])  # (1, 2, 2, 2)
    r = torch.tensor([[[[8.0]], [[-4.0]]]])  # the deeper level's residual, 1×1
    out, fused = abf(x, r, (4, 4))
    by_hand = [[[0.5 * x[0, c, i // 2, j // 2].item() + 0.75 * r[0, c, 0, 0].item() for j in range(4)]
                for i in range(4)] for c in range(2)]
    assert fused.shape == (1, 2, 4, 4) and out.shape == (1, 3, 4, 4)
    assert fused[0].tolist() == [[pytest.approx(row, abs=1e-6) for row in ch] for ch in by_hand]
    # shrinking to a coarser teacher grid averages
    _, down = abf(x, r, (1, 1))
    assert down[0, :, 0, 0].tolist() == pytest.approx([0.5 * 2.5 + 6.0, 0.5 * 1.5 - 3.0], abs=1e-6)


# ------------------------------------------------------------------------------------------------- the loss


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def test_review_term_is_weight_times_hcl_and_ramps_over_20_of_240_epochs():
    torch.manual_seed(0)
    m = build("reviewkd", {}, STUDENT, TEACHER).eval()  # eval: BN on running statistics, deterministic
    s, t = _outputs(STUDENT, 1), _outputs(TEACHER, 2)
    targets = [*t.features, t.pooled[:, :, None, None]]
    by_hand = sum(_hcl_by_hand(_np(o), _np(f)) for o, f in zip(m.review(s), targets, strict=True))
    got = {}
    for epoch in (0, 19, 20):
        m.set_progress(epoch, 240)
        terms = m(s, t, _target())
        got[epoch] = terms["reviewkd"].item()
        assert terms["ce"].item() == pytest.approx(F.cross_entropy(s.logits, _target()).item(), abs=1e-6)
    assert got[20] == pytest.approx(5.0 * by_hand, rel=1e-5)
    assert got[19] == pytest.approx(got[20], rel=1e-6)  # the 20th (1-based) epoch is the last of the ramp
    assert got[0] == pytest.approx(got[20] / 20, rel=1e-5)
    no_ramp = build("reviewkd", {"ramp": "0", "weight": "1"}, STUDENT, TEACHER).eval()
    no_ramp.load_state_dict(m.state_dict())
    no_ramp.set_progress(0, 240)
    assert no_ramp(s, t, _target())["reviewkd"].item() == pytest.approx(by_hand, rel=1e-5)


def test_teacher_side_gets_no_gradient():
    m = build("reviewkd", {}, STUDENT, TEACHER)
    s, t = _outputs(STUDENT, 1, grad=True), _outputs(TEACHER, 2, grad=True)
    m(s, t, _target())["reviewkd"].backward()
    assert all(f.grad is None for f in [*t.features, t.pooled])


def test_unusable_pairs_and_bad_args_are_refused():
    with pytest.raises(ValueError, match="feature shapes"):
        build("reviewkd", {}, Shapes(NUM_CLASSES, (), 32), TEACHER)
    with pytest.raises(ValueError, match="pooled"):
        build("reviewkd", {}, Shapes(NUM_CLASSES, STUDENT.features), TEACHER)
    with pytest.raises(ValueError, match="pooled"):
        build("reviewkd", {}, STUDENT, Shapes(NUM_CLASSES, TEACHER.features))
    with pytest.raises(ValueError, match="as many student as teacher stages"):
        build("reviewkd", {}, Shapes(NUM_CLASSES, STUDENT.features[:2], 32), TEACHER)
    with pytest.raises(KdcliError, match="bad value for reviewkd argument 'weight'"):
        build("reviewkd", {"weight": "-1"}, STUDENT, TEACHER)
    with pytest.raises(KdcliError, match="has no argument 'warmup'"):
        build("reviewkd", {"warmup": "0.1"}, STUDENT, TEACHER)
