"""A finished run folder is also a timm model folder: config.json (timm's format) and README.md (a model card)
beside model.safetensors, loadable with ``timm.create_model("local-dir:FOLDER", pretrained=True)``."""

import json
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from kdcli import models
from kdcli.data.transforms import ImageTransform
from kdcli.engine.report import Report
from kdcli.models import checkpoint as ckpt
from kdcli.models.export import write_model_folder

RGB = models.DataFacts(num_classes=5, in_chans=3, image_size=16, class_names=["cat", "dog", "owl", "yak", "emu"],
                       mean=(0.4, 0.45, 0.5), std=(0.2, 0.22, 0.25))
DIGITS = models.DataFacts(num_classes=10, in_chans=1, image_size=8, class_names=[f"digit {i}" for i in range(10)],
                          mean=(0.3,), std=(0.2,))
CIFAR = models.DataFacts(num_classes=4, in_chans=3, image_size=32, class_names=["a", "b", "c", "d"])
FILES = {"model.safetensors", "config.json", "README.md"}


def _export(tmp_path, arch, facts, report=None):
    """Build a classifier as kdcli does, give it non-trivial normalisation statistics, save it as kdcli's
    finish() does (model.safetensors, then the model folder files)."""
    torch.manual_seed(0)
    model = models.load(arch, facts).model.eval()
    for m in model.net.modules():  # eval-mode BatchNorm must matter, not be the identity of a fresh net
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    out = tmp_path / arch
    ckpt.save(out / "model.safetensors", model.net, model.meta)
    write_model_folder(out, model.net, model.meta, report)
    return out, model


def _images(facts, n=4):
    torch.manual_seed(1)
    return torch.rand(n, facts.in_chans, facts.image_size, facts.image_size)


def _normalise(x, data_config):
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


# Plain timm, in a process that never imports kdcli: images in, logits and what timm resolved out (files).
TIMM_ONLY = textwrap.dedent("""
    import json, sys
    import timm, torch
    from safetensors.torch import load_file, save_file

    folder, io = sys.argv[1], sys.argv[2]
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    x = load_file(io + "/images.safetensors")["images"]
    mean, std = torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)
    save_file({"logits": logits.contiguous()}, io + "/logits.safetensors")
    print(json.dumps({"data_config": cfg, "label_names": list(model.pretrained_cfg["label_names"]),
                      "arch": model.pretrained_cfg["architecture"], "kdcli": "kdcli" in sys.modules}))
""")


def _timm_only(tmp_path, folder, images):
    """Run TIMM_ONLY on ``folder`` with ``images``: (what it printed, the logits it computed)."""
    io = tmp_path / "io"
    io.mkdir()
    save_file({"images": images}, str(io / "images.safetensors"))
    proc = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(folder), str(io)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), load_file(str(io / "logits.safetensors"))["logits"]


def test_timm_alone_loads_a_timm_native_run_folder(tmp_path):
    out, model = _export(tmp_path, "resnet10t", RGB)
    assert {p.name for p in out.iterdir()} == FILES  # no temporary files left behind
    x = _images(RGB)
    got, timm_logits = _timm_only(tmp_path, out, x)
    assert got["kdcli"] is False and got["arch"] == "resnet10t"
    assert got["label_names"] == RGB.class_names
    cfg = got["data_config"]
    assert tuple(cfg["input_size"]) == (3, 16, 16)
    assert cfg["mean"] == pytest.approx(RGB.mean) and cfg["std"] == pytest.approx(RGB.std)
    assert cfg["crop_pct"] == 1.0
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(timm_logits, expected, atol=1e-5, rtol=1e-5)


def test_timm_transform_matches_kdcli_preprocessing(tmp_path):
    out, model = _export(tmp_path, "resnet10t", RGB)
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))
    image = Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy())
    kdcli_x = ImageTransform(3, 16)(image).unsqueeze(0)
    timm_x = transform(image).unsqueeze(0)
    torch.testing.assert_close(timm_x, (kdcli_x - model.mean) / model.std, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(net(timm_x), model(kdcli_x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, facts", [("cifar_resnet8", DIGITS), ("cifar_wrn_16_1", CIFAR),
                                         ("cifar_vit_micro_p4", DIGITS)])
def test_cifar_run_folder_loads_through_timm(tmp_path, arch, facts):
    import kdcli  # noqa: F401  (all that timm needs for the cifar_* architectures)

    out, model = _export(tmp_path, arch, facts)
    x = _images(facts)
    with torch.no_grad():
        expected = model(x).logits
    weights = dict(file=str(out / "model.safetensors"))
    for net in (timm.create_model(f"local-dir:{out}", pretrained=True),
                # the weights file alone: a kdcli checkpoint also supplies its classes, channels, mean/std
                timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=weights)):
        net.eval()
        cfg = timm.data.resolve_data_config({}, model=net)
        assert tuple(cfg["input_size"]) == (facts.in_chans, facts.image_size, facts.image_size)
        assert list(cfg["mean"]) == pytest.approx(model.meta.mean) and list(cfg["std"]) == pytest.approx(model.meta.std)
        assert net.num_classes == facts.num_classes and list(net.pretrained_cfg["label_names"]) == facts.class_names
        with torch.no_grad():
            torch.testing.assert_close(net(_normalise(x, cfg)), expected, atol=1e-5, rtol=1e-5)


