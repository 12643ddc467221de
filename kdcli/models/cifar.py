"""CIFAR-size ResNets and Wide ResNets of the distillation literature, registered in timm.

Importing this module registers fifteen entrypoints in timm's model registry, so that
``timm.create_model("cifar_resnet20", num_classes=10)`` and ``timm.list_models("cifar_*")`` work:

* ``cifar_resnet{8,14,20,26,32,44,56,110}``, ``cifar_resnet8x4``, ``cifar_resnet32x4``
* ``cifar_wrn_16_1``, ``cifar_wrn_16_2``, ``cifar_wrn_40_1``, ``cifar_wrn_40_2``, ``cifar_wrn_28_4``

Where the architectures come from:

* ResNet-d: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2 (the CIFAR-10
  networks): a 3x3 stem conv, three stages of n = (d - 2) / 6 basic blocks with widths 16, 32, 64 and
  strides 1, 2, 2, global average pooling and a linear classifier. As in the distillation benchmarks, a
  shape-changing shortcut is a 1x1 conv + BN (option B of the paper) rather than zero padding.
* ``x4`` variants (resnet8x4, resnet32x4): the wider teacher/student pair of the CIFAR-100 benchmark of
  Tian et al., "Contrastive Representation Distillation", ICLR 2020 (and its RepDistiller code base):
  stem width 32 and stage widths 64, 128, 256.
* WRN-d-k: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation basic blocks
  (BN-ReLU-conv3x3-BN-ReLU-conv3x3, no dropout here), n = (d - 4) / 6 blocks per group, a 16-channel stem
  conv, group widths 16k, 32k, 64k with strides 1, 2, 2, a final BN + ReLU before pooling. A shape-changing
  shortcut is a 1x1 conv applied to the pre-activated input, as in the authors' code.
* Initialisation: kaiming-normal (fan-out, ReLU) convs, BN weight 1 and bias 0, linear bias 0.

Parameter counts with 100 classes agree with the figures reported for the CRD benchmark: resnet8 0.08M
(83,892), resnet20 0.28M, resnet56 0.86M, resnet110 1.73M, resnet8x4 1.23M, resnet32x4 7.43M, wrn_16_2 0.70M,
wrn_40_1 0.57M, wrn_40_2 2.26M (wrn_28_4 5.9M).

The networks follow timm's model interface: ``num_classes``, ``num_features``, ``in_chans``,
``pretrained_cfg``/``default_cfg`` (CIFAR-100 mean/std, 32x32 input), ``feature_info``,
``forward_features``, ``forward_head``, ``forward_intermediates``, ``get_classifier`` and
``reset_classifier``. ``feature_info`` has four entries, shallow to deep: the stem output (index 0, module
``act1`` for ResNets, ``conv1`` for WRNs, reduction 1), then the three stages ``layer1``, ``layer2``,
``layer3`` (reductions 1, 2, 4). These are the indices ``forward_intermediates`` takes. For WRNs the last
intermediate is the raw ``layer3`` output unless ``norm=True`` applies the final BN + ReLU (the convention of
timm's pre-activation ResNetV2); the final features are always normalised.

No weights are published, but the entrypoints use timm's ``build_model_with_cfg``, so timm's pretrained
machinery loads trained ones: ``timm.create_model("local-dir:RUN_FOLDER", pretrained=True)`` (a finished kdcli
run folder holds ``config.json`` and ``model.safetensors``), or
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"))``. A kdcli
checkpoint given as ``file`` also supplies its classes, channels, input size and mean/std, unless the overlay
says otherwise. ``pretrained=True`` without a weights source raises ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["BasicBlock", "WideBlock", "CifarNet", "CIFAR_MEAN", "CIFAR_STD", "CIFAR_MODELS"]

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block of He et al.: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


class WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis: BN-ReLU-conv-BN-ReLU-conv plus the shortcut.

    When the shape changes, the shortcut is a 1x1 conv of the pre-activated input; otherwise it is the
    identity on the raw input.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class CifarNet(nn.Module):
    """Three-stage CIFAR network: stem, ``layer1..3``, (final norm), global average pool, ``fc``.

    Args:
        block: ``BasicBlock`` (post-activation ResNet) or ``WideBlock`` (pre-activation WRN).
        depth_per_stage: blocks in each of the three stages.
        widths: output channels of the three stages.
        stem_width: output channels of the stem conv.
        arch: registered name, recorded in ``pretrained_cfg["architecture"]``.
        num_classes: classifier outputs; 0 replaces the classifier with the identity.
        in_chans: input channels.
        drop_rate: dropout probability before the classifier.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[WideBlock],
        depth_per_stage: int,
        widths: tuple[int, int, int],
        stem_width: int = 16,
        arch: str = "",
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        preact = block is WideBlock
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # A pre-activation network leaves the stem un-normalised: the first block starts with BN-ReLU.
        self.conv1 = _conv3x3(in_chans, stem_width)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(stem_width)
        self.act1 = nn.Identity() if preact else nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="conv1" if preact else "act1")]

        in_chs, reduction = stem_width, 1
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
            blocks = [block(in_chs if j == 0 else width, width, stride if j == 0 else 1)
                      for j in range(depth_per_stage)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_chs, reduction = width, reduction * stride
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i}"))

        self.norm = nn.Sequential(nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

        mean = CIFAR_MEAN if in_chans == 3 else (round(sum(CIFAR_MEAN) / 3, 4),) * in_chans
        std = CIFAR_STD if in_chans == 3 else (round(sum(CIFAR_STD) / 3, 4),) * in_chans
        self.pretrained_cfg = self.default_cfg = {
            "architecture": arch,
            "input_size": (in_chans, 32, 32),
            "mean": mean,
            "std": std,
            "num_classes": num_classes,
            "first_conv": "conv1",
            "classifier": "fc",
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }
        self.pretrained_model_args: dict[str, Any] = {}

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map (B, num_features, H/4, W/4), after the final BN + ReLU for WRNs."""
        x = self._stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map to (B, num_features) and, unless ``pre_logits``, apply the classifier."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns intermediate feature maps, with timm's semantics.

        Args:
            x: input images (B, in_chans, H, W).
            indices: indices into ``feature_info`` (0 = stem, 1..3 = ``layer1..3``; negative counts from
                the end), an int n for the last n, or None for all.
            norm: apply the final norm (BN + ReLU, WRNs only) to the ``layer3`` intermediate.
            stop_early: stop after the deepest requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of intermediates.

        Returns:
            The intermediates (NCHW, shallow to deep), or ``(final_features, intermediates)`` where
            ``final_features`` equals ``forward_features(x)`` when the pass ran through ``layer3``.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_idx = len(self.feature_info) - 1
        intermediates = []

        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: identity)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"CIFAR nets only support average pooling, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.fc = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        if isinstance(self.fc, nn.Linear):
            nn.init.zeros_(self.fc.bias)


# name -> (block, blocks per stage, stage widths, stem width)
CIFAR_MODELS: dict[str, tuple[type[nn.Module], int, tuple[int, int, int], int]] = {
    **{
        f"cifar_resnet{d}": (BasicBlock, (d - 2) // 6, (16, 32, 64), 16)
        for d in (8, 14, 20, 26, 32, 44, 56, 110)
    },
    "cifar_resnet8x4": (BasicBlock, 1, (64, 128, 256), 32),
    "cifar_resnet32x4": (BasicBlock, 5, (64, 128, 256), 32),
    **{
        f"cifar_wrn_{d}_{k}": (WideBlock, (d - 4) // 6, (16 * k, 32 * k, 64 * k), 16)
        for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 4))
    },
}


def _channel_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel statistics for ``in_chans`` channels: as given, or their mean repeated."""
    values = tuple(values)
    return values if len(values) == in_chans else (round(sum(values) / len(values), 4),) * in_chans


def _cfg(first_conv: str, classifier: str, interpolation: str) -> dict[str, Any]:
    """The registered pretrained cfg: no weights source, CIFAR-100 input (32x32, its mean/std), 100 classes."""
    return dict(input_size=(3, 32, 32), fixed_input_size=False, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=100,
                first_conv=first_conv, classifier=classifier, interpolation=interpolation, crop_pct=1.0)


def _checkpoint_overlay(name: str, overlay: dict[str, Any] | None) -> dict[str, Any] | None:
    """A kdcli checkpoint named as the weights ``file`` describes itself: its classes, channels, input size,
    mean/std and class names become defaults of the overlay (so the net is built to fit the weights)."""
    file = (overlay or {}).get("file")
    if not file or not str(file).endswith(".safetensors") or not Path(file).is_file():
        return overlay
    from kdcli.errors import KdcliError
    from kdcli.models.checkpoint import read_meta

    try:
        meta = read_meta(Path(file))
    except KdcliError:  # plain safetensors weights: timm's own rules apply
        return overlay
    if meta.architecture != name:
        return overlay
    return {"num_classes": meta.num_classes, "input_size": (meta.in_chans, meta.input_size, meta.input_size),
            "mean": tuple(meta.mean), "std": tuple(meta.std), "label_names": tuple(meta.class_names), **overlay}


def _build(model_cls: Any, name: str, pretrained: bool, kwargs: dict[str, Any], **build_args: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the registered cfg (or the weights source's); the resulting cfg is
    then made to describe the net as built: its classes (source ``label_names`` dropped when they differ) and
    its input channels (``input_size``, and mean/std averaged over channels when their number differs)."""
    overlay = _checkpoint_overlay(name, kwargs.pop("pretrained_cfg_overlay", None))
    if pretrained:
        cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), overlay)
        if not (cfg.has_weights or cfg.state_dict):
            raise ValueError(
                f"No pretrained weights are published for {name}: train it with kdcli, then load the run folder "
                "with timm.create_model('local-dir:RUN_FOLDER', pretrained=True) or pass "
                "pretrained_cfg_overlay=dict(file='RUN_FOLDER/model.safetensors')")
    model = build_model_with_cfg(model_cls, name, pretrained, pretrained_cfg_overlay=overlay, **build_args, **kwargs)
    if not hasattr(model, "num_classes"):  # features_only: timm's feature wrapper, with timm's cfg
        return model
    cfg = dict(model.pretrained_cfg)
    if cfg.get("num_classes") != model.num_classes:
        cfg.pop("label_names", None)
        cfg["num_classes"] = model.num_classes
    chans = model.in_chans
    if cfg["input_size"][0] != chans:
        cfg.update(input_size=(chans, *cfg["input_size"][1:]), mean=_channel_stats(cfg["mean"], chans),
                   std=_channel_stats(cfg["std"], chans))
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> CifarNet:
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    block, depth, widths, stem = CIFAR_MODELS[name]
    model = _build(CifarNet, name, pretrained, kwargs, block=block, depth_per_stage=depth, widths=widths,
                   stem_width=stem, arch=name, feature_cfg=dict(out_indices=(0, 1, 2, 3)))
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _make_entrypoint(name: str):
    block, depth, widths, stem = CIFAR_MODELS[name]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CifarNet:
        return _create(name, pretrained, **kwargs)

    # timm registers an entrypoint under its __name__, in the module named by __module__.
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"{name}: CIFAR {block.__name__} network, {depth} block(s) per stage, "
        f"stem width {stem}, stage widths {widths}.\n\n"
        "Accepts ``num_classes`` (100), ``in_chans`` (3) and ``drop_rate`` (0.0); ``pretrained=True`` loads the "
        "weights named by ``pretrained_cfg_overlay=dict(file=...)`` or a ``local-dir:`` / ``hf-hub:`` source."
    )
    return entrypoint


default_cfgs = generate_default_cfgs({name: _cfg("conv1", "fc", "bilinear") for name in CIFAR_MODELS})

for _name in CIFAR_MODELS:
    globals()[_name] = register_model(_make_entrypoint(_name))
del _name


# ----------------------------------------------------------------------------- small ViTs for 32×32 inputs
# timm's ViTs are sized for 224×224 with 16×16 patches; on CIFAR-sized images the field uses 4×4 patches
# (e.g. 64 tokens at 32×32). These are plain timm VisionTransformers, so feature_info and
# forward_intermediates (tokens returned as NCHW maps) are timm's own. dynamic_img_size lets them run
# at other sizes too (digits: 8×8 → 2×2 tokens).
CIFAR_VITS: dict[str, dict[str, int]] = {
    "cifar_vit_micro_p4": {"embed_dim": 96, "depth": 4, "num_heads": 3},
    "cifar_vit_tiny_p4": {"embed_dim": 192, "depth": 6, "num_heads": 3},
}


def _make_vit_entrypoint(name: str):
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    def entrypoint(pretrained: bool = False, **kwargs: Any):
        kwargs = {"img_size": 32, "patch_size": 4, "mlp_ratio": 2.0, "dynamic_img_size": True, **CIFAR_VITS[name],
                  **kwargs}
        return _build(VisionTransformer, name, pretrained, kwargs, pretrained_filter_fn=checkpoint_filter_fn,
                      feature_cfg=dict(out_indices=3, feature_cls="getter"))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: timm VisionTransformer with 4×4 patches for 32×32 images, {CIFAR_VITS[name]}."
    return entrypoint


default_cfgs.update(generate_default_cfgs({name: _cfg("patch_embed.proj", "head", "bicubic") for name in CIFAR_VITS}))

for _name in CIFAR_VITS:
    globals()[_name] = register_model(_make_vit_entrypoint(_name))
del _name
