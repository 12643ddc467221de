"""The evaluator against hand-computed values: top-1, NLL, ECE (on probabilities, whatever the logits' range),
and no collective of its own under a process group (the session hands every process every row)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from kdcli.engine.metrics import Evaluator

# a batch whose logits all lie in [0, 1] (torchmetrics would take them for probabilities), then an ordinary one
BATCHES = [
    (np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]]), np.array([0, 0])),
    (np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 4.0]]), np.array([0, 0, 2])),
]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _expected():
    logits = np.concatenate([z for z, _ in BATCHES])
    target = np.concatenate([y for _, y in BATCHES])
    p = _softmax(logits)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == target).astype(float)
    bins = np.minimum((conf * 15).astype(int), 14)  # 15 equal bins over [0, 1] (no confidence on an edge here)
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in np.unique(bins))
    nll = -np.log(p[np.arange(len(target)), target]).mean()
    return correct.mean(), nll, ece


def _evaluate() -> object:
    ev = Evaluator(3, ["a", "b", "c"], with_teacher=False)
    for z, y in BATCHES:
        ev.update(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    return ev.compute()


def test_top1_nll_and_ece_match_the_formulas_by_hand():
    top1, nll, ece = _expected()
    m = _evaluate()
    assert m.num_examples == 5 and m.top1 == pytest.approx(top1)
    assert m.nll == pytest.approx(nll, rel=1e-5)
    assert m.ece == pytest.approx(ece, abs=1e-5)  # 0.383; with the small batch taken as probabilities, 0.248
    assert abs(ece - 0.248) > 0.1


def test_evaluation_makes_no_collective_under_a_process_group(tmp_path, monkeypatch):
    """Each row reaches every process once already: torchmetrics' own sync would count it once per process, and
    its gather of CPU tensors fails on an NCCL-only group."""
    def collective(*args, **kwargs):
        raise AssertionError("the evaluator gathered its state across processes")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for name in ("all_gather", "all_reduce", "barrier"):
            monkeypatch.setattr(dist, name, collective)
        m = _evaluate()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    top1, nll, ece = _expected()
    assert m.top1 == pytest.approx(top1) and m.ece == pytest.approx(ece, abs=1e-5)


EPOCH_SCRIPT = """
import json, sys
from types import SimpleNamespace
import torch.distributed as dist
from kdcli.engine.loop import epoch_means
rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
sums, seen = ({"ce": 6.0, "kd": 2.0}, 4) if rank == 0 else ({"ce": 30.0, "kd": 1.0}, 6)
terms, total = epoch_means(SimpleNamespace(num_processes=2, device="cpu"), sums, seen)
json.dump({"terms": terms, "seen": total}, open(out, "w"))
dist.destroy_process_group()
"""


def test_an_epochs_loss_and_images_are_those_of_every_process(tmp_path):
    """Two processes: the loss terms are means over both shards' examples (not rank 0's) and the count is theirs."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "epoch.py"
    script.write_text(EPOCH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"),
                               str(tmp_path / f"r{r}.json")], env=env, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"r{r}.json").read_text())
        assert got["seen"] == 10
        assert got["terms"] == pytest.approx({"ce": 36.0 / 10, "kd": 3.0 / 10})


def test_a_single_process_epoch_mean_is_its_own():
    from types import SimpleNamespace

    from kdcli.engine.loop import epoch_means

    one = SimpleNamespace(num_processes=1, device="cpu")
    assert epoch_means(one, {"ce": 6.0}, 4) == (pytest.approx({"ce": 1.5}), 4)
    assert epoch_means(one, {}, 0) == ({}, 0)
