"""Curvature of the first-task minimum: the extreme Hessian eigenvalues and spectral radius rho of the loss
finetune.py minimised (its answer-token NLL on N seeded training samples), from Hessian-vector products, and
the Taylor check of the paper's eqs. 3-4 against the chains tuned from that minimum.

    python curvature.py --model runs/demo/toxigen --task toxigen --samples 50 --out runs/demo/curv/toxigen.json
    python curvature.py --model runs/demo/toxigen --task toxigen --reference runs/demo/toxigen-arc --out c.json
    python curvature.py --model runs/demo/toxigen --task toxigen --reference runs/demo/toxigen-arc runs/demo/mix \\
        --taylor_out taylor.json --out runs/demo/curv/toxigen.json      # one solve, <reference>/taylor.json each
    torchrun --nproc_per_node=8 curvature.py --model llama-7b-toxigen --task toxigen --dtype bfloat16 \\
        --data_dir ../shared/data --out curv.json   # samples split across GPUs, solver vectors sharded
    python setup.py build_ext --inplace        # the C++/CUDA extension ahead of time (else built on first use)

Files: this script and the package folder chained_tuning/ beside it (csrc/ and setup.py for the fused C++ ops,
else plain PyTorch). The command line draws the sample (chained_tuning.data), encodes it with finetune.py's
loss (chained_tuning.loss) and hands the batches to the Hessian library, chained_tuning/hessian/: a folder that
copies alone (torch and numpy only), whose names this script re-exports (`from curvature import
hessian_spectrum`). The operator, the solvers, their stop rules, the backends and what curvature.json holds:
docs/curvature.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

from chained_tuning import checkpoint, common, lora
from chained_tuning.common import UserError
from chained_tuning.data import tasks
from chained_tuning.loss import collate, encode_example
from chained_tuning.stage_config import RECIPE_DEFAULTS
# The Hessian library, re-exported under the names curvature.py has always had.
from chained_tuning.hessian.answer_loss import (CE_MODES, IGNORE_INDEX, _answer_positions,
                                                _count_answer_tokens, _last_layer_rows, _math_sdpa, _prepare_model,
                                                batch_answer_loss_sum, linear_head, verify_linear_head)
from chained_tuning.hessian.errors import CurvatureError, ExtensionError, HessianError
from chained_tuning.hessian.operator import CHECKPOINTING, HessianOperator
from chained_tuning.hessian.ops import load_extension
from chained_tuning.hessian.reference import (answer_loss_sum_ref, lanczos_step_torch,
                                              lanczos_update_torch, power_step_torch, shard_dot_torch)
from chained_tuning.hessian.sharded import (BUCKET_ELEMS, ShardedOperator, _dist, shard_bounds,
                                            sharded_lanczos_step, sharded_power_step, split_rows)
from chained_tuning.hessian.solvers import (DEFAULT_RTOL, DOMINANT_MARGIN, RANDOM_BLOCK,
                                            START_VECTORS, STOP_REASONS, STOP_RULES, WARM_RANDOM, WARM_SHARE,
                                            WARM_STEPS, WARM_VECTORS, _check_start, _lanczos_python, _normalize,
                                            _power_python, _start_vector, ritz_bounds, ritz_extremes)
from chained_tuning.hessian.spectrum import PARAMS, OperatorOptions, SolveOptions, hessian_spectrum, select_params
from chained_tuning.hessian import measures as M

__all__ = [  # the command line's, then the Hessian library's names, re-exported (`from curvature import ...`)
    "build_parser", "main", "run_cli", "build_batches", "reference_check", "spectrum_from_file", "CommandLineError",
    "answer_loss_sum_ref", "_answer_positions", "batch_answer_loss_sum", "BUCKET_ELEMS", "CE_MODES",
    "_check_start", "CHECKPOINTING", "_count_answer_tokens", "CurvatureError", "DEFAULT_RTOL", "_dist",
    "DOMINANT_MARGIN", "ExtensionError", "hessian_spectrum", "HessianError", "HessianOperator", "IGNORE_INDEX",
    "_lanczos_python", "lanczos_step_torch", "lanczos_update_torch", "_last_layer_rows", "linear_head",
    "load_extension", "_math_sdpa", "_normalize", "OperatorOptions", "_power_python", "power_step_torch",
    "_prepare_model", "RANDOM_BLOCK", "ritz_bounds", "ritz_extremes", "shard_bounds", "shard_dot_torch",
    "sharded_lanczos_step", "sharded_power_step", "ShardedOperator", "SolveOptions", "split_rows", "_start_vector",
    "START_VECTORS", "STOP_REASONS", "STOP_RULES", "verify_linear_head", "WARM_RANDOM", "WARM_SHARE", "WARM_STEPS",
    "WARM_VECTORS"]

MAX_PADDING = 0.2  # a micro-batch is closed before padding would exceed this share of its tokens
FINETUNE_MAX_LENGTH = RECIPE_DEFAULTS["max_length"]  # finetune.py's --max_length default: the loss it minimised
PROGRESS_EVERY = 10   # iterations between progress lines
PROGRESS_S = 30.0     # ... or seconds, whichever comes first


class CommandLineError(UserError, CurvatureError):
    """Bad input to curvature.py: one `error: ...` line and exit 2 (a UserError), and a CurvatureError."""


# ------------------------------------------------------------------------------------------ the flags
def build_parser():
    ap = argparse.ArgumentParser(description="Hessian spectral radius of the first-task loss (paper section 4.3). "
                                 "The manual: docs/curvature.md.", formatter_class=common.HelpFormatter)
    ap.add_argument("--model", required=True, help="theta_A: a checkpoint folder tuned on --task, or a LoRA stage's "
                    "adapter folder (or 'tiny', a hub id)")
    ap.add_argument("--params", choices=PARAMS, default=None,
                    help="the weights the Hessian is over: trainable (a LoRA adapter's, what its stage moves) or all "
                         "(unset: trainable for an adapter folder, all otherwise)")
    ap.add_argument("--task", required=True, help="the task whose training loss is differentiated (theta_A's task)")
    ap.add_argument("--samples", type=int, default=50, help="training examples in the loss (seeded sample, >= 1)")
    ap.add_argument("--out", required=True, help="curvature.json path; refused if it exists, unless --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --taylor_out files)")
    ap.add_argument("--method", choices=["lanczos", "power"], default="lanczos", help="eigen-solver")
    ap.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                    help="tolerance on the eigenvalue itself (> 0): lanczos stops once the certified bound on rho "
                         "(residual, or residual^2/gap) is <= rtol * rho; power: eigenthings' relative change")
    ap.add_argument("--tol", type=float, default=None, help="the earlier name of --rtol (> 0; unset: --rtol)")
    ap.add_argument("--stop", choices=["dominant", "both"], default="dominant",
                    help="lanczos stop rule: the end giving rho converged (and the other end bounded below rho), "
                         "or both ends converged")
    ap.add_argument("--start", choices=list(START_VECTORS), default=None,
                    help="start vector: a Ritz vector of the Hessian of the first N/10 samples (lanczos default "
                         "where it fits in memory), the loss gradient plus a seeded random vector (lanczos "
                         "otherwise), or the random vector alone (power default)")
    ap.add_argument("--max_iter", type=int, default=100, help="most solver iterations, one HVP each (>= 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample and the random start vector (>= 0)")
    ap.add_argument("--reference", nargs="+", default=None,
                    help="checkpoint dir(s) of theta_AB for the Taylor check (several need --taylor_out; unset: "
                         "no Taylor check)")
    ap.add_argument("--taylor_out", default=None, metavar="NAME",
                    help="write each reference's Taylor check to <reference dir>/NAME (e.g. taylor.json); --out "
                         "then holds the spectrum alone (unset: the check goes into --out)")
    ap.add_argument("--spectrum_from", default=None,
                    help="with --reference: take the spectrum from this curvature.json of the same model and "
                         "samples instead of solving again (the Taylor check then costs one HVP)")
    ap.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: the synthetic "
                    "tasks)")
    # finetune.py's data flags (the sample must come from the training set it drew), as plain strings checked
    # by tasks.load_task
    ap.add_argument("--arc_choices", default="4", help="as finetune.py --arc_choices: 4 or all")
    ap.add_argument("--test_set", default="fraction", help="as finetune.py --test_set: fraction or rest")
    ap.add_argument("--cells", default=None, help="as finetune.py --cells: equal or fill (unset: its default)")
    ap.add_argument("--micro_batch_size", type=int, default=10, help="samples per retained graph (>= 1)")
    ap.add_argument("--max_length", type=int, default=None, help="tokens per example (unset: finetune.py's "
                    "default, so the loss is the one it minimised)")
    ap.add_argument("--graph_memory_budget_gb", type=float, default=None,
                    help="memory for retained graphs, GiB (> 0; unset: a share of the device's memory)")
    ap.add_argument("--gradient_checkpointing", choices=list(CHECKPOINTING), default="auto",
                    help="HVPs one decoder layer at a time (chained_tuning/hessian/layerwise.py; Llama-like "
                         "models): auto for the micro-batches whose graphs do not fit the budget, on for all (least "
                         "memory, no graph retained), off never")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (unset: cuda when available, else cpu; "
                    "under torchrun: cuda:LOCAL_RANK)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype the model and its HVPs are computed in (the solver's vectors stay float32)")
    ap.add_argument("--backend", choices=["auto", "extension", "torch"], default="auto",
                    help="auto: the C++ extension if it loads, else plain PyTorch")
    d = M.MeasureOptions()
    ap.add_argument("--measures", default="rho", help=f"comma-separated, of {','.join(M.MEASURES)} (rho is always "
                    "solved); topk and blocks stop on --rtol within --max_iter steps")
    ap.add_argument("--trace_products", type=int, default=d.trace_products, help="HVPs of the Hutch++ trace "
                    "(a multiple of 3, >= 6)")
    ap.add_argument("--slq_probes", type=int, default=d.slq_probes, help="probes of the density (SLQ, >= 2)")
    ap.add_argument("--slq_steps", type=int, default=d.slq_steps, help="Lanczos steps per density probe (>= 3)")
    ap.add_argument("--topk", type=int, default=d.topk, help="eigenvalues at each end for topk (>= 1)")
    ap.add_argument("--reorth", choices=M.REORTH, default=d.reorth, help="the Lanczos of density, topk and blocks: "
                    "full (a stored basis, steps + 1 vectors), none (three vectors: 7B), auto (full where the "
                    "basis fits the free memory)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = common.die_on_user_error(lambda: run_cli(args))
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(json.dumps({k: result.get(k) for k in ("rho", "lambda_max", "lambda_min", "iterations", "hvp_count",
                                                  "converged", "wall_time_s")}))
    if not result["converged"]:
        print(f"warning: {result.get('warning')}", file=sys.stderr)
    return 0


def run_cli(args):
    """curvature.py's work on parsed flags: every check before anything is loaded, then the run (under torchrun
    in a process group). Bad input raises a UserError; the Hessian library's own errors are raised as one."""
    try:
        refs = check_flags(args)
        device = common.check_device(args.device)
        model_path = lora.resolve(args.model)
        if args.params is None:  # recorded in the result's config as the one used
            args.params = "trainable" if lora.is_adapter_dir(model_path) else "all"
        for r in refs if lora.is_adapter_dir(model_path) else []:  # delta must be in the adapter's coordinates
            if not lora.applied_to_same_base(model_path, r):
                raise CurvatureError(f"--reference {r}: not an adapter on --model's base (a --lora_chain continue "
                                     f"stage of it); the Taylor check of an adapter folder compares its own weights")
        common.check_out(args.out, args.overwrite, example="curvature.json")
        for r in refs if args.taylor_out else []:
            common.check_out(os.path.join(r, args.taylor_out), args.overwrite, flag="--taylor_out")
        owned_group, finished = False, False
        if common.under_torchrun():
            device, owned_group = common.setup_process_group(device)
        try:
            out = run(args, model_path, refs, device)
            finished = True
            return out
        finally:
            common.end_process_group(owned_group, finished)
    except HessianError as e:
        raise CommandLineError(str(e)) from e


