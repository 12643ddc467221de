"""Every method trains any timm pair: a CIFAR pair, two timm CNN families, and a CNN teacher with a ViT.

For each (method, pair) a real Session is built through the same code path as `kdcli distill`
(data, models, matched stages, connectors, optimizer) and trained for a few steps on one fixed batch:
the loss must go down. Then each method runs once end to end through the CLI.
"""

import tempfile

import pytest
import torch

from kdcli import methods
from kdcli.config import RunConfig
from kdcli.engine import loop
from kdcli.engine.report import Report
from tests.test_cli import kdcli

PAIRS = {
    "cifar": ("cifar_resnet26", "cifar_resnet8"),
    "timm-cnn": ("resnet18", "mobilenetv3_small_050"),
    "cnn-vit": ("cifar_resnet8", "cifar_vit_micro_p4"),
}
DISTILL = [m for m in methods.available() if m != "ce"]
DATA = "synthetic:32:4:64"


def test_the_study_methods_are_all_registered():
    assert set(DISTILL) >= {"kd", "fitnet", "at", "fsp", "ft", "ab", "bss", "rkd", "sp", "dml"}


def _session(method: str, teacher: str, student: str, lr: float = 0.01, **args) -> loop.Session:
    cfg = RunConfig(command="distill", teacher=teacher, student=student, method=method, dataset=DATA,
                    batch_size=16, lr=lr, out=tempfile.mkdtemp(), method_args=args)
    return loop.build(cfg)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("method", DISTILL)
def test_loss_goes_down_for_every_pair(method, pair):
    stages = [True, False] if "warmup" in methods.get(method).defaults() else [False]
    for warmup in stages:  # each stage's objective on its own, from the same fresh start
        torch.manual_seed(0)
        # A step size small enough for steady descent on every pair: at lr 0.01 some trajectories (kd, bss,
        # dml on resnet18 -> mobilenetv3) oscillate and climb back, so "the last losses are below the first"
        # held on one CPU and failed on another. At 0.003 the mean of the last 4 of 12 losses is at most
        # 0.97 of the first for every method, pair and stage over 3 seeds (most far lower): a systematic
        # descent, with a margin orders of magnitude above floating-point differences between machines.
        # a memory of every example (CRD) moves the objective as it fills: frozen here (momentum 1), the
        # objective on the one batch is fixed, as for every other method
        frozen = {"momentum": "1"} if "index" in methods.get(method).needs else {}
        sess = _session(method, *PAIRS[pair], lr=0.003, **frozen)
        batch = next(iter(sess.train_loader))
        images, labels, index = batch["image"], batch["label"], batch["index"]
        built = sess.accelerator.unwrap_model(sess.method)
        built.use_warmup(warmup)
        # the first epoch of a 240-epoch run, as the loop sets it: terms ramped in over the first epochs (DKD,
        # ReviewKD: 20 of 240) start at 1/20 of their weight, as they do in training; at full weight from a
        # random start, DKD's β·T² = 128 makes resnet18 -> mobilenetv3 climb at this step size
        built.set_progress(0, 240)
        losses = [float(sum(sess.train_step(images, labels, index).values())) for _ in range(12)]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-4:]) / 4 < 0.99 * losses[0], (warmup, losses)
        assert not sess.teacher.training or sess.online  # a fixed teacher stays in eval mode


# through the CLI: a CIFAR pair, and a cross-family pair (a CNN teacher, a ViT student: tokens as maps)
CLI_PAIRS = {"cifar": ("cifar_resnet14", "cifar_resnet8", "synthetic:16:4:64"),
             "cnn-vit": ("cifar_resnet8", "cifar_vit_micro_p4", "synthetic:32:4:48")}


