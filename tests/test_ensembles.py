"""Teacher ensembles: --teacher repeated, distilled from the mixture of the teachers' probabilities."""

import hashlib
import math
import tempfile

import numpy as np
import pytest
import torch

from kdcli import methods, models
from kdcli.config import RunConfig
from kdcli.data import open_data
from kdcli.engine import loop
from kdcli.engine.report import EvalReport, Report
from kdcli.methods.base import Outputs, ensemble_weights, teacher_log_probs
from kdcli.study import plan, spec
from tests.test_cli import fails, kdcli

DATA = "synthetic:16:4:64"


def _np_softmax(z, T=1.0):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / T)
    return e / e.sum(axis=1, keepdims=True)


def _logits():
    g = torch.Generator().manual_seed(3)
    s, t1, t2 = (torch.randn(5, 4, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    return s.float(), t1.float(), t2.float(), torch.tensor([0, 1, 2, 3, 1])


def test_mixture_target_is_the_mean_of_the_teachers_probabilities():
    _, t1, t2, y = _logits()
    for T in (1.0, 4.0):
        got = teacher_log_probs(Outputs(logits=t1, members=[t1, t2]), T).exp().numpy()
        want = (_np_softmax(t1.double().numpy(), T) + _np_softmax(t2.double().numpy(), T)) / 2
        np.testing.assert_allclose(got, want, atol=1e-6)
    # one teacher: its own softened distribution
    np.testing.assert_allclose(teacher_log_probs(Outputs(logits=t1), 2.0).exp().numpy(),
                               _np_softmax(t1.double().numpy(), 2.0), atol=1e-6)


def test_kd_from_two_teachers_is_kl_to_the_mixture_and_has_the_mean_per_teacher_gradient():
    s, t1, t2, y = _logits()
    T = 4.0
    kd = methods.build("kd", {"ce_weight": "0"})
    s_var = s.clone().requires_grad_(True)
    term = kd(Outputs(logits=s_var), Outputs(logits=t1, members=[t1, t2]), y)["kd"]
    # by hand: 0.9 · T² · mean_i Σ_c q_ic (log q_ic − log p_ic), q the mixture at T
    q = (_np_softmax(t1.double().numpy(), T) + _np_softmax(t2.double().numpy(), T)) / 2
    log_p = np.log(_np_softmax(s.double().numpy(), T))
    want = 0.9 * T * T * (q * (np.log(q) - log_p)).sum(axis=1).mean()
    assert term.item() == pytest.approx(want, abs=1e-5)
    # big_vision's remark: the student's gradient equals that of the mean of the per-teacher KL terms
    (g_mix,) = torch.autograd.grad(term, s_var)
    s_var2 = s.clone().requires_grad_(True)
    per = [kd(Outputs(logits=s_var2), Outputs(logits=t), y)["kd"] for t in (t1, t2)]
    (g_mean,) = torch.autograd.grad((per[0] + per[1]) / 2, s_var2)
    torch.testing.assert_close(g_mix, g_mean, atol=1e-6, rtol=1e-5)


def test_camkd_weights_follow_the_teachers_loss_on_the_label():
    _, t1, t2, y = _logits()
    w = ensemble_weights([t1, t2], y, "camkd").numpy()
    ce = np.stack([-np.log(_np_softmax(t.double().numpy())[np.arange(5), y.numpy()]) for t in (t1, t2)])
    soft = np.exp(ce) / np.exp(ce).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(w, (1 - soft) / 1, atol=1e-6)  # K − 1 = 1
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-6)
    better = ce[0] < ce[1]  # the teacher with the lower loss on the label weighs more
    assert ((w[0] > w[1]) == better).all()
    # three teachers: (1 − softmax_k) / 2, columns still sum to 1
    w3 = ensemble_weights([t1, t2, t1 * 0.5], y, "camkd")
    torch.testing.assert_close(w3.sum(0), torch.ones(5))
    # the target is the weighted mixture
    got = teacher_log_probs(Outputs(logits=t1, members=[t1, t2]), 1.0, target=y, weighting="camkd").exp().numpy()
    want = w[0][:, None] * _np_softmax(t1.double().numpy()) + w[1][:, None] * _np_softmax(t2.double().numpy())
    np.testing.assert_allclose(got, want, atol=1e-6)


def _facts(size=16, classes=4):
    return models.DataFacts(num_classes=classes, in_chans=3, image_size=size, class_names=[str(i) for i in
                                                                                          range(classes)],
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@torch.no_grad()
def test_the_ensemble_predicts_its_mean_probability_and_takes_features_from_the_feature_teacher():
    torch.manual_seed(0)
    a = models.load("cifar_resnet8", _facts()).model.eval()
    b = models.load("resnet18", _facts(), image_size=32).model.eval()  # its own input size and statistics
    ens = models.Ensemble([a, b], feature=1).eval()
    models.match_stages(a, b, None, None)
    x = torch.rand(3, 3, 16, 16)
    out = ens(x, frozenset({"logits", "features"}))
    za, zb = a(x).logits, b(x).logits
    want = np.log((_np_softmax(za.double().numpy()) + _np_softmax(zb.double().numpy())) / 2)
    np.testing.assert_allclose(out.logits.numpy(), want, atol=1e-5)
    assert [m.shape for m in out.members] == [za.shape, zb.shape]
    own = b(x, frozenset({"logits", "features"}))
    assert [f.shape for f in out.features] == [f.shape for f in own.features]
    assert ens.shapes(frozenset({"logits", "features"})) == b.shapes(frozenset({"logits", "features"}))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for name, arch in (("t1", "cifar_resnet8"), ("t2", "cifar_resnet14")):
        kdcli("train", "--model", arch, "--dataset", DATA, "--epochs", "2", "--batch-size", "16", "--out",
              root / name)
    return root


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_teacher_kd_runs_end_to_end_and_reports_every_teacher(teachers, tmp_path):
    t1, t2 = teachers / "t1" / "model.safetensors", teachers / "t2" / "model.safetensors"
    kdcli("distill", "--teacher", t1, "--teacher", t2, "--student", "cifar_resnet8", "--method", "kd",
          "--dataset", DATA, "--epochs", "2", "--batch-size", "16", "--out", tmp_path / "s")
    rep = Report.model_validate_json((tmp_path / "s" / "report.json").read_text())
    assert [t.sha256 for t in rep.teachers] == [_sha(t1), _sha(t2)]
    assert rep.teacher.sha256 == _sha(t1)  # the feature teacher: the first by default
    assert rep.config["teacher"] == [str(t1), str(t2)]
    assert "ensemble of" in (tmp_path / "s" / "README.md").read_text()
    # the ensemble's own top-1, computed here from the two checkpoints independently
    data = open_data(DATA, augment="none")
    data.set_input(16)
    facts = models.DataFacts(num_classes=4, in_chans=3, image_size=16, class_names=data.class_names,
                             mean=data.mean, std=data.std)
    nets = [models.load(str(t), facts).model.eval() for t in (t1, t2)]
    right = total = 0
    with torch.no_grad():
        for item in data.eval_dataset():
            x = item["image"][None]
            p = sum(torch.softmax(n(x).logits, 1) for n in nets) / 2
            right += int(p.argmax(1).item() == item["label"])
            total += 1
    assert rep.metrics.final.teacher_top1 == pytest.approx(right / total, abs=1e-6)
    # kdcli evaluate compares with the same ensemble
    kdcli("evaluate", tmp_path / "s", "--dataset", DATA, "--teacher", t1, "--teacher", t2, "--out",
          tmp_path / "eval.json")
    ev = EvalReport.model_validate_json((tmp_path / "eval.json").read_text())
    assert ev.metrics.final.teacher_top1 == pytest.approx(right / total, abs=1e-6) and len(ev.teachers) == 2


def test_resume_is_exact_with_an_ensemble(teachers, tmp_path):
    t = ["--teacher", teachers / "t1" / "model.safetensors", "--teacher", teachers / "t2" / "model.safetensors"]
    common = ["distill", *t, "--student", "cifar_resnet8", "--method", "kd", "--method-arg", "ensemble=camkd",
              "--dataset", DATA, "--epochs", "3", "--batch-size", "16"]
    kdcli(*common, "--out", tmp_path / "a")
    kdcli(*common, "--out", tmp_path / "b", "--stop-after-epoch", "1")
    kdcli("distill", "--resume", tmp_path / "b")
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")


def test_feature_methods_read_the_feature_teacher():
    cfg = RunConfig(command="distill", teacher=["cifar_resnet8", "cifar_wrn_16_2"], student="cifar_resnet8",
                    method="kd+fitnet", dataset=DATA, batch_size=16, out=tempfile.mkdtemp(), feature_teacher=1)
    sess = loop.build(cfg)
    fitnet = sess.method.parts[1]
    wide = models.load("cifar_wrn_16_2", _facts()).model
    models.match_stages(sess.student, wide, None, None)
    assert fitnet.regressor[0].out_channels == wide.shapes(frozenset({"features"})).features[fitnet.stage][0]
    assert fitnet.regressor[0].out_channels == 2 * fitnet.regressor[0].in_channels  # wrn_16_2: twice as wide
    assert sess.teacher_info.model.meta.architecture == "cifar_wrn_16_2" and len(sess.teacher_infos) == 2
    batch = next(iter(sess.train_loader))
    terms = sess.train_step(batch["image"], batch["label"], batch["index"])
    assert set(terms) == {"ce", "kd", "fitnet"} and all(math.isfinite(float(v)) for v in terms.values())


def test_ensemble_mistakes_are_one_line(teachers, tmp_path, capsys):
    t = ["--teacher", "cifar_resnet8", "--teacher", "cifar_resnet14"]
    base = ["--student", "cifar_resnet8", "--dataset", DATA, "--epochs", "1"]
    for method in ("bss", "dml", "kd+bss"):
        err = fails(capsys, "distill", *t, *base, "--method", method, "--out", tmp_path / method)
        assert "cannot take 2 --teacher" in err and not (tmp_path / method).exists()
    err = fails(capsys, "distill", *t, *base, "--feature-teacher", "2", "--out", tmp_path / "x")
    assert "--feature-teacher 2 is out of range" in err
    err = fails(capsys, "distill", *t, *base, "--teacher-weights", "w.pth", "--out", tmp_path / "x")
    assert "--teacher-weights given 1 times for 2 --teacher" in err


def test_config_writes_one_teacher_as_a_string_and_several_as_a_list():
    one = RunConfig(student="s", teacher="t", dataset=DATA, out="o", teacher_image_size=32)
    assert one.model_dump()["teacher"] == "t" and one.model_dump()["teacher_image_size"] == 32
    assert RunConfig(**one.model_dump()) == one and one.teacher_at(0) == ("t", None, 32)
    two = RunConfig(command="distill", student="s", teacher=["a", "b"], teacher_weights=["w", None], dataset=DATA,
                    out="o")
    assert two.model_dump()["teacher"] == ["a", "b"] and RunConfig(**two.model_dump()) == two
    assert two.teacher_at(1) == ("b", None, None)
    argv = plan.command_line(two)
    assert argv[argv.index("--teacher") + 1] == "a" and argv.count("--teacher") == 2
    assert argv[argv.index("--teacher-weights") + 1:][:3] == ["w", "--teacher-weights", "-"]


def test_a_study_pair_takes_a_list_of_teachers(tmp_path):
    s = spec.parse({"dataset": DATA, "pairs": [{"teacher": ["cifar_resnet8", "cifar_resnet14"],
                                                "student": "cifar_resnet8"},
                                               {"teacher": "cifar_resnet14", "student": "cifar_resnet8"}],
                    "methods": ["kd"], "options": {"epochs": 1}})
    runs = plan.plan(s, tmp_path)
    teachers = [r for r in runs if r.role == "teacher"]
    assert sorted(r.arch for r in teachers) == ["cifar_resnet14", "cifar_resnet8"]  # each trained once
    ens = next(r for r in runs if r.teacher_arch == "cifar_resnet8+cifar_resnet14")
    assert ens.cfg.teacher == [str(r.out / "model.safetensors") for r in ens.needs]
    assert [r.arch for r in ens.needs] == ["cifar_resnet8", "cifar_resnet14"]
    with pytest.raises(Exception, match="each named once"):
        spec.parse({"dataset": DATA, "pairs": [{"teacher": ["a", "a"], "student": "b"}], "methods": ["kd"]})
