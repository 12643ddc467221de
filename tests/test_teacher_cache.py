"""Teacher cache (--teacher-cache) and `kdcli cache-teacher`: the stored logits are the teacher's on the very images
an epoch trains on, a cached run equals an uncached one, mismatches are refused, interrupted fills resume."""

import hashlib
import io
import json
import math
import os
import signal

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from kdcli import models
from kdcli.config import RunConfig
from kdcli.data import open_data
from kdcli.engine import fill, loop
from kdcli.engine.cache import TeacherCache
from kdcli.engine.report import Report
from kdcli.engine.session import Session
from kdcli.errors import KdcliError
from tests.test_cli import fails, kdcli

DATA = "synthetic:16:4:96"  # 96 training rows: 6 full batches of 16, every row seen every epoch
ROWS = 96
BASE = ["--student", "cifar_resnet8", "--dataset", DATA, "--batch-size", "16"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for name, arch in (("t1", "cifar_resnet14"), ("t2", "cifar_resnet8")):
        kdcli("train", "--model", arch, "--dataset", DATA, "--epochs", "1", "--batch-size", "16", "--out",
              root / name)
    return root / "t1" / "model.safetensors", root / "t2" / "model.safetensors"


@pytest.fixture(scope="module")
def filled(teachers, tmp_path_factory):
    """A cache filled ahead by `kdcli cache-teacher`: teacher t1, cifar augmentation, 2 views."""
    cache = tmp_path_factory.mktemp("filled") / "cache"
    kdcli("cache-teacher", "--teacher", teachers[0], *BASE, "--augment", "cifar", "--cache-views", "2",
          "--teacher-cache", cache)
    return cache


def _report(out) -> Report:
    return Report.model_validate_json((out / "report.json").read_text())


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _files(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _facts():
    data = open_data(DATA, augment="none")
    return models.DataFacts(num_classes=4, in_chans=3, image_size=16, class_names=data.class_names,
                            mean=data.mean, std=data.std)


# ------------------------------------------------------------------------------------------- end to end
def test_a_cached_run_equals_the_uncached_one_bit_for_bit_without_augmentation(teachers, tmp_path):
    common = ["distill", "--teacher", teachers[0], *BASE, "--augment", "none", "--epochs", "3"]
    kdcli(*common, "--out", tmp_path / "plain")
    kdcli(*common, "--teacher-cache", tmp_path / "cache", "--cache-dtype", "float32", "--out", tmp_path / "cached")
    assert _same_weights(tmp_path / "plain", tmp_path / "cached")
    block = _report(tmp_path / "cached").teacher_cache
    # epoch 1 computes every row once; epochs 2 and 3 read them all (one view: no random augmentation)
    assert (block["misses"], block["hits"], block["views"]) == (ROWS, 2 * ROWS, 1)
    assert _report(tmp_path / "plain").teacher_cache is None


def test_a_cached_epoch_trains_on_the_images_the_cache_was_filled_with(teachers, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = RunConfig(command="distill", method="kd", teacher=[str(teachers[0])], student="cifar_resnet8", dataset=DATA,
                    augment="cifar", cache_views=2, cache_dtype="float32", teacher_cache=str(cache), batch_size=16,
                    epochs=3, out=str(tmp_path / "s"))
    at_fill: dict[tuple[int, int], torch.Tensor] = {}  # (view, row) -> the image the teacher's logits are of
    original = Session.cached_teacher

    def recording(self, images, index):
        for row, image in zip(index.tolist(), images, strict=True):
            at_fill[(self.cache_view, row)] = image.detach().cpu().clone()
        return original(self, images, index)

    with monkeypatch.context() as m:
        m.setattr(Session, "cached_teacher", recording)
        result = fill.fill_cache(cfg)
    assert (result.views, result.rows, result.computed, result.already) == (2, ROWS, 2 * ROWS, 0)
    assert len(at_fill) == 2 * ROWS

    trained = []  # per step: (view, rows, the student's input)
    step = Session.train_step

    def recording_step(self, images, labels, index=None, **kw):
        trained.append((self.cache_view, index.tolist(), images.detach().cpu().clone()))
        return step(self, images, labels, index, **kw)

    monkeypatch.setattr(Session, "train_step", recording_step)
    report = loop.run(cfg)
    assert (report.teacher_cache["misses"], report.teacher_cache["hits"]) == (0, 3 * ROWS)
    assert len(trained) == 3 * ROWS // 16
    per_epoch = [{}, {}, {}]
    for k, (view, rows, images) in enumerate(trained):
        epoch = k // (ROWS // 16)
        assert view == epoch % 2  # epoch e trains on view e mod K
        per_epoch[epoch].update({row: image for row, image in zip(rows, images, strict=True)})
    assert all(len(e) == ROWS for e in per_epoch)
    for epoch, images in enumerate(per_epoch):
        assert all(torch.equal(image, at_fill[(epoch % 2, row)]) for row, image in images.items())
    assert all(torch.equal(per_epoch[2][r], per_epoch[0][r]) for r in range(ROWS))  # epoch 3 is view 0 again
    assert sum(not torch.equal(per_epoch[1][r], per_epoch[0][r]) for r in range(ROWS)) > ROWS // 2  # really random

    # the stored logits are the teacher's on that view's images, recomputed here independently
    data = open_data(DATA, augment="cifar", seed=0)
    data.set_input(16)
    dataset = data.train_dataset()
    teacher = models.load(str(teachers[0]), _facts()).model.eval()
    stored = []
    for view in (0, 1):
        data.set_epoch(view)
        images = torch.stack([dataset[r]["image"] for r in range(ROWS)])
        assert all(torch.equal(images[r], at_fill[(view, r)]) for r in range(ROWS))
        with torch.no_grad():
            expected = teacher(images).logits
        saved = load_file(str(cache / f"view-{view}.safetensors"))
        assert saved["filled"].sum() == ROWS and saved["logits"].shape == (ROWS, 1, 4)
        assert torch.allclose(saved["logits"][:, 0], expected, rtol=1e-4, atol=1e-4)
        stored.append(saved["logits"][:, 0])
    assert (stored[0] - stored[1]).abs().max() > 1e-2  # two views: two different sets of logits


def test_cache_teacher_then_distill_computes_no_teacher_logits(teachers, filled, tmp_path, capsys):
    kdcli("cache-teacher", "--teacher", teachers[0], *BASE, "--augment", "cifar", "--cache-views", "2",
          "--teacher-cache", filled)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [out[0]] and f"filled 0 now ({2 * ROWS} already stored)" in out[0]  # no bar: not a terminal
    for view in (0, 1):
        assert load_file(str(filled / f"view-{view}.safetensors"))["filled"].sum() == ROWS
    before = _files(filled)
    kdcli("distill", "--teacher", teachers[0], *BASE, "--augment", "cifar", "--cache-views", "2", "--epochs", "3",
          "--teacher-cache", filled, "--out", tmp_path / "s")
    block = _report(tmp_path / "s").teacher_cache
    assert (block["misses"], block["hits"]) == (0, 3 * ROWS)
    assert _files(filled) == before


def test_mismatches_and_methods_that_cannot_use_a_cache_are_refused(teachers, filled, tmp_path, capsys):
    before = _files(filled)
    same = ["--teacher", teachers[0], *BASE, "--augment", "cifar", "--cache-views", "2", "--teacher-cache", filled]
    cases = {
        "teacher": (["--teacher", teachers[1], *same[2:]], "teachers"),
        "slice": ([*same, "--train-split", "train[:50%]"], "train_split"),
        "noise": ([*same, "--noise", "symmetric:0.2"], "noise"),
        "augment": ([*same[:-6], "--augment", "none", "--teacher-cache", filled], "augment"),
        "views": ([*same[:-3], "3", "--teacher-cache", filled], "views"),
        "column": ([*same, "--image-column", "image"], "image_column"),  # given: it names the images cached
    }
    for name, (args, differs) in cases.items():
        err = fails(capsys, "distill", *args, "--epochs", "1", "--out", tmp_path / name)
        assert "holds logits of another teacher, data or recipe" in err and differs in err, (name, err)
        assert not (tmp_path / name).exists()
    err = fails(capsys, "cache-teacher", *cases["noise"][0])
    assert "holds logits of another" in err and "noise" in err
    refused = {"at": (["--method", "at"], "cannot use --teacher-cache"),
               "ce": (["--method", "ce"], "reads no teacher, so there is nothing to cache"),
               "mixup": (["--mixup", "0.8"], "--mixup/--cutmix"),
               "streaming": (["--streaming"], "drop --streaming")}
    for name, (args, says) in refused.items():
        err = fails(capsys, "distill", *same, *args, "--epochs", "1", "--out", tmp_path / name)
        assert says in err, (name, err)
        assert not (tmp_path / name).exists()
    assert _files(filled) == before  # nothing reused, nothing written
    (tmp_path / "afile").write_text("x")
    for where in (tmp_path / "afile", tmp_path / "afile" / "sub"):  # a file where the cache folder would be
        other = [*same[:-1], where]
        assert "is a file, not a folder" in fails(capsys, "distill", *other, "--epochs", "1", "--out", tmp_path / "f")
        assert "is a file, not a folder" in fails(capsys, "cache-teacher", *other)
    assert not (tmp_path / "f").exists() and (tmp_path / "afile").read_text() == "x"


def test_an_interrupted_fill_keeps_what_it_flushed_and_a_rerun_computes_only_the_rest(teachers, tmp_path,
                                                                                      monkeypatch):
    cache = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", teachers[0], *BASE, "--augment", "cifar", "--cache-views", "2",
            "--teacher-cache", cache]
    monkeypatch.setattr(fill, "FLUSH_EVERY", 2)
    flush, stored = TeacherCache.flush, []

    def preempted_after_first_flush(self):
        dirty = bool(self._dirty)
        flush(self)
        if dirty and not stored:
            stored.append(int(load_file(str(cache / "view-0.safetensors"))["filled"].sum()))
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler does: the fill stops after this batch

    with monkeypatch.context() as m:
        m.setattr(TeacherCache, "flush", preempted_after_first_flush)
        with pytest.raises(SystemExit) as exc:
            kdcli(*args)
    assert exc.value.code == 128 + signal.SIGTERM
    assert stored == [32]  # two batches of 16 were flushed before the signal
    assert load_file(str(cache / "view-0.safetensors"))["filled"].sum() == 32
    assert not (cache / "view-1.safetensors").exists()

    computed = []
    store = TeacherCache.store
    monkeypatch.setattr(TeacherCache, "store", lambda self, index, view, logits: (
        computed.append((view, len(index))), store(self, index, view, logits))[1])
    cfg = RunConfig(command="distill", method="kd", teacher=[str(teachers[0])], student="cifar_resnet8", dataset=DATA,
                    augment="cifar", cache_views=2, teacher_cache=str(cache), batch_size=16, out="unused")
    screen = io.StringIO()
    result = fill.fill_cache(cfg, console=Console(file=screen, force_terminal=True, width=100))
    assert (result.computed, result.already) == (2 * ROWS - 32, 32)
    assert sum(n for view, n in computed if view == 0) == ROWS - 32
    assert sum(n for view, n in computed if view == 1) == ROWS
    assert "view 1/2" in screen.getvalue() or "view 2/2" in screen.getvalue()  # a live bar on a terminal
    for view in (0, 1):
        assert load_file(str(cache / f"view-{view}.safetensors"))["filled"].sum() == ROWS


def test_an_ensemble_caches_every_teacher_and_equals_the_uncached_run(teachers, tmp_path):
    t = ["--teacher", teachers[0], "--teacher", teachers[1]]
    common = ["distill", *t, *BASE, "--augment", "none", "--epochs", "2"]
    kdcli(*common, "--out", tmp_path / "plain")
    kdcli(*common, "--teacher-cache", tmp_path / "cache", "--cache-dtype", "float32", "--out", tmp_path / "cached")
    assert _same_weights(tmp_path / "plain", tmp_path / "cached")
    saved = load_file(str(tmp_path / "cache" / "view-0.safetensors"))
    assert saved["logits"].shape == (ROWS, 2, 4) and saved["filled"].sum() == ROWS
    assert not torch.equal(saved["logits"][:, 0], saved["logits"][:, 1])  # two teachers, two sets of logits
    block = _report(tmp_path / "cached").teacher_cache
    assert (block["misses"], block["hits"]) == (ROWS, ROWS)


# ------------------------------------------------------------------------------------------- storage
def test_top_k_storage_keeps_the_top_logits_and_the_rest_s_probability_mass(tmp_path):
    logits = torch.tensor([[[4.0, -1.0, 2.5, 0.3]], [[-3.0, 7.0, 6.5, -2.0]], [[0.1, 0.2, 0.3, 0.4]]])
    cache = TeacherCache(tmp_path / "c", {"k": 1}, rows=5, teachers=1, classes=4, views=1, dtype="float32", topk=2)
    cache.store(torch.tensor([0, 2, 4]), 0, logits)
    cache.flush()
    for reader in (cache, TeacherCache(tmp_path / "c", {"k": 1}, rows=5, teachers=1, classes=4, views=1,
                                       dtype="float32", topk=2)):  # in memory, and read back from disk
        got, known = reader.lookup(torch.tensor([0, 2, 4, 1]), 0)
        assert known.tolist() == [True, True, True, False]
        for z, g in zip(logits, got[:3], strict=True):
            z, g = z[0], g[0]
            top = z.topk(2).indices
            assert torch.equal(g[top], z[top])  # the top-2 logits, exactly
            rest = torch.ones(4, dtype=torch.bool)
            rest[top] = False
            p, q = torch.softmax(z, 0), torch.softmax(g, 0)
            assert torch.allclose(q[top], p[top], atol=1e-5)
            assert math.isclose(float(q[rest].sum()), float(p[rest].sum()), abs_tol=1e-5)
            assert torch.allclose(q[rest], q[rest][0].expand(2))  # the rest share their mass equally
            # an approximation beyond temperature 1 (README): after KD's T = 4 the rest carries more mass
            assert float(torch.softmax(g / 4, 0)[rest].sum()) > float(torch.softmax(z / 4, 0)[rest].sum()) + 1e-5
        assert torch.equal(got[3], torch.zeros(1, 4))


def test_a_manifest_written_by_another_process_meanwhile_is_checked_not_refused(tmp_path, monkeypatch):
    """Two processes open a new cache folder at once: the second finds no manifest, then the first's in the
    folder; it reads and checks it rather than calling the folder someone else's."""
    from pathlib import Path

    TeacherCache(tmp_path / "c", {"k": 1}, rows=3, teachers=1, classes=2, views=1)  # the first process
    manifest = tmp_path / "c" / "manifest.json"
    real, calls = Path.is_file, {"n": 0}

    def is_file(self):
        if self == manifest:
            calls["n"] += 1
            return calls["n"] > 1 and real(self)  # not there yet at the first look
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    second = TeacherCache(tmp_path / "c", {"k": 1}, rows=3, teachers=1, classes=2, views=1)
    assert calls["n"] >= 2 and json.loads(manifest.read_text()) == second.describe()  # read, matched, kept
    with pytest.raises(KdcliError, match="another teacher"):  # and a different one is still refused
        calls["n"] = 0
        TeacherCache(tmp_path / "c", {"k": 2}, rows=3, teachers=1, classes=2, views=1)


def test_two_runs_sharing_a_cache_merge_their_rows(tmp_path):
    def open_(root=tmp_path / "c"):
        return TeacherCache(root, {"k": 1}, rows=8, teachers=2, classes=3, views=2)

    a, b = open_(), open_()
    za, zb = torch.randn(3, 2, 3), torch.randn(4, 2, 3)
    a.store(torch.tensor([0, 1, 2]), 1, za)
    b.store(torch.tensor([4, 5, 6, 7]), 1, zb)  # b read the view before a wrote it
    a.flush()
    b.flush()  # must keep a's rows
    got, known = open_().lookup(torch.arange(8), 1)
    assert known.tolist() == [True, True, True, False, True, True, True, True]
    assert torch.equal(got[[0, 1, 2]], za.half().float()) and torch.equal(got[[4, 5, 6, 7]], zb.half().float())
    assert not (tmp_path / "c" / "view-0.safetensors").exists()
    with pytest.raises(Exception, match="holds logits of another"):
        TeacherCache(tmp_path / "c", {"k": 2}, rows=8, teachers=2, classes=3, views=2)


def test_resume_refuses_a_teacher_file_replaced_since_the_run_started(teachers, tmp_path, capsys):
    """A run stopped after epoch 1 whose --teacher file is then overwritten: the resumed run would distill from
    another teacher under the same name; one line, and the run is left as it was."""
    import shutil

    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teachers[0], teacher)
    run = ["distill", "--teacher", teacher, "--method", "kd", *BASE, "--epochs", "2", "--out", tmp_path / "r"]
    kdcli(*run, "--stop-after-epoch", "1")
    shutil.copy(teachers[1], teacher)
    err = fails(capsys, "distill", "--resume", tmp_path / "r")
    assert f"teacher {teacher} has changed since" in err and "--overwrite" in err
    assert (tmp_path / "r" / "resume" / "progress.json").exists() and not (tmp_path / "r" / "report.json").exists()
    shutil.copy(teachers[0], teacher)  # the file it started with: the run continues
    kdcli("distill", "--resume", tmp_path / "r")
    assert (tmp_path / "r" / "report.json").exists()


def test_a_teacher_file_removed_during_the_run_does_not_stop_its_saves(tmp_path):
    """The teacher is in memory once loaded: its file removed mid-run leaves nothing to hash, and the resume
    state's save goes on (before, the stat's OSError was reported as a failed write of the run folder)."""
    from types import SimpleNamespace

    from kdcli.engine import resume

    kept, gone = tmp_path / "kept.safetensors", tmp_path / "gone.safetensors"
    kept.write_bytes(b"weights")
    sess = SimpleNamespace(online=False, teacher_infos=[SimpleNamespace(path=str(kept)),
                                                        SimpleNamespace(path=str(gone))])
    assert resume.teacher_files(sess) == {str(kept): hashlib.sha256(b"weights").hexdigest()}
