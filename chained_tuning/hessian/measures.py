"""Measures of the Hessian beyond rho, from HVPs on the operator of a spectrum solve (HessianOperator, or
ShardedOperator under torchrun: sharded vectors, every inner product all-reduced, the probes drawn by
_random_flat's seeded blocks, so that several processes compute what one does):

    trace    Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with `trace_products` HVPs, and its standard error
    density  stochastic Lanczos quadrature: slq_probes x slq_steps HVPs, the nodes and weights of each probe
    topk     the topk largest and topk smallest eigenvalues (Lanczos)
    blocks   lambda_max, lambda_min and rho of each diagonal block of H: the embeddings, each decoder layer,
             the head (what follows the last layer: final norm and LM head)

    from hessian.spectrum import hessian_spectrum
    from hessian.measures import MeasureOptions, spectral_measures
    res, op = hessian_spectrum(model, batches, return_operator=True)
    res["measures"] = spectral_measures(op, ["trace", "density"], MeasureOptions(seed=0))

The Lanczos of density, topk and blocks reorthogonalises against a stored basis where that basis fits in the
memory free when the measure starts (reorth "auto"; "full" or "none" force it); without, it holds three vectors
whatever its steps, the path of a 7B model (lanczos_basis; topk then merges the converged copies of an
eigenvalue). Each measure's record holds its hvp_count, seconds and settings. rho is hessian_spectrum's (listed in
MEASURES so that a command line names all five in one list).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import CurvatureError
# parse_measures: re-exported, the measures' own names
from .measure_names import DEFAULTS, MEASURES, MOMENTS, REORTH, RULES, parse_measures  # noqa: F401
from .operator import memory_budget
from .solvers import DEFAULT_RTOL, lanczos_basis, tridiagonal

# probe seeds: op.random(PROBE_SEED_BASE * (seed + 1) + TAG * PROBE_SEED_TAG + i), apart from the solver's seed
PROBE_SEED_BASE, PROBE_SEED_TAG = 7919, 1000
MIN_RTOL_WITHOUT_BASIS = 1e-6  # topk and blocks without reorthogonalisation (_merge_copies)
TAGS = {"trace_sketch": 1, "trace_residual": 2, "density": 3, "topk": 4, "blocks": 5}
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")  # Llama/Mistral/GPT-2/BERT-like names
EMBEDDING_NAME = re.compile(r"embed|wte|wpe")


@dataclass
class MeasureOptions:
    """The measures' settings (recorded with each): trace_products HVPs for Hutch++ (a multiple of 3, >= 6:
    a third sketch, a third the sketch's range, a third residual probes); slq_probes x slq_steps for the
    density; topk eigenvalues at each end; Lanczos (topk, blocks) stops where every wanted Ritz value has
    residual <= rtol * max |Ritz value| or after max_steps steps; seed of the probes and start vectors;
    reorth: "auto", "full" or "none" (the module's docstring)."""
    trace_products: int = DEFAULTS["trace_products"]
    slq_probes: int = DEFAULTS["slq_probes"]
    slq_steps: int = DEFAULTS["slq_steps"]
    topk: int = DEFAULTS["topk"]
    max_steps: int = DEFAULTS["max_steps"]
    rtol: float = DEFAULT_RTOL
    seed: int = 0
    reorth: str = "auto"


def check_options(opt: MeasureOptions):
    """Every setting checked before any HVP (CurvatureError naming the setting and the fix)."""
    rules = tuple((k, ok(getattr(opt, k)), need) for k, (ok, need) in RULES.items()) + (
        ("rtol", opt.rtol > 0, "> 0"), ("seed", opt.seed >= 0, ">= 0"),
        ("reorth", opt.reorth in REORTH, "one of " + ", ".join(REORTH)),
        ("rtol", opt.reorth != "none" or opt.rtol >= MIN_RTOL_WITHOUT_BASIS,
         f">= {MIN_RTOL_WITHOUT_BASIS:g} with reorth none (or use reorth full)"))
    for name, ok, need in rules:
        if not ok:
            raise CurvatureError(f"{name} must be {need}, got {getattr(opt, name)!r}")


def spectral_measures(op, names, options: MeasureOptions | None = None, model=None):
    """{measure: record} for the names in `names` other than rho. op: the operator hessian_spectrum returned
    (return_operator=True); model: the model, for the blocks' names (default: the operator's)."""
    opt = options or MeasureOptions()
    check_options(opt)
    run = {"trace": lambda: hutchpp_trace(op, opt.trace_products, opt.seed),
           "density": lambda: slq_density(op, opt.slq_probes, opt.slq_steps, opt.seed, opt.reorth),
           "topk": lambda: top_k(op, opt.topk, opt.max_steps, opt.rtol, _seed(opt.seed, "topk", 0), opt.reorth),
           "blocks": lambda: block_extremes(op, model, opt.max_steps, opt.rtol, opt.seed, opt.reorth)}
    kept = {"trace": ("trace_products", "seed"), "density": ("slq_probes", "slq_steps", "seed", "reorth"),
            "topk": ("topk", "max_steps", "rtol", "seed", "reorth"),
            "blocks": ("max_steps", "rtol", "seed", "reorth")}
    out = {}
    for name in names:
        if name == "rho":
            continue
        if name not in run:
            raise CurvatureError(f"measure {name!r} is not one of {', '.join(MEASURES)}")
        n0, t0 = op.hvp_count, time.perf_counter()
        rec = run[name]()
        rec.update({"hvp_count": op.hvp_count - n0, "seconds": time.perf_counter() - t0,
                    "settings": {k: v for k, v in asdict(opt).items() if k in kept[name]}})
        out[name] = rec
    return out


# ----------------------------------------------------------------------------------------------- helpers
def _seed(seed, tag, i):
    return PROBE_SEED_BASE * (int(seed) + 1) + TAGS[tag] * PROBE_SEED_TAG + int(i)


def rademacher(op, seed):
    """A Rademacher probe (+-1 entries): the signs of op.random(seed), so a shard draws its slice alone (the
    zero padding of the last shard stays zero)."""
    return [torch.sign(t) for t in op.random(seed)]


def _dimension(op):
    return int(getattr(op, "n", None) or sum(p.numel() for p in op.params))


def _axpy(v, c, q):
    return [a - c * b for a, b in zip(v, q)]


def _project_out(v, basis, dot):
    """v minus its components along the orthonormal `basis` (Gram-Schmidt twice; a basis vector held in host
    memory comes to v's device one at a time)."""
    for _ in range(2):
        for q in basis:
            q = [t.to(a.device, non_blocking=True) for t, a in zip(q, v)]
            v = _axpy(v, dot(v, q), q)
    return v


def _fits_on_every_rank(op, vectors) -> bool:
    """Whether `vectors` of op's vectors (this rank's part of each) fit operator.memory_budget on its device now,
    on every rank (one that does not fit decides for all, so that their inner products stay matched)."""
    base = getattr(op, "op", op)  # BlockOperator -> its operator (HessianOperator or ShardedOperator)
    if isinstance(op, BlockOperator):
        numel = sum(b - a for a, b in op.slices) if op.sharded else op.n
    else:
        numel = op.S if hasattr(op, "S") else _dimension(op)
    size = torch.empty((), dtype=base.vec_dtype).element_size()
    fits = vectors * numel * size <= memory_budget(base.params[0].device)
    return base.reduce_sum(0.0 if fits else 1.0) == 0.0


def _reorthogonalise(op, vectors, reorth):
    """True where the Lanczos of `op` stores its basis: reorth "full", or "auto" and `vectors` of op's vectors
    plus two more fit on every rank (_fits_on_every_rank)."""
    if reorth != "auto":
        return reorth == "full"
    return _fits_on_every_rank(op, vectors + 2)


def _basis_home(op, vectors):
    """Where Hutch++ keeps its basis Q: on the operator's device where `vectors` of its vectors fit on every rank,
    else in host memory (7B: 10 vectors of 3.4 GB per GPU beside the retained graphs), brought back one vector at
    a time. Returns (device, "device" or "host")."""
    if _fits_on_every_rank(op, vectors):
        return op.params[0].device, "device"
    return torch.device("cpu"), "host"


def _lanczos_record(reorth, steps):
    """How the Lanczos of `steps` steps ran, and the most parameter-sized vectors it held at once."""
    return {"reorthogonalisation": "full" if reorth else "none", "vectors_held": steps + 1 if reorth else 3}


def _tridiagonal(alphas, betas):
    return np.linalg.eigh(tridiagonal(alphas, betas))


# -------------------------------------------------------------------------------------------- the trace
def hutchpp_trace(op, products, seed):
    """Hutch++: tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T)), Q an orthonormal basis of H S (S: m/3
    Rademacher probes), the first term exact, the second Hutchinson's estimate with m/3 Rademacher probes g
    projected off Q. Its standard error: the residual probes' sample standard deviation / sqrt(m/3) (the
    estimator's only random part given Q). HVPs: m/3 + rank(HS) + m/3 <= m. Q (m/3 vectors) is held on the
    device or in host memory (_basis_home, recorded as basis_memory); each H s is orthogonalised as it comes."""
    k = int(products) // 3
    dot = op.dot
    device = op.params[0].device
    home, memory = _basis_home(op, k + 3)  # Q, the vector being orthogonalised and two transients
    basis = []
    for i in range(k):  # Q: the sketch's range; a direction already spanned (H of low rank) is dropped
        y = op.hvp(rademacher(op, _seed(seed, "trace_sketch", i)))
        scale = math.sqrt(max(dot(y, y), 0.0))
        y = _project_out(y, basis, dot)
        nrm = math.sqrt(max(dot(y, y), 0.0))
        if nrm > 1e-10 * scale:
            basis.append([(t / nrm).to(home) for t in y])
    exact = 0.0
    for q in basis:
        q = [t.to(device) for t in q]
        exact += dot(q, op.hvp(q))
    exact = float(exact)
    vals = []
    for i in range(k):
        g = _project_out(rademacher(op, _seed(seed, "trace_residual", i)), basis, dot)
        vals.append(dot(g, op.hvp(g)))
    resid = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / math.sqrt(k))
    return {"trace": exact + resid, "standard_error": se, "method": "hutch++", "low_rank_part": exact,
            "low_rank_dim": len(basis), "residual_part": resid, "residual_probes": k, "n": _dimension(op),
            "basis_memory": memory}


