"""Building a classifier from what the user named: a timm model, or a kdcli checkpoint.

Every model, whatever its source, becomes a :class:`Classifier`: a timm network plus its own input
resizing and normalisation, so teacher and student can share one batch of [0, 1] images while each sees
the resolution and normalisation it expects (a pretrained ImageNet teacher keeps ImageNet mean/std and its
own input size), and whose logits come out in the dataset's class order.

Weights come through timm's pretrained machinery (``timm.create_model(..., pretrained=True)``): timm's own
weights for a name, or a weights file handed to it as ``pretrained_cfg_overlay=dict(state_dict=...)``, so a
classifier of another size is re-initialised and a stem of another channel count adapted the timm way.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import Tensor, nn

import kdcli.models.cifar  # noqa: F401  (registers the cifar_* nets into timm)
from kdcli.errors import KdcliError
from kdcli.methods.base import Outputs, Shapes
from kdcli.models import checkpoint as ckpt

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


DEFAULT_STAGES = 3


def stage_info(net: nn.Module) -> list[dict]:
    """timm's per-stage description (channels, reduction, module), shallow to deep; [] if none."""
    info = getattr(net, "feature_info", None)
    return list(info) if isinstance(info, list | tuple) else []


def default_stages(net: nn.Module, k: int = DEFAULT_STAGES) -> list[int]:
    """The last ``k`` stages: the deepest entry at each of the last ``k`` resolutions, or, for models
    that keep one resolution throughout (ViTs), ``k`` entries spread evenly and ending at the last."""
    info = stage_info(net)
    if not info:
        return []
    last_at: dict[int, int] = {}
    for i, f in enumerate(info):
        last_at[f.get("reduction", i)] = i
    distinct = sorted(last_at.values())
    if len(distinct) >= k:
        return distinct[-k:]
    n = len(info)
    return sorted({round((n - 1) * (j + 1) / k) for j in range(k)})


# timm's interpolation names → torch's; the others timm knows (random, lanczos, box, hamming) resize bilinearly
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


