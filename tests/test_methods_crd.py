"""CRD against its formula on hand-made tensors; its memory, negatives and resume state; two processes agree."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from kdcli import methods
from kdcli.engine.syncs import SyncCounter
from kdcli.errors import KdcliError
from kdcli.methods import Outputs, Shapes, contrastive
from kdcli.methods.contrastive import nce_loss
from kdcli.models import checkpoint as ckpt
from tests.test_cli import kdcli

# 12 rows: classes 0, 1, 2 (unbalanced) and two rows not trained on
LABELS = torch.tensor([0, 1, 2, 0, 1, -1, 2, 0, 0, 1, -1, 2])
N_TRAIN = 10
DS, DT, DIM = 5, 6, 4


def _crd(**args) -> methods.Method:
    m = methods.build("crd", {"dim": str(DIM), **{k: str(v) for k, v in args.items()}},
                      Shapes(3, pooled=DS), Shapes(3, pooled=DT))
    m.attach_data(LABELS)
    return m


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _batch(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DS, generator=g), torch.randn(b, DT, generator=g), torch.randn(b, 3, generator=g)


def _call(m, fs, ft, logits, index):
    y = LABELS[index]
    return m(Outputs(logits=logits, pooled=fs), Outputs(logits=logits.flip(0), pooled=ft), y, index=index)


def _fix_negatives(m, neg: torch.Tensor) -> None:
    m.sample_negatives = lambda index: neg  # the draws are tested on their own below


def _np_embed(linear: torch.nn.Linear, f: torch.Tensor) -> np.ndarray:
    w, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    e = f.double().numpy() @ w.T + b
    return e / np.sqrt((e * e).sum(axis=1, keepdims=True))


def _np_nce(scores: list[list[float]], n: int) -> float:
    """−(1/B) Σ_b [log(P0/(P0 + m + ε)) + Σ_j log(m/(Pj + m + ε))], m = K/n, written out term by term."""
    total = 0.0
    for row in scores:
        m = (len(row) - 1) / n
        total += math.log(row[0] / (row[0] + m + 1e-7))
        for p in row[1:]:
            total += math.log(m / (p + m + 1e-7))
    return -total / len(scores)


@pytest.fixture(params=["dense", "gathered"])
def scoring(request, monkeypatch):
    """Both ways of scoring: against the whole memory, or gathering the rows a chunk at a time."""
    monkeypatch.setattr(contrastive, "_dense", lambda memory, idx: request.param == "dense")
    monkeypatch.setattr(contrastive, "_CHUNK", 2 * DIM * 3)  # two columns of a batch of 3 at a time
    return request.param


# -- the loss against its formula ---------------------------------------------------------------------

def test_crd_declares_its_needs_and_defaults():
    cls = methods.get("crd")
    assert cls.family == "relations" and cls.teachers == "one" and cls.uses_teacher
    assert cls.needs == frozenset({"logits", "pooled", "index"})
    assert cls.defaults() == {"beta": 0.8, "negatives": 16384, "T": 0.07, "momentum": 0.5, "dim": 128,
                              "ce_weight": 1.0}
    with pytest.raises(ValueError, match="pooled"):
        methods.build("crd", {}, Shapes(3, pooled=None), Shapes(3, pooled=8))
    combo = methods.build("kd+crd", {}, Shapes(3, pooled=DS), Shapes(3, pooled=DT))
    combo.attach_data(LABELS)  # a composition hands the labels on
    assert combo.parts[1].memory_s.shape == (12, 128)


def test_nce_loss_by_hand():
    p = torch.tensor([[0.5, 0.1, 0.2], [0.05, 0.3, 0.01]])
    m = 2 / 4  # K = 2 negatives, N = 4 rows
    e = 1e-7
    want = -(math.log(0.5 / (0.5 + m + e)) + math.log(m / (0.1 + m + e)) + math.log(m / (0.2 + m + e))
             + math.log(0.05 / (0.05 + m + e)) + math.log(m / (0.3 + m + e)) + math.log(m / (0.01 + m + e))) / 2
    assert nce_loss(p, 4).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_crd_matches_the_formula_with_a_memory_and_z_set_by_hand(T, scoring):
    m = _crd(negatives=4, T=T, beta=0.8)
    m_s, m_t = _unit_rows(12, DIM, 1), _unit_rows(12, DIM, 2)
    m.memory_s.copy_(m_s)
    m.memory_t.copy_(m_t)
    m.z.copy_(torch.tensor([3.5, 7.25]))
    index = torch.tensor([0, 4, 6])  # classes 0, 1, 2
    neg = torch.tensor([[1, 2, 9, 2], [0, 6, 11, 7], [3, 4, 1, 8]])  # other classes; repeats allowed
    _fix_negatives(m, neg)
    fs, ft, logits = _batch()
    terms = _call(m, fs, ft, logits, index)

    es, et = _np_embed(m.embed_s, fs), _np_embed(m.embed_t, ft)
    ms, mt = m_s.double().numpy(), m_t.double().numpy()
    cols = [[int(index[b])] + neg[b].tolist() for b in range(3)]
    p_s = [[math.exp(float(mt[j] @ es[b]) / T) / 3.5 for j in cols[b]] for b in range(3)]
    p_t = [[math.exp(float(ms[j] @ et[b]) / T) / 7.25 for j in cols[b]] for b in range(3)]
    want = 0.8 * (_np_nce(p_s, N_TRAIN) + _np_nce(p_t, N_TRAIN))
    assert terms["crd"].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    ce = F.cross_entropy(logits, LABELS[index]).item()
    assert set(terms) == {"ce", "crd"} and terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert m.z.tolist() == [3.5, 7.25]  # a Z already set is kept


def test_z_is_set_once_from_the_first_batch():
    m = _crd(negatives=3, T=0.2)
    m_s, m_t = _unit_rows(12, DIM, 3), _unit_rows(12, DIM, 4)
    m.memory_s.copy_(m_s)
    m.memory_t.copy_(m_t)
    index = torch.tensor([1, 3])
    neg = torch.tensor([[0, 2, 11], [9, 9, 6]])
    _fix_negatives(m, neg)
    fs, ft, logits = _batch(5, b=2)
    assert m.z.tolist() == [-1.0, -1.0]
    _call(m, fs, ft, logits, index)
    es, et = _np_embed(m.embed_s, fs), _np_embed(m.embed_t, ft)
    exp_s = [math.exp(float(m_t[j].double().numpy() @ es[b]) / 0.2) for b in range(2)
             for j in [int(index[b])] + neg[b].tolist()]
    exp_t = [math.exp(float(m_s[j].double().numpy() @ et[b]) / 0.2) for b in range(2)
             for j in [int(index[b])] + neg[b].tolist()]
    z = [sum(exp_s) / len(exp_s) * N_TRAIN, sum(exp_t) / len(exp_t) * N_TRAIN]
    assert m.z.tolist() == pytest.approx(z, rel=1e-5)
    _call(m, *_batch(6, b=2), torch.tensor([7, 9]))
    assert m.z.tolist() == pytest.approx(z, rel=1e-5)  # never set again


def test_crd_is_symmetric_in_student_and_teacher():
    """Swapping the two models (embeddings, memories, Z) swaps the two anchors' terms: the sum is the same."""
    a = methods.build("crd", {"dim": "4", "negatives": "5"}, Shapes(3, pooled=DS), Shapes(3, pooled=DS))
    b = methods.build("crd", {"dim": "4", "negatives": "5"}, Shapes(3, pooled=DS), Shapes(3, pooled=DS))
    for m in (a, b):
        m.attach_data(LABELS)
    b.embed_s.load_state_dict(a.embed_t.state_dict())
    b.embed_t.load_state_dict(a.embed_s.state_dict())
    a.memory_s.copy_(_unit_rows(12, 4, 7))
    a.memory_t.copy_(_unit_rows(12, 4, 8))
    b.memory_s.copy_(a.memory_t)
    b.memory_t.copy_(a.memory_s)
    a.z.copy_(torch.tensor([2.0, 5.0]))
    b.z.copy_(torch.tensor([5.0, 2.0]))
    neg = torch.tensor([[1, 2, 9, 2, 11], [0, 6, 11, 7, 8]])
    for m in (a, b):
        _fix_negatives(m, neg)
    g = torch.Generator().manual_seed(9)
    f1, f2, logits = torch.randn(2, DS, generator=g), torch.randn(2, DS, generator=g), torch.randn(2, 3)
    index = torch.tensor([0, 4])
    ta = a(Outputs(logits=logits, pooled=f1), Outputs(logits=logits, pooled=f2), LABELS[index], index=index)
    tb = b(Outputs(logits=logits, pooled=f2), Outputs(logits=logits, pooled=f1), LABELS[index], index=index)
    assert ta["crd"].item() == pytest.approx(tb["crd"].item(), rel=1e-6)
    assert torch.allclose(a.memory_s, b.memory_t) and torch.allclose(a.memory_t, b.memory_s)


