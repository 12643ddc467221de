"""The run options of train and distill: each new option reaches its RunConfig field, --help groups them in
panels, and --config FILE (YAML, TOML, JSON, a finished run's report.json) with the command line winning."""

import json
import re

import pytest

from kdcli.config import RunConfig, default
from kdcli.engine.report import Report
from tests.test_cli import fails, kdcli

TINY = ["--dataset", "synthetic:16:4:64", "--epochs", "1", "--batch-size", "16"]
DISTILL = ["distill", "--teacher", "cifar_resnet14", "--student", "cifar_resnet8", "--method", "kd"]
TRAIN = ["train", "--model", "cifar_resnet8"]
# every option added with the timm-style optimisation, with a value other than its default
NEW_OPTIONS = {
    "opt": (["--opt", "adamw"], "adamw"),
    "no_decay_norm_bias": (["--no-decay-norm-bias"], True),
    "schedule": (["--sched", "multistep"], "multistep"),
    "decay_milestones": (["--decay-milestones", "150,180", "--decay-milestones", "210"], [150, 180, 210]),
    "decay_rate": (["--decay-rate", "0.2"], 0.2),
    "warmup_epochs": (["--warmup-epochs", "5"], 5),
    "warmup_lr": (["--warmup-lr", "0.001"], 0.001),
    "min_lr": (["--min-lr", "1e-6"], 1e-6),
    "sched_on_updates": (["--sched-on-updates"], True),
    "clip_grad": (["--clip-grad", "5"], 5.0),
    "grad_accum": (["--grad-accum", "4"], 4),
    "mixup": (["--mixup", "0.8"], 0.8),
    "cutmix": (["--cutmix", "1.0"], 1.0),
    "label_smoothing": (["--label-smoothing", "0.1"], 0.1),
    "ema": (["--ema", "0.999"], 0.999),
    "channels_last": (["--channels-last"], True),
    "compile": (["--compile"], True),
}


@pytest.fixture
def resolved(monkeypatch):
    """Run a kdcli command line up to the engine and return the RunConfig it would train with."""
    from kdcli.engine import loop

    seen = []
    monkeypatch.setattr(loop, "run", lambda cfg, **kwargs: seen.append(cfg))

    def resolve(*args) -> RunConfig:
        seen.clear()
        kdcli(*args)
        assert len(seen) == 1
        return seen[0]
    return resolve


@pytest.mark.parametrize("command", [DISTILL, TRAIN])
def test_new_options_reach_their_run_config_fields(command, resolved, tmp_path):
    plain = resolved(*command, *TINY, "--out", tmp_path)
    for field in NEW_OPTIONS:  # an option left out is the RunConfig's default
        assert getattr(plain, field) == default(field), field
    args = [a for flags, _ in NEW_OPTIONS.values() for a in flags]
    cfg = resolved(*command, *TINY, "--epochs", "240", *args, "--out", tmp_path)
    for field, (_, expected) in NEW_OPTIONS.items():
        assert getattr(cfg, field) == expected, field
    assert cfg.effective_batch == 64 and cfg.soft_targets
    # --schedule is the same parameter as --sched; each bool has its negative
    assert resolved(*command, *TINY, "--schedule", "step", "--out", tmp_path).schedule == "step"
    cfg = resolved(*command, *TINY, "--decay-norm-bias", "--no-compile", "--out", tmp_path)
    assert cfg.no_decay_norm_bias is False and cfg.compile is False


@pytest.mark.parametrize("args, expected", [
    (["--decay-milestones", "150,x"], "--decay-milestones '150,x' is not a comma-separated list of epochs"),
    (["--sched", "linear"], "invalid --schedule"),
    (["--sched", "multistep"], "--sched multistep needs --decay-milestones"),
    (["--ema", "1.5"], "invalid --ema"),
    (["--grad-accum", "0"], "invalid --grad-accum"),
    (["--label-smoothing", "1"], "invalid --label-smoothing"),
    (["--mixup", "-1"], "invalid --mixup"),
    (["--clip-grad", "0"], "invalid --clip-grad"),
    (["--warmup-epochs", "1"], "--warmup-epochs 1 must be below --epochs 1"),
])
def test_bad_new_option_is_one_line(args, expected, capsys, resolved, tmp_path):
    err = fails(capsys, *DISTILL, *TINY, *args, "--out", tmp_path)
    assert err.startswith("error:") and expected in err, err


