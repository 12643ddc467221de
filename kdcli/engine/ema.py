"""The student's exponential moving average (``--ema DECAY``), updated with one foreach kernel per step.

The same average as timm's ``ModelEmaV3`` (``ema ← lerp(ema, model, 1 − decay)`` over every floating-point
parameter and buffer of the state dict, integer buffers copied), without walking both state dicts at every step:
the pairs of tensors are listed once, since the optimizer and BatchNorm update them in place. timm's update cost
0.94–1.3 ms a step against 0.14–0.37 ms for this one (shared/reference/gpu-path.md, 2-core AMD EPYC).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """A frozen copy of ``model`` (``.module``, in eval mode) that :meth:`update` moves towards the model."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)
        self._pairs: tuple[list, list, list, list] | None = None
        self._source: int | None = None

    def _tensors(self, model: nn.Module) -> tuple[list, list, list, list]:
        if self._pairs is None or self._source != id(model):
            mine, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
            if list(mine) != list(theirs):
                raise ValueError("the EMA's model and the model it follows have different state dicts")
            floats = [(mine[k].data, theirs[k].data) for k in mine if mine[k].is_floating_point()]
            others = [(mine[k].data, theirs[k].data) for k in mine if not mine[k].is_floating_point()]
            self._pairs = ([e for e, _ in floats], [m for _, m in floats], [e for e, _ in others],
                           [m for _, m in others])
            self._source = id(model)
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_f, model_f, ema_i, model_i = self._tensors(model)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay)
        if ema_i:
            torch._foreach_copy_(ema_i, model_i)
