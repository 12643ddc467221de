"""Methods that mimic the teacher's intermediate feature maps: FitNets, AT, FSP, Factor Transfer, NST and VID.

Every method here returns the hard-label cross-entropy as ``ce`` (weight ``ce_weight``, default 1, as
in RepDistiller's recipe, where feature methods train with CE weight 1 and no KD term unless composed
with ``kd``) next to its own, already weighted term. Losses are computed in float32 whatever the
autocast precision. Warm-up stages (FitNet hints, FSP, the FT paraphraser) last ``warmup`` × the main
epochs (default 0.125: RepDistiller's 30 init epochs of 240); ``warmup=0`` disables them.
"""

from __future__ import annotations

import math

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
    ``ft = β · mean |F_s/‖F_s‖₂ − F_t/‖F_t‖₂|^p`` on the flattened factors, p = 1, β = 500 (the authors' code,
    Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``: ``--beta 500``), next to CE. Factors are
    average-pooled to the smaller grid first.

    The factor loss on the flattened factors is the paper's Eq. (3) and its authors' code
    (``F.normalize(factor.view(B, -1))`` + ``L1Loss``), so β is theirs. RepDistiller's ``FactorTransfer`` instead
    compares channel-mean attention maps of the factors, a term of another scale, with β = 200; kdcli used 200
    with the authors' form until its CIFAR-10 study (which ran with ``beta=200``: pass it to repeat those runs).
    The paraphraser has BN after each conv by default, which neither source has (the authors' code has its BN
    lines commented out, ``Models/FeatureProjection.py``; RepDistiller's paraphraser has none): without it the
    reconstruction diverged to inf within a few steps on an untrained CNN teacher whose last-stage activations
    are large (``paraphraser_bn=false`` gives theirs). The translator's BN is RepDistiller's.
    """

    name = "ft"
    family = "features"
    mimics = "factors of the teacher's last representation"
    needs = frozenset({"logits", "features"})
    stages_note = "warm-up: paraphraser reconstructs the teacher (warmup × epochs, default 0.125); then CE + β·factor"

    class Args(MethodArgs):
        beta: float = Field(500.0, ge=0.0, description="weight of the factor-transfer term")
        k: float = Field(0.5, gt=0.0, le=4.0, description="paraphrase rate: factor channels = k × teacher channels")
        p: int = Field(1, ge=1, le=2, description="norm of the factor distance (1: L1, 2: squared L2)")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        paraphraser_bn: bool = Field(True, description="BN in the paraphraser (kdcli's; the authors' and "
                                                       "RepDistiller's have none)")
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


# --------------------------------------------------------------------------------------------- NST


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over (batch, channel of a, channel of b) of the polynomial kernel (a_i · b_j)²; a, b: (B, C, N)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """NST's squared MMD (unweighted) between the channels of two NCHW maps, each channel's spatial vector
    L2-normalised, with the kernel k(a, b) = (a·b)²: mean k(t, t) + mean k(s, s) − 2 mean k(s, t).

    The larger map is average-pooled to the smaller grid first; channel counts may differ. Float32 even
    under autocast.
    """
    size = smaller(f_s.shape, f_t.shape)
    with torch.autocast(f_s.device.type, enabled=False):
        s = F.normalize(match_spatial(f_s.float(), size).flatten(2), dim=2)
        with torch.no_grad():
            t = F.normalize(match_spatial(f_t.detach().float(), size).flatten(2), dim=2)
            k_tt = _poly_kernel_mean(t, t)
        return k_tt + _poly_kernel_mean(s, s) - 2.0 * _poly_kernel_mean(s, t)


@register
class NST(Method):
    """Neuron Selectivity Transfer (Huang & Wang, 2017, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", arXiv:1707.01219).

    Each channel of a stage map is a sample of "neuron selectivity" over the spatial positions. Per matched
    stage, the larger map is average-pooled to the smaller grid, both are flattened to C × HW, each
    channel's HW-vector is L2-normalised, and the squared maximum mean discrepancy between the student's and
    the teacher's channel sets with the polynomial kernel k(a, b) = (a·b)² (the paper's best kernel, d = 2,
    c = 0) is ``mean k(t, t) + mean k(s, s) − 2 mean k(s, t)`` (means over the batch and all channel pairs;
    the teacher's term carries no gradient). ``nst`` = β · Σ_stages MMD². Channel counts may differ, so no
    connector.

    Defaults and form: RepDistiller (Tian et al. 2020) ``distiller_zoo/NST.py`` (full MMD, summed over its
    three CIFAR stages ``feat[1:-1]``), β = 50 with cross-entropy weight 1 and no KD term (RepDistiller's
    ``-a 0 -b 50``; mdistiller ``NST.LOSS.FEAT_WEIGHT`` 50, CE 1). Memory is O(B·C²) per stage.
    """

    name = "nst"
    family = "features"
    mimics = "the distribution of the teacher's neuron selectivity patterns (MMD over channels)"
    needs = frozenset({"logits", "features"})
    stages_note = "single stage: CE + β·Σ polynomial-kernel MMD² over the matched stages"

    class Args(MethodArgs):
        beta: float = Field(50.0, ge=0.0, description="weight of the MMD term")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        s_shapes, _ = _feature_shapes(self.name, student, teacher)
        self.n_stages = len(s_shapes)

    def forward(self, s, t, target, *, images=None, index=None):
        _check_len(self.name, s, t, self.n_stages)
        total = sum(nst_loss(f_s, f_t) for f_s, f_t in zip(s.features, t.features, strict=True))
        return {"ce": _ce(s, target, self.args.ce_weight), "nst": self.args.beta * total}


# --------------------------------------------------------------------------------------------- VID


class VariationalRegressor(nn.Module):
    """VID's Gaussian q(t | s) for one stage: mean μ = conv1×1 → ReLU → conv1×1 → ReLU → conv1×1 (no bias,
    student → teacher channels, mid = teacher channels) and one variance per teacher channel,
    σ² = softplus(α) + ε with α initialised so that σ² starts at ``init_var``."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_var: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 1, bias=False),
        )
        self.eps = eps
        alpha = math.log(math.expm1(init_var - eps))  # softplus⁻¹(init_var − ε)
        self.alpha = nn.Parameter(torch.full((c_out,), alpha))

    def variance(self) -> Tensor:
        return F.softplus(self.alpha.float()) + self.eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        """Mean over (b, c, h, w) of the Gaussian negative log-likelihood ½[(μ − t)²/σ² + log σ²]."""
        size = smaller(f_s.shape, f_t.shape)
        mu = self.regressor(match_spatial(f_s, size)).float()
        target = match_spatial(f_t.detach().float(), size)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mu - target).pow(2) / var + var.log())).mean()


