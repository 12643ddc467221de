"""Contrastive representation distillation (CRD): the student's embedding contrasted against a memory of the
teacher's embeddings of every training example."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn import functional as F

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
    positives, on every process) are saved as they were, and the backward pass corrects for their change, so
    the gradient is that of the scores as computed."""

    @staticmethod
    def forward(ctx, e: Tensor, memory: Tensor, idx: Tensor, touched: Tensor) -> Tensor:
        ctx.memory = memory
        ctx.save_for_backward(idx, touched, memory.index_select(0, touched))
        return _rows_dot(memory, idx, e)

    @staticmethod
    def backward(ctx, g: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        idx, touched, before = ctx.saved_tensors
        memory = ctx.memory
        change = before - memory.index_select(0, touched)  # rows moved since the forward pass
        # Σ_k g[b, k] · memory[idx[b, k]] with the memory as it is, plus Σ_k g[b, k] · change over the k that
        # read a moved row
        if _dense(memory, idx):
            dense = g.new_zeros((idx.shape[0], memory.shape[0])).scatter_add_(1, idx, g)
            return dense @ memory + dense[:, touched] @ change, None, None, None
        grad = g.new_zeros((idx.shape[0], memory.shape[1]))
        step = max(1, _CHUNK // max(1, idx.shape[0] * memory.shape[1]))
        for c in range(0, idx.shape[1], step):
            grad += torch.einsum("bk,bkd->bd", g[:, c:c + step], memory[idx[:, c:c + step]])
        slot = torch.full((memory.shape[0],), -1, dtype=torch.long, device=memory.device)
        slot[touched] = torch.arange(len(touched), device=memory.device)
        where = slot[idx]
        hits = g.new_zeros((g.shape[0], len(touched))).scatter_add_(1, where.clamp_min(0), g * (where >= 0))
        return grad + hits @ change, None, None, None


def _distinct_draws(n: Tensor, k: int) -> Tensor:
    """Row r: k distinct integers drawn uniformly from [0, n[r]) (n: R × 1, every n[r] ≥ k), in no set order.

    Where n ≤ 4k, the k smallest of n uniform keys (R × max n floats: at most 4× the draws). Beyond, draws with
    replacement whose repeats are drawn again until none is left: under 12 % repeat at first and each round
    leaves under a quarter of them, so a few rounds, and no R × n table for a million rows. Both give every k-set
    the same chance (neither tells one value from another)."""
    out = torch.empty((len(n), k), dtype=torch.long, device=n.device)
    small = n.squeeze(1) <= 4 * k
    if bool(small.any()):
        ns = n[small]
        keys = torch.rand((len(ns), int(ns.max())), device=n.device)
        keys.masked_fill_(torch.arange(keys.shape[1], device=n.device) >= ns, 2.0)  # past n: never among the k
        out[small] = keys.topk(k, dim=1, largest=False, sorted=False).indices
    if not bool(small.all()):
        nb = n[~small]
        u = torch.randint(0, 1 << 62, (len(nb), k), device=n.device) % nb
        while True:
            ordered, order = u.sort(dim=1)
            repeat = torch.zeros_like(u, dtype=torch.bool)
            repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
            if not bool(repeat.any()):
                break
            repeat = torch.zeros_like(repeat).scatter_(1, order, repeat)  # back to the draws' positions
            u = torch.where(repeat, torch.randint(0, 1 << 62, u.shape, device=n.device) % nb, u)
        out[~small] = u
    return out


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


def _first_of_each(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct index (a distributed sampler may repeat examples)."""
    uniq, inverse = torch.unique(index, return_inverse=True)
    pos = torch.arange(len(index), device=index.device)
    return torch.full((len(uniq),), len(index), device=index.device).scatter_reduce_(0, inverse, pos, "amin")


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
        # No buffer before attach_data: DDP, which wraps this module before it, would otherwise broadcast every
        # buffer (the whole memory) from rank 0 at each forward. The memory is kept identical by gathering.

    def attach_data(self, labels: Tensor) -> None:
        device = self.embed_s.weight.device
        labels = labels.to(device=device, dtype=torch.long).flatten()
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
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("by_class", rows[torch.argsort(labels[rows], stable=True)], persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)

    def sample_negatives(self, index: Tensor) -> Tensor:
        """K training rows per example (B × K) among the rows of the other classes: K distinct ones when there are
        at least K (RepDistiller's ``replace = K > len(cls_negative[target])``), else uniform with replacement."""
        y = self.labels[index]
        if bool((y < 0).any()):
            raise ValueError(f"crd: row {int(index[y < 0][0])} is not one of the training rows it was given")
        k = self.args.negatives
        count, start = self.class_count[y].unsqueeze(1), self.class_start[y].unsqueeze(1)
        others = self.n_data - count  # ≥ 1: attach_data checked there are two classes
        u = torch.randint(0, 1 << 62, (len(index), k), device=index.device) % others
        enough = others.squeeze(1) >= k
        if bool(enough.any()):
            u[enough] = _distinct_draws(others[enough], k)
        return self.by_class[u + count * (u >= start)]  # skip over the anchor's own class

    def forward(self, s: Outputs, t: Outputs | None, target: Tensor, *, images=None, index=None) -> dict[str, Tensor]:
        a = self.args
        if index is None:
            raise ValueError("crd reads and updates a memory row per example: pass each example's row index")
        if not hasattr(self, "memory_s"):
            raise ValueError("crd has no memory yet: call attach_data(labels) with the training labels first")
        f_s, f_t = s.pooled.float().flatten(1), t.pooled.detach().float().flatten(1)
        index = index.to(self.memory_s.device).long()
        with torch.autocast(f_s.device.type, enabled=False):  # float32 embeddings and scores whatever the precision
            e_s = F.normalize(self.embed_s(f_s), dim=1)
            e_t = F.normalize(self.embed_t(f_t), dim=1)
            idx_all, es_all, et_all = _gather_rows(index, e_s.detach(), e_t.detach())
            first = _first_of_each(idx_all)
            touched = idx_all[first]
            contrast = torch.cat([index.unsqueeze(1), self.sample_negatives(index)], dim=1)
            exp_s = torch.exp(_MemoryScores.apply(e_s, self.memory_t, contrast, touched) / a.T)
            exp_t = torch.exp(_MemoryScores.apply(e_t, self.memory_s, contrast, touched) / a.T)
            if bool((self.z < 0).any()):
                self._set_z(exp_s.detach(), exp_t.detach())
            crd = nce_loss(exp_s / self.z[0], self.n_data) + nce_loss(exp_t / self.z[1], self.n_data)
            self._update(touched, es_all[first], et_all[first])
        return {"ce": a.ce_weight * F.cross_entropy(s.logits.float(), target), "crd": a.beta * crd}

    @torch.no_grad()
    def _set_z(self, exp_s: Tensor, exp_t: Tensor) -> None:
        """Z = mean(exp(scores)) · N over the first batch of every process (the same value on each)."""
        local = torch.stack([exp_s.double().sum(), exp_t.double().sum(),
                             torch.tensor(float(exp_s.numel()), dtype=torch.float64, device=exp_s.device)])
        if _distributed():
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            local = torch.stack(parts).sum(0)  # the same sum, in the same order, on every process
        self.z.copy_((local[:2] / local[2] * self.n_data).float())

    @torch.no_grad()
    def _update(self, rows: Tensor, e_s: Tensor, e_t: Tensor) -> None:
        """M[i] ← L2norm(μ M[i] + (1 − μ) e) on the positive rows only."""
        mu = self.args.momentum
        for memory, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
            moved = memory.index_select(0, rows).mul_(mu).add_(e, alpha=1.0 - mu)
            memory.index_copy_(0, rows, F.normalize(moved, dim=1))
