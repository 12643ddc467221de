"""kdcli study (grid, reuse of teachers, resume, --jobs, --print-commands, results and plots) and kdcli compare."""

import json
import shlex
import statistics
from pathlib import Path

import pytest

from kdcli.config import RunConfig
from kdcli.engine import loop
from kdcli.engine.report import Report
from kdcli.errors import KdcliError
from kdcli.study import plan, results
from kdcli.study import spec as study_spec
from tests.test_cli import fails, kdcli

TINY = """
name: tiny
dataset: synthetic:8:4:96
pairs:
  - {teacher: cifar_resnet14, student: cifar_resnet8}
methods: [kd, at]
noise: [none, "symmetric:0.4"]
seeds: [0, 1]
options: {epochs: 1, batch_size: 32}
"""
ONE = """
dataset: synthetic:8:4:64
pairs: [{teacher: cifar_resnet8, student: cifar_resnet8}]
methods: [kd]
options: {epochs: 2, batch_size: 32}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    (root / "tiny.yaml").write_text(TINY)
    kdcli("study", root / "tiny.yaml", "--out", root / "out")
    return root / "tiny.yaml", root / "out"


def _reports(out: Path) -> dict[Path, Report]:
    return {p.parent: Report.model_validate_json(p.read_text()) for p in (out / "runs").rglob("report.json")}


def test_tiny_study_trains_teachers_once_and_every_student(tiny):
    _, out = tiny
    reports = _reports(out)
    assert len(reports) == 2 * 2 * (1 + 1 + 2)  # settings × seeds × (teacher + CE + 2 methods)
    for folder, r in reports.items():
        seed = int(folder.parent.name.removeprefix("seed-"))
        assert r.config["seed"] == seed and r.config["corruption_seed"] == seed  # each seed its own noise draw
        assert r.config["noise"] == (None if folder.parent.parent.name == "clean" else "symmetric:0.4")
        if r.command == "distill":  # the very teacher file of the same setting and seed
            teacher = reports[folder.parent / "teacher-cifar_resnet14"]
            assert r.teacher.name == "cifar_resnet14" and r.teacher.sha256 == teacher.student.sha256
    assert (out / "spec.yaml").read_text() == TINY


def test_tiny_study_aggregates_what_the_reports_say(tiny):
    _, out = tiny
    res = json.loads((out / "results.json").read_text())
    reports = _reports(out)
    assert len(res["runs"]) == 16 and res["missing"] == []
    by_cell: dict[tuple, list[float]] = {}
    for folder, r in reports.items():
        method = "teacher" if folder.name.startswith("teacher-") else r.config["method"]
        by_cell.setdefault((folder.parent.parent.name, method), []).append(r.metrics.final.top1)
    groups = {("clean" if g["setting"] == "clean" else "symmetric-0.4",
               "teacher" if g["role"] == "teacher" else g["method"]): g for g in res["groups"]}
    assert set(groups) == set(by_cell) and len(groups) == 8
    for key, values in by_cell.items():
        g = groups[key]
        assert g["n"] == 2 and g["seeds"] == [0, 1]
        assert g["top1_mean"] == pytest.approx(statistics.mean(values))
        assert g["top1_std"] == pytest.approx(statistics.stdev(values))
    for setting in ("clean", "symmetric-0.4"):
        ce = statistics.mean(by_cell[(setting, "ce")])
        for m in ("kd", "at"):
            assert groups[(setting, m)]["gain_over_ce"] == pytest.approx(statistics.mean(by_cell[(setting, m)]) - ce)
        for g in ("ce", "teacher"):
            assert groups[(setting, g)]["gain_over_ce"] is None and groups[(setting, g)]["seeds_ahead"] is None
    # seeds ahead: each student against the CE student of its own seed (the same corruption and teacher)
    by_seed = {(f.parent.parent.name, f.parent.name, r.config["method"]): r.metrics.final.top1
               for f, r in reports.items() if not f.name.startswith("teacher-")}
    for setting in ("clean", "symmetric-0.4"):
        for m in ("kd", "at"):
            ahead = sum(by_seed[(setting, s, m)] > by_seed[(setting, s, "ce")] for s in ("seed-0", "seed-1"))
            assert groups[(setting, m)]["seeds_ahead"] == [ahead, 2]
    noisy = groups[("symmetric-0.4", "kd")]
    assert noisy["memorised_mean"] is not None  # the corruption diagnostics are aggregated too
    # one CSV row per run, the same numbers
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 17 and rows[0].startswith("dataset,setting,noise,imbalance,seed,role,method")
    csv_top1 = sorted(float(line.split(",")[9]) for line in rows[1:])
    assert csv_top1 == pytest.approx(sorted(r.metrics.final.top1 for r in reports.values()))


def test_seeds_ahead_pairs_each_student_with_the_ce_of_its_seed():
    """Ahead means strictly above the CE run of the same dataset, setting, student architecture and seed; a tie
    is not ahead, and a seed whose CE run is missing is not paired."""
    def row(method, seed, top1, setting="s", arch="r8"):
        return {"dataset": "d", "setting": setting, "noise": None, "imbalance": None, "role": "student",
                "method": method, "teacher_arch": None if method == "ce" else "r14", "arch": arch, "seed": seed,
                "teacher": None if method == "ce" else "r14", "top1": top1}
    rows = [row("ce", 0, 0.50), row("ce", 1, 0.60), row("ce", 2, 0.40),
            row("kd", 0, 0.51), row("kd", 1, 0.60), row("kd", 2, 0.39), row("kd", 3, 0.99),  # no CE of seed 3
            row("at", 0, 0.70, setting="other"),  # another setting's CE: none
            row("ce", 0, 0.10, arch="r20"), row("sp", 0, 0.45, arch="r20"), row("sp", 1, 0.05, arch="r20")]
    keys = ["dataset", "setting", "noise", "imbalance", "role", "method", "teacher_arch", "arch"]
    groups = results.aggregate(rows, keys)
    results.add_seeds_ahead(groups, rows, keys)
    ahead = {(g["method"], g["arch"]): g["seeds_ahead"] for g in groups}
    assert ahead == {("ce", "r8"): None, ("kd", "r8"): [1, 3], ("at", "r8"): None, ("ce", "r20"): None,
                     ("sp", "r20"): [1, 1]}


def test_tiny_study_writes_its_table_and_plots(tiny):
    _, out = tiny
    md = (out / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert "## synthetic:8:4:96: cifar_resnet14 → cifar_resnet8" in md
    assert "| method | clean | symmetric:0.4 |" in md
    first = md.split("| method | clean | symmetric:0.4 |\n", 1)[1].split("\n\n", 1)[0]  # final top-1 (best after)
    lines = [ln for ln in first.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| teacher (cifar_resnet14)", "| ce (cifar_resnet8)", "| kd",
                                                    "| at"]
    kd = next(g for g in res["groups"] if g["method"] == "kd" and g["setting"] == "clean")
    ahead, paired = kd["seeds_ahead"]
    assert paired == 2 and f"{100 * kd['top1_mean']:.2f} ± {100 * kd['top1_std']:.2f} " \
                           f"({100 * kd['gain_over_ce']:+.2f}, {ahead}/2)" in md
    for column in (1, 2):  # the best student of each column is bold, the teacher never
        cells = [ln.split(" | ")[column] for ln in lines]
        assert sum(c.startswith("**") for c in cells[1:]) >= 1 and not cells[0].startswith("**")
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["synthetic-8-4-96_cifar_resnet14-cifar_resnet8_gain.png",
                                      "synthetic-8-4-96_cifar_resnet14-cifar_resnet8_top1.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)


def test_second_invocation_runs_nothing(tiny, monkeypatch, capsys):
    spec, out = tiny
    before = json.loads((out / "results.json").read_text())

    def no_training(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(loop, "run", no_training)
    capsys.readouterr()
    kdcli("study", spec, "--out", out)
    assert "16 runs, 16 finished, 0 to resume, 0 to start" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == before["runs"]
    kdcli("study", spec, "--out", out, "--print-commands")
    assert capsys.readouterr().out == ""  # nothing left to run


def test_a_changed_spec_does_not_reuse_runs_silently(tiny, tmp_path, capsys):
    spec, out = tiny
    recorded = (out / "spec.yaml").read_text()
    changed = tmp_path / "changed.yaml"
    changed.write_text(spec.read_text().replace("epochs: 1", "epochs: 3"))
    err = fails(capsys, "study", changed, "--out", out)
    assert "started with other options (--epochs 1 → 3)" in err and "give the study another --out" in err
    assert "--overwrite" not in err  # kdcli study has no such option
    assert (out / "spec.yaml").read_text() == recorded  # the study's record of its spec is left as it was


def test_interrupted_study_resumes_and_printed_commands_run_alone(tmp_path, capsys):
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE)
    out = tmp_path / "out"
    kdcli("study", spec, "--out", out, "--print-commands")
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and all(ln.startswith("kdcli train ") for ln in lines)  # teacher and CE
    assert "1 more runs wait for teachers" in captured.err  # the student needs its teacher first
    # run the printed teacher line alone, interrupted after one epoch; the CE line to the end
    kdcli(*shlex.split(lines[0])[1:], "--stop-after-epoch", "1")
    kdcli(*shlex.split(lines[1])[1:])
    capsys.readouterr()
    kdcli("study", spec, "--out", out, "--print-commands")
    again = capsys.readouterr().out.splitlines()
    teacher_dir = out / "runs" / "synthetic-8-4-64" / "clean" / "seed-0" / "teacher-cifar_resnet8"
    assert again == [f"kdcli train --resume {teacher_dir}"]
    kdcli("study", spec, "--out", out)
    said = capsys.readouterr().out
    assert "3 runs, 1 finished, 1 to resume, 1 to start" in said
    teacher = Report.model_validate_json((teacher_dir / "report.json").read_text())
    assert [h.epoch for h in teacher.history] == [1, 2]
    assert "resuming" in (teacher_dir / "log.txt").read_text()
    # the resumed teacher ends where an uninterrupted one does (runs are deterministic per seed)
    kdcli(*shlex.split(lines[0])[1:-2], "--out", tmp_path / "straight")
    straight = Report.model_validate_json((tmp_path / "straight" / "report.json").read_text())
    assert straight.student.sha256 == teacher.student.sha256
    assert json.loads((out / "results.json").read_text())["missing"] == []


def test_jobs_run_in_worker_processes_with_the_same_results(tmp_path, capsys):
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE.replace("epochs: 2", "epochs: 1"))
    kdcli("study", spec, "--out", tmp_path / "inline")
    kdcli("study", spec, "--out", tmp_path / "pool", "--jobs", "2")
    inline = {p.relative_to(tmp_path / "inline"): r for p, r in _reports(tmp_path / "inline").items()}
    pool = {p.relative_to(tmp_path / "pool"): r for p, r in _reports(tmp_path / "pool").items()}
    assert len(pool) == 3 and set(pool) == set(inline)
    for key, r in pool.items():  # workers use 1 thread each, this process 2: equal up to float summation order
        assert r.environment.world_size == 1 and r.config["out"].startswith(str(tmp_path / "pool"))
        assert r.history[0].loss == pytest.approx(inline[key].history[0].loss, rel=1e-4)
        assert r.metrics.final.nll == pytest.approx(inline[key].metrics.final.nll, rel=1e-3)


def test_printed_command_builds_the_same_config(tmp_path, monkeypatch):
    """The command line of a run, parsed by the CLI, gives back the very RunConfig."""
    cfgs = [
        RunConfig(command="distill", teacher="t.safetensors", student="cifar_resnet8", method="kd+at",
                  method_args={"at.beta": "62.5", "kd.T": "2"}, student_stages=[1, 2], teacher_stages=[2, 3],
                  dataset="synthetic:8:4:64", noise="symmetric:0.2", imbalance="step:5:0.5", corruption_seed=3,
                  class_order="random:1", streaming=True, shuffle_buffer=64, augment="none", workers=1, epochs=3,
                  batch_size=16, lr=0.1, weight_decay=0.0, momentum=0.8, schedule="step", seed=4,
                  precision="bf16", image_size=12, eval_split="test", out=str(tmp_path / "a b")),
        RunConfig(command="train", student="cifar_resnet8", dataset="digits", out=str(tmp_path / "c")),
    ]
    seen = []
    monkeypatch.setattr(loop, "run", lambda cfg, **kw: seen.append(cfg))
    for cfg in cfgs:
        kdcli(*shlex.split(plan.shell(plan.command_line(cfg)))[1:])
    assert seen == cfgs


# ------------------------------------------------------------------------------------------------ specs


def _bad(tmp_path, capsys, text: str, *extra) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return fails(capsys, "study", path, "--out", tmp_path / "o", *extra)


@pytest.mark.parametrize("edit, expected", [
    (("methods:", "methdos:"), "unknown key 'methdos'"),
    (("{epochs: 1, batch_size: 32}", "{epoch: 1}"), "unknown run option 'epoch'"),
    (("{epochs: 1, batch_size: 32}", "{seed: 3}"), "the grid sets it"),
    (("{epochs: 1, batch_size: 32}", "{epochs: 0}"), "invalid option epochs"),
    (("[kd, at]", "[kd, nope]"), "unknown method 'nope'"),
    (('"symmetric:0.4"', '"symmetric:1.5"'), "symmetric:1.5"),
    (("none, ", '"longtail:0.5", '), "longtail:0.5"),
    (("cifar_resnet14", "cifar_resnet15"), "unknown model 'cifar_resnet15'"),
    (("synthetic:8:4:96", "no/such-local-dir"), "dataset"),
    (("name: tiny", "name: tiny\nmethod_args: {fitnet: {beta: 1}}"), "not among the methods"),
    (("name: tiny", "name: tiny\nmethod_args: {kd: {Temp: 1}}"), "has no argument 'Temp'"),
    (("seeds: [0, 1]", "seeds: []"), "seeds"),
    (("pairs:\n  - {teacher: cifar_resnet14, student: cifar_resnet8}", "pairs:\n  - {teacher: cifar_resnet14}"),
     "missing key 'pairs.0.student'"),
    (("name: tiny", "name: [tiny"), "not valid YAML"),
    (("seeds: [0, 1]", "seeds: [0, 0]"), "seeds: 0 given twice"),
    (("seeds: [0, 1]", "seeds: [-1, 1]"), "seed -1 is out of range"),
    (("[kd, at]", "[kd, kd]"), "methods: kd given twice"),
    (("[kd, at]", "[]"), "methods"),
    (('noise: [none, "symmetric:0.4"]', "noise: []"), "noise"),
    (("dataset: synthetic:8:4:96", "dataset: []"), "dataset"),
])
def test_bad_specs_are_one_line(edit, expected, tmp_path, capsys):
    old, new = edit
    assert old in TINY
    err = _bad(tmp_path, capsys, TINY.replace(old, new, 1))
    assert expected in err and "study spec" in err
    assert not (tmp_path / "o").exists()  # validated before anything is written


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_bytes(TINY.replace("tiny", "t\xe9").encode("latin-1"))
    assert "cannot be read as UTF-8 text" in fails(capsys, "study", path, "--out", tmp_path / "o")


def test_runs_that_would_share_a_folder_are_refused(tmp_path):
    """Folder names keep letters, digits and . _ + -: two runs whose names differ only elsewhere (or two
    checkpoints both called model.safetensors in folders of one name) would share a folder, and one of them
    would silently never run."""
    two_checkpoints = study_spec.parse({
        "dataset": "digits", "methods": ["kd"],
        "pairs": [{"teacher": "exp1/teacher/model.safetensors", "student": "cifar_resnet8"},
                  {"teacher": "exp2/teacher/model.safetensors", "student": "cifar_resnet8"}]})
    with pytest.raises(KdcliError, match="'exp1/teacher/model.safetensors' and .*'exp2/teacher/model.safetensors' "
                                         "would share one run folder"):
        plan.plan(two_checkpoints, tmp_path)
    two_spellings = study_spec.parse({"dataset": "digits", "methods": ["kd"], "noise": ["symmetric:0.2",
                                                                                        "symmetric: 0.2"],
                                      "pairs": [{"teacher": "cifar_resnet14", "student": "cifar_resnet8"}]})
    with pytest.raises(KdcliError, match="would share one run folder"):
        plan.plan(two_spellings, tmp_path)
    shared = study_spec.parse({"dataset": "digits", "methods": ["kd"],  # one teacher for two pairs: one folder, fine
                               "pairs": [{"teacher": "cifar_resnet14", "student": "cifar_resnet8"},
                                         {"teacher": "cifar_resnet14", "student": "cifar_resnet14"}]})
    assert len(plan.plan(shared, tmp_path)) == 1 + 2 + 2


def test_bad_study_invocations_are_one_line(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY)
    assert "--preset" in fails(capsys, "study", "--out", tmp_path / "o")
    assert "unknown preset 'nope'" in fails(capsys, "study", "--preset", "nope", "--out", tmp_path / "o")
    assert "--jobs" in fails(capsys, "study", tmp_path / "s.yaml", "--out", tmp_path / "o", "--jobs", "0")
    assert "--out" in fails(capsys, "study", tmp_path / "s.yaml")
    assert "does not exist" in fails(capsys, "study", tmp_path / "missing.yaml", "--out", tmp_path / "o")
    assert "expected a mapping" in _bad(tmp_path, capsys, "- just\n- a list\n")
    assert "is not a file" in fails(capsys, "study", tmp_path, "--out", tmp_path / "o")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in fails(capsys, "study", tmp_path / "s.yaml", "--out", tmp_path / "file")


def test_toml_and_yaml_specs_are_the_same_study(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('name = "tiny"\ndataset = "synthetic:8:4:96"\nmethods = ["kd", "at"]\n'
                    'noise = ["none", "symmetric:0.4"]\nseeds = [0, 1]\n[options]\nepochs = 1\nbatch_size = 32\n'
                    '[[pairs]]\nteacher = "cifar_resnet14"\nstudent = "cifar_resnet8"\n')
    yaml_ = tmp_path / "s.yaml"
    yaml_.write_text(TINY)
    assert study_spec.load(toml)[0] == study_spec.load(yaml_)[0]
    toml.write_text("a = [")
    with pytest.raises(KdcliError, match="not valid TOML"):
        study_spec.load(toml)


@pytest.mark.parametrize("name", ["digits-noise", "digits-imbalance"])  # CIFAR-10's: test_study_cifar10.py
def test_presets_are_valid_studies(name, tmp_path):
    from kdcli import methods

    spec, _ = study_spec.load(preset=name)
    runs = plan.plan(spec, tmp_path)
    assert spec.methods == [m for m in methods.available() if m != "ce"]  # all methods of `kdcli methods`
    assert len(spec.seeds) == 3 and len(spec.settings) >= 3
    per_cell = 1 + 1 + len(spec.methods)  # teacher, CE, a student per method
    assert len(runs) == len(spec.settings) * len(spec.seeds) * per_cell
    plan.check(spec, runs)  # built in: every spec is checked against the data


# ---------------------------------------------------------------------------------------------- compare


def _report(folder: Path, method: str, noise: str | None, seed: int, top1: float, **options) -> None:
    teacher = None if method == "ce" else {"name": "cifar_resnet26", "source": "checkpoint", "params": 10}
    cfg = RunConfig(command="train" if method == "ce" else "distill", student="cifar_resnet8", method=method,
                    teacher=None if method == "ce" else f"t{seed}.safetensors", dataset="digits", noise=noise,
                    seed=seed, corruption_seed=seed, out=str(folder), **options)
    metrics = {"num_examples": 10, "top1": top1, "nll": 1.0, "ece": 0.1, "per_class_top1": {}}
    report = Report(
        command=cfg.command, created="2026-11-25T00:00:00+00:00", config=cfg.model_dump(),
        environment={"python": "3", "torch": "2", "timm": "1", "platform": "x", "device": "cpu", "world_size": 1,
                     "precision": "fp32"},
        data={"dataset": "digits", "source": "builtin", "train_split": "train", "eval_split": "test",
              "num_classes": 10, "class_names": [str(i) for i in range(10)], "num_train": 100, "num_eval": 10,
              "image_size": 8, "in_chans": 1, "streaming": False},
        teacher=teacher, student={"name": "cifar_resnet8", "source": "timm", "params": 5},
        method={"name": method, "family": "logits", "args": {}}, metrics={"final": metrics}, history=[],
        timing={"total_seconds": 1.0, "train_images_per_s": 1.0})
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(report.model_dump_json())


@pytest.fixture
def hand_written(tmp_path):
    top1 = {("ce", None): (0.90, 0.92), ("kd", None): (0.93, 0.95),
            ("ce", "symmetric:0.4"): (0.70, 0.74), ("kd", "symmetric:0.4"): (0.80, 0.80)}
    for (method, noise), values in top1.items():
        for seed, v in enumerate(values):
            _report(tmp_path / "runs" / f"{method}-{noise}-{seed}", method, noise, seed, v)
    return tmp_path / "runs"


def test_compare_groups_by_what_differs(hand_written, capsys):
    kdcli("compare", hand_written, "--format", "md")
    assert capsys.readouterr().out == (
        "| noise | teacher | method | n | top-1 % | Δ vs CE |\n"
        "|---|---|---|---|---|---|\n"
        "| – | – | ce | 2 | 91.00 ± 1.41 | – |\n"
        "| – | cifar_resnet26 | kd | 2 | 94.00 ± 1.41 | +3.00 |\n"
        "| symmetric:0.4 | – | ce | 2 | 72.00 ± 2.83 | – |\n"
        "| symmetric:0.4 | cifar_resnet26 | kd | 2 | 80.00 ± 0.00 | +8.00 |\n")
    kdcli("compare", *sorted(hand_written.glob("kd-None-*/report.json")), "--format", "csv")
    assert capsys.readouterr().out == "n,top-1 %,Δ vs CE\n2,94.00 ± 1.41,–\n"  # they agree on every setting
    kdcli("compare", hand_written)  # a rich table on the terminal
    assert "symmetric:0.4" in capsys.readouterr().out


def test_compare_pools_an_exact_teacher_cache_with_no_cache(hand_written, capsys):
    """A study's logit students read a shared exact cache (float32, a view per epoch): compare puts them beside
    the other methods, against the same CE, whatever the cache's path; a lossy cache is a setting of its own."""
    for seed, v in enumerate((0.94, 0.96)):
        _report(hand_written / f"dkd-{seed}", "dkd", None, seed, v, epochs=8, teacher_cache=f"/c/{seed}",
                cache_views=8, cache_dtype="float32")
        _report(hand_written / f"kd16-{seed}", "kd", None, seed, 0.5, epochs=8, teacher_cache=f"/c/{seed}",
                cache_views=8, cache_dtype="float16")
    for p in hand_written.glob("[ck][ed]-*"):  # the others: 8 epochs, no cache
        report = json.loads((p / "report.json").read_text())
        report["config"]["epochs"] = 8
        (p / "report.json").write_text(json.dumps(report))
    kdcli("compare", hand_written, "--format", "md")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| noise | teacher | method | cache_views | cache_dtype | n | top-1 % | Δ vs CE |"
    assert lines[2:6] == ["| – | – | ce | – | – | 2 | 91.00 ± 1.41 | – |",
                          "| – | cifar_resnet26 | dkd | – | – | 2 | 95.00 ± 1.41 | +4.00 |",
                          "| – | cifar_resnet26 | kd | – | – | 2 | 94.00 ± 1.41 | +3.00 |",
                          "| – | cifar_resnet26 | kd | 8 | float16 | 2 | 50.00 ± 0.00 | -41.00 |"]


