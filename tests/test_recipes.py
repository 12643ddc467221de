"""Training recipes through timm: optimizer, schedule, mixup/cutmix/label smoothing, EMA, accumulation, clipping."""

import math
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli.config import RunConfig
from kdcli.engine import loop, recipe, session
from kdcli.engine.signals import Interrupted
from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt

DATA = "synthetic:16:4:96"
PAIR = dict(command="distill", teacher="cifar_resnet14", student="cifar_resnet8", dataset=DATA, batch_size=16)
MODERN = dict(opt="adamw", lr=0.003, weight_decay=0.05, schedule="cosine", warmup_epochs=1, mixup=0.8, ema=0.99,
              grad_accum=2, clip_grad=1.0)


def _cfg(out, **kw) -> RunConfig:
    return RunConfig(**{**PAIR, "method": "kd", "epochs": 3, **kw, "out": str(out)})


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f"{a.name} differs"


def test_resume_is_exact_with_a_modern_recipe(tmp_path):
    whole = loop.run(_cfg(tmp_path / "whole", **MODERN))
    assert whole.ema is not None and whole.effective_batch == 32
    assert whole.ema.sha256 == ckpt.sha256(tmp_path / "whole" / "model_ema.safetensors")
    assert loop.run(_cfg(tmp_path / "cut", **MODERN), stop_after_epoch=1) is None
    again = loop.run(_cfg(tmp_path / "cut", **MODERN), resume=True)
    for name in ("model.safetensors", "model_ema.safetensors"):
        _same(tmp_path / "whole" / name, tmp_path / "cut" / name)
    assert [h.terms for h in again.history] == [h.terms for h in whole.history]
    assert again.ema.metrics.final == whole.ema.metrics.final
    # the moving average is its own network, evaluated beside the raw one
    raw = _tensors(tmp_path / "whole" / "model.safetensors")
    avg = _tensors(tmp_path / "whole" / "model_ema.safetensors")
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)
    assert all(h.eval_top1_ema is not None for h in whole.history)


def test_a_signal_mid_epoch_waits_for_the_accumulated_update_and_resumes_exactly(tmp_path, monkeypatch):
    loop.run(_cfg(tmp_path / "whole", **MODERN))
    batches = len(loop.build(_cfg(tmp_path / "probe", **MODERN)).train_loader)
    real, count = session.Session.train_step, {"n": 0}

    def step(self, images, labels, index=None, **kw):
        terms = real(self, images, labels, index, **kw)
        count["n"] += 1
        if count["n"] == batches + 1:  # epoch 2, after its first batch: half an accumulated update
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    monkeypatch.setattr(session.Session, "train_step", step)
    with pytest.raises(Interrupted, match="at epoch 2, step 2"):  # the update of batches 1-2 ends first
        loop.run(_cfg(tmp_path / "cut", **MODERN))
    monkeypatch.undo()
    loop.run(_cfg(tmp_path / "cut", **MODERN), auto_resume=True)
    for name in ("model.safetensors", "model_ema.safetensors"):
        _same(tmp_path / "whole" / name, tmp_path / "cut" / name)


def test_the_default_recipe_is_the_hand_written_one(tmp_path, monkeypatch):
    """Momentum SGD with weight decay on every parameter and a per-epoch cosine, written out by hand here, train
    the same weights as the default recipe (timm's optimizer and scheduler) bit for bit."""
    for method in ("kd", "fitnet"):  # fitnet: a warm-up stage at the base lr, then the schedule
        loop.run(_cfg(tmp_path / f"timm-{method}", method=method, epochs=3))

    def sgd(cfg, modules):
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def cosine(cfg, scheduler, optimizer, epoch, update, updates_per_epoch):
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    monkeypatch.setattr(recipe, "make_optimizer", sgd)
    monkeypatch.setattr(recipe, "set_lr", cosine)
    for method in ("kd", "fitnet"):
        loop.run(_cfg(tmp_path / f"hand-{method}", method=method, epochs=3))
        _same(tmp_path / f"timm-{method}" / "model.safetensors", tmp_path / f"hand-{method}" / "model.safetensors")


class _Opt:
    def __init__(self, lr):
        self.param_groups = [{"lr": lr, "params": []}]


