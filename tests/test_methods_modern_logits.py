"""DKD, DIST, KD on standardized logits (lskd) and NKD against their formulas, written out here in float64
numpy loops (never by calling the implementation); their invariances, DKD's ramp and its numerics, the
two-class refusal, teacher ensembles and the ``standardize`` switch."""

import math

import numpy as np
import pytest
import torch

from kdcli import methods
from kdcli.errors import KdcliError
from kdcli.methods import Outputs, Shapes

S = [[2.0, 0.5, -1.0, 0.3, 1.2],
     [0.1, 0.2, 0.3, -0.4, 0.0],
     [-1.5, 2.5, 0.7, 0.2, -0.3],
     [1.0, -2.0, 0.4, 3.0, 0.5]]
T_ = [[1.0, 1.0, 0.0, -0.5, 2.0],
      [-2.0, 3.0, 0.5, 0.0, 1.0],
      [0.3, 4.0, -1.0, 1.5, 0.2],
      [2.5, -1.0, 0.0, 1.0, -0.5]]
Y = [0, 2, 1, 3]


def _tensors():
    return torch.tensor(S), torch.tensor(T_), torch.tensor(Y)


def _approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


# -- independent references (float64) ---------------------------------------------------------------------------
def softmax(z, T=1.0):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def zscore(z):
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))


def ce(z, y):
    p = softmax(z)
    return -np.mean([math.log(p[i, y[i]]) for i in range(len(y))])


def kd_ref(zs, pt, T):
    """T² · batch mean of Σ_c p_t log(p_t / p_s)."""
    ps = softmax(zs, T)
    kl = [sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(ps.shape[1])) for i in range(len(ps))]
    return T * T * np.mean(kl)


def dkd_ref(zs, pt, y, T):
    """(TCKD, NCKD), each T² · batch mean, from the binary masses and the renormalised non-target parts."""
    ps = softmax(zs, T)
    tckd = nckd = 0.0
    for i, g in enumerate(y):
        rest = [c for c in range(ps.shape[1]) if c != g]
        bt = [pt[i, g], sum(pt[i, c] for c in rest)]
        bs = [ps[i, g], sum(ps[i, c] for c in rest)]
        tckd += sum(a * math.log(a / b) for a, b in zip(bt, bs, strict=True))
        nckd += sum((pt[i, c] / bt[1]) * math.log((pt[i, c] / bt[1]) / (ps[i, c] / bs[1])) for c in rest)
    return T * T * tckd / len(y), T * T * nckd / len(y)


