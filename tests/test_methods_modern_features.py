"""PKT, CC (relations) and NST, VID (features) against their formulas, on small hand-made tensors.

Every expected value is computed here in float64 with numpy and explicit loops, never by the implementation.
"""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kdcli import methods
from kdcli.errors import KdcliError
from kdcli.methods import Outputs, Shapes, build

CLASSES = 3
EPS_PKT = 1e-7


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _logits(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rand(99, b, CLASSES), torch.arange(b) % CLASSES


def _pooled_outputs(e: torch.Tensor) -> Outputs:
    return Outputs(logits=_logits(e.shape[0])[0], pooled=e)


def _map_outputs(maps: list[torch.Tensor]) -> Outputs:
    return Outputs(logits=_logits(maps[0].shape[0])[0], features=maps)


def _avg_pool_np(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average-pool (B, C, H, W) to ``size`` when H, W are multiples of it (block means)."""
    b, c, h, w = x.shape
    kh, kw = h // size[0], w // size[1]
    return x.reshape(b, c, size[0], kh, size[1], kw).mean(axis=(3, 5))


# ------------------------------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name, family, needs, defaults", [
    ("pkt", "relations", {"logits", "pooled"}, {"beta": 30000.0, "ce_weight": 1.0}),
    ("cc", "relations", {"logits", "pooled"}, {"beta": 0.02, "dim": 128, "ce_weight": 1.0}),
    ("nst", "features", {"logits", "features"}, {"beta": 50.0, "ce_weight": 1.0}),
    ("vid", "features", {"logits", "features"}, {"beta": 1.0, "init_var": 5.0, "eps": 1e-5, "ce_weight": 1.0}),
])
def test_registry_entries(name, family, needs, defaults):
    cls = methods.get(name)
    assert cls.family == family and cls.needs == frozenset(needs) and cls.teachers == "one"
    assert cls.defaults() == defaults
    with pytest.raises(KdcliError, match=f"bad value for {name} argument 'beta'"):
        methods.spec(name, {"beta": "-1"})


def test_trainable_modules_join_the_method_parameters():
    s_pool, t_pool = Shapes(CLASSES, pooled=6), Shapes(CLASSES, pooled=10)
    s_maps, t_maps = Shapes(CLASSES, ((4, 4, 4), (8, 2, 2))), Shapes(CLASSES, ((6, 4, 4), (12, 2, 2)))
    assert list(build("pkt").parameters()) == []
    assert list(build("nst", {}, s_maps, t_maps).parameters()) == []
    cc = build("cc", {}, s_pool, t_pool)
    shapes = sorted(tuple(p.shape) for p in cc.parameters())
    assert shapes == sorted([(128, 6), (128,), (128, 10), (128,)])
    vid = build("vid", {}, s_maps, t_maps)
    params = {id(p) for p in vid.parameters()}
    for r, c_s, c_t in zip(vid.regressors, (4, 8), (6, 12), strict=True):
        assert id(r.alpha) in params and r.alpha.shape == (c_t,)
        convs = [m for m in r.regressor if isinstance(m, torch.nn.Conv2d)]
        assert [tuple(c.weight.shape[:2]) for c in convs] == [(c_t, c_s), (c_t, c_t), (c_t, c_t)]
        assert all(id(c.weight) in params for c in convs)


def test_methods_refuse_models_without_the_outputs_they_need():
    with pytest.raises(ValueError, match="cc needs the pooled embedding widths"):
        build("cc", {}, Shapes(CLASSES, pooled=4), Shapes(CLASSES))
    for name in ("nst", "vid"):
        with pytest.raises(ValueError, match=f"{name} needs"):
            build(name, {}, Shapes(CLASSES, ((4, 2, 2),)), Shapes(CLASSES))
        with pytest.raises(ValueError, match="as many student as teacher stages"):
            build(name, {}, Shapes(CLASSES, ((4, 2, 2),)), Shapes(CLASSES, ((4, 2, 2), (4, 2, 2))))


# ------------------------------------------------------------------------------------------------- PKT


def _pkt_np(es: np.ndarray, et: np.ndarray) -> float:
    def probs(e):
        b = e.shape[0]
        u = np.zeros_like(e)
        for i in range(b):
            u[i] = e[i] / (math.sqrt(sum(x * x for x in e[i])) + EPS_PKT)
        k = np.array([[(float(np.dot(u[i], u[j])) + 1.0) / 2.0 for j in range(b)] for i in range(b)])
        return np.array([k[i] / k[i].sum() for i in range(b)])

    ps, pt = probs(es), probs(et)
    b = es.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            total += pt[i, j] * math.log((pt[i, j] + EPS_PKT) / (ps[i, j] + EPS_PKT))
    return total / (b * b)


def test_pkt_matches_the_formula():
    es, et = _rand(1, 4, 3), _rand(2, 4, 5)  # widths may differ
    logits, y = _logits(4)
    terms = build("pkt")(_pooled_outputs(es), _pooled_outputs(et), y)
    assert set(terms) == {"ce", "pkt"}
    expected = _pkt_np(es.double().numpy(), et.double().numpy())
    assert expected > 1e-4  # a case where the loss is far from 0
    assert terms["pkt"].item() == pytest.approx(30000.0 * expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    unit = build("pkt", {"beta": "1"})(_pooled_outputs(es), _pooled_outputs(et), y)["pkt"]
    assert unit.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_pkt_zero_row_is_uniform_and_has_finite_gradients():
    es = _rand(3, 5, 4)
    es[2] = 0.0
    es.requires_grad_(True)
    et = _rand(4, 5, 6)
    _, y = _logits(5)
    terms = build("pkt", {"beta": "1"})(_pooled_outputs(es), _pooled_outputs(et), y)
    assert terms["pkt"].item() == pytest.approx(_pkt_np(es.detach().double().numpy(), et.double().numpy()),
                                                rel=1e-5, abs=1e-9)
    terms["pkt"].backward()
    assert torch.isfinite(es.grad).all() and es.grad.abs().sum() > 0


def test_pkt_is_zero_for_identical_embeddings_and_invariant_to_row_scale():
    e = _rand(5, 5, 4)
    _, y = _logits(5)
    pkt = build("pkt")
    assert pkt(_pooled_outputs(e), _pooled_outputs(e.clone()), y)["pkt"].abs().item() < 1e-6
    es, et = _rand(6, 5, 4), _rand(7, 5, 8)
    base = pkt(_pooled_outputs(es), _pooled_outputs(et), y)["pkt"].item()
    assert base > 1.0
    scale = torch.tensor([[0.5], [3.0], [10.0], [0.1], [7.0]])
    moved = pkt(_pooled_outputs(es * scale), _pooled_outputs(et * scale.flip(0)), y)["pkt"].item()
    assert moved == pytest.approx(base, rel=1e-5)


# ------------------------------------------------------------------------------------------------- CC


def test_cc_matches_the_formula_with_hand_set_embeddings():
    b, d_s, d_t, dim = 5, 3, 4, 2
    cc = build("cc", {"dim": str(dim)}, Shapes(CLASSES, pooled=d_s), Shapes(CLASSES, pooled=d_t))
    w_s = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    b_s = np.array([0.1, -0.2])
    w_t = np.array([[1.0, 0.0, -1.0, 0.5], [-0.3, 2.0, 0.7, 0.0]])
    b_t = np.array([0.0, 0.4])
    with torch.no_grad():
        cc.embed_s.weight.copy_(torch.tensor(w_s))
        cc.embed_s.bias.copy_(torch.tensor(b_s))
        cc.embed_t.weight.copy_(torch.tensor(w_t))
        cc.embed_t.bias.copy_(torch.tensor(b_t))
    fs = _rand(10, b, d_s).requires_grad_(True)
    ft = _rand(11, b, d_t)
    _, y = _logits(b)
    terms = cc(_pooled_outputs(fs), _pooled_outputs(ft), y)
    assert set(terms) == {"ce", "cc"}

    fs_np, ft_np = fs.detach().double().numpy(), ft.double().numpy()
    e_s = [[sum(w_s[k, d] * fs_np[i, d] for d in range(d_s)) + b_s[k] for k in range(dim)] for i in range(b)]
    e_t = [[sum(w_t[k, d] * ft_np[i, d] for d in range(d_t)) + b_t[k] for k in range(dim)] for i in range(b)]
    delta = [[abs(e_s[i][k] - e_t[i][k]) for k in range(dim)] for i in range(b)]
    expected = sum(sum(delta[i][k] * delta[i + 1][k] for k in range(dim)) for i in range(b - 1)) / (b - 1)
    assert terms["cc"].item() == pytest.approx(0.02 * expected, rel=1e-5)

    terms["cc"].backward()  # both embeddings train (RepDistiller's trainable embed_s and embed_t); so does the student
    assert fs.grad.abs().sum() > 0
    assert cc.embed_s.weight.grad.abs().sum() > 0 and cc.embed_t.weight.grad.abs().sum() > 0


def test_cc_with_one_example_is_zero():
    cc = build("cc", {}, Shapes(CLASSES, pooled=3), Shapes(CLASSES, pooled=4))
    _, y = _logits(1)
    assert cc(_pooled_outputs(_rand(1, 1, 3)), _pooled_outputs(_rand(2, 1, 4)), y)["cc"].item() == 0.0


# ------------------------------------------------------------------------------------------------- NST


def _nst_np(fs: np.ndarray, ft: np.ndarray) -> float:
    """Squared MMD with k(a, b) = (a·b)² over L2-normalised channel vectors, by explicit loops."""
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    fs, ft = _avg_pool_np(fs, size), _avg_pool_np(ft, size)

    def channels(f):
        b, c = f.shape[:2]
        out = []
        for i in range(b):
            rows = []
            for j in range(c):
                v = f[i, j].reshape(-1)
                rows.append(v / max(math.sqrt(float(np.dot(v, v))), 1e-12))
            out.append(rows)
        return out

    cs, ct = channels(fs), channels(ft)

    def mean_k(a, b):
        vals = [float(np.dot(x, y)) ** 2 for i in range(len(a)) for x in a[i] for y in b[i]]
        return sum(vals) / len(vals)

    return mean_k(ct, ct) + mean_k(cs, cs) - 2 * mean_k(cs, ct)


def test_nst_matches_the_formula_with_different_channels_and_grids():
    s_shapes = ((2, 4, 4), (3, 2, 2))
    t_shapes = ((3, 2, 2), (5, 4, 4))  # stage 0: the student is pooled; stage 1: the teacher is
    nst = build("nst", {}, Shapes(CLASSES, s_shapes), Shapes(CLASSES, t_shapes))
    b = 3
    fs = [_rand(20 + i, b, *c).requires_grad_(True) for i, c in enumerate(s_shapes)]
    ft = [_rand(30 + i, b, *c) for i, c in enumerate(t_shapes)]
    _, y = _logits(b)
    terms = nst(_map_outputs(fs), _map_outputs(ft), y)
    assert set(terms) == {"ce", "nst"}
    per_stage = [_nst_np(a.detach().double().numpy(), c.double().numpy()) for a, c in zip(fs, ft, strict=True)]
    assert all(v > 1e-3 for v in per_stage)
    assert terms["nst"].item() == pytest.approx(50.0 * sum(per_stage), rel=1e-5)
    terms["nst"].backward()
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in fs)


def test_nst_is_zero_for_identical_maps_and_invariant_to_channel_scale():
    shapes = ((4, 3, 3), (6, 2, 2))
    nst = build("nst", {}, Shapes(CLASSES, shapes), Shapes(CLASSES, shapes))
    f = [_rand(40 + i, 4, *c) for i, c in enumerate(shapes)]
    _, y = _logits(4)
    assert nst(_map_outputs(f), _map_outputs([x.clone() for x in f]), y)["nst"].abs().item() < 1e-6
    g = [_rand(50 + i, 4, *c) for i, c in enumerate(shapes)]
    base = nst(_map_outputs(g), _map_outputs(f), y)["nst"].item()
    assert base > 1e-2
    scaled = [x * torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(60))[..., None, None].add(0.5)
              for x in g]  # a positive scale per (example, channel): the channel's direction is what counts
    assert nst(_map_outputs(scaled), _map_outputs(f), y)["nst"].item() == pytest.approx(base, rel=1e-5)


# ------------------------------------------------------------------------------------------------- VID


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _vid_np(fs: np.ndarray, ft: np.ndarray, weights: list[np.ndarray], var: np.ndarray) -> float:
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    fs, ft = _avg_pool_np(fs, size), _avg_pool_np(ft, size)
    w1, w2, w3 = weights
    b, _, h, w = fs.shape
    total, count = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                mu = w3 @ _relu(w2 @ _relu(w1 @ fs[i, :, y, x]))  # 1×1 convs: per-position matrix products
                for c in range(ft.shape[1]):
                    total += 0.5 * ((mu[c] - ft[i, c, y, x]) ** 2 / var[c] + math.log(var[c]))
                    count += 1
    return total / count


def _conv_weights(r) -> list[np.ndarray]:
    return [m.weight.detach().double().numpy()[:, :, 0, 0] for m in r.regressor if isinstance(m, torch.nn.Conv2d)]


def test_vid_starts_with_variance_5_and_matches_the_formula():
    s_shapes, t_shapes = ((4, 4, 4), (3, 2, 2)), ((3, 2, 2), (5, 2, 2))
    torch.manual_seed(0)
    vid = build("vid", {}, Shapes(CLASSES, s_shapes), Shapes(CLASSES, t_shapes))
    for r, c in zip(vid.regressors, t_shapes, strict=True):
        expected_alpha = math.log(math.exp(5.0 - 1e-5) - 1.0)
        assert r.alpha.detach().numpy() == pytest.approx([expected_alpha] * c[0], abs=1e-6)
        assert r.variance().detach().numpy() == pytest.approx([5.0] * c[0], abs=1e-6)
    b = 3
    fs = [_rand(70 + i, b, *c).requires_grad_(True) for i, c in enumerate(s_shapes)]
    ft = [_rand(80 + i, b, *c) for i, c in enumerate(t_shapes)]
    _, y = _logits(b)
    terms = vid(_map_outputs(fs), _map_outputs(ft), y)
    assert set(terms) == {"ce", "vid"}
    expected = sum(_vid_np(a.detach().double().numpy(), t.double().numpy(), _conv_weights(r),
                           np.full(t.shape[1], 5.0))
                   for a, t, r in zip(fs, ft, vid.regressors, strict=True))
    assert terms["vid"].item() == pytest.approx(expected, rel=1e-5)
    terms["vid"].backward()
    assert all(f.grad.abs().sum() > 0 for f in fs)
    assert all(r.alpha.grad is not None and r.alpha.grad.abs().sum() > 0 for r in vid.regressors)


def test_vid_with_hand_set_variances_and_a_negative_loss():
    shapes = ((2, 2, 2),)
    t_shapes = ((3, 2, 2),)
    vid = build("vid", {"beta": "2"}, Shapes(CLASSES, shapes), Shapes(CLASSES, t_shapes))
    r = vid.regressors[0]
    alpha = np.array([-1.0, 0.5, 2.0])
    with torch.no_grad():
        r.alpha.copy_(torch.tensor(alpha))
    var = np.log1p(np.exp(alpha)) + 1e-5
    fs, ft = _rand(90, 4, *shapes[0]), _rand(91, 4, *t_shapes[0])
    _, y = _logits(4)
    got = vid(_map_outputs([fs]), _map_outputs([ft]), y)["vid"].item()
    expected = _vid_np(fs.double().numpy(), ft.double().numpy(), _conv_weights(r), var)
    assert got == pytest.approx(2.0 * expected, rel=1e-5)

    # a perfect mean (zero regressor, zero teacher) and a small variance: the loss is ½ log σ² < 0
    with torch.no_grad():
        r.alpha.fill_(-5.0)
        for p in r.regressor.parameters():
            p.zero_()
    got = vid(_map_outputs([fs]), _map_outputs([torch.zeros_like(ft)]), y)["vid"].item()
    assert got == pytest.approx(2.0 * 0.5 * math.log(math.log1p(math.exp(-5.0)) + 1e-5), rel=1e-5)
    assert got < 0
