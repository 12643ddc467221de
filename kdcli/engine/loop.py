"""The one training loop: build everything from a RunConfig, train, evaluate, checkpoint, report.

Driven by HF Accelerate, so ``accelerate launch -m kdcli …`` runs it on many processes unchanged and
mixed precision is one option. The loop sums the loss terms a method returns and never asks which
method it runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from rich.console import Console
from torch.utils.data import DataLoader, IterableDataset

from kdcli import __version__, methods, models
from kdcli.config import RunConfig
from kdcli.data import DataBundle, open_data
from kdcli.engine import report as rep
from kdcli.engine.metrics import Evaluator
from kdcli.engine.progress import EpochProgress
from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt

MODEL_FILE = "model.safetensors"
PEER_FILE = "peer.safetensors"
REPORT_FILE = "report.json"
RESUME_DIR = "resume"
# The step schedule of the field's CIFAR recipe (RepDistiller: ×0.1 at epochs 150, 180, 210 of 240).
STEP_MILESTONES = (0.625, 0.75, 0.875)


class TrainingDiverged(KdcliError):
    """A loss term became NaN or infinite."""


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for a 0-based epoch."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 0.1 ** sum(epoch >= round(m * epochs) for m in STEP_MILESTONES)


# ----------------------------------------------------------------------------- output folder


def check_out_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a finished or interrupted run unless asked to (read-only check)."""
    if resume:
        if not (out / RESUME_DIR / "progress.json").is_file():
            raise KdcliError(f"{out} holds no interrupted run to resume (no {RESUME_DIR}/progress.json)")
        if (out / REPORT_FILE).exists():
            raise KdcliError(f"{out} holds a finished run; nothing to resume")
        return
    if out.exists() and not out.is_dir():
        raise KdcliError(f"--out {out} exists and is not a folder")
    if overwrite:
        return
    if (out / REPORT_FILE).exists():
        raise KdcliError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose another --out")
    if (out / RESUME_DIR).exists():
        raise KdcliError(f"--out {out} holds an interrupted run; continue it with --resume {out} "
                         "or pass --overwrite to start again")


def clear_out_dir(out: Path) -> None:
    for name in (REPORT_FILE, MODEL_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)


def resumed_config(out: Path) -> RunConfig:
    """The configuration an interrupted run in ``out`` was started with."""
    check_out_dir(out, overwrite=False, resume=True)
    try:
        progress = json.loads((out / RESUME_DIR / "progress.json").read_text())
        return RunConfig.model_validate(progress["config"])
    except (ValueError, KeyError) as e:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        raise KdcliError(f"{out}/{RESUME_DIR}/progress.json is unreadable ({str(e).splitlines()[0][:120]}); "
                         "start again with --overwrite") from None


# ----------------------------------------------------------------------------- building


def data_facts(data: DataBundle) -> models.DataFacts:
    return models.DataFacts(num_classes=data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
                            class_names=data.class_names, mean=data.mean, std=data.std)


def open_run_data(cfg: RunConfig) -> DataBundle:
    return open_data(cfg.dataset, image_size=cfg.image_size, image_column=cfg.image_column,
                     label_column=cfg.label_column, train_split=cfg.train_split, eval_split=cfg.eval_split,
                     streaming=cfg.streaming, augment=cfg.augment, seed=cfg.seed,
                     shuffle_buffer=cfg.shuffle_buffer)


def default_workers(data: DataBundle) -> int:
    return 0 if data.source == "builtin" else min(8, os.cpu_count() or 1)


