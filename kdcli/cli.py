"""The command line: parse, validate, hand over to the package. No training logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kdcli import __version__
from kdcli.config import default, make_config
from kdcli.errors import KdcliError
from kdcli.options import CONTROL, INT_LISTS, RENAMES, flag, int_list, key_values, resolve_config

app = typer.Typer(
    name="kdcli",
    help="Distill any image classifier into another (knowledge distillation as a command-line tool).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a line longer than the terminal (or than 80 columns in a log file) is never broken in two
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

# ----------------------------------------------------------------------------- shared options
# --help groups the options of train and distill (and of evaluate and corrupt-dataset) into these panels
MODELS, METHOD, DATA, CORRUPTION, OPTIM, SPEED, OUTPUT = (
    "Models", "Method", "Data", "Corruption", "Optimisation", "Speed", "Output")

Dataset = Annotated[str | None, typer.Option(
    help="digits | synthetic[:SIZE[:CLASSES[:COUNT]]] | a local folder or parquet file | a Hugging Face hub id",
    rich_help_panel=DATA)]
Out = Annotated[Path | None, typer.Option(help="run folder: model.safetensors, report.json, resume/",
                                          rich_help_panel=OUTPUT)]
Config = Annotated[Path | None, typer.Option(
    metavar="FILE", help="run options from a YAML, TOML or JSON file (RunConfig names: batch_size or batch-size), "
                         "or a finished run's report.json; options given on the command line win",
    rich_help_panel=OUTPUT)]
# optimisation
Epochs = Annotated[int, typer.Option(help="training epochs", rich_help_panel=OPTIM)]
BatchSize = Annotated[int, typer.Option(help="batch size per process", rich_help_panel=OPTIM)]
Lr = Annotated[float, typer.Option(help="initial learning rate (the peak, after any --warmup-epochs)",
                                   rich_help_panel=OPTIM)]
WeightDecay = Annotated[float, typer.Option(
    help="weight decay (on every parameter, unless --no-decay-norm-bias)", rich_help_panel=OPTIM)]
Momentum = Annotated[float, typer.Option(help="momentum of SGD-family optimizers", rich_help_panel=OPTIM)]
Opt = Annotated[str, typer.Option(
    help="optimizer: momentum (SGD with momentum), sgd (Nesterov), adamw, lamb, …: any name "
         "timm.optim.create_optimizer_v2 accepts", rich_help_panel=OPTIM)]
NoDecayNormBias = Annotated[bool, typer.Option(
    "--no-decay-norm-bias/--decay-norm-bias",
    help="no weight decay on normalisation weights and biases (timm's filter_bias_and_bn)", rich_help_panel=OPTIM)]
Schedule = Annotated[str, typer.Option(
    "--sched", "--schedule",
    help="lr schedule: cosine | step (×--decay-rate at 62.5%, 75%, 87.5% of the epochs) | multistep "
         "(×--decay-rate after each of --decay-milestones) | poly | constant", rich_help_panel=OPTIM)]
DecayMilestones = Annotated[list[str] | None, typer.Option(
    metavar="EPOCHS", help="multistep: the epochs after which the lr decays, e.g. 150,180,210 (RepDistiller's)",
    rich_help_panel=OPTIM)]
DecayRate = Annotated[float, typer.Option(help="step, multistep: the lr's factor at each decay",
                                          rich_help_panel=OPTIM)]
WarmupEpochs = Annotated[int, typer.Option(help="linear lr warm-up over the first N epochs (within --epochs)",
                                           rich_help_panel=OPTIM)]
WarmupLr = Annotated[float, typer.Option(help="the lr the warm-up starts from", rich_help_panel=OPTIM)]
MinLr = Annotated[float, typer.Option(help="the lowest lr of the schedule (timm's min_lr)", rich_help_panel=OPTIM)]
SchedOnUpdates = Annotated[bool, typer.Option(help="update the lr after every optimizer step, not once per epoch",
                                              rich_help_panel=OPTIM)]
ClipGrad = Annotated[float | None, typer.Option(
    metavar="NORM", help="clip the global gradient norm to NORM \\[default: no clipping]", rich_help_panel=OPTIM)]
GradAccum = Annotated[int, typer.Option(
    metavar="N", help="one optimizer step every N batches (N × --batch-size examples per process)",
    rich_help_panel=OPTIM)]
Mixup = Annotated[float, typer.Option(
    metavar="ALPHA", help="mixup alpha, 0 = off (timm's Mixup); the teacher sees the same mixed images",
    rich_help_panel=OPTIM)]
Cutmix = Annotated[float, typer.Option(
    metavar="ALPHA", help="cutmix alpha, 0 = off (timm's Mixup); the teacher sees the same mixed images",
    rich_help_panel=OPTIM)]
LabelSmoothing = Annotated[float, typer.Option(
    metavar="EPS", help="label smoothing of the targets; kdcli's default 0, unlike timm's Mixup's 0.1",
    rich_help_panel=OPTIM)]
Ema = Annotated[float | None, typer.Option(
    metavar="DECAY", help="decay (e.g. 0.9998) of an exponential moving average of the student, evaluated beside "
                          "it; DIR/model_ema.safetensors \\[default: off]", rich_help_panel=OPTIM)]
Seed = Annotated[int, typer.Option(help="random seed (weights, order, augmentation)", rich_help_panel=OPTIM)]
# speed
Precision = Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (mixed precision through Accelerate)",
                                        rich_help_panel=SPEED)]
ChannelsLast = Annotated[bool, typer.Option(help="channels-last memory format for the models and their inputs",
                                            rich_help_panel=SPEED)]
Compile = Annotated[bool, typer.Option(
    help="torch.compile the step's forward passes and loss terms as one graph (teacher, student, method)",
    rich_help_panel=SPEED)]
CompileMode = Annotated[str, typer.Option(
    help="default | reduce-overhead (CUDA graphs: no launch overhead) | max-autotune (torch.compile's modes)",
    rich_help_panel=SPEED)]
DataPath = Annotated[str, typer.Option(
    help="auto | resident | loader: resident decodes the training split once (cached under $KDCLI_CACHE_DIR, "
         "default ~/.cache/kdcli), holds it on the device and augments batches there (recipes cifar, crop, none; "
         "the same weights as the loader); auto uses it where it applies and fits a quarter of the device's memory",
    rich_help_panel=SPEED)]
TeacherCache = Annotated[str | None, typer.Option(
    help="store the teacher's logits per (training row, view) in this folder and reuse them: logit methods then "
         "skip the teacher's forward (filled on the first pass, or ahead by `kdcli cache-teacher`)",
    rich_help_panel=SPEED)]
CacheViews = Annotated[int, typer.Option(
    help="with random augmentation: K views per image, epoch e trains on view e mod K (teacher and student see the "
         "same image); without augmentation one view is exact", rich_help_panel=SPEED)]
CacheTopk = Annotated[int | None, typer.Option(
    help="store only the K largest logits and the log-sum-exp of the rest, spread evenly (many classes; an "
         "approximation, exact in the top K at temperature 1)", rich_help_panel=SPEED)]
CacheDtype = Annotated[str, typer.Option(help="float16 | float32 storage of the cached logits",
                                         rich_help_panel=SPEED)]
Workers = Annotated[int | None, typer.Option(
    help="data-loading processes \\[default: 0 for built-ins, else the usable cores, at most 8]",
    rich_help_panel=SPEED)]
# corruption
Noise = Annotated[str | None, typer.Option(
    help="label noise on the training split: symmetric:R, symmetric-incl:R, pairflip:R, asymmetric:R[:FILE], "
         "matrix:FILE", rich_help_panel=CORRUPTION)]
Imbalance = Annotated[str | None, typer.Option(help="class imbalance on the training split: longtail:F, step:RHO:MU",
                                               rich_help_panel=CORRUPTION)]
CorruptionSeed = Annotated[int, typer.Option(help="seed of the corruption (a pure function of seed, index, label)",
                                             rich_help_panel=CORRUPTION)]
ClassOrder = Annotated[str | None, typer.Option(
    help="class order of the imbalance profile: a permutation 3,1,0,2 or random:SEED \\[default: class index]",
    rich_help_panel=CORRUPTION)]
# data
ImageSize = Annotated[int | None, typer.Option(
    help="the student's input size \\[default: a pretrained timm model's own, else the data's native size]",
    rich_help_panel=DATA)]
NumClasses = Annotated[int | None, typer.Option(
    help="number of classes, for integer labels whose largest value is not the last class", rich_help_panel=DATA)]
Streaming = Annotated[bool, typer.Option(help="stream the training split (datasets.IterableDataset)",
                                         rich_help_panel=DATA)]
ShuffleBuffer = Annotated[int, typer.Option(help="shuffle buffer when streaming", rich_help_panel=DATA)]
Augment = Annotated[str, typer.Option(
    help="auto | cifar (pad-crop + flip; crop-flip is an alias) | imagenet (random-resized crop + flip) | "
         "randaugment (imagenet + rand-m9-mstd0.5-inc1) | crop | none; auto: cifar up to 64 px, imagenet above",
    rich_help_panel=DATA)]
MaxBad = Annotated[float, typer.Option(
    help="unreadable images (undecodable, null) are skipped, named and counted; more than this fraction of a "
         "split stops the run", rich_help_panel=DATA)]
ImageColumn = Annotated[str | None, typer.Option(help="image column \\[default: detected]", rich_help_panel=DATA)]
LabelColumn = Annotated[str | None, typer.Option(help="label column \\[default: detected]", rich_help_panel=DATA)]
TrainSplit = Annotated[str | None, typer.Option(help="training split \\[default: train]", rich_help_panel=DATA)]
EvalSplit = Annotated[str | None, typer.Option(help="evaluation split \\[default: test/validation/valid]",
                                               rich_help_panel=DATA)]
# output
Resume = Annotated[Path | None, typer.Option(
    help="continue the interrupted run in this folder (its own options are used)", rich_help_panel=OUTPUT)]
Overwrite = Annotated[bool, typer.Option(help="replace a finished or interrupted run in --out",
                                         rich_help_panel=OUTPUT)]
AutoResume = Annotated[bool, typer.Option(
    help="continue the interrupted run in --out if its options are the same, else start it: one command line "
         "for the first start and every requeue (sbatch --requeue)", rich_help_panel=OUTPUT)]
StopAfter = Annotated[int | None, typer.Option(
    help="stop after this epoch, leaving a run that --resume continues", rich_help_panel=OUTPUT)]


# ----------------------------------------------------------------------------- train and distill


def _given(ctx: typer.Context, command: str) -> set[str]:
    """The RunConfig fields whose option was given on the command line (not left at its default)."""
    renames = RENAMES[command]
    # by the source's name: click's ParameterSource, or the copy of click that newer typer versions carry
    return {renames.get(name, name) for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def _run(values: dict, command: str, required: tuple[str, ...], ctx: typer.Context, config: Path | None,
         resume: Path | None, overwrite: bool, auto_resume: bool, stop_after_epoch: int | None) -> None:
    from kdcli.engine import loop

    if resume is not None:
        if config is not None:
            raise KdcliError("--config and --resume exclude each other: a resumed run keeps its own options")
        others = sorted(_given(ctx, command) - set(CONTROL))
        if others:
            option = {field: name for name, field in RENAMES[command].items()}  # student → model for train
            raise KdcliError("--resume continues a run with its own options: drop "
                             f"{', '.join(flag(option.get(k, k)) for k in others)} (or start a new run with them "
                             "in another --out)")
        cfg = loop.resumed_config(resume)
        if cfg.command != command:
            raise KdcliError(f"{resume} holds a kdcli {cfg.command} run: continue it with kdcli {cfg.command} "
                             f"--resume {resume}")
        console.print(f"resuming the run in {resume} with its own options")
    else:
        cfg = resolve_config(command, values, _given(ctx, command), config, required)
    if stop_after_epoch is not None and stop_after_epoch < 1:
        raise KdcliError("invalid --stop-after-epoch: must be at least 1")
    report = loop.run(cfg, overwrite=overwrite, resume=resume is not None, auto_resume=auto_resume,
                      console=console, stop_after_epoch=stop_after_epoch)
    if report is None:  # stopped early on purpose (--stop-after-epoch), or not the main process
        if stop_after_epoch is not None and not (Path(cfg.out) / "report.json").exists():
            console.print(f"stopped as asked; continue with: kdcli {cfg.command} --resume {cfg.out}")
        return
    m = report.metrics
    console.print(f"[bold]done[/bold]: top-1 {100 * m.final.top1:.2f}% (best {100 * m.best.top1:.2f}% at epoch "
                  f"{m.best.epoch}); wrote {cfg.out}/model.safetensors and {cfg.out}/report.json")


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="timm model name, cifar_* name, or kdcli checkpoint",
                                              rich_help_panel=MODELS)] = None,
    model_weights: Annotated[str | None, typer.Option(
        help="weights (.safetensors, or .pth/.bin read with weights_only) for a named architecture",
        rich_help_panel=MODELS)] = None,
    pretrained: Annotated[bool, typer.Option(
        help="start from timm's pretrained weights for --model (e.g. resnet50.a1_in1k, hf-hub:...)",
        rich_help_panel=MODELS)] = False,
    dataset: Dataset = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    train_split: TrainSplit = None,
    eval_split: EvalSplit = None,
    image_size: ImageSize = None,
    num_classes: NumClasses = None,
    augment: Augment = default("augment"),
    streaming: Streaming = default("streaming"),
    shuffle_buffer: ShuffleBuffer = default("shuffle_buffer"),
    max_bad_fraction: MaxBad = default("max_bad_fraction"),
    noise: Noise = None,
    imbalance: Imbalance = None,
    corruption_seed: CorruptionSeed = default("corruption_seed"),
    class_order: ClassOrder = None,
    epochs: Epochs = default("epochs"),
    batch_size: BatchSize = default("batch_size"),
    lr: Lr = default("lr"),
    weight_decay: WeightDecay = default("weight_decay"),
    momentum: Momentum = default("momentum"),
    opt: Opt = default("opt"),
    no_decay_norm_bias: NoDecayNormBias = default("no_decay_norm_bias"),
    schedule: Schedule = default("schedule"),
    decay_milestones: DecayMilestones = None,
    decay_rate: DecayRate = default("decay_rate"),
    warmup_epochs: WarmupEpochs = default("warmup_epochs"),
    warmup_lr: WarmupLr = default("warmup_lr"),
    min_lr: MinLr = default("min_lr"),
    sched_on_updates: SchedOnUpdates = default("sched_on_updates"),
    clip_grad: ClipGrad = None,
    grad_accum: GradAccum = default("grad_accum"),
    mixup: Mixup = default("mixup"),
    cutmix: Cutmix = default("cutmix"),
    label_smoothing: LabelSmoothing = default("label_smoothing"),
    ema: Ema = None,
    seed: Seed = default("seed"),
    precision: Precision = default("precision"),
    channels_last: ChannelsLast = default("channels_last"),
    compile: Compile = default("compile"),
    compile_mode: CompileMode = default("compile_mode"),
    data_path: DataPath = default("data_path"),
    workers: Workers = None,
    out: Out = None,
    config: Config = None,
    resume: Resume = None,
    overwrite: Overwrite = False,
    auto_resume: AutoResume = False,
    stop_after_epoch: StopAfter = None,
) -> None:
    """Standard training (the study's baseline): cross-entropy on the labels, no teacher."""
    values = dict(locals())
    control = {k: values.pop(k) for k in CONTROL}
    values.update(command="train", student=values.pop("model"), student_weights=values.pop("model_weights"),
                  student_pretrained=values.pop("pretrained"), method="ce",
                  decay_milestones=int_list(decay_milestones, "--decay-milestones", INT_LISTS["decay_milestones"]))
    _run(values, "train", ("student", "dataset", "out"), **control)


@app.command()
def distill(
    ctx: typer.Context,
    teacher: Annotated[list[str] | None, typer.Option(
        help="timm model name, cifar_* name, or kdcli checkpoint; repeat for an ensemble of teachers (logit "
             "methods distill from the mean of their probabilities)", rich_help_panel=MODELS)] = None,
    teacher_weights: Annotated[list[str] | None, typer.Option(
        help="weights (.safetensors, or .pth/.bin read with weights_only) for a named teacher architecture; with "
             "several --teacher, one per teacher in the same order ('-' for none)", rich_help_panel=MODELS)] = None,
    teacher_pretrained: Annotated[bool, typer.Option(
        help="timm's pretrained weights for the --teacher name (e.g. resnet50.a1_in1k, hf-hub:...)",
        rich_help_panel=MODELS)] = False,
    teacher_image_size: Annotated[list[int] | None, typer.Option(
        help="the teacher's input size; it gets the student's images resized on the device; one for all "
             "teachers or one per teacher \\[default: a pretrained timm teacher's own, a checkpoint's, else "
             "the student's]", rich_help_panel=MODELS)] = None,
    student: Annotated[str | None, typer.Option(help="timm model name, cifar_* name, or kdcli checkpoint",
                                                rich_help_panel=MODELS)] = None,
    student_weights: Annotated[str | None, typer.Option(help="initial weights for a named student",
                                                        rich_help_panel=MODELS)] = None,
    student_pretrained: Annotated[bool, typer.Option(
        help="timm's pretrained weights for the --student name", rich_help_panel=MODELS)] = False,
    ignore_class_names: Annotated[bool, typer.Option(
        help="use a teacher whose class names differ from the dataset's (same number of classes) as it is",
        rich_help_panel=MODELS)] = False,
    method: Annotated[str, typer.Option(help="distillation method (see `kdcli methods`)",
                                        rich_help_panel=METHOD)] = "kd",
    method_arg: Annotated[list[str] | None, typer.Option(
        help="method argument KEY=VALUE (repeatable), e.g. T=2; namespaced when composed: at.beta=500",
        rich_help_panel=METHOD)] = None,
    student_stages: Annotated[str | None, typer.Option(
        help="student feature stages for feature methods, e.g. 1,2,3 \\[default: the last 3]",
        rich_help_panel=METHOD)] = None,
    teacher_stages: Annotated[str | None, typer.Option(
        help="teacher feature stages, as many as the student's \\[default: the last 3]",
        rich_help_panel=METHOD)] = None,
    feature_teacher: Annotated[int, typer.Option(
        help="with several --teacher: the one (0 = the first) whose features feature methods read",
        rich_help_panel=METHOD)] = 0,
    dataset: Dataset = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    train_split: TrainSplit = None,
    eval_split: EvalSplit = None,
    image_size: ImageSize = None,
    num_classes: NumClasses = None,
    augment: Augment = default("augment"),
    streaming: Streaming = default("streaming"),
    shuffle_buffer: ShuffleBuffer = default("shuffle_buffer"),
    max_bad_fraction: MaxBad = default("max_bad_fraction"),
    noise: Noise = None,
    imbalance: Imbalance = None,
    corruption_seed: CorruptionSeed = default("corruption_seed"),
    class_order: ClassOrder = None,
    epochs: Epochs = default("epochs"),
    batch_size: BatchSize = default("batch_size"),
    lr: Lr = default("lr"),
    weight_decay: WeightDecay = default("weight_decay"),
    momentum: Momentum = default("momentum"),
    opt: Opt = default("opt"),
    no_decay_norm_bias: NoDecayNormBias = default("no_decay_norm_bias"),
    schedule: Schedule = default("schedule"),
    decay_milestones: DecayMilestones = None,
    decay_rate: DecayRate = default("decay_rate"),
    warmup_epochs: WarmupEpochs = default("warmup_epochs"),
    warmup_lr: WarmupLr = default("warmup_lr"),
    min_lr: MinLr = default("min_lr"),
    sched_on_updates: SchedOnUpdates = default("sched_on_updates"),
    clip_grad: ClipGrad = None,
    grad_accum: GradAccum = default("grad_accum"),
    mixup: Mixup = default("mixup"),
    cutmix: Cutmix = default("cutmix"),
    label_smoothing: LabelSmoothing = default("label_smoothing"),
    ema: Ema = None,
    seed: Seed = default("seed"),
    precision: Precision = default("precision"),
    channels_last: ChannelsLast = default("channels_last"),
    compile: Compile = default("compile"),
    compile_mode: CompileMode = default("compile_mode"),
    data_path: DataPath = default("data_path"),
    teacher_cache: TeacherCache = None,
    cache_views: CacheViews = default("cache_views"),
    cache_topk: CacheTopk = None,
    cache_dtype: CacheDtype = default("cache_dtype"),
    workers: Workers = None,
    out: Out = None,
    config: Config = None,
    resume: Resume = None,
    overwrite: Overwrite = False,
    auto_resume: AutoResume = False,
    stop_after_epoch: StopAfter = None,
) -> None:
    """Distill a teacher into a student with a method from `kdcli methods` (or several: kd+at)."""
    values = dict(locals())
    control = {k: values.pop(k) for k in CONTROL}
    values.pop("method_arg")
    values.update(command="distill", method_args=key_values(method_arg or []),
                  teacher_weights=[None if w == "-" else w for w in teacher_weights] if teacher_weights else None,
                  student_stages=int_list(student_stages, "--student-stages", INT_LISTS["student_stages"]),
                  teacher_stages=int_list(teacher_stages, "--teacher-stages", INT_LISTS["teacher_stages"]),
                  decay_milestones=int_list(decay_milestones, "--decay-milestones", INT_LISTS["decay_milestones"]))
    _run(values, "distill", ("teacher", "student", "dataset", "out"), **control)


@app.command("cache-teacher")
def cache_teacher(
    teacher: Annotated[list[str] | None, typer.Option(
        help="timm model name, cifar_* name, or kdcli checkpoint; repeat for an ensemble (as for distill)",
        rich_help_panel=MODELS)] = None,
    teacher_weights: Annotated[list[str] | None, typer.Option(
        help="weights for a named teacher; with several --teacher, one per teacher ('-' for none)",
        rich_help_panel=MODELS)] = None,
    teacher_pretrained: Annotated[bool, typer.Option(
        help="timm's pretrained weights for the --teacher name", rich_help_panel=MODELS)] = False,
    teacher_image_size: Annotated[list[int] | None, typer.Option(
        help="the teacher's input size (one for all teachers or one per teacher), as for distill",
        rich_help_panel=MODELS)] = None,
    student: Annotated[str | None, typer.Option(
        help="the student of the runs to come: its input size decides the images' size",
        rich_help_panel=MODELS)] = None,
    student_pretrained: Annotated[bool, typer.Option(
        help="as distill's (a pretrained timm student brings its own input size)", rich_help_panel=MODELS)] = False,
    ignore_class_names: Annotated[bool, typer.Option(
        help="use a teacher whose class names differ from the dataset's as it is (as for distill)",
        rich_help_panel=MODELS)] = False,
    dataset: Dataset = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    train_split: TrainSplit = None,
    eval_split: EvalSplit = None,
    image_size: ImageSize = None,
    num_classes: NumClasses = None,
    augment: Augment = default("augment"),
    noise: Noise = None,
    imbalance: Imbalance = None,
    corruption_seed: CorruptionSeed = default("corruption_seed"),
    class_order: ClassOrder = None,
    seed: Annotated[int, typer.Option(help="random seed of the runs to come (it picks the augmentation)",
                                      rich_help_panel=DATA)] = default("seed"),
    teacher_cache: Annotated[str | None, typer.Option(
        help="the cache folder to fill (then give it to distill as --teacher-cache)", rich_help_panel=OUTPUT)] = None,
    cache_views: CacheViews = default("cache_views"),
    cache_topk: CacheTopk = None,
    cache_dtype: CacheDtype = default("cache_dtype"),
    batch_size: Annotated[int, typer.Option(help="images per teacher forward", rich_help_panel=SPEED)] = 128,
    precision: Precision = default("precision"),
    jobs: Annotated[int | None, typer.Option(
        help="data-loading worker processes \\[default: 0 for built-ins, else the usable cores, at most 8]",
        rich_help_panel=SPEED)] = None,
) -> None:
    """Fill a --teacher-cache ahead of training: the teacher's logits of every training row in every view.

    Give the options of the distill runs that will use it (teacher, student, data, corruption, augmentation,
    seed, cache options). Interrupted, it keeps what it stored: run it again to fill the rest.
    """
    values = dict(locals())
    from kdcli.engine.fill import fill_cache

    if jobs is not None and jobs < 0:
        raise KdcliError(f"invalid --jobs {jobs}: must be 0 (load in this process) or more")
    values.pop("jobs")
    missing = [flag(k) for k in ("teacher", "student", "dataset", "teacher_cache") if not values[k]]
    if missing:
        raise KdcliError(f"missing option {', '.join(missing)}")
    values.update(command="distill", method="kd", out=".",
                  teacher_weights=[None if w == "-" else w for w in teacher_weights] if teacher_weights else None)
    cfg = make_config(**values)
    result = fill_cache(cfg, jobs=jobs, console=console)
    console.print(result.line(), highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="a kdcli checkpoint (model.safetensors)")],
    dataset: Annotated[str, typer.Option(help="dataset to evaluate on (as for train)", rich_help_panel=DATA)],
    split: Annotated[str | None, typer.Option(
        "--split", "--eval-split", help="split \\[default: test/validation/valid]", rich_help_panel=DATA)] = None,
    teacher: Annotated[list[str] | None, typer.Option(
        help="compare with this teacher (agreement, KL, its own top-1); repeat for an ensemble",
        rich_help_panel=MODELS)] = None,
    teacher_weights: Annotated[list[str] | None, typer.Option(
        help="weights for a named teacher; with several, one per teacher ('-' for none)",
        rich_help_panel=MODELS)] = None,
    batch_size: Annotated[int, typer.Option(help="batch size", min=1, rich_help_panel=SPEED)] = 128,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    precision: Precision = "fp32",
    workers: Workers = None,
    max_bad_fraction: MaxBad = default("max_bad_fraction"),
    ignore_class_names: Annotated[bool, typer.Option(
        help="use a checkpoint whose class names differ from the dataset's (same count) as it is",
        rich_help_panel=MODELS)] = False,
    noise: Annotated[str | None, typer.Option(
        help="evaluate on a noisy copy of the split (like train's --noise)", rich_help_panel=CORRUPTION)] = None,
    imbalance: Annotated[str | None, typer.Option(help="evaluate on an imbalanced copy of the split",
                                                  rich_help_panel=CORRUPTION)] = None,
    corruption_seed: CorruptionSeed = 0,
    class_order: ClassOrder = None,
    out: Annotated[Path | None, typer.Option(help="write the metrics as JSON to this file",
                                             rich_help_panel=OUTPUT)] = None,
) -> None:
    """Evaluate a checkpoint: top-1, top-5, NLL, ECE, per-class top-1, agreement with a teacher."""
    from kdcli.engine import loop
    from kdcli.models.checkpoint import write_text_atomic

    if out is not None and out.is_dir():
        raise KdcliError(f"--out {out} is a folder; give a file name such as {out}/eval.json")
    if out is not None and any(p.exists() and not p.is_dir() for p in out.absolute().parents):
        raise KdcliError(f"--out {out}: a folder on its path is a file")
    weights = [None if w == "-" else w for w in teacher_weights] if teacher_weights else None
    result = loop.evaluate_checkpoint(checkpoint, dataset, split=split, teacher=teacher,
                                      teacher_weights=weights, batch_size=batch_size,
                                      image_column=image_column, label_column=label_column,
                                      precision=precision, workers=workers, noise=noise, imbalance=imbalance,
                                      corruption_seed=corruption_seed, class_order=class_order,
                                      max_bad_fraction=max_bad_fraction, ignore_class_names=ignore_class_names)
    m = result.metrics.final
    table = Table(title=f"{checkpoint} on {dataset} [{result.data.eval_split}]")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("examples", str(m.num_examples))
    skipped = (result.data.skipped or {}).get("eval", {}).get("count", 0)
    if skipped:
        table.add_row("skipped (unreadable)", str(skipped))
    table.add_row("top-1", f"{100 * m.top1:.2f}%")
    if m.top5 is not None:
        table.add_row("top-5", f"{100 * m.top5:.2f}%")
    table.add_row("NLL", f"{m.nll:.4f}")
    table.add_row("ECE (15 bins)", f"{m.ece:.4f}")
    if m.teacher_agreement is not None:
        table.add_row("agreement with teacher", f"{100 * m.teacher_agreement:.2f}%")
        table.add_row("KL(teacher ‖ model)", f"{m.teacher_kl:.4f}")
        who = "teacher" if len(result.teachers or []) < 2 else f"ensemble of {len(result.teachers)} teachers"
        table.add_row(f"top-1 of the {who}", f"{100 * m.teacher_top1:.2f}%")
    console.print(table)
    if out is not None:
        write_text_atomic(out, result.model_dump_json(indent=2))
        console.print(f"wrote {out}")


