"""How much does kdcli add to a distillation step?  Prints ratios measured in one process.

For cifar_resnet56 → cifar_resnet20 (batch 64, 32×32, 100 classes) it times a kdcli `kd` training
step (Session.train_step: student forward, teacher forward under no_grad, loss terms, backward, SGD step)
against a plain PyTorch step that does the same work by hand: for ``kd`` a hand-written KD step (teacher forward
under no_grad, CE 0.1 + 0.9 · T² · KL), for other methods a teacher forward plus a student cross-entropy step.
Rounds alternate between the two so that machine noise hits both alike; the ratio of the medians is printed.
Target for ``kd``: ≤ 1.02 (``--batch 8 --dataset synthetic:8:100:256``).

    python benchmarks/step_overhead.py [--rounds 15] [--steps 5] [--teacher cifar_resnet56] ...
    python benchmarks/step_overhead.py --all     # one row per registered method (main-stage step)
    python benchmarks/step_overhead.py --teachers 3   # kd from an ensemble of 1..3 teachers: cost per teacher
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import timm
import torch
from torch.nn import functional as F

from kdcli.config import RunConfig
from kdcli.engine import loop

LR = 1e-6


def plain_step_fn(teachers, student, opt, kd: bool = False):
    """A hand-written step: the teachers' forward under no_grad, then the student's CE step, or with ``kd`` the KD
    loss of the field's recipe (CE 0.1 + 0.9 · T² · KL at T = 4) on the first teacher's logits."""
    def step(x, y):
        with torch.no_grad():
            t_logits = [teacher(x) for teacher in teachers]
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if kd:
            kl = F.kl_div(F.log_softmax(logits / 4, dim=1), F.log_softmax(t_logits[0] / 4, dim=1), log_target=True,
                          reduction="batchmean")
            loss = 0.1 * loss + 0.9 * 16 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(fn, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x, y)
    return (time.perf_counter() - t0) / steps


def measure(teacher: str, student: str, method: str, batch: int, dataset: str,
            rounds: int, steps: int, method_args: dict[str, str] | None = None,
            teachers: int = 1) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        # a tiny step size: timing does not depend on it, and repeated steps on one batch with a fresh teacher
        # must not diverge (cc's unnormalised embeddings of an untrained resnet56's pooled features, norm ~4000,
        # blow up within three steps even at 1e-3: the curvature scales with the squared feature norm)
        cfg = RunConfig(command="distill", teacher=[teacher] * teachers, student=student, method=method,
                        method_args=method_args or {}, dataset=dataset, batch_size=batch, out=out, lr=LR)
        sess = loop.build(cfg)
    classes, chans = sess.data.num_classes, sess.data.in_chans
    # the plain networks: same architectures; each plain teacher takes the kdcli teacher's weights
    # (a trained checkpoint matters for BSS, which only attacks samples the teacher gets right)
    # the plain teachers are copies of kdcli's (its BatchNorms folded: kdcli gets no credit for the fold here)
    t_nets = [copy.deepcopy(loaded.model.net).eval() for loaded in sess.teacher_infos]
    s_net = timm.create_model(sess.student.meta.architecture, num_classes=classes, in_chans=chans).train()
    opt = torch.optim.SGD(s_net.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    plain = plain_step_fn(t_nets, s_net, opt, kd=method == "kd" and teachers == 1)
    sess.student.train()
    real = next(iter(sess.train_loader))  # a real batch: a trained teacher should see data it knows
    x, y, index = real["image"][:batch], real["label"][:batch], real["index"][:batch]
    # the plain step gets the batch already normalised, as a data pipeline would hand it over;
    # kdcli normalises inside each model (teacher and student may expect different statistics)
    mean, std = sess.student.mean, sess.student.std
    x_plain = (x - mean) / std
    def kdcli_step(x, y):
        return sess.train_step(x, y, index)  # CRD reads each example's row index

    for fn, inp in ((plain, x_plain), (kdcli_step, x)):  # warm-up
        timed(fn, inp, y, 2)
    kd_times, plain_times = [], []
    for r in range(rounds):  # alternate which goes first, so neither always runs on a warmer cache
        pair = [(plain, x_plain, plain_times), (kdcli_step, x, kd_times)]
        for fn, inp, times in (pair if r % 2 == 0 else pair[::-1]):
            times.append(timed(fn, inp, y, steps))
    return statistics.median(kd_times), statistics.median(plain_times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="cifar_resnet56")
    p.add_argument("--student", default="cifar_resnet20")
    p.add_argument("--method", default="kd")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dataset", default="synthetic:32:100:256",
                   help="data for the batch (with a checkpoint teacher: the data it was trained on)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--all", action="store_true", help="every registered method, as a table")
    p.add_argument("--teachers", type=int, default=0, help="kd from ensembles of 1..N copies of the teacher")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.teachers:
        print(f"{a.teacher} x K -> {a.student}, kd, batch {a.batch}, {a.dataset}, {torch.get_num_threads()} threads")
        print("| teachers | kdcli step (ms) | plain CE + K teacher fwd (ms) | ratio | added per teacher (ms) |")
        print("|---|---|---|---|---|")
        first = None
        for k in range(1, a.teachers + 1):
            kd, plain = measure(a.teacher, a.student, a.method, a.batch, a.dataset, a.rounds, a.steps, teachers=k)
            first = first or kd
            per = f"{1000 * (kd - first) / (k - 1):.0f}" if k > 1 else "-"
            print(f"| {k} | {1000 * kd:.0f} | {1000 * plain:.0f} | {kd / plain:.2f} | {per} |", flush=True)
        return
    if a.all:
        from kdcli import methods

        print(f"{a.teacher} -> {a.student}, batch {a.batch}, {a.dataset}, {torch.get_num_threads()} threads")
        print("| method | family | step (ms) | plain CE + teacher fwd (ms) | ratio |\n|---|---|---|---|---|")
        for name in methods.available():
            if name == "ce":
                continue
            kd, plain = measure(a.teacher, a.student, name, a.batch, a.dataset, a.rounds, a.steps)
            print(f"| `{name}` | {methods.get(name).family} | {1000 * kd:.0f} | {1000 * plain:.0f} | "
                  f"{kd / plain:.2f} |", flush=True)
        return
    kd, plain = measure(a.teacher, a.student, a.method, a.batch, a.dataset, a.rounds, a.steps)
    print(f"{a.teacher} -> {a.student}, batch {a.batch}, {a.dataset}, {torch.get_num_threads()} threads")
    what = "hand-written KD step" if a.method == "kd" else "plain CE step + teacher forward"
    print(f"{what}: {1000 * plain:.2f} ms")
    print(f"kdcli {a.method} step:  {1000 * kd:.2f} ms  (+{1000 * (kd - plain):.2f} ms)")
    print(f"ratio: {kd / plain:.3f}  (target for kd: <= 1.02)")


if __name__ == "__main__":
    main()
