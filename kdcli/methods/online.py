"""Online methods: no fixed teacher; the "teacher" is a peer that trains alongside the student."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from kdcli.methods.base import Method, MethodArgs, Outputs, kl_div, register


@register
class DML(Method):
    """Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning").

    Two networks learn together, each from the labels and from the other's predictions; kdcli's
    "teacher" is the peer (any architecture; fresh weights are fine, that is the paper's setting).
    With p = softmax(logits / T), in float32:

    - student: ``ce`` = ce_weight · CE(s, y), ``kl`` = kl_weight · T² · KL(p_t ‖ p_s) with p_t detached;
    - peer:    ``peer_ce`` = ce_weight · CE(t, y), ``peer_kl`` = kl_weight · T² · KL(p_s ‖ p_t) with p_s
      detached.

    The detaches make each KL move only the network it is the loss of (paper §3.1: L_Θ1 =
    L_C1 + D_KL(p2 ‖ p1), L_Θ2 = L_C2 + D_KL(p1 ‖ p2)), so the loop can sum all four terms and run a
    single backward: the student's parameters get the gradient of ``ce + kl``, the peer's that of
    ``peer_ce + peer_kl``. Defaults: T = 1 and weight 1 for every term, the paper's plain sum (it has
    no temperature and no weights); T² is 1 then and only keeps a chosen T on the scale of Hinton's KD.

    Updates: the paper's Algorithm 1 alternates within an iteration (step Θ1, recompute both
    predictions, step Θ2). Since ``online`` is set, kdcli's loop instead steps both networks at once
    (SGD with per-parameter state, so the same as one optimizer each) from one forward pass of each:
    the peer's targets come from the student before its step rather than after. That saves a second
    forward pass of the student per batch, differs from the paper only by one step of staleness in
    one direction, and is a common variant of re-implementations (simultaneous update of both).
    """

    name = "dml"
    family = "online"
    mimics = "a peer trained alongside it, each matching the other's predictions"
    needs = frozenset({"logits"})
    online = True
    teachers = "no"
    stages_note = "online: the teacher is a peer, trained alongside the student"

    class Args(MethodArgs):
        T: float = Field(1.0, gt=0.0, description="softmax temperature of the mutual KL terms")
        kl_weight: float = Field(1.0, ge=0.0, description="weight λ of each network's T²-scaled KL to the other")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of each network's hard-label cross-entropy")

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        ls, lt = s.logits.float(), t.logits.float()
        scale = a.kl_weight * a.T**2
        return {
            "ce": a.ce_weight * F.cross_entropy(ls, target),
            "kl": scale * kl_div(ls, lt.detach(), a.T),
            "peer_ce": a.ce_weight * F.cross_entropy(lt, target),
            "peer_kl": scale * kl_div(lt, ls.detach(), a.T),
        }
