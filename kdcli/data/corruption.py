"""Label noise and class imbalance as pure functions of (seed, original index, label).

Nothing here touches images or datasets: every function takes numpy arrays of labels and of the examples'
original ``index`` (their row in the split, see :mod:`kdcli.data.bundle`), so the same code corrupts a whole
materialised split or one streamed example, and gives the same answer on any number of processes.

Randomness comes from :func:`uniform`, a counter-based hash (splitmix64 of seed, salt and index in numpy
``uint64`` arithmetic): the number drawn for an example depends on nothing but (seed, salt, index).

Noise (:func:`parse_noise`, :func:`noisy_labels`)
    ``symmetric:R``       flip with probability R to one of the *other* C-1 classes, uniformly.
    ``symmetric-incl:R``  with probability R draw uniformly from *all* C classes (so the realised rate is
                          R(C-1)/C).
    ``pairflip:R``        class i -> (i+1) mod C with probability R.
    ``asymmetric:R``      the CIFAR-10 map (truck->automobile, bird->airplane, deer->horse, cat<->dog) with
                          probability R; only for CIFAR-10's classes (its ten names in its order: the map is
                          by index, and on another 10-class set it would flip meaningless pairs), else
                          ``asymmetric:R:FILE`` with FILE a JSON object ``{"src": dst, ...}`` of class indices.
    ``matrix:FILE``       a C x C row-stochastic transition matrix (JSON list of lists, or CSV).

    Every kind is turned into its transition matrix T (``NoiseSpec.matrix``) and sampled the same way, with two
    hashed uniforms per example: the example changes class when ``u1 < 1 - T[c, c]`` and the new class is drawn
    from the off-diagonal part of row c with ``u2``. This is exactly T in distribution, and the flipped sets are
    nested: a higher rate of the same kind and seed flips a superset of the examples, to the same targets.
    (For ``symmetric-incl`` that means a "draw from all classes that happens to give the same class" is an
    example that is not flipped at all, which is indistinguishable.)

Imbalance (:func:`parse_imbalance`, :func:`keep_mask`)
    ``longtail:F``        exponential profile: the class at rank r (0 = head) keeps n_ref * F^(-r/(C-1)).
    ``step:RHO:MU``       the last ceil(MU*C) classes of the order (clamped to 1..C-1) are minority classes with
                          RHO times fewer examples than the majority ones.

    The class order (which class is the head) is class index by default, a permutation (``"3,1,0,2"`` or
    ``"[3, 1, 0, 2]"``, head first) or ``random:SEED``. ``n_ref`` is the largest size for which every class can
    meet its share of the profile with the examples it has (``min_c n_c / p_c``), so on a balanced split it is the
    per-class count and the max/min ratio is F up to rounding. Which examples are kept is exact, not
    Bernoulli: within each class the examples with the lowest hash are kept, so the counts are exactly the
    targets and the choice is a pure function of (seed, index, label) given the split's labels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcli.errors import KdcliError

NOISE_KINDS = ("symmetric", "symmetric-incl", "pairflip", "asymmetric", "matrix")
IMBALANCE_KINDS = ("longtail", "step")
# CIFAR-10: airplane 0, automobile 1, bird 2, cat 3, deer 4, dog 5, frog 6, horse 7, ship 8, truck 9.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STOCHASTIC_TOLERANCE = 1e-6

_MASK64 = (1 << 64) - 1
_SALT_FLIP = "noise-flip"
_SALT_TARGET = "noise-target"
_SALT_KEEP = "imbalance-keep"
_SALT_ORDER = "imbalance-class-order"

# ------------------------------------------------------------------------------------------------ hashing


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _salt64(salt: int | str) -> int:
    if isinstance(salt, str):
        return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")
    return int(salt) & _MASK64


def uniform(seed: int, index, salt: int | str = 0) -> np.ndarray:
    """Uniform float64s in [0, 1), one per entry of ``index``: a pure function of (seed, salt, index).

    ``splitmix64(key ^ splitmix64(index))`` with ``key = splitmix64(splitmix64(seed) ^ salt)``; the top 53 bits
    make the float. ``salt`` (an int or a string) separates independent streams for the same seed.
    """
    idx = np.asarray(index)
    flat = np.atleast_1d(idx).astype(np.int64, copy=False).view(np.uint64)
    key = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64)) ^ np.uint64(_salt64(salt))
    key = _splitmix64(key)
    h = _splitmix64(_splitmix64(flat) ^ key)
    out = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return out.reshape(idx.shape)


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class NoiseSpec:
    """A parsed ``--noise`` spec. ``matrix`` is the C x C transition matrix every kind is sampled from;
    ``rate`` is R for the rate kinds and, for ``matrix:FILE``, the off-diagonal mass under a uniform class prior."""

    kind: str
    rate: float
    matrix: np.ndarray | None = field(compare=False, repr=False)
    text: str

    @property
    def expected_rate(self) -> float:
        """The fraction of labels expected to change when the classes are balanced."""
        return float(np.mean(1.0 - np.diag(self.matrix)))


@dataclass(frozen=True)
class ImbalanceSpec:
    """A parsed ``--imbalance`` spec. ``order`` lists the classes head first (the profile's rank order)."""

    kind: str
    factor: float
    minority_fraction: float | None
    text: str
    order: tuple[int, ...]

    @property
    def num_minority(self) -> int | None:
        """How many classes are minority classes for ``step`` (the last ones of ``order``); None for longtail."""
        if self.minority_fraction is None:
            return None
        num_classes = len(self.order)
        return min(max(math.ceil(self.minority_fraction * num_classes - 1e-9), 1), num_classes - 1)

    def relative_sizes(self) -> np.ndarray:
        """The profile p_c (1.0 for the head class), indexed by class."""
        num_classes = len(self.order)
        by_rank = np.ones(num_classes)
        if self.kind == "longtail":
            if num_classes > 1:
                by_rank = self.factor ** (-np.arange(num_classes) / (num_classes - 1))
        else:
            by_rank[num_classes - self.num_minority :] = 1.0 / self.factor
        sizes = np.empty(num_classes)
        sizes[list(self.order)] = by_rank
        return sizes


def _number(value: str, what: str, spec: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise KdcliError(f"{what} in {spec!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise KdcliError(f"{what} in {spec!r} must be a finite number, got {value!r}")
    return number


def _rate(value: str, spec: str) -> float:
    rate = _number(value, "the rate", spec)
    if not 0.0 <= rate <= 1.0:
        raise KdcliError(f"the rate in {spec!r} must be in [0, 1], got {value}")
    return rate


def _read_text(path: str, spec: str) -> str:
    if not path:
        raise KdcliError(f"{spec!r} needs a file after the last ':'")
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise KdcliError(f"cannot read {path!r} for {spec!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise KdcliError(f"{path!r} in {spec!r} is not a text file (JSON or CSV, UTF-8)") from None


def _load_matrix(path: str, num_classes: int, spec: str) -> np.ndarray:
    text = _read_text(path, spec)
    rows = None
    if not path.lower().endswith(".csv"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            if path.lower().endswith(".json"):
                raise KdcliError(f"{path!r} in {spec!r} is not valid JSON") from None
    if rows is None:
        rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    try:
        matrix = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise KdcliError(
            f"{path!r} in {spec!r} must hold a C x C matrix of numbers (JSON list of lists or CSV)"
        ) from None
    if matrix.shape != (num_classes, num_classes):
        raise KdcliError(
            f"the matrix in {spec!r} must be {num_classes} x {num_classes} (a row per class), not {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)) or (matrix < 0).any():
        raise KdcliError(f"the matrix in {spec!r} has negative or non-finite entries")
    sums = matrix.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > STOCHASTIC_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise KdcliError(f"row {row} of the matrix in {spec!r} sums to {sums[row]:.6g}, not 1: rows must be stochastic")
    return matrix


def _load_class_map(path: str, num_classes: int, spec: str) -> dict[int, int]:
    text = _read_text(path, spec)
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError
        mapping = {int(src): int(dst) for src, dst in raw.items()}
    except (ValueError, TypeError):
        raise KdcliError(f'{path!r} in {spec!r} must be a JSON object of class indices, e.g. {{"9": 1}}') from None
    for src, dst in mapping.items():
        if not (0 <= src < num_classes and 0 <= dst < num_classes):
            raise KdcliError(f"the class map in {spec!r} maps {src} -> {dst}, outside the {num_classes} classes")
    return mapping


def parse_noise(text: str, num_classes: int, class_names: Sequence[str] | None = None) -> NoiseSpec:
    """``--noise`` text -> :class:`NoiseSpec`; a bad spec raises :class:`KdcliError` naming it. ``class_names``
    (the data's, when known) must be CIFAR-10's for the built-in asymmetric map."""
    spec = text.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind not in NOISE_KINDS:
        raise KdcliError(
            f"unknown noise {spec!r}: use one of {', '.join(k + ':R' for k in NOISE_KINDS[:4])}, matrix:FILE"
        )
    if num_classes < 2:
        raise KdcliError(f"noise {spec!r} needs at least 2 classes, the data has {num_classes}")
    C = num_classes
    if kind == "matrix":
        matrix = _load_matrix(rest, C, spec)
        return NoiseSpec(kind, float(np.mean(1.0 - np.diag(matrix))), matrix, spec)

    if kind == "asymmetric":
        rate_text, _, path = rest.partition(":")
        rate = _rate(rate_text, spec)
        if path:
            mapping = _load_class_map(path, C, spec)
        elif C == 10 and (class_names is None or is_cifar10(class_names)):
            mapping = CIFAR10_ASYMMETRIC
        elif C == 10:
            raise KdcliError(
                f"noise {spec!r}: the built-in asymmetric map is CIFAR-10's, by class index (truck->automobile, "
                f"bird->airplane, deer->horse, cat<->dog), and this data's classes are {', '.join(class_names[:4])}, "
                '...; give its own mapping with asymmetric:R:FILE (a JSON object {"src": dst, ...})'
            )
        else:
            raise KdcliError(
                f"noise {spec!r}: the built-in asymmetric map is CIFAR-10's (10 classes) and the data has {C}; "
                'give a class mapping with asymmetric:R:FILE (a JSON object {"src": dst, ...})'
            )
        matrix = np.eye(C)
        for src, dst in mapping.items():
            if src != dst:
                matrix[src, src] = 1.0 - rate
                matrix[src, dst] = rate
        return NoiseSpec(kind, rate, matrix, spec)

    if ":" in rest:
        raise KdcliError(f"noise {spec!r} takes one rate: {kind}:R")
    rate = _rate(rest, spec)
    if kind == "symmetric":
        matrix = np.full((C, C), rate / (C - 1))
        np.fill_diagonal(matrix, 1.0 - rate)
    elif kind == "symmetric-incl":
        matrix = np.full((C, C), rate / C)
        np.fill_diagonal(matrix, 1.0 - rate + rate / C)
    else:  # pairflip
        matrix = (1.0 - rate) * np.eye(C) + rate * np.roll(np.eye(C), 1, axis=1)
    return NoiseSpec(kind, rate, matrix, spec)


def is_cifar10(class_names: Sequence[str]) -> bool:
    """CIFAR-10's ten classes in its order (``plane``/``car`` accepted for torchvision's older names)."""
    aliases = {"plane": "airplane", "car": "automobile"}
    return tuple(aliases.get(str(n).strip().lower(), str(n).strip().lower()) for n in class_names) == CIFAR10_CLASSES


def check_class_order(class_order: str | None, imbalance: str | None) -> None:
    """``--class-order`` says which class is the head of ``--imbalance``'s profile: alone it would do nothing."""
    if class_order is not None and not imbalance:
        raise KdcliError("--class-order orders the classes of the --imbalance profile (head first): give "
                         "--imbalance too, or drop it")


def _parse_order(class_order: str | Sequence[int] | None, num_classes: int) -> tuple[int, ...]:
    if class_order is None or (isinstance(class_order, str) and class_order.strip().lower() in ("", "index")):
        return tuple(range(num_classes))
    if isinstance(class_order, str):
        text = class_order.strip()
        if text.lower().startswith("random:"):
            seed_text = text.partition(":")[2]
            try:
                seed = int(seed_text)
            except ValueError:
                raise KdcliError(f"class order {text!r}: random:SEED needs an integer seed") from None
            return tuple(int(c) for c in np.argsort(uniform(seed, np.arange(num_classes), _SALT_ORDER), kind="stable"))
        try:
            values = json.loads(text) if text.startswith("[") else [int(v) for v in text.split(",")]
            order = [int(v) for v in values]
        except (ValueError, TypeError):
            raise KdcliError(
                f"class order {text!r} must be 'index', 'random:SEED' or a permutation like 3,1,0,2 (head first)"
            ) from None
    else:
        order = [int(v) for v in class_order]
    if sorted(order) != list(range(num_classes)):
        raise KdcliError(f"class order {class_order!r} must be a permutation of the classes 0..{num_classes - 1}")
    return tuple(order)


def parse_imbalance(text: str, num_classes: int, class_order: str | Sequence[int] | None = None) -> ImbalanceSpec:
    """``--imbalance`` text (and class order) -> :class:`ImbalanceSpec`; bad specs raise :class:`KdcliError`."""
    spec = text.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind not in IMBALANCE_KINDS:
        raise KdcliError(f"unknown imbalance {spec!r}: use longtail:F or step:RHO:MU")
    if num_classes < 2:
        raise KdcliError(f"imbalance {spec!r} needs at least 2 classes, the data has {num_classes}")
    order = _parse_order(class_order, num_classes)
    parts = rest.split(":")
    if kind == "longtail":
        if len(parts) != 1:
            raise KdcliError(f"imbalance {spec!r} takes one factor: longtail:F (max/min class ratio, >= 1)")
        factor = _number(parts[0], "the factor", spec)
        if factor < 1:
            raise KdcliError(f"the factor in {spec!r} is the max/min class ratio and must be >= 1, got {parts[0]}")
        return ImbalanceSpec(kind, factor, None, spec, order)
    if len(parts) != 2:
        raise KdcliError(f"imbalance {spec!r} must be step:RHO:MU (ratio RHO >= 1, minority fraction MU in (0, 1))")
    factor = _number(parts[0], "the ratio RHO", spec)
    fraction = _number(parts[1], "the minority fraction MU", spec)
    if factor < 1:
        raise KdcliError(f"the ratio RHO in {spec!r} must be >= 1, got {parts[0]}")
    if not 0 < fraction < 1:
        raise KdcliError(f"the minority fraction MU in {spec!r} must be in (0, 1), got {parts[1]}")
    return ImbalanceSpec(kind, factor, fraction, spec, order)


# ------------------------------------------------------------------------------------------------ applying


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise KdcliError(f"label {bad} is outside the {num_classes} classes 0..{num_classes - 1}")
    return labels


def _check_pair(labels, indices, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels = _check_labels(labels, num_classes)
    indices = np.asarray(indices, dtype=np.int64)
    if labels.shape != indices.shape:
        raise ValueError(f"labels {labels.shape} and indices {indices.shape} must have the same shape")
    return labels, indices


def _sampling_table(spec: NoiseSpec) -> tuple[np.ndarray, np.ndarray]:
    """(per-class flip probability, flat shifted off-diagonal CDF), computed once per spec and kept on it."""
    cached = spec.__dict__.get("_table")
    if cached is not None:
        return cached
    matrix = spec.matrix
    num_classes = matrix.shape[0]
    off = matrix.copy()
    np.fill_diagonal(off, 0.0)
    flip_prob = off.sum(axis=1)
    # Per-row CDF of the off-diagonal part, each row shifted by its class so one flat searchsorted serves all rows.
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf = np.cumsum(off, axis=1) / flip_prob[:, None]
    for c in range(num_classes):
        positive = np.flatnonzero(off[c] > 0)
        if positive.size:
            cdf[c, positive[-1] :] = 1.0
        else:
            cdf[c] = 1.0
    flat = (cdf + np.arange(num_classes)[:, None]).ravel()
    table = (flip_prob, flat)
    object.__setattr__(spec, "_table", table)
    return table


def noisy_labels(spec: NoiseSpec, labels, indices, num_classes: int, seed: int = 0) -> np.ndarray:
    """The corrupted labels (int64, same shape): entry i depends only on (seed, indices[i], labels[i])."""
    labels, indices = _check_pair(labels, indices, num_classes)
    matrix = spec.matrix
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"spec {spec.text!r} was parsed for {matrix.shape[0]} classes, not {num_classes}")
    flip_prob, flat = _sampling_table(spec)

    u_flip = uniform(seed, indices, _SALT_FLIP)
    u_target = uniform(seed, indices, _SALT_TARGET)
    flip = u_flip < flip_prob[labels]
    out = labels.copy()
    if flip.any():
        rows = labels[flip]
        pos = np.searchsorted(flat, rows + u_target[flip], side="right") - rows * num_classes
        out[flip] = np.minimum(pos, num_classes - 1)
    return out


def class_counts(labels, num_classes: int) -> list[int]:
    """How many examples each class has."""
    labels = _check_labels(labels, num_classes)
    return [int(n) for n in np.bincount(labels.ravel(), minlength=num_classes)]


def target_counts(spec: ImbalanceSpec, counts: Sequence[int]) -> list[int]:
    """Per-class counts after imbalance, from the observed ``counts``.

    ``n_ref = min over classes with examples of n_c / p_c`` and ``target_c = round(n_ref * p_c)``, capped at n_c
    and at least 1 for a class that has examples (so an extreme factor never empties a class); a class with no
    examples stays at 0. Rounded to the nearest, where Cao et al.'s LDAM-DRW code truncates (``int()``): on
    CIFAR-10 at factor 100 that keeps 12,408 images, theirs 12,406 (CIFAR-100: 10,899 and 10,847).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (len(spec.order),):
        raise ValueError(f"spec {spec.text!r} was parsed for {len(spec.order)} classes, not {counts.shape[0]}")
    sizes = spec.relative_sizes()
    present = counts > 0
    if not present.any():
        return [0] * len(counts)
    n_ref = float(np.min(counts[present] / sizes[present]))
    targets = np.minimum(np.rint(n_ref * sizes).astype(np.int64), counts)
    targets = np.where(present, np.maximum(targets, 1), 0)
    return [int(t) for t in targets]


def keep_mask(spec: ImbalanceSpec, labels, indices, num_classes: int, seed: int = 0) -> np.ndarray:
    """Which examples to keep (bool, same shape) so each class has exactly its :func:`target_counts`.

    Pass the whole split's labels and indices: within each class the examples with the lowest
    ``uniform(seed, index)`` are kept, so the result depends on the split (the counts) and on each example's
    (seed, index, label), never on the order of the arrays; a streamed pipeline computes it once over the split
    and looks examples up by index.
    """
    labels, indices = _check_pair(labels, indices, num_classes)
    flat_labels, flat_indices = labels.ravel(), indices.ravel()
    targets = np.asarray(target_counts(spec, class_counts(flat_labels, num_classes)), dtype=np.int64)
    u = uniform(seed, flat_indices, _SALT_KEEP)
    order = np.lexsort((flat_indices, u, flat_labels))  # by class, then hash, then index
    sorted_labels = flat_labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(num_classes), side="left")
    rank = np.arange(flat_labels.size) - starts[sorted_labels]
    keep = np.empty(flat_labels.size, dtype=bool)
    keep[order] = rank < targets[sorted_labels]
    return keep.reshape(labels.shape)


# ------------------------------------------------------------------------------------------------ measuring


def transition_matrix(clean, noisy, num_classes: int) -> list[list[float]]:
    """The realised C x C matrix: row c is the distribution of noisy labels among examples of clean class c
    (a row of zeros for a class with no examples)."""
    clean, noisy = _check_labels(clean, num_classes).ravel(), _check_labels(noisy, num_classes).ravel()
    if clean.shape != noisy.shape:
        raise ValueError(f"clean {clean.shape} and noisy {noisy.shape} labels must have the same shape")
    counts = np.bincount(clean * num_classes + noisy, minlength=num_classes * num_classes).reshape(num_classes, -1)
    totals = counts.sum(axis=1, keepdims=True)
    matrix = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return matrix.tolist()


def noise_report(clean, noisy, num_classes: int) -> dict:
    """The measured noise: rate (fraction of labels changed), realised matrix and class counts before/after."""
    clean, noisy = np.asarray(clean).ravel(), np.asarray(noisy).ravel()
    changed = int(np.count_nonzero(clean != noisy))
    return {
        "num_examples": int(clean.size),
        "num_changed": changed,
        "noise_rate": changed / clean.size if clean.size else 0.0,
        "transition_matrix": transition_matrix(clean, noisy, num_classes),
        "counts_clean": class_counts(clean, num_classes),
        "counts_noisy": class_counts(noisy, num_classes),
    }


def memorisation(pred, clean, noisy) -> dict:
    """How a model treats the corrupted labels it was trained on.

    Among noisy examples (clean != noisy): the fraction predicted as the noisy label (``memorised``), as the
    clean one (``corrected``) and neither (``other``), all None when there are none. Among clean examples
    (clean == noisy): ``clean_accuracy``, top-1 against the label (None when there are none).
    """
    pred, clean, noisy = (np.asarray(a, dtype=np.int64).ravel() for a in (pred, clean, noisy))
    if not pred.shape == clean.shape == noisy.shape:
        raise ValueError(f"pred {pred.shape}, clean {clean.shape} and noisy {noisy.shape} must have the same shape")
    is_noisy = clean != noisy
    num_noisy, num_clean = int(is_noisy.sum()), int((~is_noisy).sum())
    result: dict = {"num_noisy": num_noisy, "num_clean": num_clean}
    if num_noisy:
        p, c, n = pred[is_noisy], clean[is_noisy], noisy[is_noisy]
        memorised, corrected = float(np.mean(p == n)), float(np.mean(p == c))
        result.update(memorised=memorised, corrected=corrected, other=float(np.mean((p != n) & (p != c))))
    else:
        result.update(memorised=None, corrected=None, other=None)
    result["clean_accuracy"] = float(np.mean(pred[~is_noisy] == clean[~is_noisy])) if num_clean else None
    return result
