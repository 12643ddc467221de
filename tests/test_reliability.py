"""Preemption and requeue, one run per folder, unwritable or full output, file modes, unwrapped logs."""

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdcli.engine import loop, session
from kdcli.engine.report import Report
from kdcli.engine.rundir import LOCK_FILE, RunLock
from kdcli.models import checkpoint as ckpt
from tests.test_cli import fails, kdcli

# digits: 1,437 training images, 22 full batches of 64 per epoch
RUN = ["train", "--model", "cifar_resnet8", "--dataset", "digits", "--epochs", "3", "--batch-size", "64"]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), "weights differ"
    ra = Report.model_validate_json((a / "report.json").read_text())
    rb = Report.model_validate_json((b / "report.json").read_text())
    assert [h.terms for h in ra.history] == [h.terms for h in rb.history]
    assert ra.metrics.final == rb.metrics.final


def _signal_after(monkeypatch, steps: int, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to this process once ``steps`` training steps have run (in the middle of a step's
    aftermath, as a scheduler's signal would arrive at any time)."""
    real = session.Session.train_step
    count = {"n": 0}

    def step(self, images, labels, index=None, **kw):
        terms = real(self, images, labels, index, **kw)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signum)
        return terms

    monkeypatch.setattr(session.Session, "train_step", step)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    kdcli(*RUN, "--out", out)
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_then_auto_resume_is_the_uninterrupted_run(whole, tmp_path, monkeypatch, capsys, signum):
    out = tmp_path / "run"
    _signal_after(monkeypatch, 22 + 7, signum)  # epoch 2, step 7
    with pytest.raises(SystemExit) as exc:
        kdcli(*RUN, "--out", out, "--auto-resume")
    assert exc.value.code == 128 + signum
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name} at epoch 2, step 7" in err and "--auto-resume" in err
    progress = json.loads((out / "resume" / "progress.json").read_text())
    assert progress["epoch"] == 1 and progress["partial"]["step"] == 7
    assert not (out / "report.json").exists() and not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    kdcli(*RUN, "--out", out, "--auto-resume")  # the same command line continues it
    _same_run(whole, out)
    assert not (out / "resume").exists()  # a finished run keeps no resume state


