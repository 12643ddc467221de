"""Per-example image transforms: PIL image -> float32 tensor (C, S, S) in [0, 1], never normalised.

Models normalise their inputs themselves. Random augmentation is a pure function of (seed, epoch, the
example's original index), so an example gets the same augmentation whichever DataLoader worker reads it,
in whatever batch order, on resume too:

* ``cifar`` (alias ``crop-flip``) and ``crop``: kdcli's own pad-crop (and flip), drawn with
  :func:`augment_draws`, without touching any global RNG (the fast path);
* ``imagenet`` (random-resized crop + horizontal flip) and ``randaugment`` (the same, then timm's
  ``rand-m9-mstd0.5-inc1``): timm's ``create_transform`` pipeline, whose draws come from Python's
  ``random``, NumPy's and torch's global RNGs. Each example's transform runs with those three seeded from
  :func:`augment_seed` (a hash of seed, epoch and index), and their previous states are restored afterwards
  (see :func:`seeded_global_rngs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import struct

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcli.errors import KdcliError

RECIPES = ("cifar", "crop", "imagenet", "randaugment", "none")
ALIASES = {"crop-flip": "cifar"}
AUGMENTS = ("auto", *RECIPES, *ALIASES)
TIMM_RECIPES = ("imagenet", "randaugment")
AUTO_CIFAR_MAX_SIZE = 64  # auto: cifar for images this size or smaller, imagenet above
RANDAUGMENT = "rand-m9-mstd0.5-inc1"
RRC_SCALE = (0.08, 1.0)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
_TENSOR_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                 "nearest": InterpolationMode.NEAREST}  # resized as float tensors; the others as PIL images

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}


def channels_for_mode(mode: str) -> int:
    """1 for grayscale PIL modes (``1``, ``L``, ``LA``, ``I``, ``I;16``..., ``F``), else 3."""
    return 1 if mode in _GRAY_MODES or mode.startswith("I;") else 3


def check_augment(augment: str) -> str:
    """``augment`` validated, with an alias replaced by its recipe (``crop-flip`` -> ``cifar``)."""
    if augment not in AUGMENTS:
        raise KdcliError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTS)}")
    return ALIASES.get(augment, augment)


def resolve_augment(augment: str, image_size: int, default: str | None = None) -> str:
    """The recipe ``augment`` means for images of ``image_size`` pixels: ``auto`` is the data's own
    ``default`` when it has one (built-ins), else ``cifar`` up to :data:`AUTO_CIFAR_MAX_SIZE` px and
    ``imagenet`` above."""
    augment = check_augment(augment)
    if augment != "auto":
        return augment
    if default is not None:
        return check_augment(default)
    return "cifar" if image_size <= AUTO_CIFAR_MAX_SIZE else "imagenet"


def check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise KdcliError(f"unknown interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    return interpolation


_MASK64 = (1 << 64) - 1
_KEY = struct.Struct("<QQQ")
_TO_UNIT = 2.0**-53
_PERSON = b"kdcli-augment"
_SEED_PERSON = b"kdcli-rng-seed"


def augment_draws(seed: int, epoch: int, index: int) -> tuple[float, float, float]:
    """Three uniforms in [0, 1) for one example's augmentation: a pure function of (seed, epoch, index).

    BLAKE2b of the three integers (64-bit two's complement, little endian): platform independent, and
    about 1 microsecond in CPython, cheaper than the three draws from torch's global RNG it replaces.
    """
    digest = hashlib.blake2b(_KEY.pack(seed & _MASK64, epoch & _MASK64, index & _MASK64), digest_size=24,
                             person=_PERSON).digest()
    a, b, c = _KEY.unpack(digest)
    return (a >> 11) * _TO_UNIT, (b >> 11) * _TO_UNIT, (c >> 11) * _TO_UNIT


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one example's timm transform: a pure function of (seed, epoch, index), independent
    of :func:`augment_draws` (another BLAKE2b personalisation)."""
    digest = hashlib.blake2b(_KEY.pack(seed & _MASK64, epoch & _MASK64, index & _MASK64), digest_size=8,
                             person=_SEED_PERSON).digest()
    return int.from_bytes(digest, "little")


@contextlib.contextmanager
def seeded_global_rngs(key: int, numpy: bool = True):
    """Python's ``random``, torch's default CPU generator and (``numpy``) NumPy's global RNG seeded from
    ``key`` (64 bits) inside the block, and put back as they were when it ends (also on an exception).

    Only the CPU generator is touched (``torch.manual_seed`` would also reseed every CUDA device's). NumPy's
    state is the costly one to save and restore (about 70 us of the block's 85): leave it out (``numpy=False``)
    for code that does not draw from it."""
    generator = torch.default_generator
    saved_random, saved_torch = random.getstate(), generator.get_state()
    saved_numpy = np.random.get_state() if numpy else None
    try:
        random.seed(key)
        generator.manual_seed(key)
        if numpy:
            np.random.seed((key & 0xFFFFFFFF, key >> 32))
        yield
    finally:
        random.setstate(saved_random)
        generator.set_state(saved_torch)
        if numpy:
            np.random.set_state(saved_numpy)


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


def _posterize(image, bits_to_keep, **_):
    """timm's ``posterize`` op, for any Pillow: keeping 0 bits gives a black image (as Pillow < 11 did; newer
    ones raise), which ``rand-m9-mstd0.5-inc1`` asks for when its magnitude draw comes near 10."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class _Convert:
    """Picklable PIL mode conversion, a step of a timm pipeline (1-channel data through RandAugment)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"Convert({self.mode!r})"


def timm_pipeline(recipe: str, in_chans: int, image_size: int, interpolation: str = "bilinear"):
    """timm's training pipeline for ``recipe`` (``imagenet`` or ``randaugment``): PIL image (``L`` or
    ``RGB``) -> float tensor (in_chans, S, S) in [0, 1].

    ``create_transform(is_training=True)`` with the random-resized crop's default scale (0.08, 1), a
    horizontal flip (0.5), no colour jitter, and ``rand-m9-mstd0.5-inc1`` for ``randaugment`` (its fill
    colour is timm's default, the ImageNet mean); the ``Normalize`` step is left out (kdcli models normalise
    their own input). RandAugment works on RGB: 1-channel images are converted to RGB for the pipeline and
    back to ``L`` before the tensor conversion (a grey image stays grey through it). Posterize keeps working
    with Pillow >= 11 (see :func:`_posterize`)."""
    from timm.data import create_transform
    from torchvision import transforms

    if recipe not in TIMM_RECIPES:
        raise ValueError(f"not a timm recipe: {recipe!r}")
    pipeline = create_transform(image_size, is_training=True, scale=RRC_SCALE, hflip=0.5, color_jitter=None,
                                auto_augment=RANDAUGMENT if recipe == "randaugment" else None,
                                interpolation=interpolation)
    steps = [step for step in pipeline.transforms if not isinstance(step, transforms.Normalize)]
    for step in steps:
        for op in getattr(step, "ops", ()):  # RandAugment's ops
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
    if recipe == "randaugment" and in_chans == 1:
        last = next(i for i, step in enumerate(steps) if "ToTensor" in type(step).__name__)
        steps = [_Convert("RGB"), *steps[:last], _Convert("L"), *steps[last:]]
    return transforms.Compose(steps)


class ImageTransform:
    """Picklable callable: PIL image -> float32 tensor (in_chans, size, size) in [0, 1].

    Evaluation (``train=False``): the shorter side resized to ``floor(size / crop_pct)`` with
    ``interpolation`` (unless it is that size already), then a centre crop to ``size`` (timm's convention;
    with ``crop_pct`` 1 an image of the right size goes through untouched).

    Training, by recipe: ``"cifar"``: shorter side resized to ``size`` if needed, random crop with zero
    padding ``max(1, size // 8)`` and a random horizontal flip (probability 0.5); ``"crop"``: the same
    without flip; ``"none"``: shorter side to ``size`` and a centre crop. The crop offsets (uniform over
    every offset) and the flip are a pure function of (``seed``, :attr:`epoch`, ``index``): see
    :func:`augment_draws`. ``"imagenet"`` / ``"randaugment"``: :func:`timm_pipeline` run under
    :func:`seeded_global_rngs` with :func:`augment_seed`, so again a pure function of (seed, epoch, index).
    :attr:`epoch` lives in shared memory, so :meth:`set_epoch` reaches DataLoader workers that already exist
    (persistent workers) as well as those started later.

    The tensor steps are torchvision ``transforms.v2`` functional kernels (``to_image``, ``to_dtype``,
    ``resize``, ``center_crop``, ``pad``, ``crop``, ``horizontal_flip``): the same operations as the v2
    transform classes, without their per-call overhead, which dominates on small images. Bilinear, bicubic
    and nearest resizing happen on float tensors (antialiased; bicubic clamped to [0, 1]), the other
    interpolations on the PIL image.
    """

    def __init__(self, in_chans: int, image_size: int, augment: str = "none", train: bool = False,
                 seed: int = 0, epoch: int = 0, interpolation: str = "bilinear", crop_pct: float = 1.0):
        if augment == "auto":
            raise ValueError("resolve augment='auto' to a recipe (resolve_augment) before building the transform")
        augment = check_augment(augment)
        check_interpolation(interpolation)
        if not crop_pct > 0 or not math.isfinite(crop_pct):
            raise ValueError(f"crop_pct must be a positive number, got {crop_pct}")
        self.in_chans = in_chans
        self.image_size = image_size
        self.train = bool(train)
        self.augment = augment if train else "none"
        self.padding = max(1, image_size // 8)
        self.seed = int(seed)
        self.interpolation = interpolation
        self.crop_pct = float(crop_pct)
        # evaluation resizes to this before its centre crop; training crops at image_size
        self.resize_size = math.floor(image_size / self.crop_pct) if not self.train else image_size
        self._pipeline = None  # the timm pipeline, built on first use (in each worker)
        # a shared-memory scalar (as datasets does for its own epoch) only where augmentation uses it
        self._epoch = torch.tensor(int(epoch), dtype=torch.int64).share_memory_() if self.augment != "none" else None

    @property
    def epoch(self) -> int:
        return 0 if self._epoch is None else int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next draws use (in place: DataLoader workers see it too)."""
        if self._epoch is not None:
            self._epoch.fill_(int(epoch))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pipeline"] = None  # rebuilt where it is used
        return state

    def _resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        x = F.resize(x, [size], interpolation=_TENSOR_MODES[self.interpolation], antialias=True)
        return x.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else x

    def __call__(self, image, index: int = 0, epoch: int | None = None) -> torch.Tensor:
        """``image`` (PIL) as a tensor; ``index`` (the example's original row) and ``epoch`` (default: the
        current one) pick its augmentation when training."""
        epoch = self.epoch if epoch is None else epoch
        image = to_mode(image, self.in_chans)
        if self.augment in TIMM_RECIPES:
            if self._pipeline is None:
                self._pipeline = timm_pipeline(self.augment, self.in_chans, self.image_size, self.interpolation)
            # RandAugment picks its ops with NumPy's global RNG; the crop and flip use random and torch only
            with seeded_global_rngs(augment_seed(self.seed, epoch, index), numpy=self.augment == "randaugment"):
                x = self._pipeline(image)
            return x.contiguous()
        size, scale = self.image_size, self.resize_size
        width, height = image.size
        pil_resize = min(height, width) != scale and self.interpolation not in _TENSOR_MODES
        if pil_resize:
            image = F.resize(image, [scale], interpolation=InterpolationMode(self.interpolation))
        x = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        x = x.as_subclass(torch.Tensor)
        if min(height, width) != scale and not pil_resize:
            x = self._resize(x, scale)  # shorter side to scale
        if self.augment == "none":
            if tuple(x.shape[-2:]) != (size, size):
                x = F.center_crop(x, [size, size])
        else:
            u_top, u_left, u_flip = augment_draws(self.seed, epoch, index)
            x = F.pad(x, [self.padding])
            top = int(u_top * (x.shape[-2] - size + 1))  # uniform over the offsets 0..H+2p-S
            left = int(u_left * (x.shape[-1] - size + 1))
            x = F.crop(x, top, left, size, size)
            if self.augment == "cifar" and u_flip < 0.5:
                x = F.horizontal_flip(x)
        return x.contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(in_chans={self.in_chans}, image_size={self.image_size}, augment={self.augment!r}, "
                f"train={self.train}, interpolation={self.interpolation!r}, crop_pct={self.crop_pct}, "
                f"seed={self.seed}, epoch={self.epoch})")
