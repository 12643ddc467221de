"""The CIFAR-10 presets (noise and imbalance, CPU and full), their --dataset override, the imbalance metrics
(balanced and many/medium/few-shot top-1) and the study results that show them. A small CIFAR-10-shaped copy in
the hub layout stands in for the real data."""

import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdcli import methods
from kdcli.config import RunConfig
from kdcli.engine import loop
from kdcli.engine.metrics import Evaluator, balanced_top1, shot_top1, train_class_counts, with_shots
from kdcli.engine.report import Report
from kdcli.errors import KdcliError
from kdcli.study import plan, results
from kdcli.study import spec as study_spec
from tests.test_cli import fails

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 500  # training images per class: the CPU presets' train[:5000]; longtail:100 fills every shot group
PRESETS = ["cifar10-noise", "cifar10-noise-cpu", "cifar10-imbalance", "cifar10-imbalance-cpu"]


def _split(n: int, seed: int):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), n // 10)
    rng.shuffle(labels)  # rows shuffled, as in the hub copy
    images = []
    for label in labels:  # a class colour under noise: learnable, small
        pixels = np.clip(rng.normal(25 * label, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"img": images, "label": labels.tolist()}, features=features)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """CIFAR-10 in the hub layout: plain_text/{train,test}-00000-of-00001.parquet, columns img and label."""
    root = tmp_path_factory.mktemp("cifar10")
    (root / "plain_text").mkdir()
    _split(10 * PER_CLASS, 0).to_parquet(str(root / "plain_text" / "train-00000-of-00001.parquet"))
    _split(2000, 1).to_parquet(str(root / "plain_text" / "test-00000-of-00001.parquet"))
    return root


# ----------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_cifar10_presets_need_the_dataset_path(name, tmp_path, capsys):
    with pytest.raises(KdcliError) as e:
        study_spec.load(preset=name)
    assert str(e.value) == (f"preset {name} needs --dataset PATH (CIFAR-10 in the hub layout, a folder holding "
                            "plain_text/train-*.parquet and test-*.parquet): its dataset is a placeholder")
    err = fails(capsys, "study", "--preset", name, "--out", tmp_path / "o")  # the CLI: one line, exit 2
    assert f"preset {name} needs --dataset PATH" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", PRESETS)
def test_cifar10_presets_are_valid_studies_on_a_local_copy(name, cifar, tmp_path):
    spec, text = study_spec.load(preset=name, dataset=str(cifar))
    assert spec.dataset == [str(cifar)] and spec.methods == [m for m in methods.available() if m != "ce"]
    assert spec.seeds == [0, 1, 2] and spec.corruption_seed == "seed" and spec.teacher_cache
    if "noise" in name:
        assert spec.settings == [(n, None) for n in (None, "symmetric:0.2", "symmetric:0.4", "symmetric:0.6",
                                                       "asymmetric:0.4")]
    else:
        assert spec.settings == [(None, i) for i in ("longtail:10", "longtail:50", "longtail:100")]
    runs = plan.plan(spec, tmp_path)
    assert len(runs) == len(spec.settings) * 3 * (1 + 1 + 20) == (330 if "noise" in name else 198)
    plan.check(spec, runs)  # methods, models, the data (the local copy) and every corruption spec
    o = spec.options
    assert o["augment"] == "cifar" and o["cache_views"] == o["epochs"]  # the cache is exact: one view per epoch
    if name.endswith("-cpu"):
        assert (o["train_split"], o["eval_split"], o["epochs"], o["schedule"], o["batch_size"]) == \
               ("train[:5000]", "test[:2000]", 8, "cosine", 64)
        assert spec.pairs[0].teachers == ["cifar_resnet14"] and spec.pairs[0].student == "cifar_resnet8"
        assert spec.teacher_options == {"epochs": 24}  # a teacher ahead of its student; all else as the students
        teacher = next(r for r in plan.plan(spec, tmp_path / "t") if r.role == "teacher")
        assert teacher.cfg.epochs == 24 and teacher.cfg.lr == o["lr"] and teacher.cfg.augment == "cifar"
    else:  # all the data, the field's recipe
        assert "train_split" not in o and "eval_split" not in o and "precision" not in o
        assert (o["epochs"], o["schedule"], o["lr"], o["batch_size"]) == (240, "step", 0.05, 64)
        assert spec.pairs[0].teachers == ["cifar_resnet56"] and spec.pairs[0].student == "cifar_resnet20"
        assert spec.teacher_options == {}  # 240 epochs train the teacher to convergence as they are
    for run in runs:  # every teacher trained on the very corrupted data of its cell, like its students
        if run.role == "student" and run.needs:
            t = run.needs[0].cfg
            assert (t.noise, t.imbalance, t.corruption_seed, t.seed, t.train_split) == \
                   (run.cfg.noise, run.cfg.imbalance, run.cfg.corruption_seed, run.cfg.seed, run.cfg.train_split)
    cached = {r.method for r in runs if r.cfg.teacher_cache}
    assert cached == {"dist", "dkd", "kd", "lskd", "nkd"}  # the logit students share one cache per cell
    # the study folder's copy of the spec names the data it ran on, and reads back as the same study
    assert f'dataset: "{cifar}"  # --dataset; the spec said: PATH' in text
    assert study_spec.parse(yaml.safe_load(text)) == spec


