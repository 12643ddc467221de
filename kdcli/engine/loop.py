"""The one training loop: build a session from a RunConfig, train, evaluate, checkpoint, report.

Driven by HF Accelerate, so ``accelerate launch -m kdcli …`` runs it on many processes unchanged and
mixed precision is one option. The loop sums the loss terms a method returns and never asks which
method it runs. The pieces it drives live beside it: ``session`` (building), ``resume`` (resume state),
``rundir`` (the run folder and its lock), ``signals`` (preemption), ``evaluate`` (``kdcli evaluate``).
"""

from __future__ import annotations

import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.console import Console

from kdcli import __version__, methods
from kdcli.config import RunConfig
from kdcli.data import SkipTracker, skipped_line
from kdcli.data.skips import REPORT_EXAMPLES
from kdcli.engine import recipe, rundir
from kdcli.engine import report as rep
from kdcli.engine import resume as res
from kdcli.engine.evaluate import data_info, evaluate_checkpoint, model_info
from kdcli.engine.metrics import train_class_counts, with_shots
from kdcli.engine.progress import EpochProgress
from kdcli.engine.rundir import EMA_FILE, MODEL_FILE, PEER_FILE, REPORT_FILE, RESUME_DIR, resumed_config
from kdcli.engine.session import (
    RowGatherer,
    Session,
    TrainingDiverged,
    build,
    default_workers,
    make_accelerator,
    make_loader,
    merged,
    open_run_data,
)
from kdcli.engine.signals import Interrupted, StopOnSignal
from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt
from kdcli.models.export import write_model_folder

__all__ = ["Interrupted", "Session", "TrainingDiverged", "build", "evaluate_checkpoint", "open_run_data",
           "resumed_config", "run"]

def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, auto_resume: bool = False,
        console: Console | None = None, stop_after_epoch: int | None = None) -> rep.Report | None:
    """Train (or distill) as ``cfg`` says. Returns the report (main process), or None when stopped early on
    purpose after ``stop_after_epoch`` epochs (the run can then be resumed).

    ``resume`` continues the interrupted run in ``cfg.out``; ``auto_resume`` continues it when its options
    are the same, starts when there is none, and returns the report of a finished one. SIGTERM/SIGINT
    save the resume state after the step in progress and raise :class:`Interrupted`.
    """
    out = Path(cfg.out)
    if overwrite + resume + auto_resume > 1:
        raise KdcliError("--overwrite, --resume and --auto-resume exclude each other: pass one")
    rundir.decide(out, cfg, overwrite=overwrite, resume=resume, auto_resume=auto_resume)  # fail before building
    mspec = methods.spec(cfg.method, cfg.method_args)
    accelerator = make_accelerator(cfg.precision, cfg.seed, bool(mspec.needs & {"features", "preact"}), cfg.grad_accum)
    main = accelerator.is_main_process
    lock = rundir.RunLock(out, f"kdcli {cfg.command} --out {out}") if main else nullcontext()
    with StopOnSignal() as stop, lock:
        state = rundir.decide(out, cfg, overwrite=overwrite, resume=resume, auto_resume=auto_resume)
        if state == "finished":  # --auto-resume on a run that already ended: nothing to do
            return rep.Report.model_validate_json((out / REPORT_FILE).read_text()) if main else None
        sess = build(cfg, accelerator)
        if main and console is not None:
            for warning in sess.warnings:
                console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
        _check_stop(stop, sess, None)  # a signal while building: stop before the folder is touched
        if overwrite and main:
            rundir.clear(out)
        accelerator.wait_for_everyone()
        pos = res.load(sess, out) if state == "interrupted" else res.Position()
        started = time.time() - pos.elapsed
        metrics = None
        with EpochProgress(console, enabled=main) as progress:
            for epoch in range(pos.epoch, sess.total_epochs):
                metrics = _epoch(sess, epoch, pos, started, progress, stop)
                if stop_after_epoch is not None and stop_after_epoch <= epoch + 1 < sess.total_epochs:
                    return None

        if metrics is None:  # resumed after the last epoch had already finished
            metrics = sess.evaluate()
            pos.ema_metrics = sess.evaluate(ema=True) if sess.ema is not None else None
        peer_metrics = sess.evaluate(peer=True) if sess.online else None  # collective: every process
        if sess.corruption is not None:
            sess.corruption["diagnostics"] = training_diagnostics(sess)
        report = None
        if main:
            report = finish(sess, out, metrics, pos.best, pos.history, started, peer_metrics, pos.skipped,
                            pos.ema_metrics)
        accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # every process leaves the process group together: left to interpreter exit, gloo's threads could
        # still be running and abort one process ("terminate called without an active exception")
        accelerator.end_training()
    return report


