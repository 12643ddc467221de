"""Knowledge review (ReviewKD): the student's stages, fused deepest first, mimic the teacher's stages."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from kdcli.methods.base import Method, MethodArgs, Outputs, Shapes, register
from kdcli.methods.connectors import conv_bn, match_spatial

HCL_SIZES = (4, 2, 1)  # the pyramid of hcl: adaptive-average-pooled grids, used where smaller than the map


def _resize(f: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring an NCHW map to ``size``: nearest-neighbour where it grows (the reference's ``F.interpolate(...,
    mode="nearest")``), else :func:`match_spatial` (average-pooled where it shrinks, which the reference's
    hard-coded pairs never need)."""
    h, w = f.shape[-2:]
    if (h, w) == tuple(size):
        return f
    if h <= size[0] and w <= size[1]:
        return F.interpolate(f, size=tuple(size), mode="nearest")
    return match_spatial(f, tuple(size))


def hcl_level(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Hierarchical context loss of one level (unweighted, float32).

    MSE(f_s, f_t) at full resolution plus, for each size l of 4, 2, 1 smaller than the map, the MSE of
    both maps adaptive-average-pooled to l×l; the k-th pooled term used has weight 2⁻ᵏ (½, ¼, ⅛ when all
    three are used) and the sum is divided by the sum of the weights used (as the reference ``hcl``).
    """
    f_s, f_t = f_s.float(), f_t.float()
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for size in HCL_SIZES:
        if size >= min(f_s.shape[-2:]):
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
        total += weight
    return loss / total


def hcl(students: list[Tensor], teachers: list[Tensor]) -> Tensor:
    """Σ over levels of :func:`hcl_level` (maps of a level share one shape)."""
    total: Tensor | float = 0.0
    for a, b in zip(students, teachers, strict=True):
        total = total + hcl_level(a, b)
    return total


class ABF(nn.Module):
    """Attention-based fusion of one level: conv1×1 + BN to ``mid`` channels; where a deeper level exists,
    fused with its residual (resized to this level's grid) by a 2-channel sigmoid attention from
    concat → conv1×1; the fused map is resized to the teacher's grid and a conv3×3 + BN maps it to the
    teacher's channels. Returns (output, residual for the next, shallower level)."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = conv_bn(c_in, mid, 1)
        self.conv2 = conv_bn(mid, c_out, 3)
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # the reference's initialisation
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            residual = _resize(residual, x.shape[-2:])
            z = self.att(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        x = _resize(x, out_size)
        return self.conv2(x), x


@register
class ReviewKD(Method):
    """Knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review").

    Levels, shallow to deep: the matched stage maps plus the pooled feature as a 1×1 map, on both sides
    (the teacher's are the targets, detached). The student's levels are processed deepest first by ABF
    modules (:class:`ABF`): conv1×1+BN to mid = min(512, student's pooled width) channels (the reference's
    ``min(512, in_channels[-1])``), attention fusion with the deeper level's residual, then conv3×3+BN to the
    teacher's channels of that level. Each output is brought to the teacher's grid of its level before the
    conv3×3 and the residual to the next level's student grid (nearest where a map grows, as the reference;
    average-pooled where it shrinks, for CNN↔ViT pairs whose grids differ). Channel and grid tables come
    from the ``Shapes`` of both models (timm feature_info), not from a table per architecture.

    ``reviewkd = weight · ramp(e) · Σ_levels HCL(ABF_l, T_l)``, with HCL (:func:`hcl_level`) the MSE at full
    resolution plus the MSEs after adaptive average pooling to 4, 2, 1 (sizes smaller than min(H, W); the
    reference tests H, the same on square maps), weighted 1, ½, ¼, ⅛ (the k-th pooled size used weighs 2⁻ᵏ)
    and divided by the sum of the weights used; ``ce`` = ce_weight · CE(z_s, y).
    ramp(e) = min((e+1)/(ramp·epochs), 1) rises linearly over the first ``ramp`` fraction of the epochs
    (kdcli's ``Method.ramp``, as mdistiller's 1-based ``min(epoch/warmup, 1)``; the authors' CIFAR
    ``train.py`` uses the 0-based epoch, so its first epoch has no review term).

    Defaults and sources: CE weight 1; ramp 20/240 (authors' ``--kd-warm-up 20`` of 240 epochs,
    dvlab-research/ReviewKD ``CIFAR-100/train.py``); weight 5.0, the authors' ``--kd-loss-weight`` for
    w40-2→w16-2, w40-2→w40-1, r32x4→r8x4, r32x4→ShuffleV1 and w40-2→ShuffleV1 (``CIFAR-100/script/
    reviewKD.sh``; 8.0 for ShuffleV2, 0.6 for r56→r20, 1.0 for r110→r32; mdistiller's CIFAR yaml: 5.0).
    ABF and hcl follow ``CIFAR-100/model/reviewkd.py`` and mdistiller ``mdistiller/distillers/ReviewKD.py``.

    Picking the weight: keep 5 (the default) for CIFAR-scale pairs; for ImageNet-scale pairs pass
    ``--method-arg weight=1`` (authors' and mdistiller's R34→R18: weight 1.0; mdistiller's 1-epoch warm-up
    gives full weight from its first, 1-based epoch, i.e. ``ramp=0``). kdcli feeds post-activation stage
    outputs (what timm exposes), where the reference's targets are the teacher's pre-activation maps
    (``preact=True`` in the authors' ``train.py``, ``preact_feats`` in mdistiller) and, on ImageNet, the
    student's too (mdistiller ``STU_PREACT``), so the HCL scale differs from the reference's.
    """

    name = "reviewkd"
    family = "features"
    mimics = "the teacher's stages, reviewed by the student's stages fused deepest first"
    needs = frozenset({"logits", "features", "pooled"})
    teachers = "one"
    stages_note = "single stage: CE + weight·ramp·Σ HCL over the stages and the pooled feature"

    class Args(MethodArgs):
        weight: float = Field(5.0, ge=0.0, description="weight of the review (HCL) term: 5 for CIFAR-scale "
                                                       "pairs, 1 for ImageNet-scale pairs")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")
        ramp: float = Field(20 / 240, ge=0.0, le=1.0,
                            description="linear ramp of the review term over this fraction of the epochs (0: none)")
        max_mid_channels: int = Field(512, ge=1, description="cap of the ABFs' middle width (reference: 512)")

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        if student is None or teacher is None or not student.features or not teacher.features:
            raise ValueError("reviewkd needs the feature shapes of both the student and the teacher")
        if student.pooled is None or teacher.pooled is None:
            raise ValueError("reviewkd needs the pooled feature width of both the student and the teacher")
        if len(student.features) != len(teacher.features):
            raise ValueError(f"reviewkd needs as many student as teacher stages (got {len(student.features)} "
                             f"and {len(teacher.features)})")
        c_in = [c for c, _, _ in student.features] + [student.pooled]
        c_out = [c for c, _, _ in teacher.features] + [teacher.pooled]
        self.teacher_grids = [(h, w) for _, h, w in teacher.features] + [(1, 1)]
        self.n_stages = len(student.features)
        mid = min(self.args.max_mid_channels, c_in[-1])
        n = len(c_in)
        # one ABF per level, shallow to deep; the deepest (pooled) level has nothing deeper to fuse with
        self.abfs = nn.ModuleList(ABF(ci, mid, co, fuse=i < n - 1) for i, (ci, co) in enumerate(zip(c_in, c_out,
                                                                                                    strict=True)))

    def _check(self, s: Outputs, t: Outputs) -> None:
        if len(s.features) != self.n_stages or len(t.features) != self.n_stages:
            raise ValueError(f"reviewkd was built for {self.n_stages} matched stages, got {len(s.features)} "
                             f"student and {len(t.features)} teacher feature maps")
        if s.pooled is None or t.pooled is None:
            raise ValueError("reviewkd needs the pooled features of both the student and the teacher")

    @staticmethod
    def levels(o: Outputs) -> list[Tensor]:
        """The stage maps, shallow to deep, then the pooled feature as a 1×1 map."""
        return [*o.features, o.pooled.flatten(1)[:, :, None, None]]

    def review(self, s: Outputs, sizes: list[tuple[int, int]] | None = None) -> list[Tensor]:
        """The ABF outputs, shallow to deep, each on the teacher's grid of its level (``sizes``; default:
        the grids measured at build time)."""
        sizes = sizes or self.teacher_grids
        xs = self.levels(s)
        out: list[Tensor] = []
        residual = None
        for i in reversed(range(len(xs))):
            y, residual = self.abfs[i](xs[i], residual, sizes[i])
            out.insert(0, y)
        return out

    def forward(self, s, t, target, *, images=None, index=None):
        self._check(s, t)
        targets = [f.detach() for f in self.levels(t)]
        results = self.review(s, [tuple(f.shape[-2:]) for f in targets])
        return {"ce": self.args.ce_weight * F.cross_entropy(s.logits.float(), target),
                "reviewkd": self.args.weight * self.ramp(self.args.ramp) * hcl(results, targets)}
