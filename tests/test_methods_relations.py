"""Relation methods (RKD, SP) and the online method (DML) against their formulas, on hand-made tensors."""

import math

import pytest
import torch
from torch.nn import functional as F

from kdcli import methods
from kdcli.errors import KdcliError
from kdcli.methods import Outputs


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


def _labels(b: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, classes, generator=g), torch.arange(b) % classes


def _rkd(es: torch.Tensor, et: torch.Tensor, **args) -> dict[str, torch.Tensor]:
    logits, y = _labels(es.shape[0])
    rkd = methods.build("rkd", {k: str(v) for k, v in args.items()})
    return rkd(Outputs(logits=logits, pooled=es), Outputs(logits=logits, pooled=et), y)


def _emb(b: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


# -- RKD --------------------------------------------------------------------------------------------

def test_rkd_terms_and_defaults():
    cls = methods.get("rkd")
    assert cls.family == "relations" and cls.needs == frozenset({"logits", "pooled"})
    assert cls.defaults() == {"distance_weight": 25.0, "angle_weight": 50.0, "ce_weight": 1.0}
    e = _emb(6, 4, 0)
    terms = _rkd(e, e.clone())
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    assert terms["rkd_distance"].abs().item() < 1e-6
    assert terms["rkd_angle"].abs().item() < 1e-6
    logits, y = _labels(6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_rkd_is_invariant_to_scale_and_translation_of_the_student():
    es, et = _emb(8, 5, 1), _emb(8, 5, 2)
    base = _rkd(es, et)
    assert base["rkd_distance"].item() > 1e-3 and base["rkd_angle"].item() > 1e-3
    shift = _emb(1, 5, 3) * 10
    for moved in (3.7 * es, es + shift, 0.2 * es - shift):
        terms = _rkd(moved, et)
        for k in ("rkd_distance", "rkd_angle"):
            assert terms[k].item() == pytest.approx(base[k].item(), rel=1e-4), k


def test_rkd_matches_hand_computation_on_three_points():
    es = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    et = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    terms = _rkd(es, et)
    # distances of the pairs (01, 02, 12), each divided by the mean over the three distinct pairs
    ds, dt = [1.0, 1.0, math.sqrt(2)], [2.0, 1.0, math.sqrt(5)]
    ms, mt = sum(ds) / 3, sum(dt) / 3
    dist = sum(_huber(a / ms - b / mt) for a, b in zip(ds, dt, strict=True)) / 3
    assert terms["rkd_distance"].item() == pytest.approx(25 * dist, rel=1e-5)
    # cosines at apex 0, 1, 2 (each ordered triplet twice: the mean over the six equals that over three)
    cs = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    ct = [0.0, 4 / (2 * math.sqrt(5)), 1 / math.sqrt(5)]
    angle = sum(_huber(a - b) for a, b in zip(cs, ct, strict=True)) / 3
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-5)


def test_rkd_takes_different_widths_and_weights():
    es, et = _emb(5, 3, 4), _emb(5, 11, 5)
    base = _rkd(es, et)
    scaled = _rkd(es, et, distance_weight=1, angle_weight=0, ce_weight=0)
    assert scaled["rkd_distance"].item() == pytest.approx(base["rkd_distance"].item() / 25, rel=1e-6)
    assert scaled["rkd_angle"].item() == 0.0 and scaled["ce"].item() == 0.0


def test_rkd_gradient_reaches_the_student_embedding_only():
    es = _emb(6, 4, 6).requires_grad_(True)
    et = _emb(6, 7, 7).requires_grad_(True)
    terms = _rkd(es, et)
    (terms["rkd_distance"] + terms["rkd_angle"]).backward()
    assert es.grad is not None and torch.isfinite(es.grad).all() and es.grad.abs().sum() > 0
    assert et.grad is None  # the teacher's relations are computed without grad


def test_rkd_survives_duplicates_and_tiny_batches():
    es = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    terms = _rkd(es, _emb(4, 3, 8))
    sum(terms.values()).backward()
    assert torch.isfinite(es.grad).all()
    one = _rkd(_emb(1, 3, 9), _emb(1, 3, 10))
    assert one["rkd_distance"].item() == 0.0 and one["rkd_angle"].item() == 0.0


# -- SP ---------------------------------------------------------------------------------------------

def _sp(fs: torch.Tensor, ft: torch.Tensor, **args) -> dict[str, torch.Tensor]:
    logits, y = _labels(fs.shape[0])
    sp = methods.build("sp", {k: str(v) for k, v in args.items()})
    shallow = torch.zeros(fs.shape[0], 1, 1, 1)  # only the last stage map counts
    return sp(Outputs(logits=logits, features=[shallow, fs]), Outputs(logits=logits, features=[shallow + 1, ft]), y)


def _maps(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_sp_zero_for_identical_features_and_defaults():
    cls = methods.get("sp")
    assert cls.family == "relations" and cls.needs == frozenset({"logits", "features"})
    assert cls.defaults() == {"gamma": 3000.0, "ce_weight": 1.0}
    f = _maps((4, 3, 2, 2), 0)
    terms = _sp(f, f.clone())
    assert set(terms) == {"ce", "sp"}
    assert terms["sp"].abs().item() < 1e-6


def test_sp_is_invariant_to_a_positive_scale_of_the_student():
    fs, ft = _maps((5, 3, 2, 2), 1), _maps((5, 3, 2, 2), 2)
    base = _sp(fs, ft)["sp"].item()
    assert base > 1e-3
    assert _sp(42.0 * fs, ft)["sp"].item() == pytest.approx(base, rel=1e-5)


def test_sp_matches_hand_computation():
    # B = 3, maps of shape (1, 1, 2): Q is the 3 × 2 matrix of the flattened maps
    qs = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
    qt = [[2.0, 1.0], [0.0, 1.0], [1.0, 1.0]]

    def g(q):
        rows = [[sum(a * b for a, b in zip(qi, qj, strict=True)) for qj in q] for qi in q]
        return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]

    gs, gt = g(qs), g(qt)
    fro2 = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(3) for j in range(3))
    terms = _sp(torch.tensor(qs).view(3, 1, 1, 2), torch.tensor(qt).view(3, 1, 1, 2), gamma=1)
    assert terms["sp"].item() == pytest.approx(fro2 / 9, rel=1e-5)
    assert _sp(torch.tensor(qs).view(3, 1, 1, 2), torch.tensor(qt).view(3, 1, 1, 2))["sp"].item() == pytest.approx(
        3000 * fro2 / 9, rel=1e-5)


