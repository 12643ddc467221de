"""Per-example image transforms: PIL image -> float32 tensor (C, S, S) in [0, 1], never normalised.

Models normalise their inputs themselves. Random augmentation draws from torch's global RNG (torchvision
transforms v2), so seeding torch at the start of an epoch makes it reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from kdcli.errors import KdcliError

AUGMENTS = ("auto", "crop-flip", "crop", "none")

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}


def channels_for_mode(mode: str) -> int:
    """1 for grayscale PIL modes (``1``, ``L``, ``LA``, ``I``, ``I;16``..., ``F``), else 3."""
    return 1 if mode in _GRAY_MODES or mode.startswith("I;") else 3


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise KdcliError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTS)}")
    return augment


def to_mode(image, in_chans: int):
    """A PIL image in mode ``L`` (``in_chans == 1``) or ``RGB``; 16-bit and float images are rescaled."""
    from PIL import Image

    mode = image.mode
    if in_chans == 1:
        if mode == "L":
            return image
        if mode.startswith("I") or mode == "F":
            array = np.asarray(image, dtype=np.float64)
            top = 1.0 if mode == "F" and array.max(initial=0.0) <= 1.0 else 255.0
            if mode.startswith("I;16") or (mode != "F" and array.max(initial=0.0) > 255):
                top = 65535.0
            scaled = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
            return Image.fromarray(scaled, mode="L")
        return image.convert("L")
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks for this for palette images with transparency
    if mode.startswith("I") or mode == "F":
        return to_mode(image, 1).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """Picklable callable: PIL image -> float32 tensor (in_chans, size, size) in [0, 1].

    Images that are not ``size`` x ``size`` are resized (shorter side to ``size``, antialiased) and then
    centre-cropped (evaluation) or randomly cropped (training). Augmentation for training:
    ``"crop"``: random crop with zero padding ``max(1, size // 8)``; ``"crop-flip"``: plus a random
    horizontal flip (probability 0.5); ``"none"``: nothing. Random draws use torch's global RNG.

    The steps are torchvision ``transforms.v2`` functional kernels (``to_image``, ``to_dtype``, ``resize``,
    ``center_crop``, ``pad``, ``crop``, ``horizontal_flip``): the same operations as the v2 transform
    classes, without their per-call overhead, which dominates on small images.
    """

    def __init__(self, in_chans: int, image_size: int, augment: str = "none", train: bool = False):
        if augment == "auto":
            raise ValueError("resolve augment='auto' to the dataset's default before building the transform")
        check_augment(augment)
        self.in_chans = in_chans
        self.image_size = image_size
        self.augment = augment if train else "none"
        self.padding = max(1, image_size // 8)

    def __call__(self, image) -> torch.Tensor:
        size = self.image_size
        x = F.to_dtype(F.to_image(to_mode(image, self.in_chans)), torch.float32, scale=True)
        x = x.as_subclass(torch.Tensor)
        height, width = x.shape[-2:]
        if (height, width) != (size, size):
            if min(height, width) != size:
                x = F.resize(x, [size], antialias=True)  # shorter side to size
            if self.augment == "none":
                x = F.center_crop(x, [size, size])
        if self.augment != "none":
            x = F.pad(x, [self.padding])
            top = int(torch.randint(0, x.shape[-2] - size + 1, (1,)))
            left = int(torch.randint(0, x.shape[-1] - size + 1, (1,)))
            x = F.crop(x, top, left, size, size)
            if self.augment == "crop-flip" and torch.rand(1).item() < 0.5:
                x = F.horizontal_flip(x)
        return x.contiguous()

    def __repr__(self) -> str:
        return f"ImageTransform(in_chans={self.in_chans}, image_size={self.image_size}, augment={self.augment!r})"
