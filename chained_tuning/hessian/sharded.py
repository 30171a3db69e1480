"""Several processes (torchrun): every rank holds the model and its share of the samples, and the solver's
vectors are sharded across the ranks (ShardedOperator), so that at 7B no rank holds a whole parameter-sized
vector beyond the model's own gradients. split_rows deals the samples out, balanced by answer tokens.
"""
from __future__ import annotations

import functools
import math

import torch

from . import ops
from .answer_loss import IGNORE_INDEX
from .reference import lanczos_update_torch, shard_dot_torch
from .solvers import _dot, _random_flat

BUCKET_ELEMS = 1 << 26  # elements per collective call: bounds the temporaries of the gather / reduce


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def shard_bounds(n, rank, world):
    """(lo, hi, S): rank's flat slice [lo, hi) of an n-element vector; every shard is stored with S = ceil(n /
    world) elements (the last one zero-padded), so that the collectives see equal sizes."""
    S = -(-n // world)
    lo = min(n, rank * S)
    return lo, min(n, lo + S), S


def split_rows(batches, rank, world, first_rows=0):
    """This rank's samples: ([its rows of the first `first_rows` samples of batches[0]] collated or None,
    [its other rows in micro-batches]). Each group is balanced across ranks by answer tokens (longest
    first to the least loaded rank; ties: the lower rank), rows keep their order, and micro-batches hold at
    most as many rows as the largest given batch; trailing padding is trimmed and re-added."""
    rows = []
    for b in batches:
        am = b.get("attention_mask")
        for r in range(int(b["input_ids"].shape[0])):
            length = int(b["input_ids"].shape[1])
            if am is not None:
                nz = torch.nonzero(am[r]).flatten()
                length = int(nz[-1]) + 1 if nz.numel() else 1
            row = {"input_ids": b["input_ids"][r, :length], "labels": b["labels"][r, :length],
                   "attention_mask": (am[r, :length] if am is not None else torch.ones(length, dtype=torch.long))}
            rows.append((int((row["labels"][1:] != IGNORE_INDEX).sum()), len(rows), row))
    per = max(int(b["input_ids"].shape[0]) for b in batches)
    groups = [rows[:first_rows], rows[first_rows:]]
    mine = []
    for g in groups:
        load = [(0, 0)] * world
        owner = {}
        for tok, idx, _ in sorted(g, key=lambda x: (-x[0], x[1])):
            k = min(range(world), key=lambda j: (load[j], j))
            owner[idx] = k
            load[k] = (load[k][0] + tok, load[k][1] + 1)
        mine.append([row for _, idx, row in g if owner[idx] == rank])
    first = _collate_rows(mine[0]) if mine[0] else None
    rest = sorted(mine[1], key=lambda r: len(r["input_ids"]))
    return first, [_collate_rows(rest[i:i + per]) for i in range(0, len(rest), per)]


def _collate_rows(rows):
    T = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        t = torch.full((len(rows), T), fill, dtype=rows[0][key].dtype)
        for i, r in enumerate(rows):
            t[i, :len(r[key])] = r[key]
        out[key] = t
    return out


class ShardedOperator:
    """H v with every vector sharded across the ranks of the process group: rank r holds the flat slice
    shard_bounds(n, r, world) of the parameter vector in vec_dtype (float32; float64 for a float64 model),
    as [one 1-D tensor]. The model is replicated; `op` is this rank's HessianOperator over its own samples
    (its loss divided by the global answer-token count), so H = sum_r H_r. An HVP all-gathers v into the
    parameters' shapes (in the parameters' dtype; one flat buffer, reused), applies H_r, and reduce-scatters
    the sum into shards (summed in vec_dtype, in buckets of BUCKET_ELEMS; all-reduce + slice where the backend
    has no reduce-scatter, e.g. gloo: twice the traffic). Dot products are local float64 sums all-reduced."""

    def __init__(self, op):
        self.dist = _dist()
        self.op = op
        self.rank, self.world = self.dist.get_rank(), self.dist.get_world_size()
        self.params = op.params
        self.sizes = [p.numel() for p in op.params]
        self.n = sum(self.sizes)
        self.lo, self.hi, self.S = shard_bounds(self.n, self.rank, self.world)
        self.vec_dtype = op.vec_dtype
        self.device = op.params[0].device
        pdt = {p.dtype for p in op.params}
        self.buf_dtype = pdt.pop() if len(pdt) == 1 else self.vec_dtype
        self._buf = torch.zeros(self.world * self.S, dtype=self.buf_dtype, device=self.device)
        self.reduce_scatter = self.dist.get_backend() == "nccl"
        # the *_single names of torch >= 2.13, the *_tensor ones before
        self._all_gather = getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor
        self._reduce_scatter = getattr(self.dist, "reduce_scatter_single", None) or self.dist.reduce_scatter_tensor

    @property
    def hvp_count(self):
        return self.op.hvp_count

    @property
    def sub_hvp_count(self):
        return self.op.sub_hvp_count

    def _views(self):
        flat = self._buf[:self.n]
        return [t.view(p.shape) for t, p in zip(flat.split(self.sizes), self.params)]

    def gather(self, v):
        """[shard] -> tensors shaped like the parameters (views of the reused buffer: valid until the next call)."""
        shard = v[0]
        grid = self._buf.view(self.world, self.S)
        for o in range(0, self.S, BUCKET_ELEMS):
            b = min(BUCKET_ELEMS, self.S - o)
            parts = torch.empty(self.world * b, dtype=self.vec_dtype, device=self.device)
            self._all_gather(parts, shard[o:o + b].contiguous())
            grid[:, o:o + b].copy_(parts.view(self.world, b))
        return self._views()

    def scatter_sum(self, tensors):
        """Tensors shaped like the parameters, summed over ranks -> [this rank's shard] (clears `tensors`)."""
        flat = self._buf
        off = 0
        for i, t in enumerate(tensors):
            flat[off:off + t.numel()].copy_(t.reshape(-1))
            off += t.numel()
            tensors[i] = None
        flat[off:].zero_()
        grid = flat.view(self.world, self.S)
        out = torch.empty(self.S, dtype=self.vec_dtype, device=self.device)
        for o in range(0, self.S, BUCKET_ELEMS):
            b = min(BUCKET_ELEMS, self.S - o)
            chunk = grid[:, o:o + b].to(self.vec_dtype).contiguous().view(-1)
            if self.reduce_scatter:
                self._reduce_scatter(out[o:o + b], chunk)
            else:
                self.dist.all_reduce(chunk)
                out[o:o + b].copy_(chunk.view(self.world, b)[self.rank])
        return [out]

    def hvp(self, v):
        return self.scatter_sum(self.op.hvp(self.gather(v)))

    def hvp_first(self, v):
        return self.scatter_sum(self.op.hvp_first(self.gather(v)))

    def allreduce(self, t):
        t = t.to(device=self.device if self.dist.get_backend() == "nccl" else "cpu", dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.cpu()

    def reduce_sum(self, x: float) -> float:
        return float(self.allreduce(torch.tensor([float(x)]))[0])

    def dot(self, a, b):
        return self.reduce_sum(_dot(a, b))

    def random(self, seed):
        return [_random_flat(self.n, self.lo, self.hi, seed, self.S).to(self.device, self.vec_dtype)]

    def gradient(self):
        g = self.op.gradient()
        if g is None:  # no graph retained on this rank: zeros, so that the collective still runs
            g = [torch.zeros_like(p, dtype=self.vec_dtype) for p in self.params]
        return self.scatter_sum(g)

    def local(self, tensors):
        """The shard of a vector every rank holds whole (tensors shaped like the parameters)."""
        out = torch.zeros(self.S, dtype=self.vec_dtype, device=self.device)
        off = 0
        for t in tensors:
            a, b = max(off, self.lo), min(off + t.numel(), self.hi)
            if a < b:
                out[a - self.lo:b - self.lo].copy_(t.reshape(-1)[a - off:b - off])
            off += t.numel()
        return [out]

    def lanczos_step(self, use_ext):
        return functools.partial(sharded_lanczos_step, allreduce=self.allreduce, use_ext=use_ext)

    def power_step(self, use_ext):
        return functools.partial(sharded_power_step, allreduce=self.allreduce, use_ext=use_ext)


def sharded_lanczos_step(w, v, vp, beta, allreduce, use_ext=True):
    """hessian::lanczos_step on one shard of vectors split across processes: the local halves
    (shard_dot, lanczos_update) with their float64 scalars summed by allreduce(tensor) -> tensor."""
    dot2 = ops.shard_dot if use_ext else shard_dot_torch
    update = ops.lanczos_update if use_ext else lanczos_update_torch
    alpha = allreduce(dot2(w, v))[0]
    sq = float(allreduce(update(w, v, vp, alpha.to(v[0].device), beta.to(v[0].device)))[0])
    beta_next = math.sqrt(max(sq, 0.0))
    for t in vp:
        t.mul_(1.0 / beta_next if beta_next > 0 else 0.0)
    return torch.tensor([float(alpha), beta_next], dtype=torch.float64)


def sharded_power_step(w, v, allreduce, use_ext=True):
    """hessian::power_step on one shard (see sharded_lanczos_step)."""
    dot2 = ops.shard_dot if use_ext else shard_dot_torch
    rq, sq = allreduce(dot2(w, v)).tolist()
    nrm = math.sqrt(max(sq, 0.0))
    for a, b in zip(w, v):
        b.copy_(a * (1.0 / nrm if nrm > 0 else 0.0))
    return torch.tensor([rq, nrm], dtype=torch.float64)


def _gather_ints(op, x):
    """x from every rank, in rank order (float64 all-reduce of a one-hot row)."""
    t = torch.zeros(op.world, dtype=torch.float64)
    t[op.rank] = float(x)
    return op.allreduce(t).tolist()