@register
class VID(Method):
    """Variational Information Distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019).

    VID maximises a variational lower bound on the mutual information between teacher and student maps: per
    matched stage, a Gaussian q(t | s) with mean μ = r(f_s) (r: conv1×1 → ReLU → conv1×1 → ReLU → conv1×1,
    student → teacher channels, mid = teacher channels) and a per-channel variance σ²_c = softplus(α_c) + ε
    (one variance per channel, shared over positions, as the paper does for intermediate layers), and
    ``vid`` = β · Σ_stages mean_{b,c,h,w} ½[(μ − f_t)²/σ² + log σ²], i.e. the negative log-likelihood without
    its constant. The larger map is average-pooled to the smaller grid first. The regressors and α join the
    optimizer (``VID.parameters()``).

    Because of the log σ² term the loss can be negative (whenever σ² < 1 fits well enough), and it is not
    comparable across runs or monotone in the fit of μ: it is a likelihood, not a distance.

    Defaults: RepDistiller (Tian et al. 2020) ``distiller_zoo/VID.py`` (the authors' code,
    github.com/ssahn0215/variational-information-distillation): initial variance 5 (α₀ = log(e^{5−ε} − 1)),
    ε = 1e-5, summed over its three CIFAR stages ``feat[1:-1]``; β = 1 with cross-entropy weight 1 and no
    KD term (RepDistiller's ``-a 0 -b 1``; mdistiller ``VID.LOSS.FEAT_WEIGHT`` 1.0, CE 1.0).
    """

    name = "vid"
    family = "features"
    mimics = "the teacher's feature maps as a Gaussian predicted from the student's (mutual information)"
    needs = frozenset({"logits", "features"})
    stages_note = "single stage: CE + β·Σ Gaussian NLL of the teacher maps (can be negative)"

    class Args(MethodArgs):
        beta: float = Field(1.0, ge=0.0, description="weight of the VID (negative log-likelihood) term")
        init_var: float = Field(5.0, gt=0.0, description="initial variance σ² of every teacher channel")
        eps: float = Field(1e-5, gt=0.0, description="floor ε added to the softplus variance")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        s_shapes, t_shapes = _feature_shapes(self.name, student, teacher)
        if self.args.init_var <= self.args.eps:
            raise ValueError(f"vid: init_var={self.args.init_var} must exceed eps={self.args.eps}")
        self.n_stages = len(s_shapes)
        self.regressors = nn.ModuleList(
            VariationalRegressor(cs[0], ct[0], ct[0], self.args.init_var, self.args.eps)
            for cs, ct in zip(s_shapes, t_shapes, strict=True))

    def forward(self, s, t, target, *, images=None, index=None):
        _check_len(self.name, s, t, self.n_stages)
        total = sum(r(f_s, f_t) for r, f_s, f_t in zip(self.regressors, s.features, t.features, strict=True))
        return {"ce": _ce(s, target, self.args.ce_weight), "vid": self.args.beta * total}
