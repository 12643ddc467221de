"""Methods that need only logits: the cross-entropy baseline and Hinton's knowledge distillation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from kdcli.methods.base import Method, MethodArgs, Outputs, kl_to, register, standardized, teacher_log_probs


def ensemble_field():
    """The ``ensemble`` argument of logit methods: how several --teacher combine into one target."""
    return Field("mean", description="with several teachers: mean of their probabilities, or CA-MKD's "
                                     "per-example confidence weights (camkd)")


Ensemble = Literal["mean", "camkd"]


@register
class CrossEntropy(Method):
    """Standard training on the labels: the study's baseline (no teacher involved)."""

    name = "ce"
    family = "baseline"
    mimics = "nothing: standard training on the labels"
    uses_teacher = False

    class Args(MethodArgs):
        label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(s.logits.float(), target, label_smoothing=self.args.label_smoothing)}


@register
class KD(Method):
    """Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network").

    loss = ce_weight · CE(s, y) + kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T)).
    The T² factor keeps the soft-target gradients on the scale of the hard-target ones (paper, §2).
    Defaults (T=4, CE 0.1, KD 0.9) are the CIFAR-100 recipe of RepDistiller (Tian et al., 2020,
    "Contrastive Representation Distillation"), the field's standard benchmark code.

    ``standardize=true`` z-scores both models' logits per example before the temperature (Sun et al., CVPR
    2024, "Logit Standardization in Knowledge Distillation"; the CE term keeps the raw logits); ``lskd`` is
    that method with its own defaults. With several teachers the target is their mixture (``ensemble``).
    """

    name = "kd"
    family = "logits"
    mimics = "the teacher's softened output distribution"
    teachers = "combined"

    class Args(MethodArgs):
        T: float = Field(4.0, gt=0.0, description="softmax temperature")
        ce_weight: float = Field(0.1, ge=0.0, description="weight of the hard-label cross-entropy")
        kd_weight: float = Field(0.9, ge=0.0, description="weight of the T²-scaled KL term")
        standardize: bool = Field(False, description="z-score the logits per example first (logit standardization)")
        ensemble: Ensemble = ensemble_field()

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        log_p_t = teacher_log_probs(t, a.T, target=target, weighting=a.ensemble, standardize=a.standardize)
        z_s = standardized(s.logits) if a.standardize else s.logits
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "kd": a.kd_weight * a.T**2 * kl_to(z_s, log_p_t, a.T),
        }