def test_config_json_is_timms_format(tmp_path):
    out, model = _export(tmp_path, "cifar_resnet8", DIGITS)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "cifar_resnet8"
    assert config["num_classes"] == 10 and config["num_features"] == model.net.num_features
    assert config["label_names"] == DIGITS.class_names
    assert config["model_args"]["in_chans"] == 1 and config["model_args"]["num_classes"] == 10
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [1, 8, 8]
    assert pre["mean"] == pytest.approx([0.3]) and pre["std"] == pytest.approx([0.2])
    assert pre["crop_pct"] == 1.0 and pre["interpolation"] == "bilinear" and pre["crop_mode"] == "center"
    assert pre["first_conv"] == "conv1" and pre["classifier"] == "fc" and pre["num_classes"] == 10
    # timm reads it back the way it reads a Hub model's config.json
    from timm.models._hub import load_model_config_from_path

    cfg, name, args = load_model_config_from_path(out)
    assert name == "cifar_resnet8" and args["in_chans"] == 1
    assert cfg["label_names"] == DIGITS.class_names and cfg["source"] == "local-dir"


def test_config_drops_the_provenance_of_initial_weights(tmp_path):
    out, _ = _export(tmp_path, "resnet10t", RGB)  # timm's registered cfg names ImageNet weights, tag, license
    pre = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert not {"tag", "license", "hf_hub_id", "url", "test_input_size", "test_crop_pct"} & set(pre)
    assert pre["input_size"] == [3, 16, 16] and pre["num_classes"] == 5


def _report(**overrides):
    data = {"dataset": "digits", "source": "builtin", "train_split": "train", "eval_split": "test",
            "num_classes": 10, "class_names": DIGITS.class_names, "num_train": 1437, "num_eval": 360,
            "image_size": 8, "in_chans": 1, "streaming": False,
            "corruption": {"noise": "symmetric:0.4", "imbalance": None, "seed": 3, "class_order": None,
                           "num_examples": 1437, "num_changed": 517, "noise_rate": 517 / 1437}}
    final = {"num_examples": 360, "top1": 0.9361, "top5": 0.9972, "nll": 0.2345, "ece": 0.0312,
             "per_class_top1": {}, "teacher_agreement": 0.95, "teacher_kl": 0.1234}
    values = dict(
        command="distill", created="2026-01-02T03:04:05+00:00",
        config={"command": "distill", "student": "cifar_resnet8", "teacher": "runs/teacher/model.safetensors",
                "method": "kd", "method_args": {"t": "4"}, "dataset": "digits", "noise": "symmetric:0.4",
                "epochs": 12, "batch_size": 64, "lr": 0.05, "seed": 7, "precision": "fp32"},
        environment={"python": "3.11", "torch": "2.5", "timm": "1.0", "platform": "x", "device": "cpu",
                     "world_size": 1, "precision": "fp32"},
        data=data,
        teacher={"name": "cifar_resnet26", "source": "checkpoint", "params": 370_000},
        student={"name": "cifar_resnet8", "source": "timm", "params": 78_042},
        method={"name": "kd", "family": "logits", "args": {"alpha": 0.9, "t": 4.0}},
        metrics={"final": final, "best": {"epoch": 11, "top1": 0.9417}},
        history=[], timing={"total_seconds": 90.0, "train_images_per_s": 1000.0})
    values.update(overrides)
    return Report(**values)


def _front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_from_the_report(tmp_path):
    out, model = _export(tmp_path, "cifar_resnet8", DIGITS, _report())
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "timm"
    assert meta["tags"] == ["image-classification", "timm", "knowledge-distillation", "kdcli"]
    assert "license" not in meta  # not known
    for fact in ("cifar_resnet8", f"{model.num_params:,}", "`digit 0`", "kdcli distill", "cifar_resnet26",
                 "`kd`", '{"alpha": 0.9, "t": 4.0}', "`digits`", "`train`", "`test`", "symmetric:0.4",
                 "35.98 %", "517 of 1,437", "Epochs: 12", "seed: 7",
                 "| 93.61 | 99.72 | 0.2345 | 0.0312 |", "Best epoch: 11, top-1 94.17 %", "95.00 %",
                 'timm.create_model("local-dir:path/to/cifar_resnet8", pretrained=True)', "hf-hub:USER/REPO",
                 "import kdcli", "resolve_data_config", "create_transform", '.convert("L")',
                 "kdcli evaluate path/to/cifar_resnet8 --dataset digits"):
        assert fact in card, fact
    config = json.loads((out / "config.json").read_text())
    description = config["pretrained_cfg"]["description"]
    assert description == "cifar_resnet8 distilled from cifar_resnet26 with kd on digits by kdcli"


