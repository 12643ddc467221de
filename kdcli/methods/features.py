"""Methods that mimic the teacher's intermediate feature maps: FitNets, AT, FSP and Factor Transfer.

Every method here returns the hard-label cross-entropy as ``ce`` (weight ``ce_weight``, default 1, as
in RepDistiller's recipe, where feature methods train with CE weight 1 and no KD term unless composed
with ``kd``) next to its own, already weighted term. Losses are computed in float32 whatever the
autocast precision. Warm-up stages (FitNet hints, FSP, the FT paraphraser) last ``warmup`` × the main
epochs (default 0.125: RepDistiller's 30 init epochs of 240); ``warmup=0`` disables them.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional as F

from kdcli.methods.base import Method, MethodArgs, Outputs, Shapes, register, warmup_field, warmup_length
from kdcli.methods.connectors import conv_bn, match_spatial, smaller


def _ce(s: Outputs, target: Tensor, weight: float) -> Tensor:
    return weight * F.cross_entropy(s.logits.float(), target)


def _feature_shapes(name: str, student: Shapes | None, teacher: Shapes | None, at_least: int = 1):
    """The matched stage shapes of student and teacher, checked (ValueError when unusable)."""
    if student is None or teacher is None or not student.features or not teacher.features:
        raise ValueError(f"{name} needs the feature shapes of both the student and the teacher")
    s, t = student.features, teacher.features
    if len(s) != len(t):
        raise ValueError(f"{name} needs as many student as teacher stages (got {len(s)} and {len(t)})")
    if len(s) < at_least:
        raise ValueError(f"{name} needs at least {at_least} matched stages, got {len(s)}")
    return s, t


def _check_len(name: str, s: Outputs, t: Outputs, n: int) -> None:
    if len(s.features) != n or len(t.features) != n:
        raise ValueError(f"{name} was built for {n} matched stages, got {len(s.features)} student and "
                         f"{len(t.features)} teacher feature maps")


# --------------------------------------------------------------------------------------------- FitNets


@register
class FitNet(Method):
    """FitNets: hints for thin deep nets (Romero et al., ICLR 2015).

    A trainable regressor maps the student's guided layer to the teacher's hint layer:
    ``fitnet = β · MSE(r(f_s), f_t)`` (mean over all elements, as ``nn.MSELoss``), β = 100.
    The hint is the middle matched stage (``stage`` overrides, -1 = last): with the default last three
    stages that is the second stage of a CIFAR ResNet, RepDistiller's ``hint_layer=2``.

    The regressor is a conv + BN from student to teacher channels. RepDistiller's ``ConvReg`` uses a
    1×1 kernel when the two maps have the same resolution (the usual case), hence ``kernel=1``; where
    resolutions differ, the student map is first resized to the teacher's grid (average-pooled when
    larger, bilinear when smaller) so the hint is compared at the teacher's own resolution.
    ``ConvReg`` ends with a ReLU; it is left out here because ViT teachers' token maps are signed.

    Two stages as published: a warm-up trains the student up to the guided layer and the regressor
    on the hint alone (no CE); the task stage then trains CE + β·hint (RepDistiller keeps the hint term,
    β = 100, γ_CE = 1, and runs no warm-up: set ``warmup=0`` to reproduce it exactly).
    """

    name = "fitnet"
    family = "features"
    mimics = "the teacher's intermediate representation through a regressor"
    needs = frozenset({"logits", "features"})
    stages_note = "warm-up: hint only (warmup × epochs, default 0.125); then CE + β·hint"

    class Args(MethodArgs):
        beta: float = Field(100.0, ge=0.0, description="weight of the hint (MSE) term")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        stage: int | None = Field(None, description="matched stage to hint (0 = shallowest, -1 = last); "
                                                    "default: the middle one")
        kernel: int = Field(1, ge=1, le=7, description="regressor kernel size (odd)")
        warmup: float = warmup_field()

        @field_validator("kernel")
        @classmethod
        def _odd(cls, v: int) -> int:
            if v % 2 == 0:
                raise ValueError("the kernel size must be odd")
            return v

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        s_shapes, t_shapes = _feature_shapes(self.name, student, teacher)
        n = len(s_shapes)
        stage = n // 2 if self.args.stage is None else self.args.stage
        if not -n <= stage < n:
            raise ValueError(f"fitnet stage {stage} is out of range: {n} stages are matched "
                             f"(0..{n - 1}, or -1 for the last)")
        self.stage = stage % n
        self.n_stages = n
        self.target_size = tuple(t_shapes[self.stage][1:])
        self.regressor = conv_bn(s_shapes[self.stage][0], t_shapes[self.stage][0], self.args.kernel)

    def hint(self, s: Outputs, t: Outputs) -> Tensor:
        """MSE between the regressed student map and the teacher's hint (unweighted)."""
        _check_len(self.name, s, t, self.n_stages)
        f_s = self.regressor(match_spatial(s.features[self.stage], self.target_size))
        return F.mse_loss(f_s.float(), t.features[self.stage].float())

    def forward(self, s, t, target, *, images=None, index=None):
        return {"ce": _ce(s, target, self.args.ce_weight), "fitnet": self.args.beta * self.hint(s, t)}

    def warmup_epochs(self, epochs: int) -> int:
        return warmup_length(self.args.warmup, epochs)

    def warmup(self, s, t, target, *, images=None, index=None):
        return {"fitnet": self.args.beta * self.hint(s, t)}


