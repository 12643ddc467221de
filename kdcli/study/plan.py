"""A study's runs: one ordinary kdcli run folder per grid cell, its RunConfig, and its state on disk.

    DIR/runs/<dataset>/<setting>/seed-<s>/teacher-<T>/      the teacher, once per (arch, setting, seed)
    DIR/runs/<dataset>/<setting>/seed-<s>/ce-<S>/           standard training of the student (the baseline)
    DIR/runs/<dataset>/<setting>/seed-<s>/<method>-<T>-<S>/ one student per method, from that teacher
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from kdcli import methods
from kdcli.config import CACHE_OPTIONS, RunConfig, default, make_config
from kdcli.errors import KdcliError
from kdcli.study.spec import StudySpec

MODEL_FILE = "model.safetensors"
LOG_FILE = "log.txt"
# the config keys that differ between two copies of one study (paths) and say nothing about the run
PATH_KEYS = ("out", "teacher", "teacher_cache")


@dataclass(frozen=True)
class Run:
    """One cell of the grid: an ordinary kdcli run with its own folder."""

    cfg: RunConfig
    dataset: str
    setting: str  # label: "clean", "symmetric:0.2", "symmetric:0.2 + longtail:10"
    seed: int
    role: str  # "teacher" | "student"
    method: str  # "ce" for teachers and the baseline
    arch: str  # the architecture this run trains
    teacher_arch: str | None  # the teacher a student distills from, "a+b" for an ensemble (None: no teacher)
    needs: tuple[Run, ...] = ()  # the teacher runs a distilled student waits for

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def name(self) -> str:
        return "/".join(self.out.parts[-4:])  # dataset/setting/seed-s/run

    def state(self) -> str:
        """'done' (report written), 'interrupted' (resume state, no report) or 'pending'.

        The rule of ``--auto-resume``: a run folder made with other options (the spec changed since) is an
        error, not a silent reuse.
        """
        from kdcli.engine import rundir

        state = rundir.decide(self.out, self.cfg, auto_resume=True, ignore=PATH_KEYS,
                              remedy="the study spec changed since; give the study another --out, or delete that "
                                     "run's folder to train it again")
        return {"finished": "done", "interrupted": "interrupted", "fresh": "pending"}[state]

    def command(self) -> list[str]:
        """The kdcli command line that runs (or continues) this run alone."""
        if self.state() == "interrupted":
            return ["kdcli", self.cfg.command, "--resume", str(self.out)]
        return command_line(self.cfg)


def ready(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """The unfinished runs that can start now, and those that wait for an unfinished teacher."""
    done = {r.out for r in runs if r.state() == "done"}
    todo = [r for r in runs if r.out not in done]
    can = [r for r in todo if all(n.out in done for n in r.needs)]
    return can, [r for r in todo if r not in can]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def setting_label(noise: str | None, imbalance: str | None) -> str:
    return " + ".join(s for s in (noise, imbalance) if s) or "clean"


def arch_name(spec: str) -> str:
    """A short name for an architecture (a checkpoint path becomes its folder or file name)."""
    path = Path(spec)
    if spec.endswith(".safetensors"):
        return path.parent.name if path.stem == "model" else path.stem
    return spec.split(":", 1)[-1].split("/")[-1]


def plan(spec: StudySpec, out: Path) -> list[Run]:
    """Every run of the study, teachers first (a student's teacher always comes before it)."""
    runs: dict[Path, Run] = {}
    students: list[Run] = []
    claims: dict[Path, str] = {}  # run folder → what it trains: two different runs never share one

    def claim(folder: Path, what: str) -> None:
        if claims.setdefault(folder, what) != what:
            raise KdcliError(f"study spec: {claims[folder]} and {what} would share one run folder, "
                             f"{folder.relative_to(out)}: their names differ only in characters a folder name "
                             "drops (or a checkpoint's folder or file name repeats); rename one")

    for dataset in spec.dataset:
        for noise, imbalance in spec.settings:
            setting = setting_label(noise, imbalance)
            for seed in spec.seeds:
                folder = out / "runs" / slug(dataset) / slug(setting.replace(" + ", "+")) / f"seed-{seed}"
                base = dict(dataset=dataset, noise=noise, imbalance=imbalance, seed=seed,
                            corruption_seed=seed if spec.corruption_seed == "seed" else spec.corruption_seed,
                            **spec.options)
                cell = dict(dataset=dataset, setting=setting, seed=seed)
                where = f"{dataset!r}, {setting!r}, seed {seed}:"
                for pair in spec.pairs:
                    teachers = []
                    for arch in pair.teachers:  # each teacher once per cell, whichever pairs share it
                        t_out = folder / f"teacher-{slug(arch_name(arch))}"
                        claim(t_out, f"{where} teacher {arch!r}")
                        runs[t_out] = runs.get(t_out) or Run(
                            _config(base | spec.teacher_options, command="train", student=arch, out=t_out),
                            role="teacher", method="ce", arch=arch_name(arch), teacher_arch=None, **cell)
                        teachers.append(runs[t_out])
                    t_name, s_name = "+".join(arch_name(a) for a in pair.teachers), arch_name(pair.student)
                    ce_out = folder / f"ce-{slug(s_name)}"
                    claim(ce_out, f"{where} ce student {pair.student!r}")
                    if ce_out not in runs:
                        runs[ce_out] = Run(_config(base, command="train", student=pair.student, out=ce_out),
                                           role="student", method="ce", arch=s_name, teacher_arch=None, **cell)
                    for method in spec.methods:
                        m_out = folder / f"{slug(method)}-{slug(t_name)}-{slug(s_name)}"
                        claim(m_out, f"{where} {method} from {'+'.join(pair.teachers)!r} into {pair.student!r}")
                        if m_out in runs:
                            continue
                        cache = {}
                        if spec.teacher_cache and _cacheable(method):
                            # one cache per teacher (ensemble) and cell: every logit student of it reads the same
                            cache = {"teacher_cache": str(folder / f"teacher-cache-{slug(t_name)}")}
                        cfg = _config(base | cache, command="distill",
                                      teacher=[str(t.out / MODEL_FILE) for t in teachers], student=pair.student,
                                      method=method, out=m_out,
                                      method_args={k: str(v) for k, v in spec.method_args.get(method, {}).items()})
                        runs[m_out] = Run(cfg, role="student", method=method, arch=s_name, teacher_arch=t_name,
                                          needs=tuple(teachers), **cell)
                        students.append(runs[m_out])
    ordered = [r for r in runs.values() if not r.needs]
    return ordered + students


def _cacheable(method: str) -> bool:
    try:
        return methods.spec(method).cacheable
    except KdcliError:  # an unknown method: check() names it
        return False



def _config(values: dict, **fixed) -> RunConfig:
    values = {**values, **fixed}
    if not values.get("teacher_cache"):  # a run without a cache (teachers, CE, feature methods) has no cache options
        values = {k: v for k, v in values.items() if k not in CACHE_OPTIONS}
    if not values.get("imbalance"):  # the class order is the imbalance profile's: a balanced cell has none
        values.pop("class_order", None)
    values["out"] = str(values["out"])
    try:
        return make_config(**values)
    except KdcliError as e:  # "invalid --epochs: …": in a study, the option sits under options
        raise KdcliError(f"study spec: {str(e).replace('invalid --', 'invalid option ', 1)}") from None


def command_line(cfg: RunConfig) -> list[str]:
    """``kdcli train|distill …`` that builds exactly ``cfg`` (options left at their default are omitted)."""
    argv = ["kdcli", cfg.command]
    values = cfg.model_dump()
    if cfg.command == "train":
        argv += ["--model", cfg.student] + (["--model-weights", cfg.student_weights] if cfg.student_weights else [])
    else:
        for key in ("teacher", "teacher_weights", "student", "student_weights", "method"):
            for value in _many(values[key]):
                argv += [_flag(key), "-" if value is None else str(value)]
        for key, value in cfg.method_args.items():
            argv += ["--method-arg", f"{key}={value}"]
        for key in ("student_stages", "teacher_stages"):
            if values[key] is not None:
                argv += [_flag(key), ",".join(str(i) for i in values[key])]
    handled = {"command", "student", "student_weights", "teacher", "teacher_weights", "method", "method_args",
               "student_stages", "teacher_stages"}
    for key, value in values.items():
        if key in handled or value == default(key):
            continue
        if isinstance(value, bool):
            argv.append(_flag(key) if value else f"--no-{key.replace('_', '-')}")
        else:
            for v in _many(value):
                argv += [_flag(key), str(v)]
    return argv


def _many(value) -> list:
    """An option's values: none, one, or each of a list (a repeatable option such as --teacher)."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def shell(argv: list[str]) -> str:
    return shlex.join(argv)


def check(spec: StudySpec, runs: list[Run]) -> None:
    """Validate what the configs alone cannot: methods, architectures, datasets and corruption specs."""
    import timm

    from kdcli import methods, models  # noqa: F401  (models registers the CIFAR nets into timm)
    from kdcli.data import corruption
    from kdcli.engine.loop import open_run_data

    for name in spec.method_args:
        if name not in spec.methods:
            raise KdcliError(f"study spec: method_args names {name!r}, which is not among the methods")
    for run in runs:
        _in_spec(lambda r=run: methods.spec(r.method, r.cfg.method_args), "methods")
    for i, pair in enumerate(spec.pairs):
        for role, arch in [*(("teacher", a) for a in pair.teachers), ("student", pair.student)]:
            if not (timm.is_model(arch) or arch.startswith("hf-hub:") or Path(arch).is_file()):
                raise KdcliError(f"study spec: pairs[{i}].{role}: unknown model {arch!r} (not a timm or cifar_* "
                                 "name, nor a checkpoint file; `timm.list_models()` lists the names)")
    for dataset in spec.dataset:
        first = next(r for r in runs if r.dataset == dataset)
        data = _in_spec(lambda c=first.cfg: open_run_data(c), "dataset")
        c, order = data.num_classes, first.cfg.class_order
        for noise in filter(None, spec.noise):
            _in_spec(lambda n=noise, c=c, names=data.class_names: corruption.parse_noise(n, c, names), "noise")
        for imbalance in filter(None, spec.imbalance):
            _in_spec(lambda i=imbalance, c=c, o=order: corruption.parse_imbalance(i, c, o), "imbalance")


def _in_spec(call, key: str):
    try:
        return call()
    except KdcliError as e:
        raise KdcliError(f"study spec: {key}: {e}") from None
