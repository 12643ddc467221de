"""Preemption: SIGTERM (how schedulers preempt) and SIGINT (Ctrl-C) end a run cleanly.

While a run trains, the first such signal only sets a flag: the loop finishes the step in progress, saves the
resume state and raises :class:`Interrupted`, which the CLI turns into one line and exit status 128 + the
signal number. A second SIGINT stops at once (KeyboardInterrupt): the resume state is then the last one saved.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):  # noqa: N818  (a stop on request, not an error)
    """The run stopped on a signal after saving its resume state."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, accelerator=None) -> int:
        """The signal asking to stop (0: none). With several processes, every process gets the same answer
        (the largest signal number any of them received), so all stop at the same step."""
        signum = self.signum
        if accelerator is not None and accelerator.num_processes > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([signum], device=accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Interrupted` at once (SIGINT raises KeyboardInterrupt as always).

    For a process that only waits (a study between its runs, each in its own process that saves itself first):
    there is no step to finish, so the signal stops it where it is."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def preempted(signum, frame):
        raise Interrupted(signum, "preempted")

    previous = signal.signal(signal.SIGTERM, preempted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_in_worker(_worker_id: int) -> None:
    """``worker_init_fn`` of data loaders: the main process decides when to stop, so a DataLoader worker
    ignores SIGTERM/SIGINT sent to the whole process group (it would otherwise die mid-step and take the
    step with it); the main process ends its workers when it stops."""
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
