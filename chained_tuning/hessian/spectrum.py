"""hessian_spectrum: the extreme eigenvalues and the spectral radius rho of the Hessian of the answer-token loss
over a list of micro-batches, by Lanczos (a certified stop on rtol) or power iteration on HVPs.

    from chained_tuning.hessian.spectrum import hessian_spectrum
    result = hessian_spectrum(model, batches)                 # {"rho", "lambda_max", "lambda_min", ...}
    result, op = hessian_spectrum(model, batches, return_operator=True)    # op.hvp(v) for more products

Its arguments fall in two groups, SolveOptions (the solver) and OperatorOptions (how the HVPs are computed);
the call takes them by name as before. One run reads as: check the options, choose the backend, build the
operator (under a process group: this rank's samples, sharded vectors), take the start vector, solve, record.
"""
from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .answer_loss import _ce_mode, _count_answer_tokens, _prepare_model
from .errors import CurvatureError
from .operator import CHECKPOINTING, HessianOperator, memory_budget
from .reference import lanczos_step_torch, power_step_torch
from .sharded import ShardedOperator, _dist, _gather_ints, split_rows
from .solvers import (DEFAULT_RTOL, DOMINANT_MARGIN, START_VECTORS, STOP_REASONS, STOP_RULES, WARM_SHARE,
                      _check_start, _lanczos_python, _mixed_start_vector, _power_python, _subsample_start_vector,
                      _warm_start_fits, ritz_bounds, ritz_extremes)

BACKENDS = ("auto", "extension", "torch")
CE_NAMES = {"torch": "torch_log_softmax_nll", "softmax_xent": "fused_softmax_xent", "linear_xent": "fused_linear_xent"}
FIRST_KEYS = ("method", "lambda_max", "lambda_min", "rho", "iterations", "hvp_count", "residual", "converged")


@dataclass
class SolveOptions:
    """The solver: hessian_spectrum's arguments of these names (rtol: tol where that is given)."""
    method: str = "lanczos"
    rtol: float = DEFAULT_RTOL
    max_iter: int = 100
    seed: int = 0
    stop: str = "dominant"
    start: str | None = None
    v0: list | None = None
    progress: Callable | None = None


@dataclass
class OperatorOptions:
    """How the HVPs are computed: hessian_spectrum's arguments of these names."""
    backend: str = "auto"
    cross_entropy: str = "auto"
    graph_memory_budget: int | None = None
    gradient_checkpointing: str = "auto"
    last_layer_rows: bool = True
    block_attention: bool = True
    share_prefix: bool = True


PARAMS = ("trainable", "all")


def select_params(model, which):
    """The parameters the Hessian is taken over, as the operator takes them (those that require grad):
    "trainable" leaves the model's choice (a LoRA model: its adapter's, frozen base aside), "all" makes every
    weight require grad. -> their number."""
    if which not in PARAMS:
        raise CurvatureError(f"params {which!r}: choose from {', '.join(PARAMS)}")
    if which == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise CurvatureError("the model has no trainable parameters; take the Hessian over all of them")
    return n