def dist_ref(zs, yt, T):
    """(inter, intra) with numpy's own Pearson correlation."""
    ys = softmax(zs, T)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(ys.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    return inter, intra


def nkd_ref(zs, zt, y, T, gamma):
    p_s, p_t = softmax(zs), softmax(zt)
    target = -np.mean([p_t[i, g] * math.log(p_s[i, g]) for i, g in enumerate(y)])
    non = 0.0
    for i, g in enumerate(y):
        rest = [c for c in range(len(zs[i])) if c != g]
        t_hat = softmax([zt[i][c] for c in rest], T)
        s_hat = softmax([zs[i][c] for c in rest], T)
        non += sum(a * math.log(b) for a, b in zip(t_hat, s_hat, strict=True))
    return target, -gamma * T * T * non / len(y)


def _run(name, s, t, y, args=None, members=None):
    m = methods.build(name, args or {}, Shapes(num_classes=s.shape[1]), Shapes(num_classes=s.shape[1]))
    return m(Outputs(logits=s), Outputs(logits=t, members=members or []), y)


# -- the formulas ------------------------------------------------------------------------------------------------
def test_dkd_matches_its_formula():
    s, t, y = _tensors()
    terms = _run("dkd", s, t, y)
    tckd, nckd = dkd_ref(S, softmax(T_, 4.0), Y, 4.0)
    assert terms["ce"].item() == _approx(ce(S, Y))
    assert terms["dkd_tckd"].item() == _approx(tckd)
    assert terms["dkd_nckd"].item() == _approx(8.0 * nckd)
    # the weights and the temperature are the arguments
    terms = _run("dkd", s, t, y, {"T": "2", "alpha": "3", "beta": "0.5", "ce_weight": "0.25"})
    tckd, nckd = dkd_ref(S, softmax(T_, 2.0), Y, 2.0)
    assert terms["dkd_tckd"].item() == _approx(3 * tckd)
    assert terms["dkd_nckd"].item() == _approx(0.5 * nckd)
    assert terms["ce"].item() == _approx(0.25 * ce(S, Y))


def test_dkd_terms_add_up_to_kd_as_the_paper_decomposes_it():
    # DKD paper eq. (1): KL = TCKD + (1 − p_t,gt) · NCKD, per example
    s, t, y = _tensors()
    for i in range(4):
        terms = _run("dkd", s[i:i + 1], t[i:i + 1], y[i:i + 1], {"beta": "1"})
        kd = kd_ref([S[i]], softmax([T_[i]], 4.0), 4.0)
        p_gt = softmax(T_[i], 4.0)[Y[i]]
        assert (terms["dkd_tckd"] + (1 - p_gt) * terms["dkd_nckd"]).item() == _approx(kd)


def test_dist_matches_its_formula():
    s, t, y = _tensors()
    terms = _run("dist", s, t, y)
    inter, intra = dist_ref(S, softmax(T_, 4.0), 4.0)
    assert 0.05 < inter < 1 and 0.05 < intra < 1  # far from perfect correlation: a real test of both terms
    assert terms["dist_inter"].item() == _approx(2 * 16 * inter)
    assert terms["dist_intra"].item() == _approx(2 * 16 * intra)
    assert terms["ce"].item() == _approx(ce(S, Y))
    terms = _run("dist", s, t, y, {"T": "1", "beta": "2", "gamma": "0.5", "weight": "1"})
    inter, intra = dist_ref(S, softmax(T_, 1.0), 1.0)
    assert terms["dist_inter"].item() == _approx(2 * inter)
    assert terms["dist_intra"].item() == _approx(0.5 * intra)


def test_lskd_matches_kd_on_standardized_logits():
    s, t, y = _tensors()
    terms = _run("lskd", s, t, y)
    assert set(terms) == {"ce", "kd"}
    assert terms["kd"].item() == _approx(9.0 * kd_ref(zscore(S), softmax(zscore(T_), 2.0), 2.0))
    assert terms["ce"].item() == _approx(0.1 * ce(S, Y))  # on the raw logits
    assert methods.get("lskd").defaults() == {"T": 2.0, "ce_weight": 0.1, "kd_weight": 9.0, "standardize": True,
                                              "ensemble": "mean"}


def test_lskd_refuses_to_turn_standardization_off():
    with pytest.raises(KdcliError, match="lskd always standardizes"):
        methods.build("lskd", {"standardize": "false"})


@pytest.mark.parametrize("T, gamma", [(1.0, 1.5), (2.0, 3.5)])
def test_nkd_matches_its_formula(T, gamma):
    s, t, y = _tensors()
    terms = _run("nkd", s, t, y, {"T": str(T), "gamma": str(gamma)})
    target, non = nkd_ref(S, T_, Y, T, gamma)
    assert terms["nkd_target"].item() == _approx(target)
    assert terms["nkd_nontarget"].item() == _approx(non)
    assert terms["ce"].item() == _approx(ce(S, Y))


# -- invariances -------------------------------------------------------------------------------------------------
SHIFT_S = torch.tensor([[3.0], [-7.0], [0.5], [12.0]])
SHIFT_T = torch.tensor([[-4.0], [9.0], [1.5], [-2.5]])


@pytest.mark.parametrize("name", ["dist", "dkd"])
def test_a_per_example_shift_of_the_logits_changes_nothing(name):
    s, t, y = _tensors()
    base = _run(name, s, t, y)
    moved = _run(name, s + SHIFT_S, t + SHIFT_T, y)
    for k in base:
        assert moved[k].item() == _approx(base[k].item()), k


def test_lskd_is_invariant_to_a_per_example_shift_and_positive_scale():
    s, t, y = _tensors()
    base = _run("lskd", s, t, y)["kd"]
    scale_s = torch.tensor([[0.5], [3.0], [10.0], [0.2]])
    scale_t = torch.tensor([[4.0], [0.3], [1.0], [25.0]])
    moved = _run("lskd", s * scale_s + SHIFT_S, t * scale_t + SHIFT_T, y)["kd"]
    assert moved.item() == _approx(base.item())
    # plain kd is not: the check above can fail
    assert abs(_run("kd", s * scale_s, t * scale_t, y)["kd"].item() - _run("kd", s, t, y)["kd"].item()) > 0.1


def test_dkd_terms_vanish_when_the_student_is_the_teacher():
    s, _, y = _tensors()
    terms = _run("dkd", s, s.clone(), y)
    assert abs(terms["dkd_tckd"].item()) < 1e-6 and abs(terms["dkd_nckd"].item()) < 1e-6


def test_nkd_terms_are_cross_entropies_whose_non_target_gradient_vanishes_at_the_teacher():
    # NKD's terms are cross-entropies, not KLs: at s = t the non-target term is γT² times the entropy of T̂
    # (not 0), and its gradient in the student logits is 0 there; the target term still pulls s_gt up
    s, _, y = _tensors()
    T, gamma = 2.0, 1.5
    s_var = s.clone().requires_grad_(True)
    terms = _run("nkd", s_var, s.clone(), y, {"T": str(T), "gamma": str(gamma)})
    entropy = 0.0
    for i, g in enumerate(Y):
        q = softmax([S[i][c] for c in range(5) if c != g], T)
        entropy -= float(np.sum(q * np.log(q)))
    assert terms["nkd_nontarget"].item() == _approx(gamma * T * T * entropy / 4)
    (grad,) = torch.autograd.grad(terms["nkd_nontarget"], s_var, retain_graph=True)
    assert grad.abs().max().item() < 1e-6
    (grad,) = torch.autograd.grad(terms["nkd_target"], s_var)
    assert grad.abs().max().item() > 1e-3


# -- DKD's ramp and numerics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (20, 1.0)])
def test_dkd_ramps_its_kd_terms_over_the_first_20_of_240_epochs(epoch, factor):
    s, t, y = _tensors()
    dkd = methods.build("dkd", {}, Shapes(num_classes=5), Shapes(num_classes=5))
    dkd.set_progress(epoch, 240)
    terms = dkd(Outputs(logits=s), Outputs(logits=t), y)
    tckd, nckd = dkd_ref(S, softmax(T_, 4.0), Y, 4.0)
    assert terms["dkd_tckd"].item() == _approx(factor * tckd)
    assert terms["dkd_nckd"].item() == _approx(factor * 8 * nckd)
    assert terms["ce"].item() == _approx(ce(S, Y))  # CE is never ramped


@pytest.mark.parametrize("T", [4.0, 1.0])
def test_dkd_is_float32_and_finite_under_bf16_with_a_very_confident_teacher(T):
    # teacher: +80 on the true class, −80 elsewhere; student: confidently wrong, and right on the last example.
    # At T = 1 the non-target probabilities (e^-160) underflow float32, so log(Σ p) would be log 0 = −inf
    y = torch.tensor([0, 2, 4])
    t = torch.full((3, 5), -80.0)
    t[torch.arange(3), y] = 80.0
    s = torch.full((3, 5), -80.0)
    s[torch.arange(3), torch.tensor([1, 3, 4])] = 80.0
    s_var = s.to(torch.bfloat16).requires_grad_(True)
    terms = _run("dkd", s_var, t.to(torch.bfloat16), y, {"T": str(T)})
    for k, v in terms.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
    tckd, nckd = dkd_ref(s.numpy(), softmax(t.numpy(), T), y.tolist(), T)
    assert terms["dkd_tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert terms["dkd_nckd"].item() == pytest.approx(8 * nckd, rel=1e-5, abs=1e-4)
    sum(terms.values()).backward()
    assert torch.isfinite(s_var.grad.float()).all() and s_var.grad.abs().sum() > 0


# -- refusals, ensembles, standardization -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dkd", "nkd"])
def test_two_classes_are_refused(name):
    with pytest.raises(ValueError, match=f"^{name} needs at least 3 classes.*mdistiller issue 60"):
        methods.build(name, {}, Shapes(num_classes=2), Shapes(num_classes=2))
    methods.build(name, {}, Shapes(num_classes=3), Shapes(num_classes=3))  # three are fine


def test_dist_distills_from_the_mean_probability_of_an_ensemble():
    s, t, y = _tensors()
    z1, z2 = t, torch.flip(t, dims=[1]) * 1.5
    terms = _run("dist", s, z1, y, members=[z1, z2])
    y_t = (softmax(z1.numpy(), 4.0) + softmax(z2.numpy(), 4.0)) / 2
    inter, intra = dist_ref(S, y_t, 4.0)
    assert terms["dist_inter"].item() == _approx(32 * inter)
    assert terms["dist_intra"].item() == _approx(32 * intra)
    # and it is not the first teacher alone
    assert abs(terms["dist_inter"].item() - _run("dist", s, z1, y)["dist_inter"].item()) > 1e-3


def test_dkd_non_target_teacher_is_the_renormalised_mixture_of_an_ensemble():
    s, t, y = _tensors()
    z1, z2 = t, torch.roll(t, 1, dims=1)
    terms = _run("dkd", s, z1, y, members=[z1, z2])
    tckd, nckd = dkd_ref(S, (softmax(z1.numpy(), 4.0) + softmax(z2.numpy(), 4.0)) / 2, Y, 4.0)
    assert terms["dkd_tckd"].item() == _approx(tckd)
    assert terms["dkd_nckd"].item() == _approx(8 * nckd)


def test_nkd_reads_an_ensemble_as_its_mixture():
    s, t, y = _tensors()
    z1, z2 = t, torch.roll(t, 2, dims=1)
    terms = _run("nkd", s, z1, y, members=[z1, z2])
    p_t = (softmax(z1.numpy()) + softmax(z2.numpy())) / 2  # at T = 1 the mixture is its own target
    expected = nkd_ref(S, np.log(p_t).tolist(), Y, 1.0, 1.5)
    assert terms["nkd_target"].item() == _approx(expected[0])
    assert terms["nkd_nontarget"].item() == _approx(expected[1])


def test_standardize_on_kd_changes_it_to_the_standardized_formula():
    s, t, y = _tensors()
    plain = _run("kd", s, t, y)["kd"].item()
    on = _run("kd", s, t, y, {"standardize": "true"})
    expected = 0.9 * kd_ref(zscore(S), softmax(zscore(T_), 4.0), 4.0)
    assert on["kd"].item() == _approx(expected)
    assert abs(on["kd"].item() - plain) > 1e-2
    assert on["ce"].item() == _approx(0.1 * ce(S, Y))


def test_standardize_on_dkd_changes_it_to_the_standardized_formula():
    s, t, y = _tensors()
    plain = _run("dkd", s, t, y)
    on = _run("dkd", s, t, y, {"standardize": "true"})
    tckd, nckd = dkd_ref(zscore(S), softmax(zscore(T_), 4.0), Y, 4.0)
    assert on["dkd_tckd"].item() == _approx(tckd)
    assert on["dkd_nckd"].item() == _approx(8 * nckd)
    assert abs(on["dkd_nckd"].item() - plain["dkd_nckd"].item()) > 1e-2
    assert on["ce"].item() == _approx(ce(S, Y))  # CE stays on the raw logits


def test_the_new_methods_are_logit_methods_that_read_the_combined_teacher():
    for name in ("dkd", "dist", "lskd", "nkd"):
        cls = methods.get(name)
        assert cls.family == "logits" and cls.teachers == "combined" and "ensemble" in cls.defaults()
        assert "warmup" not in cls.defaults()


def test_gradients_reach_the_student_only():
    s, t, y = _tensors()
    for name in ("dkd", "dist", "lskd", "nkd"):
        s_var, t_var = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        sum(_run(name, s_var, t_var, y).values()).backward()
        assert s_var.grad is not None and s_var.grad.abs().sum() > 0, name
        assert t_var.grad is None, name
