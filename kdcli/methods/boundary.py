"""Boundary methods: the student learns where the teacher's boundaries lie.

``ab`` transfers the boundaries of the teacher's hidden neurons (which side of zero each
pre-activation falls on); ``bss`` transfers the teacher's decision boundary, through adversarial
samples pushed towards it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from kdcli.errors import KdcliError
from kdcli.methods.base import Method, MethodArgs, Outputs, Shapes, kl_div, register, warmup_field, warmup_length
from kdcli.methods.connectors import conv_bn, match_spatial

_LOGITS = frozenset({"logits"})


def ab_stage_loss(s: Tensor, t: Tensor, margin: float = 1.0) -> Tensor:
    """AB's alternative loss on one stage, summed over elements and averaged over the batch.

    (s + m)² where the teacher's neuron is inactive (t ≤ 0) but the student's s > −m, plus
    (s − m)² where the teacher's neuron is active (t > 0) but s ≤ m: zero once every student
    response lies on the teacher's side of zero by at least the margin m.
    """
    s, t = s.float(), t.float()
    off = (s + margin).pow(2) * ((s > -margin) & (t <= 0))
    on = (s - margin).pow(2) * ((s <= margin) & (t > 0))
    return (off + on).flatten(1).sum(dim=1).mean()


@register
class AB(Method):
    """Activation boundaries (Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Transfer via Distillation of
    Activation Boundaries Formed by Hidden Neurons").

    On each matched stage i (shallow to deep, n stages) a connector r_i (1×1 conv + BN, as in the paper
    and the authors' code, github.com/bhheo/AB_distillation) maps the student's pre-activation map to
    the teacher's channels; the student map is first resized to the teacher's grid (``match_spatial``).
    With m the margin and, per element, s = r_i(student), t = teacher:

        L_i = (1/B) Σ_elements [(s + m)² · 1[s > −m] · 1[t ≤ 0] + (s − m)² · 1[s ≤ m] · 1[t > 0]]
        ab  = beta · (3/1000) · Σ_i 2^(i−n+1) · L_i

    i.e. the paper's "alternative" squared hinge (eq. 6), which is zero once each student neuron is on
    the teacher's side of zero by at least m. The normalisation follows the reference code exactly
    (``criterion_alternative_L2`` summed over elements and divided by the batch size; the deepest
    stage weighted 1, each shallower one half the next; the total × 3/1000), in both the authors'
    code and RepDistiller (Tian et al., ICLR 2020, distiller_zoo/AB.py ``ABLoss``). Being a sum over
    elements, the term grows with the maps' size, as there.

    Stages: AB acts through initialisation. The warm-up stage (``warmup`` × the main epochs; default
    0.125, RepDistiller's 30 init epochs of 240) trains the student's feature layers and the
    connectors on ``ab`` alone (RepDistiller's ``init`` with ``sum(ABLoss)``, weight 1: ``beta`` = 1);
    the main stage is then plain cross-entropy (RepDistiller's ``-a 0 -b 1`` script with
    ``loss_kd = 0`` for abound; compose ``kd+ab`` for KD in the main stage).

    Pre-activations: the method asks for ``preact``. Where a model exposes only post-ReLU stage
    outputs (most timm models), those are what kdcli passes. On the teacher's side t ≥ 0 then, and
    1[t ≤ 0] still marks exactly its inactive neurons, so the boundary transferred is the same. On the
    student's side the connector sees post-ReLU values: r(s) still falls on either side of zero (conv +
    BN), but how far the student's own neurons are below zero is invisible to the loss, a weaker signal
    than the paper's pre-ReLU maps.
    """

    name = "ab"
    family = "boundary"
    mimics = "which of the teacher's hidden neurons fire (their activation boundaries)"
    needs = frozenset({"logits", "preact"})
    stages_note = "warm-up: AB loss only (init stage); then cross-entropy only"

    class Args(MethodArgs):
        margin: float = Field(1.0, ge=0.0, description="margin m of the squared hinge around zero")
        beta: float = Field(1.0, ge=0.0, description="weight of the AB term in the warm-up stage")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy (main stage)")
        warmup: float = warmup_field()

    def __init__(self, args: MethodArgs | None = None, student: Shapes | None = None,
                 teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        if student is None or teacher is None or not student.features or not teacher.features:
            raise ValueError("ab needs the stage maps of both models (at least one matched stage)")
        if len(student.features) != len(teacher.features):
            raise ValueError(f"ab needs as many student stages as teacher stages "
                             f"({len(student.features)} vs {len(teacher.features)})")
        self.connectors = nn.ModuleList(conv_bn(s[0], t[0]) for s, t in zip(student.features, teacher.features,
                                                                              strict=True))
        for c in self.connectors:  # the authors' initialisation: N(0, 2/(k²·C_out)), BN weight 1, bias 0
            nn.init.kaiming_normal_(c[0].weight, mode="fan_out", nonlinearity="relu")
        self.grids = [tuple(t[1:]) for t in teacher.features]
        n = len(self.connectors)
        self.stage_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def ab_loss(self, s: Outputs, t: Outputs) -> Tensor:
        """The weighted AB loss over all stages (before ``beta``)."""
        total = s.logits.new_zeros((), dtype=torch.float32)
        for w, conn, grid, fs, ft in zip(self.stage_weights, self.connectors, self.grids, s.preact, t.preact,
                                         strict=True):
            total = total + w * ab_stage_loss(conn(match_spatial(fs, grid)), ft, self.args.margin)
        return total * 3.0 / 1000.0

    def warmup_epochs(self, epochs: int) -> int:
        return warmup_length(self.args.warmup, epochs)

    def warmup(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        return {"ab": self.args.beta * self.ab_loss(s, t)}

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        return {"ce": self.args.ce_weight * F.cross_entropy(s.logits.float(), target)}


def _input_scale(model: nn.Module, x: Tensor) -> Tensor | float:
    """The per-channel std a model divides its [0, 1] input by (1 if it has none)."""
    std = getattr(model, "std", None)
    if not isinstance(std, Tensor):
        return 1.0
    std = std.to(device=x.device, dtype=x.dtype)
    return std if std.dim() == 4 and std.shape[1] == x.shape[1] else std.mean()


@register
class BSS(Method):
    """Boundary supporting samples (Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Distillation with
    Adversarial Samples Supporting Decision Boundary"); defaults from the authors' code,
    github.com/bhheo/BSS_distillation (train_BSS_distillation.py, attacks/attack_BSS.py).

    loss = ce_weight · CE(s, y) + α(p) · KL_T(t ‖ s) + β(p) · KL_T(t(x_adv) ‖ s(x_adv)), with
    KL_T(t ‖ s) = KL(softmax(t/T) ‖ softmax(s/T)) averaged over the batch, T = 3, p the fraction of
    the main stage done, α(p) = kd_weight_final + (kd_weight − kd_weight_final)(1 − p) (4 → 1, the
    reference's ``ratio = max(3(1 − epoch/max_epoch), 0) + 1``) and β(p) = bss_weight · max(0,
    1 − p/bss_end) (2 → 0 at 75 % of training, the reference's ``attack_ratio = max(2(1 − 4/3 ·
    epoch/max_epoch), 0)``). As in the reference, neither term is scaled by T², and its weights were
    tuned without it. The reference writes the soft-target cross-entropy; KL differs from it by the
    teacher's entropy, a constant, so the student's gradients are identical and a perfect match logs 0.

    Boundary supporting samples, per step (skipped once β = 0):

    - base samples: those the teacher classifies correctly; if more than ``attack_fraction`` × batch
      (the reference: 64 of 256), those where student and teacher disagree most, by
      Σ_{c ≠ y} (p_t,c − p_s,c)² at T = 1;
    - target class k: drawn from the teacher's classes other than its top-1 b, with probability
      proportional to the teacher's softmax (reference); ``target_class=second`` takes the runner-up;
    - attack on the teacher (eval mode, frozen), up to ``steps`` = 10 iterations of
      x ← x + η · (z_b − z_k + 10⁻⁴) · g/‖g‖₂, g = ∇ₓ(z_k − z_b) on the logits z, η = 0.3, each sample
      stopping once the teacher no longer predicts b. The reference steps in normalised input
      coordinates; here x is the [0, 1] image, so the step is taken in the teacher's normalised
      coordinates (x/std) and mapped back, which keeps η on the reference's scale, and x is clamped to
      [0, 1] (the reference clamps the normalised input to ±2.5, about the pixel range).

    The teacher's parameters never receive gradients (``torch.autograd.grad`` w.r.t. the input only) and
    the input batch is not modified. The student then runs once more, on x_adv, in train mode: like the
    reference, this forward uses (and updates the BatchNorm running statistics with) the adversarial batch.
    """

    name = "bss"
    family = "boundary"
    mimics = "the teacher's decision boundary, on adversarial samples pushed towards it"
    teachers = "no"
    soft_targets = False  # the attack picks samples the teacher gets right: it needs class indices
    stages_note = "per step: targeted attack on the teacher (10 steps); BSS weight 2 → 0 by 75 % of training"

    class Args(MethodArgs):
        T: float = Field(3.0, gt=0.0, description="softmax temperature of the KD and BSS terms")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        kd_weight: float = Field(4.0, ge=0.0, description="KD weight α at the start (linear to kd_weight_final)")
        kd_weight_final: float = Field(1.0, ge=0.0, description="KD weight α at the end of training")
        bss_weight: float = Field(2.0, ge=0.0, description="BSS weight β at the start (linear to 0 at bss_end)")
        bss_end: float = Field(0.75, gt=0.0, le=1.0, description="fraction of training where β reaches 0")
        attack_fraction: float = Field(0.25, gt=0.0, le=1.0,
                                       description="at most this fraction of the batch is attacked")
        steps: int = Field(10, ge=1, description="attack iterations (at most)")
        step_size: float = Field(0.3, gt=0.0, description="attack step size η")
        target_class: Literal["sample", "second"] = Field(
            "sample", description="target class: sampled ∝ teacher probability, or the teacher's runner-up")

    def kd_weight_now(self) -> float:
        a = self.args
        return a.kd_weight_final + (a.kd_weight - a.kd_weight_final) * (1.0 - self.progress)

    def bss_weight_now(self) -> float:
        a = self.args
        return a.bss_weight * max(0.0, 1.0 - self.progress / a.bss_end)

    def select(self, s_logits: Tensor, t_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Indices of the base samples, their base class (the teacher's top-1) and their target class."""
        with torch.no_grad():
            p_t = torch.softmax(t_logits.float(), dim=1)
            top = p_t.argmax(dim=1)
            idx = (top == target).nonzero().flatten()
            limit = max(1, round(self.args.attack_fraction * t_logits.shape[0]))
            if idx.numel() > limit:
                p_s = torch.softmax(s_logits.detach().float()[idx], dim=1)
                diff = (p_t[idx] - p_s).pow(2)
                score = diff.sum(dim=1) - diff.gather(1, target[idx, None]).squeeze(1)
                idx = idx[score.argsort(descending=True)[:limit]]
            base = top[idx]
            rest = p_t[idx].scatter(1, base[:, None], 0.0)  # the teacher's other classes
            if self.args.target_class == "second" or idx.numel() == 0:
                goal = rest.argmax(dim=1)
            else:
                goal = torch.multinomial(rest + 1e-12 * (rest.sum(1, keepdim=True) == 0), 1).squeeze(1)
        return idx, base, goal

    def attack(self, x: Tensor, base: Tensor, goal: Tensor) -> Tensor:
        """Push ``x`` (in [0, 1]) across the teacher's boundary from class ``base`` towards ``goal``."""
        teacher, a = self.teacher_model, self.args
        scale = _input_scale(teacher, x)
        x = x.detach().float().clone()
        rows = torch.arange(x.shape[0], device=x.device)
        with torch.enable_grad():
            for _ in range(a.steps):
                xv = x.requires_grad_(True)
                z = teacher(xv, _LOGITS).logits.float()
                active = z.detach().argmax(dim=1) == base
                if not bool(active.any()):
                    break
                z_b, z_k = z[rows, base], z[rows, goal]
                (g,) = torch.autograd.grad((z_k - z_b).sum(), xv)
                with torch.no_grad():
                    g = g * scale  # the gradient w.r.t. the teacher's normalised input
                    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
                    size = a.step_size * (z_b - z_k + 1e-4) * active / norm
                    x = (xv.detach() + size.view(-1, 1, 1, 1) * g * scale).clamp_(0.0, 1.0)
        return x.detach()

    def boundary_samples(self, images: Tensor, s_logits: Tensor, t_logits: Tensor,
                         target: Tensor) -> tuple[Tensor, Tensor]:
        """The adversarial batch x_adv and the indices of the samples it came from (possibly none)."""
        idx, base, goal = self.select(s_logits, t_logits, target)
        if idx.numel() == 0:
            return images[:0].detach(), idx
        return self.attack(images[idx], base, goal), idx

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *,
                images: Tensor | None = None, index: Tensor | None = None) -> dict[str, Tensor]:
        a = self.args
        terms = {"ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
                 "kd": self.kd_weight_now() * kl_div(s.logits, t.logits, a.T)}
        beta = self.bss_weight_now()
        bss = s.logits.new_zeros((), dtype=torch.float32)
        if beta > 0:
            if images is None or not self._models:
                raise KdcliError("bss needs the input batch and the bound models (the loop passes both)")
            x_adv, _ = self.boundary_samples(images, s.logits, t.logits, target)
            if x_adv.shape[0]:
                with torch.no_grad():
                    t_adv = self.teacher_model(x_adv, _LOGITS).logits.float()
                s_adv = self.student_model(x_adv, _LOGITS).logits
                bss = beta * kl_div(s_adv, t_adv, a.T)
        terms["bss"] = bss
        return terms