def test_help_groups_the_options_in_panels(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    kdcli("distill", "--help")
    out = capsys.readouterr().out
    panels = ["Models", "Method", "Data", "Corruption", "Optimisation", "Speed", "Output"]
    at = {p: out.index(f"─ {p} ─") for p in panels}
    assert list(at.values()) == sorted(at.values())  # in this order
    members = {"Models": ["--teacher-weights", "--student "], "Method": ["--method-arg", "--feature-teacher"],
               "Data": ["--dataset", "--augment"], "Corruption": ["--noise", "--corruption-seed"],
               "Optimisation": ["--mixup", "--sched,--schedule", "--decay-milestones", "--ema", "--seed"],
               "Speed": ["--precision", "--channels-last", "--compile", "--workers"],
               "Output": ["--out", "--config", "--auto-resume", "--stop-after-epoch"]}
    starts = sorted(at.values()) + [len(out)]
    for panel, options in members.items():
        body = out[at[panel]:starts[starts.index(at[panel]) + 1]]
        for option in options:
            assert option in body, (panel, option)
    assert "the teacher sees the same mixed images" in out and "kdcli's default 0, unlike timm's Mixup's 0.1" in out
    assert "[default: the last 3]" in out  # a default written in the help text is shown, not eaten as markup
    kdcli("train", "--help")
    out = capsys.readouterr().out
    assert "─ Optimisation ─" in out and "─ Method ─" not in out and "--cutmix" in out


# ----------------------------------------------------------------------------- --config FILE

def write(path, text: str):
    path.write_text(text)
    return path


def test_yaml_file_gives_the_options_and_the_command_line_wins(resolved, tmp_path):
    f = write(tmp_path / "run.yaml", f"""
command: distill
teacher: cifar_resnet14
student: cifar_resnet8
dataset: synthetic:16:4:64
out: {tmp_path / 'from-file'}
epochs: 3
lr: 0.1
batch-size: 32
sched: multistep
decay_milestones: 150,180
weight_decay: 1e-4
channels-last: true
method_args: {{T: 2, kd_weight: 0.5, standardize: true}}
""")
    cfg = resolved("distill", "--config", f)
    assert (cfg.teacher, cfg.student, cfg.dataset, cfg.out) == (["cifar_resnet14"], "cifar_resnet8",
                                                                "synthetic:16:4:64", str(tmp_path / "from-file"))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.schedule, cfg.decay_milestones) == (3, 0.1, 32, "multistep",
                                                                                        [150, 180])
    assert cfg.weight_decay == 1e-4 and cfg.channels_last is True and cfg.method == "kd"
    assert cfg.method_args == {"T": "2", "kd_weight": "0.5", "standardize": "true"}
    # given on the command line wins, even at the option's default value; left out, the file's value stands
    cfg = resolved("distill", "--config", f, "--epochs", "1", "--lr", str(default("lr")), "--no-channels-last",
                   "--method-arg", "T=8", "--out", tmp_path / "b")
    assert (cfg.epochs, cfg.lr, cfg.channels_last, cfg.out) == (1, default("lr"), False, str(tmp_path / "b"))
    assert cfg.batch_size == 32 and cfg.schedule == "multistep"  # from the file: options left at their default
    assert cfg.method_args == {"T": "8", "kd_weight": "0.5", "standardize": "true"}  # --method-arg sets its keys


def test_toml_file_for_train_with_the_option_spellings(resolved, tmp_path):
    f = write(tmp_path / "run.toml", f"""
model = "cifar_resnet8"
dataset = "synthetic:16:4:64"
out = "{tmp_path / 'r'}"
epochs = 3
batch-size = 16
schedule = "step"
mixup = 0.2
decay-milestones = [2]
""")
    cfg = resolved("train", "--config", f)
    assert (cfg.command, cfg.student, cfg.method, cfg.teacher) == ("train", "cifar_resnet8", "ce", None)
    assert (cfg.epochs, cfg.batch_size, cfg.schedule, cfg.mixup, cfg.decay_milestones) == (3, 16, "step", 0.2, [2])
    cfg = resolved("train", "--config", f, "--model", "cifar_resnet14", "--epochs", "2")
    assert (cfg.student, cfg.epochs, cfg.batch_size) == ("cifar_resnet14", 2, 16)


def test_a_train_report_config_round_trips_through_train(resolved, tmp_path):
    """A train run's report holds every field, distill's at their defaults: train takes it whole."""
    original = RunConfig(command="train", student="cifar_resnet8", dataset="digits", out=str(tmp_path / "a"),
                         epochs=7, opt="adamw", ema=0.99, grad_accum=2)
    f = write(tmp_path / "report.json", json.dumps({"schema_version": 1, "command": "train",
                                                    "config": original.model_dump()}))
    cfg = resolved("train", "--config", f, "--out", tmp_path / "b")
    assert cfg == original.model_copy(update={"out": str(tmp_path / "b")})