class Classifier(nn.Module):
    """A timm network that resizes and normalises its own input and returns :class:`Outputs`.

    ``forward`` takes [0, 1] images at any resolution: a batch whose size is not ``meta.input_size`` is resized
    to it on the device (``meta.interpolation``, antialiased when shrinking). ``class_index``, when given,
    puts the network's classes into the dataset's order: logit ``j`` of the output is the network's logit
    ``class_index[j]`` (features are the network's own, unaffected).
    """

    def __init__(self, net: nn.Module, meta: ckpt.ModelMeta, class_index: list[int] | None = None):
        super().__init__()
        self.net = net
        self.meta = meta
        self.stages: list[int] | None = None  # which feature_info entries feed Outputs.features
        self.register_buffer("mean", torch.tensor(meta.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(meta.std).view(1, -1, 1, 1), persistent=False)
        index = None if class_index is None else torch.tensor(class_index, dtype=torch.long)
        self.register_buffer("class_index", index, persistent=False)
        self.compute_dtype: torch.dtype | None = None  # set by to_compute_dtype: the network's own dtype

    def _resize(self, x: Tensor) -> Tensor:
        size = self.meta.input_size
        h, w = x.shape[-2:]
        if h == size and w == size:
            return x
        mode = _MODES.get(self.meta.interpolation, "bilinear")
        if mode == "nearest":
            return F.interpolate(x, size=(size, size), mode=mode)
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=h > size or w > size)
        return x.clamp_(0, 1) if mode == "bicubic" else x  # bicubic overshoots [0, 1]; PIL's would clip too

    def _order(self, logits: Tensor) -> Tensor:
        return logits if self.class_index is None else logits.index_select(1, self.class_index)

    def forward(self, x: Tensor, needs: frozenset[str] = frozenset({"logits"})) -> Outputs:
        x = self._resize(x)
        if x.shape[1] == 1 and self.meta.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)  # grayscale data into an RGB model
        x = (x - self.mean) / self.std
        if self.compute_dtype is not None:
            return self._cast_outputs(self._forward(x.to(self.compute_dtype), needs))
        return self._forward(x, needs)

    @staticmethod
    def _cast_outputs(out: Outputs) -> Outputs:
        return replace(out, logits=out.logits.float())

    def _forward(self, x: Tensor, needs: frozenset[str]) -> Outputs:
        if "features" in needs or "preact" in needs:
            final, feats = self.net.forward_intermediates(x, indices=self.stages, output_fmt="NCHW")
        elif "pooled" in needs:
            final, feats = self.net.forward_features(x), []
        else:
            return Outputs(logits=self._order(self.net(x)))
        pooled = self.net.forward_head(final, pre_logits=True) if "pooled" in needs else None
        # timm models expose stage outputs (after the activation); "preact" gets the same maps
        return Outputs(logits=self._order(self.net.forward_head(final)),
                       features=feats if "features" in needs else [],
                       pooled=pooled, preact=feats if "preact" in needs else [])

    @property
    def num_params(self) -> int:
        """Parameters of the network as loaded (a folded teacher counts its BatchNorms, as its checkpoint does)."""
        return getattr(self, "_loaded_params", None) or sum(p.numel() for p in self.net.parameters())

    def to_compute_dtype(self, dtype: torch.dtype) -> None:
        """Hold the (frozen) network in ``dtype``: under autocast its weights are then not cast again at every
        forward. Inputs are cast to it; logits come out in float32."""
        self.net.to(dtype)
        self.compute_dtype = dtype

    def fold_batchnorm(self) -> int:
        """Fold the network's eval-mode BatchNorms into the convs that feed them (:mod:`kdcli.models.fold`): the
        same outputs within float rounding, about half the ops of a frozen teacher's forward. Returns how many."""
        from kdcli.models.fold import fold_batchnorm

        self._loaded_params = self.num_params
        return fold_batchnorm(self.net.eval(), structural=False)

    def num_stages(self) -> int:
        return len(stage_info(self.net))

    @torch.no_grad()
    def shapes(self, needs: frozenset[str], size: int | None = None) -> Shapes:
        """Measure the output shapes for one example (methods build their connectors from these). The probe is
        at ``size`` (default: the model's own input size); ``forward`` resizes it to the model's size anyway."""
        was_training = self.training
        self.eval()
        size = size or self.meta.input_size
        out = self(torch.zeros(2, self.meta.in_chans, size, size, device=self.mean.device), needs)
        self.train(was_training)
        feats = out.features or out.preact
        return Shapes(num_classes=out.logits.shape[1],
                      features=tuple(tuple(f.shape[1:]) for f in feats),
                      pooled=None if out.pooled is None else out.pooled.shape[1])


def match_stages(student: Classifier, teacher: Classifier, s_stages: list[int] | None,
                 t_stages: list[int] | None) -> None:
    """Choose which stages feed feature methods: the last k of each, matched by order, unless given."""
    for model, role in ((student, "--student"), (teacher, "--teacher")):
        if not model.num_stages() or not hasattr(model.net, "forward_intermediates"):
            raise KdcliError(f"{role} {model.meta.architecture} exposes no stage features (timm feature_info / "
                             "forward_intermediates); choose a method that needs only logits")
    k = min(DEFAULT_STAGES, student.num_stages(), teacher.num_stages())
    for model, given, role in ((student, s_stages, "--student-stages"), (teacher, t_stages, "--teacher-stages")):
        n = model.num_stages()
        if given is not None:
            bad = [i for i in given if not -n <= i < n]
            if bad:
                raise KdcliError(f"{role} {bad} out of range: {model.meta.architecture} has stages 0..{n - 1}")
            model.stages = [i % n for i in given]
        else:
            model.stages = default_stages(model.net, k)
    if len(student.stages) != len(teacher.stages):
        raise KdcliError(f"student stages {student.stages} and teacher stages {teacher.stages} differ in number; "
                         "give --student-stages and --teacher-stages of the same length")


@dataclass
class DataFacts:
    """What the data says a model must fit."""

    num_classes: int
    in_chans: int
    image_size: int
    class_names: list[str]
    mean: tuple[float, ...] | None = None  # the dataset's own statistics, when known
    std: tuple[float, ...] | None = None


@dataclass
class Loaded:
    """A classifier built for the data, and what building it did: the engine prints ``warnings`` at start and
    reports the rest."""

    model: Classifier
    source: str  # "timm" (fresh) | "pretrained" | "hf-hub" | "local-dir" | "weights" | "checkpoint"
    path: str | None  # the weights file, if any
    trained: bool = True  # False: fresh random weights
    adapted: list[str] = field(default_factory=list)  # what loading changed to fit the data, in words
    warnings: list[str] = field(default_factory=list)  # one line each, for the engine to print at start
    class_order: str | None = None  # same | permuted | generic | ignored; None where no class names are known


