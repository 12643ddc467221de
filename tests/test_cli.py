"""End to end through the CLI: train → distill → evaluate on digits, resume, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdcli.cli import main
from kdcli.engine.report import EvalReport, Report

FAST = ["--epochs", "2", "--batch-size", "64"]


def kdcli(*args: str) -> None:
    """Run kdcli in-process; a clean exit is fine, anything else propagates."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def fails(capsys, *args: str) -> str:
    """Run kdcli expecting a user error: exit 2, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        kdcli(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher, a CE student and a KD student on digits (tiny schedule)."""
    root = tmp_path_factory.mktemp("runs")
    kdcli("train", "--model", "cifar_resnet14", "--dataset", "digits", "--epochs", "4", "--out", root / "teacher")
    kdcli("train", "--model", "cifar_resnet8", "--dataset", "digits", *FAST, "--out", root / "ce")
    kdcli("distill", "--teacher", root / "teacher" / "model.safetensors", "--student", "cifar_resnet8",
          "--method", "kd", "--dataset", "digits", *FAST, "--out", root / "kd")
    return root


def test_end_to_end_train_distill_evaluate(runs, capsys):
    teacher = Report.model_validate_json((runs / "teacher" / "report.json").read_text())
    assert teacher.command == "train" and teacher.method.name == "ce" and teacher.teacher is None
    assert teacher.metrics.final.top1 > 0.5  # real digits, 4 epochs: well above chance (0.1)
    kd = Report.model_validate_json((runs / "kd" / "report.json").read_text())
    assert kd.schema_version == 1 and kd.command == "distill"
    assert kd.teacher.source == "checkpoint" and kd.teacher.name == "cifar_resnet14"
    assert kd.teacher.sha256 == teacher.student.sha256  # the very file the teacher run wrote
    assert kd.method.args == {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False, "ensemble": "mean"}
    assert [h.epoch for h in kd.history] == [1, 2]
    assert set(kd.history[0].terms) == {"ce", "kd"}
    assert kd.history[0].loss == pytest.approx(sum(kd.history[0].terms.values()))
    assert kd.history[1].lr < kd.history[0].lr  # cosine
    final = kd.metrics.final
    assert final.num_examples == kd.data.num_eval == 360 and kd.data.num_train == 1437
    assert 0 <= final.teacher_agreement <= 1 and final.teacher_kl >= 0
    assert set(final.per_class_top1) == {str(i) for i in range(10)}
    assert kd.metrics.best.top1 == max(h.eval_top1 for h in kd.history)
    assert kd.environment.world_size == 1 and kd.timing.train_images_per_s > 0
    assert kd.config["method"] == "kd" and kd.config["dataset"] == "digits"

    out = runs / "kd_eval.json"
    capsys.readouterr()
    kdcli("evaluate", runs / "kd" / "model.safetensors", "--dataset", "digits",
          "--teacher", runs / "teacher" / "model.safetensors", "--out", out)
    assert "top-1" in capsys.readouterr().out
    ev = EvalReport.model_validate_json(out.read_text())
    assert ev.command == "evaluate" and ev.checkpoint.name == "cifar_resnet8"
    # evaluating the saved student reproduces the run's final metrics
    assert ev.metrics.final.top1 == pytest.approx(final.top1)
    assert ev.metrics.final.nll == pytest.approx(final.nll, rel=1e-4)
    assert ev.metrics.final.teacher_agreement == pytest.approx(final.teacher_agreement)