def test_dataset_override_of_any_spec(tmp_path):
    yaml_ = tmp_path / "s.yaml"
    yaml_.write_text("dataset: digits  # the data\npairs: [{teacher: cifar_resnet8, student: cifar_resnet8}]\n"
                     "methods: [kd]\n")
    spec, text = study_spec.load(yaml_, dataset="synthetic:8:4:64")
    assert spec.dataset == ["synthetic:8:4:64"]
    assert text.splitlines()[0] == 'dataset: "synthetic:8:4:64"  # --dataset; the spec said: digits  # the data'
    spec, text = study_spec.load(yaml_, dataset=["a", "b"])
    assert spec.dataset == ["a", "b"] and yaml.safe_load(text)["dataset"] == ["a", "b"]
    toml = tmp_path / "s.toml"
    toml.write_text('dataset = "PATH"\nmethods = ["kd"]\n[[pairs]]\nteacher = "cifar_resnet8"\n'
                    'student = "cifar_resnet8"\n')
    with pytest.raises(KdcliError, match=r"^study spec .*s\.toml needs --dataset PATH: its dataset is a placeholder$"):
        study_spec.load(toml)
    spec, text = study_spec.load(toml, dataset="digits")
    assert spec.dataset == ["digits"] and text.startswith('dataset = "digits"  # --dataset; the spec said: "PATH"\n')
    # a dataset key spread over lines is left as it is, under a comment naming the override
    yaml_.write_text("dataset:\n  - digits\npairs: [{teacher: cifar_resnet8, student: cifar_resnet8}]\n"
                     "methods: [kd]\n")
    spec, text = study_spec.load(yaml_, dataset="x")
    assert spec.dataset == ["x"] and text.startswith("# kdcli study --dataset x: replaces the datasets below\n")
    for bad in ("", " ", [], "PATH"):
        with pytest.raises(KdcliError, match="--dataset"):
            study_spec.with_dataset(spec, bad)


# ----------------------------------------------------------------------------------------- the metrics


def test_balanced_and_shot_top1_by_hand():
    assert balanced_top1([1.0, 0.5, None, 0.0]) == pytest.approx(0.5)  # the absent class is left out
    assert balanced_top1([None, None]) is None
    # training counts on the group boundaries: > 100 many, 20..100 medium, < 20 few
    per_class = [0.9, 0.8, 0.6, 0.4, 0.2, None, 0.0]
    counts = [500, 101, 100, 20, 19, 5, 0]
    shots = shot_top1(per_class, counts)
    assert shots == {"many": pytest.approx(0.85), "medium": pytest.approx(0.5), "few": pytest.approx(0.1)}
    assert shot_top1([0.5, 0.7], [200, 300]) == {"many": pytest.approx(0.6), "medium": None, "few": None}
    assert shot_top1([None, 0.3], [10, 500]) == {"many": pytest.approx(0.3), "medium": None, "few": None}
    with pytest.raises(ValueError):
        shot_top1([0.5], [1, 2])
    # the counts as trained: rows with -1 were not trained on
    assert train_class_counts(np.array([0, 2, -1, 2, 2, -1]), 4) == [1, 0, 3, 0]
    assert train_class_counts(None, 4) is None


