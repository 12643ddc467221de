"""Images per second of a KD training step on one device: kdcli against a hand-written loop, in one table.

The hand-written loop is airbench's design: the training split as one uint8 tensor on the device, each batch's
pad-crop-flip one gather, the teacher under no_grad, CE 0.1 + 0.9 · T² · KL at T = 4, momentum SGD; no loader,
no host read in the loop. kdcli's rows run ``Session.train_step`` on its own batches (the resident path or the
loader, as the row says), as its loop does. Each row: a warm-up (compilation included), then ``--steps`` timed
steps between two device synchronisations; on CUDA the GPU's utilisation is sampled with ``nvidia-smi`` meanwhile
(the mean of its 100 ms samples: the share of time a kernel was running).

    python benchmarks/gpu_step.py --dataset ../shared/data/cifar10 [--steps 100] [--rows all|quick]
    python benchmarks/gpu_step.py --device cpu --teacher cifar_resnet8 --student cifar_resnet8 \
        --dataset synthetic:32:10:512 --steps 3 --rows quick          # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import time

import torch
from torch.nn import functional as F

from kdcli.config import RunConfig
from kdcli.engine import loop


class Utilisation:
    """The GPU's utilisation (%) sampled by nvidia-smi every 100 ms while the block runs (None off CUDA)."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.samples: list[float] = []

    def __enter__(self):
        if self.on:
            index = torch.cuda.current_device()
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.on:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=1)

    @property
    def mean(self) -> str:
        return f"{statistics.mean(self.samples):.0f}" if self.samples else "-"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, args, batch: int, device: torch.device, finish=None) -> tuple[float, str]:
    """(images per second over ``args.steps`` calls of ``step`` after ``args.warmup``, the GPU's mean utilisation)."""
    for _ in range(args.warmup):
        step()
    sync(device)
    with Utilisation(device) as use:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if finish is not None:
            finish()
        sync(device)
        seconds = time.perf_counter() - t0
    return args.steps * batch / seconds, use.mean


def session(args, path: str, precision: str, batch: int, compile_mode: str | None, out: str):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each row its own precision (accelerate keeps one per process)
    torch._dynamo.reset()
    cfg = RunConfig(command="distill", teacher=[args.teacher], student=args.student, method="kd",
                    dataset=args.dataset, batch_size=batch, precision=precision, data_path=path,
                    channels_last=args.channels_last, compile=compile_mode is not None,
                    compile_mode=compile_mode or "default", workers=args.workers, out=out, lr=1e-3)
    return loop.build(cfg)


def kdcli_row(args, path, precision, batch, compile_mode, device) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        sess = session(args, path, precision, batch, compile_mode, out)
        sess.student.train()
        batches = iter(())

        def step():
            nonlocal batches
            b = next(batches, None)
            if b is None:
                batches = iter(sess.train_loader)
                b = next(batches)
            sess.train_step(b["image"].to(sess.device, non_blocking=True), b["label"].to(sess.device),
                            b["index"].to(sess.device))

        return timed(step, args, batch, device, finish=sess.check_finite)


def hand_row(args, precision, batch, compiled, device) -> tuple[float, str]:
    """The hand-written loop over data held on the device (the teacher and student are kdcli's networks, their
    normalisation done once on the whole set)."""
    with tempfile.TemporaryDirectory() as out:
        sess = session(args, "resident", "fp32", batch, None, out)
        data = sess.train_loader.dataset
        data = getattr(data, "dataset", data)
        images, labels = data.images, data.labels  # uint8 (N, C, H+2p, W+2p), padded once
        teacher = sess.teacher_infos[0].model.net.eval()
        student = sess.student_info.model.net.train()
        mean, std = sess.student_info.model.mean, sess.student_info.model.std
    size, pad = data.size, data.padding
    n, chans = len(images), images.shape[1]
    if args.channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward_loss(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            kl = F.kl_div(F.log_softmax(s.float() / 4, 1), F.log_softmax(t.float() / 4, 1), log_target=True,
                          reduction="batchmean")
            return 0.1 * F.cross_entropy(s.float(), y) + 0.9 * 16 * kl

    loss_fn = torch.compile(forward_loss) if compiled else forward_loss
    span = torch.arange(size, device=device)
    chan = torch.arange(chans, device=device)
    order = torch.randperm(n, device=device)
    cursor = 0

    def step():
        nonlocal order, cursor
        if cursor + batch > n:
            order, cursor = torch.randperm(n, device=device), 0
        pos = order[cursor:cursor + batch]
        cursor += batch
        top = torch.randint(0, 2 * pad + 1, (batch, 1), device=device)
        left = torch.randint(0, 2 * pad + 1, (batch, 1), device=device)
        flip = torch.rand(batch, 1, device=device) < 0.5
        rows = top + span
        cols = torch.where(flip, left + size - 1 - span, left + span)
        x = images[pos[:, None, None, None], chan[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        x = (x.float() / 255 - mean) / std
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(x, labels[pos])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args, batch, device)


ROWS = {
    # (who, data path, precision, batch, compile mode)
    "quick": [("hand", "resident", "bf16", 256, None), ("kdcli", "resident", "bf16", 256, None),
              ("kdcli", "loader", "bf16", 256, None)],
    "all": [("hand", "resident", "bf16", 64, None), ("kdcli", "resident", "bf16", 64, None),
            ("hand", "resident", "bf16", 256, None), ("kdcli", "resident", "bf16", 256, None),
            ("hand", "resident", "fp32", 256, None), ("kdcli", "resident", "fp32", 256, None),
            ("kdcli", "loader", "bf16", 64, None), ("kdcli", "loader", "bf16", 256, None),
            ("hand", "resident", "bf16", 256, "default"), ("kdcli", "resident", "bf16", 256, "default"),
            ("kdcli", "resident", "bf16", 256, "reduce-overhead")],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", default="cifar_resnet56")
    ap.add_argument("--student", default="cifar_resnet20")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workers", type=int, default=8, help="loader rows: DataLoader processes")
    ap.add_argument("--rows", choices=sorted(ROWS), default="all")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.teacher} -> {args.student}, kd, {args.dataset}, {name}, torch {torch.__version__}"
          f"{', channels-last' if args.channels_last else ''}, {args.steps} timed steps a row")
    print("| loop | data | precision | batch | compile | img/s | GPU busy % | vs hand-written |")
    print("|---|---|---|---|---|---|---|---|")
    hand: dict[tuple, float] = {}
    for who, path, precision, batch, mode in ROWS[args.rows]:
        if mode is not None and args.no_compile:
            continue
        started = time.time()
        try:
            if who == "hand":
                rate, busy = hand_row(args, precision, batch, mode is not None, device)
                hand[(precision, batch, mode)] = rate
            else:
                rate, busy = kdcli_row(args, path, precision, batch, mode, device)
        except Exception as e:  # a row that cannot run here (no compiler, no bf16) says why and the rest go on
            print(f"| {who} | {path} | {precision} | {batch} | {mode or 'eager'} | failed: "
                  f"{str(e).splitlines()[0][:80]} | | |", flush=True)
            continue
        ref = hand.get((precision, batch, mode)) or hand.get((precision, batch, None))
        ratio = f"{rate / ref:.2f}" if ref and who != "hand" else "-"
        print(f"| {who} | {path} | {precision} | {batch} | {mode or 'eager'} | {rate:,.0f} | {busy} | {ratio} |"
              f"  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
