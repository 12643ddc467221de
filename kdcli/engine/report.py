"""The run report: one typed model, written as ``report.json`` at the end of every finished run."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from kdcli import __version__

SCHEMA_VERSION = 1


class Metrics(BaseModel):
    num_examples: int
    top1: float
    top5: float | None = Field(None, description="null when there are fewer than 6 classes")
    nll: float
    ece: float = Field(description="expected calibration error, 15 equal-width bins, L1")
    per_class_top1: dict[str, float | None] = Field(description="class name → top-1; null if absent")
    balanced_top1: float | None = Field(None, description="balanced accuracy: the mean per-class top-1 (recall) "
                                                          "over the classes present in the evaluation split")
    shot_top1: dict[str, float | None] | None = Field(
        None, description="many/medium/few-shot top-1 (Liu et al. 2019): the mean per-class top-1 over the classes "
                          "with more than 100, 20 to 100, fewer than 20 training images (data.train_class_counts); "
                          "null for an empty group; absent when the counts are not known (streaming, kdcli "
                          "evaluate)")
    teacher_agreement: float | None = Field(None, description="fraction with the teacher's argmax")
    teacher_kl: float | None = Field(None, description="KL(teacher ‖ model) at T=1, batch mean")
    teacher_top1: float | None = Field(None, description="the teacher's own top-1 (an ensemble's: of its mean "
                                                         "probability) on the same examples")


class Best(BaseModel):
    epoch: int = Field(description="the epoch as history numbers it (warm-up epochs included, never picked)")
    top1: float


class MetricsBlock(BaseModel):
    final: Metrics
    best: Best | None = None


class ModelInfo(BaseModel):
    name: str = Field(description="architecture (timm name)")
    source: str = Field(description="timm | pretrained | hf-hub | local-dir | weights | checkpoint")
    path: str | None = None
    params: int
    sha256: str | None = Field(None, description="of the weights file, when there is one")
    trained: bool | None = Field(None, description="false for fresh random weights")
    adapted: list[str] = Field([], description="what loading changed to fit the data (classifier, first conv)")
    class_order: str | None = Field(
        None, description="how its class names met the dataset's: same | permuted | generic | ignored")
    input_size: int | None = Field(None, description="the model's own input size (batches are resized to it)")


class MethodInfo(BaseModel):
    name: str
    family: str
    args: dict[str, Any] = Field(description="resolved arguments; per method for a composition like kd+at")
    warmup_epochs: int = Field(0, description="epochs of the method's warm-up stage, before the main epochs")


class PeerInfo(BaseModel):
    """The other network of an online method (DML): trained alongside the student."""

    model: ModelInfo
    metrics: Metrics


class EmaInfo(BaseModel):
    """The student's exponential moving average (``--ema``, timm's ModelEmaV3), evaluated beside the raw
    student: ``metrics`` of the report are the raw student's (model.safetensors), these the average's."""

    decay: float
    path: str
    sha256: str
    metrics: MetricsBlock


class DataInfo(BaseModel):
    dataset: str
    source: str
    train_split: str
    eval_split: str
    num_classes: int
    class_names: list[str]
    num_train: int | None
    num_eval: int
    image_size: int
    in_chans: int
    streaming: bool
    augment: str | None = Field(None, description="the training augmentation recipe, as resolved")
    data_path: str | None = Field(None, description="how training batches were made: resident (decoded once, held "
                                                    "and augmented on the device) or loader (per example)")
    interpolation: str | None = Field(None, description="resize interpolation of the student's input")
    crop_pct: float | None = Field(None, description="evaluation: resize to image_size / crop_pct, centre crop")
    corruption: dict[str, Any] | None = None
    train_class_counts: list[int] | None = Field(
        None, description="training images per class, as trained (within the slice, after imbalance) and by their "
                          "true class (label noise moves labels, not images: corruption.class_counts_after counts "
                          "the noisy labels); null when not known (streaming, kdcli evaluate)")
    skipped: dict[str, Any] | None = Field(
        None, description="unreadable examples left out, per split: {count, examples: first names}; the "
                          "training count is that of the last epoch")


class Environment(BaseModel):
    python: str
    torch: str
    timm: str
    platform: str
    device: str
    world_size: int
    precision: str


class EpochRecord(BaseModel):
    epoch: int
    stage: Literal["warmup", "train"] = "train"
    lr: float
    loss: float
    terms: dict[str, float]
    eval_top1: float
    eval_top1_ema: float | None = Field(None, description="top-1 of the student's moving average (--ema)")
    images: int = Field(description="training images seen, all processes")
    seconds: float = Field(description="training and evaluation")
    images_per_s: float


class Timing(BaseModel):
    total_seconds: float
    train_images_per_s: float


class Report(BaseModel):
    """Everything one train/distill run did, enough to repeat it (``config``) and judge it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kdcli_version: str = __version__
    command: Literal["train", "distill"]
    created: str
    config: dict[str, Any]
    environment: Environment
    data: DataInfo
    teacher: ModelInfo | None = Field(description="the teacher; of an ensemble, the feature teacher")
    teachers: list[ModelInfo] | None = Field(None, description="every teacher, in --teacher order (an ensemble "
                                                               "when more than one)")
    student: ModelInfo
    method: MethodInfo
    peer: PeerInfo | None = None
    metrics: MetricsBlock = Field(description="the student's (model.safetensors); the moving average's: ema.metrics")
    ema: EmaInfo | None = None
    effective_batch: int | None = Field(None, description="examples per optimizer update: batch size × "
                                                          "--grad-accum × processes")
    teacher_cache: dict[str, Any] | None = Field(None, description="the --teacher-cache used: path, views, storage, "
                                                                 "hits, misses, hit rate, and what it is keyed by")
    history: list[EpochRecord]
    timing: Timing


class EvalReport(BaseModel):
    """What ``kdcli evaluate --out`` writes: the same ``metrics`` block with its own header."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kdcli_version: str = __version__
    command: Literal["evaluate"] = "evaluate"
    created: str
    checkpoint: ModelInfo
    teacher: ModelInfo | None
    teachers: list[ModelInfo] | None = None
    data: DataInfo
    environment: Environment
    metrics: MetricsBlock


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def environment(device: str, world_size: int, precision: str) -> Environment:
    import timm
    import torch

    return Environment(python=sys.version.split()[0], torch=torch.__version__, timm=timm.__version__,
                       platform=platform.platform(), device=device, world_size=world_size,
                       precision=precision)
