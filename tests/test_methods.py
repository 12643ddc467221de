"""Methods against their formulas, on hand-made tensors; the registry and argument validation."""

import math

import pytest
import torch
from torch.nn import functional as F

from kdcli import methods
from kdcli.errors import KdcliError
from kdcli.methods import Outputs


def _logits():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 3.0, 0.5]])
    y = torch.tensor([0, 2])
    return s, t, y


def test_registry_lists_and_finds():
    assert {"ce", "kd"} <= set(methods.available())
    assert methods.get("kd").family == "logits"
    with pytest.raises(KdcliError, match="available methods: .*kd"):
        methods.get("nope")


def test_ce_is_cross_entropy():
    s, _, y = _logits()
    terms = methods.build("ce")(Outputs(logits=s), None, y)
    assert set(terms) == {"ce"}
    by_hand = -(torch.log_softmax(s, 1)[torch.arange(2), y]).mean()
    assert torch.allclose(terms["ce"], by_hand)


def test_kd_matches_closed_form():
    s, t, y = _logits()
    T = 4.0
    terms = methods.build("kd")(Outputs(logits=s), Outputs(logits=t), y)
    # KL(p_t || p_s) written out element by element, batch mean, times T², weighted 0.9; CE weighted 0.1
    kl = 0.0
    for i in range(2):
        p_t = [math.exp(v / T) for v in t[i].tolist()]
        p_s = [math.exp(v / T) for v in s[i].tolist()]
        zt, zs = sum(p_t), sum(p_s)
        kl += sum((a / zt) * math.log((a / zt) / (b / zs)) for a, b in zip(p_t, p_s, strict=True))
    kl /= 2
    assert terms["kd"].item() == pytest.approx(0.9 * T * T * kl, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-6)


def test_kd_is_zero_for_identical_logits_and_respects_args():
    s, _, y = _logits()
    kd = methods.build("kd", {"T": "2", "kd_weight": "1", "ce_weight": "0"})
    terms = kd(Outputs(logits=s), Outputs(logits=s.clone()), y)
    assert terms["kd"].abs().item() < 1e-6
    assert terms["ce"].item() == 0.0
    assert kd.args.T == 2.0


def test_kd_gradient_flows_to_student_only():
    s, t, y = _logits()
    s = s.clone().requires_grad_(True)
    sum(methods.build("kd")(Outputs(logits=s), Outputs(logits=t), y).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("args, match", [
    ({"temperature": "3"}, "has no argument 'temperature'; valid arguments: T=4.0"),
    ({"T": "hot"}, "bad value for kd argument 'T'"),
    ({"T": "-1"}, "bad value for kd argument 'T'"),
])
def test_method_args_are_validated(args, match):
    with pytest.raises(KdcliError, match=match):
        methods.build("kd", args)


def test_composition_sums_terms_and_keeps_one_ce():
    s, t, y = _logits()
    combo = methods.build("kd+ce", {"kd.T": "2", "ce.label_smoothing": "0.1"})
    assert combo.name == "kd+ce" and combo.family == "logits+baseline"
    terms = combo(Outputs(logits=s), Outputs(logits=t), y)
    alone = methods.build("kd", {"T": "2"})(Outputs(logits=s), Outputs(logits=t), y)
    assert set(terms) == {"ce", "kd"}
    assert torch.equal(terms["ce"], alone["ce"])  # the first part's CE (weight 0.1), not ce's own
    assert torch.equal(terms["kd"], alone["kd"])
    spec = methods.spec("kd+ce", {"kd.T": "2"})
    assert spec.resolved_args() == {"kd": {"T": 2.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False,
                                           "ensemble": "mean"},
                                    "ce": {"label_smoothing": 0.0}}
    assert spec.uses_teacher and spec.needs == frozenset({"logits"})


@pytest.mark.parametrize("name, args, match", [
    ("kd+ce", {"T": "2"}, "name the method too, e.g. ce.T=VALUE"),
    ("kd+ce", {"at.beta": "2"}, "name the method too"),
    ("kd+ce", {"kd.tau": "2"}, "method 'kd' has no argument 'tau'"),
    ("kd+kd", {}, "distinct names"),
    ("kd+", {}, "distinct names"),
    ("kd+nope", {}, "unknown method 'nope'"),
])
def test_composition_arguments_are_namespaced_and_validated(name, args, match):
    with pytest.raises(KdcliError, match=match):
        methods.spec(name, args)
