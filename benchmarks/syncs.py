"""Host waits per steady-state training step, per method: what a GPU would stall on.

Counts, with kdcli's ``SyncCounter`` (a ``TorchDispatchMode``), the aten operations that make the host wait for
the device (``_local_scalar_dense``, ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` without its size, blocking copies) over ``--steps`` calls of ``Session.train_step``, after
one epoch of warm-up (which fills a teacher cache's view). The data path is left out (batches are taken from the
loader before counting). Runs on the CPU: the counts are the same on any device.

    python benchmarks/syncs.py [--steps 200] [--methods kd,dkd,nkd,dist,lskd,crd,kd-cached]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kdcli.config import RunConfig
from kdcli.engine import loop
from kdcli.engine.syncs import SyncCounter


def count(method: str, steps: int, data: str, batch: int) -> tuple[float, dict]:
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        if method.endswith("-cached"):
            method, extra = method.removesuffix("-cached"), {"teacher_cache": str(Path(tmp) / "cache")}
        cfg = RunConfig(command="distill", teacher=["cifar_resnet8"], student="cifar_resnet8", method=method,
                        dataset=data, batch_size=batch, out=str(Path(tmp) / "run"), **extra)
        sess = loop.build(cfg)
        batches = list(sess.train_loader)
        for b in batches:
            sess.train_step(b["image"], b["label"], b["index"], host_index=b["index"])
        check = getattr(sess, "check_finite", None)
        if check is not None:
            check()
        with SyncCounter() as c:
            for k in range(steps):
                b = batches[k % len(batches)]
                sess.train_step(b["image"], b["label"], b["index"], host_index=b["index"])
    return c.total / steps, dict(c.counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--methods", default="kd,dkd,nkd,dist,lskd,crd,kd-cached")
    ap.add_argument("--data", default="synthetic:8:10:256")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print(f"{'method':<11} {'waits/step':>10}  by kind (over {args.steps} steps)")
    for method in args.methods.split(","):
        per_step, kinds = count(method, args.steps, args.data, args.batch)
        print(f"{method:<11} {per_step:>10.3f}  {kinds}")


if __name__ == "__main__":
    main()
