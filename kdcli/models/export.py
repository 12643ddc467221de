"""A finished run folder is also a timm model folder: ``config.json`` and ``README.md`` beside ``model.safetensors``.

``config.json`` is timm's Hugging Face Hub format, written by timm's own ``save_config_for_hf``: the architecture,
the arguments that rebuild the net (``model_args``: classes, channels, ...), ``label_names``, and a
``pretrained_cfg`` whose preprocessing is the run's (input size, the model's mean/std, a centre crop at the
native size). So, with nothing from kdcli but the ``cifar_*`` registrations::

    model = timm.create_model("local-dir:RUN_FOLDER", pretrained=True)   # or "hf-hub:USER/REPO" once uploaded
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

gives the trained network and the preprocessing it expects. ``README.md`` is a Hugging Face model card: what
the model is, how it was trained and how well it did (numbers from the run's report only), and how to load it.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kdcli.models.checkpoint import ModelMeta, atomic_path, write_text_atomic
from kdcli.models.classifier import Classifier

if TYPE_CHECKING:
    from kdcli.engine.report import Report

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
CARD_TAGS = ("image-classification", "timm", "knowledge-distillation", "kdcli")

# pretrained_cfg entries that describe where a net's initial weights came from, not the weights exported here.
_PROVENANCE = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
               "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict", "label_offset",
               "test_input_size", "test_crop_pct", "test_pool_size")


def write_model_folder(out: Path, net: nn.Module, meta: ModelMeta, report: Report | None = None) -> None:
    """Write ``out/config.json`` (timm's format) and ``out/README.md`` (a model card) for the weights that
    ``out/model.safetensors`` already holds.

    Args:
        out: the run folder.
        net: the timm network whose ``state_dict`` is in ``model.safetensors`` (a kdcli ``Classifier`` is
            unwrapped to its ``.net``).
        meta: its kdcli description: input size, channels, mean/std and class names.
        report: the run's :class:`kdcli.engine.report.Report`, for the card's training details and metrics;
            None writes a card without them.

    Both files are written atomically (a temporary file in ``out``, then a rename).
    """
    out = Path(out)
    if isinstance(net, Classifier):
        net = net.net
    out.mkdir(parents=True, exist_ok=True)
    config = _timm_config(out, net, meta, report)
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    write_text_atomic(out / CARD_FILE, _model_card(config, meta, report, folder=out.name,
                                                  params=sum(p.numel() for p in net.parameters())))


# ----------------------------------------------------------------------------------------------------- config


def _data_config(meta: ModelMeta) -> dict[str, Any]:
    """The preprocessing kdcli uses for this model, as timm names it."""
    return dict(input_size=(meta.in_chans, meta.input_size, meta.input_size), mean=tuple(meta.mean),
                std=tuple(meta.std), interpolation=meta.interpolation, crop_pct=meta.crop_pct,
                crop_mode="center")


def _timm_config(out: Path, net: nn.Module, meta: ModelMeta, report: Report | None) -> dict[str, Any]:
    """timm's ``save_config_for_hf`` output (written to a temporary file in ``out``), without the provenance of
    the net's initial weights, and with the run's preprocessing."""
    from timm.models._hub import save_config_for_hf

    data = _data_config(meta)
    kwargs: dict[str, Any] = {}
    if "data_config" in inspect.signature(save_config_for_hf).parameters:
        kwargs["data_config"] = data
    tmp = atomic_path(out / CONFIG_FILE)
    try:
        save_config_for_hf(net, str(tmp), model_config={"label_names": list(meta.class_names)},
                           model_args={"in_chans": meta.in_chans, "num_classes": meta.num_classes}, **kwargs)
        config = json.loads(tmp.read_text())
    finally:
        tmp.unlink(missing_ok=True)
    cfg = config.setdefault("pretrained_cfg", {})
    for key in _PROVENANCE:
        cfg.pop(key, None)
    summary = _summary(_config_arch(net, meta), report)
    if summary:
        cfg["description"] = summary
    # timm versions whose save_config_for_hf takes no data_config keep the net's own preprocessing: set it here
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}, num_classes=meta.num_classes)
    return config


def _config_arch(net: nn.Module, meta: ModelMeta) -> str:
    """The timm architecture name (``meta.architecture`` may be an ``hf-hub:`` spec)."""
    return (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or meta.architecture


# ------------------------------------------------------------------------------------------------- model card


_STARTS = {"timm": "fresh weights", "hf-hub": "initialised from its Hugging Face Hub weights",
           "weights": "initialised from a weights file", "checkpoint": "initialised from a kdcli checkpoint"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _code(x: Any) -> str:
    return f"`{x}`"


def _summary(arch: str, report: Report | None, markdown: bool = False) -> str:
    """One line: what was trained, how, on what; names in backticks for ``markdown``."""
    if report is None:
        return ""
    q = _code if markdown else str
    if report.peer is not None:
        how = f"trained alongside {q(report.peer.model.name)} with {q(report.method.name)}"
    elif report.command == "distill" and report.teacher is not None:
        teachers = report.teachers or [report.teacher]
        names = " + ".join(q(t.name) for t in teachers)
        how = f"distilled from {'an ensemble of ' if len(teachers) > 1 else ''}{names} with {q(report.method.name)}"
    else:
        how = f"trained with {q(report.method.name)}"
    return f"{q(arch)} {how} on {q(report.data.dataset)} by kdcli"


def _front_matter(report: Report | None, student_spec: str) -> str:
    lines = ["---", "library_name: timm", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {t}" for t in CARD_TAGS]
    if report is not None and report.data.source == "hub":
        lines += ["datasets:", f"- {json.dumps(report.data.dataset)}"]
    if student_spec.startswith("hf-hub:"):  # started from published weights
        lines += ["base_model:", f"- {json.dumps(student_spec.removeprefix('hf-hub:').split('@')[0])}"]
    lines.append("---")
    return "\n".join(lines)


def _classes(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(_code(n) for n in names[:limit])
    more = f", ... ({len(names)} in all, see `label_names` in config.json)" if len(names) > limit else ""
    return shown + more


def _training(report: Report) -> list[str]:
    cfg, data, method = report.config, report.data, report.method
    lines = ["## Training", "", f"- Command: `kdcli {report.command}` (kdcli {report.kdcli_version}, "
                                f"{report.created})"]
    if report.peer is not None:
        lines.append(f"- Trained alongside: {_code(report.peer.model.name)} ({report.peer.model.source}, "
                     f"{report.peer.model.params:,} parameters), online distillation: the two networks teach "
                     "each other")
    elif report.teacher is not None:
        teachers = report.teachers or [report.teacher]
        label = "Teacher" if len(teachers) == 1 else f"Teachers (an ensemble of {len(teachers)})"
        lines.append(f"- {label}: " + "; ".join(f"{_code(t.name)} ({t.source}, {t.params:,} parameters)"
                                                for t in teachers))
    else:
        lines.append("- Teacher: none (trained on the labels alone)")
    start = _STARTS.get(report.student.source, report.student.source)
    lines.append(f"- Student: {_code(report.student.name)}, {start}")
    args = json.dumps(method.args, sort_keys=True) if method.args else "none"
    lines.append(f"- Method: {_code(method.name)} ({method.family}), resolved arguments: `{args}`")
    if method.warmup_epochs:
        lines.append(f"- Warm-up: {method.warmup_epochs} epoch(s) before the main epochs")
    train_n = f", {data.num_train:,} images" if data.num_train is not None else ""
    lines.append(f"- Dataset: {_code(data.dataset)} ({data.source}), {data.num_classes} classes, "
                 f"{data.in_chans}x{data.image_size}x{data.image_size} inputs; trained on split "
                 f"{_code(data.train_split)}{train_n}; evaluated on split {_code(data.eval_split)}, "
                 f"{data.num_eval:,} images")
    corruption = data.corruption or {}
    if corruption.get("noise"):
        rate = corruption.get("noise_rate")
        measured = ""
        if rate is not None:
            measured = f"; measured: {_pct(rate)} % of the labels changed"
            if corruption.get("num_changed") is not None and corruption.get("num_examples") is not None:
                measured += f" ({corruption['num_changed']:,} of {corruption['num_examples']:,})"
        lines.append(f"- Label noise on the training split: {_code(corruption['noise'])}{measured}")
    if corruption.get("imbalance"):
        order = f", class order {_code(corruption['class_order'])}" if corruption.get("class_order") else ""
        after = corruption.get("class_counts_after")
        counts = f"; class sizes after: {min(after):,} to {max(after):,}" if after else ""
        lines.append(f"- Class imbalance of the training split: {_code(corruption['imbalance'])}{order}{counts}")
    if corruption:
        lines.append(f"- Corruption seed: {corruption.get('seed')}")
    epochs = cfg.get("epochs", len([h for h in report.history if h.stage == "train"]))
    lines.append(f"- Epochs: {epochs}; seed: {cfg.get('seed')}")
    optim = [f"{k.replace('_', ' ')} {cfg[k]}" for k in ("opt", "batch_size", "grad_accum", "lr", "weight_decay",
                                                        "momentum", "schedule", "warmup_epochs", "mixup", "cutmix",
                                                        "label_smoothing", "ema", "precision")
             if k in cfg and (cfg[k] not in (None, 0, 1) or k in ("batch_size", "lr", "schedule", "precision"))]
    if optim:
        lines.append(f"- Optimisation: {', '.join(optim)}")
    env = report.environment
    lines.append(f"- Hardware: {env.device} x {env.world_size}; torch {env.torch}, timm {env.timm}; "
                 f"{report.timing.total_seconds / 60:.1f} min")
    lines += ["", "The full run configuration and per-epoch history are in the run's `report.json`."]
    return lines


def _metrics(report: Report) -> list[str]:
    final, best = report.metrics.final, report.metrics.best
    lines = ["## Results", "",
             f"On the {_code(report.data.eval_split)} split of {_code(report.data.dataset)} "
             f"({final.num_examples:,} images); top-1 and top-5 in %, NLL in nats, ECE with 15 equal-width bins.",
             "", "| | top-1 | top-5 | NLL | ECE |", "|---|---|---|---|---|",
             f"| final (these weights) | {_pct(final.top1)} | {_pct(final.top5)} | {_num(final.nll)} | "
             f"{_num(final.ece)} |"]
    if report.peer is not None:
        p = report.peer.metrics
        lines.append(f"| peer {_code(report.peer.model.name)} (not these weights) | {_pct(p.top1)} | "
                     f"{_pct(p.top5)} | {_num(p.nll)} | {_num(p.ece)} |")
    lines.append("")
    if best is not None:
        lines.append(f"- Best epoch: {best.epoch}, top-1 {_pct(best.top1)} % (the weights here are the final "
                     "epoch's)")
    if final.teacher_agreement is not None:
        other = "peer" if report.peer is not None else "teacher"
        kl = f", KL({other} || model) {_num(final.teacher_kl)}" if final.teacher_kl is not None else ""
        lines.append(f"- Agreement with the {other}'s prediction: {_pct(final.teacher_agreement)} %{kl}")
    return lines


def _usage(arch: str, meta: ModelMeta, folder: str, report: Report | None) -> list[str]:
    cifar = arch.startswith("cifar_")
    mode = "L" if meta.in_chans == 1 else "RGB"
    dataset = report.data.dataset if report is not None else "DATASET"
    lines = ["## How to use", "",
             "With timm (this folder is a timm model folder: `config.json` and `model.safetensors`):", "",
             "```python", "import timm"]
    if cifar:
        lines.append("import kdcli  # registers the cifar_* architectures with timm")
    lines += ["import torch", "from PIL import Image", "",
              f'model = timm.create_model("local-dir:path/to/{folder}", pretrained=True).eval()',
              '# once this folder is uploaded to the Hugging Face Hub: timm.create_model("hf-hub:USER/REPO", '
              "pretrained=True)",
              "config = timm.data.resolve_data_config({}, model=model)  # input size, mean/std of the training run",
              "transform = timm.data.create_transform(**config)",
              f'image = Image.open("example.png").convert("{mode}")',
              "with torch.no_grad():",
              "    probs = model(transform(image).unsqueeze(0)).softmax(-1)",
              'print(model.pretrained_cfg["label_names"][probs.argmax().item()])', "```", ""]
    if cifar:
        lines += [f"`{arch}` is one of the CIFAR networks that kdcli registers with timm, hence `import kdcli` "
                  "before `timm.create_model`.", ""]
    lines += [f"The model takes images scaled to [0, 1] and normalised with mean {_stats(meta.mean)} and std "
              f"{_stats(meta.std)} (in `config.json`), which `create_transform` does. kdcli evaluates as timm "
              f"does: the shorter side resized to {meta.input_size} / {meta.crop_pct:g} ({meta.interpolation}), "
              f"then a centre crop of {meta.input_size}.",
              "", "With kdcli (`model.safetensors` is also a kdcli checkpoint):", "", "```bash",
              f"kdcli evaluate path/to/{folder} --dataset {dataset}", "```"]
    return lines


def _stats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _model_card(config: dict[str, Any], meta: ModelMeta, report: Report | None = None, *, folder: str = "MODEL",
               params: int | None = None) -> str:
    """The Markdown model card (with YAML front matter) for a run folder whose timm config is ``config``."""
    arch = config.get("architecture", meta.architecture)
    student_spec = report.student.name if report is not None else meta.architecture
    if not re.fullmatch(r"[\w.\-]+", folder):
        folder = "MODEL"
    if params is None and report is not None:
        params = report.student.params
    summary = _summary(arch, report, markdown=True) or f"{_code(arch)} trained by kdcli"
    files = "`model.safetensors` (the weights: the timm network's `state_dict`), `config.json` (timm's config)"
    if report is not None:
        files += ", `report.json` (the kdcli run report)"
    lines = [_front_matter(report, student_spec), "", f"# {arch}", "", f"An image classifier: {summary}.", "",
             "## Model", "", f"- Architecture: {_code(arch)} (timm)"]
    if params is not None:
        lines.append(f"- Parameters: {params:,}")
    lines += [f"- Input: {meta.in_chans}x{meta.input_size}x{meta.input_size}, mean {_stats(meta.mean)}, "
              f"std {_stats(meta.std)}",
              f"- Classes ({meta.num_classes}): {_classes(meta.class_names)}",
              f"- Files: {files}", ""]
    if report is not None:
        lines += _training(report) + [""] + _metrics(report) + [""]
    lines += _usage(arch, meta, folder, report)
    return "\n".join(lines) + "\n"