def hessian_spectrum(model, batches, method="lanczos", rtol=DEFAULT_RTOL, max_iter=100, seed=0, *, backend="auto",
                     stop="dominant", start=None, cross_entropy="auto", graph_memory_budget=None,
                     v0=None, return_operator=False, progress=None, tol=None, gradient_checkpointing="auto",
                     last_layer_rows=True, block_attention=True, share_prefix=True):
    """Extreme eigenvalues of the Hessian of the answer-token loss over `batches` (see HessianOperator).

    rtol: the tolerance on the eigenvalue itself (lanczos): stop once the certified bound (ritz_bounds: the
        residual bound, or residual^2/gap where the gap is known) on the end giving rho is <= rtol * rho; the
        result reports the bound (`error_bound`). power: eigenthings' relative-change rule with tol = rtol.
        tol: the same, the earlier name.
    backend: "auto" (extension if it loads, else plain PyTorch), "extension" (required), "torch" (plain).
    stop (lanczos): "dominant" (default: the end giving rho certified and the other end bounded below rho) or
        "both" (both ends certified).
    start: the start vector: "subsample" (lanczos default where its vectors fit: a few Lanczos steps on the
        Hessian of the first ceil(N/10) samples give a Ritz vector near the dominant eigenvector, see
        _subsample_start_vector), "gradient+random" (g/||g|| + r/||r||, see _mixed_start_vector; the lanczos
        default otherwise: fewer than 8 samples, or WARM_VECTORS float32 vectors over a quarter of the
        memory budget) or "random" (seeded Gaussian r; the default for power, like eigenthings); v0 overrides it.
    cross_entropy (extension backend): "auto" (linear_xent where the LM head is verified to be a plain linear
        layer, else softmax_xent), "linear_xent", "softmax_xent", or "torch" (autograd's).
    Under an initialised torch.distributed process group every rank passes the same `batches` (all N
        samples) and the model; each rank takes its share of the samples (split_rows) and the vectors are
        sharded (ShardedOperator); every rank returns the same result.
    gradient_checkpointing: "auto" (the micro-batches whose graphs fit nowhere in the budget go layer-wise),
        "on" (all do: no graph retained, no subsample warm start) or "off"; see HessianOperator.
    last_layer_rows: the decoder's last layer at the answer rows only where verified (HessianOperator); the
        result's backend.last_layer says which ran.
    block_attention: on CPU, the SDPA attention of the graphs in causal blocks with the softmax's double backward
        fused, where verified (HessianOperator, attention.py); the result's backend.attention says which ran.
        With the extension this also fuses RMSNorm, the SwiGLU gate, the linear layers and the rotary embedding's
        double backward where verified (fused_layers.py); backend.fused_layers counts the modules.
    share_prefix: the tokens all rows of a micro-batch begin with run once, where verified (HessianOperator,
        shared_prefix.py); the result's backend.shared_prefix says whether it ran and the positions it saved.
    progress: called as progress(iteration, running rho) after every iteration of the Python solver loops
        (the C++ loop runs the whole solve in one call and reports nothing until it returns).
    Returns the result dict; with return_operator=True, (dict, operator).
    """
    solve = SolveOptions(method, rtol if tol is None else tol, max_iter, seed, stop, start, v0, progress)
    build = OperatorOptions(backend, cross_entropy, graph_memory_budget, gradient_checkpointing, last_layer_rows,
                            block_attention, share_prefix)
    res, op = _spectrum(model, batches, solve, build)
    return (res, op) if return_operator else res


def _spectrum(model, batches, solve: SolveOptions, build: OperatorOptions):
    """hessian_spectrum's work: (result, operator)."""
    start, auto_start = _check_options(batches, solve, build)
    ext, use_ext, ce = _choose_backend(build)
    dist = _dist()
    world = dist.get_world_size() if dist else 1
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _prepare_model(model)
    t0 = time.perf_counter()
    n_samples, total_tokens = _count_samples(batches, world)
    warm_rows = _warm_rows(model, batches, n_samples, solve, build, start, auto_start, world, device)
    local, op, warm_ok = _build_operator(model, batches, ce, build, total_tokens, warm_rows, dist)
    t_setup = time.perf_counter() - t0
    v0, start_used, warm = _take_start_vector(op, local, solve, start, warm_rows if warm_ok else 0, dist)
    cpp_loop = (use_ext and not dist and not local.recompute and not local.layerwise and bool(local.g_out)
                and all(p.dtype == local.vec_dtype for p in local.params))
    t_solve = time.perf_counter()
    if solve.method == "lanczos":
        alphas, betas, code, times = _solve_lanczos(op, local, v0, solve, use_ext, cpp_loop, dist)
    else:
        hist, code, times = _solve_power(op, local, v0, solve, use_ext, cpp_loop, dist)
    wall = time.perf_counter() - t0
    offset = t_solve - t0  # iteration times counted from the start of this call (graph build included)
    times = [offset + t for t in times]
    res = _lanczos_result(alphas, betas, code, solve.rtol) if solve.method == "lanczos" else _power_result(hist, code)
    if not res["converged"]:
        res["warning"] = (f"{solve.method} did not converge in {res['iterations']} iterations (rtol={solve.rtol}); "
                          f"rho={res['rho']:.6g} is an estimate with residual {res['residual']:.3g}")
        warnings.warn(res["warning"], RuntimeWarning, stacklevel=3)  # at hessian_spectrum's caller
    res.update({
        "hvp_count": op.hvp_count, "sub_hvp_count": op.sub_hvp_count, "warm_start": warm, "wall_time_s": wall,
        "setup_time_s": t_setup, "iteration_times_s": times,
        "peak_memory": _peak_memory(device),
        "settings": _settings_record(model, solve, build, start_used, local),
        "backend": _backend_record(ext, use_ext, build, cpp_loop, local),
        "graphs": {"micro_batches": len(local.batches), "retained": local.retained_count,
                   "recomputed": len(local.recompute), "layerwise": len(local.layerwise),
                   "saved_bytes_per_graph": local.graph_bytes},
        "distributed": _distributed_record(op, local, dist),
        "n_params": int(sum(p.numel() for p in local.params)), "n_samples": n_samples,
        "n_answer_tokens": total_tokens, "loss": op.reduce_sum(local.loss_value),
    })
    res = {**{k: res[k] for k in FIRST_KEYS}, **{k: v for k, v in res.items() if k not in FIRST_KEYS}}
    return res, op


