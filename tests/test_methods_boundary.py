"""Boundary methods (AB, BSS) against their formulas, on hand-made tensors and tiny real models."""

import pytest
import torch
from torch.nn import functional as F

from kdcli import methods, models
from kdcli.errors import KdcliError
from kdcli.methods import Outputs, Shapes
from kdcli.methods.boundary import ab_stage_loss

# ----------------------------------------------------------------------------- AB

def _identity_ab(margin: float = 1.0, **kw) -> methods.Method:
    shapes = Shapes(num_classes=3, features=((1, 2, 2),))
    ab = methods.build("ab", {"margin": str(margin), **kw}, shapes, shapes)
    conv, bn = ab.connectors[0]
    with torch.no_grad():
        conv.weight.fill_(1.0)
    bn.eval()  # running mean 0, var 1, weight 1, bias 0: the identity (up to BN's eps)
    bn.eps = 0.0
    return ab


def test_ab_matches_hand_computation():
    ab = _identity_ab()
    # one sample, one channel, 2×2; margin 1
    s = torch.tensor([[[[0.5, -2.0], [0.2, 3.0]]]])
    t = torch.tensor([[[[0.0, -1.0], [1.0, 2.0]]]])
    # (0,0): t ≤ 0, s = 0.5 > −1 → (0.5 + 1)² = 2.25
    # (0,1): t ≤ 0, s = −2 ≤ −1 → 0
    # (1,0): t > 0, s = 0.2 ≤ 1 → (0.2 − 1)² = 0.64
    # (1,1): t > 0, s = 3 > 1 → 0
    # one stage (weight 2^0 = 1), sum over elements / batch 1, × 3/1000
    expected = (2.25 + 0.64) * 3 / 1000
    logits = torch.zeros(1, 3)
    terms = ab.warmup(Outputs(logits=logits, preact=[s]), Outputs(logits=logits, preact=[t]), torch.tensor([0]))
    assert set(terms) == {"ab"}
    assert terms["ab"].item() == pytest.approx(expected, rel=1e-6)
    assert ab_stage_loss(s, t).item() == pytest.approx(2.25 + 0.64, rel=1e-6)


def test_ab_is_zero_beyond_the_margin_on_the_teachers_side():
    ab = _identity_ab(margin=0.5)
    t = torch.tensor([[[[-1.0, 0.0], [2.0, 0.1]]]])
    s = torch.tensor([[[[-0.6, -3.0], [0.5, 7.0]]]])  # ≤ −m where t ≤ 0; ≥ m where t > 0 (= m gives (m − m)² = 0)
    logits = torch.zeros(1, 3)
    y = torch.tensor([0])
    got = ab.warmup(Outputs(logits=logits, preact=[s]), Outputs(logits=logits, preact=[t]), y)["ab"]
    assert got.item() == pytest.approx(0.0, abs=1e-9)
    s2 = s.clone()
    s2[0, 0, 0, 0] = -0.4  # inside the margin on the inactive side: (−0.4 + 0.5)² = 0.01
    got2 = ab.warmup(Outputs(logits=logits, preact=[s2]), Outputs(logits=logits, preact=[t]), y)["ab"]
    assert got2.item() == pytest.approx(0.01 * 3 / 1000, rel=1e-5)


def test_ab_stage_weights_and_batch_mean():
    s_shapes = Shapes(num_classes=3, features=((4, 8, 8), (8, 4, 4), (16, 2, 2)))
    t_shapes = Shapes(num_classes=3, features=((6, 8, 8), (12, 4, 4), (24, 2, 2)))
    ab = methods.build("ab", {"beta": "2"}, s_shapes, t_shapes)
    assert ab.stage_weights == [0.25, 0.5, 1.0]  # deepest stage weight 1, halving towards the input
    ab.eval()
    torch.manual_seed(0)
    fs = [torch.randn(3, *c) for c in s_shapes.features]
    ft = [torch.randn(3, *c) for c in t_shapes.features]
    logits = torch.zeros(3, 3)
    got = ab.warmup(Outputs(logits=logits, preact=fs), Outputs(logits=logits, preact=ft), torch.zeros(3).long())
    stages = zip([0.25, 0.5, 1.0], ab.connectors, fs, ft, strict=True)
    by_hand = sum(w * ab_stage_loss(c(f), g) for w, c, f, g in stages)
    assert got["ab"].item() == pytest.approx(2 * 3 / 1000 * by_hand.item(), rel=1e-5)


