"""Evaluation: top-1/top-5, NLL, ECE, per-class top-1, and agreement with a teacher (torchmetrics)."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kdcli.engine.report import Metrics
from kdcli.methods.base import kl_div


class Evaluator:
    """Accumulates one pass over an evaluation split; ``compute()`` gives a :class:`Metrics`."""

    def __init__(self, num_classes: int, class_names: list[str], with_teacher: bool):
        self.class_names = class_names
        self.top5 = num_classes > 5
        metrics = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "per_class": MulticlassAccuracy(num_classes, top_k=1, average="none"),
            "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
        }
        if self.top5:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.cls = MetricCollection(metrics)
        self.support = torch.zeros(num_classes, dtype=torch.long)
        self.nll = MeanMetric()
        self.agree = MeanMetric() if with_teacher else None
        self.kl = MeanMetric() if with_teacher else None
        self.teacher_top1 = MeanMetric() if with_teacher else None

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        logits, target = logits.float().cpu(), target.cpu()
        n = target.numel()
        self.cls.update(logits, target)
        self.support += torch.bincount(target, minlength=self.support.numel())
        self.nll.update(F.cross_entropy(logits, target), weight=n)
        if self.agree is not None and teacher_logits is not None:
            t = teacher_logits.float().cpu()
            self.agree.update((logits.argmax(1) == t.argmax(1)).float().mean(), weight=n)
            self.kl.update(kl_div(logits, t), weight=n)
            self.teacher_top1.update((t.argmax(1) == target).float().mean(), weight=n)

    def compute(self) -> Metrics:
        r = self.cls.compute()
        per_class = {name: (float(acc) if self.support[i] > 0 else None)
                     for i, (name, acc) in enumerate(zip(self.class_names, r["per_class"], strict=True))}
        return Metrics(
            num_examples=int(self.support.sum()),
            top1=float(r["top1"]),
            top5=float(r["top5"]) if self.top5 else None,
            nll=float(self.nll.compute()),
            ece=float(r["ece"]),
            per_class_top1=per_class,
            teacher_agreement=float(self.agree.compute()) if self.agree is not None else None,
            teacher_kl=float(self.kl.compute()) if self.kl is not None else None,
            teacher_top1=float(self.teacher_top1.compute()) if self.teacher_top1 is not None else None,
        )
