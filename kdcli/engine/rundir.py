"""The run folder: what it holds, who may write it, and in what state a run left it.

A run folder (``--out``) holds ``model.safetensors``, ``report.json`` (written last: its presence marks a
finished run), the timm files beside the checkpoint (``config.json``, ``README.md``) and, while a run is
unfinished, ``resume/``. One run writes a folder at a time: :class:`RunLock` holds an exclusive ``flock`` on
``.kdcli.lock`` for the whole run; the kernel drops it when the process dies, so a killed run never blocks
the next.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Literal

from kdcli.config import RunConfig
from kdcli.errors import KdcliError

MODEL_FILE = "model.safetensors"
PEER_FILE = "peer.safetensors"
EMA_FILE = "model_ema.safetensors"  # the student's moving average (--ema)
REPORT_FILE = "report.json"
RESUME_DIR = "resume"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".kdcli.lock"
# files a run writes at its end (cleared by --overwrite)
RESULT_FILES = (REPORT_FILE, MODEL_FILE, PEER_FILE, EMA_FILE, "config.json", "README.md")

State = Literal["fresh", "interrupted", "finished"]


def folder_state(out: Path) -> State:
    if (out / REPORT_FILE).is_file():
        return "finished"
    if (out / RESUME_DIR / PROGRESS_FILE).is_file():
        return "interrupted"
    return "fresh"


def stored_config(out: Path) -> RunConfig:
    """The configuration a finished or interrupted run in ``out`` was started with."""
    state = folder_state(out)
    path = out / REPORT_FILE if state == "finished" else out / RESUME_DIR / PROGRESS_FILE
    if state == "fresh":
        raise KdcliError(f"{out} holds no run (no {REPORT_FILE}, no {RESUME_DIR}/{PROGRESS_FILE})")
    try:
        return RunConfig.model_validate(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError, OSError) as e:  # JSONDecodeError and ValidationError are ValueErrors
        raise KdcliError(f"{path} is unreadable ({str(e).splitlines()[0][:120]}); "
                         "start again with --overwrite") from None


def resumed_config(out: Path) -> RunConfig:
    """The configuration of the interrupted run in ``out`` (``--resume DIR``), writing to ``out``: a run folder
    that was moved or copied continues where it now is, never in the folder it was started in."""
    state = folder_state(out)
    if state == "finished":
        raise KdcliError(f"{out} holds a finished run; nothing to resume")
    if state == "fresh":
        raise KdcliError(f"{out} holds no interrupted run to resume (no {RESUME_DIR}/{PROGRESS_FILE})")
    return stored_config(out).model_copy(update={"out": str(out)})


def differences(stored: dict, wanted: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``option stored → wanted`` for every setting that differs."""
    return [f"--{k.replace('_', '-')} {stored.get(k)!r} → {wanted[k]!r}" for k in wanted
            if k not in ignore and stored.get(k) != wanted[k]]


def decide(out: Path, cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, auto_resume: bool = False,
           ignore: tuple[str, ...] = ("out",),
           remedy: str = "use another --out, or --overwrite to start again") -> State:
    """What to do with ``out`` for ``cfg``: start ``fresh``, continue the ``interrupted`` run, or nothing
    (``finished``: only with ``auto_resume`` and the same options). Anything else is one clear error.
    Settings in ``ignore`` may differ (the folder itself may have moved; a study moves teachers with it);
    ``remedy`` ends the error that other options meet.

    ``auto_resume`` is the rule that lets one command line serve a first start and every requeue: continue
    an interrupted run whose options are the same, start when there is nothing, refuse when they differ.
    """
    if out.exists() and not out.is_dir():
        raise KdcliError(f"--out {out} exists and is not a folder")
    state = folder_state(out)
    if resume:
        if state != "interrupted":
            resumed_config(out)  # raises the reason
        return "interrupted"
    if overwrite:
        return "fresh"
    if auto_resume:
        if state == "fresh":
            return "fresh"
        diff = differences(stored_config(out).model_dump(), cfg.model_dump(), ignore)
        if diff:
            raise KdcliError(f"{out} holds a{' finished' if state == 'finished' else 'n interrupted'} run started "
                             f"with other options ({'; '.join(diff[:4])}): {remedy}")
        return state
    if state == "finished":
        raise KdcliError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose another --out")
    if state == "interrupted":
        raise KdcliError(f"--out {out} holds an interrupted run; continue it with --auto-resume (or --resume {out}), "
                         "or pass --overwrite to start again")
    return "fresh"


def clear(out: Path) -> None:
    """Remove a previous run's results and resume state (``--overwrite``); the lock stays."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)


def write_error(path: Path, e: OSError, out: Path) -> KdcliError:
    """One line for a failed write: what, why, and that the last good state is intact."""
    why = os.strerror(e.errno) if e.errno else str(e)
    kept = (f"the last good resume state in {out / RESUME_DIR} is intact: free space or fix the folder, then "
            f"continue with --auto-resume" if (out / RESUME_DIR / PROGRESS_FILE).is_file()
            else "nothing was kept")
    return KdcliError(f"could not write {path} ({why}); {kept}")


# ----------------------------------------------------------------------------- one run per folder


class RunLock:
    """An exclusive lock on a run folder, held from before the folder is touched until the run ends.

    Creating the folder and the lock file also proves ``--out`` writable before anything is trained.
    A second run on the same folder is refused with one line naming the process that holds it.
    """

    def __init__(self, out: Path, command: str = ""):
        self.out = out
        self.path = out / LOCK_FILE
        self.command = command
        self.fd: int | None = None
        self.created = False  # the folder did not exist before: removed again if the run leaves it empty

    def acquire(self) -> RunLock:
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise KdcliError(f"--out {self.out} exists and is not a folder") from None
        except OSError as e:
            raise KdcliError(f"--out {self.out} cannot be created ({os.strerror(e.errno) if e.errno else e}): "
                             "choose a folder you can write") from None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise KdcliError(f"--out {self.out} cannot be written ({os.strerror(e.errno) if e.errno else e}): "
                                 "choose a folder you can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise KdcliError(f"cannot lock --out {self.out} ({os.strerror(e.errno)})") from None
                raise KdcliError(f"--out {self.out} is in use by another kdcli run ({self._holder()}); wait for it "
                                 "to finish or choose another --out") from None
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        else:
            raise KdcliError(f"cannot lock --out {self.out}: its lock file keeps changing")
        self._write_holder()
        if not os.access(self.out, os.W_OK):  # root passes flock on a read-only folder's existing file
            self.release()
            raise KdcliError(f"--out {self.out} cannot be written (permission denied): choose a folder you can write")
        return self

    def _write_holder(self) -> None:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, info.encode(), 0)
        except OSError as e:
            self.release()
            raise KdcliError(f"--out {self.out} cannot be written ({os.strerror(e.errno) if e.errno else e}): "
                             "choose a folder you can write") from None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, {info.get('command') or 'kdcli'}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        # removed while still held: a run that opened the old file meanwhile sees another inode and retries
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:  # a run that failed before writing anything leaves no folder behind
                self.out.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