def test_ab_warmup_and_main_terms():
    ab = _identity_ab(ce_weight="0.5")
    assert ab.warmup_epochs(240) == 30  # RepDistiller's 30 init epochs of 240
    assert ab.warmup_epochs(3) == 1
    assert methods.build("ab", {"warmup": "0"}, *(2 * [Shapes(3, ((1, 2, 2),))])).warmup_epochs(100) == 0
    logits = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    y = torch.tensor([2])
    maps = [torch.randn(1, 1, 2, 2)]
    main = ab(Outputs(logits=logits, preact=maps), Outputs(logits=logits.detach(), preact=maps), y)
    assert set(main) == {"ce"}
    assert main["ce"].item() == pytest.approx(0.5 * F.cross_entropy(logits, y).item(), rel=1e-6)
    assert ab.stages_note


def test_ab_connectors_map_channels_and_resolution():
    s_shapes = Shapes(num_classes=5, features=((8, 16, 16), (16, 8, 8)))
    t_shapes = Shapes(num_classes=5, features=((32, 8, 8), (64, 16, 16)))  # coarser, then finer, than the student
    ab = methods.build("ab", {}, s_shapes, t_shapes)
    assert [c[0].in_channels for c in ab.connectors] == [8, 16]
    assert [c[0].out_channels for c in ab.connectors] == [32, 64]
    fs = [torch.randn(2, *c, requires_grad=True) for c in s_shapes.features]
    ft = [torch.relu(torch.randn(2, *c)) for c in t_shapes.features]  # post-ReLU teacher maps
    logits = torch.zeros(2, 5)
    loss = ab.warmup(Outputs(logits=logits, preact=fs), Outputs(logits=logits, preact=ft), torch.zeros(2).long())["ab"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    assert all(p.grad is not None for p in ab.connectors.parameters())


def test_ab_rejects_missing_or_unmatched_stages():
    with pytest.raises(ValueError, match="stage"):
        methods.build("ab", {}, Shapes(3), Shapes(3))
    with pytest.raises(ValueError, match="as many"):
        methods.build("ab", {}, Shapes(3, ((4, 2, 2),)), Shapes(3, ((4, 2, 2), (8, 1, 1))))


# ----------------------------------------------------------------------------- BSS

def _tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    facts = models.DataFacts(num_classes=4, in_chans=3, image_size=8, class_names=list("abcd"))
    student = models.load("cifar_resnet8", facts).model.train()
    teacher = models.load("cifar_resnet8", facts).model.eval().requires_grad_(False)
    with torch.no_grad():  # logit margins of a trained, confident teacher rather than of a fresh one
        teacher.net.get_classifier().weight.mul_(50.0)
    return student, teacher


def _bss(student, teacher, **args):
    m = methods.build("bss", {k: str(v) for k, v in args.items()})
    m.bind(student, teacher)
    return m


def _batch(teacher, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        t_logits = teacher(images).logits
    return images, t_logits, t_logits.argmax(1)  # labels = the teacher's predictions: all are base samples


def test_bss_attack_moves_towards_the_target_and_leaves_everything_else_alone():
    student, teacher = _tiny_pair()
    bss = _bss(student, teacher, attack_fraction=1.0, target_class="second")
    images, t_logits, y = _batch(teacher)
    before = images.clone()
    with torch.no_grad():
        s_logits = student(images).logits
    idx, base, goal = bss.select(s_logits, t_logits, y)
    assert idx.tolist() == list(range(8))
    assert torch.equal(goal, t_logits.topk(2, dim=1).indices[:, 1])
    x_adv, idx2 = bss.boundary_samples(images, s_logits, t_logits, y)
    assert torch.equal(idx, idx2)
    assert torch.equal(images, before) and images.grad is None  # the batch is untouched
    assert not x_adv.requires_grad and x_adv.grad is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        z0, z1 = teacher(images).logits, teacher(x_adv).logits
    rows = torch.arange(8)
    margin0 = z0[rows, goal] - z0[rows, base]
    margin1 = z1[rows, goal] - z1[rows, base]
    assert (margin1 > margin0).all()  # every sample moved towards its target class
    assert (z1.argmax(1) != base).any()  # and some crossed the teacher's boundary


def test_bss_selects_correct_samples_with_largest_disagreement():
    bss = methods.build("bss", {"attack_fraction": "0.5", "target_class": "second"})
    t = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    s = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 0, 0])  # sample 3 is misclassified by the teacher: never a base sample
    idx, base, goal = bss.select(s, t, y)
    assert idx.tolist() == [1, 2]  # 2 of 4; sample 0 has the smallest student/teacher disagreement
    assert base.tolist() == [0, 0]
    torch.manual_seed(0)
    sampled = methods.build("bss").select(s, t, y)[2]
    assert all(c != 0 for c in sampled.tolist())  # a sampled target is never the base class


