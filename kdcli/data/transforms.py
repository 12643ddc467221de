"""Per-example image transforms: PIL image -> float32 tensor (C, S, S) in [0, 1], never normalised.

Models normalise their inputs themselves. Random augmentation is a pure function of (seed, epoch, the
example's original index): see :func:`augment_draws`. It never touches torch's global RNG, so an example
gets the same crop and flip whichever DataLoader worker reads it, in whatever batch order, on resume too.
"""

from __future__ import annotations

import hashlib
import struct

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


_MASK64 = (1 << 64) - 1
_KEY = struct.Struct("<QQQ")
_TO_UNIT = 2.0**-53
_PERSON = b"kdcli-augment"


def augment_draws(seed: int, epoch: int, index: int) -> tuple[float, float, float]:
    """Three uniforms in [0, 1) for one example's augmentation: a pure function of (seed, epoch, index).

    BLAKE2b of the three integers (64-bit two's complement, little endian): platform independent, and
    about 1 microsecond in CPython, cheaper than the three draws from torch's global RNG it replaces.
    """
    digest = hashlib.blake2b(_KEY.pack(seed & _MASK64, epoch & _MASK64, index & _MASK64), digest_size=24,
                             person=_PERSON).digest()
    a, b, c = _KEY.unpack(digest)
    return (a >> 11) * _TO_UNIT, (b >> 11) * _TO_UNIT, (c >> 11) * _TO_UNIT


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
    horizontal flip (probability 0.5); ``"none"``: nothing. The crop offsets (uniform over every offset)
    and the flip of an example are a pure function of (``seed``, :attr:`epoch`, its original ``index``):
    see :func:`augment_draws`. :attr:`epoch` lives in shared memory, so :meth:`set_epoch` reaches DataLoader
    workers that already exist (persistent workers) as well as those started later.

    The steps are torchvision ``transforms.v2`` functional kernels (``to_image``, ``to_dtype``, ``resize``,
    ``center_crop``, ``pad``, ``crop``, ``horizontal_flip``): the same operations as the v2 transform
    classes, without their per-call overhead, which dominates on small images.
    """

    def __init__(self, in_chans: int, image_size: int, augment: str = "none", train: bool = False,
                 seed: int = 0, epoch: int = 0):
        if augment == "auto":
            raise ValueError("resolve augment='auto' to the dataset's default before building the transform")
        check_augment(augment)
        self.in_chans = in_chans
        self.image_size = image_size
        self.augment = augment if train else "none"
        self.padding = max(1, image_size // 8)
        self.seed = int(seed)
        # a shared-memory scalar (as datasets does for its own epoch) only where augmentation uses it
        self._epoch = torch.tensor(int(epoch), dtype=torch.int64).share_memory_() if self.augment != "none" else None

    @property
    def epoch(self) -> int:
        return 0 if self._epoch is None else int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next draws use (in place: DataLoader workers see it too)."""
        if self._epoch is not None:
            self._epoch.fill_(int(epoch))

    def __call__(self, image, index: int = 0, epoch: int | None = None) -> torch.Tensor:
        """``image`` (PIL) as a tensor; ``index`` (the example's original row) and ``epoch`` (default: the
        current one) pick its crop and flip when training."""
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
            u_top, u_left, u_flip = augment_draws(self.seed, self.epoch if epoch is None else epoch, index)
            x = F.pad(x, [self.padding])
            top = int(u_top * (x.shape[-2] - size + 1))  # uniform over the offsets 0..H+2p-S
            left = int(u_left * (x.shape[-1] - size + 1))
            x = F.crop(x, top, left, size, size)
            if self.augment == "crop-flip" and u_flip < 0.5:
                x = F.horizontal_flip(x)
        return x.contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(in_chans={self.in_chans}, image_size={self.image_size}, augment={self.augment!r}, "
                f"seed={self.seed}, epoch={self.epoch})")
