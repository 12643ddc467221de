"""What does --teacher-cache buy?  Epoch times of a cached `kd` run against a plain CE epoch and an uncached `kd`
epoch of the same student, measured in one process.

Variants (the same data, batch and student; epochs alternate between them so that machine noise hits all alike):
  ce        standard training of the student alone (the floor a cache aims at)
  kd        distillation, the teacher's forward on every batch
  kd-fill   the cached run's first epoch: every row a miss, the teacher runs and its logits are stored
  kd-cached the cached run's later epochs: every row a hit, no teacher forward

    python benchmarks/teacher_cache.py [--teacher cifar_resnet56] [--student cifar_resnet20] [--batch 64]
        [--dataset synthetic:32:100:1344] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kdcli.config import RunConfig
from kdcli.engine import loop


def epoch(sess, number: int) -> float:
    """One training epoch (data loading included), as the loop runs it; seconds."""
    sess.student.train()
    if sess.cache is not None:
        sess.cache_view = sess.cache.view_of(number)
    sess.data.set_epoch(sess.cache_view if sess.cache is not None else number)
    if hasattr(sess.train_loader, "set_epoch"):
        sess.train_loader.set_epoch(number)
    t0 = time.perf_counter()
    for batch in sess.train_loader:
        sess.train_step(batch["image"], batch["label"], batch["index"])
    if sess.cache is not None:
        sess.cache.flush()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="cifar_resnet56")
    p.add_argument("--student", default="cifar_resnet20")
    p.add_argument("--dataset", default="synthetic:32:100:1344", help="1,344 training images: 21 batches of 64")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(dataset=a.dataset, batch_size=a.batch, augment="none", workers=0, lr=1e-3, out=tmp)
        ce = loop.build(RunConfig(command="train", student=a.student, method="ce", **common))
        kd = loop.build(RunConfig(command="distill", teacher=a.teacher, student=a.student, method="kd", **common))
        cached = loop.build(RunConfig(command="distill", teacher=a.teacher, student=a.student, method="kd",
                                      teacher_cache=f"{tmp}/cache", **common))
        print(f"{a.teacher} -> {a.student}, kd, batch {a.batch}, {a.dataset}, {len(kd.train_loader)} batches an "
              f"epoch, {torch.get_num_threads()} threads, {kd.device}")
        for sess in (ce, kd):
            epoch(sess, 0)  # warm-up
        fill = epoch(cached, 0)
        times = {"ce": [], "kd": [], "kd-cached": []}
        for r in range(a.rounds):
            order = [("ce", ce), ("kd", kd), ("kd-cached", cached)]
            for name, sess in order if r % 2 == 0 else order[::-1]:
                times[name].append(epoch(sess, r + 1))
        med = {k: statistics.median(v) for k, v in times.items()}
        print("| epoch | seconds | vs CE epoch | vs uncached kd |\n|---|---|---|---|")
        for name, t in (("ce", med["ce"]), ("kd", med["kd"]), ("kd-fill (first cached epoch)", fill),
                        ("kd-cached", med["kd-cached"])):
            print(f"| {name} | {t:.2f} | {t / med['ce']:.2f} | {t / med['kd']:.2f} |")
        print(f"cache: {cached.cache.report()['hits']} hits, {cached.cache.report()['misses']} misses")


if __name__ == "__main__":
    main()