HUB_PREFIXES = ("hf-hub:", "local-dir:")  # timm model sources that bring their own weights


def _fit_channels(values, in_chans: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    return [sum(values) / len(values)] * in_chans


def _one_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit]


def _unknown_model(name: str, option: str) -> KdcliError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models() for names"
    return KdcliError(f"unknown model {name!r} for {option} (not a timm model name nor an existing "
                      f"checkpoint file){hint}")


def _bad_tag(name: str, option: str) -> KdcliError:
    arch = split_model_name_tag(name)[0]
    tags = timm.list_pretrained(f"{arch}.*")
    known = f"{arch} has: {', '.join(tags[:8])}{', …' if len(tags) > 8 else ''}" if tags else f"{arch} has none"
    return KdcliError(f"unknown pretrained tag in {option} {name}; {known}")


def _pretrained_flag(option: str) -> str:
    return "--pretrained" if option == "--model" else f"{option}-pretrained"


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A weights file's tensors, read without unpickling anything but tensors (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, ...: all mean "not a readable safetensors file"
            raise KdcliError(f"cannot read weights from {path}: {_one_line(e, 200)}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; all mean "not a loadable weights file"
        # torch's own advice (re-run with weights_only=False: unpickle it) is what kdcli never does: keep its reason
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = found.group(1) if found else (text.strip().splitlines() or [type(e).__name__])[0]
        cut = r" This file can still be loaded| Please use| In PyTorch 2\.6|\. This is an internal"
        reason = re.split(cut, reason)[0].rstrip(" .:")
        raise KdcliError(f"cannot read weights from {path} (not a tensor file that loads without unpickling code: "
                         f"{reason[:160]})") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise KdcliError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _file_meta(path: Path) -> ckpt.ModelMeta | None:
    """The kdcli description of a weights file, when it is a kdcli checkpoint."""
    if path.suffix != ".safetensors":
        return None
    try:
        return ckpt.read_meta(path)
    except KdcliError:
        return None


# ------------------------------------------------------------------------------------------------ class names


def _generic(names: list[str]) -> bool:
    """Names that say nothing: ``0``, ``1``, … or ``class_0``, ``class_1``, …"""
    return all(n in (str(i), f"class_{i}") for i, n in enumerate(names))


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(map(str, names[:k])) + (", …" if len(names) > k else "")


def _match_names(theirs: list[str] | None, data: list[str], what: str,
                 ignore: bool) -> tuple[str | None, list[int] | None, list[str]]:
    """How a model's recorded class names meet the dataset's: (class_order, class_index, warnings).

    ``class_index[j]`` is the model's class for the dataset's class ``j`` (None: the same order)."""
    theirs, data = list(theirs or []), list(data)
    if not theirs or len(theirs) != len(data):
        return None, None, []
    if theirs == data:
        return "same", None, []
    g_theirs, g_data = _generic(theirs), _generic(data)
    if g_theirs or g_data:
        warnings = []
        if not g_theirs:
            warnings.append(f"{what} names its classes ({_few(theirs)}) but the dataset's are generic "
                            f"({_few(data)}): taken to be the same classes in the same order")
        elif not g_data:
            warnings.append(f"{what} records generic class names ({_few(theirs)}): taken to be the dataset's "
                            f"({_few(data)}) in the same order")
        return "generic", None, warnings
    if len(set(theirs)) == len(theirs) and set(theirs) == set(data):
        pos = {n: i for i, n in enumerate(theirs)}
        return "permuted", [pos[n] for n in data], [f"{what}: class names permuted into the dataset's order"]
    only_theirs = [n for n in theirs if n not in set(data)]
    only_data = [n for n in data if n not in set(theirs)]
    diff = (f"{_few(only_theirs)} not in the dataset; {_few(only_data)} not in the model"
            if only_theirs or only_data else "repeated names")
    if ignore:
        return "ignored", None, [f"{what}: class names differ from the dataset's ({diff}); its classes are "
                                 "used in index order as asked (ignore class names)"]
    raise KdcliError(f"{what} has other class names than the dataset ({diff}); pass --ignore-class-names to "
                     "use its classes in index order")


def _meta_names(order: str | None, theirs: list[str] | None, data: list[str]) -> list[str]:
    """The class names that describe the network's own outputs (its checkpoint keeps them in its order)."""
    if order in ("same", "permuted") or (order == "generic" and not _generic(list(theirs or []))):
        return list(theirs or [])
    return list(data)


# ----------------------------------------------------------------------------------------------- timm helpers


def _registry_cfg(name: str, option: str) -> dict[str, Any] | None:
    """timm's registered pretrained cfg for a name (its tag's, or the default tag's); None for hub names or
    architectures registered without one."""
    if name.startswith(HUB_PREFIXES):
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # the architecture exists, the tag does not
        raise _bad_tag(name, option) from None
    return None if cfg is None else cfg.to_dict()


def _names(value: str | tuple | list | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _size_kwargs(cfg: dict[str, Any] | None, size: int | None) -> dict[str, Any]:
    """A model with a fixed input size (most ViTs) is built for the size it will see (timm resamples the
    position embedding of pretrained weights); the others take any size as they are."""
    if cfg and cfg.get("fixed_input_size") and size and tuple(cfg["input_size"][-2:]) != (size, size):
        return {"img_size": size}
    return {}


def _create(name: str, num_classes: int, in_chans: int, option: str, pretrained: bool = False,
            **kwargs: Any) -> nn.Module:
    """``timm.create_model``; an unknown name or tag is a KdcliError, other errors are the caller's."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise _unknown_model(name, option) from None
        if "Invalid pretrained tag" in str(e):
            raise _bad_tag(name, option) from None
        raise


def _describe_net(net: nn.Module, in_chans: int) -> None:
    """Make the net's ``pretrained_cfg`` describe the net as built, without the weights it was loaded from (a
    state dict handed to timm would otherwise stay referenced there, and break saving the cfg as JSON)."""
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    if not cfg:
        return
    cfg.pop("state_dict", None)
    num_classes = getattr(net, "num_classes", None)
    if num_classes is not None and cfg.get("num_classes") != num_classes:
        cfg.pop("label_names", None)
        cfg["num_classes"] = num_classes
    size = cfg.get("input_size")
    if size and size[0] != in_chans:
        cfg["input_size"] = (in_chans, *size[1:])
        for key in ("mean", "std"):
            if cfg.get(key):
                cfg[key] = tuple(_fit_channels(cfg[key], in_chans))
    net.pretrained_cfg = net.default_cfg = cfg


def _adaptations(cfg: dict[str, Any], src_classes: int | None, src_chans: int, num_classes: int,
                 in_chans: int) -> list[str]:
    """What timm's pretrained loading changed (it re-initialises a classifier whose size differs and adapts
    the first conv to the input channels), in words."""
    out = []
    head = ", ".join(_names(cfg.get("classifier")))
    if head and src_classes != num_classes:
        out.append(f"classifier {head} initialised (the weights have none)" if not src_classes else
                   f"classifier {head} re-initialised (weights have {src_classes} classes, the data {num_classes})")
    conv = ", ".join(_names(cfg.get("first_conv")))
    if conv and src_chans != in_chans:
        out.append(f"first conv {conv} adapted from {src_chans} channel{'s' * (src_chans != 1)} to {in_chans}")
    return out


def _data_config(net: nn.Module, in_chans: int) -> dict[str, Any]:
    """The model's own input, from timm's data configuration: size, interpolation, crop fraction, mean/std."""
    dc = resolve_model_data_config(net)
    return dict(input_size=int(dc["input_size"][-1]), interpolation=str(dc["interpolation"]),
                crop_pct=float(dc["crop_pct"]), mean=_fit_channels(dc["mean"], in_chans),
                std=_fit_channels(dc["std"], in_chans))


def _untrained_warnings(spec: str, option: str) -> list[str]:
    tag = split_model_name_tag(spec)[1]
    flag = _pretrained_flag(option)
    if option.startswith("--teacher"):
        if tag:
            return [f"{option} {spec} has random weights (its pretrained tag is ignored without {flag}): "
                    "it teaches nothing useful"]
        return [f"{option} {spec} has random weights: pass {flag}, {option}-weights FILE or a kdcli checkpoint"]
    if tag:
        return [f"{option} {spec} starts from random weights: its pretrained tag is ignored without {flag}"]
    return []


# ------------------------------------------------------------------------------------------------------- load


def load(spec: str, data: DataFacts, *, weights: str | None = None, pretrained: bool = False,
         image_size: int | None = None, ignore_class_names: bool = False, option: str = "--model") -> Loaded:
    """Build the classifier named by ``spec`` for ``data``; every user mistake is a KdcliError.

    Args:
        spec: a timm name (fresh weights, unless ``pretrained``), an ``hf-hub:`` / ``local-dir:`` timm name
            (its weights), or a kdcli checkpoint file.
        data: what the model must fit.
        weights: a weights file for the timm name (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
            ``weights_only=True``), loaded through timm's pretrained machinery.
        pretrained: timm's pretrained weights for the name (``resnet50.a1_in1k``).
        image_size: the model's input size, instead of its own (a pretrained model's / checkpoint's) or the
            data's (fresh weights).
        ignore_class_names: use a model whose recorded class names differ from the dataset's in index order.
        option: the command-line option that named the model, for messages (``--teacher``, ``--student``, …).
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():  # a run folder stands for its checkpoint
        spec, path = str(path / "model.safetensors"), path / "model.safetensors"
    if path.is_file() or (spec.endswith(CHECKPOINT_SUFFIXES) and not timm.is_model(spec)):
        return _load_checkpoint(spec, path, data, weights, pretrained, image_size, ignore_class_names, option)
    hub = spec.startswith(HUB_PREFIXES)
    if not (timm.is_model(spec) or hub):
        raise _unknown_model(spec, option)
    if weights and (pretrained or hub):
        given = f"{spec.split(':')[0]}: names its own weights" if hub else f"{_pretrained_flag(option)} is given"
        raise KdcliError(f"{option} {spec}: {option}-weights {weights} and pretrained weights both asked for "
                         f"({given}); choose one")
    if weights:
        return _load_weights(spec, data, weights, image_size, ignore_class_names, option)
    if pretrained or hub:
        return _load_pretrained(spec, data, image_size, ignore_class_names, option)
    return _load_fresh(spec, data, image_size, option)


