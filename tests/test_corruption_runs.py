"""Corruption wired into train/distill: the labels the loop trains on, the report block, the diagnostics."""

import json
import tempfile

import numpy as np
import pytest

from kdcli.config import RunConfig
from kdcli.data import corruption as cor
from kdcli.engine import loop
from kdcli.engine.report import Report
from tests.test_cli import fails, kdcli


def test_the_loop_trains_on_exactly_the_corrupted_labels():
    cfg = RunConfig(command="train", student="cifar_resnet8", dataset="synthetic:8:4:400", out=tempfile.mkdtemp(),
                    noise="pairflip:0.3", imbalance="step:5:0.5", corruption_seed=7)
    sess = loop.build(cfg)
    clean = np.array(sess.data.training_labels()[0])
    index = np.arange(len(clean))
    keep = cor.keep_mask(cor.parse_imbalance("step:5:0.5", 4), clean, index, 4, seed=7)
    noisy = cor.noisy_labels(cor.parse_noise("pairflip:0.3", 4), clean, index, 4, seed=7)
    items = [sess.data.train_dataset(train=False)[i] for i in range(sess.data.num_train)]
    assert sorted(it["index"] for it in items) == list(np.nonzero(keep)[0])  # original indices survive
    assert all(it["label"] == noisy[it["index"]] for it in items)
    assert sess.data.num_train == int(keep.sum()) < len(clean)
    block = sess.corruption
    assert block["noise"] == "pairflip:0.3" and block["imbalance"] == "step:5:0.5" and block["seed"] == 7
    assert block["class_counts_after"] == cor.class_counts(noisy[keep], 4)
    assert 0.2 < block["noise_rate"] < 0.4
    # the evaluation split is never corrupted
    ev = sess.data.eval_dataset()
    assert len(ev) == sess.data.num_eval and ev.rows is None and ev.labels is None


def test_a_noisy_run_reports_corruption_and_memorisation(tmp_path):
    kdcli("train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:400", "--epochs", "1", "--batch-size",
          "32", "--noise", "symmetric:0.4", "--out", tmp_path)
    rep = Report.model_validate_json((tmp_path / "report.json").read_text())
    c = rep.data.corruption
    assert c["noise"] == "symmetric:0.4" and abs(c["noise_rate"] - 0.4) < 0.08
    assert np.allclose(np.array(c["transition_matrix"]).sum(1), 1.0)
    d = c["diagnostics"]
    assert d["num_noisy"] == c["num_changed"] and d["num_noisy"] + d["num_clean"] == rep.data.num_train == 400
    assert d["memorised"] + d["corrected"] + d["other"] == pytest.approx(1.0)
    assert rep.config["noise"] == "symmetric:0.4"  # the run can be repeated from its report


@pytest.mark.parametrize("args, expected", [
    (["--noise", "symmetric:1.5"], "symmetric:1.5"),
    (["--noise", "gaussian:0.1"], "gaussian"),
    (["--imbalance", "longtail:0.5"], "longtail:0.5"),
])
def test_bad_corruption_options_are_one_line(args, expected, tmp_path, capsys):
    err = fails(capsys, "train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:64", *args,
                "--out", tmp_path / "r")
    assert expected in err


