"""Evaluation: top-1/top-5, NLL, ECE, per-class top-1, balanced top-1, and agreement with a teacher
(torchmetrics); and the long-tail literature's many/medium/few-shot top-1 from the training class counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kdcli.engine.report import Metrics
from kdcli.methods.base import kl_div


class Evaluator:
    """Accumulates one pass over an evaluation split; ``compute()`` gives a :class:`Metrics`.

    Every process is given every row (the session gathers them, each row once), so the metrics compute from
    their own state: torchmetrics' own sync would count each row once per process, and gathers CPU tensors,
    which an NCCL-only process group cannot."""

    def __init__(self, num_classes: int, class_names: list[str], with_teacher: bool):
        self.class_names = class_names
        self.top5 = num_classes > 5
        local = {"sync_on_compute": False}
        metrics = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", **local),
            "per_class": MulticlassAccuracy(num_classes, top_k=1, average="none", **local),
        }
        if self.top5:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", **local)
        self.cls = MetricCollection(metrics)
        # given probabilities: on logits, torchmetrics applies the softmax only to a batch with a value outside
        # [0, 1], and takes a batch of small logits for probabilities
        self.ece = MulticlassCalibrationError(num_classes, n_bins=15, norm="l1", **local)
        self.support = torch.zeros(num_classes, dtype=torch.long)
        self.nll = MeanMetric(**local)
        self.agree = MeanMetric(**local) if with_teacher else None
        self.kl = MeanMetric(**local) if with_teacher else None
        self.teacher_top1 = MeanMetric(**local) if with_teacher else None

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        logits, target = logits.float().cpu(), target.cpu()
        n = target.numel()
        self.cls.update(logits, target)
        self.ece.update(logits.softmax(1), target)
        self.support += torch.bincount(target, minlength=self.support.numel())
        self.nll.update(F.cross_entropy(logits, target), weight=n)
        if self.agree is not None and teacher_logits is not None:
            t = teacher_logits.float().cpu()
            self.agree.update((logits.argmax(1) == t.argmax(1)).float().mean(), weight=n)
            self.kl.update(kl_div(logits, t), weight=n)
            self.teacher_top1.update((t.argmax(1) == target).float().mean(), weight=n)

    def compute(self) -> Metrics:
        r = self.cls.compute()
        accs = [float(acc) if self.support[i] > 0 else None for i, acc in enumerate(r["per_class"])]
        per_class = dict(zip(self.class_names, accs, strict=True))
        return Metrics(
            num_examples=int(self.support.sum()),
            top1=float(r["top1"]),
            top5=float(r["top5"]) if self.top5 else None,
            nll=float(self.nll.compute()),
            ece=float(self.ece.compute()),
            per_class_top1=per_class,
            balanced_top1=balanced_top1(accs),
            teacher_agreement=float(self.agree.compute()) if self.agree is not None else None,
            teacher_kl=float(self.kl.compute()) if self.kl is not None else None,
            teacher_top1=float(self.teacher_top1.compute()) if self.teacher_top1 is not None else None,
        )


# Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an Open World": many-shot classes have more than 100
# training images, few-shot classes fewer than 20, medium-shot ones 20 to 100
MANY_SHOT, FEW_SHOT = 100, 20


def balanced_top1(per_class: Sequence[float | None]) -> float | None:
    """The mean per-class recall over the classes present in the evaluation split (None: absent)."""
    present = [acc for acc in per_class if acc is not None]
    return sum(present) / len(present) if present else None


def shot_group(count: int) -> str:
    return "many" if count > MANY_SHOT else "few" if count < FEW_SHOT else "medium"


def shot_top1(per_class: Sequence[float | None], train_counts: Sequence[int]) -> dict[str, float | None]:
    """Many/medium/few-shot top-1: the mean per-class top-1 of each group of classes, grouped by how many
    training images they had (:func:`shot_group`); classes absent from the evaluation split are left out, and
    a group with no class left is None."""
    if len(per_class) != len(train_counts):
        raise ValueError(f"{len(per_class)} per-class results for {len(train_counts)} class counts")
    groups: dict[str, list[float]] = {"many": [], "medium": [], "few": []}
    for acc, count in zip(per_class, train_counts, strict=True):
        if acc is not None:
            groups[shot_group(int(count))].append(acc)
    return {name: (sum(accs) / len(accs) if accs else None) for name, accs in groups.items()}


def train_class_counts(labels: np.ndarray | None, num_classes: int) -> list[int] | None:
    """Training images per class from labels by row (``DataBundle.train_labels(clean=True)``: the true labels of
    the rows trained on, -1 for the others); None when they are not known (streaming)."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0], minlength=num_classes).astype(int).tolist()


def with_shots(metrics: Metrics | None, counts: list[int] | None) -> Metrics | None:
    """``metrics`` with ``shot_top1`` filled from the training class counts (unchanged when they are unknown)."""
    if metrics is None or counts is None or len(metrics.per_class_top1) != len(counts):
        return metrics
    return metrics.model_copy(update={"shot_top1": shot_top1(list(metrics.per_class_top1.values()), counts)})