def test_signal_at_the_end_of_an_epoch_and_twice(whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _signal_after(monkeypatch, 22)  # the last step of epoch 1
    with pytest.raises(SystemExit) as exc:
        kdcli(*RUN, "--out", out)
    assert exc.value.code == 143
    monkeypatch.undo()
    _signal_after(monkeypatch, 1)  # the first step after resuming
    with pytest.raises(SystemExit):
        kdcli("train", "--resume", out)
    monkeypatch.undo()
    kdcli("train", "--resume", out)
    _same_run(whole, out)


def test_a_signal_before_the_first_resumed_step_keeps_the_interrupted_random_state(tmp_path, monkeypatch, capsys):
    """Stopped at epoch 2, step 7; the resumed run is stopped again before it takes a step (a signal during the
    load): the state saved again is the interrupted run's, so the run still ends as the uninterrupted one (with
    mixup, whose draws come from the global random state)."""
    from accelerate import Accelerator

    run = [*RUN, "--mixup", "0.5"]
    whole = tmp_path / "whole"
    kdcli(*run, "--out", whole)
    out = tmp_path / "run"
    _signal_after(monkeypatch, 22 + 7)
    with pytest.raises(SystemExit):
        kdcli(*run, "--out", out)
    monkeypatch.undo()
    real = Accelerator.skip_first_batches

    def skip(self, loader, num_batches=0):
        os.kill(os.getpid(), signal.SIGTERM)  # pending when the first resumed batch arrives
        return real(self, loader, num_batches)

    monkeypatch.setattr(Accelerator, "skip_first_batches", skip)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        kdcli("train", "--resume", out)
    assert exc.value.code == 143 and "at epoch 2, step 7" in capsys.readouterr().err
    monkeypatch.undo()
    kdcli("train", "--resume", out)
    _same_run(whole, out)


def test_resume_continues_the_folder_it_is_given_with_its_own_options(tmp_path, capsys):
    """A stopped run copied elsewhere continues in the copy (never in the folder it was started in); options
    beside --resume, or the other command, are refused rather than silently ignored."""
    import shutil

    first = tmp_path / "first"
    kdcli(*RUN[:-4], "--epochs", "2", "--batch-size", "256", "--out", first, "--stop-after-epoch", "1")
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    assert "drop --epochs, --lr" in fails(capsys, "train", "--resume", copy, "--epochs", "5", "--lr", "0.1")
    assert "drop --model" in fails(capsys, "train", "--resume", copy, "--model", "cifar_resnet14")
    assert f"holds a kdcli train run: continue it with kdcli train --resume {copy}" in fails(
        capsys, "distill", "--resume", copy)
    kdcli("train", "--resume", copy)
    report = Report.model_validate_json((copy / "report.json").read_text())
    assert report.config["out"] == str(copy) and report.config["epochs"] == 2
    assert not (first / "report.json").exists() and (first / "resume").is_dir()  # the original is untouched


def test_resume_with_another_number_of_processes_is_refused(tmp_path, capsys):
    """A run resumed by another number of processes would train on another batch (per-process --batch-size)
    with another number of updates per epoch: refused with one line, here at an epoch boundary (mid-epoch the
    saved RNG states, one per process, were already counted)."""
    out = tmp_path / "run"
    kdcli(*RUN[:-4], "--epochs", "2", "--batch-size", "256", "--out", out, "--stop-after-epoch", "1")
    progress_file = out / "resume" / "progress.json"
    progress = json.loads(progress_file.read_text())
    assert progress["world_size"] == 1 and progress["partial"] is None  # stopped at the epoch's end
    progress_file.write_text(json.dumps({**progress, "world_size": 2}))  # as a 2-process run would have saved
    for how in (["train", "--resume", out], [*RUN[:-4], "--epochs", "2", "--batch-size", "256", "--out", out,
                                             "--auto-resume"]):
        err = fails(capsys, *how)
        assert f"{out} was trained with 2 processes" in err and "(not 1)" in err and "--overwrite" in err
    progress_file.write_text(json.dumps(progress))
    kdcli("train", "--resume", out)  # the same number: it continues
    assert Report.model_validate_json((out / "report.json").read_text()).history[-1].epoch == 2


def test_sigterm_to_a_real_process(tmp_path):
    """A separate process, killed as a scheduler would (mid-run), exits 143 with one line; the same
    command line then finishes it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdcli", "train", "--model", "cifar_resnet8", "--dataset", "synthetic:16:4:2000",
           "--epochs", "3", "--out", str(out), "--auto-resume"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the first epoch's line: training is under way
    assert first.startswith("epoch 1/3"), first + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "stopped by SIGTERM" in err
    assert json.loads((out / "resume" / "progress.json").read_text())["epoch"] >= 1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Report.model_validate_json((out / "report.json").read_text()).history[-1].epoch == 3


def test_auto_resume_starts_continues_skips_and_refuses(tmp_path, monkeypatch, capsys):
    args = ["train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:64", "--epochs", "2",
            "--out", tmp_path / "r", "--auto-resume"]
    kdcli(*args)  # nothing there: starts
    report = (tmp_path / "r" / "report.json").read_text()
    monkeypatch.setattr(loop, "build", lambda *a, **k: pytest.fail("a finished run was trained again"))
    kdcli(*args)  # finished with the same options: nothing to do
    assert (tmp_path / "r" / "report.json").read_text() == report
    err = fails(capsys, *[a if a != "2" else "3" for a in args])
    assert "other options" in err and "--epochs 2 → 3" in err
    assert "exclude each other" in fails(capsys, *args, "--overwrite")


# ----------------------------------------------------------------------------- one run per folder


def _hold_lock(folder: Path):
    """Another process holding the run folder's lock, as a running kdcli does."""
    code = ("import sys, time; from pathlib import Path; from kdcli.engine.rundir import RunLock; "
            "lock = RunLock(Path(sys.argv[1]), 'kdcli train --out x').acquire(); print('locked', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("how", ["--overwrite", "--auto-resume", "--resume"])
def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, capsys, how):
    out = tmp_path / "r"
    args = ["train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:64", "--epochs", "2", "--out", out]
    kdcli(*args, "--stop-after-epoch", "1")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "resume").iterdir()}
    holder = _hold_lock(out)
    try:
        err = fails(capsys, *(["train", "--resume", out] if how == "--resume" else [*args, how]))
        assert f"pid {holder.pid}" in err and "in use by another kdcli run" in err
        assert {p.name: p.stat().st_mtime_ns for p in (out / "resume").iterdir()} == before  # untouched
    finally:
        holder.kill()
        holder.wait()
    # a lock left by a killed process does not block
    kdcli("train", "--resume", out)
    assert (out / "report.json").exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path / "r"):
        with pytest.raises(Exception, match="in use by another kdcli run"):
            RunLock(tmp_path / "r").acquire()
    with RunLock(tmp_path / "r"):  # released: free again
        pass


# ----------------------------------------------------------------------------- output that cannot be written


def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "build", lambda *a, **k: pytest.fail("trained into an unwritable folder"))
    args = ["train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:64", "--epochs", "1"]
    (tmp_path / "file").write_text("x")
    assert "not a folder" in fails(capsys, *args, "--out", tmp_path / "file")
    assert "cannot be created" in fails(capsys, *args, "--out", tmp_path / "file" / "sub")
    if os.geteuid() != 0:  # permissions bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert "cannot be" in fails(capsys, *args, "--out", locked / "run")
        assert "cannot be written" in fails(capsys, *args, "--out", locked)
    else:  # root: a folder even root cannot create (sysfs refuses new entries)
        assert "cannot be created" in fails(capsys, *args, "--out", "/sys/kdcli-test-run")