def test_gradients_are_those_of_the_memory_before_its_update(scoring):
    """The scores' backward pass runs after the memory moved; its gradients are those of the memory as it was
    (checked against a plain autograd computation on a copy), the teacher's features get none."""
    torch.manual_seed(0)  # the embeddings' initial weights: the same whatever ran before
    m = _crd(negatives=6, T=0.1)
    m_s, m_t = _unit_rows(12, DIM, 11), _unit_rows(12, DIM, 12)
    m.memory_s.copy_(m_s)
    m.memory_t.copy_(m_t)
    m.z.copy_(torch.tensor([4.0, 6.0]))
    index = torch.tensor([0, 4, 6])
    neg = torch.tensor([[4, 6, 6, 1, 2, 9], [0, 6, 11, 7, 0, 3], [4, 0, 1, 8, 3, 4]])  # batch rows among them
    _fix_negatives(m, neg)
    fs, ft, logits = _batch(13)
    ft.requires_grad_(True)
    _call(m, fs, ft, logits, index)["crd"].backward()
    assert ft.grad is None

    ref = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
    cols = torch.cat([index.unsqueeze(1), neg], dim=1)
    losses = []
    for w, b, f, mem, z in ((ref["embed_s.weight"], ref["embed_s.bias"], fs, m_t, 4.0),
                            (ref["embed_t.weight"], ref["embed_t.bias"], ft.detach(), m_s, 6.0)):
        e = f @ w.t() + b
        e = e / e.norm(dim=1, keepdim=True)
        p = torch.exp(torch.bmm(mem[cols], e.unsqueeze(2)).squeeze(2) / 0.1) / z
        mm = 6 / N_TRAIN
        losses.append(-(torch.log(p[:, 0] / (p[:, 0] + mm + 1e-7)).sum()
                        + torch.log(mm / (p[:, 1:] + mm + 1e-7)).sum()) / 3)
    (0.8 * sum(losses)).backward()
    for k, v in m.named_parameters():
        assert torch.allclose(v.grad, ref[k].grad, rtol=1e-4, atol=1e-5), k  # float32 sums in another order


