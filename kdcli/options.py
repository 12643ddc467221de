"""Run options from a file (YAML, TOML, JSON or a finished run's report.json) and from the command line.

The CLI parses its options into RunConfig fields; this module reads a ``--config`` file into the same fields,
merges the two (an option given on the command line wins over the file, the file over an option left at its
default) and makes the RunConfig.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdcli.config import DISTILL_ONLY, RunConfig, default, make_config
from kdcli.errors import KdcliError

# the options of train and distill that are no RunConfig field: they say how to run, not what
CONTROL = ("ctx", "config", "resume", "overwrite", "auto_resume", "stop_after_epoch")
# options spelled otherwise than their RunConfig field (a config file may use either spelling)
RENAMES = {
    "train": {"model": "student", "model_weights": "student_weights", "pretrained": "student_pretrained"},
    "distill": {"method_arg": "method_args"},
}
SPELLINGS = {"sched": "schedule"}
# RunConfig fields that train has no option for: a file for train may hold them at their default only (a train
# report holds them all)
INT_LISTS = {"decay_milestones": "epochs, e.g. 150,180,210", "student_stages": "stage indices, e.g. 1,2,3",
              "teacher_stages": "stage indices, e.g. 1,2,3"}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def int_list(text: str | list[str] | tuple[str, ...] | None, label: str, example: str) -> list[int] | None:
    """A comma-separated list of integers (a repeated option's values are joined: --x 1,2 --x 3 is 1,2,3)."""
    if not text:
        return None
    text = text if isinstance(text, str) else ",".join(text)
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KdcliError(f"{label} {text!r} is not a comma-separated list of {example}") from None


def key_values(items: list[str], label: str = "--method-arg") -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise KdcliError(f"{label} {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def read_config_file(path: Path, command: str) -> dict[str, Any]:
    """The run options of a YAML/TOML/JSON file or of a finished run's report.json, as RunConfig fields.

    Keys are RunConfig names, snake_case or spelt as options (``batch-size``, ``sched``; for train also
    ``model``, ``model-weights``, ``pretrained``; for distill ``method-arg``). ``command`` (a report's, or the
    file's own) must be ``command`` when present. Values are checked later, by the RunConfig.
    """
    import json
    import tomllib

    import yaml

    where = f"--config {path}"
    kind = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}.get(path.suffix.lower())
    if kind is None:
        raise KdcliError(f"{where}: give a .yaml, .yml, .toml or .json file (or a run's report.json)")
    if not path.is_file():
        raise KdcliError(f"{where} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = (yaml.safe_load(text) if kind == "YAML" else tomllib.loads(text) if kind == "TOML"
               else json.loads(text))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise KdcliError(f"{where} is not a readable {kind} file: {' '.join(str(e).split())[:160]}") from None
    if not isinstance(raw, dict):
        raise KdcliError(f"{where}: expected a mapping of run options (epochs: 30, …), got {type(raw).__name__}")
    report = isinstance(raw.get("config"), dict)  # a run's report.json: its config block is the run's options
    options = dict(raw["config"]) if report else dict(raw)
    file_command = raw.get("command", options.get("command")) if report else options.get("command")
    options.pop("command", None)  # it selects the subcommand: checked here, never passed on
    if file_command is not None and file_command != command:
        what = f"the report of a kdcli {file_command} run" if report else f"for kdcli {file_command}"
        fix = (f": use it with kdcli {file_command} --config" if file_command in RENAMES
               else f" (command: {file_command!r}); kdcli {command} takes a {command} config")
        raise KdcliError(f"{where} is {what}{fix}")

    names = {**SPELLINGS, **RENAMES[command]}
    values: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    unknown = []
    for key, value in options.items():
        field = str(key).replace("-", "_")
        field = names.get(field, field)
        if field not in RunConfig.model_fields or field == "command":
            unknown.append(str(key))
        elif field in values:
            raise KdcliError(f"{where} gives {field} twice, as {spelt[field]!r} and {key!r}")
        else:
            values[field], spelt[field] = value, str(key)
    if unknown:
        control = [k for k in unknown if k.replace("-", "_") in CONTROL]
        if control:
            raise KdcliError(f"{where}: {', '.join(control)} {'is' if len(control) == 1 else 'are'} no run "
                             f"option: give {', '.join(flag(k.replace('-', '_')) for k in control)} on the "
                             "command line")
        import difflib

        known = [*RunConfig.model_fields, *names]
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k.replace("-", "_"), known, 1))
                 else repr(k) for k in unknown]
        raise KdcliError(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; a config "
                         f"file takes the options of kdcli {command} by their RunConfig names")
    if command == "train":  # a train report holds these at their defaults; anything else is a distill file
        set_ = [f for f in DISTILL_ONLY  # None, [] and {} are all "unset"
                if f in values and values[f] != default(f) and (values[f] or default(f))]
        if set_:
            raise KdcliError(f"{where} sets {', '.join(set_)}, which kdcli train does not take (it trains with ce "
                             "and no teacher): use it with kdcli distill")
        for f in DISTILL_ONLY:
            values.pop(f, None)
    return {k: _file_value(k, v, f"{where}: {spelt[k]}") for k, v in values.items()}


def _file_value(field: str, value: Any, label: str) -> Any:
    """A file's value in the form the CLI gives it (comma lists, KEY=VALUE lists and '-' accepted there too)."""
    if field in INT_LISTS and isinstance(value, str):
        return int_list(value, label, INT_LISTS[field])
    if field in INT_LISTS and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if field == "method_args":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return key_values(value, label)
        if isinstance(value, dict):  # method arguments are text, as on the command line
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
    if field == "teacher_weights":
        return [None if w == "-" else w for w in value] if isinstance(value, list) else None if value == "-" else value
    return value


def resolve_config(command: str, values: dict[str, Any], given: set[str], config: Path | None,
                   required: tuple[str, ...]) -> RunConfig:
    """The RunConfig of a train/distill command line: ``values`` (every option, as RunConfig fields) over the
    ``config`` file's options, where an option given on the command line (``given``) wins over the file and the
    file wins over an option left at its default."""
    from_file = read_config_file(config, command) if config is not None else {}
    merged = {**values, **{k: v for k, v in from_file.items() if k not in given}}
    if "method_args" in from_file and "method_args" in given:  # --method-arg K=V sets K, keeping the file's others
        merged["method_args"] = {**from_file["method_args"], **values["method_args"]}
    missing = [flag(k) for k in required if merged.get(k) in (None, [], ())]
    if missing:
        where = f" (on the command line or in --config {config})" if config is not None else " (or pass --resume DIR)"
        raise KdcliError(f"missing option {', '.join(missing)}{where}")
    try:
        return make_config(**{k: (str(v) if isinstance(v, Path) else v) for k, v in merged.items()})
    except KdcliError as e:
        if any(re.match(rf"invalid {flag(f)}(-\d+)*:", str(e)) for f in from_file if f not in given):
            raise KdcliError(f"{e} (from --config {config})") from None
        raise