def test_compare_keys_how_a_student_was_taught_apart_from_its_setting(hand_written, capsys):
    """Options only a distilled run has (a pretrained teacher, an ensemble, a lossy cache) are shown, yet CE,
    which has none of them, is still the baseline of their setting; an ensemble is not its first teacher."""
    for seed, v in enumerate((0.96, 0.98)):
        _report(hand_written / f"kdpre-{seed}", "kd", None, seed, v, teacher_pretrained=True)
    for seed in range(2):  # two teachers: the report names both
        _report(hand_written / f"ens-{seed}", "kd", None, seed, 0.5)
        report = json.loads((hand_written / f"ens-{seed}" / "report.json").read_text())
        report["teachers"] = [report["teacher"], {**report["teacher"], "name": "cifar_resnet8"}]
        (hand_written / f"ens-{seed}" / "report.json").write_text(json.dumps(report))
    kdcli("compare", hand_written, "--format", "md")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| noise | teacher | method | teacher_pretrained | n | top-1 % | Δ vs CE |"
    assert lines[2:6] == ["| – | – | ce | False | 2 | 91.00 ± 1.41 | – |",
                          "| – | cifar_resnet26 | kd | False | 2 | 94.00 ± 1.41 | +3.00 |",
                          "| – | cifar_resnet26 | kd | True | 2 | 97.00 ± 1.41 | +6.00 |",
                          "| – | cifar_resnet26+cifar_resnet8 | kd | False | 2 | 50.00 ± 0.00 | -41.00 |"]