# -- the memory ---------------------------------------------------------------------------------------

def test_memory_update_moves_the_positive_rows_only():
    m = _crd(negatives=4, momentum=0.3)
    before_s, before_t = m.memory_s.clone(), m.memory_t.clone()
    index = torch.tensor([7, 2, 9])
    fs, ft, logits = _batch(21)
    _call(m, fs, ft, logits, index)
    es, et = _np_embed(m.embed_s, fs), _np_embed(m.embed_t, ft)
    for mem, before, e in ((m.memory_s, before_s, es), (m.memory_t, before_t, et)):
        for b, i in enumerate(index.tolist()):
            v = 0.3 * before[i].double().numpy() + 0.7 * e[b]
            assert np.allclose(mem[i].double().numpy(), v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)
        rest = [r for r in range(12) if r not in index.tolist()]
        assert torch.equal(mem[rest], before[rest])  # untouched rows unchanged, bit for bit
    assert m.memory_s.shape == (12, DIM) and m.memory_s.dtype == torch.float32
    bound = 1 / math.sqrt(DIM / 3)  # RepDistiller's initialisation
    assert before_s.abs().max() <= bound and before_s.abs().max() > bound / 2


def test_a_repeated_index_updates_its_row_once_from_its_first_occurrence():
    m = _crd(negatives=2, momentum=0.5)
    before = m.memory_s.clone()
    fs, ft, logits = _batch(22, b=2)
    _call(m, fs, ft, logits, torch.tensor([3, 3]))
    v = 0.5 * before[3].double().numpy() + 0.5 * _np_embed(m.embed_s, fs)[0]
    assert np.allclose(m.memory_s[3].double().numpy(), v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)


