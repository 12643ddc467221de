"""A study spec: the grid of a whole comparison (datasets × pairs × methods × corruption settings × seeds)
and the training options its runs share. Read from YAML or TOML, or from a preset; validated up front.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdcli.config import RunConfig
from kdcli.errors import KdcliError

PRESETS_DIR = Path(__file__).parent / "presets"
CLEAN = ("none", "clean", "0", "")
# a dataset that ``kdcli study --dataset PATH`` must replace (the CIFAR-10 presets: the data is the user's copy)
PLACEHOLDER = "PATH"
# RunConfig fields the grid itself sets: not allowed under ``options``
GRID_FIELDS = frozenset({"command", "student", "student_weights", "teacher", "teacher_weights", "method",
                         "method_args", "dataset", "noise", "imbalance", "seed", "corruption_seed", "out",
                         "teacher_cache"})


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str | list[str] = Field(
        description="teacher architecture, trained once per (corruption, seed) by the study; a list: an ensemble "
                    "of teachers, each trained once, that the pair's students distill from together")
    student: str = Field(description="student architecture")

    @field_validator("teacher")
    @classmethod
    def _some(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("a list of teachers needs at least one architecture, each named once")
        return v

    @property
    def teachers(self) -> list[str]:
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)


class StudySpec(BaseModel):
    """What ``kdcli study`` runs. Every student of a pair distills from the same teacher run."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    dataset: list[str] = Field(min_length=1, description=f"one dataset or several (an axis); {PLACEHOLDER}: a "
                                                         "placeholder that --dataset replaces")
    dataset_hint: str | None = Field(None, description="what --dataset should give, said when the placeholder "
                                                       "is left as it is")
    pairs: list[Pair] = Field(min_length=1, description="teacher → student pairs (the capacity-gap axis)")
    methods: list[str] = Field(min_length=1, description="methods of `kdcli methods`, or 'all'; a CE student is "
                                                         "always trained")
    noise: list[str | None] = Field(default_factory=lambda: [None], min_length=1,
                                    description="noise specs; none = clean")
    imbalance: list[str | None] = Field(default_factory=lambda: [None], min_length=1,
                                        description="imbalance specs; none")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    corruption_seed: Literal["seed"] | int = Field(
        "seed", description="'seed': each seed draws its own corruption; an integer: the same for all seeds")
    options: dict[str, Any] = Field(default_factory=dict, description="run options shared by every run")
    teacher_options: dict[str, Any] = Field(default_factory=dict, description="overrides for teacher runs")
    method_args: dict[str, dict[str, Any]] = Field(default_factory=dict, description="method → {KEY: VALUE}")
    teacher_cache: bool = Field(False, description="one teacher cache per teacher and cell, shared by every student "
                                                   "of a logit method (--teacher-cache)")

    @field_validator("dataset", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("methods", mode="before")
    @classmethod
    def _all(cls, v):
        if v == "all" or v == ["all"]:
            from kdcli import methods

            return [m for m in methods.available() if methods.get(m).uses_teacher]  # CE is trained anyway
        return [v] if isinstance(v, str) else v

    @field_validator("noise", "imbalance", mode="before")
    @classmethod
    def _clean(cls, v):
        v = [v] if v is None or isinstance(v, str | int | float) else v
        return [None if x is None or str(x).strip().lower() in CLEAN else str(x) for x in v]

    @field_validator("methods", "noise", "imbalance", "seeds", "dataset")
    @classmethod
    def _once_each(cls, v: list) -> list:
        repeated = sorted({str(x) for x in v if v.count(x) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} given twice: each once")
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 0 <= s < 2**31]
        if bad:
            raise ValueError(f"seed {bad[0]} is out of range: seeds are 0 to 2^31 − 1")
        return v

    @field_validator("options", "teacher_options")
    @classmethod
    def _known_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        allowed = set(RunConfig.model_fields) - GRID_FIELDS
        for key in v:
            if key not in allowed:
                hint = " (the grid sets it)" if key in GRID_FIELDS else ""
                raise ValueError(f"unknown run option {key!r}{hint}; known: {', '.join(sorted(allowed))}")
        return v

    @property
    def settings(self) -> list[tuple[str | None, str | None]]:
        """The corruption settings, (noise, imbalance), in spec order."""
        return [(n, i) for n in self.noise for i in self.imbalance]


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load(path: Path | None = None, preset: str | None = None,
         dataset: str | list[str] | None = None) -> tuple[StudySpec, str]:
    """The validated spec and its source text, from a YAML/TOML file or a preset name.

    ``dataset`` (``kdcli study --dataset``): replaces the spec's datasets (see :func:`with_dataset`), in the
    text too; a spec whose dataset is the placeholder ``PATH`` needs it."""
    if (path is None) == (preset is None):
        raise KdcliError("give a study spec file or --preset NAME (one of them): "
                         f"presets are {', '.join(presets())}")
    if preset is not None:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise KdcliError(f"unknown preset {preset!r}; presets: {', '.join(presets())}")
    where = f"preset {preset}" if preset else f"study spec {path}"
    if not path.is_file():
        raise KdcliError(f"study spec {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.reason if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
        raise KdcliError(f"{where} cannot be read as UTF-8 text ({reason})") from None
    try:
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:160]
        raise KdcliError(f"{where} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'}: "
                         f"{reason}") from None
    spec = parse(raw, where)
    if dataset is not None:
        spec = with_dataset(spec, dataset)
        text = _text_with_dataset(text, raw, spec.dataset, toml=path.suffix.lower() == ".toml")
    require_dataset(spec, where)
    return spec, text


def with_dataset(spec: StudySpec, dataset: str | list[str]) -> StudySpec:
    """``spec`` with its datasets replaced by ``dataset`` (one path or several): the ``--dataset`` override."""
    given = [dataset] if isinstance(dataset, str) else list(dataset)
    if not given or any(not str(d).strip() for d in given):
        raise KdcliError("--dataset needs a dataset: a local path, a built-in or a hub id")
    if any(str(d).strip() == PLACEHOLDER for d in given):
        raise KdcliError(f"--dataset {PLACEHOLDER} is the placeholder itself: give the path of your copy")
    return spec.model_copy(update={"dataset": [str(d).strip() for d in given]})


def require_dataset(spec: StudySpec, where: str = "study spec") -> None:
    """One clear line when the spec's dataset is still the placeholder (a preset whose data is the user's)."""
    if PLACEHOLDER in spec.dataset:
        hint = f" ({spec.dataset_hint})" if spec.dataset_hint else ""
        raise KdcliError(f"{where} needs --dataset {PLACEHOLDER}{hint}: its dataset is a placeholder")


def _text_with_dataset(text: str, raw: dict, datasets: list[str], toml: bool) -> str:
    """The spec's text with its top-level ``dataset`` line set to ``datasets`` (what the study folder's copy of the
    spec should say), when that line alone holds the key; else the text under a comment naming the override."""
    value = datasets[0] if len(datasets) == 1 else datasets
    sep = "=" if toml else ":"
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if re.match(rf"dataset\s*{sep}", line)]
    if len(found) == 1:
        i = found[0]
        body = lines[i].rstrip("\r\n")
        was = body.split(sep, 1)[1].strip()
        lines[i] = f"dataset{' = ' if toml else ': '}{json.dumps(value)}  # --dataset; the spec said: {was}" \
                   f"{lines[i][len(body):]}"
        new = "".join(lines)
        try:  # a JSON string or list is a YAML and a TOML value; a key spread over lines is not rewritten
            same = (tomllib.loads(new) if toml else yaml.safe_load(new)) == {**raw, "dataset": value}
        except (tomllib.TOMLDecodeError, yaml.YAMLError):
            same = False
        if same:
            return new
    return f"# kdcli study --dataset {' --dataset '.join(datasets)}: replaces the datasets below\n" + text


def parse(raw: Any, where: str = "study spec") -> StudySpec:
    if not isinstance(raw, dict):
        raise KdcliError(f"{where}: expected a mapping of keys (dataset, pairs, methods, …), got {type(raw).__name__}")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()  # a misspelt key is the likelier story than the missing key it was meant to be
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = ", ".join(StudySpec.model_fields) if len(err["loc"]) == 1 else "teacher, student"
            raise KdcliError(f"{where}: unknown key {loc!r} (known keys: {known})") from None
        if err["type"] == "missing":
            raise KdcliError(f"{where}: missing key {loc!r}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise KdcliError(f"{where}: {loc}: {msg}") from None