def _disk_full_after(monkeypatch, writes: int) -> None:
    real = ckpt.save_model
    count = {"n": 0}

    def save_model(*a, **k):
        count["n"] += 1
        if count["n"] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_model", save_model)


@pytest.mark.parametrize("writes", [1, 3])  # fails saving epoch 2's resume state / the final checkpoint
def test_a_full_disk_keeps_the_last_good_state(whole, tmp_path, monkeypatch, capsys, writes):
    out = tmp_path / "run"
    _disk_full_after(monkeypatch, writes)
    err = fails(capsys, *RUN, "--out", out)
    assert "No space left on device" in err and "intact" in err
    progress = json.loads((out / "resume" / "progress.json").read_text())
    assert progress["epoch"] == writes  # the last good state
    assert all((out / "resume" / f).is_file() for f in (progress["files"]["state"], progress["files"]["optimizer"]))
    assert not (out / "report.json").exists() and not (out / "model.safetensors").exists()
    assert not [p for p in out.rglob(".*.tmp")]  # no temporary files left behind
    monkeypatch.undo()
    kdcli(*RUN, "--out", out, "--auto-resume")
    _same_run(whole, out)


# ----------------------------------------------------------------------------- output that others can use


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_honour_the_umask(tmp_path, umask):
    ckpt._file_mode.cache_clear()
    old = os.umask(umask)
    try:
        out = tmp_path / "r"
        kdcli("train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:64", "--epochs", "2", "--out", out,
              "--stop-after-epoch", "1")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "resume").iterdir()}
        kdcli("train", "--resume", out)
        modes.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()})
    finally:
        os.umask(old)
        ckpt._file_mode.cache_clear()
    assert {"progress.json", "model.safetensors", "report.json"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_log_lines_are_never_wrapped_when_not_a_terminal(tmp_path):
    out = tmp_path / ("a-long-folder-name-" * 4) / "run"
    proc = subprocess.run([sys.executable, "-m", "kdcli", "train", "--model", "cifar_resnet8", "--dataset",
                           "synthetic:8:4:64", "--epochs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2 and all(re.search(r"img/s +\d+\.\ds$", ln) for ln in epochs), lines
    assert any(len(ln) > 80 for ln in lines)  # long lines stay long
    assert [ln for ln in lines if ln.startswith("done:")][0].endswith("report.json")
    assert "\x1b[" not in proc.stdout  # no bar, no colour codes in a file


def test_interrupted_run_tells_how_to_continue_even_when_quick(tmp_path):
    """A SIGTERM that arrives before training starts ends with one line and nothing that looks finished."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kdcli", "train", "--model", "cifar_resnet8", "--dataset",
                             "synthetic:8:4:64", "--epochs", "50", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / LOCK_FILE).exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and len(err.strip().splitlines()) == 1 and "SIGTERM" in err
    assert not (out / "report.json").exists()


def test_first_signal_asks_to_stop_a_second_ctrl_c_stops_at_once():
    from kdcli.engine.signals import StopOnSignal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.requested() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM  # the first one decides the exit status
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


TWO_PROCESS_STOP = """
import os, signal, sys
from kdcli.engine import session
from kdcli.cli import main

steps = int(os.environ.get("KDCLI_TEST_STOP_AFTER", "0"))
if steps:
    real, count = session.Session.train_step, {"n": 0}

    def step(self, images, labels, index=None, **kw):
        terms = real(self, images, labels, index, **kw)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signal.SIGTERM)  # each process, at the same step, as a scheduler's signal
        return terms

    session.Session.train_step = step
main(sys.argv[1:])
"""


def test_two_processes_stopped_mid_epoch_resume_to_the_same_epoch_loss(tmp_path):
    """A two-process run stopped in the middle of epoch 1 and resumed: the epoch's loss is over every process's
    examples once, as in the run that was not stopped (each process's part saved, not rank 0's for all)."""
    script = tmp_path / "stop.py"
    script.write_text(TWO_PROCESS_STOP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = 29700 + os.getpid() % 89

    def launch(out: Path, stop_after: int, resume: bool = False) -> subprocess.CompletedProcess:
        args = (["train", "--resume", str(out)] if resume else
                ["train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:256", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out)])
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port + stop_after + 3 * resume), str(script), *args]
        return subprocess.run(cmd, env={**env, "KDCLI_TEST_STOP_AFTER": str(stop_after)}, capture_output=True,
                              text=True, timeout=300)

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert launch(whole, 0).returncode == 0
    stopped = launch(part, 3)  # 8 steps per process in the epoch
    assert stopped.returncode != 0 and "stopped by SIGTERM" in stopped.stdout + stopped.stderr  # the launcher: 1
    progress = json.loads((part / "resume" / "progress.json").read_text())
    assert progress["partial"]["step"] == 3 and progress["partial"]["seen"] == 2 * 3 * 16  # both processes'
    done = launch(part, 0, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (Report.model_validate_json((f / "report.json").read_text()) for f in (whole, part))
    assert b.history[0].images == a.history[0].images == 256
    assert b.history[0].terms == pytest.approx(a.history[0].terms, rel=1e-4)
