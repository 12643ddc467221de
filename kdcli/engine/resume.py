"""Resume state: everything needed to continue a run after an epoch, or in the middle of one.

``resume/progress.json`` is written last and names the state files it goes with, which carry the epoch
(and step) they were taken at: a write that fails part-way (a full disk) leaves the previous progress.json
pointing at the previous files, which are removed only once the new progress.json is in place. Nothing is
unpickled: weights are safetensors, optimizer and RNG state are read with ``weights_only=True``.

Mid-epoch state adds the step reached, the running loss sums and each process's RNG state; the batches
already seen are skipped by index (the sampler's order is a function of the seed and the epoch, and the
augmentation of each example a function of the seed, the epoch and its index), so a resumed epoch trains on
exactly the batches, with exactly the random draws, of an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcli.engine import report as rep
from kdcli.engine.rundir import PROGRESS_FILE, RESUME_DIR, write_error
from kdcli.engine.session import Session
from kdcli.models import checkpoint as ckpt


@dataclass
class Partial:
    """An epoch in progress: ``step`` steps of 0-based ``epoch`` done."""

    epoch: int
    step: int
    sums: dict[str, float]
    seen: int
    train_seconds: float
    skipped: dict | None = None  # unreadable training examples met so far in this epoch (SkipTracker.report)
    rng: dict | None = field(default=None, repr=False)  # this process's RNG state after ``step`` (on load)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "sums": self.sums, "seen": self.seen,
                "train_seconds": self.train_seconds, "skipped": self.skipped}


@dataclass
class Position:
    """Where a run stands: epochs completed, their records, and possibly an epoch in progress."""

    epoch: int = 0
    history: list[rep.EpochRecord] = field(default_factory=list)
    best: rep.Best | None = None
    elapsed: float = 0.0
    partial: Partial | None = None
    skipped: dict | None = None  # unreadable examples of the last epoch: {"train": …, "eval": …}
    ema_metrics: rep.Metrics | None = None  # the moving average's evaluation after the last epoch (not saved)


def _state_module(sess: Session) -> torch.nn.Module:
    state = {"student": sess.unwrapped_student().net, "method": sess.accelerator.unwrap_model(sess.method)}
    if sess.online:
        state["peer"] = sess.unwrapped_teacher().net
    if sess.ema is not None:
        state["ema"] = sess.ema.module.net
    return torch.nn.ModuleDict(state)


def rng_state() -> dict:
    """This process's random state: torch (CPU and CUDA), numpy and Python's."""
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss),
                       float(np_cached)],
             "python": [version, list(words), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_SHAS: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) → sha256: a teacher file hashed once per run


def teacher_files(sess: Session) -> dict[str, str] | None:
    """sha256 of each teacher's weights file, by path (None for an online method: its peer's weights are in the
    resume state, not read again from the file)."""
    if sess.online:
        return None
    out = {}
    for t in sess.teacher_infos:
        if t.path:
            try:
                st = Path(t.path).stat()
            except OSError:  # removed or moved since it was loaded: nothing to compare it with (not a write error)
                continue
            key = (str(t.path), st.st_mtime_ns, st.st_size)
            if key not in _SHAS:
                _SHAS[key] = ckpt.sha256(Path(t.path))
            out[str(t.path)] = _SHAS[key]
    return out


def _torch_save_atomic(obj, path: Path) -> None:
    tmp = ckpt.atomic_path(path)
    try:
        torch.save(obj, tmp)
        ckpt.replace_atomic(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(sess: Session, out: Path, pos: Position, started: float) -> None:
    """Write the resume state of ``pos`` (every process calls this; files come from the main process, plus
    each process's RNG state for a mid-epoch stop). progress.json goes last."""
    d = out / RESUME_DIR
    acc = sess.accelerator
    tag = f"{pos.epoch}" if pos.partial is None else f"{pos.partial.epoch}.{pos.partial.step}"
    path = d
    try:
        if sess.cache is not None:  # the teacher's logits computed so far (every process, merged under a lock)
            path = sess.cache.root
            sess.cache.flush()
        d.mkdir(parents=True, exist_ok=True)
        if pos.partial is not None:
            path = d / f"rng-{tag}-{acc.process_index}.pt"
            _torch_save_atomic(rng_state(), path)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        files = {"state": f"state-{tag}.safetensors", "optimizer": f"optimizer-{tag}.pt",
                 "rng": [f"rng-{tag}-{r}.pt" for r in range(acc.num_processes)] if pos.partial else []}
        path = d / files["state"]
        ckpt.save(path, _state_module(sess), sess.unwrapped_student().meta)
        path = d / files["optimizer"]
        _torch_save_atomic({"optimizer": sess.optimizer.state_dict()}, path)
        progress = {"epoch": pos.epoch, "config": sess.cfg.model_dump(),
                    "history": [h.model_dump() for h in pos.history],
                    "best": pos.best.model_dump() if pos.best else None, "elapsed": time.time() - started,
                    "partial": pos.partial.to_json() if pos.partial else None, "skipped": pos.skipped,
                    "files": files, "teacher_files": teacher_files(sess), "world_size": acc.num_processes,
                    "cache_counts": [sess.cache.hits, sess.cache.misses] if sess.cache is not None else None}
        path = d / PROGRESS_FILE
        ckpt.write_text_atomic(path, json.dumps(progress, indent=1))
    except OSError as e:
        raise write_error(path, e, out) from None
    keep = {PROGRESS_FILE, files["state"], files["optimizer"], *files["rng"]}
    for old in d.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            old.unlink(missing_ok=True)


def load(sess: Session, out: Path) -> Position:
    """Restore weights, method state and optimizer from ``out``'s resume state; the RNG state of a
    mid-epoch stop is returned in ``partial.rng``, to be set just before the next step."""
    d = out / RESUME_DIR
    progress = json.loads((d / PROGRESS_FILE).read_text())
    before, now = progress.get("teacher_files"), teacher_files(sess)
    if before and now is not None:
        from kdcli.errors import KdcliError

        changed = [p for p, sha in before.items() if now.get(p) not in (None, sha)]
        if changed:
            raise KdcliError(f"teacher {changed[0]} has changed since {out} started (its sha256 differs): resume "
                             "with the file it started with, or start over with --overwrite")
    world, now_world = progress.get("world_size"), sess.accelerator.num_processes
    if world is not None and world != now_world:
        # another process count is another batch (--batch-size is per process) and updates per epoch: the lr and
        # its schedule, and the report's effective batch, would no longer be the run's
        from kdcli.errors import KdcliError

        raise KdcliError(f"{out} was trained with {world} process{'es' if world > 1 else ''} "
                         f"(a batch of {world} × --batch-size {sess.cfg.batch_size}); resume it with the same number "
                         f"(not {now_world}), or start over with --overwrite")
    files = progress.get("files") or {"state": "state.safetensors", "optimizer": "optimizer.pt", "rng": []}
    ckpt.load_into(_state_module(sess), d / files["state"])
    # a CPU process of several has device cpu:RANK, which torch.load cannot map to: plain "cpu" then
    device = "cpu" if sess.device.type == "cpu" else sess.device
    state = torch.load(d / files["optimizer"], map_location=device, weights_only=True)
    sess.optimizer.load_state_dict(state["optimizer"])
    partial = None
    if progress.get("partial"):
        partial = Partial(**progress["partial"])
        rng_files = files["rng"]
        if len(rng_files) != sess.accelerator.num_processes:
            from kdcli.errors import KdcliError

            raise KdcliError(f"{out} was interrupted mid-epoch with {len(rng_files)} processes; resume it with "
                             f"the same number (not {sess.accelerator.num_processes})")
        partial.rng = torch.load(d / rng_files[sess.accelerator.process_index], weights_only=True)
    if sess.cache is not None and progress.get("cache_counts"):
        sess.cache.hits, sess.cache.misses = progress["cache_counts"]
    return Position(epoch=progress["epoch"], history=[rep.EpochRecord(**h) for h in progress["history"]],
                    best=rep.Best(**progress["best"]) if progress["best"] else None,
                    elapsed=progress["elapsed"], partial=partial, skipped=progress.get("skipped"))
