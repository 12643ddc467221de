"""The method interface: what every distillation method is, and the one registry that finds them.

A method turns one batch of student (and teacher) outputs into named, already weighted loss terms.
The training loop sums the terms, logs each one by name, and never asks which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn
from torch.nn import functional as F

from kdcli.errors import KdcliError


@dataclass
class Outputs:
    """What a model produced for one batch."""

    logits: Tensor  # (B, classes)
    features: list[Tensor] = field(default_factory=list)  # matched stage maps, NCHW, shallow to deep
    pooled: Tensor | None = None  # (B, D) penultimate embedding
    preact: list[Tensor] = field(default_factory=list)  # pre-activation stage maps, when asked for
    # a teacher ensemble's per-teacher logits (dataset class order); empty for one model. ``logits`` is then
    # the ensemble's own prediction, log of the mean probability; logit methods read the members through
    # :func:`teacher_log_probs`, feature fields come from the one feature teacher
    members: list[Tensor] = field(default_factory=list)

    def tensors(self) -> list[Tensor]:
        return [self.logits, *self.features, *([self.pooled] if self.pooled is not None else []), *self.preact,
                *self.members]

    def map(self, fn) -> Outputs:
        """Apply ``fn`` to every tensor (used to turn inference tensors into ordinary ones)."""
        return Outputs(
            logits=fn(self.logits),
            features=[fn(f) for f in self.features],
            pooled=None if self.pooled is None else fn(self.pooled),
            preact=[fn(f) for f in self.preact],
            members=[fn(m) for m in self.members],
        )


@dataclass(frozen=True)
class Shapes:
    """Shapes of a model's outputs for one example, measured once so methods can build connectors."""

    num_classes: int
    features: tuple[tuple[int, int, int], ...] = ()  # (C, H, W) per matched stage
    pooled: int | None = None