def test_checkpoint_describes_itself(runs):
    from safetensors import safe_open
    with safe_open(str(runs / "kd" / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["kdcli"])
    assert meta["architecture"] == "cifar_resnet8" and meta["num_classes"] == 10 and meta["in_chans"] == 1
    assert meta["input_size"] == 8 and meta["trained"]["method"] == "kd"


def test_finished_run_is_refused_unless_overwrite(runs, capsys):
    err = fails(capsys, "train", "--model", "cifar_resnet8", "--dataset", "digits", "--out", runs / "ce")
    assert "holds a finished run" in err and "--overwrite" in err


def test_resume_gives_the_same_weights_bit_for_bit(tmp_path):
    common = ["--model", "cifar_resnet8", "--dataset", "synthetic:8:4:128", "--epochs", "3",
              "--batch-size", "32", "--schedule", "step"]
    kdcli("train", *common, "--out", tmp_path / "whole")
    kdcli("train", *common, "--out", tmp_path / "parts", "--stop-after-epoch", "1")
    assert not (tmp_path / "parts" / "report.json").exists()
    assert json.loads((tmp_path / "parts" / "resume" / "progress.json").read_text())["epoch"] == 1
    kdcli("train", "--resume", tmp_path / "parts")
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = Report.model_validate_json((tmp_path / "whole" / "report.json").read_text())
    rb = Report.model_validate_json((tmp_path / "parts" / "report.json").read_text())
    assert [h.loss for h in ra.history] == [h.loss for h in rb.history]
    assert ra.metrics.final == rb.metrics.final


def test_interrupted_run_must_be_resumed_or_overwritten(tmp_path, capsys):
    args = ["train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:64", "--epochs", "2",
            "--out", tmp_path / "r"]
    kdcli(*args, "--stop-after-epoch", "1")
    assert "--resume" in fails(capsys, *args)
    kdcli(*args, "--overwrite")
    assert (tmp_path / "r" / "report.json").exists()
    assert "nothing to resume" in fails(capsys, "train", "--resume", tmp_path / "r")


@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    save_file({"w": torch.zeros(2)}, str(d / "foreign.safetensors"))
    (d / "notes.pth").write_bytes(b"not a checkpoint")
    torch.save({"w": torch.zeros(2)}, d / "weights.pth")
    (d / "noimage").mkdir()
    from datasets import Dataset
    Dataset.from_dict({"pic": [[0.0]] * 4, "target": [0, 1, 0, 1]}).save_to_disk(str(d / "noimage" / "ds"))
    return d


@pytest.mark.parametrize("args, expected", [
    (["train", "--model", "resnet_nope18", "--dataset", "digits"], "unknown model 'resnet_nope18'"),
    (["train", "--model", "cifar_resnet2", "--dataset", "digits"], "did you mean: .*cifar_resnet20"),
    (["distill", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8", "--method", "nope",
      "--dataset", "digits"], "unknown method 'nope'; available methods: .*ce.*kd"),
    (["train", "--model", "cifar_resnet8", "--dataset", "./no/such/folder"], "does not exist"),
    (["train", "--model", "cifar_resnet8", "--dataset", "someone/not-a-dataset"], "offline"),
    (["train", "--model", "cifar_resnet8", "--dataset", "digits", "--epochs", "0"], "invalid --epochs"),
    (["train", "--model", "cifar_resnet8", "--dataset", "digits", "--batch-size", "-1"], "invalid --batch-size"),
    (["train", "--model", "cifar_resnet8", "--dataset", "digits", "--lr", "0"], "invalid --lr"),
    (["train", "--model", "cifar_resnet8", "--dataset", "digits", "--seed", "-1"], "invalid --seed"),
    (["train", "--model", "cifar_resnet8", "--dataset", "digits", "--seed", str(2**31)], "invalid --seed"),
    (["train", "--model", "cifar_resnet8", "--dataset", "digits", "--schedule", "linear"], "invalid --schedule"),
    (["train", "--dataset", "digits"], "missing option --student|missing option --model"),
    (["distill", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8", "--dataset", "digits",
      "--method-arg", "T"], "not KEY=VALUE"),
    (["distill", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8", "--dataset", "digits",
      "--method-arg", "tau=2"], "no argument 'tau'"),
    (["distill", "--student", "cifar_resnet8", "--dataset", "digits", "--method", "kd",
      "--teacher", "FILES/foreign.safetensors"], "not a kdcli checkpoint"),
    (["distill", "--student", "cifar_resnet8", "--dataset", "digits", "--method", "kd",
      "--teacher", "FILES/notes.pth"], "not a readable safetensors file"),
    (["distill", "--student", "cifar_resnet8", "--dataset", "digits", "--method", "kd",
      "--teacher", "cifar_resnet8", "--teacher-weights", "FILES/weights.pth"], "do not fit cifar_resnet8"),
    (["train", "--model", "cifar_resnet8", "--dataset", "FILES/noimage/ds"], "image column.*pic.*target"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path, capsys, foreign_files):
    args = [a.replace("FILES", str(foreign_files)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    err = fails(capsys, *args)
    assert err.startswith("error:")
    import re
    assert re.search(expected, err), err
    assert not (tmp_path / "out" / "report.json").exists()


def test_teacher_with_other_class_count_is_refused(runs, capsys, tmp_path):
    err = fails(capsys, "distill", "--teacher", runs / "teacher" / "model.safetensors", "--student", "cifar_resnet8",
                "--dataset", "synthetic:8:4:64", "--out", tmp_path / "x")
    assert "has 10 classes but the dataset has 4" in err


def test_debug_shows_the_traceback(tmp_path):
    from kdcli.errors import KdcliError
    with pytest.raises(KdcliError):
        kdcli("train", "--model", "nope_net", "--dataset", "digits", "--out", tmp_path, "--debug")


def test_methods_lists_the_registry(capsys):
    kdcli("methods")
    out = capsys.readouterr().out
    from kdcli import methods
    study = {"kd", "fitnet", "at", "fsp", "ft", "ab", "bss", "rkd", "sp", "dml"}
    modern = {"dkd", "dist", "lskd", "nkd", "pkt", "nst", "cc", "vid", "crd", "reviewkd"}
    assert set(methods.available()) == study | modern | {"ce"}
    for name in methods.available():  # each with its family, its source and its defaults, on lines of its own
        block = out.split(f"\n{name}  ", 1)[1].split("\n\n")[0]
        assert methods.get(name).family in block and "source: " in block and "defaults: " in block
    assert "T=4.0 ce_weight=0.1 kd_weight=0.9" in out and "Decoupled" in out


# a finished run folder: the checkpoint, the report, and timm's config.json and model card
FOLDER = ["README.md", "config.json", "model.safetensors", "report.json"]
TWO_PROCESS_RUNS = {
    "train": (["train", "--model", "cifar_resnet8"], FOLDER),
    # a warm-up stage that reads one feature map: DDP must still finish its reduction
    "fitnet+kd": (["distill", "--teacher", "cifar_resnet14", "--student", "cifar_resnet8", "--method", "fitnet+kd",
                   "--method-arg", "fitnet.warmup=0.5"], FOLDER),
    # an online peer: two wrapped models, and a peer evaluation that every process joins
    "dml": (["distill", "--teacher", "cifar_resnet14", "--student", "cifar_resnet8", "--method", "dml"],
            sorted([*FOLDER, "peer.safetensors"])),
    # corrupted labels: each process derives the same labels; the diagnostics gather every example once
    "noise": (["train", "--model", "cifar_resnet8", "--noise", "symmetric:0.4", "--imbalance", "longtail:2"],
              FOLDER),
}


@pytest.mark.parametrize("run", list(TWO_PROCESS_RUNS))
def test_two_process_cpu_run_with_accelerate_launch(run, tmp_path):
    """`accelerate launch -m kdcli` works unchanged; only the main process writes; world size 2."""
    args, expected_files = TWO_PROCESS_RUNS[run]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(29500 + 7 * list(TWO_PROCESS_RUNS).index(run) + os.getpid() % 7)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "kdcli", *args, "--dataset", "synthetic:8:4:128", "--epochs", "1",
           "--batch-size", "16", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = Report.model_validate_json((tmp_path / "ddp" / "report.json").read_text())
    assert rep.environment.world_size == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == expected_files
    assert proc.stdout.count("done:") == 1  # one process reports
    if rep.data.corruption is not None:
        from kdcli.data import open_data
        one = open_data("synthetic:8:4:128").corrupt("symmetric:0.4", "longtail:2")
        got = rep.data.corruption
        assert {k: got[k] for k in one} == one  # the same labels as a single process derives
        d = got["diagnostics"]
        assert d["num_noisy"] + d["num_clean"] == rep.data.num_train and d["num_noisy"] == got["num_changed"]
    assert Path(tmp_path / "ddp" / "model.safetensors").stat().st_size > 0


def test_evaluate_takes_a_run_folder_and_refuses_other_folders(runs, tmp_path, capsys):
    kdcli("evaluate", runs / "ce", "--dataset", "digits", "--out", tmp_path / "e.json")
    assert EvalReport.model_validate_json((tmp_path / "e.json").read_text()).checkpoint.name == "cifar_resnet8"
    assert "nor a run folder" in fails(capsys, "evaluate", tmp_path, "--dataset", "digits")
    for option, value in [("--precision", "fp8"), ("--workers", "-1"), ("--max-bad-fraction", "5")]:
        assert f"invalid {option}" in fails(capsys, "evaluate", runs / "ce", "--dataset", "digits", option, value)
    (tmp_path / "afile").write_text("x")
    assert "is a file" in fails(capsys, "evaluate", runs / "ce", "--dataset", "digits", "--out",
                                tmp_path / "afile" / "e.json")
    # the data's messages name --eval-split, which evaluate takes beside --split
    assert "fix --eval-split" in fails(capsys, "evaluate", runs / "ce", "--dataset", "digits", "--split", "nosuch")
    kdcli("evaluate", runs / "ce", "--dataset", "digits", "--eval-split", "test[:40]", "--out", tmp_path / "s.json")
    assert EvalReport.model_validate_json((tmp_path / "s.json").read_text()).data.num_eval == 40


def test_an_unreadable_resume_state_is_one_line(tmp_path, capsys):
    (tmp_path / "r" / "resume").mkdir(parents=True)
    (tmp_path / "r" / "resume" / "progress.json").write_text("{not json")
    assert "unreadable" in fails(capsys, "train", "--resume", tmp_path / "r")
