"""Several teachers as one: an ensemble whose target is the mixture of its members' predictions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdcli.methods.base import Outputs, Shapes
from kdcli.models.classifier import Classifier

_LOGITS = frozenset({"logits"})


class Ensemble(nn.Module):
    """K teachers run on the same [0, 1] batch, each at its own input size and normalisation (a
    :class:`Classifier` each). ``forward`` returns :class:`Outputs` whose ``members`` are the per-teacher logits
    and whose ``logits`` are the ensemble's own prediction, log of the mean of the members' probabilities
    (what evaluation scores, and what a method that reads ``logits`` directly sees). Logit methods distill from
    the mixture at their own temperature (``methods.base.teacher_log_probs``). Features, pooled embeddings and
    pre-activations come from one member, the feature teacher (``--feature-teacher``), which alone is asked for
    more than logits.
    """

    def __init__(self, members: list[Classifier], feature: int = 0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.feature = feature

    @property
    def feature_model(self) -> Classifier:
        return self.members[self.feature]

    @property
    def meta(self):  # the feature teacher's, for code that asks one model's input facts
        return self.feature_model.meta

    @property
    def stages(self):
        return self.feature_model.stages

    def forward(self, x: Tensor, needs: frozenset[str] = _LOGITS) -> Outputs:
        outs = [m(x, needs if k == self.feature else _LOGITS) for k, m in enumerate(self.members)]
        logits = [o.logits for o in outs]
        log_p = torch.stack([torch.log_softmax(z.float(), dim=1) for z in logits])
        own = outs[self.feature]
        return Outputs(logits=torch.logsumexp(log_p, dim=0) - math.log(len(logits)), features=own.features,
                       pooled=own.pooled, preact=own.preact, members=logits)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.members)

    def num_stages(self) -> int:
        return self.feature_model.num_stages()

    def shapes(self, needs: frozenset[str], size: int | None = None) -> Shapes:
        return self.feature_model.shapes(needs, size)
