"""The training step: no host waits in the steady state, no wrapper beyond what it needs, a foreach EMA, and a
non-finite loss still stopped with its term and step."""

import copy

import pytest
import torch
from torch.nn import functional as F

from kdcli.config import RunConfig
from kdcli.engine import loop, session
from kdcli.engine.ema import ModelEma
from kdcli.engine.rundir import RESUME_DIR
from kdcli.engine.syncs import SyncCounter, on_host
from kdcli.methods import logits as logit_methods

DATA = "synthetic:8:10:64"
PAIR = dict(command="distill", teacher="cifar_resnet8", student="cifar_resnet8", dataset=DATA, batch_size=8)


def _cfg(out, **kw) -> RunConfig:
    return RunConfig(**{**PAIR, "method": "kd", "epochs": 1, **kw, "out": str(out)})


def test_the_counter_counts_each_kind_of_host_wait_and_skips_marked_host_work():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        bool(x.max() > 2)
        x[x > 2]
        torch.nonzero(x)
        torch.unique(x)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))
        x.gather(0, torch.tensor([1, 2]))  # static shape: no wait
        x[torch.tensor([0, 3])]  # an integer index: no wait
        with on_host():
            x.sum().item()
    assert c.counts["_local_scalar_dense"] == 2
    assert c.counts["mask_index"] == 1 and c.counts["nonzero"] == 1 and c.counts["repeat_interleave"] == 1
    assert sum(v for k, v in c.counts.items() if "unique" in k) == 1
    assert c.total == 6


@pytest.mark.parametrize("method,extra", [("kd", {}), ("dkd", {}), ("nkd", {}), ("dist", {}), ("lskd", {}),
                                          ("kd", {"teacher_cache": "cache"}), ("ce", {"ema": 0.9})])
def test_steady_state_steps_make_almost_no_host_waits(tmp_path, method, extra):
    if "teacher_cache" in extra:
        extra = {**extra, "teacher_cache": str(tmp_path / "cache")}
    teacher = {} if method != "ce" else {"teacher": None, "command": "train"}
    sess = loop.build(_cfg(tmp_path / "run", method=method, **extra, **teacher))
    batches = list(sess.train_loader)
    for b in batches:  # warm-up: fills the cache's view, sets every lazily made state
        sess.train_step(b["image"], b["label"], b["index"], host_index=b["index"])
    sess.check_finite()
    steps = 2 * session.FINITE_EVERY
    with SyncCounter() as c:
        for k in range(steps):
            b = batches[k % len(batches)]
            sess.train_step(b["image"], b["label"], b["index"], host_index=b["index"])
    assert c.total / steps <= 0.05, dict(c.counts)
    assert c.total >= 1  # the finiteness check did read the device: the counter saw the step


def test_a_nonfinite_term_stops_the_run_naming_it_and_its_step_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    real, calls = logit_methods.KD.forward, {"n": 0}
    batches = len(loop.build(_cfg(tmp_path / "probe", epochs=3)).train_loader)

    def forward(self, s, t, target, **kw):
        terms = real(self, s, t, target, **kw)
        calls["n"] += 1
        if calls["n"] == batches + 3:  # epoch 2, step 3
            terms["kd"] = terms["kd"] * float("nan")
        return terms

    monkeypatch.setattr(logit_methods.KD, "forward", forward)
    with pytest.raises(session.TrainingDiverged, match=r"loss term 'kd' became nan at epoch 2, step 3; "
                                                       r"last good state: epoch 1"):
        loop.run(_cfg(tmp_path / "run", epochs=3))
    assert (tmp_path / "run" / RESUME_DIR).is_dir()
    assert not (tmp_path / "run" / "report.json").exists()


def test_the_plain_step_trains_the_same_weights_as_accelerates_wrappers(tmp_path):
    runs = []
    for plain in (True, False):
        sess = loop.build(_cfg(tmp_path / str(plain), opt="adamw", clip_grad=0.5))
        assert sess.plain  # one process, no accumulation, fp32
        sess.plain = plain
        for b in list(sess.train_loader) * 2:
            sess.train_step(b["image"], b["label"], b["index"])
        runs.append([p.detach().clone() for p in sess.unwrapped_student().parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    accumulated = loop.build(_cfg(tmp_path / "acc", grad_accum=2))
    assert not accumulated.plain


def test_the_foreach_ema_is_timms_average():
    import timm
    from timm.utils import ModelEmaV3

    import kdcli.models.cifar  # noqa: F401  (registers cifar_resnet8)

    net = timm.create_model("cifar_resnet8", num_classes=10).train()
    mine, theirs = ModelEma(net, 0.9), ModelEmaV3(copy.deepcopy(net), decay=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.rand(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        mine.update(net)
        theirs.update(net)
    a, b = mine.module.state_dict(), theirs.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], net.state_dict()[k]) for k in a)  # an average, not a copy


def test_target_split_by_gather_is_the_masked_split():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, generator=gen), torch.tensor([0, 4, 2, 2, 1, 3, 0])
    gt, rest = logit_methods._split_target(x, y)
    mask = torch.zeros(7, 5, dtype=torch.bool)
    mask[torch.arange(7), y] = True
    assert torch.equal(gt, x[mask]) and torch.equal(rest, x[~mask].view(7, 4))
    soft = F.one_hot(y, 5).float() * 0.8 + 0.04
    assert torch.equal(logit_methods._split_target(x, soft)[1], rest)


@pytest.mark.parametrize("method", ["kd", "dkd", "nkd"])
def test_the_logit_step_compiles_as_one_graph_broken_only_by_the_backward(tmp_path, method):
    sess = loop.build(_cfg(tmp_path, method=method))
    b = next(iter(sess.train_loader))

    def step(x, y, i):
        terms, loss = sess.loss_terms(x, y, i)
        loss.backward()
        return terms

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(b["image"], b["label"], b["index"])
    assert explained.graph_count == 1 and explained.graph_break_count <= 1
    assert all("backward" in str(r.reason) for r in explained.break_reasons)


def test_compile_traces_the_loss_terms_whole_and_trains(tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def eager_compile(fn, mode=None, **kw):  # dynamo traces, no C++ toolchain needed
        compiled.append((getattr(fn, "__name__", fn), mode))
        return real(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(loop.recipe, "check_compile", lambda device: None)
    report = loop.run(_cfg(tmp_path / "c", compile=True, compile_mode="max-autotune"))
    assert compiled == [("loss_terms", "max-autotune")]
    plain = loop.run(_cfg(tmp_path / "p"))
    assert report.history[0].terms == pytest.approx(plain.history[0].terms, rel=1e-4)


def test_the_frozen_teacher_is_folded_and_held_in_bf16_for_a_bf16_run(tmp_path):
    import timm
    from accelerate.state import AcceleratorState

    fp32 = loop.build(_cfg(tmp_path / "fp32")).teacher_infos[0].model
    AcceleratorState._reset_state(True)  # one precision per process otherwise
    try:
        bf16 = loop.build(_cfg(tmp_path / "bf16", precision="bf16")).teacher_infos[0].model
    finally:
        AcceleratorState._reset_state(True)
    unfolded = sum(p.numel() for p in timm.create_model("cifar_resnet8", num_classes=10).parameters())
    for t in (fp32, bf16):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in t.net.modules())
        assert t.num_params == unfolded  # the network as loaded, as its report and checkpoint count it
    assert {p.dtype for p in bf16.net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.net.parameters()} == {torch.float32}
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp32(x).logits, bf16(x).logits
    assert b.dtype == torch.float32
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
