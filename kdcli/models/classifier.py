"""Building a classifier from what the user named: a timm model, or a kdcli checkpoint.

Every model, whatever its source, becomes a :class:`Classifier`: a timm network plus its own input
normalisation, so teacher and student can share one batch of [0, 1] images while each sees the
normalisation it expects (a pretrained ImageNet teacher keeps ImageNet mean/std).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
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


class Classifier(nn.Module):
    """A timm network that normalises its own input and returns :class:`Outputs`."""

    def __init__(self, net: nn.Module, meta: ckpt.ModelMeta):
        super().__init__()
        self.net = net
        self.meta = meta
        self.stages: list[int] | None = None  # which feature_info entries feed Outputs.features
        self.register_buffer("mean", torch.tensor(meta.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(meta.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor, needs: frozenset[str] = frozenset({"logits"})) -> Outputs:
        if x.shape[1] == 1 and self.meta.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)  # grayscale data into an RGB model
        x = (x - self.mean) / self.std
        if "features" in needs or "preact" in needs:
            final, feats = self.net.forward_intermediates(x, indices=self.stages, output_fmt="NCHW")
        elif "pooled" in needs:
            final, feats = self.net.forward_features(x), []
        else:
            return Outputs(logits=self.net(x))
        pooled = self.net.forward_head(final, pre_logits=True) if "pooled" in needs else None
        # timm models expose stage outputs (after the activation); "preact" gets the same maps
        return Outputs(logits=self.net.forward_head(final), features=feats if "features" in needs else [],
                       pooled=pooled, preact=feats if "preact" in needs else [])

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def num_stages(self) -> int:
        return len(stage_info(self.net))

    @torch.no_grad()
    def shapes(self, needs: frozenset[str], size: int) -> Shapes:
        """Measure the output shapes for one example (methods build their connectors from these)."""
        was_training = self.training
        self.eval()
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
    model: Classifier
    source: str  # "timm" | "checkpoint" | "weights"
    path: str | None  # the weights file, if any


def _fit_channels(values, in_chans: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    return [sum(values) / len(values)] * in_chans


def _unknown_model(name: str, option: str) -> KdcliError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models() for names"
    return KdcliError(f"unknown model {name!r} for {option} (not a timm model name nor an existing "
                      f"checkpoint file){hint}")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; all mean "not a loadable weights file"
        raise KdcliError(f"cannot read weights from {path}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise KdcliError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load(spec: str, data: DataFacts, *, weights: str | None = None, option: str = "--model") -> Loaded:
    """Build the classifier named by ``spec`` for ``data``; every user mistake is a KdcliError."""
    path = Path(spec).expanduser()
    if path.is_file() or (spec.endswith(CHECKPOINT_SUFFIXES) and not timm.is_model(spec)):
        if not path.is_file():
            raise KdcliError(f"checkpoint {spec} does not exist ({option})")
        if weights:
            raise KdcliError(f"{option} {spec} is a checkpoint already; {option}-weights needs an architecture name")
        meta = ckpt.read_meta(path, option)
        _check_fit(meta, data, f"{option} {spec}")
        net = _create(meta.architecture, meta.num_classes, meta.in_chans, option)
        ckpt.load_into(net, path)
        return Loaded(Classifier(net, meta), "checkpoint", str(path))

    if not (timm.is_model(spec) or spec.startswith("hf-hub:")):
        raise _unknown_model(spec, option)
    pretrained = spec.startswith("hf-hub:")
    in_chans = 1 if data.in_chans == 1 and not (pretrained or weights) else 3
    net = _create(spec, data.num_classes, in_chans, option, pretrained=pretrained)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    if pretrained or weights or data.mean is None:
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    else:
        mean, std = data.mean, data.std
    meta = ckpt.ModelMeta(architecture=spec, num_classes=data.num_classes, in_chans=in_chans,
                          input_size=data.image_size, mean=_fit_channels(mean, in_chans),
                          std=_fit_channels(std, in_chans), class_names=list(data.class_names))
    if weights:
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise KdcliError(f"weights file {weights} does not exist ({option}-weights)")
        try:
            net.load_state_dict(_read_state_dict(wpath), strict=True)
        except RuntimeError as e:
            msg = " ".join(str(e).split())[:300]
            raise KdcliError(f"{option}-weights {weights} do not fit {spec} with {data.num_classes} classes "
                             f"and {in_chans} channels: {msg}") from None
        return Loaded(Classifier(net, meta), "weights", str(wpath))
    return Loaded(Classifier(net, meta), "hf-hub" if pretrained else "timm", None)


def _check_fit(meta: ckpt.ModelMeta, data: DataFacts, what: str) -> None:
    if meta.num_classes != data.num_classes:
        raise KdcliError(f"{what} has {meta.num_classes} classes but the dataset has {data.num_classes}; "
                         "use a checkpoint trained on this label set")
    if meta.in_chans == 1 and data.in_chans == 3:
        raise KdcliError(f"{what} takes 1-channel images but the dataset is RGB")


def _create(name: str, num_classes: int, in_chans: int, option: str, pretrained: bool = False) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise _unknown_model(name, option) from None
        raise
    except (OSError, ValueError) as e:
        if pretrained:
            raise KdcliError(f"cannot fetch {name} from the Hugging Face Hub (offline?): "
                             f"{str(e).splitlines()[0][:200]}") from None
        raise
