"""The training recipe, through timm: optimizer, learning-rate schedule, mixup/cutmix/label smoothing, EMA.

The default recipe is the field's CIFAR recipe and gives the numbers kdcli gave before these options existed:
plain momentum SGD (timm's ``momentum``: no Nesterov) with weight decay on every parameter, a cosine schedule
evaluated once per epoch, hard labels.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcli.config import RunConfig
from kdcli.errors import KdcliError

# The step schedule of the field's CIFAR recipe (RepDistiller: ×0.1 after epochs 150, 180, 210 of 240).
STEP_MILESTONES = (0.625, 0.75, 0.875)


def step_milestones(epochs: int) -> list[int]:
    """Epochs (1-based) after which ``--sched step`` decays: round(f · epochs) for f of 62.5 %, 75 %, 87.5 %."""
    return [round(f * epochs) for f in STEP_MILESTONES]


def make_optimizer(cfg: RunConfig, modules: dict[str, nn.Module]) -> torch.optim.Optimizer:
    """One timm optimizer over every trained module (the student, the method's own modules, an online peer).

    ``--no-decay-norm-bias`` puts 1-d parameters (norm weights, biases) and each network's own
    ``no_weight_decay()`` names (a ViT's position embedding, class token) in a group without weight decay,
    timm's ``param_groups_weight_decay``; otherwise every parameter is decayed, as the field's recipe does.
    """
    from timm.optim import create_optimizer_v2, list_optimizers, param_groups_weight_decay

    wrapper = nn.ModuleDict(modules)
    if cfg.no_decay_norm_bias and cfg.weight_decay:
        skip: set[str] = set()
        for key, module in modules.items():
            for prefix, net in ((f"{key}.", module), (f"{key}.net.", getattr(module, "net", None))):
                if net is not None and hasattr(net, "no_weight_decay"):
                    skip |= {prefix + name for name in net.no_weight_decay()}
        params = param_groups_weight_decay(wrapper, weight_decay=cfg.weight_decay, no_weight_decay_list=skip)
    else:
        params = [p for p in wrapper.parameters() if p.requires_grad]
    try:
        return create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    except (AssertionError, ValueError, ImportError, KeyError) as e:
        known = [n for n in ("momentum", "sgd", "adamw", "adam", "lamb", "lion", "rmsproptf", "adan", "nadamw")
                 if n == "momentum" or n in list_optimizers()]
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KdcliError(f"--opt {cfg.opt}: timm cannot create it ({why}); e.g. {', '.join(known)} "
                         "(timm.optim.list_optimizers() lists all)") from None


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler for the main epochs (``create_scheduler_v2``), stepped by the loop at each epoch's start
    (``step(epoch)``) or, with ``--sched-on-updates``, before every optimizer update (``step_update(n)``).

    ``step`` and ``multistep`` take the epochs *after which* the lr decays (RepDistiller's convention: decayed
    from the 151st of 240 epochs); timm's multistep applies a milestone m from 0-based epoch m − 1, so kdcli
    hands it m + 1."""
    from timm.scheduler import create_scheduler_v2

    sched, milestones = cfg.schedule, None
    if sched in ("step", "multistep"):
        milestones = step_milestones(cfg.epochs) if sched == "step" else sorted(cfg.decay_milestones)
        milestones = [m + 1 for m in milestones]
        sched = "multistep"
    if cfg.sched_on_updates and milestones:
        milestones = [m * updates_per_epoch for m in milestones]  # timm counts updates then
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=cfg.epochs, decay_milestones=milestones or (), decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler


def set_lr(cfg: RunConfig, scheduler, optimizer, epoch: int, update: int, updates_per_epoch: int) -> float:
    """Set the lr for main-stage ``epoch`` (0-based) before its ``update``-th optimizer update; returns it.

    A pure function of the position, so a resumed run sets exactly what the uninterrupted one did."""
    if cfg.sched_on_updates:
        scheduler.step_update(epoch * updates_per_epoch + update)
    else:
        scheduler.step(epoch)
    return float(optimizer.param_groups[0]["lr"])


class Mixer:
    """Soft training targets through timm: mixup and cutmix (``timm.data.Mixup``: the images themselves are
    mixed, before the teacher's forward, so teacher and student see the same image, as Beyer et al.'s
    "consistent" teaching asks) and label smoothing (``timm.data.mixup.mixup_target``). Mixup's label smoothing
    is kdcli's ``--label-smoothing`` (default 0), not timm's default of 0.1.

    timm's Mixup needs an even batch: an odd one (the last batch of an epoch, unreadable images dropped) is
    mixed without its last example, which keeps its own (smoothed) label. Draws come from numpy's global
    RNG, which the loop seeds per epoch and saves with the resume state.
    """

    def __init__(self, cfg: RunConfig, num_classes: int):
        from timm.data import Mixup

        self.num_classes, self.smoothing = num_classes, cfg.label_smoothing
        self.mixup = None
        if cfg.mixup or cfg.cutmix:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        from timm.data.mixup import mixup_target

        return mixup_target(labels, self.num_classes, smoothing=self.smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None or len(images) < 2:
            return images, self.one_hot(labels)
        even = len(images) - len(images) % 2
        if even == len(images):
            return self.mixup(images, labels)
        mixed, soft = self.mixup(images[:even], labels[:even])
        return torch.cat([mixed, images[even:]]), torch.cat([soft, self.one_hot(labels[even:])])


def check_compile(device: torch.device) -> None:
    """``--compile`` needs a working ``torch.compile`` here (on CPU, inductor needs a C++ compiler): a tiny
    function is compiled and run once, and a failure is one line."""
    try:
        fn = torch.compile(lambda x: x * 2 + 1)
        fn(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001  (any backend failure means: not available here)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdcliError(f"--compile is not available on this machine ({first}); run without --compile") from None