def test_compare_counts_a_report_named_twice_once(hand_written, capsys):
    one = next(hand_written.glob("kd-None-0"))
    kdcli("compare", hand_written, one / "report.json", hand_written / ".." / hand_written.name, "--format", "csv")
    out = capsys.readouterr().out
    assert "2,94.00 ± 1.41,+3.00" in out and ",4," not in out


def test_compare_bad_inputs_are_one_line(hand_written, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no report.json" in fails(capsys, "compare", tmp_path / "empty")
    assert "does not exist" in fails(capsys, "compare", tmp_path / "nope")
    (tmp_path / "x.json").write_text("{}")
    assert "is not a kdcli run report" in fails(capsys, "compare", tmp_path / "x.json")
    edited = json.loads(next(hand_written.rglob("report.json")).read_text())
    del edited["config"]["seed"], edited["config"]["dataset"]  # a report whose config was edited by hand
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert "is not a kdcli run report" in fails(capsys, "compare", tmp_path / "edited.json")
    assert "--format" in fails(capsys, "compare", hand_written, "--format", "xml")


def test_mean_std_and_gain_on_hand_made_rows():
    assert results.mean_std([0.5]) == (0.5, None)
    assert results.mean_std([None, None]) == (None, None)
    mean, std = results.mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and std == pytest.approx(statistics.stdev([0.1, 0.2, 0.6]))
    rows = [{"method": m, "teacher": t, "noise": n, "seed": s, "top1": v} for m, t, n, s, v in [
        ("ce", None, "a", 0, 0.5), ("ce", None, "a", 1, 0.7), ("kd", "T", "a", 0, 0.9), ("kd", "T", "b", 0, 0.2),
        ("ce", None, "c", 0, 0.5), ("ce", None, "c", 1, 0.7), ("kd", "T", "c", 7, 0.9), ("kd", "T", "c", 8, 0.5)]]
    groups = results.aggregate(rows, ["noise", "method", "teacher"])
    results.add_gain(groups, ["noise"])
    gains = {(g["noise"], g["method"]): g["gain_over_ce"] for g in groups}
    assert gains[("a", "ce")] is None and gains[("b", "kd")] is None  # CE has none; b has no CE
    assert gains[("a", "kd")] == pytest.approx(0.9 - 0.5)  # paired with CE's seed 0, not CE's mean 0.6
    assert gains[("c", "kd")] == pytest.approx(0.7 - 0.6)  # no seed in common: the difference of the means


def _one_epoch_study_where(tmp_path, monkeypatch, prefix: str, error: BaseException) -> Path:
    """The 3-run study, with ``loop.run`` raising ``error`` for the runs whose folder starts with ``prefix``."""
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE.replace("epochs: 2", "epochs: 1"))
    real = loop.run

    def run(cfg, **kw):
        if Path(cfg.out).name.startswith(prefix):
            raise error
        return real(cfg, **kw)

    monkeypatch.setattr(loop, "run", run)
    return spec