def test_model_card_for_training_without_teacher_and_without_report(tmp_path):
    report = _report(command="train", teacher=None, method={"name": "ce", "family": "labels", "args": {}},
                     data={**_report().data.model_dump(), "corruption": None, "source": "hub",
                           "dataset": "someone/tiny-digits"})
    out, _ = _export(tmp_path, "resnet10t", RGB, report)
    card = (out / "README.md").read_text()
    assert _front_matter(card)["datasets"] == ["someone/tiny-digits"]
    assert "Teacher: none" in card and "Label noise" not in card and "Trained alongside" not in card
    assert "import kdcli" not in card and '.convert("RGB")' in card

    bare = tmp_path / "bare"
    model = models.load("resnet10t", RGB).model
    ckpt.save(bare / "model.safetensors", model.net, model.meta)
    write_model_folder(bare, model, model.meta, None)  # a Classifier is unwrapped; no report: no metrics
    card = (bare / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "timm"
    assert "## Results" not in card and "## Training" not in card and "local-dir:path/to/bare" in card
    write_model_folder(bare, model.net, model.meta, report)  # writing again replaces the files
    assert {p.name for p in bare.iterdir()} == FILES and "## Results" in (bare / "README.md").read_text()


@pytest.mark.parametrize("code", [
    # kdcli first: torch and timm are not imported by kdcli itself (every kdcli command starts fast) ...
    "import sys, kdcli; assert 'torch' not in sys.modules and 'timm' not in sys.modules; import timm",
    # ... and registered when timm comes, however it is imported
    "import kdcli; from timm.models import create_model as c; import timm",
    "import timm, kdcli",  # timm first: registered at once
])
def test_import_kdcli_registers_the_cifar_models(code):
    code += "; print(timm.is_model('cifar_resnet8'), timm.is_model('cifar_vit_micro_p4'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]


def test_model_card_of_an_online_run_and_a_hub_initialised_student(tmp_path):
    base = _report()
    peer = {"model": {"name": "cifar_resnet14", "source": "timm", "params": 175_000},
            "metrics": {**base.metrics.final.model_dump(), "top1": 0.9111}}
    report = _report(peer=peer, teacher=peer["model"], method={"name": "dml", "family": "online", "args": {}},
                     student={"name": "hf-hub:someone/cifar_resnet8.digits@main", "source": "hf-hub", "params": 1})
    out, _ = _export(tmp_path, "cifar_resnet8", DIGITS, report)
    card = (out / "README.md").read_text()
    assert _front_matter(card)["base_model"] == ["someone/cifar_resnet8.digits"]
    assert "Trained alongside: `cifar_resnet14`" in card and "Teacher:" not in card
    assert "Student: `hf-hub:someone/cifar_resnet8.digits@main`, initialised from its Hugging Face Hub" in card
    assert "| peer `cifar_resnet14` (not these weights) | 91.11 |" in card
    assert "`cifar_resnet8` trained alongside `cifar_resnet14` with `dml` on `digits`" in card


def test_a_real_run_folder_loads_in_plain_timm_with_the_run_s_own_evaluation(tmp_path):
    """``kdcli train`` on a timm-native architecture; plain timm (no kdcli import) loads the run folder and,
    on the evaluation images, gives the logits kdcli's own evaluation gives: the same top-1 as the report."""
    from kdcli.data import open_data
    from tests.test_cli import kdcli

    out = tmp_path / "run"
    kdcli("train", "--model", "resnet10t", "--dataset", "synthetic:16:4:64", "--epochs", "2", "--batch-size", "16",
          "--out", out)
    report = Report.model_validate_json((out / "report.json").read_text())
    data = open_data("synthetic:16:4:64")
    items = [data.eval_dataset()[i] for i in range(data.num_eval)]
    x, y = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
    got, timm_logits = _timm_only(tmp_path, out, x)
    assert got["kdcli"] is False
    with torch.no_grad():
        kdcli_logits = models.load(str(out / "model.safetensors"), models.DataFacts(
            num_classes=4, in_chans=3, image_size=16, class_names=report.data.class_names)).model.eval()(x).logits
    torch.testing.assert_close(timm_logits, kdcli_logits, atol=1e-5, rtol=1e-5)
    assert (timm_logits.argmax(1) == y).float().mean().item() == pytest.approx(report.metrics.final.top1)