# ------------------------------------------------------------------------------------------ the density
def slq_density(op, probes, steps, seed, reorth="full"):
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019): for each Rademacher
    probe z, `steps` Lanczos steps from z / ||z|| give T, whose eigenvalues are the nodes and the squared first
    components of its eigenvectors the weights (each probe's weights sum to 1). The spectral density is their
    average over the probes; its p-th moment sum_j w_j theta_j^p equals z^T H^p z / n exactly for p <= 2 steps
    - 1, an unbiased estimate of (1/n) tr(H^p) whose standard error (over the probes) is recorded. Without
    reorthogonalisation (reorth) that holds to rounding for the low moments; ghost copies of a node split its
    weight, leaving the density the same."""
    nodes, weights, per_probe = [], [], []
    n = _dimension(op)
    full = _reorthogonalise(op, steps + 1, reorth)
    for i in range(probes):
        alphas, betas, basis = lanczos_basis(op.hvp, op.dot, rademacher(op, _seed(seed, "density", i)), steps,
                                             reorthogonalise=full)
        del basis
        theta, vecs = _tridiagonal(alphas, betas)
        w = vecs[0, :] ** 2
        nodes.append(theta.tolist())
        weights.append(w.tolist())
        per_probe.append([float(np.sum(w * theta ** p)) for p in range(1, MOMENTS + 1)])
    m = np.asarray(per_probe)
    return {"nodes": nodes, "weights": weights, "probes": probes, "steps": steps, "n": n,
            "steps_taken": [len(x) for x in nodes],
            "moments": m.mean(axis=0).tolist(), "moments_standard_error": (m.std(axis=0, ddof=1) /
                                                                          math.sqrt(probes)).tolist(),
            "probe_moments": per_probe, "trace": float(n * m[:, 0].mean()),
            "note": "density = the probes' nodes with weights / probes; moment p estimates (1/n) tr(H^p)",
            **_lanczos_record(full, steps)}


# ------------------------------------------------------------------------------------- top-k, per block
def top_k(op, k, max_steps, rtol, seed, reorth="full"):
    """The k largest and k smallest eigenvalues: Lanczos from op.random(seed), until each of those Ritz values
    theta has residual r = |beta_last s_last| <= rtol * max |theta| (an eigenvalue lies within r of theta) or
    after max_steps steps; an invariant subspace is exact. A Krylov space holds one copy of a repeated
    eigenvalue: the lists are of distinct eigenvalues. Without reorthogonalisation (reorth) a converged
    eigenvalue comes back as copies: converged Ritz values within their residuals of each other (and rounding)
    count once (_merge_copies), so two eigenvalues that close are reported once."""
    full = _reorthogonalise(op, int(max_steps) + 1, reorth)
    if not full and rtol < MIN_RTOL_WITHOUT_BASIS:
        raise CurvatureError(f"rtol {rtol:g} without reorthogonalisation (reorth {reorth}"
                             f"{': the basis does not fit the free memory' if reorth == 'auto' else ''}): an "
                             f"eigenvalue's ghost copies are told apart from distinct eigenvalues only to "
                             f"{MIN_RTOL_WITHOUT_BASIS:g}; use rtol >= {MIN_RTOL_WITHOUT_BASIS:g} or reorth full")

    def wanted(alphas, betas):
        theta, vecs = _tridiagonal(alphas, betas)
        r = np.abs(betas[-1] * vecs[-1, :])
        if not full:
            theta, r = _merge_copies(theta, r, rtol, _eps(op))
        m = min(k, len(theta))
        idx = sorted(set(range(m)) | set(range(len(theta) - m, len(theta))))
        return theta, r, idx

    def stop(alphas, betas):
        theta, r, idx = wanted(alphas, betas)
        scale = max(abs(theta[0]), abs(theta[-1]))
        return min(len(alphas), len(theta)) >= 2 * k and all(r[i] <= rtol * scale for i in idx)

    alphas, betas, basis = lanczos_basis(op.hvp, op.dot, op.random(seed), int(max_steps), stop,
                                         reorthogonalise=full)
    del basis
    theta, r, _ = wanted(alphas, betas)
    scale = max(abs(theta[0]), abs(theta[-1]))
    exact = not betas[-1] > 1e-12 * max(abs(a) for a in alphas)
    if exact:
        r = np.zeros_like(r)
    m = min(k, len(theta))
    top, bottom = list(range(len(theta) - 1, len(theta) - 1 - m, -1)), list(range(m))
    converged = bool(exact or all(r[i] <= rtol * scale for i in top + bottom))
    return {"largest": [float(theta[i]) for i in top], "smallest": [float(theta[i]) for i in bottom],
            "residual_largest": [float(r[i]) for i in top], "residual_smallest": [float(r[i]) for i in bottom],
            "steps": len(alphas), "converged": converged, "k": k, "copies_merged": len(alphas) - len(theta),
            "stop_reason": "invariant_subspace" if exact else "residual" if converged else "max_steps",
            **_lanczos_record(full, len(alphas))}


def _eps(op):
    return float(torch.finfo(getattr(op, "op", op).vec_dtype).eps)


def _merge_copies(theta, r, rtol, eps):
    """Ritz values (ascending) and residuals with the copies of a converged eigenvalue merged. Lanczos without
    reorthogonalisation puts a copy ("ghost") of a converged eigenvalue at that eigenvalue to the HVP's rounding
    (about 1e-7 relative where HF's RMSNorm computes a float64 model's norm in float32) while the copy's own
    residual may still be large. Neighbours are one eigenvalue where the one of smaller residual is converged
    (r <= rtol * scale) and the other lies within that residual (both residuals where both are converged) plus
    max(rtol, 100 eps) * scale; the copy of smallest residual is kept. The lists are then of eigenvalues
    distinct to rtol (MIN_RTOL_WITHOUT_BASIS keeps rtol above the HVP's rounding). An unconverged value anywhere
    else is kept, so the wanted end stays unconverged until it settles."""
    scale = max(abs(float(theta[0])), abs(float(theta[-1])))
    tol, slack = rtol * scale, max(rtol, 100 * eps) * scale
    vals, res = [float(theta[0])], [float(r[0])]
    for t, ri in zip(theta[1:], r[1:]):
        t, ri = float(t), float(ri)
        lo, hi = min(ri, res[-1]), max(ri, res[-1])
        if lo <= tol and t - vals[-1] <= lo + (hi if hi <= tol else 0.0) + slack:
            if ri < res[-1]:
                vals[-1], res[-1] = t, ri
            continue
        vals.append(t)
        res.append(ri)
    return np.asarray(vals), np.asarray(res)


def parameter_blocks(model, params):
    """[(name, [indices into params])]: "embeddings", "layer_<i>" for each decoder layer, "head" (the rest:
    what follows the last layer), in that order; blocks without parameters are left out."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    layers, emb, head = {}, [], []
    for i, p in enumerate(params):
        name = names.get(id(p), "")
        m = LAYER_NAME.search(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(i)
        elif EMBEDDING_NAME.search(name):
            emb.append(i)
        else:
            head.append(i)
    out = [("embeddings", emb)] + [(f"layer_{j}", layers[j]) for j in sorted(layers)] + [("head", head)]
    return [(n, idx) for n, idx in out if idx]


class BlockOperator:
    """P H P on one block's coordinates: H v with v zero outside the block, of which the block's part is read.
    Its vectors hold the block's elements only (a sharded operator: this rank's slices of them), so that a
    Lanczos basis costs the block's size, not the model's."""

    def __init__(self, op, index):
        self.op, self.index = op, list(index)
        self.sharded = hasattr(op, "lo")
        sizes = [p.numel() for p in op.params]
        self.n = sum(sizes[i] for i in self.index)
        if self.sharded:
            offs = np.cumsum([0] + sizes)
            self.slices = [(max(int(offs[i]), op.lo) - op.lo, min(int(offs[i + 1]), op.hi) - op.lo)
                           for i in self.index if min(int(offs[i + 1]), op.hi) > max(int(offs[i]), op.lo)]

    @property
    def hvp_count(self):
        return self.op.hvp_count

    def restrict(self, v):
        if self.sharded:
            return [v[0][a:b] for a, b in self.slices]
        return [v[i] for i in self.index]

    def embed(self, x):
        if self.sharded:
            out = torch.zeros(self.op.S, dtype=self.op.vec_dtype, device=self.op.device)
            for (a, b), t in zip(self.slices, x):
                out[a:b] = t
            return [out]
        out = [torch.zeros(p.shape, dtype=self.op.vec_dtype, device=p.device) for p in self.op.params]
        for i, t in zip(self.index, x):
            out[i] = t
        return out

    def hvp(self, x):
        return self.restrict(self.op.hvp(self.embed(x)))

    def dot(self, a, b):
        return self.op.dot(a, b)  # every rank calls it (an empty slice list adds 0): the all-reduce stays matched

    def random(self, seed):
        return [t.clone() for t in self.restrict(self.op.random(seed))]


def block_extremes(op, model, max_steps, rtol, seed, reorth="full"):
    """[{block, n, lambda_max, lambda_min, rho, residuals, steps, converged, hvp_count}] for each diagonal
    block (parameter_blocks): top_k with k = 1 on the BlockOperator, max_steps capped at the block's size."""
    local = getattr(op, "op", op)
    out = []
    for j, (name, index) in enumerate(parameter_blocks(model or getattr(local, "model", None), local.params)):
        blk = BlockOperator(op, index)
        n0 = op.hvp_count
        r = top_k(blk, 1, min(int(max_steps), blk.n), rtol, _seed(seed, "blocks", j), reorth)
        lmax, lmin = r["largest"][0], r["smallest"][0]
        out.append({"block": name, "n": blk.n, "lambda_max": lmax, "lambda_min": lmin,
                    "rho": max(abs(lmax), abs(lmin)), "residual_max": r["residual_largest"][0],
                    "residual_min": r["residual_smallest"][0], "steps": r["steps"], "converged": r["converged"],
                    "hvp_count": op.hvp_count - n0, "reorthogonalisation": r["reorthogonalisation"]})
    return {"blocks": out}
