"""Methods that need only logits: the cross-entropy baseline, Hinton's knowledge distillation and its
descendants (DKD, DIST, KD on standardized logits, NKD)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor
from torch.nn import functional as F

from kdcli.methods.base import (
    Method,
    MethodArgs,
    Outputs,
    Shapes,
    hard_labels,
    kl_to,
    register,
    standardized,
    teacher_log_probs,
)


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


def _split_target(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The true class's column (B,) and the other columns (B, C − 1), in class order; with a soft target
    (mixup, label smoothing) the true class is its dominant class (``hard_labels``)."""
    y = hard_labels(target).unsqueeze(1)
    # gathers, not boolean masks: shapes known ahead, so the step never waits for the device to count them
    cols = torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1)
    return x.gather(1, y).squeeze(1), x.gather(1, cols + (cols >= y))


def _need_three_classes(name: str, student: Shapes | None, term: str) -> None:
    if student is not None and student.num_classes < 3:
        raise ValueError(f"{name} needs at least 3 classes: with {student.num_classes} its {term} is a distribution "
                         "over one class or none and is undefined (mdistiller issue 60: "
                         "github.com/megvii-research/mdistiller/issues/60); use kd instead")


@register
class DKD(Method):
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge
    Distillation"; reference code megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``).

    With p = softmax(z / T), the KL of KD splits into TCKD, the KL between the binary (target, non-target)
    masses b = [p_gt, Σ_{c≠gt} p_c], and NCKD, the KL between the distributions over the non-target classes
    alone, p̂ = p restricted to c ≠ gt and renormalised; both KLs are summed over classes, averaged over the
    batch and scaled by T²:

        loss = ce_weight · CE(s, y) + ramp(epoch) · (alpha · TCKD + beta · NCKD)

    ramp(epoch) = min(epoch / 20, 1) with 1-based epochs in mdistiller (``warmup: 20`` of 240 epochs), here
    ``ramp`` = 20/240 of the main epochs (``Method.ramp``). Defaults are mdistiller's CIFAR-100
    ``configs/cifar100/dkd/*.yaml`` base (CE 1, α 1, β 8, T 4); its per-pair β: resnet56→resnet20 2,
    resnet32x4→resnet8x4 8, wrn_40_2→wrn_16_2 6, vgg13→vgg8 6; ImageNet resnet34→resnet18 T 1, β 0.5 with a
    1-epoch ramp (``ramp=0.01`` of 100 epochs).

    Computed in float32 and in log space: the binary masses' logs are log-sum-exps of log-probabilities (never
    the log of a sum that underflowed to 0, a fault of ``log(sum p)`` with confident teachers or fp16), and the
    non-target classes are dropped rather than masked with mdistiller's −1000 (which assumes |z| ≪ 1000·T).
    The teacher is read through ``teacher_log_probs``: with several teachers NCKD's target is their mixture
    restricted to the non-target classes and renormalised. ``standardize=true`` z-scores both models' logits
    per example before the temperature (Sun et al., CVPR 2024, "Logit Standardization in Knowledge
    Distillation", the "DKD + LS" of their repo; the CE term keeps the raw logits). Two classes leave NCKD a
    single class (mdistiller issue 60: "not applicable"), so they are refused.
    """

    name = "dkd"
    family = "logits"
    mimics = "the teacher's target-vs-rest mass and its distribution over the non-target classes, apart"
    teachers = "combined"

    class Args(MethodArgs):
        T: float = Field(4.0, gt=0.0, description="softmax temperature")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        alpha: float = Field(1.0, ge=0.0, description="weight of TCKD (target vs non-target mass)")
        beta: float = Field(8.0, ge=0.0, description="weight of NCKD (non-target distribution); mdistiller per "
                                                     "pair: r56→r20 2, w40-2→w16-2 6, vgg13→vgg8 6, ImageNet 0.5")
        ramp: float = Field(20 / 240, ge=0.0, le=1.0,
                            description="linear ramp of the KD terms over this fraction of the epochs (0: none)")
        standardize: bool = Field(False, description="z-score the logits per example first (logit standardization)")
        ensemble: Ensemble = ensemble_field()

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        _need_three_classes(self.name, student, "non-target term (NCKD)")

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        log_p_t = teacher_log_probs(t, a.T, target=target, weighting=a.ensemble, standardize=a.standardize)
        z_s = standardized(s.logits) if a.standardize else s.logits.float()
        log_p_s = torch.log_softmax(z_s / a.T, dim=1)
        t_gt, t_rest = _split_target(log_p_t, target)
        s_gt, s_rest = _split_target(log_p_s, target)
        # log b = [log p_gt, log Σ_{c≠gt} p_c]; kl_to's log_softmax leaves an already normalised log b as it is
        log_b_t = torch.stack([t_gt, t_rest.logsumexp(dim=1)], dim=1)
        log_b_s = torch.stack([s_gt, s_rest.logsumexp(dim=1)], dim=1)
        tckd = kl_to(log_b_s, log_b_t)
        nckd = kl_to(s_rest, torch.log_softmax(t_rest, dim=1))  # log_softmax renormalises over c ≠ gt
        scale = self.ramp(a.ramp) * a.T**2
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "dkd_tckd": scale * a.alpha * tckd,
            "dkd_nckd": scale * a.beta * nckd,
        }


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation: the cosine of the mean-centred rows, eps added to the norms' product
    (as DIST's reference code, ``lib/models/losses/dist_kd.py``)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register
class DIST(Method):
    """DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian & Xu, NeurIPS 2022;
    reference code hunto/DIST_KD with its submodule hunto/image_classification_sota,
    ``lib/models/losses/dist_kd.py``; torchdistill's ``DISTLoss`` is the same loss).

    With y = softmax(z / T) and ρ the Pearson correlation (:func:`pearson`), DIST matches relations instead of
    probabilities exactly:

        inter = 1 − mean_i ρ(y_s[i, :], y_t[i, :])     (each example's ranking of the classes)
        intra = 1 − mean_c ρ(y_s[:, c], y_t[:, c])     (each class's ranking of the batch's examples)
        loss  = ce_weight · CE(s, y) + weight · T² · (beta · inter + gamma · intra)

    Defaults are the authors' CIFAR-100 recipe (``configs/strategies/distill/dist_cifar.yaml``: ``dist_t4``,
    so T (the paper's τ) 4, β = γ = 1, kd_loss_weight 2, CE 1); their ImageNet recipe uses T 1.

    The intra-class term correlates across the batch, so it depends on the batch's composition and size; with
    several processes it is computed per process on the local batch, as in the reference (32 per GPU on
    ImageNet). With several teachers y_t is their mixture's probabilities (``ensemble``).
    """

    name = "dist"
    family = "logits"
    mimics = "the teacher's ranking of classes per example and of examples per class (Pearson correlations)"
    teachers = "combined"

    class Args(MethodArgs):
        T: float = Field(4.0, gt=0.0, description="softmax temperature (the paper's τ)")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        weight: float = Field(2.0, ge=0.0, description="weight of the DIST term (the reference's kd_loss_weight)")
        beta: float = Field(1.0, ge=0.0, description="weight of the inter-class relation (per example)")
        gamma: float = Field(1.0, ge=0.0, description="weight of the intra-class relation (per class, over the batch)")
        ensemble: Ensemble = ensemble_field()

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        y_t = teacher_log_probs(t, a.T, target=target, weighting=a.ensemble).exp()
        y_s = torch.softmax(s.logits.float() / a.T, dim=1)
        inter = 1.0 - pearson(y_s, y_t).mean()
        intra = 1.0 - pearson(y_s.t(), y_t.t()).mean()
        scale = a.weight * a.T**2
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "dist_inter": scale * a.beta * inter,
            "dist_intra": scale * a.gamma * intra,
        }


@register
class LSKD(KD):
    """KD on standardized logits, "KD w/ LS" (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in
    Knowledge Distillation"; reference code sunshangquan/logit-standardization-KD,
    ``mdistiller/distillers/KD.py``).

    Both models' logits are z-scored per example, Z(z) = (z − mean z) / (1e-7 + std z) with the unbiased std
    (:func:`~kdcli.methods.base.standardized`), and KD runs on them:

        loss = ce_weight · CE(s, y) + kd_weight · T² · KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T)),

    the CE on the raw student logits. This is ``kd`` with ``standardize`` fixed on and the authors' CIFAR-100
    defaults (``--logit-stand --base-temp 2 --kd-weight 9``: T 2, KD 9; CE 0.1 from their cfg default); their
    per-pair variants include vgg13→vgg8 T 3 and resnet110→resnet20 T 4 with KD 12.
    """

    name = "lskd"
    mimics = "the teacher's softened distribution of z-scored logits (its shape, not its scale)"

    class Args(KD.Args):
        T: float = Field(2.0, gt=0.0, description="softmax temperature (the authors' base temperature)")
        kd_weight: float = Field(9.0, ge=0.0, description="weight of the T²-scaled KL term")
        standardize: bool = Field(True, description="always on for lskd (use kd for unstandardized logits)")

        @field_validator("standardize")
        @classmethod
        def _always_on(cls, v: bool) -> bool:
            if not v:
                raise ValueError("lskd always standardizes the logits; use --method kd for plain ones")
            return v


@register
class NKD(Method):
    """Normalized knowledge distillation (Yang, Zeng, Li, Zhang, Yuan & Li, ICCV 2023, "From Knowledge
    Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
    Labels"; reference code yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``).

    The KD cross-entropy split into the target class and the normalised non-target classes:

        target     = −mean_i t_gt · log s_gt                          (softmax at temperature 1)
        non-target = −gamma · T² · mean_i Σ_{c≠gt} T̂_c · log Ŝ_c       (T̂, Ŝ: softmax(z / T) over the
                                                                     non-target logits only)
        loss = ce_weight · CE(s, y) + target + non-target

    Defaults are the reference's ImageNet configs (T 1, γ 1.5; the student's own CE weight 1, mmcls's head
    loss); its CIFAR-100 configs (mmcls ResNet-34→ResNet-18, not the RepDistiller pairs) use T 3, γ 3.5.
    The terms are cross-entropies, not KLs: they do not vanish when the student equals the teacher (their
    gradients in the non-target logits do). With several teachers t and T̂ come from the mixture
    (``ensemble``). Two classes leave one non-target class, so they are refused (as for DKD).
    """

    name = "nkd"
    family = "logits"
    mimics = "the teacher's target probability and its normalised distribution over the non-target classes"
    teachers = "combined"

    class Args(MethodArgs):
        T: float = Field(1.0, gt=0.0, description="temperature of the non-target term")
        gamma: float = Field(1.5, ge=0.0, description="weight of the non-target term")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        ensemble: Ensemble = ensemble_field()

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        _need_three_classes(self.name, student, "non-target term (as DKD's NCKD)")

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        z_s = s.logits.float()
        log_t1 = teacher_log_probs(t, 1.0, target=target, weighting=a.ensemble)
        log_tT = log_t1 if a.T == 1.0 else teacher_log_probs(t, a.T, target=target, weighting=a.ensemble)
        t_gt, _ = _split_target(log_t1.exp(), target)
        s_gt, _ = _split_target(torch.log_softmax(z_s, dim=1), target)
        _, t_rest = _split_target(log_tT, target)
        _, s_rest = _split_target(z_s / a.T, target)
        t_hat = torch.softmax(t_rest, dim=1)  # the teacher's non-target probabilities, renormalised
        log_s_hat = torch.log_softmax(s_rest, dim=1)
        return {
            "ce": a.ce_weight * F.cross_entropy(z_s, target),
            "nkd_target": -(t_gt * s_gt).mean(),
            "nkd_nontarget": -a.gamma * a.T**2 * (t_hat * log_s_hat).sum(dim=1).mean(),
        }