def _load_checkpoint(spec: str, path: Path, data: DataFacts, weights: str | None, pretrained: bool,
                     image_size: int | None, ignore: bool, option: str) -> Loaded:
    """A kdcli checkpoint describes itself: architecture, classes, channels, input and class names."""
    if not path.is_file():
        raise KdcliError(f"checkpoint {spec} does not exist ({option})")
    if weights:
        raise KdcliError(f"{option} {spec} is a checkpoint already; {option}-weights needs an architecture name")
    if pretrained:
        raise KdcliError(f"{option} {spec} is a checkpoint already; drop {_pretrained_flag(option)}")
    meta = ckpt.read_meta(path, option)
    what = f"{option} {spec}"
    _check_fit(meta, data, what)
    order, index, warnings = _match_names(meta.class_names, data.class_names, what, ignore)
    cfg = _registry_cfg(meta.architecture, option)
    if image_size and image_size != meta.input_size and cfg and cfg.get("fixed_input_size"):
        raise KdcliError(f"{what}: {meta.architecture} was built for {meta.input_size} px inputs and cannot "
                         f"take {image_size} px")
    net = _create(meta.architecture, meta.num_classes, meta.in_chans, option, **_size_kwargs(cfg, meta.input_size))
    ckpt.load_into(net, path)
    if image_size:
        meta = meta.model_copy(update={"input_size": image_size})
    return Loaded(Classifier(net, meta, index), "checkpoint", str(path), trained=True, warnings=warnings,
                  class_order=order)