def _lrs(epochs: int, at: list[int], **kw) -> list[float]:
    cfg = RunConfig(student="s", dataset=DATA, out=".", epochs=epochs, lr=0.05, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = recipe.make_scheduler(cfg, opt, updates_per_epoch=10)
    return [recipe.set_lr(cfg, sched, opt, e, 0, 10) for e in at]


@pytest.mark.parametrize("epochs, decays", [(240, (150, 180, 210)), (16, (10, 12, 14))])
def test_step_decays_after_the_fields_epochs(epochs, decays):
    # RepDistiller: ×0.1 once the 1-based epoch is greater than 150, 180, 210 (0-based 150, 180, 210)
    at = [e + d for e in decays for d in (-1, 0)]
    got = _lrs(epochs, at, schedule="step")
    want = [0.05 * 0.1 ** (i // 2 + (i % 2)) for i in range(len(at))]
    assert got == pytest.approx(want, rel=1e-9)
    assert recipe.step_milestones(epochs) == list(decays)


def test_multistep_milestones_poly_constant_and_warmup():
    assert _lrs(10, [4, 5, 7, 8], schedule="multistep", decay_milestones=[5, 8]) == pytest.approx(
        [0.05, 0.005, 0.005, 0.0005])
    assert _lrs(10, [0, 9], schedule="constant") == pytest.approx([0.05, 0.05])
    assert _lrs(10, [0, 5], schedule="poly")[0] == pytest.approx(0.05)
    # warm-up from warmup_lr, per epoch: epoch 0 at warmup_lr, then the cosine
    got = _lrs(10, [0, 1, 2], warmup_epochs=2, warmup_lr=0.001)
    assert got[0] == pytest.approx(0.001) and 0.001 < got[1] < 0.05
    assert got[2] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * 2 / 10)))
    with pytest.raises(KdcliError, match="needs --decay-milestones"):
        RunConfig(student="s", dataset=DATA, out=".", schedule="multistep")


def test_lr_per_update_moves_within_an_epoch():
    cfg = RunConfig(student="s", dataset=DATA, out=".", epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=0.0,
                    sched_on_updates=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = recipe.make_scheduler(cfg, opt, updates_per_epoch=10)
    warm = [recipe.set_lr(cfg, sched, opt, 0, u, 10) for u in range(10)]
    assert warm == pytest.approx([0.1 * u / 10 for u in range(10)])  # linear over the first epoch's updates
    later = [recipe.set_lr(cfg, sched, opt, 2, u, 10) for u in (0, 5, 9)]
    assert later[0] > later[1] > later[2]


def test_the_history_records_the_step_schedule(tmp_path):
    rep = loop.run(RunConfig(command="train", student="cifar_resnet8", dataset="synthetic:8:4:48", batch_size=16,
                             epochs=8, schedule="step", out=str(tmp_path)))
    assert [h.lr for h in rep.history] == pytest.approx([0.05] * 5 + [0.005, 0.0005, 0.00005])  # after 5, 6, 7


def test_with_mixup_the_teacher_sees_the_students_mixed_images(tmp_path):
    sess = loop.build(_cfg(tmp_path, mixup=1.0, cutmix=0.0))
    seen = {}
    for role in ("teacher", "student"):
        model = getattr(sess, role)
        real = model.forward

        def spy(x, needs=frozenset({"logits"}), _real=real, _role=role):
            seen[_role] = x.detach().clone()
            return _real(x, needs)

        model.forward = spy
    batch = next(iter(sess.train_loader))
    loaded = batch["image"].clone()  # timm's Mixup mixes the batch in place
    sess.train_step(batch["image"], batch["label"], batch["index"])
    assert torch.equal(seen["teacher"], seen["student"])
    assert not torch.equal(seen["student"], loaded)  # mixed, not the batch as loaded


def test_mixer_smooths_and_mixes_odd_batches():
    cfg = RunConfig(student="s", dataset=DATA, out=".", mixup=0.5, label_smoothing=0.1)
    mixer = recipe.Mixer(cfg, num_classes=4)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    mixed, soft = mixer(x, y)
    assert mixed.shape == x.shape and soft.shape == (5, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    # the odd one out keeps its own smoothed label: 0.9 + 0.1/4 on its class
    assert soft[4].tolist() == pytest.approx([0.025, 0.925, 0.025, 0.025])
    assert torch.equal(mixed[4], x[4])
    only = recipe.Mixer(RunConfig(student="s", dataset=DATA, out=".", label_smoothing=0.2), 4)
    same, soft = only(x, y)
    assert torch.equal(same, x) and soft[0].tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])