def check_flags(args):
    """Numbers, names and reference folders; returns the --reference dirs (args.rtol becomes --tol if given)."""
    common.check_args(vars(args), {"samples": common.AT_LEAST_1, "rtol": common.POSITIVE, "tol": common.POSITIVE,
                                   "max_iter": common.AT_LEAST_1,
                                   "seed": common.NON_NEGATIVE, "micro_batch_size": common.AT_LEAST_1,
                                   "max_length": common.AT_LEAST_1, "graph_memory_budget_gb": common.POSITIVE})
    if args.task not in tasks.TASKS:
        raise CurvatureError(f"--task {args.task!r} is not one of {', '.join(tasks.TASKS)}")
    _check_start(args.start, args.gradient_checkpointing, "--start", "--gradient_checkpointing")
    refs = list(args.reference or [])
    for r in refs:
        if not os.path.isdir(r):
            raise CurvatureError(f"--reference {r}: no such checkpoint directory (pass theta_AB's dir)")
    if len(refs) > 1 and not args.taylor_out:
        raise CurvatureError("several --reference dirs need --taylor_out NAME (each gets <dir>/NAME)")
    if args.taylor_out and (not refs or os.sep in args.taylor_out or not args.taylor_out.endswith(".json")):
        raise CurvatureError(f"--taylor_out {args.taylor_out!r}: give a file name such as taylor.json (written "
                             "into each --reference dir), together with --reference")
    if args.tol is not None:
        args.rtol = args.tol
    M.parse_measures(args.measures)
    try:
        M.check_options(_measure_options(args))
    except CurvatureError as e:
        raise CurvatureError(f"--{e}") from None
    return refs


