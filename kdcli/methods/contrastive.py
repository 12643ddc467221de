"""Contrastive representation distillation (CRD): the student's embedding contrasted against a memory of the
teacher's embeddings of every training example."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn import functional as F

from kdcli.engine.syncs import on_host
from kdcli.errors import KdcliError
from kdcli.methods.base import Method, MethodArgs, Outputs, Shapes, register

NCE_EPS = 1e-7  # added to the NCE denominators, as RepDistiller's ContrastLoss
_CHUNK = 1 << 22  # memory rows × width read at once when scoring (16 MiB of float32)


def nce_loss(p: Tensor, n_data: int) -> Tensor:
    """RepDistiller's ContrastLoss (Tian et al. 2020, Eq. 18), unweighted: ``p`` (B × (1+K)) holds P_pos in column
    0 and the K negatives' P_j after it; the noise is P_n = 1/N, so with m = K·P_n
    L = −(1/B) Σ_b [log(P_pos / (P_pos + m + ε)) + Σ_j log(m / (P_j + m + ε))]."""
    b, k = p.shape[0], p.shape[1] - 1
    m = k / float(n_data)
    pos, neg = p[:, 0], p[:, 1:]
    return -(torch.log(pos / (pos + m + NCE_EPS)).sum() + torch.log(m / (neg + m + NCE_EPS)).sum()) / b


def _dense(memory: Tensor, idx: Tensor) -> bool:
    """Score against the whole memory (one B × N product, then pick the columns) rather than gather B × (1+K)
    rows: fewer bytes moved whenever N is within a few K, and a plain matrix product; small N (tests, CIFAR)."""
    n, b = memory.shape[0], idx.shape[0]
    return n <= 4 * idx.shape[1] or n * b <= _CHUNK


def _rows_dot(memory: Tensor, idx: Tensor, e: Tensor) -> Tensor:
    """⟨memory[idx[b, k]], e[b]⟩ for every (b, k) (B × (1+K))."""
    if _dense(memory, idx):
        return (e @ memory.t()).gather(1, idx)
    out = e.new_empty(idx.shape)
    step = max(1, _CHUNK // max(1, idx.shape[0] * memory.shape[1]))
    for c in range(0, idx.shape[1], step):  # the rows a chunk of columns at a time
        out[:, c:c + step] = torch.einsum("bkd,bd->bk", memory[idx[:, c:c + step]], e)
    return out


class _MemoryScores(torch.autograd.Function):
    """``_rows_dot`` with a gradient for ``e`` only, saving neither the B × (1+K) × D rows it read (RepDistiller
    keeps them: 0.5 GB per memory at B = 64, K = 16384) nor a copy of the memory.

    The memory is updated in place after scoring and before the backward pass: rows ``touched`` (the batch's
    positives on every process, sorted; ``lead[p]``: the first position of ``touched[p]``'s run) are saved as
    they were, and the backward pass corrects for their change, once per distinct row, so the gradient is that
    of the scores as computed. Every shape is fixed by the batch: nothing is read back from the device."""

    @staticmethod
    def forward(ctx, e: Tensor, memory: Tensor, idx: Tensor, touched: Tensor, lead: Tensor) -> Tensor:
        ctx.memory = memory
        ctx.save_for_backward(idx, touched, lead, memory.index_select(0, touched))
        return _rows_dot(memory, idx, e)

    @staticmethod
    def backward(ctx, g: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        idx, touched, lead, before = ctx.saved_tensors
        memory = ctx.memory
        # rows moved since the forward pass; a repeated row's change counted once, at the head of its run
        keep = lead == torch.arange(len(lead), device=lead.device)
        change = (before - memory.index_select(0, touched)) * keep.unsqueeze(1)
        # Σ_k g[b, k] · memory[idx[b, k]] with the memory as it is, plus Σ_k g[b, k] · change over the k that
        # read a moved row
        if _dense(memory, idx):
            dense = g.new_zeros((idx.shape[0], memory.shape[0])).scatter_add_(1, idx, g)
            return dense @ memory + dense[:, touched] @ change, None, None, None, None
        grad = g.new_zeros((idx.shape[0], memory.shape[1]))
        step = max(1, _CHUNK // max(1, idx.shape[0] * memory.shape[1]))
        for c in range(0, idx.shape[1], step):
            grad += torch.einsum("bk,bkd->bd", g[:, c:c + step], memory[idx[:, c:c + step]])
        slot = torch.full((memory.shape[0],), -1, dtype=torch.long, device=memory.device)
        slot[touched] = lead  # a repeated row: the same position from each of its occurrences
        where = slot[idx]
        hits = g.new_zeros((g.shape[0], len(touched))).scatter_add_(1, where.clamp_min(0), g * (where >= 0))
        return grad + hits @ change, None, None, None, None


class _Plan(NamedTuple):
    """How ``_draw_distinct`` draws, known on the host: ``width``, the largest n among the rows with n ≤ 4k (0:
    no such row), and ``least``, the smallest n among the rows with n > 4k (0: no such row)."""

    width: int
    least: int


def _plan(sizes, k: int) -> _Plan:
    """The ``_Plan`` for rows whose n are among ``sizes`` (host integers)."""
    sizes = [int(n) for n in sizes]
    return _Plan(max((n for n in sizes if n <= 4 * k), default=0), min((n for n in sizes if n > 4 * k), default=0))


def _first_distinct(n: Tensor, k: int, m: int) -> tuple[Tensor, Tensor]:
    """Row r: the first k distinct values among m uniform draws from [0, n[r]), in the order they first appear,
    and whether the row had fewer than k distinct values (``short``; its row is then incomplete).

    The values' order of first appearance is a uniformly random order of the values seen, so the first k form
    a uniform k-set given that there are k. One sort of the draws finds each value's first occurrence (a stable
    sort puts it at the head of its run); a running count ranks them; a scatter puts the first k in place."""
    u = torch.randint(0, 1 << 62, (len(n), m), device=n.device) % n
    ordered, order = u.sort(dim=1, stable=True)
    head = torch.ones_like(u, dtype=torch.bool)
    head[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = torch.zeros_like(head).scatter_(1, order, head)  # back to the draws' positions
    rank = first.cumsum(1)  # distinct values so far
    slot = torch.where(first & (rank <= k), rank - 1, k)  # the first k to columns 0..k-1, the rest to column k
    out = u.new_zeros((len(n), k + 1)).scatter_(1, slot, u)[:, :k]
    return out, rank[:, -1] < k


def _draw_count(k: int, least: int) -> int:
    """Draws for ``_first_distinct`` at n ≥ ``least`` > 4k: k, plus λ = k²/n for the draws lost to repeats
    (about m²/2n), plus 8 √λ + 16 to spare. For every k and n > 4k the k-th distinct value is then at least 7.9
    standard deviations below the mean count of distinct values: a row comes up short far less than once in 10⁹."""
    lost = k * k / least
    return k + math.ceil(lost) + 8 * math.ceil(math.sqrt(lost)) + 16


def _draw_distinct(n: Tensor, k: int, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """Row r: k distinct integers drawn uniformly from [0, n[r]) (n: R × 1, every n[r] ≥ k), in no set order,
    and which rows came up short (None when none can): those rows must be drawn again (``_redraw_short``).

    Where n ≤ 4k, the k smallest of n uniform keys (R × ``plan.width`` floats: at most 4× the draws); never
    short. Beyond, the first k distinct of a few more than k draws (``_first_distinct``), so no R × n table for
    a million rows. Both give every k-set the same chance (neither tells one value from another). With rows of
    both kinds, both are drawn for every row and each row keeps its own; which kinds occur is known on the host
    (``plan``), so nothing is read back from the device."""
    small, out, short = None, None, None
    if plan.width:
        ns = n.clamp_max(plan.width) if plan.least else n  # the large rows' keys are drawn and dropped
        keys = torch.rand((len(n), plan.width), device=n.device)
        keys.masked_fill_(torch.arange(plan.width, device=n.device) >= ns, 2.0)  # past n: never among the k
        small = out = keys.topk(k, dim=1, largest=False, sorted=False).indices
    if plan.least:
        out, short = _first_distinct(n, k, _draw_count(k, plan.least))
        if small is not None:
            large = n > 4 * k
            out, short = torch.where(large, out, small), short & large.squeeze(1)
    return out, short


def _redraw_short(n: Tensor, k: int, plan: _Plan, out: Tensor, short: Tensor) -> Tensor:
    """``out`` with its ``short`` rows drawn again until each is complete: each row keeps its first complete
    draw, uniform over the k-sets as every draw is. Each round reads a flag; reached far less than once in 10⁹
    rows (``_draw_count``)."""
    while bool(short.any()):
        again, still = _draw_distinct(n, k, plan)
        out = torch.where(short.unsqueeze(1), again, out)
        short = short & still
    return out


def _distinct_draws(n: Tensor, k: int, plan: _Plan | None = None) -> Tensor:
    """Row r: k distinct integers drawn uniformly from [0, n[r]) (n: R × 1, every n[r] ≥ k), in no set order;
    ``plan`` from the host, else from ``n`` (read back). One device read when a row has n > 4k (the check that
    no row came up short), none otherwise."""
    if plan is None:
        plan = _plan(n.flatten().tolist(), k)
    out, short = _draw_distinct(n, k, plan)
    return out if short is None else _redraw_short(n, k, plan, out, short)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(index: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """``index`` and ``rows`` of every process, concatenated in rank order (batches may differ in size)."""
    if not _distributed():
        return (index, *rows)
    world = dist.get_world_size()
    size = torch.tensor([len(index)], device=index.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    out = []
    for t, fill in [(index, -1), *((r, 0) for r in rows)]:
        padded = t.new_full((most, *t.shape[1:]), fill)
        padded[:len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:int(n.item())] for p, n in zip(parts, sizes, strict=True)]))
    return tuple(out)


def _first_of_each(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``index`` sorted (a distributed sampler may repeat examples across processes, a caller may repeat one in a
    batch), the positions it was sorted from, and for each sorted position the one where its value's run starts.
    The sort is stable, so a run's first position holds the value's first occurrence in ``index``. Same length as
    ``index``, so nothing is read back from the device."""
    ordered, order = index.sort(stable=True)
    head = torch.ones_like(index, dtype=torch.bool)
    head[1:] = ordered[1:] != ordered[:-1]
    lead = torch.where(head, torch.arange(len(index), device=index.device), 0).cummax(0).values
    return ordered, order, lead