# --------------------------------------------------------------------------------------------- the steps
def _check_options(batches, solve, build):
    """Every option checked before anything runs; returns (the start vector's name, whether it was defaulted)."""
    if solve.method not in ("lanczos", "power"):
        raise CurvatureError(f"method must be 'lanczos' or 'power', got {solve.method!r}")
    if not (solve.rtol > 0):
        raise CurvatureError(f"rtol must be > 0, got {solve.rtol}")
    if int(solve.max_iter) < 1:
        raise CurvatureError(f"max_iter must be >= 1, got {solve.max_iter}")
    if build.backend not in BACKENDS:
        raise CurvatureError(f"backend must be auto, extension or torch, got {build.backend!r}")
    if solve.stop not in STOP_RULES:
        raise CurvatureError(f"stop must be one of {', '.join(STOP_RULES)}, got {solve.stop!r}")
    if build.cross_entropy != "auto":
        _ce_mode(build.cross_entropy)
    if build.gradient_checkpointing not in CHECKPOINTING:
        raise CurvatureError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {build.gradient_checkpointing!r}")
    for name, flag in (("last_layer_rows", build.last_layer_rows), ("block_attention", build.block_attention),
                       ("share_prefix", build.share_prefix)):
        if not isinstance(flag, bool):
            raise CurvatureError(f"{name} must be True or False, got {flag!r}")
    if not batches:
        raise CurvatureError("no batches given: the Hessian needs at least one sample")
    auto_start = solve.start is None
    start = solve.start
    if start is None:
        start = "subsample" if solve.method == "lanczos" else "random"
    if start not in START_VECTORS:
        raise CurvatureError(f"start must be one of {', '.join(START_VECTORS)}, got {start!r}")
    _check_start(None if auto_start else start, build.gradient_checkpointing)
    return start, auto_start


def _choose_backend(build):
    """(the extension's state, whether the fused ops run, the operator's cross-entropy)."""
    ext = ops.load_extension("none" if build.backend == "torch" else None)
    if build.backend == "extension" and not ext["ok"]:
        raise CurvatureError(f"the C++ extension is not available ({ext['detail']}); build it with "
                             "`python setup.py build_ext --inplace` or use backend='torch'")
    use_ext = ext["ok"] and build.backend != "torch"
    if build.cross_entropy != "auto" and build.cross_entropy != "torch" and not use_ext:
        raise CurvatureError(f"cross_entropy={build.cross_entropy!r} needs the C++ extension (backend='torch' or "
                             f"extension unavailable: {ext['detail']})")
    ce = ("auto" if use_ext else "torch") if build.cross_entropy == "auto" else build.cross_entropy
    return ext, use_ext, ce


def _count_samples(batches, world):
    """(samples, answer tokens) of all the batches."""
    n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    if n_samples < world:
        raise CurvatureError(f"{n_samples} samples for {world} processes: every process needs one; use fewer "
                             "processes or more --samples")
    total_tokens = sum(_count_answer_tokens(b) for b in batches)
    if total_tokens == 0:
        raise CurvatureError("the batches contain no answer tokens (every label is -100)")
    return n_samples, total_tokens