@app.command("corrupt-dataset")
def corrupt_dataset(
    dataset: Annotated[str, typer.Option(help="source dataset (as for train)", rich_help_panel=DATA)],
    out: Annotated[Path, typer.Option(help="folder to write: parquet splits + manifest.json",
                                      rich_help_panel=OUTPUT)],
    noise: Noise = None,
    imbalance: Imbalance = None,
    corruption_seed: CorruptionSeed = 0,
    class_order: ClassOrder = None,
    split: Annotated[str | None, typer.Option(
        "--split", "--train-split", help="split to corrupt \\[default: train]", rich_help_panel=DATA)] = None,
    eval_split: EvalSplit = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a corrupted copy of a dataset (noisy labels and/or imbalance) that --dataset DIR reads back."""
    from kdcli.data.export import corrupt_dataset as export

    m = export(dataset, out, noise=noise, imbalance=imbalance, seed=corruption_seed, class_order=class_order,
               split=split, eval_split=eval_split, image_column=image_column, label_column=label_column,
               overwrite=overwrite)
    c = m["corruption"]
    console.print(f"wrote {out}: {m['num_train']} training examples (noise rate {100 * c['noise_rate']:.1f}%), "
                  f"{m['num_eval']} clean evaluation examples; see {out}/manifest.json")


@app.command("methods")
def list_methods() -> None:
    """List the registered methods: name, family, what it mimics, its source, what it needs, its defaults."""
    from kdcli import methods

    console.print("kdcli methods (compose with +, e.g. kd+at; set arguments with --method-arg KEY=VALUE; "
                  "several --teacher: 'ensemble' methods distill from their mixture, 'one' from --feature-teacher)")
    for name in methods.available():
        cls = methods.get(name)
        defaults = " ".join(f"{k}={v}" for k, v in cls.defaults().items()) or "none"
        stages = cls.stages_note or ("online: the teacher trains too" if cls.online else "")
        source = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        teachers = {"combined": "ensemble", "one": "one", "no": "one only"}[cls.teachers] if cls.uses_teacher else "-"
        console.print(f"\n[bold]{name}[/bold]  {cls.family}  needs {','.join(sorted(cls.needs))}  "
                      f"teachers: {teachers}", highlight=False)
        console.print(f"  mimics: {cls.mimics}", highlight=False)
        console.print(f"  source: {source}", highlight=False)
        if stages:
            console.print(f"  stages: {stages}", highlight=False)
        console.print(f"  defaults: {defaults}", highlight=False)


@app.command()
def study(
    spec: Annotated[Path | None, typer.Argument(help="study spec, YAML or TOML (or use --preset)")] = None,
    out: Annotated[Path | None, typer.Option(help="study folder: runs/, results.json/.csv/.md, plots/")] = None,
    preset: Annotated[str | None, typer.Option(
        help="a built-in spec: digits-noise | digits-imbalance | cifar10-noise[-cpu] | cifar10-imbalance[-cpu] "
             "(`kdcli study --preset NAME --dataset PATH`)")] = None,
    dataset: Annotated[list[str] | None, typer.Option(
        help="the spec's dataset(s) replaced by this (repeatable): your copy of the data, e.g. CIFAR-10 in the hub "
             "layout for the cifar10 presets")] = None,
    jobs: Annotated[int | None, typer.Option(
        help="runs at a time, each in its own process with its share of the CPU cores \\[default: one per visible "
             "GPU, else 1]")] = None,
    print_commands: Annotated[bool, typer.Option(
        help="print one `kdcli …` line per run that can start now (for any scheduler), and run nothing")] = False,
) -> None:
    """Run a whole comparison (a grid of runs) and aggregate it into tables and plots.

    Teachers, a CE student and one student per method, for every corruption setting and seed; then mean
    ± std over seeds and the gain over CE. Run it again to skip finished runs and resume interrupted ones.
    """
    from kdcli.study import execute, plan, results
    from kdcli.study import spec as study_spec

    if out is None:
        raise KdcliError("missing option --out DIR (the study folder)")
    if jobs is not None and jobs < 1:
        raise KdcliError(f"invalid --jobs {jobs}: must be at least 1")
    if out.exists() and not out.is_dir():
        raise KdcliError(f"--out {out} exists and is not a folder")
    parsed, text = study_spec.load(spec, preset, dataset)
    runs = plan.plan(parsed, out)
    plan.check(parsed, runs)
    if print_commands:
        ready, waiting = plan.ready(runs)
        for run in ready:
            print(plan.shell(run.command()))
        if waiting:
            err_console.print(f"# {len(waiting)} more runs wait for teachers that have not finished; "
                              "print the commands again once these are done", highlight=False, soft_wrap=True)
        return
    source = f"spec{spec.suffix.lower() if spec is not None and spec.suffix.lower() == '.toml' else '.yaml'}"
    from kdcli.engine.signals import Interrupted

    gpus = execute.visible_gpus()
    jobs = jobs if jobs is not None else execute.default_jobs(gpus)
    warning = execute.sharing_warning(jobs, gpus)
    if warning:
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)

    try:
        res, summary = execute.run_study(parsed, runs, out, jobs=jobs, console=console, source=(source, text))
    except (KeyboardInterrupt, Interrupted) as e:
        err_console.print("interrupted: run the same command again to resume (finished runs are kept)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code if isinstance(e, Interrupted) else 130) from None
    console.print(results.study_markdown(res, parsed), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {out}/results.json, results.csv, results.md and {len(res['plots'])} plots in {out}/plots",
                  highlight=False, soft_wrap=True)
    if summary.failed or summary.skipped:
        first, why = summary.failed[0]
        raise KdcliError(f"{len(summary.failed)} runs failed and {len(summary.skipped)} were skipped (their teacher "
                         f"failed), e.g. {first.name}: {why}; see its log.txt, fix, and run the study again")


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="report.json files, or folders searched for them")],
    format: Annotated[str, typer.Option("--format", help="table | md | csv")] = "table",
) -> None:
    """Compare runs: a table of top-1 grouped by the settings that differ.

    Seeds are pooled (mean ± std), with the gain over the CE run of the same setting.
    """
    from kdcli.study import results

    if format not in ("table", "md", "csv"):
        raise KdcliError(f"invalid --format {format!r}: use table, md or csv")
    keys, groups = results.compare_groups(results.collect_reports(paths))
    header, body = results.compare_table(keys, groups)
    if format == "md":
        print(results.markdown(header, body), end="")
    elif format == "csv":
        print(results.rows_csv([dict(zip(header, row, strict=True)) for row in body], header), end="")
    else:
        table = Table(title=f"{sum(g['n'] for g in groups)} runs, grouped by "
                            f"{', '.join(keys) or 'nothing (they agree on every setting)'}")
        for i, col in enumerate(header):
            table.add_column(col, justify="right" if i >= len(keys) else "left", overflow="fold")
        for row in body:
            table.add_row(*row)
        console.print(table)


def _version(value: bool) -> None:
    if value:
        console.print(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks (accepted anywhere on the line)")] = False,
) -> None:
    """kdcli: train, distill and evaluate image classifiers; see README.md."""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from kdcli.engine.signals import Interrupted

    if not err_console.is_terminal:  # a log file gets kdcli's lines, not datasets' progress bars
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        else:  # read when datasets is imported (importing it here would slow every command down)
            os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    try:
        app(args=argv, prog_name="kdcli")
    except KdcliError as e:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Interrupted as e:  # SIGTERM/SIGINT during a run: state saved, one line, 128 + signal
        err_console.print(str(e), highlight=False, soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run: stop at once
        if debug:
            raise
        err_console.print("interrupted (a run keeps the resume state it last saved: continue it with "
                          "--auto-resume)", highlight=False, soft_wrap=True)
        sys.exit(130)
