"""Relation methods: the student mimics how the teacher relates the examples of a batch to each other.

Relations are B × B (or B × B × B) tensors, so student and teacher widths may differ freely: these
methods need no connector (CC, in the form of its authors' code, projects both embeddings with trainable
linear maps to a common width).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from kdcli.methods.base import Method, MethodArgs, Outputs, Shapes, register

_EPS = 1e-12  # floor on squared distances and on norms (as in the RKD reference code's pdist)


def _differences(e: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise difference vectors ``diff[j, i] = e_i − e_j`` (B × B × D) and their lengths (B × B).

    Lengths are floored at √ε so that the zero diagonal has a finite gradient (zero, through the clamp).
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    dist = diff.pow(2).sum(dim=-1).clamp_min(_EPS).sqrt()
    return diff, dist


def _distinct_pairs(b: int, device: torch.device) -> Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def _distinct_triplets(b: int, device: torch.device) -> Tensor:
    ne = _distinct_pairs(b, device)
    return ne.unsqueeze(2) & ne.unsqueeze(1) & ne.unsqueeze(0)  # j≠i, j≠k, i≠k


def _normalised_distances(e: Tensor) -> Tensor:
    """ψ_D of RKD: Euclidean distances of the distinct pairs divided by their mean (a flat vector)."""
    _, dist = _differences(e)
    d = dist[_distinct_pairs(e.shape[0], e.device)]
    return d / d.mean().clamp_min(_EPS)


def _angles(e: Tensor) -> Tensor:
    """ψ_A of RKD: cos∠(e_i, e_j, e_k) = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩ over distinct triplets (flat)."""
    diff, dist = _differences(e)
    unit = diff / dist.unsqueeze(-1)  # unit[j, i] = (e_i − e_j) / ‖e_i − e_j‖ (0 where e_i = e_j)
    cos = unit @ unit.transpose(1, 2)  # cos[j, i, k]: apex j
    return cos[_distinct_triplets(e.shape[0], e.device)]


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD loss (unweighted): Huber between mean-normalised pairwise distances."""
    if student.shape[0] < 2:
        return student.new_zeros(())
    with torch.no_grad():
        t = _normalised_distances(teacher)
    return F.smooth_l1_loss(_normalised_distances(student), t)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD loss (unweighted): Huber between the cosines of the angles of all distinct triplets."""
    if student.shape[0] < 3:
        return student.new_zeros(())
    with torch.no_grad():
        t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), t)


@register
class RKD(Method):
    """Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge Distillation").

    On the pooled embeddings e (student s, teacher t; widths may differ), flattened, in float32:

    - distance-wise: ψ_D(e_i, e_j) = ‖e_i − e_j‖ / μ, with μ the mean distance over the distinct pairs
      i ≠ j of the batch (paper §3.2.1; the teacher's side computed without grad);
      ``rkd_distance`` = distance_weight · mean over i ≠ j of Huber(ψ_D(s_i, s_j), ψ_D(t_i, t_j));
    - angle-wise: ψ_A(e_i, e_j, e_k) = ⟨e^{ij}, e^{kj}⟩ with e^{ij} = (e_i − e_j)/‖e_i − e_j‖ (§3.2.2);
      ``rkd_angle`` = angle_weight · mean over pairwise distinct (i, j, k) of Huber(ψ_A(s), ψ_A(t)).

    Huber is the paper's l_δ with δ = 1 (``smooth_l1_loss``, β = 1). Both sums run over the paper's
    X² (i ≠ j) and X³ (distinct indices); they are averaged rather than summed, as in the reference
    code (github.com/lenscloth/RKD, metric/loss.py) whose weights assume a mean. That code averages
    over all B² pairs and B³ triplets, the degenerate ones contributing exactly zero, so its terms
    are smaller than these by (B−1)/B and (B−1)(B−2)/B² (1.6 % and 4.6 % at B = 64).

    Defaults: distance 25, angle 50, from RepDistiller (Tian et al. 2020, the CIFAR-100 benchmark
    code: ``RKDLoss(w_d=25, w_a=50)``, applied there to the penultimate embedding ``feat[-1]`` as
    here); cross-entropy weight 1 and no KD term (RepDistiller's ``-r 1 -a 0 -b 1`` for rkd; compose
    with ``kd`` for a KD term).
    """

    name = "rkd"
    family = "relations"
    mimics = "distances and angles between the teacher's embeddings of a batch"
    needs = frozenset({"logits", "pooled"})

    class Args(MethodArgs):
        distance_weight: float = Field(25.0, ge=0.0, description="weight of the distance-wise term")
        angle_weight: float = Field(50.0, ge=0.0, description="weight of the angle-wise term")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        es, et = s.pooled.float().flatten(1), t.pooled.float().flatten(1)
        zero = es.new_zeros(())
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "rkd_distance": a.distance_weight * rkd_distance(es, et) if a.distance_weight else zero,
            "rkd_angle": a.angle_weight * rkd_angle(es, et) if a.angle_weight else zero,
        }


def similarity_matrix(f: Tensor) -> Tensor:
    """SP's G: Q·Qᵀ for Q the (B × CHW) flattened map, each row of G then L2-normalised (B × B)."""
    q = f.float().flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1, eps=_EPS)