def _measure_options(args):
    return M.MeasureOptions(args.trace_products, args.slq_probes, args.slq_steps, args.topk, args.max_iter,
                            args.rtol, args.seed, args.reorth)


# -------------------------------------------------------------------------------------------- the run
def _say(*a, **k):
    """print on rank 0 only (every rank computes the same)."""
    d = _dist()
    if d is None or d.get_rank() == 0:
        print(*a, **k)


def run(args, model_path, refs, device):
    """Sample, load, solve (or read --spectrum_from), the Taylor checks, then the files: --out last."""
    print = _say  # noqa: A001  (one line per run, not one per rank)
    chain, data, pool, examples = draw_sample(args, model_path)
    ext = load_extension("none" if args.backend == "torch" else None)
    print(f"curvature: {args.model} (chain {' -> '.join(chain) or 'none'}), task {args.task} [{data.source}], "
          f"{len(examples)} samples, {args.method}, backend {ext['name'] if ext['ok'] else 'torch'} "
          f"-> {args.out}", flush=True)
    # an adapter folder: its adapter on top, unmerged (its weights are the trainable ones), lower stages merged
    model, tok = lora.load_model_and_tokenizer(model_path, dtype=getattr(torch, args.dtype), trainable=True,
                                               merge=False)
    select_params(model, args.params)
    model.to(device)
    batches = build_batches(tok, examples, args.micro_batch_size, args.max_length)
    budget = None if args.graph_memory_budget_gb is None else int(args.graph_memory_budget_gb * (1 << 30))
    if args.spectrum_from is not None:
        print(f"curvature: the spectrum from {args.spectrum_from}", flush=True)
        res, op = spectrum_from_file(args, model, batches, examples, budget)
    else:
        print(f"curvature: building the graphs and solving (rtol {args.rtol:g}, at most {args.max_iter} iterations, "
              f"{device}, {args.dtype})", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res, op = hessian_spectrum(model, batches, method=args.method, rtol=args.rtol, max_iter=args.max_iter,
                                       seed=args.seed, backend=args.backend, stop=args.stop, start=args.start,
                                       graph_memory_budget=budget,
                                       gradient_checkpointing=args.gradient_checkpointing,
                                       return_operator=True, progress=_progress_printer())
        print(f"curvature: rho {res['rho']:.6g} after {res['iterations']} iterations ({res['hvp_count']} HVPs, "
              f"{res['backend']['solver_loop']} loop, {'converged' if res['converged'] else 'NOT converged'}) in "
              f"{res['wall_time_s']:.1f}s", flush=True)
    names = M.parse_measures(args.measures)
    if len(names) > 1:
        print(f"curvature: measures {', '.join(names[1:])}", flush=True)
        res["measures"] = {"rho": {"rho": res["rho"], "hvp_count": res["hvp_count"],
                                   "seconds": res.get("wall_time_s"), "settings": res.get("settings")},
                           **M.spectral_measures(op, names, _measure_options(args), model)}
    checks = []
    for r in refs:
        print(f"curvature: Taylor check against {r}", flush=True)
        checks.append(reference_check(op, res["rho"], r, batches, common))
    return write_results(args, res, refs, checks, chain, data, pool, examples)


def draw_sample(args, model_path):
    """(the model's chain, the task's training data, its examples, the seeded sample of --samples of them)."""
    print = _say  # noqa: A001
    chain = list(checkpoint.read_meta(model_path).get("chain") or [])
    if args.task not in chain:
        print(f"warning: --task {args.task} is not in --model's chain ({' -> '.join(chain) or 'none: a base model'}); "
              f"this is the curvature of a loss the model was never tuned on", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data = tasks.load_task(args.task, split="train", data_dir=args.data_dir, seed=args.seed,
                           **tasks.data_options(args))
    pool = list(data.examples)
    if not pool:
        raise CurvatureError(f"task {args.task} has no training examples (data: {data.source})")
    chosen = common.sample_indices(len(pool), args.samples, args.seed)
    if len(chosen) < args.samples:
        print(f"note: task {args.task} has only {len(pool)} training examples; using all", file=sys.stderr)
    return chain, data, pool, [pool[i] for i in chosen]


def build_batches(tokenizer, examples, micro_batch_size, max_length=None):
    """Encode with finetune.py's encode_example and collate (chained_tuning.loss): length-sorted micro-batches of
    at most micro_batch_size samples, closed early where the next (longer) sample would make padding more
    than MAX_PADDING of the micro-batch's tokens (every padded token costs an HVP as much as a real one)."""
    if max_length is None:  # finetune.py's own default, so the loss is the one it minimised
        max_length = FINETUNE_MAX_LENGTH
    enc = [encode_example(tokenizer, ex, max_length) for ex in examples]
    enc.sort(key=lambda e: len(e["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups, cur, real = [], [], 0
    for e in enc:
        n = len(e["input_ids"])
        if cur and (len(cur) == micro_batch_size or (len(cur) + 1) * n > (1 + MAX_PADDING) * (real + n)):
            groups.append(cur)
            cur, real = [], 0
        cur.append(e)
        real += n
    groups.append(cur)
    return [collate(g, pad) for g in groups]


def _progress_printer():
    last = [time.time()]

    def progress(k, rho):
        if k % PROGRESS_EVERY == 0 or time.time() - last[0] >= PROGRESS_S:
            last[0] = time.time()
            print(f"curvature: iteration {k}: rho {rho:.6g}", flush=True)
    return progress


def write_results(args, res, refs, checks, chain, data, pool, examples):
    """--out (and each <reference>/--taylor_out); rank 0 writes, every rank returns the same record."""
    rank = _dist().get_rank() if _dist() else 0
    metadata = common.run_metadata()

    def record(ref, config):
        out = dict(res)
        out.update({"model": args.model, "run_id": _run_id(args.model), "params": args.params, "task": args.task,
                    "chain": chain,
                    "task_in_chain": args.task in chain, "sample_ids": [str(ex.id) for ex in examples],
                    "data": {"source": str(data.source), "split": "train", "n_available": len(pool)},
                    "reference": ref, "config": config, "metadata": metadata})
        return out

    if args.taylor_out:
        files = []
        for r, chk in zip(refs, checks):
            path = os.path.join(r, args.taylor_out)
            if rank == 0:
                common.write_json_atomic(path, record(chk, {**vars(args), "reference": r, "taylor_out": None,
                                                            "out": path}))
            files.append(path)
            _say(f"curvature: Taylor check -> {path}", flush=True)
        result = record(None, vars(args))
        result["taylor_files"] = files
    else:
        result = record(checks[0] if checks else None, {**vars(args), "reference": refs[0] if refs else None})
    if rank == 0:  # last: run_all.sh takes --out as the sign that all is written
        common.write_json_atomic(args.out, result)
    _say(f"curvature: -> {args.out}", flush=True)
    return result


def _run_id(model_dir):
    try:
        with open(os.path.join(model_dir, "run.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ the Taylor check
def spectrum_from_file(args, model, batches, examples, budget):
    """The spectrum of an earlier curvature.json of the same model and samples, and an operator for
    the reference terms (no solve)."""
    if not args.reference:
        raise CurvatureError("--spectrum_from needs --reference (it only skips the solve of a Taylor check)")
    try:
        with open(args.spectrum_from) as f:
            prev = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CurvatureError(f"--spectrum_from {args.spectrum_from}: cannot read it ({e}); run curvature.py on "
                             f"--model first") from None
    ids = [str(ex.id) for ex in examples]
    if prev.get("task") != args.task or prev.get("sample_ids") != ids or prev.get("run_id") != _run_id(args.model):
        raise CurvatureError(f"--spectrum_from {args.spectrum_from} was computed for another model, task or sample "
                             f"set; use the curvature.json of --model with the same --task, --samples and --seed")
    _prepare_model(model)
    ext = load_extension("none" if args.backend == "torch" else None)
    ce = "auto" if (ext["ok"] and args.backend != "torch") else "torch"
    op = _operator(model, batches, ce, budget, args.gradient_checkpointing)
    keep = ("method", "lambda_max", "lambda_min", "rho", "iterations", "hvp_count", "residual", "converged",
            "stop_reason", "warning", "settings", "backend", "n_params", "n_samples", "n_answer_tokens", "loss",
            "wall_time_s", "error_bound", "rel_error_bound", "error_bound_kind", "distributed")
    res = {k: prev[k] for k in keep if k in prev}
    res["spectrum_from"] = os.path.abspath(args.spectrum_from)
    return res, op


def _operator(model, batches, ce, budget, checkpointing="auto"):
    """The HVP operator of `batches` (all N samples): this rank's share, sharded, under a process group."""
    d = _dist()
    if d is None:
        return HessianOperator(model, batches, fused_ce=ce, graph_memory_budget=budget,
                               gradient_checkpointing=checkpointing)
    _, mine = split_rows(batches, d.get_rank(), d.get_world_size())
    total = sum(_count_answer_tokens(b) for b in batches)
    return ShardedOperator(HessianOperator(model, mine, fused_ce=ce, graph_memory_budget=budget,
                                           total_tokens=total, gradient_checkpointing=checkpointing))


def _loss_sum(model, batches, fused):
    with torch.no_grad():
        return float(sum(float(batch_answer_loss_sum(model, b, fused)) for b in batches))


def _delta(op, model, ref_model, ref_dir):
    """theta_AB - theta_A in the solver's vector layout (a sharded operator: this rank's slice only)."""
    local = getattr(op, "op", op)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    sharded = local is not op
    out = torch.zeros(op.S, dtype=local.vec_dtype, device=local.params[0].device) if sharded else None
    delta, off = [], 0
    for p in local.params:
        name = names[id(p)]
        ref_p = ref_params.get(name)
        if ref_p is None or ref_p.shape != p.shape:
            raise CurvatureError(f"--reference {ref_dir}: parameter {name} is missing or has another shape; "
                                 "pass a checkpoint tuned from --model")
        if not sharded:
            delta.append((ref_p.detach().to(local.vec_dtype) - p.detach().to(local.vec_dtype)).contiguous())
            continue
        a, b = max(off, op.lo), min(off + p.numel(), op.hi)
        if a < b:
            rp, mp = ref_p.detach().reshape(-1)[a - off:b - off], p.detach().reshape(-1)[a - off:b - off]
            out[a - op.lo:b - op.lo] = rp.to(out) - mp.to(out)
        off += p.numel()
    return [out] if sharded else delta


def reference_check(op, rho, ref_dir, batches, common=common):
    """Paper eqs. 3-4 at theta_A: ||delta||^2, L_A(theta_AB) - L_A(theta_A), 0.5 d^T H d, 0.5 rho ||d||^2.
    op: the HessianOperator (or ShardedOperator) of the spectrum; delta lives in its vector layout."""
    local = getattr(op, "op", op)
    model = local.model
    # an adapter model: the reference's adapter on top (its base checked to be the model's); else merged weights
    ref_model, _ = lora.load_model_and_tokenizer(ref_dir, dtype=local.params[0].dtype,
                                                 merge=not hasattr(model, "peft_config"))
    ref_model.to(local.params[0].device)
    _prepare_model(ref_model)
    delta = _delta(op, model, ref_model, ref_dir)
    delta_sq = op.dot(delta, delta)
    loss_a = op.reduce_sum(_loss_sum(model, local.batches, local.ce)) / local.total_tokens
    loss_ab = op.reduce_sum(_loss_sum(ref_model, local.batches, local.ce)) / local.total_tokens
    del ref_model
    quad = 0.5 * op.dot(delta, op.hvp(delta))
    bound = 0.5 * rho * delta_sq
    return {"model": ref_dir, "run_id": _run_id(ref_dir), "delta_sq_norm": delta_sq, "loss_A_at_A": loss_a,
            "loss_A_at_AB": loss_ab, "actual_loss_change": loss_ab - loss_a, "quadratic_term": quad,
            "bound": bound, "quadratic_le_bound": bool(quad <= bound * (1 + 1e-6) + 1e-12)}


if __name__ == "__main__":
    sys.exit(main())