def test_evaluator_reports_balanced_top1_and_the_shots_fill_in():
    ev = Evaluator(3, ["a", "b", "c"], with_teacher=False)
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 0])  # class a: 3 of 4, class b: 1 of 2, class c: absent
    ev.update(torch.nn.functional.one_hot(pred, 3).float() * 5, target)
    m = ev.compute()
    assert m.top1 == pytest.approx(4 / 6) and m.per_class_top1 == {"a": 0.75, "b": 0.5, "c": None}
    assert m.balanced_top1 == pytest.approx((0.75 + 0.5) / 2) and m.shot_top1 is None
    shots = with_shots(m, [150, 10, 40]).shot_top1
    assert shots == {"many": pytest.approx(0.75), "medium": None, "few": pytest.approx(0.5)}
    assert with_shots(m, None) is m and with_shots(None, [1, 2, 3]) is None


def _report(folder: Path, method: str, seed: int, top1: float, balanced: float, shots: dict, best: tuple) -> None:
    cfg = RunConfig(command="train" if method == "ce" else "distill", student="cifar_resnet8", method=method,
                    teacher=None if method == "ce" else "t.safetensors", dataset="d", imbalance="longtail:10",
                    seed=seed, corruption_seed=seed, out=str(folder))
    metrics = {"num_examples": 10, "top1": top1, "nll": 1.0, "ece": 0.1, "per_class_top1": {},
               "balanced_top1": balanced, "shot_top1": shots}
    report = Report(
        command=cfg.command, created="2026-11-25T00:00:00+00:00", config=cfg.model_dump(),
        environment={"python": "3", "torch": "2", "timm": "1", "platform": "x", "device": "cpu", "world_size": 1,
                     "precision": "fp32"},
        data={"dataset": "d", "source": "local", "train_split": "train[:5000]", "eval_split": "test[:2000]",
              "num_classes": 10, "class_names": NAMES, "num_train": 2040, "num_eval": 2000, "image_size": 32,
              "in_chans": 3, "streaming": False, "augment": "cifar"},
        teacher=None if method == "ce" else {"name": "cifar_resnet14", "source": "checkpoint", "params": 10},
        student={"name": "cifar_resnet8", "source": "timm", "params": 5},
        method={"name": method, "family": "logits", "args": {}},
        metrics={"final": metrics, "best": {"epoch": best[0], "top1": best[1]}}, history=[],
        timing={"total_seconds": 1.0, "train_images_per_s": 1.0})
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(report.model_dump_json())


