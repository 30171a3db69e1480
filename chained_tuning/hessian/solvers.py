"""The eigen-solvers on an operator's HVPs: Lanczos (three-term recurrence, the certified bounds of its extreme
Ritz values and the stop rules on them) and power iteration (eigenthings' stop rule), and their start vectors
(seeded random, gradient + random, the subsample warm start).

An operator here is anything with hvp(v), dot(a, b) and random(seed) on lists of tensors (HessianOperator,
ShardedOperator; gradient() and hvp_first(v) for the two warm starts). The rules of csrc/hessian.cpp's C++
loops are the same (ritz_bounds, _lanczos_stop).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import ops
from .errors import CurvatureError

STOP_RULES = {"both": 0, "dominant": 1}
START_VECTORS = ("subsample", "gradient+random", "random")
DOMINANT_MARGIN = 0.05
STOP_REASONS = {0: "max_iter", 1: "bound_both_ends", 2: "invariant_subspace", 3: "bound_dominant_end"}
DEFAULT_RTOL = 1e-3
RANDOM_BLOCK = 1 << 20  # elements per seeded block of the random vector
DOT_CHUNK = 1 << 24     # elements per float64 partial inner product (_dot)
WARM_STEPS = 4        # Lanczos steps on the subsample (4: the tiny ARC checkpoint needs 2 full HVPs, 4 with 3)
WARM_RTOL = 1e-2      # the warm start stops early where H_1's dominant end is certified to this (ToxiGen: 3 steps)
WARM_SHARE = 0.1     # of the samples in the warm-start subsample (at least 2)
WARM_RANDOM = 0.05    # weight of the seeded random part added to the warm-start vector
WARM_VECTORS = 6      # parameter-sized vectors the warm start holds at once (basis + work + first gradient)


def tridiagonal(alphas, betas):
    """T_k of a Lanczos run (float64): alphas on the diagonal, the first k - 1 betas beside it (the last beta is
    the residual's norm, not part of T_k)."""
    k = len(alphas)
    T = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        off = np.asarray(betas[:k - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    return T


def ritz_bounds(alphas, betas):
    """Extreme Ritz values of T_k and their certified error bounds (the rule of csrc/hessian.cpp's
    ritz_bounds): (theta_min, theta_max, r_min, r_max, bound_min, bound_max). r = |beta_k s_k| puts an
    eigenvalue within r of theta. The tighter r^2 / gap (Parlett 11.7) needs the gap from that eigenvalue to
    the rest of the spectrum, which a Krylov space knows only once the next Ritz value of the same end is
    resolved: k >= 3 and that neighbour theta_n has r_n < |theta - theta_n| / 2 (its eigenvalue is then the
    next one, the assumption the stop rules make of the extreme Ritz values). gap = min over the other Ritz
    values theta_j of |theta - theta_j| - r_j, used where it exceeds r, and trusted no further than the last
    step's change of theta (an end still moving by more has not met the eigenvalue the gap assumes: on the
    tiny CommonsenseQA checkpoint, whose top eigenvalues cluster, a bare r^2/gap claimed 9e-4 at an error of
    1.5e-3, and with k = 2, where the other Ritz value mixes all the rest, 1e-3 at 3e-3). bound is the smaller
    of r and max(r^2 / gap, |theta_k - theta_{k-1}|)."""
    k = len(alphas)
    tridiag = tridiagonal(alphas, betas)
    theta, eigvecs = np.linalg.eigh(tridiag)
    r = np.abs(float(betas[k - 1]) * eigvecs[-1, :])
    prev = np.linalg.eigvalsh(tridiag[: k - 1, : k - 1]) if k >= 3 else None

    def bound(i, n):
        if k < 3 or not r[n] < 0.5 * abs(theta[i] - theta[n]):
            return float(r[i])
        gap = min(abs(theta[i] - theta[j]) - r[j] for j in range(k) if j != i)
        if not (math.isfinite(gap) and gap > r[i]):
            return float(r[i])
        moved = abs(theta[i] - (prev[0] if i == 0 else prev[-1]))
        return float(min(r[i], max(r[i] ** 2 / gap, moved)))
    return float(theta[0]), float(theta[-1]), float(r[0]), float(r[-1]), bound(0, 1), bound(k - 1, k - 2)


def ritz_extremes(alphas, betas):
    """Ritz values of T_k; returns (theta_min, theta_max, res_min, res_max) with res = |beta_k s_last|."""
    return ritz_bounds(alphas, betas)[:4]


def _lanczos_stop(alphas, betas, rtol, stop="dominant", margin=DOMINANT_MARGIN):
    """Stop code after step k (the rule of csrc/hessian.cpp's lanczos_stop_code), rtol a tolerance on the
    eigenvalue itself. "both": both extreme Ritz values have bound <= rtol * rho_k (ritz_bounds). "dominant":
    the end giving rho_k has bound <= rtol * rho_k and the other end is bounded away from it, |theta_o| + r_o <=
    (1 - margin) * rho_k. That assumes, as every Krylov stop does for the dominant end too, that an extreme
    Ritz value tracks the extreme eigenvalue of its end (it is never outside the spectrum); use "both" where a
    second end near rho matters. Either stops when beta_k <= 1e-12 rho_k (an invariant subspace: exact)."""
    lmin, lmax, rmin, rmax, bmin, bmax = ritz_bounds(alphas, betas)
    scale = max(abs(lmin), abs(lmax))
    if betas[-1] <= 1e-12 * max(scale, 1e-300):
        return 2
    if max(bmin, bmax) <= rtol * scale:
        return 1
    if stop == "dominant":
        bd, other = (bmax, abs(lmin) + rmin) if abs(lmax) >= abs(lmin) else (bmin, abs(lmax) + rmax)
        if bd <= rtol * scale and other <= (1.0 - margin) * scale:
            return 3
    return 0


def _random_flat(n, lo, hi, seed, length=None):
    """Elements [lo, hi) of the seeded Gaussian vector of length n (float64, zero-padded to `length`): block b
    of RANDOM_BLOCK elements comes from its own generator (seed, b), so that a shard draws its slice alone
    and one process and several draw the same vector."""
    out = torch.zeros(hi - lo if length is None else length, dtype=torch.float64)
    for b in range(lo // RANDOM_BLOCK, -(-hi // RANDOM_BLOCK)):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        blk = torch.randn(min(RANDOM_BLOCK, n - b * RANDOM_BLOCK), generator=gen, dtype=torch.float64)
        s, e = max(lo, b * RANDOM_BLOCK), min(hi, (b + 1) * RANDOM_BLOCK)
        out[s - lo:e - lo] = blk[s - b * RANDOM_BLOCK:e - b * RANDOM_BLOCK]
    return out


def _start_vector(params, seed, dtype=None):
    """The seeded Gaussian vector (_random_flat) in the parameters' shapes (dtype: theirs unless given)."""
    n = sum(p.numel() for p in params)
    flat = _random_flat(n, 0, n, seed)
    return [t.view(p.shape).to(device=p.device, dtype=dtype or p.dtype)
            for t, p in zip(flat.split([p.numel() for p in params]), params)]


def _mixed_start_vector(op, seed, r=None):
    """g/||g|| + r/||r||: the loss gradient (a by-product of the graph build; it leans towards the top of the
    spectrum) plus a seeded Gaussian r of the same weight, which keeps every eigenvector in the Krylov space
    almost surely. Falls back to r alone where no gradient is available or it is zero / not finite.
    op: a HessianOperator or ShardedOperator; r: the random vector when the caller already drew it."""
    r = op.random(seed) if r is None else r
    g = op.gradient() if hasattr(op, "gradient") else None
    if g is None:
        return r, "random"
    gn, rn = _norm(g, op.dot), _norm(r, op.dot)
    if not (gn > 0 and math.isfinite(gn)):
        return r, "random"
    return [_in_float64(lambda x, y: x / gn + y / rn, a, b) for a, b in zip(g, r)], "gradient+random"


def _dot(a, b):
    """<a, b> over lists of tensors, accumulated in float64: on CPU by hessian::multi_dot where the extension is
    loaded (exact products, no copies: a third of the time), else DOT_CHUNK elements at a time, so that the
    float64 copies stay small (a whole 7B shard's would be 2 x 6.7 GB per GPU on 8)."""
    if _multi_dot_applies(a, b):
        return float(ops.multi_dot(a, b))
    parts = []
    for x, y in zip(a, b):
        x, y = x.reshape(-1), y.reshape(-1)
        for i in range(0, x.numel(), DOT_CHUNK):
            parts.append(torch.dot(x[i:i + DOT_CHUNK].double(), y[i:i + DOT_CHUNK].double()))
    return float(sum(parts))


def _multi_dot_applies(a, b):
    if not (a and ops.library_loaded() and hasattr(torch.ops.hessian, "multi_dot")):
        return False
    return all(x.device.type == "cpu" and x.dtype == y.dtype and x.shape == y.shape for x, y in zip(a, b))


def _norm(v, dot=_dot):
    return math.sqrt(max(dot(v, v), 0.0))


def _subsample_start_vector(op, seed, steps=WARM_STEPS):
    """Warm start from a subsample: `steps` Lanczos steps (stored basis, full reorthogonalisation) on H_1, the
    Hessian of the k samples HessianOperator(keep_first=k) split off (k = ceil(N/10), at least 2: an H_1 v
    costs about k/N of an H v), and its Ritz vector y of the end of largest magnitude, plus
    WARM_RANDOM * r/||r|| (r the seeded Gaussian, so every eigenvector stays in the Krylov space). y is
    close to H's dominant eigenvector as far as k samples represent all N (squared overlap 0.91-0.96 with 5
    of 50 samples on the tiny ARC checkpoint), which saves the full solve about two HVPs to rho within 1e-3.
    It stops before `steps` where H_1's end of largest magnitude is certified to WARM_RTOL (_lanczos_stop's
    rules): k samples represent all N far less well than that, so further sub-steps move y no closer to H's
    eigenvector (the tiny ToxiGen checkpoint: 3 sub-steps, its full HVPs unchanged; at 3e-2 CommonsenseQA's
    full solve took 8 HVPs instead of 6).
    The full solve is unchanged: same operator, same stop rule. op: HessianOperator or ShardedOperator."""
    dot = op.dot
    r = op.random(seed)
    q0, _ = _mixed_start_vector(op, seed, r)  # the subsample's graph sits inside g: the same lean
    alphas, betas, basis = lanczos_basis(op.hvp_first, dot, q0, steps,
                                         stop=lambda a, b: len(a) >= 2 and _lanczos_stop(a, b, WARM_RTOL) != 0)
    k = len(alphas)
    theta, eigvecs = np.linalg.eigh(tridiagonal(alphas, betas))
    col = eigvecs[:, -1] if abs(theta[-1]) >= abs(theta[0]) else eigvecs[:, 0]
    y = [sum(float(col[i]) * basis[i][n] for i in range(k)) for n in range(len(basis[0]))]
    y = _normalize(y, dot)
    weight = WARM_RANDOM / _norm(r, dot)
    v0 = [a + weight * b for a, b in zip(y, r)]
    return v0, {"steps": k, "samples": None, "answer_tokens": None,
                "subsample_ritz": [float(theta[0]), float(theta[-1])]}


def lanczos_basis(matvec, dot, v0, steps, stop=None, reorthogonalise=True):
    """Lanczos from v0 (need not be normalised); matvec(v) -> H v, dot(a, b) the (all-reduced) inner product.
    Stops after `steps` steps, at an invariant subspace (beta_k <= 1e-12 max |alpha|) or where stop(alphas, betas)
    is true. Returns (alphas, betas, basis).
    reorthogonalise=True: the basis is stored and each new vector orthogonalised against all of it (modified
    Gram-Schmidt, twice): no ghost copies, so every Ritz value of T_k, not only the extreme ones, approximates a
    distinct eigenvalue, and the quadrature T_k gives (its nodes, the squared first components of its
    eigenvectors) is exact for the moments up to 2k - 1. It holds k + 1 parameter-sized vectors at once (a
    sharded operator: k + 1 shards per rank), and `basis` is all of them.
    reorthogonalise=False: the three-term recurrence alone, three vectors held whatever k (`basis`: the last
    two). Either way matvec's output is updated in place, so it must be a new tensor, as every operator's hvp is.
    Orthogonality is lost once a Ritz value converges, and converged eigenvalues come back as copies ("ghosts"),
    but a Ritz value with a small residual still lies that close to an eigenvalue (Paige 1980) and the
    quadrature's low moments stay accurate (Knizhnerman 1996): the memory-lean path (measures.py)."""
    basis, alphas, betas = [_normalize(v0, dot)], [], []
    for j in range(steps):
        w = matvec(basis[-1])
        if reorthogonalise:
            alphas.append(dot(w, basis[-1]))
            for _ in range(2):  # twice is enough (Kahan)
                for q in basis:
                    c = dot(w, q)  # every rank takes part in the all-reduce, an empty shard too
                    if w:
                        torch._foreach_add_(w, q, alpha=-c)  # in place: matvec's output is a new tensor
        else:  # Paige's order: beta's term out before alpha is taken (the stabler variant); in place on w
            if len(basis) > 1:
                for a, q in zip(w, basis[-2]):
                    a.sub_(q, alpha=betas[-1])
            alphas.append(dot(w, basis[-1]))
            for a, q in zip(w, basis[-1]):
                a.sub_(q, alpha=alphas[-1])
        b = _norm(w, dot)
        betas.append(b)
        if j == steps - 1 or not b > 1e-12 * max(abs(a) for a in alphas) or (stop and stop(alphas, betas)):
            break
        if reorthogonalise:
            basis.append([t / b for t in w])
        else:  # w becomes the next vector where it is: q_{j-1} is let go first, three vectors at most
            basis = [basis[-1]]
            for t in w:
                t.div_(b)
            basis.append(w)
    return alphas, betas, basis


def _check_start(start, checkpointing, start_name="start", ckpt_name="gradient_checkpointing"):
    if start == "subsample" and checkpointing == "on":
        raise CurvatureError(f"{start_name} subsample needs the subsample's retained graph, and {ckpt_name} on "
                             f"retains none: use {start_name} gradient+random or random, or {ckpt_name} auto")


def _warm_start_fits(params, budget, world=1):
    size = 8 if params[0].dtype == torch.float64 else 4  # the solver's vectors: float32 unless the model is float64
    nbytes = sum(p.numel() * size for p in params) / world
    return WARM_VECTORS * nbytes <= 0.25 * budget


def _normalize(v, dot=_dot):
    nrm = _norm(v, dot)
    if nrm == 0:
        raise CurvatureError("start vector is zero")
    return [_in_float64(lambda x: x / nrm, t) for t in v]


def _in_float64(fn, *tensors):
    """fn of the tensors computed in float64 and stored in the last one's dtype, DOT_CHUNK elements at a time
    (the float64 copies stay small, as in _dot); a new contiguous tensor of the last one's shape."""
    out = torch.empty(tensors[-1].shape, dtype=tensors[-1].dtype, device=tensors[-1].device)
    flat, ins = out.view(-1), [t.reshape(-1) for t in tensors]
    for i in range(0, flat.numel(), DOT_CHUNK):
        flat[i:i + DOT_CHUNK] = fn(*(t[i:i + DOT_CHUNK].double() for t in ins))
    return out


def _lanczos_python(op, v0, max_iter, rtol, step, stop="dominant", margin=DOMINANT_MARGIN, times=None,
                    progress=None):
    """The three-term recurrence without a stored basis (three parameter-sized vectors). Without
    reorthogonalisation converged Ritz values come back as "ghost" copies, which leaves the extreme Ritz
    values, all this reads, where they are. step: hessian::lanczos_step or a function like it
    (lanczos_step_torch; ShardedOperator.lanczos_step for sharded vectors)."""
    t0 = time.perf_counter()
    dot = getattr(op, "dot", _dot)
    v = _normalize(v0, dot)
    vp = [torch.zeros_like(t) for t in v]
    beta = torch.zeros((), dtype=torch.float64, device=v[0].device)
    alphas, betas, code = [], [], 0
    for _ in range(max_iter):
        w = op.hvp(v)
        ab = step(w, v, vp, beta)
        del w
        v, vp = vp, v
        beta = ab[1].to(v[0].device)
        a, b = ab.tolist()
        alphas.append(a)
        betas.append(b)
        code = _lanczos_stop(alphas, betas, rtol, stop, margin)
        if times is not None:
            times.append(time.perf_counter() - t0)
        if progress is not None:
            lo, hi = ritz_extremes(alphas, betas)[:2]
            progress(len(alphas), max(abs(lo), abs(hi)))
        if code:
            break
    return alphas, betas, code


def _power_python(op, v0, max_iter, tol, step, times=None, progress=None):
    """Power iteration with pytorch-hessian-eigenthings' stop rule, |rq_k - rq_{k-1}| / |rq_k| < tol (rq_0 = 0)."""
    t0 = time.perf_counter()
    v = _normalize(v0, getattr(op, "dot", _dot))
    hist, prev, code = [], 0.0, 0
    for _ in range(max_iter):
        w = op.hvp(v)
        rq, nrm = step(w, v).tolist()
        del w
        hist.append((rq, nrm))
        err = 1.0 if rq == 0.0 else abs((rq - prev) / rq)
        if times is not None:
            times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(len(hist), abs(rq))
        if err < tol:
            code = 1
            break
        prev = rq
    return hist, code