def _warm_rows(model, batches, n_samples, solve, build, start, auto_start, world, device):
    """The samples of the subsample warm start (the first ones of batches[0]), 0 for none."""
    params = [p for p in model.parameters() if p.requires_grad]
    budget = build.graph_memory_budget if build.graph_memory_budget is not None else memory_budget(device)
    warm_rows = min(int(batches[0]["input_ids"].shape[0]), max(2, math.ceil(n_samples * WARM_SHARE)))
    want_warm = solve.v0 is None and start == "subsample" and 0 < warm_rows < n_samples
    if want_warm and auto_start and not (warm_rows <= n_samples / 4 and _warm_start_fits(params, budget, world)
                                         and build.gradient_checkpointing != "on"):
        want_warm = False  # too few samples for a cheap subsample, (7B) the basis does not fit, or no graph kept
    return warm_rows if want_warm else 0


def _build_operator(model, batches, ce, build, total_tokens, warm_rows, dist):
    """(this process's HessianOperator, the operator the solver uses, whether the warm start's graph is kept)."""
    kw = {"fused_ce": ce, "graph_memory_budget": build.graph_memory_budget,
          "gradient_checkpointing": build.gradient_checkpointing, "last_layer_rows": build.last_layer_rows,
          "block_attention": build.block_attention, "share_prefix": build.share_prefix}
    if dist is None:
        op = HessianOperator(model, batches, keep_first=warm_rows, **kw)
        return op, op, op.first_out is not None
    world = dist.get_world_size()
    first, mine = split_rows(batches, dist.get_rank(), world, warm_rows)
    local = HessianOperator(model, mine, first_batch=first, subsample=bool(warm_rows), total_tokens=total_tokens,
                            **kw)
    op = ShardedOperator(local)
    # the subsample's graph must be retained on every rank that holds some of it, else no rank uses it
    warm_ok = op.reduce_sum(0.0 if (first is not None and local.first_out is None) else 1.0) == world
    return local, op, warm_ok


def _take_start_vector(op, local, solve, start, warm_rows, dist):
    """(v0 in the solver's layout, the start vector's name, the warm start's record or None)."""
    if solve.v0 is not None:
        v0 = op.local(solve.v0) if dist else [t.to(op.vec_dtype) for t in solve.v0]
        return v0, "given", None
    if start == "random":
        return op.random(solve.seed), "random", None
    if warm_rows:
        tw = time.perf_counter()
        v0, warm = _subsample_start_vector(op, solve.seed)
        warm.update({"seconds": time.perf_counter() - tw, "samples": warm_rows,
                     "answer_tokens": int(op.reduce_sum(local.first_tokens))})
        local.first_out = None  # the full solve needs the summed graph only
        return v0, "subsample", warm
    v0, start_used = _mixed_start_vector(op, solve.seed)
    return v0, start_used, None


def _solve_lanczos(op, local, v0, solve, use_ext, cpp_loop, dist):
    """(alphas, betas, stop code, seconds after each iteration): the C++ loop in one call where it can run."""
    if cpp_loop:
        a, b, code, tt = ops.lanczos_solve(local.g_out, local.g_index, local.params, list(v0), int(solve.max_iter),
                                           float(solve.rtol), STOP_RULES[solve.stop], DOMINANT_MARGIN)
        alphas, betas, times = a.tolist(), b.tolist(), tt.tolist()
        local.hvp_count += len(alphas)
        return alphas, betas, code, times
    times = []
    step = op.lanczos_step(use_ext) if dist else ops.lanczos_step if use_ext else lanczos_step_torch
    alphas, betas, code = _lanczos_python(op, v0, int(solve.max_iter), float(solve.rtol), step, solve.stop,
                                          DOMINANT_MARGIN, times, solve.progress)
    return alphas, betas, code, times


def _solve_power(op, local, v0, solve, use_ext, cpp_loop, dist):
    """(history of (Rayleigh quotient, ||Hv||), stop code, seconds after each iteration)."""
    if cpp_loop:
        h, code, tt = ops.power_solve(local.g_out, local.g_index, local.params, list(v0), int(solve.max_iter),
                                      float(solve.rtol))
        hist, times = [tuple(r) for r in h.tolist()], tt.tolist()
        local.hvp_count += len(hist)
        return hist, code, times
    times = []
    step = op.power_step(use_ext) if dist else ops.power_step if use_ext else power_step_torch
    hist, code = _power_python(op, v0, int(solve.max_iter), float(solve.rtol), step, times, solve.progress)
    return hist, code, times