class MethodArgs(BaseModel):
    """Base of every method's typed arguments: unknown keys are an error, strings are coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(nn.Module):
    """One distillation method (or the plain cross-entropy baseline).

    Subclasses set the class variables below, an ``Args`` model whose defaults come from the
    method's paper or reference code (cited in the subclass docstring), and ``forward``. The hooks
    after ``forward`` are optional; the loop calls them for every method alike and never asks which
    method it runs.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # baseline | logits | features | boundary | relations | online
    mimics: ClassVar[str]
    # of: logits, features, pooled, preact; and "index": the loop passes each example's original index
    # (map-style data only: a streamed split is refused with one line)
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    uses_teacher: ClassVar[bool] = True
    # with several --teacher: "combined" reads the ensemble's target (teacher_log_probs), "one" reads the
    # --feature-teacher only, "no" refuses an ensemble (the method runs the teacher itself, or trains it)
    teachers: ClassVar[str] = "one"
    # the target may be a class distribution (B, C) (mixup, cutmix, label smoothing), not only class indices:
    # hard-label terms then use F.cross_entropy's soft targets, class masks the dominant class (hard_labels)
    soft_targets: ClassVar[bool] = True
    online: ClassVar[bool] = False  # the teacher trains too (DML): its terms reach it through autograd
    stages_note: ClassVar[str] = ""  # one line for `kdcli methods`, e.g. "warm-up: hint stage"
    Args: ClassVar[type[MethodArgs]] = MethodArgs

    def __init__(self, args: MethodArgs | None = None, student: Shapes | None = None,
                 teacher: Shapes | None = None):
        super().__init__()
        self.args = args if args is not None else self.Args()
        self.progress = 0.0  # fraction of the main training stage done, set by the loop each epoch
        self.epoch, self.epochs = 0, 1  # 0-based epoch of the main stage and their number, set likewise
        self._models: tuple = ()

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *,
                images: Tensor | None = None, index: Tensor | None = None) -> dict[str, Tensor]:
        """Named, already weighted loss terms for one batch (``images``: the [0, 1] input batch; ``index``:
        each example's original row index, for methods that need "index")."""
        raise NotImplementedError

    # -- optional hooks ---------------------------------------------------------------------------
    def warmup_epochs(self, epochs: int) -> int:
        """Epochs of a warm-up stage run before the ``epochs`` of training (0: none)."""
        return 0

    def warmup(self, s: Outputs, t: Outputs | None, target: Tensor, *,
               images: Tensor | None = None, index: Tensor | None = None) -> dict[str, Tensor]:
        """Loss terms of the warm-up stage (only called when ``warmup_epochs`` > 0)."""
        raise NotImplementedError

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Called by the loop before each training epoch (0-based ``epoch`` of ``epochs``)."""
        self.progress = epoch / max(epochs, 1)
        self.epoch, self.epochs = epoch, max(epochs, 1)

    def ramp(self, fraction: float) -> float:
        """A linear warm-up factor of a loss term over ``fraction`` of the main epochs, per epoch as in
        mdistiller (``min(epoch / warmup, 1)`` with 1-based epochs): 1/20 in the first epoch of a 20-epoch ramp."""
        length = fraction * self.epochs
        return 1.0 if length <= 0 else min((self.epoch + 1) / length, 1.0)

    def attach_data(self, labels: Tensor) -> None:
        """Called once by the session with the training labels by original row index (-1: a row not trained
        on), for methods that need the dataset (CRD's memory and class-aware negatives). Map-style data only."""

    def use_warmup(self, on: bool) -> None:
        """Make calling the method compute the warm-up terms (``on``) or the main ones.

        The loop calls the method module itself, so that wrappers such as DDP see every call.
        """
        if on:
            self.forward = self.warmup
        else:
            self.__dict__.pop("forward", None)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Give the method the models (for methods that run them on inputs of their own, e.g. BSS).

        Kept in a tuple so the models' parameters do not become the method's parameters.
        Calling ``self.student_model(x, needs)`` returns :class:`Outputs`.
        """
        self._models = (student, teacher)

    @property
    def student_model(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher_model(self) -> nn.Module | None:
        return self._models[1]

    @classmethod
    def defaults(cls) -> dict[str, object]:
        return cls.Args().model_dump()


WARMUP_FRACTION = 0.125  # RepDistiller: 30 init epochs before the 240 of its CIFAR-100 recipe


def warmup_field(default: float = WARMUP_FRACTION):
    """The ``warmup`` argument of methods with a warm-up stage: a fraction of the main epochs."""
    return Field(default, ge=0.0, le=1.0, description="warm-up length as a fraction of the main epochs (0: none)")


def warmup_length(fraction: float, epochs: int) -> int:
    """Warm-up epochs for ``fraction`` of ``epochs``: at least one when the fraction is positive."""
    return max(1, round(fraction * epochs)) if fraction > 0 else 0


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method findable by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KdcliError(f"unknown method {name!r}; available methods: {', '.join(available())} "
                         "(see `kdcli methods`)") from None


def parse_args(cls: type[Method], raw: dict[str, str]) -> MethodArgs:
    """Validate ``KEY=VALUE`` strings against a method's typed arguments (one clear line on error)."""
    try:
        return cls.Args(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        valid = ", ".join(f"{k}={v}" for k, v in cls.defaults().items()) or "none"
        if err["type"] == "extra_forbidden":
            raise KdcliError(f"method {cls.name!r} has no argument {key!r}; valid arguments: {valid}") from None
        raise KdcliError(f"bad value for {cls.name} argument {key!r}: {err['msg']} "
                         f"(valid arguments: {valid})") from None


class Composite(Method):
    """Methods summed: ``kd+at`` returns the terms of both.

    The hard-label term ``ce`` is kept once, from the first part that returns it (so ``kd+at`` has
    KD's CE weight 0.1, as the field's recipe composes them); other clashing names get the part's
    name as a prefix. Warm-up lasts as long as the longest part's and sums the warm-up terms of the
    parts that have one.
    """

    name = "composite"
    family = "composite"
    mimics = "the sum of its parts"

    def __init__(self, parts: list[Method]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.name = "+".join(p.name for p in parts)
        self.family = "+".join(p.family for p in parts)
        self.needs = frozenset().union(*(p.needs for p in parts))
        self.uses_teacher = any(p.uses_teacher for p in parts)
        self.online = any(p.online for p in parts)
        self.teachers = _teachers_of([p.teachers for p in parts])
        self.soft_targets = all(p.soft_targets for p in parts)

    @staticmethod
    def _merge(part_terms: list[tuple[str, dict[str, Tensor]]]) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for name, got in part_terms:
            for k, v in got.items():
                if k == "ce" and "ce" in terms:
                    continue
                terms[k if k not in terms else f"{name}.{k}"] = v
        return terms

    def _teacher_for(self, part: Method, t: Outputs | None) -> Outputs | None:
        # an online peer's outputs carry grad: only the online part may move it
        return t if t is None or part.online else t.map(Tensor.detach)

    def forward(self, s, t, target, *, images=None, index=None):
        return self._merge([(p.name, p(s, self._teacher_for(p, t), target, images=images, index=index))
                            for p in self.parts])

    def warmup_epochs(self, epochs: int) -> int:
        return max(p.warmup_epochs(epochs) for p in self.parts)

    def warmup(self, s, t, target, *, images=None, index=None):
        return self._merge([(p.name, p.warmup(s, self._teacher_for(p, t), target, images=images, index=index))
                            for p in self.parts if p.warmup_epochs(1) > 0])

    def set_progress(self, epoch: int, epochs: int) -> None:
        super().set_progress(epoch, epochs)
        for p in self.parts:
            p.set_progress(epoch, epochs)

    def bind(self, student, teacher) -> None:
        super().bind(student, teacher)
        for p in self.parts:
            p.bind(student, teacher)

    def attach_data(self, labels: Tensor) -> None:
        for p in self.parts:
            p.attach_data(labels)


def _teachers_of(kinds: list[str]) -> str:
    """What a composition does with an ensemble: refuses it if a part does, reads it whole if a part does."""
    return "no" if "no" in kinds else "combined" if "combined" in kinds else "one"


@dataclass(frozen=True)
class MethodSpec:
    """A validated ``--method`` (possibly ``a+b``) with its arguments, before any model exists."""

    name: str
    parts: tuple[tuple[type[Method], MethodArgs], ...]

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(cls.needs for cls, _ in self.parts))

    @property
    def uses_teacher(self) -> bool:
        return any(cls.uses_teacher for cls, _ in self.parts)

    @property
    def online(self) -> bool:
        return any(cls.online for cls, _ in self.parts)

    @property
    def family(self) -> str:
        return "+".join(cls.family for cls, _ in self.parts)

    @property
    def teachers(self) -> str:
        return _teachers_of([cls.teachers for cls, _ in self.parts])

    @property
    def soft_targets(self) -> bool:
        return all(cls.soft_targets for cls, _ in self.parts)

    @property
    def cacheable(self) -> bool:
        """Whether the teacher's stored logits can stand for its forward pass (``--teacher-cache``): every part
        reads only the teacher's logits on the batch, neither running the teacher itself nor training it."""
        return self.uses_teacher and all(
            not cls.uses_teacher or (cls.needs <= {"logits"} and not cls.online and cls.teachers != "no")
            for cls, _ in self.parts)

    def resolved_args(self) -> dict[str, object]:
        if len(self.parts) == 1:
            return self.parts[0][1].model_dump()
        return {cls.name: args.model_dump() for cls, args in self.parts}

    def build(self, student: Shapes | None = None, teacher: Shapes | None = None) -> Method:
        methods = [cls(args, student, teacher) for cls, args in self.parts]
        return methods[0] if len(methods) == 1 else Composite(methods)


def spec(name: str, raw_args: dict[str, str] | None = None) -> MethodSpec:
    """Validate a method name (``kd`` or ``kd+at``) and its ``KEY=VALUE`` arguments.

    For a composition, keys are namespaced by method: ``at.beta=1000``.
    """
    raw_args = raw_args or {}
    names = [n.strip() for n in name.split("+")]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise KdcliError(f"bad --method {name!r}: use one name or distinct names joined by '+', e.g. kd+at")
    classes = [get(n) for n in names]
    if len(classes) == 1:
        return MethodSpec(name, ((classes[0], parse_args(classes[0], raw_args)),))
    routed: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in raw_args.items():
        prefix, dot, sub = key.partition(".")
        if not dot or prefix not in routed:
            raise KdcliError(f"--method-arg {key!r}: with --method {name}, name the method too, e.g. "
                             f"{names[-1]}.{sub or key}=VALUE")
        routed[prefix][sub] = value
    return MethodSpec(name, tuple((cls, parse_args(cls, routed[cls.name])) for cls in classes))


def build(name: str, raw_args: dict[str, str] | None = None, student: Shapes | None = None,
          teacher: Shapes | None = None) -> Method:
    """Find a method (or composition) by name, validate its arguments and build it for the given shapes."""
    return spec(name, raw_args).build(student, teacher)


def kl_div(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """KL(teacher || student) of temperature-softened distributions, averaged over the batch.

    The teacher side is detached: a KL term only ever moves the student it is the loss of.
    """
    log_p_s = torch.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = torch.log_softmax(teacher_logits.detach().float() / T, dim=1)  # the target moves nothing
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def hard_labels(target: Tensor) -> Tensor:
    """Class indices of a target: itself, or the dominant class of a soft one (mixup, label smoothing), as
    NKD's reference takes the argmax of mixed labels."""
    return target if target.dim() == 1 else target.argmax(dim=1)


def standardized(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization (Sun et al., CVPR 2024): per example, (z − mean) / (eps + std), the std unbiased
    as torch's default (the authors' ``normalize`` in mdistiller/distillers/KD.py)."""
    z = z.float()
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


ENSEMBLE_WEIGHTINGS = ("mean", "camkd")


def ensemble_weights(members: list[Tensor], target: Tensor | None, weighting: str = "mean") -> Tensor:
    """Per-example weights of K teachers, shape (K, B), each column summing to 1.

    ``mean``: 1/K. ``camkd``: confidence-aware weights of CA-MKD (Zhang, Chen & Wang, ICASSP 2022,
    github.com/Rorozhl/CA-MKD, distiller_zoo/CAMKD.py): w_k = (1 − softmax_k(CE(z_k, y))) / (K − 1), so a
    teacher that is more confident in the true label weighs more; with one teacher, 1.
    """
    k, b = len(members), members[0].shape[0]
    if k == 1 or weighting == "mean":
        return members[0].new_full((k, b), 1.0 / k, dtype=torch.float32)
    if weighting != "camkd":
        raise ValueError(f"unknown ensemble weighting {weighting!r}; choose one of {', '.join(ENSEMBLE_WEIGHTINGS)}")
    if target is None:
        raise ValueError("ensemble=camkd weighs teachers by their loss on the labels, which this batch lacks")
    # a soft target (mixup): the cross-entropy against the class distribution
    ce = torch.stack([F.cross_entropy(z.detach().float(), target, reduction="none") for z in members])
    return (1.0 - torch.softmax(ce, dim=0)) / (k - 1)


def teacher_log_probs(t: Outputs, T: float = 1.0, *, target: Tensor | None = None, weighting: str = "mean",
                      standardize: bool = False) -> Tensor:
    """log p_t at temperature ``T``, detached, float32: log softmax(z_t / T) for one teacher; for an ensemble,
    the log of the weighted mixture Σ_k w_k softmax(z_k / T) (``ensemble_weights``), each member standardized
    first when ``standardize``.

    Distilling from the mixture is how kdcli distills from several teachers: since cross-entropy is linear in
    the target, KL(mixture ‖ p_s) equals the weighted mean of the per-teacher KLs up to a term free of the
    student (big_vision, trainers/proj/distill/distill.py, which sums per-teacher KLs and notes this), so the
    student's gradients are those of averaging the per-teacher losses; methods that are not KLs (DIST's
    correlations, DKD's decoupled terms) get one well-defined target as well.
    """
    members = t.members or [t.logits]
    with torch.no_grad():
        zs = [standardized(z) if standardize else z.float() for z in members]
        logp = [torch.log_softmax(z.detach() / T, dim=1) for z in zs]
        if len(logp) == 1:
            return logp[0]
        w = ensemble_weights(members, target, weighting)
        return torch.logsumexp(torch.stack(logp) + w.clamp_min(1e-30).log().unsqueeze(-1), dim=0)


def kl_to(student_logits: Tensor, teacher_log_p: Tensor, T: float = 1.0) -> Tensor:
    """KL(p_t ‖ softmax(s / T)) averaged over the batch, for a teacher given by its log-probabilities."""
    log_p_s = torch.log_softmax(student_logits.float() / T, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - log_p_s)).sum(dim=1).mean()