def _no_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every accelerator kind
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def make_accelerator(precision: str, seed: int, find_unused_parameters: bool = False) -> Accelerator:
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    try:
        # cpu=True on a machine without an accelerator lets several launched processes use gloo.
        # Feature methods leave some parameters without gradient in one stage (the upper student layers
        # during a hint warm-up, connectors after it), which DDP must be told about.
        return Accelerator(mixed_precision=mixed, cpu=_no_accelerator(),
                           kwargs_handlers=[DistributedDataParallelKwargs(
                               find_unused_parameters=find_unused_parameters)],
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    except ValueError as e:
        raise KdcliError(f"--precision {precision} is not available here: {str(e).splitlines()[0]}") from None


@dataclass
class Session:
    """Everything one run is made of, built once from a RunConfig."""

    cfg: RunConfig
    accelerator: Accelerator
    data: DataBundle
    student: torch.nn.Module  # Classifier, possibly wrapped for distribution
    teacher: models.Classifier | None
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    eval_loader: DataLoader
    student_info: models.Loaded
    teacher_info: models.Loaded | None
    needs: frozenset[str]
    online: bool = False  # the teacher trains too (DML): it is a peer, not a fixed teacher
    uses_teacher: bool = True  # the method reads the teacher's outputs (ce does not)
    corruption: dict | None = None  # what was done to the training split, as measured
    warmup_epochs: int = 0  # epochs of the method's warm-up stage, run before cfg.epochs
    teacher_eval_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrapped_student(self) -> models.Classifier:
        return self.accelerator.unwrap_model(self.student)

    def unwrapped_teacher(self) -> models.Classifier | None:
        return None if self.teacher is None else self.accelerator.unwrap_model(self.teacher)

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.cfg.epochs

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the detached loss terms."""
        with self.accelerator.autocast():
            t = None
            if self.online:
                t = self.teacher(images, self.needs)  # a peer: it learns from its own terms
            elif self.teacher is not None and self.uses_teacher:
                # teacher first: its activations are freed before the student's graph is built
                with torch.inference_mode():
                    t = self.teacher(images, self.needs)
                t = t.map(torch.Tensor.clone)  # inference tensors cannot take part in autograd
            s = self.student(images, self.needs)
            terms = self.method(s, t, labels, images=images)  # warm-up or main terms: see use_warmup
        loss = sum(terms.values())
        if self.accelerator.num_processes > 1:
            # DDP expects every output of a wrapped model to reach the loss; a stage that uses only some
            # (a hint warm-up reads one feature map) would otherwise leave its reduction unfinished
            outs = s.tensors() + (t.tensors() if self.online else [])
            loss = loss + 0.0 * sum(o.float().sum() for o in outs)
        if not torch.isfinite(loss):
            bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "loss")
            raise TrainingDiverged(f"loss term {bad!r} became {float(terms.get(bad, loss).detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, peer: bool = False) -> rep.Metrics:
        """Metrics of the student (or, with ``peer``, of an online teacher against the student)."""
        model, other = (self.teacher, self.student) if peer else (self.student, self.teacher)
        modes = [(m, m.training) for m in (self.student, self.teacher) if m is not None]
        for m, _ in modes:
            m.eval()
        ev = Evaluator(self.data.num_classes, self.data.class_names, with_teacher=other is not None)
        # a fixed teacher on fixed eval data gives the same logits every epoch: compute them once
        cache = self.teacher_eval_logits if not (self.online or peer) else []
        for i, batch in enumerate(self.eval_loader):
            images, labels = batch["image"].to(self.device), batch["label"].to(self.device)
            with self.accelerator.autocast():
                logits = model(images).logits
                other_logits = None
                if other is not None:
                    if i >= len(cache):
                        cache.append(self.accelerator.gather_for_metrics(other(images).logits).cpu())
                    other_logits = cache[i]
            logits, labels = self.accelerator.gather_for_metrics((logits, labels))
            ev.update(logits, labels, other_logits)
        for m, training in modes:
            m.train(training)
        return ev.compute()


def build(cfg: RunConfig, accelerator: Accelerator | None = None) -> Session:
    """Data, models, method, optimizer and loaders for ``cfg`` (nothing is trained or written)."""
    accelerator = accelerator or make_accelerator(cfg.precision, cfg.seed)
    if accelerator.device.type == "cpu":
        # Normalised inputs drive some activations and gradients into denormal floats, which x86 CPUs
        # process many times slower (measured: ~15% of a step); flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
    set_seed(cfg.seed)
    mspec = methods.spec(cfg.method, cfg.method_args)
    if mspec.uses_teacher and not cfg.teacher:
        raise KdcliError(f"method {cfg.method!r} needs a teacher (a peer, for online methods): pass --teacher")
    data = open_run_data(cfg)
    corruption = (data.corrupt(cfg.noise, cfg.imbalance, cfg.corruption_seed, cfg.class_order)
                  if cfg.noise or cfg.imbalance else None)
    facts = data_facts(data)
    student_info = models.load(cfg.student, facts, weights=cfg.student_weights,
                               option="--model" if cfg.command == "train" else "--student")
    teacher_info = None
    if cfg.teacher:
        teacher_info = models.load(cfg.teacher, facts, weights=cfg.teacher_weights, option="--teacher")
    needs, online = mspec.needs, mspec.online
    student = student_info.model
    teacher = teacher_info.model if teacher_info else None
    if teacher is not None and needs & {"features", "preact"}:
        models.match_stages(student, teacher, cfg.student_stages, cfg.teacher_stages)
    s_shapes = student.shapes(needs, data.image_size)
    t_shapes = teacher.shapes(needs, data.image_size) if teacher is not None else None
    try:
        method = mspec.build(s_shapes, t_shapes)
    except ValueError as e:  # a method that cannot work with these models, e.g. too few stages
        raise KdcliError(f"--method {cfg.method}: {e}") from None

    # One SGD over the student, the method's modules and (online methods) the peer: per-parameter state
    # makes it the same as one optimizer per network with the same settings.
    params = [p for p in student.parameters() if p.requires_grad] + list(method.parameters())
    if online:
        params += list(teacher.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    workers = cfg.workers if cfg.workers is not None else default_workers(data)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_ds = data.train_dataset(rank, world)
    streaming = isinstance(train_ds, IterableDataset)
    drop_last = not streaming and data.num_train is not None and data.num_train >= cfg.batch_size * world
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=not streaming, drop_last=drop_last,
                              num_workers=workers)
    eval_loader = DataLoader(data.eval_dataset(), batch_size=cfg.batch_size * 2, num_workers=workers)

    trained = [student]
    if teacher is not None and online:
        trained.append(teacher.train())
    elif teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    if any(p.requires_grad for p in method.parameters()):
        trained.append(method)
    else:
        method.to(accelerator.device)
    *trained, optimizer, eval_loader = accelerator.prepare(*trained, optimizer, eval_loader)
    student = trained[0]
    if online:
        teacher = trained[1]
    if len(trained) > (2 if online else 1):
        method = trained[-1]
    if not streaming:  # a streamed split is already divided between processes by the data layer
        train_loader = accelerator.prepare(train_loader)
    accelerator.unwrap_model(method).bind(student, teacher)
    return Session(cfg, accelerator, data, student, teacher, method, optimizer, train_loader, eval_loader,
                   student_info, teacher_info, needs, online=online, uses_teacher=mspec.uses_teacher,
                   corruption=corruption,
                   warmup_epochs=accelerator.unwrap_model(method).warmup_epochs(cfg.epochs))


# ----------------------------------------------------------------------------- resume state


def _state_module(sess: Session) -> torch.nn.Module:
    state = {"student": sess.unwrapped_student().net, "method": sess.accelerator.unwrap_model(sess.method)}
    if sess.online:
        state["peer"] = sess.unwrapped_teacher().net
    return torch.nn.ModuleDict(state)


def save_resume(sess: Session, out: Path, epoch: int, history: list, best: rep.Best | None,
                started: float) -> None:
    """Everything needed to continue after ``epoch`` (main process only). progress.json goes last."""
    d = out / RESUME_DIR
    d.mkdir(parents=True, exist_ok=True)
    ckpt.save(d / "state.safetensors", _state_module(sess), sess.unwrapped_student().meta)
    tmp = ckpt.atomic_path(d / "optimizer.pt")
    torch.save({"optimizer": sess.optimizer.state_dict()}, tmp)
    os.replace(tmp, d / "optimizer.pt")
    progress = {"epoch": epoch, "config": sess.cfg.model_dump(), "history": [h.model_dump() for h in history],
                "best": best.model_dump() if best else None, "elapsed": time.time() - started}
    ckpt.write_text_atomic(d / "progress.json", json.dumps(progress, indent=1))


def load_resume(sess: Session, out: Path) -> tuple[int, list[rep.EpochRecord], rep.Best | None, float]:
    d = out / RESUME_DIR
    progress = json.loads((d / "progress.json").read_text())
    ckpt.load_into(_state_module(sess), d / "state.safetensors")
    state = torch.load(d / "optimizer.pt", map_location=sess.device, weights_only=True)
    sess.optimizer.load_state_dict(state["optimizer"])
    history = [rep.EpochRecord(**h) for h in progress["history"]]
    best = rep.Best(**progress["best"]) if progress["best"] else None
    return progress["epoch"], history, best, progress["elapsed"]


# ----------------------------------------------------------------------------- the loop


def model_info(loaded: models.Loaded, path: Path | None = None) -> rep.ModelInfo:
    file = path or (Path(loaded.path) if loaded.path else None)
    return rep.ModelInfo(name=loaded.model.meta.architecture, source=loaded.source,
                         path=str(file) if file else None, params=loaded.model.num_params,
                         sha256=ckpt.sha256(file) if file else None)


def data_info(data: DataBundle, corruption: dict | None = None) -> rep.DataInfo:
    return rep.DataInfo(dataset=data.name, source=data.source, train_split=data.train_split,
                        eval_split=data.eval_split, num_classes=data.num_classes, class_names=data.class_names,
                        num_train=data.num_train, num_eval=data.num_eval, image_size=data.image_size,
                        in_chans=data.in_chans, streaming=data.streaming, corruption=corruption)


def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False,
        console: Console | None = None, stop_after_epoch: int | None = None) -> rep.Report | None:
    """Train (or distill) as ``cfg`` says. Returns the report (main process), or None when stopped
    early on purpose after ``stop_after_epoch`` epochs (the run can then be resumed)."""
    out = Path(cfg.out)
    check_out_dir(out, overwrite=overwrite, resume=resume)
    mspec = methods.spec(cfg.method, cfg.method_args)
    accelerator = make_accelerator(cfg.precision, cfg.seed, bool(mspec.needs & {"features", "preact"}))
    sess = build(cfg, accelerator)
    main = accelerator.is_main_process
    if overwrite and main:
        clear_out_dir(out)
    accelerator.wait_for_everyone()

    history: list[rep.EpochRecord] = []
    best: rep.Best | None = None
    start_epoch, elapsed_before = 0, 0.0
    if resume:
        start_epoch, history, best, elapsed_before = load_resume(sess, out)
    started = time.time() - elapsed_before
    metrics = None
    with EpochProgress(console, enabled=main) as progress:
        for epoch in range(start_epoch, sess.total_epochs):
            metrics, best = _epoch(sess, epoch, history, best, started, progress)
            if stop_after_epoch is not None and stop_after_epoch <= epoch + 1 < sess.total_epochs:
                return None

    if metrics is None:  # resumed after the last epoch had already finished
        metrics = sess.evaluate()
    peer_metrics = sess.evaluate(peer=True) if sess.online else None  # collective: every process
    if sess.corruption is not None:
        sess.corruption["diagnostics"] = training_diagnostics(sess)
    report = None
    if main:
        report = finish(sess, out, metrics, best, history, started, peer_metrics)
    accelerator.wait_for_everyone()
    return report


def _epoch(sess: Session, epoch: int, history: list[rep.EpochRecord], best: rep.Best | None, started: float,
           progress: EpochProgress) -> tuple[rep.Metrics, rep.Best]:
    """Train one epoch, evaluate, save the resume state; returns the metrics and the best epoch so far."""
    cfg, accelerator, out = sess.cfg, sess.accelerator, Path(sess.cfg.out)
    world = accelerator.num_processes
    set_seed(cfg.seed + epoch)  # augmentation and dropout depend on (seed, epoch) only: resumable
    if hasattr(sess.train_loader, "set_epoch"):
        sess.train_loader.set_epoch(epoch)
    sess.data.set_epoch(epoch)
    warmup = epoch < sess.warmup_epochs
    main_epoch = epoch - sess.warmup_epochs  # 0-based epoch of the main stage (negative in warm-up)
    lr = cfg.lr if warmup else cfg.lr * lr_factor(cfg.schedule, main_epoch, cfg.epochs)
    for group in sess.optimizer.param_groups:
        group["lr"] = lr
    method = sess.accelerator.unwrap_model(sess.method)
    method.set_progress(max(main_epoch, 0), cfg.epochs)
    method.use_warmup(warmup)
    sess.student.train()
    sess.method.train()
    if sess.online:
        sess.teacher.train()
    t0, seen, sums = time.time(), 0, {}
    try:
        steps = len(sess.train_loader)
    except TypeError:  # a streamed split has no length
        steps = None
    progress.start_epoch(epoch + 1, sess.total_epochs, steps)
    for step, batch in enumerate(sess.train_loader):
        images, labels = batch["image"].to(sess.device), batch["label"].to(sess.device)
        try:
            terms = sess.train_step(images, labels)
        except TrainingDiverged as e:
            last = f"epoch {epoch}" if epoch else "none: it diverged in the first epoch"
            raise TrainingDiverged(f"{e} at epoch {epoch + 1}, step {step + 1}; last good state: {last} "
                                   f"(in {out / RESUME_DIR}); try a lower --lr") from None
        seen += images.shape[0]
        progress.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * images.shape[0]
    train_seconds = time.time() - t0
    if seen == 0:
        raise KdcliError("the training split yielded no batch; is it empty or smaller than --batch-size?")
    terms = {k: float(v) / seen for k, v in sums.items()}
    metrics = sess.evaluate()
    record = rep.EpochRecord(epoch=epoch + 1, stage="warmup" if warmup else "train", lr=lr,
                             images=seen * world, loss=sum(terms.values()), terms=terms,
                             eval_top1=metrics.top1, seconds=time.time() - t0,
                             images_per_s=seen * world / max(train_seconds, 1e-9))
    history.append(record)
    if not warmup and (best is None or metrics.top1 > best.top1):
        best = rep.Best(epoch=epoch + 1, top1=metrics.top1)
    if accelerator.is_main_process:
        save_resume(sess, out, epoch + 1, history, best, started)
        progress.line(format_epoch(record, sess.total_epochs))
    accelerator.wait_for_everyone()
    return metrics, best


@torch.no_grad()
def training_diagnostics(sess: Session) -> dict:
    """How the final student treats its corrupted training data (no augmentation): among noisy examples,
    how often it predicts the noisy label (memorised), the clean one (corrected) or another; and its top-1
    on the examples whose label was left alone."""
    from kdcli.data.corruption import memorisation

    clean, noisy = sess.data.training_labels()
    loader = sess.accelerator.prepare(DataLoader(sess.data.train_dataset(train=False),
                                                 batch_size=sess.cfg.batch_size * 2))
    student = sess.student
    was_training = student.training
    student.eval()
    preds, rows = [], []
    for batch in loader:
        with sess.accelerator.autocast():
            logits = student(batch["image"].to(sess.device)).logits
        p, i = sess.accelerator.gather_for_metrics((logits.argmax(1), batch["index"].to(sess.device)))
        preds.append(p.cpu())
        rows.append(i.cpu())
    student.train(was_training)
    pred, idx = torch.cat(preds).numpy(), torch.cat(rows).numpy()
    return memorisation(pred, clean[idx], noisy[idx])


def format_epoch(r: rep.EpochRecord, epochs: int) -> str:
    terms = ", ".join(f"{k} {v:.4f}" for k, v in r.terms.items())
    stage = " (warm-up)" if r.stage == "warmup" else ""
    return (f"epoch {r.epoch}/{epochs}{stage}  loss {r.loss:.4f} ({terms})  lr {r.lr:.4g}  "
            f"eval top1 {100 * r.eval_top1:.2f}%  {r.images_per_s:.0f} img/s  {r.seconds:.1f}s")


def finish(sess: Session, out: Path, metrics: rep.Metrics, best: rep.Best | None,
           history: list[rep.EpochRecord], started: float, peer_metrics: rep.Metrics | None = None) -> rep.Report:
    """Write the student checkpoint, then the report (last: its presence marks a finished run)."""
    cfg = sess.cfg
    student = sess.unwrapped_student()
    meta = student.meta.model_copy(update={"trained": {
        "command": cfg.command, "method": cfg.method, "method_args": cfg.method_args,
        "teacher": cfg.teacher, "dataset": cfg.dataset, "epochs": cfg.epochs, "seed": cfg.seed,
        "kdcli_version": __version__}})
    ckpt.save(out / MODEL_FILE, student.net, meta)
    mspec = methods.spec(cfg.method, cfg.method_args)
    peer = None
    if sess.online:  # the other network of an online method gets its own checkpoint and metrics
        p_model = sess.unwrapped_teacher()
        ckpt.save(out / PEER_FILE, p_model.net, p_model.meta.model_copy(update={"trained": meta.trained}))
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
        data=data_info(sess.data, sess.corruption),
        teacher=model_info(sess.teacher_info) if sess.teacher_info else None,
        student=rep.ModelInfo(**{**model_info(sess.student_info).model_dump(), "source": sess.student_info.source,
                                 "path": str(out / MODEL_FILE), "sha256": ckpt.sha256(out / MODEL_FILE)}),
        method=rep.MethodInfo(name=mspec.name, family=mspec.family, args=mspec.resolved_args(),
                              warmup_epochs=sess.warmup_epochs),
        peer=peer,
        metrics=rep.MetricsBlock(final=metrics, best=best),
        history=history,
        timing=rep.Timing(total_seconds=total, train_images_per_s=images / train_seconds if train_seconds else 0.0),
    )
    ckpt.write_text_atomic(out / REPORT_FILE, report.model_dump_json(indent=2))
    return report


# ----------------------------------------------------------------------------- evaluate


def evaluate_checkpoint(checkpoint: str, dataset: str, *, split: str | None = None, teacher: str | None = None,
                        teacher_weights: str | None = None, batch_size: int = 128, image_column: str | None = None,
                        label_column: str | None = None, precision: str = "fp32",
                        workers: int | None = None, noise: str | None = None, imbalance: str | None = None,
                        corruption_seed: int = 0, class_order: str | None = None) -> rep.EvalReport:
    """Metrics of a kdcli checkpoint on a dataset split, optionally against a teacher. The split is used as
    it is, unless ``noise``/``imbalance`` ask for it to be corrupted (then the report says how)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir() and (path / MODEL_FILE).is_file():  # a run folder stands for its checkpoint
        path = path / MODEL_FILE
    if not path.is_file():
        raise KdcliError(f"checkpoint {checkpoint} is not a file (nor a run folder holding {MODEL_FILE})")
    meta = ckpt.read_meta(path, "--model")
    data = open_data(dataset, image_size=meta.input_size, image_column=image_column, label_column=label_column,
                     eval_split=split, augment="none")
    corruption = (data.corrupt(noise, imbalance, corruption_seed, class_order, split="eval")
                  if noise or imbalance else None)
    facts = data_facts(data)
    loaded = models.load(str(path), facts)
    t_loaded = models.load(teacher, facts, weights=teacher_weights, option="--teacher") if teacher else None
    cfg = RunConfig(command="train", student=str(path), dataset=dataset, out=".", batch_size=batch_size,
                    precision=precision, workers=workers)
    accelerator = make_accelerator(precision, 0)
    model = loaded.model.to(accelerator.device).eval()
    if t_loaded is not None:
        t_loaded.model.to(accelerator.device).eval()
    loader = accelerator.prepare(DataLoader(data.eval_dataset(), batch_size=batch_size,
                                            num_workers=workers if workers is not None else default_workers(data)))
    sess = Session(cfg, accelerator, data, model, t_loaded.model if t_loaded else None, methods.build("ce"),
                   None, None, loader, loaded, t_loaded, frozenset({"logits"}))
    metrics = sess.evaluate()
    return rep.EvalReport(created=rep.now(), checkpoint=model_info(loaded),
                          teacher=model_info(t_loaded) if t_loaded else None, data=data_info(data, corruption),
                          environment=rep.environment(str(accelerator.device), accelerator.num_processes, precision),
                          metrics=rep.MetricsBlock(final=metrics))
