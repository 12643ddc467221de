"""Built-in offline datasets: ``digits`` (real handwritten digits) and ``synthetic[:SIZE[:CLASSES[:COUNT]]]``.

Both are made in-process as a :class:`datasets.DatasetDict` with an ``image`` column
(:class:`datasets.Image`) and a ``label`` column (:class:`datasets.ClassLabel`), so they go through the very
same code path as data from the hub or a local folder. Construction is cached per process.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kdcli.errors import KdcliError

BUILTIN_HELP = "digits, synthetic[:SIZE[:CLASSES[:COUNT]]]"

SYNTHETIC_DEFAULTS = (32, 10, 2000)  # SIZE, CLASSES, COUNT (train examples)
_SYNTHETIC_SEED = 20201012  # fixed: the synthetic set is the same everywhere, on every run


@dataclass(frozen=True)
class Builtin:
    """A built-in dataset: its splits, its normalisation statistics and its default augmentation."""

    splits: object  # datasets.DatasetDict with "train" and "test"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_augment: str  # the recipe augment="auto" means for it, at any size


def is_builtin(spec: str) -> bool:
    """Whether ``spec`` names a built-in dataset (it may still be malformed, e.g. ``synthetic:abc``)."""
    return spec == "digits" or spec == "synthetic" or spec.startswith("synthetic:")


def parse_synthetic(spec: str) -> tuple[int, int, int]:
    """``synthetic[:SIZE[:CLASSES[:COUNT]]]`` -> (size, classes, count), validated."""
    usage = (
        f"bad synthetic dataset spec {spec!r}: use synthetic[:SIZE[:CLASSES[:COUNT]]] with integers, "
        "e.g. synthetic:32:10:2000 (SIZE>=4, CLASSES>=2, COUNT>=CLASSES)"
    )
    if spec == "synthetic":
        return SYNTHETIC_DEFAULTS
    head, *parts = spec.split(":")
    if head != "synthetic" or not 1 <= len(parts) <= 3:
        raise KdcliError(usage)
    values = list(SYNTHETIC_DEFAULTS)
    for i, part in enumerate(parts):
        try:
            values[i] = int(part.strip())
        except ValueError:
            raise KdcliError(usage) from None
    size, classes, count = values
    if size < 4 or classes < 2 or count < classes:
        raise KdcliError(usage)
    return size, classes, count


def load_builtin(spec: str) -> Builtin:
    """The built-in dataset named by ``spec`` (see :func:`is_builtin`)."""
    if spec == "digits":
        return digits()
    return synthetic(*parse_synthetic(spec))


def _encode(images: np.ndarray) -> list[dict]:
    """uint8 arrays (N, H, W) or (N, H, W, 3) -> ``datasets.Image`` storage dicts (lossless BMP bytes).

    BMP is lossless and several times faster to write and read than PNG for small images; any format PIL
    reads is a valid ``datasets.Image`` payload.
    """
    from PIL import Image

    out = []
    for array in images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="BMP")
        out.append({"bytes": buffer.getvalue(), "path": None})
    return out


def _stats(train_images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = train_images.astype(np.float64) / 255.0
    if x.ndim == 3:  # grayscale (N, H, W)
        return (float(x.mean()),), (float(x.std()),)
    flat = x.reshape(-1, x.shape[-1])
    return tuple(float(v) for v in flat.mean(0)), tuple(float(v) for v in flat.std(0))


def _dataset_dict(splits: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": _encode(images), "label": labels.astype(np.int64).tolist()},
                features=features,
                split=split,
            )
            for split, (images, labels) in splits.items()
        }
    )


@lru_cache(maxsize=1)
def digits() -> Builtin:
    """scikit-learn's 1797 real 8x8 handwritten digits, stratified 80/20 into "train" and "test"."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    splits = {
        "train": (images[train_idx], labels[train_idx]),
        "test": (images[test_idx], labels[test_idx]),
    }
    mean, std = _stats(images[train_idx])
    # digits are not mirror-symmetric: no horizontal flip by default
    return Builtin(_dataset_dict(splits, [str(i) for i in range(10)]), mean, std, "crop")