# --------------------------------------------------------------------------------------------- AT


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of an NCHW map: L2-normalised, flattened mean over channels of |f|^p."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


@register
class AT(Method):
    """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

    For each matched stage the attention map is ``a = normalize_L2(mean_c |f|^p)`` (flattened), p = 2,
    and ``at = β · Σ_stages mean_{batch, positions} (a_s − a_t)²``, β = 1000: the form of RepDistiller's
    ``Attention`` loss (the paper's code writes β/2; RepDistiller's recipe uses β = 1000 without the 1/2).
    Both maps are first average-pooled to the smaller of the two grids (as RepDistiller does), so
    resolutions may differ; channels may differ too (the map averages over them), so no connector.
    """

    name = "at"
    family = "features"
    mimics = "where the teacher's feature maps attend"
    needs = frozenset({"logits", "features"})
    stages_note = "single stage: CE + β·Σ attention-map distances over the matched stages"

    class Args(MethodArgs):
        beta: float = Field(1000.0, ge=0.0, description="weight of the attention term")
        p: float = Field(2.0, gt=0.0, description="exponent of |f| in the attention map")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        s_shapes, _ = _feature_shapes(self.name, student, teacher)
        self.n_stages = len(s_shapes)

    def forward(self, s, t, target, *, images=None, index=None):
        _check_len(self.name, s, t, self.n_stages)
        total = 0.0
        for f_s, f_t in zip(s.features, t.features, strict=True):
            size = smaller(f_s.shape, f_t.shape)
            a_s = attention_map(match_spatial(f_s, size), self.args.p)
            a_t = attention_map(match_spatial(f_t, size), self.args.p)
            total = total + (a_s - a_t).pow(2).mean()
        return {"ce": _ce(s, target, self.args.ce_weight), "at": self.args.beta * total}


# --------------------------------------------------------------------------------------------- FSP


def fsp_matrix(a: Tensor, b: Tensor) -> Tensor:
    """FSP (Gram) matrix of two NCHW maps: G = F_a F_bᵀ / (H·W), shape (B, C_a, C_b).

    The larger map is average-pooled to the smaller grid first (as RepDistiller's ``FSP``). Computed in
    float32 even under autocast (which would otherwise run the product in bf16/fp16).
    """
    size = smaller(a.shape, b.shape)
    with torch.autocast(a.device.type, enabled=False):
        a, b = match_spatial(a.float(), size), match_spatial(b.float(), size)
        return a.flatten(2) @ b.flatten(2).transpose(1, 2) / (size[0] * size[1])


