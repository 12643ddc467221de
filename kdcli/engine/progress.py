"""Progress: a live rich bar on a terminal, one unwrapped line per epoch in any case (main process only)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress(AbstractContextManager):
    def __init__(self, console: Console | None, enabled: bool = True):
        self.console = console if enabled else None
        live = self.console is not None and self.console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
                            console=self.console, transient=True) if live else None
        self.task = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def start_epoch(self, epoch: int, epochs: int, steps: int | None, done: int = 0) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=steps, completed=done, loss="")

    def step(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss="" if loss is None else f"loss {loss:.4f}")

    def line(self, text: str) -> None:
        if self.console is not None:
            # never wrapped: a log file or a scheduler's output gets one line per epoch
            self.console.print(text, highlight=False, soft_wrap=True)
