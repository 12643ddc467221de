"""Running a study's pending runs: one at a time in this process, or ``jobs`` at a time in worker processes.

A run is an ordinary ``loop.run``: it writes its own folder, log and report. Finished runs are skipped,
interrupted ones resumed, and a student starts only once its teacher has finished. A run that fails (a
KdcliError such as a diverged loss, or any other error: out of memory, a bug) is recorded with its reason, the
traceback of an unexpected one in its log, and the study goes on without the runs that need it.
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kdcli.engine.session import usable_cpus
from kdcli.engine.signals import sigterm_raises
from kdcli.study.plan import LOG_FILE, Run


@dataclass
class Outcome:
    ok: bool
    top1: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Summary:
    finished: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)  # their teacher failed


def run_one(cfg_json: str, resume: bool) -> Outcome:
    """Run (or resume) one configured run in this process; its epoch lines go to the run's log file."""
    from kdcli.config import RunConfig
    from kdcli.engine import loop
    from kdcli.engine.signals import Interrupted
    from kdcli.errors import KdcliError

    cfg = RunConfig.model_validate_json(cfg_json)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / LOG_FILE, "a") as log:
        console = Console(file=log, width=160, no_color=True)
        console.print(f"# {'resuming' if resume else 'starting'} {cfg.command} --method {cfg.method}")
        try:
            report = loop.run(cfg, resume=resume, console=console)
        except Interrupted:  # a stop on request: the study stops too (and resumes this run next time)
            raise
        except KdcliError as e:
            console.print(f"error: {e}")
            return Outcome(ok=False, seconds=time.time() - started, error=str(e))
        except Exception as e:  # one run's failure (out of memory, a bug) must not end a study of hundreds
            log.write(traceback.format_exc())
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return Outcome(ok=False, seconds=time.time() - started, error=f"{type(e).__name__}: {first}".rstrip(": "))
    return Outcome(ok=True, top1=report.metrics.final.top1, seconds=time.time() - started)


