"""The run configuration: one typed, validated model and the one source of truth for defaults.

The CLI fills it, the engine reads it, and the report stores it whole, so a run can be repeated
from its report alone.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
)

from kdcli.errors import KdcliError

# fields that only a distilled run sets (train leaves them at their defaults): who teaches, and how
DISTILL_ONLY = ("teacher", "teacher_weights", "teacher_pretrained", "teacher_image_size", "feature_teacher",
                "ignore_class_names", "method", "method_args", "student_stages", "teacher_stages")
# where a distilled run keeps its teacher's outputs, and how (--teacher-cache and its options)
CACHE_OPTIONS = ("teacher_cache", "cache_views", "cache_topk", "cache_dtype")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: Literal["train", "distill"] = "train"
    # models
    student: str = Field(description="timm model name or kdcli checkpoint path")
    student_weights: str | None = None
    student_pretrained: bool = False  # timm's pretrained weights for the student's name (tag, hf-hub:)
    # one teacher, or an ensemble (--teacher repeated): each with its own weights file (by position), input
    # size (one value: all of them) and normalisation; one teacher is written as a plain string
    teacher: list[str] | None = None
    teacher_weights: list[str | None] | None = None
    teacher_pretrained: bool = False
    teacher_image_size: list[Annotated[int, Field(gt=0)]] | None = None  # [default: its own / the data's]
    feature_teacher: int = Field(0, ge=0)  # with several teachers: the one feature methods read (0: the first)
    ignore_class_names: bool = False  # accept a checkpoint whose class names differ from the dataset's
    # method
    method: str = "ce"
    method_args: dict[str, str] = Field(default_factory=dict)
    student_stages: list[int] | None = None  # feature_info indices; None = the last 3, matched by order
    teacher_stages: list[int] | None = None
    # data
    dataset: str
    image_column: str | None = None
    label_column: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    noise: str | None = None  # label noise of the training split, e.g. symmetric:0.4
    imbalance: str | None = None  # class imbalance of the training split, e.g. longtail:100
    corruption_seed: int = 0
    class_order: str | None = None  # for the imbalance profile: a permutation, or random:SEED
    image_size: int | None = Field(None, gt=0)  # the student's input [default: its own / the data's]
    num_classes: int | None = Field(None, gt=1)  # integer labels: how many classes are meant
    streaming: bool = False
    shuffle_buffer: int = Field(10_000, gt=0)
    augment: Literal["auto", "cifar", "imagenet", "randaugment", "none", "crop-flip", "crop"] = "auto"
    workers: int | None = Field(None, ge=0)
    # resident: the training split decoded once, held on the device, augmented there; loader: per-example
    # decoding and transforms in DataLoader workers; auto: resident where it applies and fits
    data_path: Literal["auto", "resident", "loader"] = "auto"
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # unreadable examples skipped; more of a split: an error
    # optimisation: by default plain momentum SGD with weight decay on every parameter and a per-epoch cosine, the
    # field's CIFAR recipe (RepDistiller, Tian et al. 2020); timm's optimizers and schedulers otherwise
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    opt: str = "momentum"  # any name timm.optim.create_optimizer_v2 accepts: momentum, sgd (Nesterov), adamw, lamb, …
    no_decay_norm_bias: bool = False  # timm's filter_bias_and_bn: no weight decay on norm weights and biases
    schedule: Literal["cosine", "step", "multistep", "poly", "constant"] = "cosine"  # --sched
    decay_milestones: list[Annotated[int, Field(gt=0)]] | None = None  # multistep: decay after these epochs
    decay_rate: float = Field(0.1, gt=0, le=1)  # step, multistep: the factor at each milestone
    warmup_epochs: int = Field(0, ge=0)  # linear lr warm-up (timm's), within --epochs
    warmup_lr: float = Field(1e-5, ge=0)  # the lr warm-up starts from
    min_lr: float = Field(0.0, ge=0)
    sched_on_updates: bool = False  # update the lr every optimizer step (timm's --sched-on-updates), not per epoch
    clip_grad: float | None = Field(None, gt=0)  # clip the global gradient norm to this
    grad_accum: int = Field(1, ge=1)  # optimizer step every N batches (Accelerate's accumulation)
    # regularisation (timm.data.Mixup; the teacher sees the mixed images too) and the student's average
    mixup: float = Field(0.0, ge=0)  # mixup alpha (0: off)
    cutmix: float = Field(0.0, ge=0)  # cutmix alpha (0: off)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: float | None = Field(None, gt=0, lt=1)  # decay of an exponential moving average of the student (timm)
    seed: int = Field(0, ge=0, lt=2**31)  # epoch e seeds with seed + e, which must stay below 2^32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # teacher cache: the teacher's logits per (row, view) in a folder, so logit methods skip the teacher's forward
    teacher_cache: str | None = None
    cache_views: int = Field(1, ge=1)  # views of random augmentation: epoch e trains on view e mod K
    cache_topk: int | None = Field(None, ge=1)  # store the top-k logits and the rest's log-sum-exp only
    cache_dtype: Literal["float16", "float32"] = "float16"
    # speed
    channels_last: bool = False
    compile: bool = False  # torch.compile the step's forward passes and loss terms (Session.loss_terms) whole
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    # output
    out: str


    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step on one process (× the number of processes for the whole step)."""
        return self.batch_size * self.grad_accum

    @property
    def soft_targets(self) -> bool:
        """Training targets are class distributions (mixup, cutmix, label smoothing), not class indices."""
        return bool(self.mixup or self.cutmix or self.label_smoothing)

    @field_validator("teacher", "teacher_weights", "teacher_image_size", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str | int) and not isinstance(v, bool) else (v or None)

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, v, info: ValidationInfo):
        """``epochs: true`` in a config file is a mistake, not 1 epoch (pydantic would read it as one)."""
        kind = str(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and "bool" not in kind:
            what = "a number" if re.search(r"\b(int|float)\b", kind) and "str" not in kind else "a value"
            raise ValueError(f"expected {what}, not {str(v).lower()}")
        return v

    @field_serializer("teacher", "teacher_weights", "teacher_image_size")
    def _one_as_itself(self, v):
        return v[0] if v is not None and len(v) == 1 else v

    def model_post_init(self, context) -> None:
        n = len(self.teacher or [])
        if self.teacher_weights is not None and len(self.teacher_weights) != n:
            raise KdcliError(f"--teacher-weights given {len(self.teacher_weights)} times for {n} --teacher: give one "
                             "per teacher, in the same order")
        if self.teacher_image_size is not None and len(self.teacher_image_size) not in (1, n):
            raise KdcliError(f"--teacher-image-size given {len(self.teacher_image_size)} times for {n} --teacher: "
                             "give one for all, or one per teacher")
        if self.schedule == "multistep" and not self.decay_milestones:
            raise KdcliError("--sched multistep needs --decay-milestones, e.g. 150,180,210 (epochs after which the "
                             "lr decays)")
        if self.warmup_epochs >= self.epochs:
            raise KdcliError(f"--warmup-epochs {self.warmup_epochs} must be below --epochs {self.epochs}")
        if n and self.feature_teacher >= n:
            raise KdcliError(f"--feature-teacher {self.feature_teacher} is out of range: {n} teacher(s), "
                             f"numbered 0..{n - 1}")

    def teacher_at(self, k: int) -> tuple[str, str | None, int | None]:
        """(name or path, weights, input size) of teacher ``k``."""
        weights = self.teacher_weights[k] if self.teacher_weights else None
        sizes = self.teacher_image_size
        return self.teacher[k], weights, (sizes[k if len(sizes) > 1 else 0] if sizes else None)


def make_config(**values) -> RunConfig:
    """Build a RunConfig; a bad value becomes one readable line naming the option."""
    try:
        return RunConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        opt = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
        raise KdcliError(f"invalid {opt}: {err['msg'].removeprefix('Value error, ').lower()}") from None


def default(name: str):
    """The default of one RunConfig field (the CLI shows these in --help)."""
    return RunConfig.model_fields[name].get_default(call_default_factory=True)
