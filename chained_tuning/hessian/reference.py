"""The plain-PyTorch references of the C++ ops (csrc/): the same arithmetic, the fallback where the library is
not loaded and the yardstick of tests/test_hessian_ops.py."""
from __future__ import annotations

import torch

from .answer_loss import IGNORE_INDEX


def lanczos_step_torch(w, v, v_prev, beta):
    """Reference of hessian::lanczos_step: same arithmetic (float64 per element, rounded to storage dtype)."""
    beta = float(beta)
    alpha = sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(w, v))
    sq = torch.zeros((), dtype=torch.float64, device=w[0].device)
    for a, b, p in zip(w, v, v_prev):
        p.copy_(a.double() - alpha * b.double() - beta * p.double())
        sq = sq + p.double().pow(2).sum()
    beta_next = sq.sqrt()
    inv = 1.0 / beta_next if float(beta_next) > 0 else torch.zeros_like(beta_next)
    for p in v_prev:
        p.copy_(p.double() * inv)
    return torch.stack([alpha.to(torch.float64).cpu(), beta_next.cpu()])


def power_step_torch(w, v):
    """Reference of hessian::power_step: [<w,v>, ||w||] in float64, v <- w/||w||."""
    rq = sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(w, v))
    nrm = sum(a.double().pow(2).sum() for a in w).sqrt()
    inv = 1.0 / nrm if float(nrm) > 0 else torch.zeros_like(nrm)
    for a, b in zip(w, v):
        b.copy_(a.double() * inv)
    return torch.stack([rq.cpu(), nrm.cpu()])


def shard_dot_torch(w, v):
    """Reference of hessian::shard_dot: [<w,v>, <w,w>] in float64 (one shard; the caller all-reduces)."""
    d = sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(w, v))
    q = sum(a.double().pow(2).sum() for a in w)
    return torch.stack([d.cpu(), q.cpu()]).to(torch.float64)


def lanczos_update_torch(w, v, v_prev, alpha, beta):
    """Reference of hessian::lanczos_update: v_prev <- w - alpha v - beta v_prev (float64 per element, rounded
    to the storage dtype); returns [||v_prev||^2] of this shard."""
    alpha, beta = float(alpha), float(beta)
    sq = torch.zeros((), dtype=torch.float64)
    for a, b, p in zip(w, v, v_prev):
        p.copy_(a.double() - alpha * b.double() - beta * p.double())
        sq = sq + p.double().pow(2).sum().cpu()
    return sq.reshape(1)


def answer_loss_sum_ref(logits, labels):
    """Same semantics as finetune.answer_loss_sum: (sum of answer-token NLL, number of answer tokens)."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    tg = labels[:, 1:].reshape(-1)
    n = int((tg != IGNORE_INDEX).sum())
    return torch.nn.functional.cross_entropy(lg, tg, ignore_index=IGNORE_INDEX, reduction="sum"), n