def _load_fresh(spec: str, data: DataFacts, image_size: int | None, option: str) -> Loaded:
    """Random weights. Such a model trains at the data's own size (not timm's default input size: training a
    random net at 224 px on 32 px data would only cost time, ~50x the compute for nothing the data holds), on
    the dataset's mean/std where known, resized bilinearly with no crop."""
    size = image_size or data.image_size
    net = _create(spec, data.num_classes, data.in_chans, option, **_size_kwargs(_registry_cfg(spec, option), size))
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if data.mean is not None and data.std is not None:
        mean, std = data.mean, data.std
    else:
        mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    _describe_net(net, data.in_chans)
    meta = ckpt.ModelMeta(architecture=spec, num_classes=data.num_classes, in_chans=data.in_chans, input_size=size,
                          mean=_fit_channels(mean, data.in_chans), std=_fit_channels(std, data.in_chans),
                          interpolation="bilinear", crop_pct=1.0, class_names=list(data.class_names))
    return Loaded(Classifier(net, meta), "timm", None, trained=False, warnings=_untrained_warnings(spec, option))


def _stem_adaptable(net: nn.Module, cfg: dict[str, Any]) -> bool:
    convs = _names(cfg.get("first_conv"))
    try:
        return bool(convs) and all(isinstance(net.get_submodule(c), nn.Conv2d) for c in convs)
    except AttributeError:
        return False