def worker_setup(index: int, jobs: int, cpus: int, gpus: list[str]) -> tuple[int, str | None]:
    """(CPU threads, CUDA_VISIBLE_DEVICES) for worker ``index`` of ``jobs``: the CPU cores shared out, and
    with several visible GPUs one GPU per worker, round robin (None: leave the devices alone)."""
    return max(1, cpus // jobs), (gpus[index % len(gpus)] if len(gpus) > 1 else None)


def worker_cores(index: int, jobs: int, cores: list[int]) -> list[int]:
    """The CPU cores worker ``index`` of ``jobs`` runs on: its own contiguous share of ``cores`` (all of them when
    there are fewer cores than jobs), so its threads and loader workers never crowd another run's."""
    share = len(cores) // jobs
    if share < 1:
        return list(cores)
    return list(cores[index * share:(index + 1) * share])


def default_jobs(gpus: list[str]) -> int:
    """Runs at a time by default: one per visible GPU (runs sharing one GPU each ran at about half speed), else 1."""
    return max(1, len(gpus))


def sharing_warning(jobs: int, gpus: list[str]) -> str | None:
    """A line for the user when ``jobs`` runs would share GPUs."""
    if len(gpus) and jobs > len(gpus):
        per = -(-jobs // len(gpus))
        return (f"--jobs {jobs} puts up to {per} runs on each of {len(gpus)} GPU{'s' * (len(gpus) > 1)}: runs sharing "
                f"a GPU time-slice it (on an H100 two kdcli runs sharing it kept it busy 0-21 % of the time); "
                f"--jobs {len(gpus)} runs one per GPU")
    return None


def visible_gpus() -> list[str]:
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _init_worker(counter, jobs: int, cpus: int, gpus: list[str]) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    threads, device = worker_setup(index, jobs, cpus, gpus)
    if device is not None:  # before this process first touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if hasattr(os, "sched_setaffinity"):  # the run's loader workers follow its share (usable_cpus reads it)
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, worker_cores(index, jobs, cores))
    import torch

    torch.set_num_threads(threads)


class _Inline:
    """The executor of ``--jobs 1``: runs each submitted call at once, in this process."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class _LogTail(ProgressColumn):
    """The last line a run wrote to its log (its current epoch), read each time the display refreshes."""

    def render(self, task) -> Text:
        path = task.fields.get("log")
        if not path:
            return Text("")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 400))
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return Text("")
        return Text(lines[-1][:100] if lines else "starting", style="dim")


def execute(todo: list[Run], finished: set[Path], *, jobs: int, console: Console) -> Summary:
    """Run ``todo`` (plan order: teachers first); ``finished`` holds the outs of runs already done."""
    summary = Summary()
    if not todo:
        return summary
    done = set(finished)
    failed: set[Path] = set()
    pending = list(todo)
    running: dict[Future, tuple[Run, int | None]] = {}
    if jobs == 1:
        pool = _Inline()
    else:
        context = get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                                   initargs=(context.Value("i", 0), jobs, usable_cpus(), visible_gpus()))
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), _LogTail(), console=console, disable=not console.is_terminal)
    total = bar.add_task("study", total=len(todo))
    try:
        with bar:
            while pending or running:
                for run in list(pending):
                    if len(running) >= jobs:
                        break
                    if any(n.out in failed for n in run.needs):
                        pending.remove(run)
                        summary.skipped.append(run)
                        bar.advance(total)
                        console.print(f"skipped {run.name}: its teacher failed", highlight=False, soft_wrap=True)
                        continue
                    if not all(n.out in done for n in run.needs):
                        continue
                    pending.remove(run)
                    resume = run.state() == "interrupted"
                    task = bar.add_task(f"  {run.name}", total=None, log=str(run.out / LOG_FILE))
                    if not console.is_terminal:
                        console.print(f"{'resuming' if resume else 'running'} {run.name}", highlight=False,
                                      soft_wrap=True)
                    running[pool.submit(run_one, run.cfg.model_dump_json(), resume)] = (run, task)
                if not running:
                    if pending:  # cannot happen with plan order (teachers first); never spin
                        raise RuntimeError(f"no run can start: {pending[0].name} waits for {pending[0].needs[0].name}")
                    continue
                finished_now, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    run, task = running.pop(future)
                    bar.remove_task(task)
                    bar.advance(total)
                    outcome = future.result()
                    if outcome.ok:
                        done.add(run.out)
                        summary.finished.append(run)
                        console.print(f"done {run.name}: top-1 {100 * outcome.top1:.2f}% "
                                      f"({outcome.seconds:.0f} s)", highlight=False, soft_wrap=True)
                    else:
                        failed.add(run.out)
                        summary.failed.append((run, outcome.error))
                        console.print(f"failed {run.name}: {outcome.error}", highlight=False, soft_wrap=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return summary


def run_study(spec, runs: list[Run], out: Path, *, jobs: int, console: Console,
              source: tuple[str, str]) -> tuple[dict, Summary]:
    """Record the spec in ``out``, run what is not finished, and write the results (whatever finished)."""
    from kdcli.models.checkpoint import write_text_atomic
    from kdcli.study import results

    states = {run.out: run.state() for run in runs}  # runs made with other options: refused before any write
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / source[0], source[1])
    finished = {o for o, s in states.items() if s == "done"}
    todo = [r for r in runs if states[r.out] != "done"]
    interrupted = sum(s == "interrupted" for s in states.values())
    console.print(f"study {spec.name or out}: {len(runs)} runs, {len(finished)} finished, {interrupted} to resume, "
                  f"{len(todo) - interrupted} to start ({jobs} at a time)", highlight=False, soft_wrap=True)
    with sigterm_raises():  # a run in progress saves itself first (engine.signals); the study stops between runs
        summary = execute(todo, finished, jobs=jobs, console=console)
    return results.write_study(out, runs, spec), summary