def test_soft_targets_reach_the_methods(tmp_path):
    # dkd masks its target class: the mixed target's dominant class; ensembles weigh by CE on soft targets
    for method, extra in (("dkd", {}), ("nkd", {}), ("kd+crd", {})):
        rep = loop.run(_cfg(tmp_path / method, method=method, epochs=1, mixup=0.8, cutmix=1.0, **extra))
        assert all(math.isfinite(v) for v in rep.history[0].terms.values())
    with pytest.raises(KdcliError, match="needs hard labels"):
        loop.run(_cfg(tmp_path / "bss", method="bss", mixup=0.8))


def test_grad_accum_updates_every_n_batches(tmp_path):
    sess = loop.build(_cfg(tmp_path, opt="adamw", grad_accum=3))
    batches = [next(iter(sess.train_loader)) for _ in range(1)] * 4
    for b in batches:
        sess.train_step(b["image"], b["label"], b["index"])
    steps = {int(s["step"]) for s in sess.optimizer.state.values()}
    assert steps == {1}  # 4 batches, accumulation of 3: one update so far
    assert sess.updates_per_epoch == math.ceil(len(sess.train_loader) / 3)


def test_clip_grad_bounds_the_update(tmp_path):
    sess = loop.build(_cfg(tmp_path, opt="momentum", momentum=0.0, weight_decay=0.0, lr=1.0, clip_grad=1e-3))
    b = next(iter(sess.train_loader))
    before = [p.detach().clone() for p in sess.unwrapped_student().parameters()]
    sess.train_step(b["image"], b["label"], b["index"])
    moved = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(sess.unwrapped_student().parameters(),
                                                                          before, strict=True)))
    assert 0 < float(moved) <= 1e-3 * (1 + 1e-4)  # plain SGD at lr 1: the step is the clipped gradient


def test_no_decay_norm_bias_groups_and_unknown_optimizer(tmp_path):
    sess = loop.build(_cfg(tmp_path, opt="adamw", no_decay_norm_bias=True))
    decays = sorted({g["weight_decay"] for g in sess.optimizer.param_groups})
    assert decays == [0.0, 5e-4]
    no_wd = [p for g in sess.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert no_wd and all(p.ndim <= 1 for p in no_wd)
    default = loop.build(_cfg(tempfile.mkdtemp()))
    assert len(default.optimizer.param_groups) == 1 and default.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert type(default.optimizer.optimizer) is torch.optim.SGD
    assert default.optimizer.param_groups[0]["nesterov"] is False
    with pytest.raises(KdcliError, match="--opt nosuch"):
        loop.build(_cfg(tempfile.mkdtemp(), opt="nosuch"))


def test_channels_last_trains(tmp_path):
    rep = loop.run(_cfg(tmp_path, epochs=1, channels_last=True))
    assert math.isfinite(rep.history[0].loss)
    # the models and the batch they get are in the channels-last layout (and not without the switch)
    for switch in (True, False):
        sess = loop.build(_cfg(tempfile.mkdtemp(), channels_last=switch))
        convs = [m.weight for m in sess.unwrapped_student().modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == switch for w in convs
                             if w.shape[2] * w.shape[3] > 1)
        seen = {}
        real = sess.student.forward

        def spy(x, needs=frozenset({"logits"}), _real=real, seen=seen):
            seen["x"] = x
            return _real(x, needs)

        sess.student.forward = spy
        b = next(iter(sess.train_loader))
        sess.train_step(b["image"], b["label"], b["index"])
        assert seen["x"].is_contiguous(memory_format=torch.channels_last) == switch


def test_compile_unavailable_is_one_line(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(KdcliError, match=r"--compile is not available on this machine \(no C\+\+ compiler found\)"):
        recipe.check_compile(torch.device("cpu"))