def test_study_results_show_final_best_balanced_and_shots_by_hand(tmp_path):
    """results.json/.csv/.md of hand-written reports: every number is one computed here by hand."""
    spec = study_spec.parse({"name": "hand", "dataset": "d", "methods": ["kd"], "imbalance": "longtail:10",
                             "seeds": [0, 1], "pairs": [{"teacher": "cifar_resnet14", "student": "cifar_resnet8"}],
                             "options": {"epochs": 8, "augment": "cifar"}})
    runs = plan.plan(spec, tmp_path)
    values = {  # (method, seed): top-1, balanced, shots, (best epoch, best top-1)
        ("teacher", 0): (0.60, 0.55, {"many": 0.9, "medium": 0.5, "few": None}, (8, 0.60)),
        ("teacher", 1): (0.62, 0.57, {"many": 0.8, "medium": 0.4, "few": None}, (7, 0.64)),
        ("ce", 0): (0.50, 0.40, {"many": 0.7, "medium": 0.3, "few": None}, (6, 0.52)),
        ("ce", 1): (0.54, 0.44, {"many": 0.9, "medium": 0.1, "few": None}, (8, 0.54)),
        ("kd", 0): (0.56, 0.50, {"many": 0.8, "medium": 0.2, "few": None}, (5, 0.58)),
        ("kd", 1): (0.58, 0.60, {"many": 0.6, "medium": 0.6, "few": None}, (8, 0.58)),
    }
    for run in runs:
        method = "teacher" if run.role == "teacher" else run.method
        _report(run.out, run.method, run.seed, *values[(method, run.seed)])
    res = results.write_study(tmp_path, runs, spec)
    md = (tmp_path / "results.md").read_text()
    lines = md.splitlines() + [""]  # a blank line after the last table too
    # the recipe and the augmentation at the top
    assert lines[2] == "**Recipe** (the spec's options; the rest at kdcli's defaults): `epochs: 8`, `augment: cifar`.  "
    assert "**Augmentation**: cifar (as the runs resolved it).  " in lines
    assert "[n=k]" not in md  # every cell has every seed: no legend for what is not there
    assert "**Data** d: training split train[:5000] (2040 images trained on), evaluation split test[:2000] " \
           "(2000 images).  " in lines

    def table(caption: str) -> list[str]:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(caption)) + 2
        return lines[start:lines.index("", start)]

    # sample std of two values: |a − b| / √2
    final = table("Final-epoch top-1 (%)")
    assert final == ["| method | longtail:10 |", "|---|---|", "| teacher (cifar_resnet14) | 61.00 ± 1.41 |",
                     "| ce (cifar_resnet8) | 52.00 ± 2.83 |", "| kd | **57.00 ± 1.41 (+5.00, 2/2)** |"]
    best = table("Best-epoch top-1 (%)")
    assert best[2:] == ["| teacher (cifar_resnet14) | 62.00 ± 2.83 |", "| ce (cifar_resnet8) | 53.00 ± 1.41 |",
                        "| kd | **58.00 ± 0.00** |"]
    balanced = table("Balanced top-1 (%)")
    assert balanced[2:] == ["| teacher (cifar_resnet14) | 56.00 ± 1.41 |", "| ce (cifar_resnet8) | 42.00 ± 2.83 |",
                            "| kd | **55.00 ± 7.07** |"]
    shots = table("Many / medium / few-shot top-1 (%)")
    assert shots == ["| method | longtail:10 many | longtail:10 medium |", "|---|---|---|",  # no few-shot class
                     "| teacher (cifar_resnet14) | 85.00 ± 7.07 | 45.00 ± 7.07 |",
                     "| ce (cifar_resnet8) | 80.00 ± 14.14 | 20.00 ± 14.14 |",
                     "| kd | 70.00 ± 14.14 | 40.00 ± 28.28 |"]
    assert "memorised" not in md  # no noise: no memorised / corrected table
    kd = next(g for g in res["groups"] if g["method"] == "kd")
    assert kd["balanced_top1_mean"] == pytest.approx(0.55) and kd["few_top1_mean"] is None
    header, *rows = (tmp_path / "results.csv").read_text().splitlines()
    cols = header.split(",")
    kd0 = dict(zip(cols, next(r for r in rows if ",kd," in r and ",0,student," in r).split(","), strict=True))
    assert (float(kd0["top1"]), float(kd0["best_top1"]), int(kd0["best_epoch"]), float(kd0["balanced_top1"]),
            float(kd0["many_top1"]), float(kd0["medium_top1"]), kd0["few_top1"]) == (0.56, 0.58, 5, 0.5, 0.8, 0.2, "")


# ---------------------------------------------------------------------------------- a tiny whole study


def test_tiny_imbalance_study_on_the_local_copy(cifar, tmp_path):
    """The imbalance CPU preset's shape, 1 epoch, 2 logit methods, 1 seed, longtail:100: the reports carry the
    training class counts as trained and the shots, results.md shows them, and the shared teacher cache (one
    view per epoch) gives the second logit student exactly what the teacher itself would."""
    spec, _ = study_spec.load(preset="cifar10-imbalance-cpu", dataset=str(cifar))
    spec = spec.model_copy(update={"methods": ["kd", "dkd"], "seeds": [0], "imbalance": ["longtail:100"],
                                   "options": {**spec.options, "epochs": 1, "cache_views": 1},
                                   "teacher_options": {"epochs": 1}})
    runs = plan.plan(spec, tmp_path)
    assert len(runs) == 4 and plan.check(spec, runs) is None
    results.write_study(tmp_path, runs, spec)  # nothing finished yet: the recipe, no numbers
    md = (tmp_path / "results.md").read_text()
    assert "**Augmentation**: cifar (no finished run has resolved it)." in md and "Balanced top-1" not in md
    for run in runs:
        loop.run(run.cfg)
    res = results.write_study(tmp_path, runs, spec)
    assert res["missing"] == []
    reports = {r.method if r.role == "student" else "teacher": Report.model_validate_json(
        (r.out / "report.json").read_text()) for r in runs}
    # longtail:100 on 500 per class: 500 · 100^(-r/9), rounded: 500, 299.7, 179.7, 107.7, 64.6, 38.7, 23.2, 13.9, …
    expected = [500, 300, 180, 108, 65, 39, 23, 14, 8, 5]
    for report in reports.values():
        assert report.data.train_class_counts == expected and report.data.num_train == sum(expected)
        m = report.metrics.final
        accs = list(m.per_class_top1.values())
        assert m.balanced_top1 == pytest.approx(statistics.fmean(accs))  # every class is in the test split
        assert m.shot_top1 == {"many": pytest.approx(statistics.fmean(accs[:4])),  # > 100 images
                               "medium": pytest.approx(statistics.fmean(accs[4:7])),  # 20 to 100
                               "few": pytest.approx(statistics.fmean(accs[7:]))}  # < 20
    kd, dkd = reports["kd"].teacher_cache, reports["dkd"].teacher_cache
    assert kd["misses"] > 0 and dkd["misses"] == 0 and dkd["hits"] == kd["misses"]  # dkd never ran the teacher
    md = (tmp_path / "results.md").read_text()
    assert "**Recipe** (the spec's options; the rest at kdcli's defaults): `train_split: train[:5000]`, " \
           "`eval_split: test[:2000]`, `epochs: 1`" in md
    assert "**Augmentation**: cifar (as the runs resolved it)." in md and "**Teacher cache**" in md
    assert "| method | longtail:100 many | longtail:100 medium | longtail:100 few |" in md
    ce = next(g for g in res["groups"] if g["method"] == "ce" and g["role"] == "student")
    balanced = md.split("Balanced top-1 (%)", 1)[1].split("\n\n")[1].replace("**", "").splitlines()
    assert balanced[3] == f"| ce (cifar_resnet8) | {100 * ce['balanced_top1_mean']:.2f} |"
    assert ce["balanced_top1_mean"] == pytest.approx(reports["ce"].metrics.final.balanced_top1)
    # the cached student is the uncached one: the same weights
    dkd_run = next(r for r in runs if r.method == "dkd")
    alone = loop.run(dkd_run.cfg.model_copy(update={"teacher_cache": None, "out": str(tmp_path / "alone")}))
    assert alone.teacher_cache is None and alone.student.sha256 == reports["dkd"].student.sha256
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["augment"] == "cifar"