def _load_pretrained(spec: str, data: DataFacts, image_size: int | None, ignore: bool, option: str) -> Loaded:
    """timm's own pretrained weights for the name (a tag, ``hf-hub:``, ``local-dir:``), fitted to the data by
    timm: a classifier of another size is re-initialised, the first conv adapted to the data's channels."""
    what = f"{option} {spec}"

    def create(in_chans: int) -> nn.Module:
        try:
            return _create(spec, data.num_classes, in_chans, option, pretrained=True,
                           **_size_kwargs(_registry_cfg(spec, option), image_size))
        except (OSError, ValueError) as e:
            if "No pretrained weights" in str(e):  # kdcli's cifar_* nets: nothing published
                raise KdcliError(f"{what}: no pretrained weights are published for it; pass {option}-weights FILE "
                                 "or a kdcli checkpoint") from None
            raise KdcliError(f"cannot fetch the pretrained weights of {what} (offline, or not on the Hugging Face "
                             f"Hub?): {_one_line(e, 200)}") from None
        except RuntimeError as e:
            if "No pretrained weights" in str(e):
                raise KdcliError(f"{what}: timm has no pretrained weights for it; pass {option}-weights FILE or a "
                                 "kdcli checkpoint") from None
            if in_chans == data.in_chans and data.in_chans == 1:
                return None  # its stem did not take 1 channel: try feeding it RGB below
            raise KdcliError(f"{what}: timm cannot load its pretrained weights: {_one_line(e)}") from None

    in_chans = data.in_chans
    net = create(in_chans)
    if in_chans == 1 and (net is None or ((net.pretrained_cfg.get("input_size") or (3,))[0] != 1
                                          and not _stem_adaptable(net, net.pretrained_cfg))):
        in_chans = 3  # a stem timm cannot adapt: the grayscale image is fed to it as RGB
        net = create(in_chans)
    src = dict(net.pretrained_cfg)
    src_classes = src.get("num_classes")
    adapted = _adaptations(src, src_classes, (src.get("input_size") or (3,))[0], data.num_classes, in_chans)
    label_names = list(src.get("label_names") or []) if src_classes == data.num_classes else None
    order, index, warnings = _match_names(label_names, data.class_names, what, ignore)
    dc = _data_config(net, in_chans)
    _describe_net(net, in_chans)
    meta = ckpt.ModelMeta(architecture=spec, num_classes=data.num_classes, in_chans=in_chans,
                          input_size=image_size or dc["input_size"], mean=dc["mean"], std=dc["std"],
                          interpolation=dc["interpolation"], crop_pct=dc["crop_pct"],
                          class_names=_meta_names(order, label_names, data.class_names))
    source = spec.split(":")[0] if spec.startswith(HUB_PREFIXES) else "pretrained"
    return Loaded(Classifier(net, meta, index), source, None, trained=True, adapted=adapted, warnings=warnings,
                  class_order=order)


