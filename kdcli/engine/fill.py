"""``kdcli cache-teacher``: fill a teacher cache ahead of training.

For each view v (the images epoch v draws: augmentation is a pure function of seed, epoch and row), the training
split is read in order with its training augmentation at epoch v, and the teacher's logits of every row not yet
stored are computed and stored (:meth:`Session.cached_teacher`, exactly as a training run would on a miss). The
cache is flushed after each view and every :data:`FLUSH_EVERY` batches, so an interrupted fill (SIGTERM, Ctrl-C)
keeps what it flushed and a rerun computes only the rest.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import Subset

from kdcli.config import RunConfig
from kdcli.engine.session import build, default_workers, make_loader
from kdcli.engine.signals import Interrupted, StopOnSignal

FLUSH_EVERY = 50  # batches between flushes within a view


@dataclass
class FillResult:
    path: str
    views: int
    rows: int  # training rows per view
    computed: int  # rows whose logits this call computed (over all views)
    already: int  # rows found stored (over all views)
    skipped: int  # unreadable rows (over all views), left unfilled
    seconds: float

    def line(self) -> str:
        skipped = f", {self.skipped} unreadable left out" if self.skipped else ""
        return (f"teacher cache {self.path}: {self.views} view{'s' * (self.views != 1)} × {self.rows} rows, "
                f"filled {self.computed} now ({self.already} already stored{skipped}) in {self.seconds:.1f}s")


def _stop(stop: StopOnSignal, sess, where: str) -> None:
    if stop.signum:
        import signal

        sess.cache.flush()
        name = signal.Signals(stop.signum).name
        raise Interrupted(stop.signum, f"stopped by {name} {where}; what was computed is stored in "
                                       f"{sess.cache.root}: run the same command again to fill the rest")


def fill_cache(cfg: RunConfig, jobs: int | None = None, console: Console | None = None) -> FillResult:
    """Fill ``cfg.teacher_cache`` with the teacher's logits of every training row in every view.

    ``cfg`` is a distill configuration (its ``out`` is not written); ``jobs``: DataLoader worker processes
    (default: kdcli's). A rich progress bar per view is shown when ``console`` is a terminal."""
    started = time.time()
    with StopOnSignal() as stop, tempfile.TemporaryDirectory(prefix="kdcli-cache-teacher-") as tmp:
        sess = build(cfg.model_copy(update={"out": tmp, "workers": jobs, "data_path": "loader"}))
        if console is not None:
            for warning in sess.warnings:
                console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
        _stop(stop, sess, "before filling started")
        cache, data = sess.cache, sess.data
        dataset = data.train_dataset()  # the training transform: registered, so data.set_epoch reaches it
        rows = np.asarray(dataset.rows) if dataset.rows is not None else np.arange(len(dataset))
        workers = jobs if jobs is not None else default_workers(data)
        computed = already = skipped = 0
        live = console is not None and console.is_terminal
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True) if live else None
        if bar is not None:
            bar.start()
        try:
            for view in range(cache.views):
                data.set_epoch(view)
                sess.cache_view = view
                # the dataset's positions whose row is not stored yet (a rerun after an interruption: the rest)
                todo = np.flatnonzero(~cache.known(view).numpy()[rows])
                already += len(rows) - len(todo)
                task = bar.add_task(f"view {view + 1}/{cache.views}", total=len(rows),
                                    completed=len(rows) - len(todo)) if bar is not None else None
                loader = make_loader(data, Subset(dataset, todo.tolist()), cfg.batch_size, workers, shuffle=False)
                for step, batch in enumerate(loader if len(todo) else []):
                    skipped += len(batch["skipped"])
                    if len(batch["index"]):
                        images = batch["image"].to(sess.device)
                        misses = cache.misses
                        with sess.accelerator.autocast():
                            sess.cached_teacher(images, batch["index"])
                        computed += cache.misses - misses
                    if bar is not None:
                        bar.update(task, advance=len(batch["index"]) + len(batch["skipped"]))
                    if (step + 1) % FLUSH_EVERY == 0:
                        cache.flush()
                    _stop(stop, sess, f"in view {view + 1}/{cache.views}")
                cache.flush()
                if bar is not None:
                    bar.remove_task(task)
        finally:
            if bar is not None:
                bar.stop()
    return FillResult(path=str(cache.root), views=cache.views, rows=len(rows), computed=computed, already=already,
                      skipped=skipped, seconds=time.time() - started)