def test_an_unexpected_error_fails_its_run_not_the_study(tmp_path, monkeypatch, capsys):
    """Out of memory or a bug in one run: recorded as that run's failure with its traceback in the run's log;
    the other runs of the study still run and the results are written."""
    spec = _one_epoch_study_where(tmp_path, monkeypatch, "ce-", RuntimeError("CUDA out of memory\nmore detail"))
    err = fails(capsys, "study", spec, "--out", tmp_path / "o")
    assert "1 runs failed and 0 were skipped" in err and "RuntimeError: CUDA out of memory" in err
    assert "more detail" not in err  # one line
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert sorted(r["role"] for r in res["runs"]) == ["student", "teacher"] and len(res["missing"]) == 1
    log = next((tmp_path / "o" / "runs").rglob("ce-*/log.txt")).read_text()
    assert "Traceback" in log and "CUDA out of memory" in log


def test_a_failed_run_is_reported_and_its_students_skipped(tmp_path, monkeypatch, capsys):
    spec = _one_epoch_study_where(tmp_path, monkeypatch, "teacher-",
                                  loop.TrainingDiverged("loss term 'ce' became nan at step 3"))
    err = fails(capsys, "study", spec, "--out", tmp_path / "o")
    assert "1 runs failed and 1 were skipped" in err and "became nan" in err
    res = json.loads((tmp_path / "o" / "results.json").read_text())  # what finished is still aggregated
    assert [r["role"] for r in res["runs"]] == ["student"] and len(res["missing"]) == 2
    assert "became nan" in next((tmp_path / "o" / "runs").rglob("teacher-*/log.txt")).read_text()