def _interp(values: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation matrix (n, len) for a 1-D upsampling from ``len(values)`` samples to ``n``."""
    x = np.linspace(0, len(values) - 1, n)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, len(values) - 1)
    w = x - i0
    m = np.zeros((n, len(values)))
    m[np.arange(n), i0] += 1 - w
    m[np.arange(n), i1] += w
    return m


def _synthetic_class_params(size: int, classes: int, rng: np.random.Generator):
    """Per class: a plaid texture (orientation, spatial frequency) and two colours."""
    n_angles = math.ceil(math.sqrt(classes))
    n_freqs = math.ceil(classes / n_angles)
    angles = np.linspace(0.0, np.pi / 2, n_angles)
    f_max = size / 4.0  # cycles per image, well below Nyquist (size / 2)
    f_min = min(1.5, f_max / 2)
    freqs = np.geomspace(f_min, 0.8 * f_max, n_freqs) if n_freqs > 1 else np.array([2 * f_min])
    cells = rng.permutation(n_angles * n_freqs)[:classes]
    theta = angles[cells % n_angles]
    freq = freqs[cells // n_angles]
    colour_a = rng.uniform(0.1, 0.9, (classes, 3))
    colour_b = rng.uniform(0.1, 0.9, (classes, 3))
    return theta, freq, colour_a, colour_b


def _synthetic_images(
    n: int, size: int, params, rng: np.random.Generator, noise: float = 0.12, colour_jitter: float = 0.12
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled RGB uint8 images (N, S, S, 3), classes balanced and shuffled."""
    theta_k, freq_k, colour_a, colour_b = params
    classes = len(theta_k)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    chunk = max(1, (1 << 22) // (size * size * 3))  # bounds memory for large SIZE
    grid = np.arange(size, dtype=np.float32) / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, chunk):
        y = labels[start : start + chunk]
        m = len(y)
        theta = (theta_k[y] + rng.normal(0, 0.06, m)).astype(np.float32)
        freq = (freq_k[y] * rng.uniform(0.9, 1.1, m)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (2, m)).astype(np.float32)
        two_pi_f = (2 * np.pi * freq)[:, None, None]
        cos_t, sin_t = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        gx, gy = grid[None, None, :], grid[None, :, None]
        # a plaid of two gratings at +theta and -theta: a horizontal flip maps a class onto itself
        plaid = np.cos(two_pi_f * (gx * cos_t + gy * sin_t) + phase[0][:, None, None])
        plaid += np.cos(two_pi_f * (gx * cos_t - gy * sin_t) + phase[1][:, None, None])
        weight = (plaid * 0.25 + 0.5)[..., None]  # (m, S, S, 1) in [0, 1]
        col_a = (colour_a[y] + rng.normal(0, colour_jitter, (m, 3))).astype(np.float32)[:, None, None, :]
        col_b = (colour_b[y] + rng.normal(0, colour_jitter, (m, 3))).astype(np.float32)[:, None, None, :]
        x = col_a + (col_b - col_a) * weight
        x += rng.standard_normal(x.shape, dtype=np.float32) * noise
        images[start : start + m] = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@lru_cache(maxsize=8)
def synthetic(size: int, classes: int, count: int) -> Builtin:
    """Procedural, learnable, class-conditional RGB textures; deterministic.

    Each class is a plaid of two gratings (class-specific orientation and spatial frequency, random phase)
    blended between two class colours; each example jitters orientation, frequency and colours and adds
    Gaussian pixel noise. Colour alone makes a nearest-class-mean classifier on pixels clearly better than
    chance but far from perfect; the texture is what a CNN learns on top (a tiny CNN reaches ~70% on the
    default set after two epochs and ~90% after ten). "train" has ``count`` examples, "test"
    ``max(count // 5, classes)``.
    """
    # the task (class textures and colours) depends on SIZE and CLASSES only; COUNT draws the examples
    params = _synthetic_class_params(size, classes, np.random.default_rng([_SYNTHETIC_SEED, size, classes]))
    rng = np.random.default_rng([_SYNTHETIC_SEED, size, classes, count])
    train = _synthetic_images(count, size, params, rng)
    test = _synthetic_images(max(count // 5, classes), size, params, rng)
    mean, std = _stats(train[0])
    names = [f"class_{i}" for i in range(classes)]
    return Builtin(_dataset_dict({"train": train, "test": test}, names), mean, std, "cifar")