@register
class SP(Method):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation").

    On the last matched stage map of each model (shapes may differ; B the batch size):
    G = Q·Qᵀ with Q the map flattened to B × CHW, each row of G L2-normalised (paper §3: the rows of
    G, not of Q, as in RepDistiller's ``Similarity``); the teacher's G is computed without grad;
    ``sp`` = γ · ‖G_s − G_t‖_F² / B² (paper §3).

    The paper sums this over chosen layer pairs; RepDistiller (Tian et al. 2020) uses only the last
    stage map (``feat[-2]``, i.e. before pooling) for CIFAR-100, and so does kdcli. Defaults: γ = 3000
    and cross-entropy weight 1 with no KD term (RepDistiller's ``-r 1 -a 0 -b 3000`` for similarity).
    """

    name = "sp"
    family = "relations"
    mimics = "the teacher's pairwise similarities between the examples of a batch"
    needs = frozenset({"logits", "features"})

    class Args(MethodArgs):
        gamma: float = Field(3000.0, ge=0.0, description="weight γ of the similarity-preserving term")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        g_s = similarity_matrix(s.features[-1])
        with torch.no_grad():
            g_t = similarity_matrix(t.features[-1])
        b = g_s.shape[0]
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "sp": a.gamma * (g_s - g_t).pow(2).sum() / (b * b),
        }


# --------------------------------------------------------------------------------------------- PKT

_PKT_EPS = 1e-7  # RepDistiller / the authors' code: added to the norms and inside the log ratio


def _pkt_probabilities(e: Tensor) -> Tensor:
    """PKT's conditional probabilities: rows L2-normalised (‖e‖ + ε, NaN → 0), K = (cos + 1)/2, rows of K → 1."""
    e = e.float().flatten(1)
    u = e / (torch.linalg.vector_norm(e, dim=1, keepdim=True) + _PKT_EPS)
    u = torch.where(torch.isnan(u), torch.zeros_like(u), u)
    with torch.autocast(u.device.type, enabled=False):
        k = (u @ u.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """PKT divergence (unweighted): mean over all B² entries of P_t · log((P_t + ε) / (P_s + ε))."""
    with torch.no_grad():
        p_t = _pkt_probabilities(teacher)
    p_s = _pkt_probabilities(student)
    return (p_t * torch.log((p_t + _PKT_EPS) / (p_s + _PKT_EPS))).mean()


@register
class PKT(Method):
    """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018, "Learning Deep Representations with
    Probabilistic Knowledge Transfer").

    On the pooled embeddings (widths may differ; no trainable module), in float32: each row is divided by
    its L2 norm + ε (NaN set to 0), K = (cosine-similarity matrix + 1)/2 (the paper's cosine kernel, moved
    to [0, 1]), each row of K normalised to sum to 1, giving P_s and P_t (teacher without grad), and
    ``pkt`` = β · mean over all B² entries (i, j) of P_t log((P_t + ε)/(P_s + ε)), ε = 1e-7: the authors'
    code (github.com/passalis/probabilistic_kt) as RepDistiller (Tian et al. 2020) ships it in
    ``distiller_zoo/PKT.py``, applied there to the penultimate embedding ``feat[-1]`` as here.

    Defaults: β = 30000 with cross-entropy weight 1 and no KD term (RepDistiller's ``-r 1 -a 0 -b 30000``;
    mdistiller ``PKT.LOSS.FEAT_WEIGHT`` 30000 and torchdistill use the same weight). The weight assumes
    batch size 64 (RepDistiller's): the mean over all B² entries is (1/B) × the mean per-row KL divergence,
    so at another batch size B the term's strength changes by about 64/B; scale β by B/64 to keep it.
    """

    name = "pkt"
    family = "relations"
    mimics = "the teacher's probability distribution of cosine similarities between the examples of a batch"
    needs = frozenset({"logits", "pooled"})

    class Args(MethodArgs):
        beta: float = Field(30000.0, ge=0.0, description="weight of the PKT divergence (tuned for batch size 64)")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "pkt": a.beta * pkt_loss(s.pooled, t.pooled.detach()),
        }


# --------------------------------------------------------------------------------------------- CC


def correlation_congruence(e_s: Tensor, e_t: Tensor) -> Tensor:
    """RepDistiller's CC loss (unweighted): δ = |e_s − e_t|, mean over i < B−1 of Σ_d δ_{i,d} δ_{i+1,d}."""
    delta = (e_s.float() - e_t.float()).abs()
    if delta.shape[0] < 2:
        return delta.new_zeros(())
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register
class CC(Method):
    """Correlation Congruence (Peng et al., ICCV 2019, "Correlation Congruence for Knowledge Distillation"),
    in the form of the authors' code as RepDistiller (Tian et al. 2020) ships it.

    Both pooled embeddings go through a trainable linear map (with bias, no normalisation) to ``dim`` = 128
    dimensions, e_s = W_s f_s + b_s and e_t = W_t f_t + b_t (teacher features detached; W_t itself trains,
    as RepDistiller puts both ``embed_s`` and ``embed_t`` in its optimizer); then δ = |e_s − e_t| and
    ``cc`` = β · mean_{i=1..B−1} Σ_d δ_{i,d} · δ_{i+1,d}, a product of consecutive samples' differences
    (0 for a batch of one).

    Which of the two published forms: this is RepDistiller's consecutive-sample form
    (``distiller_zoo/CC.py``, "code emailed to me by the original author"), *not* the paper's form, in
    which each network's Gaussian-RBF correlation matrix over the batch (a Taylor expansion of the kernel
    on L2-normalised features) is matched, as KD-Zoo (``kd_losses/cc.py``) and torchdistill (``CCKDLoss``)
    implement it. kdcli follows RepDistiller because its CIFAR-100 numbers (the field's comparison table,
    the one the study's other defaults come from) and its weight were obtained with this form, and it is the
    code the authors themselves supplied. The embeddings are RepDistiller's ``LinearEmbed`` (models/util.py:
    a plain ``nn.Linear``), which ``train_student.py`` uses for ``correlation``; CRD's ``Embed`` is the one
    that L2-normalises, and it is not used here.

    Defaults: β = 0.02, cross-entropy weight 1, no KD term (RepDistiller's ``-r 1 -a 0 -b 0.02``), embedding
    width 128 (``--feat_dim``).
    """

    name = "cc"
    family = "relations"
    mimics = "the teacher's correlations between consecutive examples of a batch, through learned embeddings"
    needs = frozenset({"logits", "pooled"})

    class Args(MethodArgs):
        beta: float = Field(0.02, ge=0.0, description="weight of the correlation-congruence term")
        dim: int = Field(128, ge=1, description="width of the trainable linear embeddings of both models")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        if student is None or teacher is None or not student.pooled or not teacher.pooled:
            raise ValueError("cc needs the pooled embedding widths of both the student and the teacher")
        self.embed_s = nn.Linear(student.pooled, self.args.dim)
        self.embed_t = nn.Linear(teacher.pooled, self.args.dim)

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        f_s, f_t = s.pooled.float().flatten(1), t.pooled.detach().float().flatten(1)
        with torch.autocast(f_s.device.type, enabled=False):  # float32 embeddings whatever the precision
            e_s, e_t = self.embed_s(f_s), self.embed_t(f_t)
        return {
            "ce": a.ce_weight * F.cross_entropy(s.logits.float(), target),
            "cc": a.beta * correlation_congruence(e_s, e_t),
        }