def test_bss_term_matches_hand_computation():
    student, teacher = _tiny_pair()
    bss = _bss(student, teacher)
    images, t_logits, y = _batch(teacher, n=8)
    s_out = student(images)
    torch.manual_seed(123)
    terms = bss(s_out, Outputs(logits=t_logits), y, images=images)
    assert set(terms) == {"ce", "kd", "bss"}
    torch.manual_seed(123)  # same draw of target classes
    x_adv, idx = bss.boundary_samples(images, s_out.logits, t_logits, y)
    assert idx.numel() == 2  # attack_fraction 0.25 of 8
    with torch.no_grad():
        t_adv = teacher(x_adv).logits
        s_adv = student(x_adv).logits  # train mode: batch statistics, as in forward
    T = 3.0
    p_t = torch.softmax(t_adv / T, 1)
    kl = (p_t * (torch.log_softmax(t_adv / T, 1) - torch.log_softmax(s_adv / T, 1))).sum(1).mean()
    assert terms["bss"].item() == pytest.approx(2.0 * kl.item(), rel=1e-4)  # β(0) = 2, no T² (reference)
    p_t = torch.softmax(t_logits / T, 1)
    kd = (p_t * (torch.log_softmax(t_logits / T, 1) - torch.log_softmax(s_out.logits / T, 1))).sum(1).mean()
    assert terms["kd"].item() == pytest.approx(4.0 * kd.item(), rel=1e-4)  # α(0) = 4
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s_out.logits, y).item(), rel=1e-5)


def test_bss_gradients_reach_the_student_only():
    student, teacher = _tiny_pair()
    bss = _bss(student, teacher)
    images, t_logits, y = _batch(teacher)
    torch.manual_seed(0)
    terms = bss(student(images), Outputs(logits=t_logits), y, images=images)
    student.zero_grad()
    terms["bss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert images.grad is None


def test_bss_schedules():
    bss = methods.build("bss")
    bss.set_progress(0, 100)
    assert (bss.kd_weight_now(), bss.bss_weight_now()) == (4.0, 2.0)
    bss.set_progress(50, 100)
    assert bss.kd_weight_now() == pytest.approx(2.5)
    assert bss.bss_weight_now() == pytest.approx(2.0 * (1 - 0.5 / 0.75))
    bss.set_progress(75, 100)
    assert bss.bss_weight_now() == 0.0
    bss.set_progress(99, 100)
    assert bss.bss_weight_now() == 0.0 and bss.kd_weight_now() == pytest.approx(1.03)


def test_bss_term_is_zero_after_the_schedule_ends_and_needs_no_attack():
    student, teacher = _tiny_pair()
    bss = _bss(student, teacher)
    images, t_logits, y = _batch(teacher)
    s = Outputs(logits=student(images).logits)
    bss.set_progress(0, 4)
    assert bss(s, Outputs(logits=t_logits), y, images=images)["bss"].item() > 0
    bss.set_progress(3, 4)  # progress 0.75 = bss_end
    bss._models = ()  # nothing may be run: the attack is skipped altogether
    assert bss(s, Outputs(logits=t_logits), y, images=None)["bss"].item() == 0.0


def test_bss_without_base_samples_gives_a_zero_term():
    student, teacher = _tiny_pair()
    bss = _bss(student, teacher)
    images, t_logits, y = _batch(teacher)
    wrong = (y + 1) % 4  # the teacher is wrong everywhere
    terms = bss(Outputs(logits=student(images).logits), Outputs(logits=t_logits), wrong, images=images)
    assert terms["bss"].item() == 0.0


def test_bss_needs_images_and_models():
    bss = methods.build("bss")
    logits = torch.randn(2, 4)
    with pytest.raises(KdcliError, match="bss needs"):
        bss(Outputs(logits=logits), Outputs(logits=logits), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- both

def test_registry_family_and_needs():
    assert methods.get("ab").family == methods.get("bss").family == "boundary"
    assert methods.get("ab").needs == frozenset({"logits", "preact"})
    assert methods.get("bss").needs == frozenset({"logits"})
    assert methods.get("ab").defaults() == {"margin": 1.0, "beta": 1.0, "ce_weight": 1.0, "warmup": 0.125}
    d = methods.get("bss").defaults()
    assert (d["T"], d["bss_weight"], d["steps"], d["step_size"], d["bss_end"]) == (3.0, 2.0, 10, 0.3, 0.75)


@pytest.mark.parametrize("name, args", [
    ("ab", {"margin": "-1"}),
    ("ab", {"warmup": "2"}),
    ("ab", {"beta": "x"}),
    ("ab", {"margn": "1"}),
    ("bss", {"steps": "0"}),
    ("bss", {"step_size": "0"}),
    ("bss", {"attack_fraction": "0"}),
    ("bss", {"attack_fraction": "1.5"}),
    ("bss", {"bss_end": "0"}),
    ("bss", {"T": "-3"}),
    ("bss", {"target_class": "third"}),
    ("bss", {"lambda": "2"}),
])
def test_args_are_validated(name, args):
    with pytest.raises(KdcliError, match=f"{name} (argument|has no argument)|method '{name}' has no"):
        methods.parse_args(methods.get(name), args)
