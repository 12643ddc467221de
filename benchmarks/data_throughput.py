"""Can the data pipeline keep up with training?  Images per second of kdcli's training batches, from the loader
(decode, augment, collate) per worker count and from the resident path (decoded once, a gather per batch), against
the images per second a training step of the student consumes.

Everything is built as ``kdcli train`` builds it (``loop.build``): the same dataset opening, per-model input
size, augmentation recipe and DataLoader. The step is the student's CE step (``Session.train_step``) on one
batch, repeated; the loader is timed over whole batches after a warm-up batch (worker start-up excluded).

    python benchmarks/data_throughput.py --dataset ../shared/data/imagenette-128 --model mobilenetv3_small_100 \
        --image-size 64 --augment imagenet
    python benchmarks/data_throughput.py --dataset ../shared/data/cifar10 --model cifar_resnet8 --augment cifar

The resident row's first build decodes the split (timed: ``decode``) into a fresh ``$KDCLI_CACHE_DIR``; a second
build reads it back from there (``cached``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from kdcli.config import RunConfig
from kdcli.engine import loop


def session(args, workers: int, path: str = "loader"):
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(command="train", student=args.model, dataset=args.dataset, batch_size=args.batch_size,
                        image_size=args.image_size, augment=args.augment, workers=workers, out=out,
                        train_split=args.train_split, data_path=path)
        return loop.build(cfg)


def loader_rate(sess, batches: int) -> float:
    """Training images per second out of the loader (after its first batch: workers started)."""
    it = iter(sess.train_loader)
    next(it)
    seen, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - t0)


def step_rate(sess, steps: int) -> float:
    batch = next(iter(sess.train_loader))
    images, labels = batch["image"], batch["label"]
    sess.train_step(images, labels)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        sess.train_step(images, labels)
    return steps * images.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", default="cifar_resnet8")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--augment", default="auto")
    p.add_argument("--train-split", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args()

    sess = session(args, 0)
    step = step_rate(sess, args.steps)
    print(f"{args.model} on {args.dataset}: input {sess.unwrapped_student().meta.input_size} px, "
          f"augment {sess.data.augment}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"training step (CE): {step:.0f} img/s")
    print(f"{'path':>8} {'workers':>7} {'batches img/s':>14} {'batches / step':>15}")
    for workers in (int(w) for w in args.workers.split(",")):
        rate = loader_rate(session(args, workers), args.batches)
        print(f"{'loader':>8} {workers:>7} {rate:>14.0f} {rate / step:>15.2f}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KDCLI_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        session(args, 0, "resident")
        decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        sess = session(args, 0, "resident")
        cached = time.perf_counter() - t0
        if sess.data_path != "resident":
            print("resident: does not apply to this data and recipe")
            return
        rate = loader_rate(sess, args.batches * 10)
        print(f"{'resident':>8} {0:>7} {rate:>14.0f} {rate / step:>15.2f}   (build: {decode:.1f} s decoding, "
              f"{cached:.1f} s from the cache)")

if __name__ == "__main__":
    main()