@pytest.mark.parametrize("full", [False, True])
def test_the_example_script_runs_both_presets_of_a_size(full, tmp_path):
    """examples/study_cifar10.sh calls `kdcli study` once per preset of the chosen size, with the data and a
    folder of its own (a stand-in kdcli records the calls)."""
    import os
    import subprocess

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "kdcli").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "calls"}\n')
    (bin_ / "kdcli").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "JOBS"}
    env |= {"PATH": f"{bin_}:{os.environ['PATH']}", "FULL": "1" if full else "0"}
    script = Path(__file__).parents[1] / "examples" / "study_cifar10.sh"
    subprocess.run(["bash", str(script), "/data/c10", str(tmp_path / "out")], env=env, check=True,
                   capture_output=True)
    calls = [c.split() for c in (tmp_path / "calls").read_text().splitlines()]
    size = "" if full else "-cpu"
    assert [c[c.index("--preset") + 1] for c in calls] == [f"cifar10-imbalance{size}", f"cifar10-noise{size}"]
    assert all(c[0] == "study" and c[c.index("--dataset") + 1] == "/data/c10" for c in calls)
    assert len({c[c.index("--out") + 1] for c in calls}) == 2  # one study folder each
    assert [c[c.index("--jobs") + 1] for c in calls] == ["2", "2"]  # the default
    subprocess.run(["bash", str(script), "/data/c10", str(tmp_path / "out")], env={**env, "JOBS": "3"}, check=True)
    given = [c.split() for c in (tmp_path / "calls").read_text().splitlines()[len(calls):]]
    assert [c[c.index("--jobs") + 1] for c in given] == ["3", "3"]  # JOBS given: used by both
    assert {c[c.index("--preset") + 1] for c in calls} <= set(study_spec.presets())
    no_data = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert no_data.returncode != 0 and "usage: bash examples/study_cifar10.sh DATA_DIR" in no_data.stderr