@register
class CRD(Method):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, "Contrastive Representation
    Distillation"), as its authors' code computes it (HobbitLong/RepDistiller ``crd/criterion.py``,
    ``crd/memory.py``; the same in megvii-research/mdistiller ``mdistiller/distillers/CRD.py``).

    Embeddings: e_s = L2norm(W_s f_s + b_s), e_t = L2norm(W_t f_t + b_t), ``dim`` wide, f the pooled features
    (teacher's detached; W_t trains, as in the reference). Two memories M_s, M_t (N_rows × dim, N_rows the
    dataset's rows, indexed by each example's original row) start uniform in ±1/√(dim/3). For each example i
    of the batch, column 0 is its own row and K = ``negatives`` rows are drawn uniformly from the training rows
    of other classes (mdistiller's "exact" mode; rows labelled −1, not trained on, are never drawn; torch's
    global RNG): K distinct rows when there are at least K, as RepDistiller's ``CIFAR100InstanceSample``
    (``replace = K > len(cls_negative[target])``; on CIFAR-10/100, 16,384 of ~45,000/~49,500 rows), else with
    replacement (a subset smaller than K, as in kdcli's CPU studies). The distinct draw costs more than the
    old one ``randint``: 0.05–0.09 s per batch of 64 at CIFAR size on one core of a 2-core AMD EPYC, against 0.01 s:
    P_s[i, j] = exp(⟨M_t[j], e_s,i⟩ / T) / Z_s and P_t[i, j] = exp(⟨M_s[j], e_t,i⟩ / T) / Z_t, with
    Z = mean(exp(·)) · N set once from the first batch (over every process) and kept. With noise P_n = 1/N
    (N the number of training rows: RepDistiller's memory size; N cancels from P/(K·P_n)) and m = K·P_n,
    ``nce_loss`` is
    L(P) = −(1/B) Σ_i [log(P_i0 / (P_i0 + m + ε)) + Σ_j log(m / (P_ij + m + ε))], ε = 1e-7, and
    ``crd`` = beta · (L(P_s) + L(P_t)). Then the positive rows move: M_s[i] ← L2norm(μ M_s[i] + (1 − μ) e_s,i)
    and M_t[i] likewise with e_t,i (μ = ``momentum``). Under several processes, embeddings and indices are
    gathered so every process applies the same update to the same memory.

    Defaults: beta 0.8 with cross-entropy weight 1 and no KD term (RepDistiller ``-r 1 -a 0 -b 0.8``,
    mdistiller ``CRD.LOSS.FEAT_WEIGHT`` 0.8, ``CE_WEIGHT`` 1), K 16384, T 0.07, momentum 0.5, dim 128
    (mdistiller ``CRD.NCE``/``CRD.FEAT``, RepDistiller ``--nce_k/--nce_t/--nce_m/--feat_dim``). CRD+KD is
    ``--method kd+crd``, whose CE and KD weights are KD's (0.1, 0.9); RepDistiller's CRD+KD (``-r 1 -a 1 -b 0.8``)
    weighs both 1: ``--method kd+crd --method-arg kd.ce_weight=1 --method-arg kd.kd_weight=1``.

    Memory cost: 2 · N_rows · dim · 4 bytes (at dim 128: 51 MB for CIFAR's 50,000 rows, 1.3 GB for ImageNet's
    1.28 M), held on every process and saved with the resume state. Map-style data only. Scores are read from
    the B × N product e·Mᵀ when N is within a few K (CIFAR), else from the gathered rows in chunks; neither keeps
    RepDistiller's B × (1+K) × dim copies for the backward pass.
    """

    name = "crd"
    family = "relations"
    mimics = "which examples the teacher's embedding tells apart, contrasted against a memory of every example"
    needs = frozenset({"logits", "pooled", "index"})
    teachers = "one"

    class Args(MethodArgs):
        beta: float = Field(0.8, ge=0.0, description="weight of the contrastive term")
        negatives: int = Field(16384, ge=1, description="negatives K per example, drawn from other classes")
        T: float = Field(0.07, gt=0.0, description="temperature of the scores")
        momentum: float = Field(0.5, ge=0.0, le=1.0, description="memory momentum (1: the memory never moves)")
        dim: int = Field(128, ge=1, description="width of the trainable, L2-normalised embeddings")
        ce_weight: float = Field(1.0, ge=0.0, description="weight of the hard-label cross-entropy")

    def __init__(self, args=None, student: Shapes | None = None, teacher: Shapes | None = None):
        super().__init__(args, student, teacher)
        if student is None or teacher is None or not student.pooled or not teacher.pooled:
            raise ValueError("crd needs the pooled embedding widths of both the student and the teacher")
        self.embed_s = nn.Linear(student.pooled, self.args.dim)
        self.embed_t = nn.Linear(teacher.pooled, self.args.dim)
        self.n_data = 0
        self._z_seen: tuple[Tensor, int, bool] | None = None  # (z, its version, whether it is set): see _z_is_set
        # No buffer before attach_data: DDP, which wraps this module before it, would otherwise broadcast every
        # buffer (the whole memory) from rank 0 at each forward. The memory is kept identical by gathering.

    def attach_data(self, labels: Tensor) -> None:
        device = self.embed_s.weight.device
        labels = labels.detach().to(device="cpu", dtype=torch.long).flatten()
        rows = torch.nonzero(labels >= 0).flatten()
        counts = torch.bincount(labels[rows], minlength=int(labels.max().clamp_min(0)) + 1)
        if int((counts > 0).sum()) < 2:
            raise KdcliError("--method crd draws its negatives from other classes: the training data needs at "
                             "least two classes")
        self.n_data = len(rows)
        dim = self.args.dim
        bound = 1.0 / math.sqrt(dim / 3)  # RepDistiller's ContrastMemory initialisation
        gen = torch.Generator().manual_seed(torch.initial_seed())  # leaves the global RNG's stream as it was
        mem = torch.rand(2, len(labels), dim, generator=gen).mul_(2 * bound).sub_(bound).to(device)
        if _distributed():
            dist.broadcast(mem, 0)
        self.register_buffer("memory_s", mem[0].clone())
        self.register_buffer("memory_t", mem[1].clone())
        self.register_buffer("z", torch.full((2,), -1.0, device=device))  # Z_s, Z_t; -1: not set yet
        # the sampler's tables, derived from the labels (not saved): training rows sorted by class
        self.register_buffer("labels", labels.to(device), persistent=False)
        self.register_buffer("by_class", rows[torch.argsort(labels[rows], stable=True)].to(device),
                             persistent=False)
        self.register_buffer("class_count", counts.to(device), persistent=False)
        self.register_buffer("class_start", (torch.cumsum(counts, 0) - counts).to(device), persistent=False)
        # on the host: the labels, to check a host index without the device, and how the draws go, from the
        # classes' sizes (an anchor's class has ≥ K other rows: K distinct; fewer: K with replacement)
        self._labels_host = labels
        k = self.args.negatives
        others = [self.n_data - c for c in counts.tolist() if c > 0]
        enough = [n for n in others if n >= k]
        self._with_replacement = len(enough) < len(others)
        # the rows drawn with replacement also take (and drop) a distinct draw, their n raised to K
        self._distinct_plan = _plan(enough + [k] * self._with_replacement, k) if enough else None

    def sample_negatives(self, index: Tensor) -> Tensor:
        """K training rows per example (B × K) among the rows of the other classes: K distinct ones when there are
        at least K (RepDistiller's ``replace = K > len(cls_negative[target])``), else uniform with replacement.

        Which of the two occur is known on the host from the classes' sizes; with both in a batch, each row takes
        its own from the two drawn for all. An index on the host is checked against a host copy of the labels; one
        on the device is checked in the same single device read as the distinct draws' check (rows with n > 4K).
        So at most one device read, and none for a host index when no class has more than 4K other rows."""
        device = self.by_class.device
        if index.device.type == "cpu":
            with on_host():
                y = self._labels_host[index]
                if (y < 0).any():
                    raise ValueError(f"crd: row {int(index[y < 0][0])} is not one of the training rows it was given")
            checked, index = True, index.to(device, non_blocking=True)
        else:
            checked = False
        y = self.labels[index]
        invalid = None if checked else (y < 0).any()
        y = y.clamp_min(0)  # a row not trained on (refused below) reads class 0 meanwhile
        k = self.args.negatives
        count, start = self.class_count[y].unsqueeze(1), self.class_start[y].unsqueeze(1)
        others = self.n_data - count  # ≥ 1: attach_data checked there are two classes
        repl = distinct = short = None
        if self._with_replacement:
            repl = torch.randint(0, 1 << 62, (len(index), k), device=device) % others
        plan = self._distinct_plan
        if plan is not None:
            n = others.clamp_min(k) if repl is not None else others
            distinct, short = _draw_distinct(n, k, plan)
            if repl is not None and short is not None:
                short = short & (others >= k).squeeze(1)  # a row drawn with replacement keeps that draw
        flag = invalid if short is None else short.any() if invalid is None else invalid | short.any()
        if flag is not None and bool(flag):  # the one device read; true only for a bad row or a short draw
            bad = self.labels[index] < 0
            if bool(bad.any()):
                raise ValueError(f"crd: row {int(index[bad][0])} is not one of the training rows it was given")
            distinct = _redraw_short(n, k, plan, distinct, short)
        u = repl if distinct is None else distinct if repl is None else torch.where(others >= k, distinct, repl)
        return self.by_class[u + count * (u >= start)]  # skip over the anchor's own class

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        if index is None:
            raise ValueError("crd reads and updates a memory row per example: pass each example's row index")
        if not hasattr(self, "memory_s"):
            raise ValueError("crd has no memory yet: call attach_data(labels) with the training labels first")
        f_s, f_t = s.pooled.float().flatten(1), t.pooled.detach().float().flatten(1)
        given = index  # to sample_negatives as it came: a host index is checked on the host
        index = index.to(self.memory_s.device, non_blocking=True).long()
        with torch.autocast(f_s.device.type, enabled=False):  # float32 embeddings and scores whatever the precision
            e_s = F.normalize(self.embed_s(f_s), dim=1)
            e_t = F.normalize(self.embed_t(f_t), dim=1)
            idx_all, es_all, et_all = _gather_rows(index, e_s.detach(), e_t.detach())
            touched, order, lead = _first_of_each(idx_all)
            contrast = torch.cat([index.unsqueeze(1), self.sample_negatives(given)], dim=1)
            exp_s = torch.exp(_MemoryScores.apply(e_s, self.memory_t, contrast, touched, lead) / a.T)
            exp_t = torch.exp(_MemoryScores.apply(e_t, self.memory_s, contrast, touched, lead) / a.T)
            if not self._z_is_set():
                self._set_z(exp_s.detach(), exp_t.detach())
            crd = nce_loss(exp_s / self.z[0], self.n_data) + nce_loss(exp_t / self.z[1], self.n_data)
            self._update(touched, es_all[order], et_all[order], lead)
        return {"ce": a.ce_weight * F.cross_entropy(s.logits.float(), target), "crd": a.beta * crd}

    def _z_is_set(self) -> bool:
        """Whether Z is set (no entry −1), kept on the host: read from ``z`` only when ``z`` changed since it was
        last read or set (a new tensor, or an in-place write such as loading a state dict, which bumps its
        version): once after attach_data or a load, never in a steady step."""
        z, seen = self.z, self._z_seen
        if seen is None or seen[0] is not z or seen[1] != z._version:
            seen = self._z_seen = (z, z._version, bool((z >= 0).all()))
        return seen[2]

    @torch.no_grad()
    def _set_z(self, exp_s: Tensor, exp_t: Tensor) -> None:
        """Z = mean(exp(scores)) · N over the first batch of every process (the same value on each)."""
        local = torch.stack([exp_s.double().sum(), exp_t.double().sum(),
                             exp_s.new_full((), float(exp_s.numel()), dtype=torch.float64)])
        if _distributed():
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            local = torch.stack(parts).sum(0)  # the same sum, in the same order, on every process
        self.z.copy_((local[:2] / local[2] * self.n_data).float())
        self._z_seen = (self.z, self.z._version, True)

    @torch.no_grad()
    def _update(self, rows: Tensor, e_s: Tensor, e_t: Tensor, lead: Tensor) -> None:
        """M[i] ← L2norm(μ M[i] + (1 − μ) e) on the positive rows only; a row given more than once (``lead``: the
        position of each row's first occurrence) takes that occurrence's value at each, so every write to it is
        the same."""
        mu = self.args.momentum
        for memory, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
            moved = memory.index_select(0, rows).mul_(mu).add_(e, alpha=1.0 - mu)
            memory.index_copy_(0, rows, F.normalize(moved, dim=1).index_select(0, lead))