@pytest.mark.parametrize("command, name, text, expected", [
    ("distill", "run.yaml", "epoch: 3\nbatchsize: 2\n",
     r"unknown options 'epoch' \(did you mean 'epochs'\?\), 'batchsize' \(did you mean 'batch_size'\?\)"),
    ("train", "run.yaml", "overwrite: true\n", "overwrite is no run option: give --overwrite on the command line"),
    ("train", "run.yaml", "teacher: cifar_resnet14\nmethod: kd\n",
     "sets teacher, method, which kdcli train does not take"),
    ("train", "run.yaml", "method_arg: [T=2]\n", "unknown option 'method_arg'"),
    ("distill", "run.yaml", "command: train\n", "is for kdcli train: use it with kdcli train --config"),
    ("distill", "run.yaml", "command: evaluate\n", r"\(command: 'evaluate'\); kdcli distill takes a distill config"),
    ("distill", "report.json", json.dumps({"command": "train", "config": {"command": "train", "epochs": 2}}),
     "is the report of a kdcli train run: use it with kdcli train --config"),
    ("distill", "report.json", json.dumps({"command": "distill", "config": {"epochs": 2, "mixup_off": True}}),
     "unknown option 'mixup_off'"),
    ("distill", "run.yaml", "batch-size: 8\nbatch_size: 16\n", "gives batch_size twice, as 'batch-size' and"),
    ("distill", "run.yaml", "epochs: [oops\n", "is not a readable YAML file"),
    ("distill", "run.toml", "epochs = \n", "is not a readable TOML file"),
    ("distill", "run.json", "{not json", "is not a readable JSON file"),
    ("distill", "run.yaml", "- epochs\n", "expected a mapping of run options"),
    ("distill", "run.txt", "epochs: 3\n", "give a .yaml, .yml, .toml or .json file"),
    ("distill", "run.yaml", "epochs: 0\n", r"invalid --epochs: .* \(from --config "),
    ("distill", "run.yaml", "epochs: true\n", r"invalid --epochs: expected a number, not true \(from --config "),
    ("distill", "run.yaml", "noise: false\n", r"invalid --noise: expected a value, not false \(from --config "),
    ("distill", "run.yaml", "teacher_image_size: [0]\n", r"invalid --teacher-image-size-0: .* \(from --config "),
    ("distill", "run.yaml", "decay_milestones: 1,x\n", "decay_milestones '1,x' is not a comma-separated list"),
    ("distill", "run.yaml", "method_args: [T]\n", "method_args 'T' is not KEY=VALUE"),
])
def test_bad_config_file_is_one_line(command, name, text, expected, capsys, resolved, tmp_path):
    f = write(tmp_path / name, text)
    base = DISTILL if command == "distill" else TRAIN
    err = fails(capsys, *base, "--dataset", "digits", "--out", tmp_path / "out", "--config", f)
    assert err.startswith("error:") and f"--config {f}" in err and re.search(expected, err), err


def test_config_file_cases_that_need_no_file_content(capsys, resolved, tmp_path):
    assert "does not exist" in fails(capsys, *DISTILL, "--config", tmp_path / "nope.yaml")
    f = write(tmp_path / "run.yaml", "epochs: 2\n")
    err = fails(capsys, "distill", "--student", "cifar_resnet8", "--config", f)
    assert f"missing option --teacher, --dataset, --out (on the command line or in --config {f})" in err
    err = fails(capsys, *TRAIN, "--dataset", "digits", "--out", tmp_path, "--config", f, "--epochs", "0")
    assert "invalid --epochs" in err and "from --config" not in err  # the command line's value, not the file's
    err = fails(capsys, "train", "--config", f, "--resume", tmp_path)
    assert "--config and --resume exclude each other" in err


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny finished distillation with default options."""
    root = tmp_path_factory.mktemp("config")
    kdcli(*DISTILL, *TINY, "--out", root / "A")
    return root


def test_a_report_gives_back_its_run_config(distilled, resolved):
    a = Report.model_validate_json((distilled / "A" / "report.json").read_text())
    cfg = resolved("distill", "--config", distilled / "A" / "report.json", "--out", distilled / "B")
    assert cfg == RunConfig(**{**a.config, "out": str(distilled / "B")})
    assert cfg.model_dump() == {**a.config, "out": str(distilled / "B")}


def test_a_report_repeats_its_run_end_to_end(distilled, capsys):
    kdcli("distill", "--config", distilled / "A" / "report.json", "--out", distilled / "C")
    a = Report.model_validate_json((distilled / "A" / "report.json").read_text())
    c = Report.model_validate_json((distilled / "C" / "report.json").read_text())
    assert c.command == "distill" and c.config == {**a.config, "out": str(distilled / "C")}
    assert "is the report of a kdcli distill run" in fails(capsys, "train", "--config",
                                                           distilled / "A" / "report.json")