def test_corrupt_dataset_writes_what_a_run_would_train_on_and_reads_back(tmp_path, capsys):
    import json

    from datasets import load_dataset
    out = tmp_path / "c"
    kdcli("corrupt-dataset", "--dataset", "synthetic:8:4:300", "--noise", "symmetric:0.3", "--imbalance",
          "longtail:4", "--corruption-seed", "3", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corruption"]["noise"] == "symmetric:0.3" and manifest["source"]["dataset"] == "synthetic:8:4:300"
    train = load_dataset(str(out), split="train")
    assert set(train.column_names) == {"image", "label", "clean_label", "noisy", "source_index"}
    # the same spec and seed in a run gives the very same labels for the very same source rows
    cfg = RunConfig(command="train", student="cifar_resnet8", dataset="synthetic:8:4:300", out=str(tmp_path / "x"),
                    noise="symmetric:0.3", imbalance="longtail:4", corruption_seed=3)
    data = loop.build(cfg).data
    clean, noisy = data.training_labels()
    src = np.array(train["source_index"])
    assert sorted(src) == list(data._rows)
    assert list(train["label"]) == list(noisy[src]) and list(train["clean_label"]) == list(clean[src])
    assert list(train["noisy"]) == list(noisy[src] != clean[src])
    assert manifest["num_train"] == len(train) == data.num_train
    # a run reads the folder back: the corrupted training split, the clean test split
    kdcli("train", "--model", "cifar_resnet8", "--dataset", out, "--epochs", "1", "--out", tmp_path / "run")
    rep = Report.model_validate_json((tmp_path / "run" / "report.json").read_text())
    assert rep.data.num_train == len(train) and rep.data.eval_split == "test" and rep.data.num_eval == 60
    # ... and reports the folder's corruption as a run with --noise would: the spec, the rate measured on what it
    # trained on, and how the final model treats the noisy labels
    c = rep.data.corruption
    assert (c["noise"], c["imbalance"], c["recorded_in"]) == ("symmetric:0.3", "longtail:4", str(out / "manifest.json"))
    assert c["noise_rate"] == pytest.approx(float(np.mean(np.array(train["noisy"]))))
    diag = c["diagnostics"]
    assert {"memorised", "corrected"} <= set(diag) and 0 <= diag["memorised"] + diag["corrected"] <= 1
    assert rep.data.train_class_counts == np.bincount(train["clean_label"], minlength=4).tolist()  # by true class
    # corrupting it again would take its corrupted labels for the truth: refused
    err = fails(capsys, "train", "--model", "cifar_resnet8", "--dataset", out, "--noise", "symmetric:0.1",
                "--out", tmp_path / "again")
    assert "is a folder kdcli corrupt-dataset wrote" in err and not (tmp_path / "again").exists()
    assert "exists" in fails(capsys, "corrupt-dataset", "--dataset", "synthetic:8:4:300", "--noise", "pairflip:0.1",
                             "--out", out)
    assert "nothing to do" in fails(capsys, "corrupt-dataset", "--dataset", "digits", "--out", tmp_path / "y")


def test_corrupt_dataset_overwrite_replaces_only_what_it_wrote(tmp_path, capsys):
    """--overwrite replaces a corrupted dataset (or an empty folder); a folder of anything else, a file, or a
    path under a file is one line and nothing is removed."""
    args = ["corrupt-dataset", "--dataset", "digits", "--noise", "symmetric:0.2"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "is not a corrupted dataset (no manifest.json)" in fails(capsys, *args, "--out", tmp_path / "mine",
                                                                    "--overwrite")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in fails(capsys, *args, "--out", tmp_path / "file", "--overwrite")
    assert "is a file, not a folder" in fails(capsys, *args, "--out", tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "x" and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "empty").mkdir()
    kdcli(*args, "--out", tmp_path / "empty", "--overwrite")
    kdcli(*args[:-1], "pairflip:0.1", "--out", tmp_path / "empty", "--overwrite")  # its own output: replaced
    assert json.loads((tmp_path / "empty" / "manifest.json").read_text())["corruption"]["noise"] == "pairflip:0.1"


def test_evaluate_can_corrupt_its_split_when_asked(tmp_path, capsys):
    kdcli("train", "--model", "cifar_resnet8", "--dataset", "synthetic:8:4:200", "--epochs", "1",
          "--out", tmp_path / "m")
    ckpt = tmp_path / "m" / "model.safetensors"
    kdcli("evaluate", ckpt, "--dataset", "synthetic:8:4:200", "--out", tmp_path / "clean.json")
    kdcli("evaluate", ckpt, "--dataset", "synthetic:8:4:200", "--noise", "symmetric:1.0", "--out", tmp_path / "n.json")
    from kdcli.engine.report import EvalReport
    clean = EvalReport.model_validate_json((tmp_path / "clean.json").read_text())
    noisy = EvalReport.model_validate_json((tmp_path / "n.json").read_text())
    assert clean.data.corruption is None  # by default evaluation data is never corrupted
    assert noisy.data.corruption["noise_rate"] == 1.0 and noisy.data.corruption["noise"] == "symmetric:1.0"
    # every label moved to another class: a model at top-1 a on clean labels is right at most 1 - a now
    assert noisy.metrics.final.top1 <= 1 - clean.metrics.final.top1 + 1e-6
    kdcli("evaluate", ckpt, "--dataset", "synthetic:8:4:200", "--imbalance", "longtail:4", "--out", tmp_path / "i.json")
    imb = EvalReport.model_validate_json((tmp_path / "i.json").read_text())
    assert imb.metrics.final.num_examples == imb.data.num_eval < clean.data.num_eval


def test_streamed_and_map_style_training_see_the_same_corrupted_labels():
    from kdcli.data import open_data
    pairs = {}
    for streaming in (False, True):
        data = open_data("synthetic:8:4:300", streaming=streaming)
        data.corrupt("symmetric:0.5", "longtail:3", seed=5)
        items = list(data.train_dataset(train=False)) if streaming else \
            [data.train_dataset(train=False)[i] for i in range(data.num_train)]
        pairs[streaming] = sorted((int(it["index"]), int(it["label"])) for it in items)
    assert pairs[True] == pairs[False] and len(pairs[True]) < 300


def _parquet_copy(root, spec="synthetic:8:4:300"):
    from kdcli.data import open_data
    data = open_data(spec)
    root.mkdir()
    data._train.to_parquet(str(root / "train-00000-of-00001.parquet"))
    data._eval.to_parquet(str(root / "test-00000-of-00001.parquet"))
    return str(root)


def test_a_true_stream_is_corrupted_like_its_map_style_copy(tmp_path, capsys):
    """Local parquet read with load_dataset(streaming=True): one pass over the labels, then the same
    (index, label) pairs and the same report block as the same files read map-style."""
    from kdcli.data import open_data
    folder = _parquet_copy(tmp_path / "pq")
    pairs, blocks = {}, {}
    for streaming in (False, True):
        data = open_data(folder, streaming=streaming)
        assert data.source == "local" and data.streaming == streaming
        blocks[streaming] = data.corrupt("pairflip:0.3", "step:5:0.5", seed=2)
        assert data.num_train == len(data._rows) < 300
        items = list(data.train_dataset(train=False)) if streaming else \
            [data.train_dataset(train=False)[i] for i in range(data.num_train)]
        pairs[streaming] = sorted((int(it["index"]), int(it["label"])) for it in items)
    assert pairs[True] == pairs[False] and blocks[True] == blocks[False]
    assert blocks[True]["noise_rate"] > 0.2
    # and a run on the stream reports it, diagnostics included
    capsys.readouterr()
    kdcli("train", "--model", "cifar_resnet8", "--dataset", folder, "--streaming", "--noise", "symmetric:0.4",
          "--epochs", "1", "--batch-size", "64", "--out", tmp_path / "run")
    rep = Report.model_validate_json((tmp_path / "run" / "report.json").read_text())
    c = rep.data.corruption
    assert c["noise"] == "symmetric:0.4" and rep.data.num_train == 300
    assert c["diagnostics"]["num_noisy"] + c["diagnostics"]["num_clean"] == 300


def test_corrupt_dataset_names_its_split_option_in_errors(tmp_path, capsys):
    err = fails(capsys, "corrupt-dataset", "--dataset", "digits", "--noise", "symmetric:0.2", "--split", "nope",
                "--out", tmp_path / "c")
    assert "no split 'nope'" in err and "--train-split" in err  # --train-split is an alias of --split
    kdcli("corrupt-dataset", "--dataset", "digits", "--noise", "symmetric:0.2", "--train-split", "train",
          "--out", tmp_path / "c")
    assert (tmp_path / "c" / "manifest.json").is_file()