def _sync(stop: StopOnSignal, accelerator, n: int) -> tuple[int, int]:
    """(signal asking to stop, smallest batch of any process): one small collective with several processes,
    so that every process stops at the same step and skips the same empty batches."""
    if accelerator.num_processes == 1:
        return stop.signum, n
    import torch.distributed as dist

    flags = torch.tensor([stop.signum, -n], device=accelerator.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), -int(flags[1])


def epoch_totals(accelerator, sums: dict, seen: int) -> tuple[dict[str, float], int]:
    """(each loss term summed over the examples of every process, how many examples): one collective with
    several processes, which all run the same steps and so hold the same terms."""
    sums = {k: float(v) for k, v in sums.items()}
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        keys = sorted(sums)
        total = torch.tensor([float(seen), *(sums[k] for k in keys)], dtype=torch.float64, device=accelerator.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        seen, sums = int(total[0].item()), dict(zip(keys, total[1:].tolist(), strict=True))
    return sums, seen


def epoch_means(accelerator, sums: dict, seen: int) -> tuple[dict[str, float], int]:
    """(each loss term's mean over the epoch's examples on every process, those examples)."""
    sums, seen = epoch_totals(accelerator, sums, seen)
    return ({k: v / seen for k, v in sums.items()} if seen else {}), seen


def _union(before: dict | None, now: dict) -> dict:
    """Unreadable training examples over the epochs so far (an epoch may not meet them all: the incomplete
    last batch is dropped): at least as many as any epoch met, and as many as distinct names are known."""
    if not before:
        return now
    names = list(dict.fromkeys([*before["examples"], *now["examples"]]))
    return {**now, "count": max(before["count"], now["count"], len(names)), "examples": names[:REPORT_EXAMPLES]}


def _eval_line(sess: Session) -> str | None:
    block = sess.eval_skipped or {}
    count = block.get("count", 0)
    return skipped_line("eval", count, block.get("examples", [])) if count else None


def _check_stop(stop: StopOnSignal, sess: Session, where: str | None) -> None:
    signum = stop.requested(sess.accelerator)
    if not signum:
        return
    cfg, out = sess.cfg, sess.cfg.out
    name = signal.Signals(signum).name
    if where is None:
        raise Interrupted(signum, f"stopped by {name} before training started; {out} was left as it was")
    raise Interrupted(signum, f"stopped by {name} {where}; resume state saved in {out}/{RESUME_DIR}: continue with "
                              f"`kdcli {cfg.command} --resume {out}` (or the same command with --auto-resume)")


def _epoch(sess: Session, epoch: int, pos: res.Position, started: float, progress: EpochProgress,
           stop: StopOnSignal) -> rep.Metrics:
    """Train one epoch (or the rest of one), evaluate, save the resume state; updates ``pos``."""
    cfg, accelerator, out = sess.cfg, sess.accelerator, Path(sess.cfg.out)
    set_seed(cfg.seed + epoch)  # sampling, augmentation and dropout depend on (seed, epoch) only: resumable
    warmup = epoch < sess.warmup_epochs
    main_epoch = epoch - sess.warmup_epochs  # 0-based epoch of the main stage (negative in warm-up)
    if warmup:  # the method's warm-up stage runs at the base lr, before the schedule of the main epochs
        for group in sess.optimizer.param_groups:
            group["lr"] = cfg.lr
        lr = cfg.lr
    else:
        lr = recipe.set_lr(cfg, sess.scheduler, sess.optimizer, main_epoch, 0, sess.updates_per_epoch)
    per_update = cfg.sched_on_updates and not warmup
    accum = cfg.grad_accum
    method = sess.accelerator.unwrap_model(sess.method)
    method.set_progress(max(main_epoch, 0), cfg.epochs)
    method.use_warmup(warmup)
    sess.student.train()
    sess.method.train()
    if sess.online:
        sess.teacher.train()

    partial, pos.partial = pos.partial, None
    loader, first_step, seen, sums, before = sess.train_loader, 0, 0, {}, 0.0
    skipped = SkipTracker("train", sess.data.num_train, cfg.max_bad_fraction)
    if partial is not None and partial.epoch == epoch:  # continue an epoch stopped part-way
        loader = accelerator.skip_first_batches(sess.train_loader, partial.step)
        first_step, before = partial.step, partial.train_seconds
        # the totals of every process so far (saved so), held by the main process alone: the epoch's end adds
        # every process's up once
        main = accelerator.is_main_process
        seen = partial.seen if main else 0
        sums = {k: torch.tensor(v if main else 0.0, dtype=torch.float32, device=sess.device)
                for k, v in partial.sums.items()}
        if main:
            skipped.merge(partial.skipped)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if sess.cache is not None:  # a cached run trains epoch e on view e mod K: the images its logits are of
        sess.cache_view = sess.cache.view_of(epoch)
    sess.data.set_epoch(sess.cache_view if sess.cache is not None else epoch)
    t0 = time.time()
    try:
        steps = len(sess.train_loader)
    except TypeError:  # a streamed split has no length
        steps = None
    progress.start_epoch(epoch + 1, sess.total_epochs, steps, done=first_step)
    for step, batch in enumerate(loader, start=first_step):  # ``step`` steps done before this batch
        if partial is not None and partial.rng is not None:
            # the RNG state where the interrupted run stood before this step (set after the loader started,
            # which draws a seed for its workers: the uninterrupted run did that at the epoch's start), and before
            # a stop at this very step saves it again
            res.set_rng_state(partial.rng)
            partial = None
        n = batch["image"].shape[0]
        signum, smallest = _sync(stop, accelerator, n)
        if signum and step % accum == 0:  # the update before this batch was the last: save, then stop
            # (with --grad-accum a signal waits for the accumulation in progress to end in an update)
            _check_finite(sess, epoch, out)  # a diverged state is never saved
            totals, total_seen = epoch_totals(accelerator, sums, seen)  # every process's, as the epoch's end
            pos.partial = res.Partial(epoch=epoch, step=step, sums=totals, seen=total_seen,
                                      train_seconds=before + time.time() - t0,
                                      skipped=merged(accelerator, skipped).report())
            res.save(sess, out, pos, started)
            _check_stop(stop, sess, f"at epoch {epoch + 1}, step {step}")
        skipped.add(batch["skipped"], seen=n + len(batch["skipped"]))
        progress.step()
        if smallest == 0:  # every example of a batch was unreadable (on some process): no step
            continue
        # non-blocking: from pinned memory the copies overlap the step before (no-ops where the data is resident)
        images = batch["image"].to(sess.device, non_blocking=True)
        labels = batch["label"].to(sess.device, non_blocking=True)
        index = batch["index"]
        host_index = torch.from_numpy(batch["rows"]) if "rows" in batch else (index if not index.is_cuda else None)
        if per_update and step % accum == 0:
            recipe.set_lr(cfg, sess.scheduler, sess.optimizer, main_epoch, step // accum, sess.updates_per_epoch)
        with _diverged(epoch, out):
            terms = sess.train_step(images, labels, index.to(sess.device, non_blocking=True),
                                    step=f"epoch {epoch + 1}, step {step + 1}", host_index=host_index)
        seen += n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * n
    _check_finite(sess, epoch, out)
    skipped = merged(accelerator, skipped)
    skipped.check()
    train_seconds = before + time.time() - t0
    terms, seen = epoch_means(accelerator, sums, seen)
    if seen == 0:
        raise KdcliError("the training split yielded no batch; is it empty or smaller than --batch-size?")
    metrics = sess.evaluate()
    pos.ema_metrics = sess.evaluate(ema=True) if sess.ema is not None else None
    record = rep.EpochRecord(epoch=epoch + 1, stage="warmup" if warmup else "train", lr=lr,
                             images=seen, loss=sum(terms.values()), terms=terms,
                             eval_top1=metrics.top1, seconds=before + time.time() - t0,
                             eval_top1_ema=pos.ema_metrics.top1 if pos.ema_metrics else None,
                             images_per_s=seen / max(train_seconds, 1e-9))
    pos.history.append(record)
    if not warmup and (pos.best is None or metrics.top1 > pos.best.top1):
        pos.best = rep.Best(epoch=epoch + 1, top1=metrics.top1)
    pos.epoch = epoch + 1
    new = {"train": _union((pos.skipped or {}).get("train"), skipped.report()), "eval": sess.eval_skipped}
    if accelerator.is_main_process:
        for split, tracker_line in (("train", skipped.line()), ("eval", _eval_line(sess))):
            if tracker_line and (pos.skipped or {}).get(split, {}).get("count") != new[split]["count"]:
                progress.line(tracker_line)  # the first epoch that meets them, and whenever the count changes
    pos.skipped = new
    res.save(sess, out, pos, started)
    if accelerator.is_main_process:
        progress.line(format_epoch(record, sess.total_epochs))
    accelerator.wait_for_everyone()
    if epoch + 1 < sess.total_epochs:
        _check_stop(stop, sess, f"after epoch {epoch + 1}")
    return metrics


@contextmanager
def _diverged(epoch: int, out: Path):
    """A TrainingDiverged raised inside, completed with where the last good state is and what to try."""
    try:
        yield
    except TrainingDiverged as e:
        last = f"epoch {epoch}" if epoch else "none: it diverged in the first epoch"
        raise TrainingDiverged(f"{e}; last good state: {last} (in {out / RESUME_DIR}); try a lower --lr") from None


def _check_finite(sess: Session, epoch: int, out: Path) -> None:
    with _diverged(epoch, out):
        sess.check_finite()


@torch.no_grad()
def training_diagnostics(sess: Session) -> dict:
    """How the final student treats its corrupted training data (no augmentation): among noisy examples,
    how often it predicts the noisy label (memorised), the clean one (corrected) or another; and its top-1
    on the examples whose label was left alone."""
    from kdcli.data.corruption import memorisation

    clean, noisy = sess.data.training_labels()
    workers = sess.cfg.workers if sess.cfg.workers is not None else default_workers(sess.data)
    loader = sess.accelerator.prepare(make_loader(sess.data, sess.data.train_dataset(train=False),
                                                  sess.cfg.batch_size * 2, workers))
    student = sess.student
    was_training = student.training
    student.eval()
    preds, rows = [], []
    gather = RowGatherer(sess.accelerator)
    for batch in loader:
        images = batch["image"].to(sess.device)
        with sess.accelerator.autocast():
            pred = student(images).logits.argmax(1) if len(images) else batch["label"].to(sess.device)
        i, p = gather(batch["index"].to(sess.device), pred)
        preds.append(p.cpu())
        rows.append(i.cpu())
    student.train(was_training)
    pred, idx = torch.cat(preds).numpy(), torch.cat(rows).numpy()
    return memorisation(pred, clean[idx], noisy[idx])


def format_epoch(r: rep.EpochRecord, epochs: int) -> str:
    terms = ", ".join(f"{k} {v:.4f}" for k, v in r.terms.items())
    stage = " (warm-up)" if r.stage == "warmup" else ""
    ema = f" (ema {100 * r.eval_top1_ema:.2f}%)" if r.eval_top1_ema is not None else ""
    return (f"epoch {r.epoch}/{epochs}{stage}  loss {r.loss:.4f} ({terms})  lr {r.lr:.4g}  "
            f"eval top1 {100 * r.eval_top1:.2f}%{ema}  {r.images_per_s:.0f} img/s  {r.seconds:.1f}s")


def finish(sess: Session, out: Path, metrics: rep.Metrics, best: rep.Best | None,
           history: list[rep.EpochRecord], started: float, peer_metrics: rep.Metrics | None = None,
           skipped: dict | None = None, ema_metrics: rep.Metrics | None = None) -> rep.Report:
    """Write the student checkpoint, then the report (last: its presence marks a finished run)."""
    cfg = sess.cfg
    student = sess.unwrapped_student()
    meta = student.meta.model_copy(update={"trained": {
        "command": cfg.command, "method": cfg.method, "method_args": cfg.method_args,
        "teacher": cfg.model_dump()["teacher"], "dataset": cfg.dataset, "epochs": cfg.epochs, "seed": cfg.seed,
        "kdcli_version": __version__}})
    path = out / MODEL_FILE
    try:  # a failed write (a full disk) leaves the last resume state as it was, and no report
        ckpt.save(path, student.net, meta)
        if sess.ema is not None:  # the student's moving average: a checkpoint of its own, beside the raw one
            path = out / EMA_FILE
            ckpt.save(path, sess.ema.module.net, meta.model_copy(update={"trained": {**meta.trained,
                                                                                  "ema": cfg.ema}}))
        if sess.online:  # the other network of an online method gets its own checkpoint
            path = out / PEER_FILE
            p_model = sess.unwrapped_teacher()
            ckpt.save(path, p_model.net, p_model.meta.model_copy(update={"trained": meta.trained}))
        report = _report(sess, out, metrics, best, history, started, peer_metrics, skipped, ema_metrics)
        path = out / "config.json"  # timm's model folder: config.json and a model card beside the weights
        write_model_folder(out, student.net, meta, report)
        path = out / REPORT_FILE
        ckpt.write_text_atomic(path, report.model_dump_json(indent=2))
    except OSError as e:
        raise rundir.write_error(path, e, out) from None
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)  # a finished run needs no resume state
    return report


def _ema_info(sess: Session, out: Path, history: list[rep.EpochRecord],
              ema_metrics: rep.Metrics | None) -> rep.EmaInfo | None:
    if sess.ema is None or ema_metrics is None:
        return None
    scored = [h for h in history if h.stage == "train" and h.eval_top1_ema is not None]
    top = max(scored, key=lambda h: h.eval_top1_ema, default=None)  # the first of equals, as for the raw student
    best = rep.Best(epoch=top.epoch, top1=top.eval_top1_ema) if top else None
    return rep.EmaInfo(decay=sess.cfg.ema, path=str(out / EMA_FILE), sha256=ckpt.sha256(out / EMA_FILE),
                       metrics=rep.MetricsBlock(final=ema_metrics, best=best))


def _report(sess: Session, out: Path, metrics: rep.Metrics, best: rep.Best | None, history: list[rep.EpochRecord],
            started: float, peer_metrics: rep.Metrics | None, skipped: dict | None,
            ema_metrics: rep.Metrics | None = None) -> rep.Report:
    cfg = sess.cfg
    mspec = methods.spec(cfg.method, cfg.method_args)
    # the images trained on per true class (label noise moves labels, not images): the many/medium/few-shot
    # groups of every metrics block
    counts = train_class_counts(sess.data.train_labels(clean=True), sess.data.num_classes)
    metrics, peer_metrics, ema_metrics = (with_shots(m, counts) for m in (metrics, peer_metrics, ema_metrics))
    peer = None
    if sess.online:
        peer = rep.PeerInfo(model=rep.ModelInfo(**{**model_info(sess.teacher_info).model_dump(),
                                                   "path": str(out / PEER_FILE),
                                                   "sha256": ckpt.sha256(out / PEER_FILE)}),
                            metrics=peer_metrics)
    total = time.time() - started
    images = sum(h.images for h in history)
    train_seconds = sum(h.images / h.images_per_s for h in history if h.images_per_s > 0)
    report = rep.Report(
        command=cfg.command, created=rep.now(), config=cfg.model_dump(),
        environment=rep.environment(str(sess.device), sess.accelerator.num_processes, cfg.precision),
        data=data_info(sess.data, sess.corruption, {**(skipped or {}), "eval": sess.eval_skipped}).model_copy(
            update={"train_class_counts": counts, "data_path": sess.data_path}),
        teacher=model_info(sess.teacher_info) if sess.teacher_info else None,
        teachers=[model_info(t) for t in sess.teacher_infos] or None,
        student=rep.ModelInfo(**{**model_info(sess.student_info).model_dump(), "source": sess.student_info.source,
                                 "path": str(out / MODEL_FILE), "sha256": ckpt.sha256(out / MODEL_FILE)}),
        method=rep.MethodInfo(name=mspec.name, family=mspec.family, args=mspec.resolved_args(),
                              warmup_epochs=sess.warmup_epochs),
        peer=peer,
        metrics=rep.MetricsBlock(final=metrics, best=best),
        ema=_ema_info(sess, out, history, ema_metrics),
        effective_batch=cfg.batch_size * cfg.grad_accum * sess.accelerator.num_processes,
        teacher_cache=sess.cache.report() if sess.cache is not None else None,
        history=history,
        timing=rep.Timing(total_seconds=total, train_images_per_s=images / train_seconds if train_seconds else 0.0),
    )
    return report