def test_plan_shares_a_teacher_between_pairs_and_orders_teachers_first(tmp_path):
    spec = study_spec.parse({"dataset": ["digits", "synthetic:8:10:64"], "methods": ["kd", "at"], "seeds": [0, 1],
                             "pairs": [{"teacher": "cifar_resnet14", "student": "cifar_resnet8"},
                                       {"teacher": "cifar_resnet14", "student": "cifar_vit_micro_p4"}],
                             "noise": ["none", "pairflip:0.2"], "imbalance": ["none", "step:5:0.5"],
                             "teacher_options": {"epochs": 5}, "corruption_seed": 7})
    runs = plan.plan(spec, tmp_path)
    cells = 2 * 4 * 2  # datasets × settings × seeds
    teachers = [r for r in runs if r.role == "teacher"]
    assert len(teachers) == cells and len(runs) == cells * (1 + 2 + 2 * 2)  # 1 teacher, 2 CE, 2 pairs × 2 methods
    assert all(r.cfg.epochs == 5 for r in teachers) and all(r.cfg.epochs == 30 for r in runs if r.role == "student")
    assert {r.cfg.corruption_seed for r in runs} == {7}
    assert {r.setting for r in runs} == {"clean", "pairflip:0.2", "step:5:0.5", "pairflip:0.2 + step:5:0.5"}
    position = {r.out: i for i, r in enumerate(runs)}
    for r in runs:
        for need in r.needs:
            assert position[need.out] < position[r.out] and r.cfg.teacher == [str(need.out / "model.safetensors")]
            assert (need.dataset, need.setting, need.seed) == (r.dataset, r.setting, r.seed)
    assert len({r.out for r in runs}) == len(runs)


