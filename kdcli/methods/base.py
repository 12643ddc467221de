"""The method interface: what every distillation method is, and the one registry that finds them.

A method turns one batch of student (and teacher) outputs into named, already weighted loss terms.
The training loop sums the terms, logs each one by name, and never asks which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from kdcli.errors import KdcliError


@dataclass
class Outputs:
    """What a model produced for one batch."""

    logits: Tensor  # (B, classes)
    features: list[Tensor] = field(default_factory=list)  # matched stage maps, NCHW, shallow to deep
    pooled: Tensor | None = None  # (B, D) penultimate embedding
    preact: list[Tensor] = field(default_factory=list)  # pre-activation stage maps, when asked for

    def map(self, fn) -> Outputs:
        """Apply ``fn`` to every tensor (used to turn inference tensors into ordinary ones)."""
        return Outputs(
            logits=fn(self.logits),
            features=[fn(f) for f in self.features],
            pooled=None if self.pooled is None else fn(self.pooled),
            preact=[fn(f) for f in self.preact],
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
    method's paper or reference code (cited in the subclass docstring), and ``forward``.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    mimics: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    uses_teacher: ClassVar[bool] = True
    Args: ClassVar[type[MethodArgs]] = MethodArgs

    def __init__(self, args: MethodArgs | None = None, student: Shapes | None = None,
                 teacher: Shapes | None = None):
        super().__init__()
        self.args = args if args is not None else self.Args()

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def defaults(cls) -> dict[str, object]:
        return cls.Args().model_dump()


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


def build(name: str, raw_args: dict[str, str] | None = None, student: Shapes | None = None,
          teacher: Shapes | None = None) -> Method:
    """Find a method by name, validate its arguments and build it for the given output shapes."""
    cls = get(name)
    return cls(parse_args(cls, raw_args or {}), student, teacher)


def kl_div(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """KL(teacher || student) of temperature-softened distributions, averaged over the batch."""
    log_p_s = torch.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = torch.log_softmax(teacher_logits.float() / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