@register
class FSP(Method):
    """Flow of Solution Procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation").

    For consecutive matched stages (i, i+1) the FSP matrix is ``G = F_i F_{i+1}ᵀ / (H·W)`` (after the
    larger map is pooled to the smaller grid), and ``fsp = β · Σ_pairs mean (G_s − G_t)²``.
    The student and teacher FSP matrices must have the same shape, so student maps whose channel count
    differs from the teacher's go through a 1×1 conv + BN connector first (RepDistiller instead refuses
    such pairs; where channels match no connector is used, as there).

    Stages exactly as RepDistiller: the FSP loss is used only in the warm-up (init) stage, which trains
    the student (and connectors) on it alone; the main stage is then CE only (plus KD when composed,
    e.g. ``kd+fsp``). β = 1 and the sum over pairs reproduce RepDistiller's init loss
    (``sum(loss_group)``, unweighted); its scripts pass ``-b 50`` for FSP, but RepDistiller's main stage
    sets the FSP term to 0, so that 50 weights nothing.
    """

    name = "fsp"
    family = "features"
    mimics = "the flow between the teacher's layers"
    needs = frozenset({"logits", "features"})
    stages_note = "warm-up: FSP matrices only (warmup × epochs, default 0.125); then CE only (as RepDistiller)"

    class Args(MethodArgs):
        beta: float = Field(1.0, ge=0.0, description="weight of the FSP term (warm-up stage)")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        warmup: float = warmup_field()

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        s_shapes, t_shapes = _feature_shapes(self.name, student, teacher, at_least=2)
        self.n_stages = len(s_shapes)
        self.connectors = nn.ModuleList(nn.Identity() if cs[0] == ct[0] else conv_bn(cs[0], ct[0])
                                        for cs, ct in zip(s_shapes, t_shapes, strict=True))

    def fsp_loss(self, s: Outputs, t: Outputs) -> Tensor:
        """Σ over consecutive stage pairs of the mean squared FSP-matrix difference (unweighted)."""
        _check_len(self.name, s, t, self.n_stages)
        g_s = [c(f) for c, f in zip(self.connectors, s.features, strict=True)]
        g_t = t.features
        total = 0.0
        for i in range(self.n_stages - 1):
            total = total + (fsp_matrix(g_s[i], g_s[i + 1]) - fsp_matrix(g_t[i], g_t[i + 1])).pow(2).mean()
        return total

    def forward(self, s, t, target, *, images=None, index=None):
        return {"ce": _ce(s, target, self.args.ce_weight)}

    def warmup_epochs(self, epochs: int) -> int:
        return warmup_length(self.args.warmup, epochs)

    def warmup(self, s, t, target, *, images=None, index=None):
        return {"fsp": self.args.beta * self.fsp_loss(s, t)}


# --------------------------------------------------------------------------------------------- FT


def _conv_stack(channels: list[int], transpose: bool, bn: bool) -> nn.Sequential:
    """3×3 (transposed) convolutions, stride 1, each followed by BN (optional) and LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:], strict=False):
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        layers += [conv(c_in, c_out, 3, 1, 1, bias=not bn)]
        if bn:
            layers += [nn.BatchNorm2d(c_out)]
        layers += [nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's convolutional autoencoder on the teacher's map: C → C → kC → kC, mirrored back."""

    def __init__(self, channels: int, factor: int, bn: bool = False):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor, factor], transpose=False, bn=bn)
        self.decoder = _conv_stack([factor, factor, channels, channels], transpose=True, bn=bn)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(f)
        return factor, self.decoder(factor)


def factor_loss(factor_s: Tensor, factor_t: Tensor, p: int = 1) -> Tensor:
    """mean |normalize(vec(F_s)) − normalize(vec(F_t))|^p over batch and elements (after spatial matching)."""
    size = smaller(factor_s.shape, factor_t.shape)
    v_s = F.normalize(match_spatial(factor_s.float(), size).flatten(1), dim=1)
    v_t = F.normalize(match_spatial(factor_t.float(), size).flatten(1), dim=1)
    return (v_s - v_t).abs().pow(p).mean()