# ------------------------------------------------------------------------------------------- the record
def _lanczos_result(alphas, betas, code, rtol):
    lmin, lmax, rmin, rmax, bmin, bmax = ritz_bounds(alphas, betas)
    max_dom = abs(lmax) >= abs(lmin)
    rho = abs(lmax) if max_dom else abs(lmin)
    bound, r_dom = (bmax, rmax) if max_dom else (bmin, rmin)
    if code == 2:
        bound = bmin = bmax = 0.0
    hist = [list(ritz_extremes(alphas[:k], betas[:k])[:2]) for k in range(1, len(alphas) + 1)]
    return {"method": "lanczos", "lambda_max": lmax, "lambda_min": lmin, "rho": rho,
            "iterations": len(alphas), "residual": r_dom, "residual_max": rmax,
            "residual_min": rmin, "converged": code in (1, 2, 3), "stop_reason": STOP_REASONS[int(code)],
            "error_bound": bound, "rel_error_bound": bound / rho if rho > 0 else None,
            "error_bound_kind": ("exact" if code == 2 else "residual^2/gap" if bound < r_dom else "residual"),
            "error_bound_max": bmax, "error_bound_min": bmin,
            "converged_ends": {"max": bool(bmax <= rtol * rho), "min": bool(bmin <= rtol * rho)},
            "ritz_history": hist, "rho_history": [max(abs(x), abs(y)) for x, y in hist]}


def _power_result(hist, code):
    rq, nrm = hist[-1]
    resid = math.sqrt(max(nrm * nrm - rq * rq, 0.0))
    return {"method": "power", "lambda_max": rq if rq >= 0 else None, "lambda_min": rq if rq < 0 else None,
            "rho": abs(rq), "iterations": len(hist), "residual": resid,
            "residual_max": None, "residual_min": None, "converged": code == 1,
            "stop_reason": "relative_change" if code == 1 else "max_iter",
            "error_bound": resid, "rel_error_bound": resid / abs(rq) if rq else None,
            "error_bound_kind": "residual", "ritz_history": [h[0] for h in hist],
            "rho_history": [abs(h[0]) for h in hist]}


def _settings_record(model, solve, build, start_used, local):
    lanczos = solve.method == "lanczos"
    return {"method": solve.method, "rtol": solve.rtol, "tol": solve.rtol, "max_iter": int(solve.max_iter),
            "seed": solve.seed, "stop_rule": solve.stop if lanczos else "relative_change",
            "start_vector": start_used,
            "dominant_margin": DOMINANT_MARGIN if lanczos and solve.stop == "dominant" else None,
            "graph_memory_budget": local.budget, "dtype": str(local.params[0].dtype).replace("torch.", ""),
            "vector_dtype": str(local.vec_dtype).replace("torch.", ""),
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "sdpa_backend": "math",
            "gradient_checkpointing": build.gradient_checkpointing}


def _backend_record(ext, use_ext, build, cpp_loop, local):
    return {"extension": ext["name"] if use_ext else "none",
            "extension_detail": ext["detail"] if use_ext or build.backend != "torch" else "not requested",
            "solver_loop": "cpp" if cpp_loop else "python", "step": "fused_op" if use_ext else "torch",
            "cross_entropy": CE_NAMES[local.ce],
            "last_layer": "answer_rows" if local.last_rows is not None else "full",
            "attention": local.attention, "fused_layers": int(local.fused_layers),
            "shared_prefix": {"on": local.share_prefix, "positions_saved": int(local.prefix_tokens_saved)}}


def _distributed_record(op, local, dist):
    if not dist:
        return None
    return {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "shard_elements": op.S,
            "samples_per_rank": [int(x) for x in _gather_ints(op, sum(int(b["input_ids"].shape[0])
                                                                     for b in local.batches))],
            "answer_tokens_per_rank": [int(x) for x in _gather_ints(op, sum(
                _count_answer_tokens(b) for b in local.batches))]}


def _peak_memory(device):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1024 if sys.platform != "darwin" else 1)
    cuda = None
    if device.type == "cuda":
        cuda = int(torch.cuda.max_memory_allocated(device))
    return {"device": str(device), "peak_rss_bytes": int(rss), "cuda_peak_allocated_bytes": cuda}
