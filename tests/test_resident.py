"""The resident data path (kdcli.data.resident): the same weights as the loader, exact mid-epoch resume, unreadable
images skipped and counted as on the loader path, and one clear line where it cannot apply."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kdcli.config import RunConfig
from kdcli.data import resident
from kdcli.engine import loop, session
from kdcli.engine.signals import Interrupted
from kdcli.errors import KdcliError

DATA = "synthetic:12:4:96"


def _cfg(out, **kw) -> RunConfig:
    return RunConfig(**{"command": "train", "student": "cifar_resnet8", "dataset": DATA, "epochs": 2,
                        "batch_size": 16, **kw, "out": str(out)})


def _weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _same(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("augment", ["cifar", "crop", "none"])
def test_resident_and_loader_train_the_same_weights(tmp_path, augment):
    reports = {p: loop.run(_cfg(tmp_path / p, augment=augment, data_path=p)) for p in ("resident", "loader")}
    assert {p: r.data.data_path for p, r in reports.items()} == {"resident": "resident", "loader": "loader"}
    assert _same(tmp_path / "resident", tmp_path / "loader")
    assert [h.terms for h in reports["resident"].history] == [h.terms for h in reports["loader"].history]


def test_auto_takes_the_resident_path_where_it_applies_and_the_loader_elsewhere(tmp_path):
    assert loop.build(_cfg(tmp_path / "a")).data_path == "resident"
    assert loop.build(_cfg(tmp_path / "b", augment="imagenet")).data_path == "loader"
    assert loop.build(_cfg(tmp_path / "c", image_size=16)).data_path == "loader"  # resized per example
    with pytest.raises(KdcliError, match="--data-path resident cannot hold this training split: .*imagenet"):
        loop.build(_cfg(tmp_path / "d", augment="imagenet", data_path="resident"))


def test_batches_are_the_loaders_batches(tmp_path):
    """Rows, labels and pixels of every batch of an epoch, with the epoch's own draws."""
    res, plain = (loop.build(_cfg(tmp_path / p, data_path=p)) for p in ("resident", "loader"))
    for epoch in (0, 3):
        for sess in (res, plain):
            sess.train_loader.set_epoch(epoch)
            sess.data.set_epoch(epoch)
        for a, b in zip(res.train_loader, plain.train_loader, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
            assert np.array_equal(a["rows"], b["index"].numpy())
            assert torch.equal(a["image"], b["image"])


def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    loop.run(_cfg(tmp_path / "whole", epochs=2))
    real, count = session.Session.train_step, {"n": 0}

    def step(self, images, labels, index=None, **kw):
        terms = real(self, images, labels, index, **kw)
        count["n"] += 1
        if count["n"] == 8:  # epoch 2 (6 batches an epoch), after its second batch
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    monkeypatch.setattr(session.Session, "train_step", step)
    with pytest.raises(Interrupted, match="at epoch 2, step 2"):
        loop.run(_cfg(tmp_path / "cut", epochs=2))
    monkeypatch.undo()
    report = loop.run(_cfg(tmp_path / "cut", epochs=2), auto_resume=True)
    assert report.data.data_path == "resident"
    assert _same(tmp_path / "whole", tmp_path / "cut")


def _folder(root, bad: dict[str, bytes]):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    for path, data in bad.items():
        (root / path).write_bytes(data)
    return root


def test_unreadable_images_are_skipped_and_counted_as_on_the_loader_path(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(png, format="PNG")
    root = _folder(tmp_path / "data", {"train/cat/000_cut.png": png.getvalue()[:40], "train/dog/x.png": b"no"})
    cfg = dict(dataset=str(root), batch_size=8, max_bad_fraction=0.2, epochs=2)
    reports = {p: loop.run(_cfg(tmp_path / p, data_path=p, **cfg)) for p in ("resident", "loader")}
    assert reports["resident"].data.data_path == "resident"
    assert reports["resident"].data.skipped == reports["loader"].data.skipped
    assert reports["resident"].data.skipped["train"]["count"] == 2
    assert _same(tmp_path / "resident", tmp_path / "loader")


def test_a_split_is_decoded_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCLI_CACHE_DIR", str(tmp_path / "cache"))
    loop.build(_cfg(tmp_path / "a"))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(resident, "_decode_all", no_decoding)
    assert loop.build(_cfg(tmp_path / "b")).data_path == "resident"


def test_an_unreadable_cache_file_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCLI_CACHE_DIR", str(tmp_path / "cache"))
    loop.build(_cfg(tmp_path / "a"))
    (stored,) = (tmp_path / "cache").rglob("*.safetensors")
    stored.write_bytes(b"not a safetensors file")
    assert loop.build(_cfg(tmp_path / "b")).data_path == "resident"
    assert stored.stat().st_size > 100  # rewritten
