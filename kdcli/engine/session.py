"""A run's parts, built once from a RunConfig: accelerator, data, models, method, optimizer, loaders.

:func:`build` assembles a :class:`Session`; :meth:`Session.train_step` is one optimisation step and
:meth:`Session.evaluate` the metrics on the evaluation split. Nothing here writes files.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, IterableDataset

from kdcli import methods, models
from kdcli.config import RunConfig
from kdcli.data import DataBundle, SkipTracker, open_data
from kdcli.data.corruption import check_class_order
from kdcli.engine import recipe
from kdcli.engine import report as rep
from kdcli.engine.metrics import Evaluator
from kdcli.engine.signals import ignore_in_worker
from kdcli.engine.syncs import on_host
from kdcli.errors import KdcliError


class TrainingDiverged(KdcliError):
    """A loss term became NaN or infinite."""


# Steps between two reads of the loss terms' finiteness: the device keeps a record of every step's terms and the
# host reads it this often (and at an epoch's end, and before a resume state is saved), so a steady-state step
# never waits for the device. A diverged run goes on for at most this many steps before it stops.
FINITE_EVERY = 50


def data_facts(data: DataBundle) -> models.DataFacts:
    return models.DataFacts(num_classes=data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
                            class_names=data.class_names, mean=data.mean, std=data.std)


def open_run_data(cfg: RunConfig) -> DataBundle:
    """The run's dataset at its native size (the student's input size is set once the student is loaded)."""
    return open_data(cfg.dataset, image_column=cfg.image_column, label_column=cfg.label_column,
                     train_split=cfg.train_split, eval_split=cfg.eval_split, streaming=cfg.streaming,
                     augment=cfg.augment, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, num_classes=cfg.num_classes)


def usable_cpus() -> int:
    """The cores this process may run on (a scheduler's or taskset's affinity mask), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(data: DataBundle) -> int:
    return 0 if data.source == "builtin" else min(8, usable_cpus())


def make_loader(data: DataBundle, dataset, batch_size: int, workers: int, **kwargs) -> DataLoader:
    """A DataLoader over one of ``data``'s datasets: unreadable examples are dropped from the batches and
    named in ``batch["skipped"]``; its workers leave signals to the main process."""
    kwargs.setdefault("collate_fn", data.collate)
    # pinned host memory lets batches reach a CUDA device asynchronously. Persistent workers are not used: they
    # would save ~0.1 s an epoch (measured, README Speed), but a loader that keeps its workers draws their base
    # seed from the global RNG only once, so a run resumed at an epoch's start would draw differently from the
    # uninterrupted one (exact resume); augmentation would be unaffected (its epoch is in shared memory)
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      worker_init_fn=ignore_in_worker if workers else None, **kwargs)


def _no_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every accelerator kind
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def make_accelerator(precision: str, seed: int, find_unused_parameters: bool = False,
                     grad_accum: int = 1) -> Accelerator:
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    try:
        # cpu=True on a machine without an accelerator lets several launched processes use gloo.
        # Feature methods leave some parameters without gradient in one stage (the upper student layers
        # during a hint warm-up, connectors after it), which DDP must be told about.
        return Accelerator(mixed_precision=mixed, cpu=_no_accelerator(), gradient_accumulation_steps=grad_accum,
                           kwargs_handlers=[DistributedDataParallelKwargs(
                               find_unused_parameters=find_unused_parameters)],
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed,
                                                                     non_blocking=True))
    except ValueError as e:
        raise KdcliError(f"--precision {precision} is not available here: {str(e).splitlines()[0]}") from None