@pytest.mark.parametrize("pair", list(CLI_PAIRS))
@pytest.mark.parametrize("method", DISTILL)
def test_every_method_runs_end_to_end(method, pair, tmp_path):
    teacher, student, data = CLI_PAIRS[pair]
    args = ["--method-arg", "warmup=0.5"] if "warmup" in methods.get(method).defaults() else []
    kdcli("distill", "--teacher", teacher, "--student", student, "--method", method, *args,
          "--dataset", data, "--epochs", "2", "--batch-size", "16", "--out", tmp_path)
    rep = Report.model_validate_json((tmp_path / "report.json").read_text())
    assert rep.method.name == method
    main = [h for h in rep.history if h.stage == "train"]
    assert len(main) == 2 and len(rep.history) == 2 + rep.method.warmup_epochs
    assert rep.metrics.best.epoch > rep.method.warmup_epochs  # best is taken over the main stage only
    if rep.method.warmup_epochs:
        assert rep.history[0].stage == "warmup" and "ce" not in rep.history[0].terms
    if methods.get(method).online:
        assert rep.peer is not None and (tmp_path / "peer.safetensors").is_file()
        assert rep.peer.model.name == teacher and 0 <= rep.peer.metrics.top1 <= 1
    else:
        assert rep.peer is None and not (tmp_path / "peer.safetensors").exists()


@pytest.mark.parametrize("method, extra", [("dml", []), ("fitnet", ["--method-arg", "warmup=0.5"])])
def test_resume_is_exact_with_warmup_stages_and_online_peers(method, extra, tmp_path):
    common = ["distill", "--teacher", "cifar_resnet14", "--student", "cifar_resnet8", "--method", method, *extra,
              "--dataset", "synthetic:8:4:96", "--epochs", "2", "--batch-size", "16", "--schedule", "step"]
    kdcli(*common, "--out", tmp_path / "whole")
    kdcli(*common, "--out", tmp_path / "parts", "--stop-after-epoch", "1")
    kdcli("distill", "--resume", tmp_path / "parts")
    from safetensors.torch import load_file
    files = ["model.safetensors"] + (["peer.safetensors"] if method == "dml" else [])
    for f in files:
        a, b = load_file(str(tmp_path / "whole" / f)), load_file(str(tmp_path / "parts" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ra = Report.model_validate_json((tmp_path / "whole" / "report.json").read_text())
    rb = Report.model_validate_json((tmp_path / "parts" / "report.json").read_text())
    assert [h.terms for h in ra.history] == [h.terms for h in rb.history]
    assert [h.stage for h in ra.history] == (["warmup", "train", "train"] if method == "fitnet" else ["train"] * 2)


def test_stage_options_choose_the_matched_stages(tmp_path, capsys):
    from tests.test_cli import fails
    common = ["distill", "--teacher", "cifar_resnet14", "--student", "cifar_vit_micro_p4", "--method", "at",
              "--dataset", "synthetic:16:4:64", "--epochs", "1", "--batch-size", "16"]
    kdcli(*common, "--student-stages", "1,3", "--teacher-stages", "2,3", "--out", tmp_path / "ok")
    rep = Report.model_validate_json((tmp_path / "ok" / "report.json").read_text())
    assert rep.config["student_stages"] == [1, 3] and rep.config["teacher_stages"] == [2, 3]
    assert "differ in number" in fails(capsys, *common, "--student-stages", "1", "--out", tmp_path / "a")
    assert "out of range" in fails(capsys, *common, "--teacher-stages", "1,2,9", "--out", tmp_path / "b")
    assert "comma-separated" in fails(capsys, *common, "--teacher-stages", "x", "--out", tmp_path / "c")


def test_default_stages_match_by_order_across_families():
    from kdcli import models
    facts = models.DataFacts(num_classes=4, in_chans=3, image_size=32, class_names=list("abcd"))
    cnn, vit = models.load("resnet18", facts).model, models.load("cifar_vit_micro_p4", facts).model
    models.match_stages(vit, cnn, None, None)
    assert cnn.stages == [2, 3, 4]  # layer2..layer4: the deepest block at each of the last 3 resolutions
    assert vit.stages == [1, 2, 3]  # 4 blocks at one resolution: spread evenly, ending at the last
    shapes = vit.shapes(frozenset({"logits", "features"}), 32)
    assert shapes.features == ((96, 8, 8),) * 3
