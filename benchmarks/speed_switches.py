r"""What do --channels-last and --compile buy?  Ratios of kdcli training steps, measured in one process.

For a teacher -> student pair (default cifar_resnet56 -> cifar_resnet20, batch 64, `kd`), each variant's
Session.train_step is timed in alternating rounds (plain, channels-last, compile, both) and the median step time
of each is printed against the plain one. Compilation happens in the warm-up steps, whose time is printed
separately (it is paid once per run). Also: how long a DataLoader's workers take to start (what persistent
workers would save per epoch), for the same data.

    python benchmarks/speed_switches.py [--teacher ...] [--student ...] [--dataset ...] [--batch 64]
    # on a GPU machine:
    python benchmarks/speed_switches.py --precision bf16 --teacher resnet50 --student resnet18 \
        --dataset synthetic:224:100:512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kdcli.config import RunConfig
from kdcli.engine import loop


def build(a, **switches):
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(command="distill", teacher=a.teacher, student=a.student, method=a.method, dataset=a.dataset,
                        batch_size=a.batch, precision=a.precision, lr=1e-6, out=out, **switches)
        return loop.build(cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="cifar_resnet56")
    p.add_argument("--student", default="cifar_resnet20")
    p.add_argument("--method", default="kd")
    p.add_argument("--dataset", default="synthetic:32:100:256")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default="plain,channels_last,compile,both")
    p.add_argument("--workers", type=int, default=2, help="workers for the start-up measurement (0: skip it)")
    a = p.parse_args()
    torch.manual_seed(0)
    switches = {"plain": {}, "channels_last": {"channels_last": True}, "compile": {"compile": True},
                "both": {"channels_last": True, "compile": True}}
    names = a.variants.split(",")
    sessions = {n: build(a, **switches[n]) for n in names}
    first = sessions[names[0]]
    batch = next(iter(first.train_loader))
    x, y, idx = (batch[k].to(first.device) for k in ("image", "label", "index"))
    print(f"{a.teacher} -> {a.student}, {a.method}, batch {a.batch}, {a.precision}, {first.device}, "
          f"{torch.get_num_threads()} threads")
    warm = {}
    for n, sess in sessions.items():  # compilation happens here
        t0 = time.perf_counter()
        for _ in range(3):
            sess.train_step(x.clone(), y, idx)
        sync(sess.device)
        warm[n] = time.perf_counter() - t0
    times = {n: [] for n in names}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            sess = sessions[n]
            sync(sess.device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                sess.train_step(x.clone(), y, idx)
            sync(sess.device)
            times[n].append((time.perf_counter() - t0) / a.steps)
    base = statistics.median(times[names[0]])
    print("| variant | step (ms) | ratio to plain | first 3 steps (s, incl. compilation) |\n|---|---|---|---|")
    for n in names:
        med = statistics.median(times[n])
        print(f"| {n} | {1000 * med:.1f} | {med / base:.2f} | {warm[n]:.1f} |")
    if a.workers:
        from kdcli.engine.session import make_loader

        data = first.data
        for persistent in (False, True):
            loader = make_loader(data, data.train_dataset(), a.batch, a.workers, shuffle=True,
                                 persistent_workers=persistent)
            starts = []
            for _ in range(3):  # three "epochs": time to the first batch
                t0 = time.perf_counter()
                it = iter(loader)
                next(it)
                starts.append(time.perf_counter() - t0)
                del it
            print(f"workers {a.workers}, persistent={persistent}: first batch of an epoch after "
                  f"{', '.join(f'{1000 * s:.0f}' for s in starts)} ms")


if __name__ == "__main__":
    main()