def test_gain_over_ce_pairs_seeds_and_a_cell_short_of_seeds_says_so(tmp_path):
    """A student whose third seed has not finished: its gain is over the CE runs of the seeds it has (paired),
    not over CE's mean of all three, and its cells say over how many seeds they are."""
    spec = study_spec.parse({"name": "hand", "dataset": "d", "methods": ["kd"], "imbalance": "longtail:10",
                             "seeds": [0, 1, 2], "pairs": [{"teacher": "cifar_resnet14", "student": "cifar_resnet8"}]})
    runs = plan.plan(spec, tmp_path)
    top1 = {("teacher", 0): 0.8, ("teacher", 1): 0.8, ("teacher", 2): 0.8,
            ("ce", 0): 0.50, ("ce", 1): 0.60, ("ce", 2): 0.70, ("kd", 0): 0.55, ("kd", 1): 0.65}  # kd seed 2: missing
    for run in runs:
        key = ("teacher" if run.role == "teacher" else run.method, run.seed)
        if key in top1:
            _report(run.out, run.method, run.seed, top1[key], top1[key], {}, (1, top1[key]))
    res = results.write_study(tmp_path, runs, spec)
    kd = next(g for g in res["groups"] if g["method"] == "kd")
    # unpaired, 0.60 − 0.60 = 0; paired, (0.55 − 0.50 + 0.65 − 0.60) / 2 = +0.05
    assert kd["gain_over_ce"] == pytest.approx(0.05) and kd["seeds_ahead"] == [2, 2] and kd["n"] == 2
    assert "_top1_by_seed" not in kd  # internal: not written
    md = (tmp_path / "results.md").read_text()
    assert "| kd | **60.00 ± 7.07 [n=2] (+5.00, 2/2)** |" in md
    assert "| ce (cifar_resnet8) | 60.00 ± 10.00 |" in md  # every seed: no [n=…]
    assert "[n=k]: over the k seeds whose runs finished" in md


def test_a_metric_some_reports_lack_says_over_how_many_seeds(tmp_path):
    """Every run finished, but one report has no balanced or shot top-1 (an older kdcli): those cells say they are
    over one seed; the top-1 cells, over both, say nothing."""
    spec = study_spec.parse({"name": "hand", "dataset": "d", "methods": ["kd"], "imbalance": "longtail:10",
                             "seeds": [0, 1], "pairs": [{"teacher": "cifar_resnet14", "student": "cifar_resnet8"}]})
    runs = plan.plan(spec, tmp_path)
    for run in runs:
        old = run.method == "kd" and run.seed == 1
        _report(run.out, run.method, run.seed, 0.5 + run.seed / 10, None if old else 0.4 + run.seed / 10,
                None if old else {"many": 0.5, "medium": 0.3, "few": None}, (1, 0.5))
    res = results.write_study(tmp_path, runs, spec)
    kd = next(g for g in res["groups"] if g["method"] == "kd")
    assert kd["n"] == 2 and kd["top1_n"] == 2 and kd["balanced_top1_n"] == 1 and kd["few_top1_n"] == 0
    md = (tmp_path / "results.md").read_text()
    assert "| kd | **55.00 ± 7.07 (+0.00, 0/2)** |" in md  # top-1: both seeds
    assert "| kd | 40.00 [n=1] |" in md  # balanced top-1: the one report that has it
    assert "| kd | 50.00 [n=1] | 30.00 [n=1] |" in md  # many, medium
    assert "[n=k]: over the k seeds whose runs finished (and report it)" in md


PUBLISHED = Path(__file__).parents[1] / "examples" / "study_cifar10" / "noise-cpu"


def test_the_published_noise_table_is_that_of_the_published_reports():
    """examples/study_cifar10/noise-cpu/ ships the report of every run beside results.md: the final-epoch
    table (mean ± sample std over seeds) recomputed from those reports, with nothing of kdcli's aggregation,
    is the table results.md shows, and every cell of it has its three seeds."""
    md = (PUBLISHED / "results.md").read_text()
    lines = md[md.index("| method |"):].splitlines()
    settings = [s.strip() for s in lines[0].strip("|").split("|")[1:]]
    shown = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        label, *cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
        shown.update({(label, s): c.split(" (")[0] for s, c in zip(settings, cells, strict=True)})
    top1: dict[tuple[str, str], dict[int, float]] = {}
    for path, report in results.collect_reports([PUBLISHED / "runs"]):
        cfg = report.config
        label = (f"teacher ({report.student.name})" if path.parent.name.startswith("teacher-") else
                 f"ce ({report.student.name})" if cfg["method"] == "ce" else cfg["method"])
        seeds = top1.setdefault((label, cfg["noise"] or "clean"), {})
        assert cfg["seed"] not in seeds, f"{label}, {cfg['noise']}: seed {cfg['seed']} twice"
        seeds[cfg["seed"]] = 100 * report.metrics.final.top1
    assert len(shown) == len(top1) >= 22 * len(settings)  # the teacher, CE and twenty methods, at least
    for key, by_seed in top1.items():
        values = list(by_seed.values())
        assert sorted(by_seed) == [0, 1, 2], key
        assert shown[key] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}", key