def test_workers_share_the_cores_and_spread_over_gpus():
    from kdcli.study.execute import worker_setup
    assert worker_setup(0, 2, 2, []) == (1, None) and worker_setup(1, 4, 2, []) == (1, None)  # at least a thread
    assert worker_setup(0, 2, 16, ["0"]) == (8, None)  # one GPU: every worker on it
    assert [worker_setup(i, 4, 16, ["2", "5"])[1] for i in range(4)] == ["2", "5", "2", "5"]


def test_one_run_per_gpu_by_default_each_on_its_own_cores():
    from kdcli.study.execute import default_jobs, sharing_warning, worker_cores
    assert default_jobs([]) == 1 and default_jobs(["0"]) == 1 and default_jobs(["0", "3"]) == 2
    assert sharing_warning(1, ["0"]) is None and sharing_warning(2, ["0", "1"]) is None
    assert "up to 3 runs on each of 1 GPU" in sharing_warning(3, ["0"])
    assert [worker_cores(i, 2, [0, 1, 2, 3, 4]) for i in range(2)] == [[0, 1], [2, 3]]
    assert worker_cores(1, 4, [0, 1]) == [0, 1]  # fewer cores than runs: all of them


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), (loop.Interrupted(15, "stopped by SIGTERM"), 143)])
def test_ctrl_c_leaves_a_study_that_the_same_command_finishes(tmp_path, monkeypatch, capsys, stop, code):
    """Ctrl-C, or a preempted run (SIGTERM: the run saved its state and stopped), stops the study with one
    line and 128 + the signal; the same command finishes it."""
    real = loop.run
    spec = _one_epoch_study_where(tmp_path, monkeypatch, "kd-", stop)
    with pytest.raises(SystemExit) as exc:
        kdcli("study", spec, "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert exc.value.code == code and "run the same command again" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()
    monkeypatch.setattr(loop, "run", real)
    kdcli("study", spec, "--out", tmp_path / "o")
    assert "3 runs, 2 finished, 0 to resume, 1 to start" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["missing"] == []


def test_sigterm_between_runs_stops_the_study_with_one_line(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM while the study waits for its runs (each saves itself in its own process) stops the
    study at once: one line, 143, no results that look complete; the SIGTERM handler is put back afterwards."""
    import os
    import signal
    import time

    from kdcli.study import execute

    def waiting(todo, finished, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the study")

    monkeypatch.setattr(execute, "execute", waiting)
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE)
    def unhandled(signum, frame):  # what the test process does if the study sets no handler of its own
        raise AssertionError("the study left SIGTERM to the process's own handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as exc:
            kdcli("study", spec, "--out", tmp_path / "o")
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert exc.value.code == 143 and "run the same command again" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_study_shares_one_teacher_cache_per_teacher_and_cell_among_logit_students(tmp_path):
    s = study_spec.parse({"dataset": "synthetic:8:4:64", "pairs": [{"teacher": "cifar_resnet14",
                                                                     "student": "cifar_resnet8"}],
                          "methods": ["kd", "dkd", "at"], "seeds": [0, 1], "teacher_cache": True,
                          "options": {"epochs": 1}})
    runs = plan.plan(s, tmp_path)
    by = {(r.method, r.seed): r for r in runs if r.role == "student" and r.method != "ce"}
    assert by[("kd", 0)].cfg.teacher_cache == by[("dkd", 0)].cfg.teacher_cache  # shared within a cell
    assert by[("kd", 0)].cfg.teacher_cache != by[("kd", 1)].cfg.teacher_cache  # not across cells (seeds)
    assert by[("kd", 0)].cfg.teacher_cache.endswith("teacher-cache-cifar_resnet14")
    assert by[("at", 0)].cfg.teacher_cache is None  # a feature method reads the teacher itself
    assert "--teacher-cache" in plan.command_line(by[("kd", 0)].cfg)


def test_runs_without_a_cache_carry_no_cache_options(tmp_path):
    s = study_spec.parse({"dataset": "synthetic:8:4:64", "pairs": [{"teacher": "cifar_resnet14",
                                                                     "student": "cifar_resnet8"}],
                          "methods": ["kd", "at"], "teacher_cache": True,
                          "options": {"epochs": 2, "cache_views": 2, "cache_dtype": "float32"}})
    runs = plan.plan(s, tmp_path)
    for run in runs:  # `kdcli train` has no cache options: its printed command must still parse
        line = plan.command_line(run.cfg)
        cached = run.cfg.teacher_cache is not None
        assert ("--cache-views" in line) == cached and ("--cache-dtype" in line) == cached, line
    assert sum(r.cfg.teacher_cache is not None for r in runs) == 1  # kd only