def _load_weights(spec: str, data: DataFacts, weights: str, image_size: int | None, ignore: bool,
                  option: str) -> Loaded:
    """A weights file for a timm architecture, handed to timm's pretrained loading as an in-memory state dict
    (read here with ``weights_only=True``), described to timm by its classifier size and input channels so that
    timm re-initialises a classifier of another size and adapts a first conv of another channel count."""
    wpath = Path(weights).expanduser()
    if not wpath.is_file():
        raise KdcliError(f"weights file {weights} {'is a folder' if wpath.is_dir() else 'does not exist'} "
                         f"({option}-weights)")
    what = f"{option}-weights {weights}"
    sd = _read_state_dict(wpath)
    fmeta = _file_meta(wpath)  # a kdcli checkpoint given as a weights file describes itself
    registered = _registry_cfg(spec, option)
    cfg = registered or {}
    heads, convs = _names(cfg.get("classifier")), _names(cfg.get("first_conv"))

    # the file's classifier size: its meta's, else its classifier weight's rows (0: a file without a classifier)
    if fmeta is not None:
        file_classes = fmeta.num_classes
    elif heads:
        file_classes = next((sd[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in sd), 0)
    else:
        file_classes = data.num_classes  # no classifier named: it must fit as it is
    # the file's input channels: its meta's, else fewer than the architecture's where its first conv says so
    cfg_chans = (cfg.get("input_size") or (3,))[0]
    stem = next((sd[f"{c}.weight"] for c in convs if isinstance(sd.get(f"{c}.weight"), Tensor)), None)
    if fmeta is not None:
        file_chans = fmeta.in_chans
    elif stem is not None and stem.ndim == 4 and stem.shape[1] < cfg_chans:
        file_chans = int(stem.shape[1])
    else:
        file_chans = cfg_chans
    in_chans = data.in_chans
    if file_chans != in_chans and (stem is None or stem.ndim != 4):  # timm can adapt only a conv it finds
        if not (file_chans == 3 and in_chans == 1):
            raise KdcliError(f"{what}: the weights take {file_chans}-channel images, the data has {in_chans} "
                             f"channels, and timm cannot adapt the first layer of {spec}")
        in_chans = 3  # the grayscale image is fed to it as RGB

    size = (fmeta.input_size, fmeta.input_size) if fmeta else tuple((cfg.get("input_size") or (3, 224, 224))[1:])
    overlay: dict[str, Any] = dict(state_dict=sd, num_classes=file_classes, input_size=(file_chans, *size))
    if fmeta is not None:
        overlay.update(mean=tuple(fmeta.mean), std=tuple(fmeta.std), interpolation=fmeta.interpolation,
                       crop_pct=fmeta.crop_pct, label_names=tuple(fmeta.class_names))
    try:
        net = _create(spec, data.num_classes, in_chans, option, pretrained=True, pretrained_cfg_overlay=overlay,
                      **_size_kwargs(registered, image_size))
    except RuntimeError as e:
        raise KdcliError(f"{what} do not fit {spec} with {data.num_classes} classes and {in_chans} channels: "
                         f"{_one_line(e)}") from None
    if file_classes != data.num_classes:
        # timm loads non-strictly once it has dropped the classifier: check nothing else went missing
        head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
        model_keys = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")} - head_keys
        file_keys = {k for k in sd if not k.endswith("num_batches_tracked")} - head_keys
        missing, unexpected = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
        if missing or unexpected:
            raise KdcliError(f"{what} do not fit {spec}: {len(missing)} of its tensors missing ({_few(missing)}), "
                             f"{len(unexpected)} unknown to it ({_few(unexpected)})")

    adapted = _adaptations(cfg, file_classes, file_chans, data.num_classes, in_chans)
    label_names = list(fmeta.class_names) if fmeta is not None and file_classes == data.num_classes else None
    order, index, warnings = _match_names(label_names, data.class_names, what, ignore)
    if registered is not None or fmeta is not None:
        dc = _data_config(net, in_chans)
    else:  # an architecture with no pretrained cfg: nothing says what input the weights expect
        dc = dict(input_size=data.image_size, interpolation="bilinear", crop_pct=1.0,
                  mean=_fit_channels(IMAGENET_DEFAULT_MEAN, in_chans),
                  std=_fit_channels(IMAGENET_DEFAULT_STD, in_chans))
    _describe_net(net, in_chans)
    meta = ckpt.ModelMeta(architecture=spec, num_classes=data.num_classes, in_chans=in_chans,
                          input_size=image_size or dc["input_size"], mean=dc["mean"], std=dc["std"],
                          interpolation=dc["interpolation"], crop_pct=dc["crop_pct"],
                          class_names=_meta_names(order, label_names, data.class_names))
    return Loaded(Classifier(net, meta, index), "weights", str(wpath), trained=True, adapted=adapted,
                  warnings=warnings, class_order=order)


def _check_fit(meta: ckpt.ModelMeta, data: DataFacts, what: str) -> None:
    if meta.num_classes != data.num_classes:
        raise KdcliError(f"{what} has {meta.num_classes} classes but the dataset has {data.num_classes}; "
                         "use a checkpoint trained on this label set")
    if meta.in_chans == 1 and data.in_chans == 3:
        raise KdcliError(f"{what} takes 1-channel images but the dataset is RGB")