def test_negatives_come_from_other_classes_and_trained_rows_only_with_replacement_when_too_few():
    m = _crd(negatives=3000)
    torch.manual_seed(0)
    index = torch.tensor([0, 1, 2, 3, 4, 6, 7, 8, 9, 11])  # every trained row as an anchor
    neg = m.sample_negatives(index)
    assert neg.shape == (10, 3000)
    for b, i in enumerate(index.tolist()):
        drawn = neg[b]
        y = int(LABELS[i])
        assert (LABELS[drawn] != y).all() and (LABELS[drawn] >= 0).all()
        allowed = {r for r in range(12) if int(LABELS[r]) not in (y, -1)}
        counts = torch.bincount(drawn, minlength=12)
        assert {r for r in range(12) if counts[r] > 0} == allowed  # every other-class row, with replacement
        expected = 3000 / len(allowed)
        assert all(abs(int(counts[r]) - expected) < 0.25 * expected for r in allowed)  # uniform over them
    torch.manual_seed(0)
    assert torch.equal(m.sample_negatives(index), neg)  # torch's global RNG: seeded, repeatable


@pytest.mark.parametrize("k", [100, 300])  # 500 other-class rows: beyond 4k (redraw repeats), within (keys)
def test_negatives_are_distinct_and_uniform_when_there_are_enough(k):
    """K ≤ the other-class rows: K distinct rows (RepDistiller's CIFAR sampler), each as likely as any other;
    an anchor of a class with fewer others than K still draws with replacement in the same batch."""
    labels = torch.tensor([0] * 500 + [1] * 500 + [2] * (1000 - k + 50))  # class 2: 1000 others ≥ k
    labels[:2] = -1  # rows not trained on are never drawn
    m = methods.build("crd", {"dim": str(DIM), "negatives": str(k)}, Shapes(3, pooled=DS), Shapes(3, pooled=DT))
    m.attach_data(labels)
    torch.manual_seed(0)
    index = torch.tensor([5, 600, 1200] * 40)
    counts = torch.zeros((3, len(labels)))
    for _ in range(5):
        neg = m.sample_negatives(index)
        assert neg.shape == (120, k)
        for b, i in enumerate(index.tolist()):
            assert len(set(neg[b].tolist())) == k  # no repeat
            assert (labels[neg[b]] != labels[i]).all() and (labels[neg[b]] >= 0).all()
            counts[b % 3] += torch.bincount(neg[b], minlength=len(labels))
    for a, i in enumerate(index[:3].tolist()):
        allowed = (labels != labels[i]) & (labels >= 0)
        expected = 200 * k / int(allowed.sum())  # 200 draws of k rows
        assert counts[a][~allowed].sum() == 0
        c = counts[a][allowed]  # binomial counts: 200·p(1−p) variance, p = k / allowed
        spread = math.sqrt(expected * (1 - k / int(allowed.sum())))
        assert int(c.sum()) == 200 * k  # exactly k per draw
        assert float(c.std()) < 1.3 * spread and float(c.std()) > 0.7 * spread  # no row favoured
        assert float((c - expected).abs().max()) < 6 * spread
    few = torch.tensor([0] * 1100 + [1] * (k // 2))  # class 0's anchors: k/2 others, fewer than k
    m.attach_data(few)
    neg = m.sample_negatives(torch.tensor([3, 1100]))
    assert len(set(neg[0].tolist())) < k // 2 and (few[neg[0]] == 1).all()  # with replacement: repeats
    assert len(set(neg[1].tolist())) == k and (few[neg[1]] == 0).all()


def test_distinct_draws_keep_no_repeat_even_when_k_is_every_value():
    torch.manual_seed(0)
    for n, k in [(7, 7), (50, 12), (1000, 20)]:
        u = contrastive._distinct_draws(torch.tensor([[n], [n + 3]]), k)
        assert u.shape == (2, k) and all(len(set(r.tolist())) == k for r in u)
        assert int(u[0].max()) < n and int(u[1].max()) < n + 3 and int(u.min()) >= 0


def test_one_class_and_missing_index_are_refused():
    m = methods.build("crd", {}, Shapes(3, pooled=DS), Shapes(3, pooled=DT))
    with pytest.raises(KdcliError, match="two classes"):
        m.attach_data(torch.tensor([1, 1, -1, 1]))
    m = _crd(negatives=2)
    fs, ft, logits = _batch()
    with pytest.raises(ValueError, match="row index"):
        m(Outputs(logits=logits, pooled=fs), Outputs(logits=logits, pooled=ft), LABELS[:3])
    with pytest.raises(ValueError, match="not one of the training rows"):
        _call(m, fs, ft, logits, torch.tensor([0, 5, 1]))


def test_memory_and_z_are_persistent_state():
    a = _crd(negatives=4)
    _call(a, *_batch(30), torch.tensor([0, 4, 6]))
    state = a.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(state) and "labels" not in state
    b = _crd(negatives=4)
    b.load_state_dict(state)
    assert torch.equal(b.memory_s, a.memory_s) and torch.equal(b.memory_t, a.memory_t) and torch.equal(b.z, a.z)



@pytest.mark.parametrize("k,scoring,sizes", [
    (50, "dense", None),  # 540 other-class rows > 4K: distinct draws with their one check
    (200, "gathered", None),  # 540 ≤ 4K: distinct by keys, no check
    (1000, "dense", None),  # more than the 540: with replacement
    (500, "gathered", [150] + [50] * 9),  # class 0 has 450 others (with replacement), the rest 550 (distinct)
    (120, "dense", [150] + [50] * 9),  # 450 others ≤ 4K (keys), 550 > 4K (draws): both in a batch
])
def test_crd_step_makes_at_most_one_host_wait(k, scoring, sizes, monkeypatch):
    """A steady step (forward and backward) reads the device at most once: the sampler's classes, Z and the
    batch's first occurrences are known without it, on 600 rows of 10 classes."""
    monkeypatch.setattr(contrastive, "_dense", lambda memory, idx: scoring == "dense")
    labels = torch.arange(600) % 10 if sizes is None else torch.repeat_interleave(torch.arange(10), torch.tensor(sizes))
    m = methods.build("crd", {"dim": "8", "negatives": str(k)}, Shapes(10, pooled=DS), Shapes(10, pooled=DT))
    m.attach_data(labels)
    g = torch.Generator().manual_seed(k)
    for _ in range(3):  # two to warm up (Z is set in the first), the third counted
        index = torch.randperm(600, generator=g)[:16]
        fs = torch.randn(16, DS, generator=g, requires_grad=True)
        logits = torch.randn(16, 10, generator=g)
        s, t = Outputs(logits=logits, pooled=fs), Outputs(logits=logits, pooled=torch.randn(16, DT, generator=g))
        with SyncCounter() as c:
            terms = m(s, t, labels[index], index=index)
            (terms["ce"] + terms["crd"]).backward()
        assert torch.isfinite(terms["crd"]) and fs.grad is not None
    assert c.total <= 1, dict(c.counts)

# -- end to end ----------------------------------------------------------------------------------------

def _resume_state(folder) -> dict:
    progress = json.loads((folder / "resume" / "progress.json").read_text())
    return load_file(str(folder / "resume" / progress["files"]["state"]))


def test_resume_restores_the_memory_and_ends_where_a_run_resumed_later_does(tmp_path):
    """Stopped after epoch 1 and resumed, a run reaches epoch 2 with the memory, Z, embeddings and weights of a
    run that went through epochs 1 and 2 without stopping, and both end on the same weights."""
    common = ["distill", "--teacher", "cifar_resnet14", "--student", "cifar_resnet8", "--method", "crd",
              "--dataset", "synthetic:16:4:64", "--epochs", "3", "--batch-size", "16"]
    kdcli(*common, "--out", tmp_path / "two", "--stop-after-epoch", "2")
    kdcli(*common, "--out", tmp_path / "parts", "--stop-after-epoch", "1")
    kdcli("distill", "--resume", tmp_path / "parts", "--stop-after-epoch", "2")
    a, b = _resume_state(tmp_path / "two"), _resume_state(tmp_path / "parts")
    assert a.keys() == b.keys() and {"method.memory_s", "method.memory_t", "method.z"} <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    norms = a["method.memory_s"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # every row trained on moved at least once
    assert (a["method.z"] > 0).all()
    kdcli("distill", "--resume", tmp_path / "parts")
    kdcli("distill", "--resume", tmp_path / "two")
    assert ckpt.sha256(tmp_path / "two" / "model.safetensors") == ckpt.sha256(tmp_path / "parts" / "model.safetensors")
    assert not (tmp_path / "parts" / "resume").exists()


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    from kdcli.config import RunConfig
    from kdcli.engine.session import build

    out = Path(sys.argv[1])
    cfg = RunConfig(command="distill", teacher=["cifar_resnet14"], student="cifar_resnet8", method="crd",
                    dataset="synthetic:8:4:96", batch_size=8, lr=0.05, out=str(out / "run"),
                    method_args={"negatives": "256"})
    sess = build(cfg)
    method = sess.accelerator.unwrap_model(sess.method)
    start = method.memory_s.clone()
    seen = []
    for step, batch in enumerate(sess.train_loader):
        if step == 3:
            break
        seen += batch["index"].tolist()
        sess.train_step(batch["image"].to(sess.device), batch["label"].to(sess.device),
                        batch["index"].to(sess.device))
    rank = sess.accelerator.process_index
    torch.save({"memory_s": method.memory_s, "memory_t": method.memory_t, "z": method.z, "start": start,
                "seen": torch.tensor(seen), "world": sess.accelerator.num_processes}, out / f"rank{rank}.pt")
""")


def test_two_processes_keep_the_same_memory(tmp_path):
    script = tmp_path / "crd_two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = str(29600 + os.getpid() % 97)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert set(r0["seen"].tolist()).isdisjoint(r1["seen"].tolist())  # each process trained on its own rows
    for k in ("start", "memory_s", "memory_t", "z"):
        assert torch.equal(r0[k], r1[k]), k
    # every row either process saw moved on both: the updates were gathered, not kept local
    seen = sorted(set(r0["seen"].tolist()) | set(r1["seen"].tolist()))
    moved = (r0["memory_s"] != r0["start"]).any(dim=1).nonzero().flatten().tolist()
    assert moved == seen and (r0["z"] > 0).all()