@register
class FT(Method):
    """Factor Transfer (Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing Complex Network").

    A paraphraser (conv autoencoder: three 3×3 conv + LeakyReLU(0.1) to k·C_t factor channels, k = 0.5,
    mirrored with transposed convs) is trained in the warm-up stage to reconstruct the teacher's last
    matched map: ``ft_paraphraser = MSE(dec(enc(f_t)), f_t)`` (RepDistiller's init loss, weight 1). Then it
    is frozen (eval mode, no gradient) and a translator (three 3×3 conv + BN + LeakyReLU(0.1), student
    channels → k·C_t) on the student's last matched map is trained with
    ``ft = β · mean |F_s/‖F_s‖₂ − F_t/‖F_t‖₂|^p`` on the flattened factors, p = 1, β = 200 (RepDistiller),
    next to CE. Factors are average-pooled to the smaller grid first.

    The factor loss on the flattened factors is the paper's Eq. (3) and its authors' code
    (``F.normalize(factor.view(B, -1))`` + ``L1Loss``); RepDistiller's ``FactorTransfer`` instead compares
    channel-mean attention maps of the factors, so the same β weighs a term of a different scale here.
    The paraphraser has BN after each conv by default, as in the paper's authors' code; RepDistiller's has
    none (``paraphraser_bn=false``). kdcli keeps BN because without it the reconstruction diverged to inf
    within a few steps on an untrained CNN teacher whose last-stage activations are large.
    """

    name = "ft"
    family = "features"
    mimics = "factors of the teacher's last representation"
    needs = frozenset({"logits", "features"})
    stages_note = "warm-up: paraphraser reconstructs the teacher (warmup × epochs, default 0.125); then CE + β·factor"

    class Args(MethodArgs):
        beta: float = Field(200.0, ge=0.0, description="weight of the factor-transfer term")
        k: float = Field(0.5, gt=0.0, le=4.0, description="paraphrase rate: factor channels = k × teacher channels")
        p: int = Field(1, ge=1, le=2, description="norm of the factor distance (1: L1, 2: squared L2)")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        paraphraser_bn: bool = Field(True, description="BN in the paraphraser (authors' code; RepDistiller: none)")
        warmup: float = warmup_field()

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        s_shapes, t_shapes = _feature_shapes(self.name, student, teacher)
        self.n_stages = len(s_shapes)
        c_s, c_t = s_shapes[-1][0], t_shapes[-1][0]
        factor = int(c_t * self.args.k)
        if factor < 1:
            raise ValueError(f"ft: k={self.args.k} leaves no factor channel for a {c_t}-channel teacher map")
        self.paraphraser = Paraphraser(c_t, factor, bn=self.args.paraphraser_bn)
        self.translator = _conv_stack([c_s, c_s, factor, factor], transpose=False, bn=True)

    def forward(self, s, t, target, *, images=None, index=None):
        _check_len(self.name, s, t, self.n_stages)
        self.paraphraser.eval()  # frozen in the main stage (RepDistiller sets it to eval as well)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t.features[-1])
        factor_s = self.translator(s.features[-1])
        return {"ce": _ce(s, target, self.args.ce_weight),
                "ft": self.args.beta * factor_loss(factor_s, factor_t, self.args.p)}

    def warmup_epochs(self, epochs: int) -> int:
        return warmup_length(self.args.warmup, epochs)

    def warmup(self, s, t, target, *, images=None, index=None):
        _check_len(self.name, s, t, self.n_stages)
        self.paraphraser.train(self.training)
        f_t = t.features[-1]
        _, rec = self.paraphraser(f_t)
        return {"ft_paraphraser": F.mse_loss(rec.float(), f_t.float())}