@dataclass
class Session:
    """Everything one run is made of, built once from a RunConfig."""

    cfg: RunConfig
    accelerator: Accelerator
    data: DataBundle
    student: torch.nn.Module  # Classifier, possibly wrapped for distribution
    teacher: models.Classifier | models.Ensemble | None
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    eval_loader: DataLoader
    student_info: models.Loaded
    teacher_info: models.Loaded | None  # the teacher, or the feature teacher of an ensemble
    needs: frozenset[str]
    online: bool = False  # the teacher trains too (DML): it is a peer, not a fixed teacher
    uses_teacher: bool = True  # the method reads the teacher's outputs (ce does not)
    corruption: dict | None = None  # what was done to the training split, as measured
    warmup_epochs: int = 0  # epochs of the method's warm-up stage, run before cfg.epochs
    teacher_eval_logits: list[torch.Tensor] = field(default_factory=list)
    eval_skipped: dict | None = None  # unreadable evaluation examples of the last evaluation
    warnings: list[str] = field(default_factory=list)  # printed at the start of the run
    teacher_infos: list[models.Loaded] = field(default_factory=list)  # every teacher, in --teacher order
    scheduler: object = None  # timm's scheduler of the main epochs (recipe.make_scheduler)
    updates_per_epoch: int = 1  # optimizer updates in one epoch (batches / --grad-accum, rounded up)
    mixer: recipe.Mixer | None = None  # soft targets: mixup, cutmix, label smoothing
    ema: object = None  # engine.ema.ModelEma of the student, when --ema
    trained: list = field(default_factory=list)  # the modules the optimizer trains (prepared)
    cache: object = None  # engine.cache.TeacherCache, when --teacher-cache
    cache_view: int = 0  # the view of the epoch in progress
    # one process, no accumulation, no fp16 loss scaling: the step calls the optimizer itself, without
    # accelerate's wrappers (they cost more than a small step: is_lomo_available, inspect.signature per call)
    plain: bool = False
    data_path: str = "loader"  # the training data's path: resident (decoded once, on the device) or loader
    pending: list = field(default_factory=list)  # (step label, term names, stacked term values) not checked yet

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

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
                   step: object = None, host_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One batch (``index``: the examples' original row indices, on the device; ``host_index`` the same on
        the host, where the teacher cache looks rows up): forward, loss, backward and, every ``--grad-accum``
        batches, the optimizer update (clipped, then the EMA follows). Returns the detached loss terms.

        The terms' finiteness is read on the host every :data:`FINITE_EVERY` steps (:meth:`check_finite`):
        a non-finite term raises :class:`TrainingDiverged` naming it and the ``step`` label it was first seen at.
        """
        acc = self.accelerator
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixer is not None:  # mixed before the teacher's forward: both see the same images
            images, labels = self.mixer(images, labels)
        accumulate = nullcontext() if self.plain else acc.accumulate(*self.trained)
        autocast = nullcontext() if self.cfg.precision == "fp32" else acc.autocast()
        if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs have been read
        with accumulate, autocast:
            if self.cache is not None:  # host bookkeeping, then the compilable part
                t = self.cached_teacher(images, index if host_index is None else host_index, index)
                terms, loss = self.loss_terms(images, labels, index, t)
            else:
                terms, loss = self.loss_terms(images, labels, index)
            self.pending.append((step, tuple(terms), torch.stack([v.detach().float() for v in terms.values()])))
            if len(self.pending) >= FINITE_EVERY:
                self.check_finite()
            if self.plain:
                loss.backward()
            else:
                acc.backward(loss)  # divided by --grad-accum
            if self.plain or acc.sync_gradients:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                optimizer = self.optimizer.optimizer if self.plain else self.optimizer
                if self.cfg.clip_grad:
                    if self.plain:
                        torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
                    else:
                        acc.clip_grad_norm_(params, self.cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.unwrapped_student())
        return {k: v.detach() for k, v in terms.items()}

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
                   t: methods.Outputs | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The forward passes and the method's terms of one batch, and their sum: the part of a step that
        ``torch.compile`` traces whole (no host value is read, no shape depends on the data). ``t``: the
        teacher's outputs when they come from elsewhere (the teacher cache)."""
        if t is None and self.online:
            t = self.teacher(images, self.needs)  # a peer: it learns from its own terms
        elif t is None and self.teacher is not None and self.uses_teacher:
            # teacher first: its activations are freed before the student's graph is built
            with torch.no_grad():
                t = self.teacher(images, self.needs)
        s = self.student(images, self.needs)
        terms = self.method(s, t, labels, images=images, index=index)  # warm-up or main terms: see use_warmup
        loss = sum(terms.values())
        if self.accelerator.num_processes > 1:
            # DDP expects every output of a wrapped model to reach the loss; a stage that uses only some
            # (a hint warm-up reads one feature map) would otherwise leave its reduction unfinished
            outs = s.tensors() + (t.tensors() if self.online else [])
            loss = loss + 0.0 * sum(o.float().sum() for o in outs)
        return terms, loss

    def check_finite(self) -> None:
        """Read the loss terms of the steps since the last check (one host wait): a NaN or infinite one raises
        :class:`TrainingDiverged` naming the term and the step it first appeared at."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        if len({names for _, names, _ in pending}) == 1:  # one stage: one read of every step's terms
            values = torch.stack([v for _, _, v in pending])
            if bool(torch.isfinite(values).all()):
                return
        for label, names, values in pending:
            finite = torch.isfinite(values).tolist()
            if not all(finite):
                k = finite.index(False)
                where = f" at {label}" if label is not None else ""
                raise TrainingDiverged(f"loss term {names[k]!r} became {float(values[k])}{where}")

    def cached_teacher(self, images: torch.Tensor, index: torch.Tensor,
                       device_index: torch.Tensor | None = None) -> methods.Outputs:
        """The teacher's outputs from the cache (``index``: the rows on the host; ``device_index``: the same on the
        device): rows not stored yet in this epoch's view are computed (the teacher's forward on those images only)
        and stored. A complete view that fits is held on the device and gathered there."""
        with on_host():  # the cache and the rows' indices live on the host: no device value is read here
            held = self.cache.held(self.cache_view, self.device, _memory_budget(self.device))
        if held is not None:
            self.cache.count_hits(len(index))
            where = index.to(self.device, non_blocking=True) if device_index is None else device_index
            logits = held[where.long()].float()
        else:
            with on_host():
                logits, known = self.cache.lookup(index, self.cache_view)
                complete = bool(known.all())
                if not complete:
                    missing = (~known).nonzero().flatten()
                    rows = index.detach().cpu()[missing]
            if not complete:
                with torch.inference_mode():
                    out = self.teacher(images[missing.to(images.device)], frozenset({"logits"}))
                self.cache.store(rows, self.cache_view, torch.stack(out.members or [out.logits], dim=1))
                # read back as stored (float16, top-k), so the first epoch trains on what later ones will
                with on_host():
                    logits[missing] = self.cache.lookup(rows, self.cache_view, count=False)[0]
            logits = logits.to(self.device, non_blocking=True)
        members = [logits[:, m] for m in range(logits.shape[1])]
        if len(members) == 1:
            return methods.Outputs(logits=members[0])
        mix = torch.logsumexp(torch.stack([torch.log_softmax(z, dim=1) for z in members]), dim=0)
        return methods.Outputs(logits=mix - math.log(len(members)), members=members)

    @torch.no_grad()
    def evaluate(self, peer: bool = False, ema: bool = False) -> rep.Metrics:
        """Metrics of the student (or, with ``peer``, of an online teacher against the student; with ``ema``, of
        the student's moving average).

        Unreadable evaluation examples are left out and counted in ``eval_skipped`` (over the limit of
        ``--max-bad-fraction``: one clear error)."""
        model, other = (self.teacher, self.student) if peer else (self.student, self.teacher)
        if ema:
            model = self.ema.module
        modes = [(m, m.training) for m in (self.student, self.teacher, model) if m is not None]
        for m, _ in modes:
            m.eval()
        ev = Evaluator(self.data.num_classes, self.data.class_names, with_teacher=other is not None)
        tracker = SkipTracker("eval", self.data.num_eval, self.cfg.max_bad_fraction)
        gather = RowGatherer(self.accelerator)
        # a fixed teacher on fixed eval data gives the same logits every epoch: compute them once
        cache = self.teacher_eval_logits if not (self.online or peer) else []
        for i, batch in enumerate(self.eval_loader):
            tracker.add(batch["skipped"])
            images, labels = batch["image"].to(self.device), batch["label"].to(self.device)
            with self.accelerator.autocast():
                logits = model(images).logits if len(images) else images.new_zeros((0, self.data.num_classes))
                other_logits = None
                if other is not None and i >= len(cache):
                    other_logits = other(images).logits if len(images) else logits
            rows = gather(batch["index"].to(self.device), logits, labels, other_logits)
            if other is not None:
                if i >= len(cache):
                    cache.append(rows[3].cpu())
                other_logits = cache[i]
            if len(rows[0]):
                ev.update(rows[1], rows[2], other_logits)
        for m, training in modes:
            m.train(training)
        self.eval_skipped = merged(self.accelerator, tracker).report()
        return ev.compute()


class RowGatherer:
    """Gathers per-example rows from every process, once each: batches may differ in size across processes
    (unreadable examples are dropped) and a distributed sampler repeats examples to even out the last batch,
    so rows are padded, gathered, and kept once per example index. One process: the rows as they are."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.seen: set[int] = set()

    def __call__(self, index: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        acc = self.accelerator
        if acc.num_processes == 1:
            return [index, *tensors]
        rows = [index, *(t for t in tensors if t is not None)]
        rows = [acc.gather(acc.pad_across_processes(t, dim=0, pad_index=-1)) for t in rows]
        keep = []
        for j, k in enumerate(rows[0].tolist()):
            if k >= 0 and k not in self.seen:  # not padding, not met before (in this batch or an earlier one)
                self.seen.add(k)
                keep.append(j)
        keep_t = torch.tensor(keep, dtype=torch.long, device=rows[0].device)
        picked = iter([t.index_select(0, keep_t) for t in rows])
        out = [next(picked)]
        out += [next(picked) if t is not None else None for t in tensors]
        return out


def merged(accelerator: Accelerator, tracker: SkipTracker) -> SkipTracker:
    """``tracker`` with the counts of every other process's tracker of the same split (a collective)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        mine = tracker.report()
        total = SkipTracker(tracker.split, tracker.total, tracker.max_fraction)
        for report in gather_object([mine]):
            total.merge(report)
        return total
    return tracker


def build(cfg: RunConfig, accelerator: Accelerator | None = None) -> Session:
    """Data, models, method, optimizer and loaders for ``cfg`` (nothing is trained or written)."""
    accelerator = accelerator or make_accelerator(cfg.precision, cfg.seed, grad_accum=cfg.grad_accum)
    if accelerator.device.type == "cpu":
        # Normalised inputs drive some activations and gradients into denormal floats, which x86 CPUs
        # process many times slower (measured: ~15% of a step); flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
    set_seed(cfg.seed)
    mspec = methods.spec(cfg.method, cfg.method_args)
    if mspec.uses_teacher and not cfg.teacher:
        raise KdcliError(f"method {cfg.method!r} needs a teacher (a peer, for online methods): pass --teacher")
    if cfg.soft_targets and not mspec.soft_targets:
        raise KdcliError(f"--method {cfg.method} needs hard labels (see `kdcli methods`); it cannot train with "
                         "--mixup, --cutmix or --label-smoothing")
    if cfg.compile:
        recipe.check_compile(accelerator.device)
    if cfg.teacher_cache:
        if not mspec.uses_teacher:
            raise KdcliError(f"--method {cfg.method} reads no teacher, so there is nothing to cache: drop "
                             "--teacher-cache")
        if not mspec.cacheable:
            raise KdcliError(f"--method {cfg.method} cannot use --teacher-cache: it needs more of the teacher than its "
                             "logits on the batch (features, its own forward passes, or a teacher that trains); "
                             "logit methods (kd, dkd, dist, lskd, nkd) and their sums can")
        if cfg.mixup or cfg.cutmix:
            raise KdcliError("--teacher-cache cannot serve --mixup/--cutmix: the teacher's logits of a mixed image are "
                             "not the mix of its logits; drop one of them")
        if cfg.streaming:
            raise KdcliError("--teacher-cache stores logits by training row: it needs map-style data; drop --streaming")
    check_class_order(cfg.class_order, cfg.imbalance)
    data = open_run_data(cfg)
    if "index" in mspec.needs and data.train_labels() is None:
        raise KdcliError(f"--method {cfg.method} keeps a memory per training example, indexed by its row: it needs "
                         "map-style data; drop --streaming")
    if cfg.noise or cfg.imbalance:
        if data.recorded_manifest() is not None:  # its clean labels would be taken for the truth
            raise KdcliError(f"--dataset {cfg.dataset} is a folder kdcli corrupt-dataset wrote (its labels are "
                             "corrupted already): give --noise / --imbalance with its source instead, or drop them")
        corruption = data.corrupt(cfg.noise, cfg.imbalance, cfg.corruption_seed, cfg.class_order)
    else:
        corruption = data.recorded_corruption()  # a corrupt-dataset folder reports its own corruption
    facts = data_facts(data)
    # the student's own input (a pretrained timm model's data configuration, a checkpoint's, else the data's
    # native size; --image-size overrides) sets what the loader makes; a student starts from its weights
    # whatever their class names say (it is trained on the dataset's)
    student_info = models.load(cfg.student, facts, weights=cfg.student_weights, pretrained=cfg.student_pretrained,
                               image_size=cfg.image_size, ignore_class_names=True,
                               option="--model" if cfg.command == "train" else "--student")
    s_meta = student_info.model.meta
    data.set_input(s_meta.input_size, s_meta.interpolation, s_meta.crop_pct)
    warnings = list(data.warnings) + list(student_info.warnings)
    needs, online = mspec.needs, mspec.online
    teacher_infos: list[models.Loaded] = []
    for k in range(len(cfg.teacher or [])):
        name, weights, size = cfg.teacher_at(k)
        # a teacher gets the student's batch, resized on the device to its own input size
        loaded = models.load(name, replace(facts, image_size=s_meta.input_size), weights=weights,
                             pretrained=cfg.teacher_pretrained, image_size=size,
                             ignore_class_names=cfg.ignore_class_names, option="--teacher")
        teacher_infos.append(loaded)
        if loaded.trained or not online:  # a peer that trains may well start from random weights
            warnings += loaded.warnings
    if len(teacher_infos) > 1 and (mspec.teachers == "no" or online):
        raise KdcliError(f"--method {cfg.method} runs or trains one teacher itself; it cannot take "
                         f"{len(teacher_infos)} --teacher (use a logit method such as kd for an ensemble)")
    teacher_info = teacher_infos[cfg.feature_teacher] if teacher_infos else None
    student = student_info.model
    teacher = None
    if len(teacher_infos) > 1:
        teacher = models.Ensemble([t.model for t in teacher_infos], cfg.feature_teacher)
    elif teacher_info is not None:
        teacher = teacher_info.model
    if teacher is not None and needs & {"features", "preact"}:
        models.match_stages(student, teacher_info.model, cfg.student_stages, cfg.teacher_stages)
    s_shapes = student.shapes(needs)
    t_shapes = teacher.shapes(needs) if teacher is not None else None
    try:
        method = mspec.build(s_shapes, t_shapes)
    except ValueError as e:  # a method that cannot work with these models, e.g. too few stages
        raise KdcliError(f"--method {cfg.method}: {e}") from None

    # One optimizer over the student, the method's modules and (online methods) the peer: per-parameter state
    # makes it the same as one optimizer per network with the same settings.
    trainable = {"student": student, "method": method, **({"peer": teacher} if online else {})}
    optimizer = recipe.make_optimizer(cfg, trainable)

    workers = cfg.workers if cfg.workers is not None else default_workers(data)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_ds = data.train_dataset(rank, world)
    resident = resident_split(cfg, data, train_ds, accelerator.device)
    collate = None
    if resident is not None:  # batches are made on the device by the collate function: no worker, no pinning
        train_ds, collate, workers = resident, resident.collate, 0
        data.follow_epoch(resident)
    if cfg.teacher_cache:
        train_ds = ViewEpochs(train_ds, cache_views(cfg, data))
    streaming = isinstance(train_ds, IterableDataset)
    drop_last = not streaming and data.num_train is not None and data.num_train >= cfg.batch_size * world
    train_loader = make_loader(data, train_ds, cfg.batch_size, workers, shuffle=not streaming, drop_last=drop_last,
                               **({"collate_fn": collate, "pin_memory": False} if collate else {}))
    eval_loader = make_loader(data, data.eval_dataset(), cfg.batch_size * 2, workers)

    if cfg.channels_last:
        for m in (student, teacher, method):
            if m is not None:
                m.to(memory_format=torch.channels_last)
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
        # batches stay where the loader makes them (pinned host memory, or the device on the resident path): the
        # loop copies them without blocking and keeps the rows' indices on the host for the teacher cache
        train_loader = accelerator.prepare_data_loader(train_loader, device_placement=False)
    accelerator.unwrap_model(method).bind(student, teacher)
    if "index" in needs:
        accelerator.unwrap_model(method).attach_data(torch.from_numpy(data.train_labels()))
    try:
        batches = len(train_loader)
    except TypeError:  # a streamed split: its length is known from the data's size, when it is
        batches = max(1, -(-(data.num_train or cfg.batch_size) // (cfg.batch_size * world)))
    updates = max(1, -(-batches // cfg.grad_accum))
    scheduler = recipe.make_scheduler(cfg, optimizer, updates)
    cache = open_cache(cfg, data, teacher_infos, teacher) if cfg.teacher_cache else None  # before any folding
    if teacher is not None and not online and "preact" not in needs:
        for loaded in teacher_infos:  # frozen, in eval mode for good: its BatchNorms are affine maps
            loaded.model.fold_batchnorm()
            if cfg.precision == "bf16":  # a bf16 copy: autocast would cast its frozen weights at every forward
                loaded.model.to_compute_dtype(torch.bfloat16)
    ema = None
    if cfg.ema:
        from kdcli.engine.ema import ModelEma

        ema = ModelEma(accelerator.unwrap_model(student), decay=cfg.ema)
    sess = Session(cfg, accelerator, data, student, teacher, method, optimizer, train_loader, eval_loader,
                   student_info, teacher_info, needs, online=online, uses_teacher=mspec.uses_teacher,
                   corruption=corruption, warnings=warnings, teacher_infos=teacher_infos,
                   warmup_epochs=accelerator.unwrap_model(method).warmup_epochs(cfg.epochs),
                   scheduler=scheduler, updates_per_epoch=updates,
                   mixer=recipe.Mixer(cfg, data.num_classes) if cfg.soft_targets else None, ema=ema,
                   trained=trained, cache=cache,
                   plain=accelerator.num_processes == 1 and cfg.grad_accum == 1 and accelerator.scaler is None,
                   data_path="resident" if resident is not None else "loader")
    if cfg.compile:  # the modules stay as they are: parameter names, checkpoints and resume state unchanged
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        sess.loss_terms = torch.compile(sess.loss_terms, mode=mode)
    return sess


def _memory_budget(device: torch.device) -> int:
    from kdcli.data.resident import memory_budget

    return memory_budget(device)


def resident_split(cfg: RunConfig, data: DataBundle, train_ds, device: torch.device):
    """The training split on the resident path (:mod:`kdcli.data.resident`), or None for the loader: ``auto``
    takes it where it applies and fits the budget, ``resident`` where it applies (else one clear line)."""
    from kdcli.data import resident as res

    if cfg.data_path == "loader":
        return None
    forced = cfg.data_path == "resident"
    rows = len(train_ds) if not isinstance(train_ds, IterableDataset) else 0
    padding = max(1, data.image_size // 8) if data.augment in ("cifar", "crop") else 0
    why = res.why_not(train_ds, data.streaming, data.augment, rows, data.in_chans, data.native_size,
                      data.image_size, padding, None if forced else res.memory_budget(device))
    if why is None:
        try:
            decoded = res.decode(train_ds, data.in_chans, data.content_fingerprint())
        except res.MixedShapes as e:
            why = f"its {e}"
        else:
            return res.ResidentDataset(train_ds, decoded, device, data.augment, data.image_size, data.seed)
    if forced:
        raise KdcliError(f"--data-path resident cannot hold this training split: {why}; use --data-path loader "
                         "(or auto)")
    return None




def open_cache(cfg: RunConfig, data: DataBundle, teacher_infos: list[models.Loaded], teacher) -> object:
    """The run's teacher cache, keyed by everything the stored logits depend on: a mismatch is one clear line."""
    from pathlib import Path

    from kdcli.engine.cache import TeacherCache, weights_sha256
    from kdcli.models import checkpoint as ckpt

    shas = [ckpt.sha256(Path(t.path)) if t.path else weights_sha256(t.model.net) for t in teacher_infos]
    augment = data.augment
    labels = data.train_labels()
    key = {
        "teachers": shas, "teacher_input": [t.model.meta.input_size for t in teacher_infos],
        "dataset": cfg.dataset, "train_split": data.train_split,
        "fingerprint": data.content_fingerprint(),  # the same after a copy or on another machine
        "noise": cfg.noise, "imbalance": cfg.imbalance, "corruption_seed": cfg.corruption_seed,
        "class_order": cfg.class_order,
        "augment": augment, "image_size": data.image_size, "interpolation": data.interpolation,
        "crop_pct": data.crop_pct, "seed": cfg.seed if augment != "none" else None,
        "precision": cfg.precision,  # a bf16 teacher's logits are not an fp32 one's
    }
    if cfg.image_column:  # another column of the same rows holds other images (kept out otherwise: older caches)
        key["image_column"] = cfg.image_column
    return TeacherCache(Path(cfg.teacher_cache), key, rows=len(labels), teachers=len(teacher_infos),
                        classes=data.num_classes, views=cache_views(cfg, data), dtype=cfg.cache_dtype,
                        topk=cfg.cache_topk)


def cache_views(cfg: RunConfig, data: DataBundle) -> int:
    """Views of a teacher cache: --cache-views, or one without random augmentation (one view is every epoch's)."""
    return cfg.cache_views if data.augment != "none" else 1


class ViewEpochs(torch.utils.data.Dataset):
    """The training split of a cached run: epoch e draws view e mod ``views``, the images the cache's logits are of.

    The loop sets the data's epoch to the view, but accelerate's DataLoader also passes the real epoch to its
    dataset's ``set_epoch`` when an iteration starts (after the loop's call): here that epoch becomes the view."""

    def __init__(self, dataset, views: int):
        self.dataset, self.views = dataset, views

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch % self.views)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, indices: list[int]):
        return self.dataset.__getitems__(indices)