def test_sp_takes_different_shapes_and_moves_the_student_only():
    fs = _maps((4, 3, 2, 2), 3).requires_grad_(True)
    ft = _maps((4, 5, 1, 3), 4).requires_grad_(True)
    terms = _sp(fs, ft)
    assert terms["sp"].item() > 0
    terms["sp"].backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None


# -- DML --------------------------------------------------------------------------------------------

def _kl(p_logits, q_logits, T):
    """KL(softmax(p/T) ‖ softmax(q/T)) averaged over rows, written out."""
    total = 0.0
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist(), strict=True):
        p = [math.exp(v / T) for v in p_row]
        q = [math.exp(v / T) for v in q_row]
        zp, zq = sum(p), sum(q)
        total += sum((a / zp) * math.log((a / zp) / (b / zq)) for a, b in zip(p, q, strict=True))
    return total / len(p_logits)


def _dml_inputs():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 3.0, 0.5]])
    return s, t, torch.tensor([0, 2])


def test_dml_declares_online_and_defaults():
    cls = methods.get("dml")
    assert cls.family == "online" and cls.online and cls.needs == frozenset({"logits"})
    assert cls.defaults() == {"T": 1.0, "kl_weight": 1.0, "ce_weight": 1.0}
    assert all(not methods.get(n).online for n in ("rkd", "sp", "kd"))


@pytest.mark.parametrize("T, lam", [(1.0, 1.0), (3.0, 0.5)])
def test_dml_terms_are_the_two_directed_kls(T, lam):
    s, t, y = _dml_inputs()
    terms = methods.build("dml", {"T": str(T), "kl_weight": str(lam)})(Outputs(logits=s), Outputs(logits=t), y)
    assert set(terms) == {"ce", "kl", "peer_ce", "peer_kl"}
    assert terms["kl"].item() == pytest.approx(lam * T * T * _kl(t, s, T), rel=1e-5)
    assert terms["peer_kl"].item() == pytest.approx(lam * T * T * _kl(s, t, T), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms["peer_ce"].item() == pytest.approx(F.cross_entropy(t, y).item(), rel=1e-6)


def test_dml_each_network_is_moved_by_its_own_terms_only():
    s0, t0, y = _dml_inputs()
    dml = methods.build("dml")

    def run(keys):
        s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        terms = dml(Outputs(logits=s), Outputs(logits=t), y)
        sum(terms[k] for k in keys).backward()
        return s.grad, t.grad

    gs, gt = run(("ce", "kl"))
    assert gs.abs().sum() > 0 and gt is None
    gs, gt = run(("peer_ce", "peer_kl"))
    assert gs is None and gt.abs().sum() > 0
    # the KL alone also moves only its own network, and differs from CE's gradient
    gs_kl, gt_kl = run(("kl",))
    assert gt_kl is None and gs_kl.abs().sum() > 0
    # summing everything (as the loop does) gives each network exactly its own gradient
    gs_all, gt_all = run(("ce", "kl", "peer_ce", "peer_kl"))
    gs_own, _ = run(("ce", "kl"))
    _, gt_own = run(("peer_ce", "peer_kl"))
    assert torch.allclose(gs_all, gs_own) and torch.allclose(gt_all, gt_own)


# -- all --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args, match", [
    ("rkd", {"distance_weight": "-1"}, "bad value for rkd argument 'distance_weight'"),
    ("rkd", {"angle_weight": "-0.5"}, "bad value for rkd argument 'angle_weight'"),
    ("rkd", {"w_d": "25"}, "has no argument 'w_d'; valid arguments: distance_weight=25.0"),
    ("sp", {"gamma": "-3000"}, "bad value for sp argument 'gamma'"),
    ("sp", {"ce_weight": "lots"}, "bad value for sp argument 'ce_weight'"),
    ("dml", {"T": "0"}, "bad value for dml argument 'T'"),
    ("dml", {"kl_weight": "-1"}, "bad value for dml argument 'kl_weight'"),
    ("dml", {"lambda": "1"}, "has no argument 'lambda'"),
])
def test_args_are_validated(name, args, match):
    with pytest.raises(KdcliError, match=match):
        methods.build(name, args)


def test_registered_with_their_families():
    assert {n: methods.get(n).family for n in ("rkd", "sp", "dml")} == {
        "rkd": "relations", "sp": "relations", "dml": "online"}
