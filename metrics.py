"""Forgetting, biased forgetting, and the paper's tables and figures, from a folder of runs.

    python metrics.py --runs runs --out runs/metrics
    python metrics.py --runs runs --out results --profile paper --lr 1e-5 --k 3 --n_boot 2000
    python metrics.py --runs runs --out results --n_boot 0          # no bootstrap (fastest)

With theta_A the model tuned on task A only and theta_AB the model tuned on A then on B (the paper's §3):

    Forgetting_AB          = Acc_A(theta_A) - Acc_A(theta_AB)
    Forgetting_A,g         = Acc_A(theta_A, g) - Acc_A(theta_AB, g)        worst group (WG) = max_g
    RelativeForgetting_AB  = Forgetting_AB / Acc_A(theta_A)
    BiasedForgetting_A,g   = Forgetting_A,g - Forgetting_AB                 reported: max_g (and the k worst)

How runs are found: every folder under --runs that holds a run.json is a run (folder names are never
parsed). A stage-2 run (theta_AB) is paired with the stage-1 run (theta_A) whose run_id equals its
parent_run_id; the numbers come from the eval.json beside each run.json, and the bootstrap from the
samples JSONL that eval.json names. Stage-1 runs also read eval_val.json (validation accuracy) if present.

Which chained runs make Table 1 (and Figures 2, 3, Kendall's tau): for each chain A->B and seed, the
chained run whose second-stage lr is the main lr (--lr, else "lr" in <runs>/study.json, else the most
common stage-2 lr); if the first-stage sweep gave several such runs, the one whose parent has the best
validation accuracy on A (eval_val.json), then the parent whose lr is the main lr. The parent of the
chosen run is authoritative: table1_runs.csv lists every run used.

Outputs in --out (all written to a temporary name, then renamed):
    table1.csv/.md  table1_runs.csv  forgetting_by_group.csv  biased_forgetting.csv  kendall_tau.csv
    first_task_acc_by_lr.csv/.md  figure2/3/5/6/8.png (each with the .csv it was drawn from)
    chance.csv (every accuracy of the study's evaluations against its chance level)  summary.json  report.md
    with curvature results (curvature.py's curvature.json / taylor.json anywhere under --runs, paired to
    runs by their run_id fields): curvature.csv  figure4a.png/.csv (rho per first task)  figure4b.png/.csv
    (mean downstream forgetting against first-task rho)  curvature_fit.csv (OLS)  taylor_check.csv
Units: eval.json, replay_summary.json and order.json hold fractions; every CSV, figure and report.md here is
in percent (percentage points): a column in percent says so in its header ("forgetting (%)"), a figure in its
axis label. Mean and std (ddof=1, "n/a" for one seed) are over seeds. Missing or failed runs are listed in
report.md and on stdout; table cells without data say "missing" (or "failed" when the only runs there failed).

Comparable pairs only: forgetting, per-group forgetting and every paired statistic need both evaluations of the
first task made on the same data source, split and examples (order.incomparable: the task blocks' source,
split and n, then the samples files' example ids). A pair that fails is refused: report.md names both runs, the
field and both values, and a cell whose every pair was refused says "incomparable".

Ties and chance: groups whose forgetting is equal (within 1e-9) are tied and named together, "a = b (tied)",
never one of them by name order (worst_groups_label). An accuracy is flagged at chance (section "Accuracies
at chance level", chance.csv) when its predictions collapsed to one option, or when it lies within two binomial
standard errors of the chance accuracy of a uniform guess over its examples' options (chance_flag).

A runs folder with nothing to report (no usable pair, long chain, replay, mitigation or curvature result) is
a user error (exit 2, one line with what was found and what is missing); nothing is written. All outputs are
made in a temporary folder beside --out and moved into it at the end.

Curvature (paper §4.3, Figure 4): rho(H) = max(|lambda_max|, |lambda_min|) of the Hessian of the first-task
loss at theta_A; Figure 4b fits mean downstream forgetting (%) = intercept + slope * rho by OLS over first
tasks (ols_fit); the Taylor check compares L_A(theta_AB) - L_A(theta_A) with 0.5 delta^T H delta and the
bound 0.5 rho ||delta||^2 (taylor_rows). A runs folder without curvature files gives the same outputs as
before (the report's curvature section says "No curvature results").

Which runs the two-stage study uses (Table 1 and everything above): plain-recipe first stages and the
measured chains (order.is_measured_chain, the one definition order.py uses too). Left out, by run.json
content: replay points (stage 3; their run_id is in a replay_summary.json or a point.json lies beside them),
runs with a mitigation option in their config (replay_fraction, l2_to_init or ewc > 0, train_fraction set)
and the stages a long chain stores inside its own folder (the folder holding its
last stage). Such a stage may be a copy of a Table-1 run (same run_id, same chain/lr/seed/steps/parent):
copies are allowed, the study uses the copy outside the long chain; other duplicate run_ids are an error.

Beyond the paper's two stages (each section says "No ... results" and writes nothing without its inputs):
  Replay (§5, appendix 9.4): every replay_summary.json (replay.py) -> replay.csv (per chain, seed and point),
    replay_mean.csv, figure7 (forgetting of A against replay fraction (a) and steps (b)), figure11-14 (A
    accuracy, A forgetting, B accuracy, B forgetting = acc_B(theta_AB) - acc_B(point)), each .png + .csv,
    and replay_recovery.csv: per chain the smallest fraction whose mean forgetting of A is <= 0.01 (1 point;
    over-recovery counts), else "none" (recovery_fraction).
  Mitigations: second stages with --replay_task/--replay_fraction ("mix"), --l2_to_init, --ewc (from the
    same theta_A, found by parent_run_id) against the plain Table-1 chain and the third-stage replay points
    -> mitigation.csv/.png (mean per chain and method), mitigation_runs.csv (per seed) and a matched-cost
    paragraph (replay at the fraction whose A-examples seen are closest); costs in mitigation_rows.
  Long chains: run.json of stage >= 3 that are not replay points, stages followed by parent_run_id ->
    chain_forgetting.csv (forgetting of every earlier task after every later stage, per seed),
    figure_chain_forgetting.png/.csv (mean over seeds).
  Order: <runs>/results/order.json (order.py), else order.py's recommend_order / check_pairs on Figure 4a's
    rho -> order.csv (recommended order per pair; agrees = the recommended order forgot less, measured on the
    chains order.py measures: order.measured_forgetting, with order.json's --lr2); an order.json whose own
    verdict differs is named as out of date.
New parts of the report are section functions `section_xxx(study, out, opts) -> markdown` in SECTIONS.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import order  # noqa: E402 - the measured-chain and comparability rules live there, shared with order.py
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, UserError, check_args,  # noqa: E402
                    die_on_user_error, in_range)
from order import Evaluation, incomparable, is_measured_chain, mitigation_of  # noqa: E402,F401

CAPABILITY_TASKS = ("arc", "csqa", "csqa2")
SAFETY_TASKS = ("toxigen", "bbq", "saferdialogues")
SHORT = {"arc": "ARC", "csqa": "CQA", "csqa2": "CQA2", "toxigen": "TQA", "bbq": "BBQ", "saferdialogues": "SD"}
TABLE1_COLUMNS = ["capability", "safety",
                  "cs_acc_cap", "cs_acc_cap_std", "cs_acc_safety", "cs_acc_safety_std",
                  "cs_forgetting_cap", "cs_forgetting_cap_std",
                  "sc_acc_cap", "sc_acc_cap_std", "sc_acc_safety", "sc_acc_safety_std",
                  "sc_forgetting_safety", "sc_forgetting_safety_std"]
MISSING, FAILED, NA, INCOMPARABLE = "missing", "failed", "n/a", "incomparable"
TIE_TOL = 1e-9  # equal accuracies reach a forgetting through different float sums: they differ in the last bits


def short(task):
    return SHORT.get(task, task)


# ----------------------------------------------------------------------------------------------------
# the metrics (fractions in, fractions out)

def forgetting(acc_first, acc_chained):
    """Forgetting_AB = Acc_A(theta_A) - Acc_A(theta_AB). Negative when tuning on B improved A."""
    return float(acc_first) - float(acc_chained)


def _acc(v):
    return float(v["acc"]) if isinstance(v, dict) else float(v)


def group_forgetting(groups_first, groups_chained):
    """Forgetting_A,g = Acc_A(theta_A, g) - Acc_A(theta_AB, g) for every group g present in both.

    Each argument maps group -> accuracy, or group -> {"acc": ..., "n": ...} (eval.json's "groups");
    groups with n == 0 are skipped. Returns {group: forgetting}, sorted by group name."""
    out = {}
    for g in sorted(set(groups_first) & set(groups_chained)):
        a, b = groups_first[g], groups_chained[g]
        if any(isinstance(v, dict) and v.get("n", 1) == 0 for v in (a, b)):
            continue
        out[g] = forgetting(_acc(a), _acc(b))
    return out


def tie_classes(values, tol=TIE_TOL):
    """{name: value} -> [[names], ...], largest value first; names within tol of a class's largest value share
    that class (sorted by name). nan values are left out."""
    classes = []
    for g, v in sorted(((g, v) for g, v in values.items() if not math.isnan(v)), key=lambda kv: -kv[1]):
        if classes and classes[-1][1] - v <= tol:
            classes[-1][0].append(g)
        else:
            classes.append(([g], v))
    return [sorted(c) for c, _ in classes]


def worst_group_forgetting(group_f):
    """WG forgetting = max_g Forgetting_A,g. Returns (groups, value): every group at the max (several when
    tied, sorted by name); ([], nan) without groups."""
    classes = tie_classes(group_f)
    if not classes:
        return [], float("nan")
    return classes[0], float(max(group_f[g] for g in classes[0]))


def worst_groups_label(values, k=1):
    """The k largest of {group: value} named without breaking a tie: tie classes, largest first, until k
    groups are named (a class tied across the k-th place is named whole). "muslim", "asian = black (tied)",
    "muslim;asian = black = chinese (tied)"; "n/a" without groups."""
    shown, n = [], 0
    for c in tie_classes(values):
        if n >= k:
            break
        shown.append(c)
        n += len(c)
    if not shown:
        return NA
    return ";".join(" = ".join(c) for c in shown) + (" (tied)" if any(len(c) > 1 for c in shown) else "")


def relative_forgetting(acc_first, acc_chained):
    """RelativeForgetting_AB = Forgetting_AB / Acc_A(theta_A) (nan when Acc_A(theta_A) = 0)."""
    acc_first = float(acc_first)
    return forgetting(acc_first, acc_chained) / acc_first if acc_first != 0 else float("nan")


def biased_forgetting_vector(group_f, overall_f):
    """BiasedForgetting_A,g = Forgetting_A,g - Forgetting_A for every group: {group: value}."""
    return {g: float(v) - float(overall_f) for g, v in group_f.items()}


def k_worst_groups(bf_vector, k=1):
    """The k largest biased forgetting values, [(group, value), ...], largest first. For their mean only: tied
    values are equal, so which tied group fills the k-th place does not change it; names come from
    worst_groups_label, which never breaks a tie."""
    items = sorted(bf_vector.items(), key=lambda kv: (-kv[1], kv[0]))
    return items[:max(int(k), 0)]


def biased_forgetting(group_f, overall_f, k=1):
    """Biased forgetting of task A: mean over the k worst groups of (Forgetting_A,g - Forgetting_A).
    k = 1 (the default, the paper's number) is max_g Forgetting_A,g - Forgetting_A = WG - overall.
    nan without groups."""
    worst = k_worst_groups(biased_forgetting_vector(group_f, overall_f), k)
    return float(np.mean([v for _, v in worst])) if worst else float("nan")


def kendall_tau_b(bf_x, bf_y):
    """Kendall's tau-b between two group rankings, e.g. the biased forgetting of A->B1 and A->B2:
    tau_b = (P - Q) / sqrt((P + Q + T_x) (P + Q + T_y)), P/Q concordant/discordant pairs, T_x/T_y pairs
    tied only in x/y (scipy.stats.kendalltau, variant 'b', with its two-sided p-value).
    Uses the groups present in both dicts; returns (tau, p_value, n_groups), nan for < 2 groups."""
    common = sorted(set(bf_x) & set(bf_y))
    if len(common) < 2:
        return float("nan"), float("nan"), len(common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan
        r = stats.kendalltau([bf_x[g] for g in common], [bf_y[g] for g in common], variant="b")
    return float(r.statistic), float(r.pvalue), len(common)


def mean_std(values):
    """(mean, sample std with ddof=1, n) over the non-nan values; std is nan for n < 2, both for n = 0."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan")), len(v)


def align_samples(records_first, records_chained, task):
    """Pair two models' per-example records (samples JSONL rows) of `task` by example id.

    Returns (ids, correct_first, correct_chained, groups): ids sorted, correct_* float arrays of 0/1,
    groups a list (None for tasks without groups). Both must hold the same examples: a paired statistic on
    the shared part of two different example sets is not the forgetting either eval.json reports, so
    different id sets are a ValueError."""
    def index(records):
        return {str(r["id"]): r for r in records if r.get("task", task) == task}
    a, b = index(records_first), index(records_chained)
    if set(a) != set(b):
        raise ValueError(f"the two models' samples of {task} hold different examples ({len(a)} and {len(b)} ids, "
                         f"{len(set(a) & set(b))} shared); pair only evaluations of one example set")
    ids = sorted(a)
    return (ids, np.array([float(bool(a[i]["correct"])) for i in ids]),
            np.array([float(bool(b[i]["correct"])) for i in ids]), [a[i].get("group") for i in ids])


CHANCE_SE = 2.0  # "at chance": within this many binomial standard errors of a uniform guess


def chance_flag(acc, records):
    """Is an accuracy at chance level? records: its task's samples rows (n_options, pred). Returns (chance, why):
    chance = mean over the examples of 1 / n_options (the expected accuracy of a uniform guess; nan without
    option counts); why = "collapsed: every prediction is option i" when all of two or more examples got the
    same predicted option, else "within 2 standard errors of chance" when |acc - chance| <= 2 sqrt(chance
    (1 - chance) / n), else None."""
    n = len(records)
    k = [r["n_options"] for r in records if isinstance(r.get("n_options"), int) and r["n_options"] > 0]
    chance = float(np.mean([1.0 / x for x in k])) if n and len(k) == n else float("nan")
    preds = {r.get("pred") for r in records}
    if n >= 2 and len(preds) == 1 and None not in preds:
        return chance, f"collapsed: every prediction is option {preds.pop()}"
    if not math.isnan(chance) and abs(float(acc) - chance) <= CHANCE_SE * math.sqrt(chance * (1 - chance) / n):
        return chance, f"within {CHANCE_SE:g} standard errors of chance"
    return chance, None


def _topk_nanmean(x, k):
    """Mean of the k largest non-nan values along the last axis."""
    s = -np.sort(-np.where(np.isnan(x), -np.inf, x), axis=-1)[..., :k]
    s = np.where(np.isinf(s), np.nan, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(s, axis=-1)


def paired_bootstrap_ci(correct_first, correct_chained, groups=None, n_resamples=1000, seed=0, level=0.95,
                        k=1, chunk=100):
    """Percentile bootstrap over test examples for forgetting and biased forgetting, paired by example.

    correct_first / correct_chained: 0/1 per example, shape (n,) or (seeds, n) with the same examples
    (columns) for every seed. One resample draws n example indices with replacement (the same for both
    models and all seeds); each statistic is computed per seed and averaged over seeds:
        forgetting      = mean(correct_first[idx]) - mean(correct_chained[idx])
        per-group g     = Forgetting_g[idx] - Forgetting[idx]     (groups absent from a resample: nan)
        biased (max)    = max_g of the per-group values;  biased (top-k) = mean of the k largest.
    The CI is the [(1-level)/2, (1+level)/2] quantiles of the resampled statistic. Deterministic for a seed.
    Caveat: a max over groups is biased upward by noise, so when the groups differ little its percentile CI
    can lie above the estimate; whether one group's gap is noise is read from that group's own CI.
    Returns {"n", "n_resamples", "forgetting", "biased_forgetting_max", "biased_forgetting_topk",
    "groups": {g: ...}}, each statistic a dict {"estimate", "low", "high"} (nan without groups)."""
    fa = np.atleast_2d(np.asarray(correct_first, dtype=float))
    fb = np.atleast_2d(np.asarray(correct_chained, dtype=float))
    if fa.shape != fb.shape or fa.shape[1] == 0:
        raise ValueError(f"need the same non-empty examples for both models, got {fa.shape} and {fb.shape}")
    n = fa.shape[1]
    names, codes = [], None
    if groups is not None and any(g is not None for g in groups):
        names = sorted({str(g) for g in groups if g is not None})
        pos = {g: i for i, g in enumerate(names)}
        codes = np.array([pos[str(g)] if g is not None else len(names) for g in groups])  # None: own bucket
    G = len(names)

    def statistics(idx):  # idx: (R, n) -> per-resample statistics averaged over seeds
        f = fa[:, idx].mean(-1) - fb[:, idx].mean(-1)  # (S, R)
        out = {"forgetting": f.mean(0)}
        if G:
            R = idx.shape[0]
            flat = (np.arange(R)[:, None] * (G + 1) + codes[idx]).ravel()
            cnt = np.bincount(flat, minlength=R * (G + 1)).reshape(R, G + 1)[:, :G]
            per_seed = []
            for s in range(fa.shape[0]):
                sa = np.bincount(flat, weights=fa[s][idx].ravel(), minlength=R * (G + 1)).reshape(R, G + 1)[:, :G]
                sb = np.bincount(flat, weights=fb[s][idx].ravel(), minlength=R * (G + 1)).reshape(R, G + 1)[:, :G]
                with np.errstate(invalid="ignore", divide="ignore"):
                    fg = np.where(cnt > 0, (sa - sb) / cnt, np.nan)
                per_seed.append(fg - f[s][:, None])
            bf = np.stack(per_seed)  # (S, R, G)
            out["groups"] = bf.mean(0)
            out["biased_forgetting_max"] = _topk_nanmean(bf, 1).mean(0)
            out["biased_forgetting_topk"] = _topk_nanmean(bf, k).mean(0)
        return out

    point = statistics(np.arange(n)[None, :])
    rng = np.random.default_rng(seed)
    draws = defaultdict(list)
    for start in range(0, n_resamples, chunk):
        r = statistics(rng.integers(0, n, size=(min(chunk, n_resamples - start), n)))
        for key, v in r.items():
            draws[key].append(v)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def summary(est, d):
        if d is None or len(d) == 0 or np.all(np.isnan(d)):
            return {"estimate": float(est), "low": float("nan"), "high": float("nan")}
        lo, hi = np.nanpercentile(d, q)
        return {"estimate": float(est), "low": float(lo), "high": float(hi)}

    nan = {"estimate": float("nan"), "low": float("nan"), "high": float("nan")}
    res = {"n": n, "n_resamples": n_resamples,
           "forgetting": summary(point["forgetting"][0],
                                 np.concatenate(draws["forgetting"]) if n_resamples else None),
           "biased_forgetting_max": nan, "biased_forgetting_topk": nan, "groups": {}}
    if G:
        for key in ("biased_forgetting_max", "biased_forgetting_topk"):
            res[key] = summary(point[key][0], np.concatenate(draws[key]) if n_resamples else None)
        allg = np.concatenate(draws["groups"]) if n_resamples else None
        for j, g in enumerate(names):
            res["groups"][g] = summary(point["groups"][0, j], allg[:, j] if allg is not None else None)
    return res


# ----------------------------------------------------------------------------------------------------
# reading a runs folder

def _read_json(path, what, fix):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} must be a JSON object; {fix}")
    return obj


def run_failed(meta):
    """A run.json says the run failed: "status" is failed/error/crashed, "failed": true, or an "error"."""
    status = meta.get("status")
    return ((isinstance(status, str) and status.lower() in {"failed", "error", "crashed"})
            or meta.get("failed") is True or bool(meta.get("error")))


@dataclass
class Run:
    path: str                  # the folder holding run.json
    name: str                  # that folder relative to --runs (how problems name the run)
    meta: dict                 # run.json
    eval: dict = None          # eval.json, None when missing
    val: dict = None           # eval_val.json (stage 1), None when missing
    problem: str = None        # why the run can't be used (failed, no eval.json)

    run_id = property(lambda self: self.meta.get("run_id"))
    stage = property(lambda self: self.meta.get("stage"))
    task = property(lambda self: self.meta.get("task"))
    chain = property(lambda self: self.meta.get("chain"))
    lr = property(lambda self: float(self.meta.get("lr")))
    seed = property(lambda self: self.meta.get("seed"))
    parent_run_id = property(lambda self: self.meta.get("parent_run_id"))

    def acc(self, task, which="eval"):
        ev = self.eval if which == "eval" else self.val
        t = (ev or {}).get("tasks", {}).get(task)
        return float(t["acc"]) if t else float("nan")


RUN_FIX = "it must be the run.json written by finetune.py (see the README's runs layout); re-run that stage"
EVAL_FIX = "it must be the eval.json written by evaluate.py; delete it and re-run evaluate.py for that run"


def _check_run_json(path, meta):
    def bad(msg):
        raise UserError(f"{path}: {msg}; {RUN_FIX}")
    if not isinstance(meta.get("run_id"), str) or not meta["run_id"]:
        bad('"run_id" must be a non-empty string')
    if run_failed(meta):
        return
    for key, typ in (("stage", int), ("task", str), ("chain", list), ("seed", int)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            bad(f'"{key}" must be a {typ.__name__}, got {meta.get(key)!r}')
    if not isinstance(meta.get("lr"), (int, float)) or isinstance(meta.get("lr"), bool):
        bad(f'"lr" must be a number, got {meta.get("lr")!r}')
    if len(meta["chain"]) != meta["stage"] or not meta["chain"] or meta["chain"][-1] != meta["task"]:
        bad(f'"chain" {meta["chain"]} must have "stage" ({meta["stage"]}) tasks and end with "task" ({meta["task"]})')
    if meta["stage"] >= 2 and not isinstance(meta.get("parent_run_id"), str):
        bad(f'a stage-{meta["stage"]} run needs "parent_run_id" (the run_id of the run it started from)')


def _check_eval_json(path, ev):
    tasks = ev.get("tasks")
    if not isinstance(tasks, dict):
        raise UserError(f'{path}: no "tasks" object; {EVAL_FIX}')
    for t, r in tasks.items():
        if not isinstance(r, dict) or not isinstance(r.get("acc"), (int, float)):
            raise UserError(f'{path}: task "{t}" has no numeric "acc"; {EVAL_FIX}')
        g = r.get("groups", {})
        if not isinstance(g, dict) or any(not isinstance(v, dict) or not isinstance(v.get("acc"), (int, float))
                                          for v in g.values()):
            raise UserError(f'{path}: task "{t}" has malformed "groups" (want {{group: {{"acc", "n"}}}}); {EVAL_FIX}')


def _same_run(a, b):
    """Two run.json files with one run_id describe the same run (a copy, e.g. the first stages of a long chain
    re-made with the same settings) when chain, stage, lr, seed, steps and parent agree."""
    keys = ("chain", "stage", "lr", "seed", "steps", "parent_run_id")
    return all(a.meta.get(k) == b.meta.get(k) for k in keys)


def _duplicate_error(a, b):
    raise UserError(f"run_id {a.run_id} appears in {a.path}/run.json and {b.path}/run.json; remove the stale copy")


def find_runs(runs_dir, exclude=None, allow_copies=False):
    """Every folder under runs_dir with a run.json -> (runs sorted by name, problems).

    Reads eval.json (and eval_val.json) beside each run.json. Malformed files raise UserError;
    a failed run or one without eval.json is kept with .problem set; a checkpoint folder without a
    run.json becomes a problem line. Two run.json with one run_id are an error, unless allow_copies and
    they describe the same run (_same_run): build_study then decides which copy the two-stage study uses."""
    if not os.path.isdir(runs_dir):
        raise UserError(f"runs folder {runs_dir} does not exist; pass --runs the folder run_all.sh wrote "
                        f"(the one holding stage1/ and stage2/)")
    runs, problems = [], []
    exclude = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(runs_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != exclude)
        name = os.path.relpath(root, runs_dir)
        if "run.json" not in files:
            if {"model.safetensors", "train_log.jsonl"} & set(files):
                problems.append(f"{name}: a checkpoint without run.json (an unfinished run?); re-run that stage")
            continue
        path = os.path.join(root, "run.json")
        meta = _read_json(path, "run.json", RUN_FIX)
        _check_run_json(path, meta)
        run = Run(path=root, name=name, meta=meta)
        if run_failed(meta):
            why = meta.get("error") or meta.get("status") or "failed"
            run.problem = f"failed (run.json says: {why})"
        for fname, attr in (("eval.json", "eval"), ("eval_val.json", "val")):
            p = os.path.join(root, fname)
            if os.path.isfile(p):
                ev = _read_json(p, fname, EVAL_FIX)
                _check_eval_json(p, ev)
                setattr(run, attr, ev)
        if run.eval is None and run.problem is None:
            run.problem = "no eval.json (not evaluated yet); run evaluate.py on it"
        runs.append(run)
    if not runs:
        raise UserError(f"no run.json found under {runs_dir}; run run_all.sh (or finetune.py) first, or pass "
                        f"--runs the folder that holds stage1/ and stage2/")
    seen = {}
    for r in runs:
        if r.run_id in seen and not (allow_copies and _same_run(seen[r.run_id], r)):
            _duplicate_error(seen[r.run_id], r)
        seen.setdefault(r.run_id, r)
    for r in runs:
        if r.problem:
            problems.append(f"{r.name}: {r.problem}")
    return runs, problems


def load_samples(run):
    """The per-example records of a run's eval.json (its samples JSONL: id, task, group, correct, pred,
    n_options), or None when the file is missing."""
    return order.read_samples(run.path, run.eval)


def evaluation(run):
    """A run's eval.json as order.incomparable takes it."""
    return Evaluation(run.name, run.path, run.eval)


def refusal(A, B, why):
    """The line report.md and stdout give a refused pair (the same words order.py prints)."""
    return f"chain {A} -> {B} left out, its evaluations cannot be compared: {why}"


@dataclass
class Pair:
    """theta_A (first) and theta_AB (chained) for one seed, with their metrics (fractions)."""
    first: Run
    chained: Run
    A: str
    B: str
    lr_a: float
    lr_b: float
    seed: int
    m: dict = field(default_factory=dict)
    refused: str = None        # why theta_A's and theta_AB's evaluations of A cannot be compared (m is empty)


def pair_metrics(first_eval, chained_eval, task_a, task_b):
    """All per-seed metrics of one chain A->B from theta_A's and theta_AB's eval.json (fractions)."""
    ta, ca = first_eval["tasks"][task_a], chained_eval["tasks"][task_a]
    cb = chained_eval["tasks"].get(task_b)
    f = forgetting(ta["acc"], ca["acc"])
    gf = group_forgetting(ta.get("groups") or {}, ca.get("groups") or {})
    wg, wg_v = worst_group_forgetting(gf)  # wg: every group tied at the max
    return {"acc_first": float(ta["acc"]), "acc_chained_a": float(ca["acc"]),
            "acc_chained_b": float(cb["acc"]) if cb else float("nan"),
            "forgetting": f, "relative_forgetting": relative_forgetting(ta["acc"], ca["acc"]),
            "group_forgetting": gf, "wg_forgetting": wg_v, "worst_groups": wg,
            "group_acc_first": {g: _acc(v) for g, v in (ta.get("groups") or {}).items()},
            "group_acc_chained": {g: _acc(v) for g, v in (ca.get("groups") or {}).items()},
            "group_n": {g: v.get("n") for g, v in (ta.get("groups") or {}).items()},
            "biased": biased_forgetting_vector(gf, f), "biased_max": biased_forgetting(gf, f, 1)}


def pair_runs(runs, parents=None):
    """Stage-2 runs joined to their stage-1 parent by parent_run_id -> (pairs, problems).
    `parents` ({run_id: Run}, default: `runs` by run_id) is where parents are looked up. A pair whose two
    evaluations of A cannot be compared (order.incomparable) is returned with .refused set and no metrics."""
    by_id = parents if parents is not None else {r.run_id: r for r in runs}
    pairs, problems = [], []
    for r in runs:
        if r.problem or r.stage != 2:
            continue
        A, B = r.chain
        p = by_id.get(r.parent_run_id)
        if p is None:
            problems.append(f"{r.name}: its first-stage run (parent_run_id {r.parent_run_id}) has no run.json "
                            f"under the runs folder; re-run stage 1 for {A}")
        elif p.problem:
            problems.append(f"{r.name}: its first-stage run {p.name} is unusable ({p.problem})")
        elif p.stage != 1 or p.task != A:
            problems.append(f"{r.name}: its parent {p.name} is a stage-{p.stage} run on {p.task}, not stage 1 on {A}")
        elif A not in p.eval["tasks"] or A not in r.eval["tasks"]:
            which = p if A not in p.eval["tasks"] else r
            problems.append(f"{which.name}/eval.json has no result for {A}; re-run evaluate.py --tasks {A},{B}")
        else:
            if B not in r.eval["tasks"]:
                problems.append(f"{r.name}/eval.json has no result for {B}; re-run evaluate.py --tasks {A},{B}")
            pair = Pair(p, r, A, B, p.lr, r.lr, r.seed)
            why = incomparable(A, evaluation(p), evaluation(r))
            if why:
                pair.refused = refusal(A, B, why)
            else:
                pair.m = pair_metrics(p.eval, r.eval, A, B)
            pairs.append(pair)
    return pairs, problems


@dataclass
class Study:
    runs_dir: str
    runs: list
    pairs: list           # comparable pairs only (refused ones: refused_pairs)
    problems: list
    main_lr: float
    main_lr_from: str
    table1: dict          # (A, B) -> [Pair, one per seed] used by Table 1 / Figures 2, 3 / Kendall
    marker: dict          # (A, B) -> "missing" | "failed" for chains without Table-1 data
    capability: list
    safety: list
    seeds: list
    study_json: dict
    all_runs: list = field(default_factory=list)      # every run.json found (runs: the two-stage study's)
    replay: list = field(default_factory=list)        # [(path relative to --runs, replay_summary.json)]
    replay_ids: set = field(default_factory=set)      # run_ids of replay points (third stages)
    long_chains: list = field(default_factory=list)   # [LongChain]
    copies: dict = field(default_factory=dict)        # run_id -> [Run, ...] over all_runs
    cache: dict = field(default_factory=dict)         # results shared between sections
    refused_pairs: list = field(default_factory=list)  # Pairs whose evaluations cannot be compared
    refused: list = field(default_factory=list)        # every refusal line (pairs and the sections' own)


# ----------------------------------------------------------------------------------------------------
# runs beyond the two-stage study: replay points, mitigated second stages, chains longer than two

REPLAY_FIX = "it must be the replay_summary.json written by replay.py; delete it and re-run replay.py"


def find_json_files(runs_dir, fname, fix, exclude=None):
    """Every file called fname under runs_dir (hidden folders and `exclude` skipped) -> [(path relative to
    runs_dir, parsed JSON object)], sorted by path."""
    found = []
    exclude = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(runs_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != exclude)
        if fname in files:
            path = os.path.join(root, fname)
            found.append((os.path.relpath(path, runs_dir), _read_json(path, fname, fix)))
    return found


def _stage(r):
    return r.stage if isinstance(r.stage, int) and not isinstance(r.stage, bool) else None


def is_replay_point(run, replay_ids):
    """A third stage made by replay.py: its run_id is a point of a replay_summary.json, or a point.json lies
    beside its run.json."""
    return run.run_id in replay_ids or os.path.isfile(os.path.join(run.path, "point.json"))


def _copy_key(r):
    """Among copies of one run: the one evaluated on the fewest tasks (the two-stage study's own copy, not a
    long chain's, whose eval.json holds every task of its chain), with eval_val.json, then by name."""
    return (len((r.eval or {}).get("tasks", {})), r.val is None, r.name)


def _closeness(a, b):
    return len(os.path.commonpath([os.path.abspath(a), os.path.abspath(b)]).split(os.sep))


def resolve_parent(run, copies):
    """The run.json `run` was tuned from: the copy with its parent_run_id nearest in the folder tree (most
    leading folders in common with `run`'s), then _copy_key; None when no run.json has that run_id."""
    cs = copies.get(run.parent_run_id) or []
    return min(cs, key=lambda c: (-_closeness(c.path, run.path), _copy_key(c))) if cs else None


@dataclass
class LongChain:
    """A chain of three or more stages: stages[k] is the Run of stage k + 1 (None where it was not found)."""
    end: Run
    stages: list
    problems: list

    chain = property(lambda self: list(self.end.chain))
    seed = property(lambda self: self.end.seed)

    def own(self):
        """The stages stored inside the folder that holds the last stage (the long chain's own copies)."""
        root = os.path.abspath(os.path.dirname(self.end.path)) + os.sep
        return [r for r in self.stages if r is not None and os.path.abspath(r.path).startswith(root)]


def long_chain_lineages(runs, replay_ids, copies):
    """Chains longer than two: every run.json of stage >= 3 of the plain recipe (no mitigation option, not a
    replay point) that is not a stage of a longer such chain, with its stages found by following
    parent_run_id back to stage 1 (resolve_parent: the nearest copy). A stage whose parent is missing, or
    whose parent's chain is not its chain minus the last task, ends the walk with a problem."""
    cands = [r for r in runs if (_stage(r) or 0) >= 3 and not mitigation_of(r.meta)
             and not is_replay_point(r, replay_ids) and isinstance(r.chain, list) and len(r.chain) == r.stage]
    lineages = []
    for end in cands:
        stages, probs, cur = [None] * end.stage, [], end
        stages[-1] = end
        while _stage(cur) and cur.stage > 1:
            p = resolve_parent(cur, copies)
            if p is None:
                probs.append(f"{cur.name}: its stage-{cur.stage - 1} run (parent_run_id {cur.parent_run_id}) has no "
                             f"run.json under the runs folder; stages before {cur.stage} are missing")
                break
            if _stage(p) != cur.stage - 1 or p.chain != cur.chain[:-1]:
                probs.append(f"{cur.name}: its parent {p.name} has chain {p.chain}, not {cur.chain[:-1]}; "
                             f"stages before {cur.stage} are left out")
                break
            stages[p.stage - 1] = p
            cur = p
        lineages.append(LongChain(end, stages, probs))
    inner = {id(r) for lc in lineages for r in lc.stages[:-1] if r is not None}
    return [lc for lc in lineages if id(lc.end) not in inner]


def _lr_key(lr, main):
    return abs(math.log(lr / main)) if lr > 0 and main and main > 0 else float("inf")


def build_study(runs_dir, main_lr=None, exclude=None):
    """Read a runs folder: runs, chained pairs, the main lr, the Table-1 selection and every problem."""
    all_runs, problems = find_runs(runs_dir, exclude, allow_copies=True)
    study_json = {}
    sj = os.path.join(runs_dir, "study.json")
    if os.path.isfile(sj):
        study_json = _read_json(sj, "study.json", "delete it or make it a JSON object (it is optional)")
    # The two-stage study (Table 1 and everything before the replay section) uses plain-recipe first stages
    # and the measured chains (order.is_measured_chain, order.py's definition too): no replay points, no
    # mitigated runs, no stage of a longer chain stored with that chain.
    replay = find_json_files(runs_dir, "replay_summary.json", REPLAY_FIX, exclude)
    replay_ids = {p.get("run_id") for _, s in replay for p in (s.get("points") or []) if isinstance(p, dict)
                  and isinstance(p.get("run_id"), str)}
    copies = defaultdict(list)
    for r in all_runs:
        copies[r.run_id].append(r)
    long_chains = long_chain_lineages(all_runs, replay_ids, copies)
    own = {id(r) for lc in long_chains for r in lc.own()}
    runs = [r for r in all_runs if id(r) not in own and not is_replay_point(r, replay_ids)
            and (not mitigation_of(r.meta) if _stage(r) == 1 else is_measured_chain(r.meta))]
    seen = {}
    for r in runs:
        if r.run_id in seen:
            _duplicate_error(seen[r.run_id], r)
        seen[r.run_id] = r
    parents = dict(seen)
    for r in sorted(all_runs, key=_copy_key):  # a parent stored only with a long chain
        if not mitigation_of(r.meta) and not is_replay_point(r, replay_ids):
            parents.setdefault(r.run_id, r)
    all_pairs, more = pair_runs(runs, parents)
    problems += more
    pairs = [p for p in all_pairs if not p.refused]
    lr_from = "--lr"
    if main_lr is None:
        for key in ("lr", "main_lr"):
            if isinstance(study_json.get(key), (int, float)):
                main_lr, lr_from = float(study_json[key]), f"study.json {key}"
                break
    if main_lr is None and all_pairs:
        counts = Counter(p.lr_b for p in all_pairs)
        main_lr = min(counts, key=lambda lr: (-counts[lr], lr))
        lr_from = "most common second-stage lr"
    tasks = {t for r in runs for t in (r.chain or [r.task]) if isinstance(t, str)}
    capability = [t for t in CAPABILITY_TASKS if t in tasks]
    safety = [t for t in SAFETY_TASKS if t in tasks]
    other = sorted(tasks - set(capability) - set(safety))
    if other:
        problems.append(f"tasks {', '.join(other)} are neither capability nor safety tasks: left out of Table 1")
    seeds = sorted({r.seed for r in runs if isinstance(r.seed, int)})

    # Table-1 selection: per chain and seed, second-stage lr == main lr, best-validated parent.
    table1, marker = {}, {}
    cand = defaultdict(list)
    for p in all_pairs:  # a refused pair still takes its place: no other parent replaces it silently
        if main_lr is not None and math.isclose(p.lr_b, main_lr, rel_tol=1e-9):
            cand[(p.A, p.B, p.seed)].append(p)
    chains = [(a, b) for c in capability for s in safety for a, b in ((c, s), (s, c))]
    chains += sorted({(p.A, p.B) for p in all_pairs} - set(chains))
    for A, B in chains:
        chosen, refused = [], 0
        for seed in seeds:
            c = cand.get((A, B, seed), [])
            if c:
                c.sort(key=lambda p: (-np.nan_to_num(p.first.acc(A, "val"), nan=-1.0),
                                      _lr_key(p.lr_a, main_lr), p.chained.name))
                if c[0].refused:
                    refused += 1
                else:
                    chosen.append(c[0])
            elif A in capability + safety and B in capability + safety:
                problems.append(f"chain {A}->{B} seed {seed}: no usable chained run with second-stage lr "
                                f"{main_lr:g}" if main_lr else f"chain {A}->{B} seed {seed}: no usable chained run")
        if chosen:
            table1[(A, B)] = chosen
        elif refused:
            marker[(A, B)] = INCOMPARABLE
        else:
            failed = any(r.stage == 2 and r.chain == [A, B] and r.problem for r in runs)
            marker[(A, B)] = FAILED if failed else MISSING
    refused_pairs = [p for p in all_pairs if p.refused]
    return Study(runs_dir, runs, pairs, problems, main_lr, lr_from, table1, marker,
                 capability, safety, seeds, study_json, all_runs=all_runs, replay=replay, replay_ids=replay_ids,
                 long_chains=long_chains, copies=dict(copies), refused_pairs=refused_pairs,
                 refused=[p.refused for p in refused_pairs])


# ----------------------------------------------------------------------------------------------------
# writing (atomically)

def _atomic_write(path, write):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".tmp-{os.path.basename(path)}-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text):
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(path, w)


# Columns written in percent (percentage points), with their _std / _ci_low / _ci_high: their headers say "(%)".
PERCENT_COLUMNS = {"cs_acc_cap", "cs_acc_safety", "cs_forgetting_cap", "sc_acc_cap", "sc_acc_safety",
                   "sc_forgetting_safety", "acc_first", "acc_chained", "forgetting", "task_forgetting",
                   "biased_forgetting", "wg_forgetting", "biased_forgetting_max", "rel_forgetting_cap",
                   "rel_forgetting_safety", "acc", "val_acc", "chance", "fraction", "fractions", "acc_a", "acc_b",
                   "forgetting_a", "change_b", "capability_forgetting", "forgetting_at_0", "recovery_fraction",
                   "forgetting_at_recovery", "acc_tuned", "acc_after", "forgetting_xy", "forgetting_yx"}


def unit_header(col):
    """A column's header in CSVs and report tables: "forgetting (%)" for a column in percent, else the name."""
    base = re.sub(r"_(std|ci_low|ci_high)$", "", str(col))
    return f"{col} (%)" if base in PERCENT_COLUMNS or base.startswith("biased_forgetting_top") else str(col)


def write_csv(path, df):
    df = df.rename(columns=unit_header)
    _atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def save_figure(fig, df, out, stem):
    """figure `stem`.png and the data behind it, `stem`.csv."""
    write_csv(os.path.join(out, stem + ".csv"), df)
    _atomic_write(os.path.join(out, stem + ".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                                            bbox_inches="tight"))
    plt.close(fig)


def _r(x, digits=4):
    """A number rounded for a CSV; nan becomes "n/a" (nothing is left blank)."""
    if isinstance(x, (int, float, np.floating)):
        return NA if math.isnan(x) else round(float(x), digits)
    return x


def cells(values, scale=100.0, marker=MISSING):
    """(mean, std) for a table over seeds: mean*scale, std*scale; marker when no value, "n/a" std for one seed."""
    m, s, n = mean_std([v * scale for v in values])
    if n == 0:
        return marker, marker
    return _r(m), (_r(s) if n > 1 else NA)


def markdown_table(df, digits=2):
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return NA if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(map(unit_header, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# tables and figures: one function per output, each returns its part of report.md

def section_table1(study, out, opts):
    """Table 1: per (capability, safety) pair, theta_AB's accuracies and the first task's forgetting in both
    orders (percent, mean and std over seeds)."""
    rows, used = [], []
    for c in study.capability:
        for s in study.safety:
            row = {"capability": c, "safety": s}
            for prefix, (A, B), fkey in (("cs", (c, s), "cs_forgetting_cap"), ("sc", (s, c), "sc_forgetting_safety")):
                ps = study.table1.get((A, B), [])
                mk = study.marker.get((A, B), MISSING)
                acc_c = [p.m["acc_chained_a"] if A == c else p.m["acc_chained_b"] for p in ps]
                acc_s = [p.m["acc_chained_b"] if A == c else p.m["acc_chained_a"] for p in ps]
                row[f"{prefix}_acc_cap"], row[f"{prefix}_acc_cap_std"] = cells(acc_c, marker=mk)
                row[f"{prefix}_acc_safety"], row[f"{prefix}_acc_safety_std"] = cells(acc_s, marker=mk)
                row[fkey], row[fkey + "_std"] = cells([p.m["forgetting"] for p in ps], marker=mk)
                used += [{"first_task": A, "second_task": B, "seed": p.seed, "lr_a": p.lr_a, "lr_b": p.lr_b,
                          "first_run": p.first.name, "chained_run": p.chained.name,
                          "first_run_id": p.first.run_id, "chained_run_id": p.chained.run_id} for p in ps]
            rows.append(row)
    df = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    write_csv(os.path.join(out, "table1.csv"), df)
    write_text(os.path.join(out, "table1.md"), markdown_table(df))
    write_csv(os.path.join(out, "table1_runs.csv"),
              pd.DataFrame(used, columns=["first_task", "second_task", "seed", "lr_a", "lr_b", "first_run",
                                          "chained_run", "first_run_id", "chained_run_id"]))
    lrs = sorted({(p.A, p.B, p.lr_a, p.lr_b) for ps in study.table1.values() for p in ps})
    lr_note = "; ".join(f"{short(a)}->{short(b)} lr_a={la:g} lr_b={lb:g}" for a, b, la, lb in lrs)
    return ("## Table 1: accuracy and forgetting in both orders\n\n"
            "cs = capability -> safety (forgetting of the capability task), sc = safety -> capability "
            "(forgetting of the safety task). Accuracy of theta_AB in percent; mean and std over seeds. "
            "([table1.csv](table1.csv), [table1.md](table1.md); the runs used: [table1_runs.csv](table1_runs.csv))\n\n"
            + markdown_table(df) + f"\nLearning rates used: {lr_note or 'none'}.\n")


def _group_rows(study, opts):
    """Per chain of Table 1 and group: forgetting and biased forgetting (percent) with bootstrap CIs."""
    rows, summary, boot = [], [], {}
    for (A, B), ps in sorted(study.table1.items()):
        f_mean, f_std = cells([p.m["forgetting"] for p in ps])
        ci = None
        if opts.n_boot > 0:
            ci = bootstrap_chain(study, A, ps, opts)
        boot[(A, B)] = ci
        groups = sorted(set().union(*(p.m["group_forgetting"] for p in ps)))
        for g in groups:
            gci = (ci or {}).get("groups", {}).get(g, {})
            bm, bs = cells([p.m["biased"].get(g, float("nan")) for p in ps])
            fm, fs = cells([p.m["group_forgetting"].get(g, float("nan")) for p in ps])
            rows.append({"first_task": A, "second_task": B, "group": g,
                         "n": ps[0].m["group_n"].get(g),
                         "acc_first": cells([p.m["group_acc_first"].get(g, float("nan")) for p in ps])[0],
                         "acc_chained": cells([p.m["group_acc_chained"].get(g, float("nan")) for p in ps])[0],
                         "forgetting": fm, "forgetting_std": fs, "task_forgetting": f_mean,
                         "biased_forgetting": bm, "biased_forgetting_std": bs,
                         "biased_forgetting_ci_low": _r(100 * gci.get("low", float("nan"))),
                         "biased_forgetting_ci_high": _r(100 * gci.get("high", float("nan"))),
                         "n_seeds": len(ps)})
        mean_vec = {g: mean_std([p.m["biased"].get(g, float("nan")) for p in ps])[0] for g in groups}
        fci, bci = (ci or {}).get("forgetting", {}), (ci or {}).get("biased_forgetting_max", {})
        mk = MISSING if groups else NA  # no groups: not applicable, not missing
        wg_m, wg_s = cells([p.m["wg_forgetting"] for p in ps], marker=mk)
        bf_m, bf_s = cells([p.m["biased_max"] for p in ps], marker=mk)
        tk_m, tk_s = cells([biased_forgetting(p.m["group_forgetting"], p.m["forgetting"], opts.k) for p in ps],
                           marker=mk)
        summary.append({"first_task": A, "second_task": B,
                        "lr_a": ";".join(sorted({f"{p.lr_a:g}" for p in ps})), "lr_b": f"{ps[0].lr_b:g}",
                        "n_seeds": len(ps), "n_groups": len(groups),
                        "forgetting": f_mean, "forgetting_std": f_std,
                        "forgetting_ci_low": _r(100 * fci.get("low", float("nan"))),
                        "forgetting_ci_high": _r(100 * fci.get("high", float("nan"))),
                        "wg_forgetting": wg_m, "wg_forgetting_std": wg_s,
                        "worst_group": worst_groups_label(mean_vec, 1),
                        "biased_forgetting_max": bf_m, "biased_forgetting_max_std": bf_s,
                        "biased_forgetting_max_ci_low": _r(100 * bci.get("low", float("nan"))),
                        "biased_forgetting_max_ci_high": _r(100 * bci.get("high", float("nan"))),
                        "k": opts.k, f"biased_forgetting_top{opts.k}": tk_m,
                        f"biased_forgetting_top{opts.k}_std": tk_s,
                        f"worst_{opts.k}_groups": worst_groups_label(mean_vec, opts.k)})
    return rows, summary, boot


def bootstrap_chain(study, A, ps, opts):
    """paired_bootstrap_ci over the test examples of task A shared by every seed's theta_A and theta_AB."""
    per_seed = []
    for p in ps:
        ra, rb = load_samples(p.first), load_samples(p.chained)
        if ra is None or rb is None:
            missing = p.first if ra is None else p.chained
            study.problems.append(f"{missing.name}: no samples file beside eval.json; no bootstrap CI for "
                                  f"{p.A}->{p.B}")
            return None
        try:
            per_seed.append({i: (ca, cb, g) for i, ca, cb, g in zip(*align_samples(ra, rb, A))})
        except ValueError as e:
            study.problems.append(f"{p.first.name} and {p.chained.name}: {e}; no bootstrap CI for {p.A}->{p.B}")
            return None
    ids = sorted(per_seed[0])
    if any(set(d) != set(ids) for d in per_seed[1:]):  # resampling one example set needs the same one per seed
        study.problems.append(f"{A}->{ps[0].B}: the seeds were evaluated on different examples ("
                              + ", ".join(f"seed {p.seed}: {len(d)}" for p, d in zip(ps, per_seed))
                              + "); no bootstrap CI over seeds (evaluate every seed with the same --limit and --seed)")
        return None
    if not ids:
        study.problems.append(f"{A}->{ps[0].B}: the samples files hold no example of {A}; no bootstrap CI")
        return None
    fa = np.array([[d[i][0] for i in ids] for d in per_seed])
    fb = np.array([[d[i][1] for i in ids] for d in per_seed])
    res = paired_bootstrap_ci(fa, fb, [per_seed[0][i][2] for i in ids], n_resamples=opts.n_boot,
                              seed=opts.boot_seed, level=opts.ci, k=opts.k)
    want = np.mean([p.m["forgetting"] for p in ps])
    if abs(res["forgetting"]["estimate"] - want) > 1e-6:
        study.problems.append(f"{A}->{ps[0].B}: the samples files give forgetting "
                              f"{100 * res['forgetting']['estimate']:.2f} but eval.json {100 * want:.2f}; "
                              f"re-run evaluate.py")
    return res


def section_groups(study, out, opts):
    """forgetting_by_group.csv (per group), biased_forgetting.csv (per chain) and kendall_tau.csv."""
    rows, summary, _ = _group_rows(study, opts)
    by_group = pd.DataFrame(rows, columns=["first_task", "second_task", "group", "n", "acc_first", "acc_chained",
                                           "forgetting", "forgetting_std", "task_forgetting",
                                           "biased_forgetting", "biased_forgetting_std",
                                           "biased_forgetting_ci_low", "biased_forgetting_ci_high", "n_seeds"])
    write_csv(os.path.join(out, "forgetting_by_group.csv"), by_group)
    bf = pd.DataFrame(summary)
    if bf.empty:
        bf = pd.DataFrame(columns=["first_task", "second_task", "forgetting", "biased_forgetting_max"])
    write_csv(os.path.join(out, "biased_forgetting.csv"), bf)

    # Kendall's tau-b between the group rankings for the same first task and different second tasks
    kt = []
    vec = {(A, B): {g: mean_std([p.m["biased"].get(g, float("nan")) for p in ps])[0]
                    for g in set().union(*(p.m["biased"] for p in ps))}
           for (A, B), ps in study.table1.items()}
    for A in sorted({a for a, _ in vec}):
        seconds = sorted(b for a, b in vec if a == A and vec[(a, b)])
        for i, b1 in enumerate(seconds):
            for b2 in seconds[i + 1:]:
                tau, pv, n = kendall_tau_b(vec[(A, b1)], vec[(A, b2)])
                kt.append({"first_task": A, "second_task_1": b1, "second_task_2": b2, "n_groups": n,
                           "tau_b": _r(tau), "p_value": _r(pv, 6)})
    kt = pd.DataFrame(kt, columns=["first_task", "second_task_1", "second_task_2", "n_groups", "tau_b", "p_value"])
    write_csv(os.path.join(out, "kendall_tau.csv"), kt)

    cols = ["first_task", "second_task", "n_seeds", "forgetting", "forgetting_ci_low", "forgetting_ci_high",
            "wg_forgetting", "worst_group", "biased_forgetting_max", "biased_forgetting_max_ci_low",
            "biased_forgetting_max_ci_high", f"worst_{opts.k}_groups"]
    grouped = bf[bf["n_groups"] > 0][cols] if "n_groups" in bf else bf
    ci_note = (f"{100 * opts.ci:g}% paired bootstrap CIs over test examples ({opts.n_boot} resamples, "
               f"seed {opts.boot_seed}; columns *_ci_low/high). The max over groups is biased upward by noise, "
               "so its CI can sit above the estimate; a group's own CI (forgetting_by_group.csv) says whether "
               "its gap is noise" if opts.n_boot else "no bootstrap (--n_boot 0)")
    return ("## Biased forgetting\n\nPer chain of Table 1, tasks with groups (percent, mean over seeds; groups tied "
            "for a place are named together, \"a = b (tied)\"; "
            f"{ci_note}). The whole per-group vector is in [forgetting_by_group.csv](forgetting_by_group.csv); "
            "every chain in [biased_forgetting.csv](biased_forgetting.csv).\n\n"
            + (markdown_table(grouped) if len(grouped) else "No chain with a grouped first task.\n")
            + "\n## Kendall's tau-b between group rankings\n\nSame first task, different second tasks, "
            "rankings of the groups' biased forgetting ([kendall_tau.csv](kendall_tau.csv)).\n\n"
            + (markdown_table(kt, 3) if len(kt) else "No first task with groups followed by two second tasks.\n"))


def section_figure2(study, out, opts):
    """Figure 2: relative forgetting (%) of the capability task (cap->safety) and of the safety task
    (safety->cap) for each pair."""
    rows = []
    for c in study.capability:
        for s in study.safety:
            rc = cells([p.m["relative_forgetting"] for p in study.table1.get((c, s), [])],
                       marker=study.marker.get((c, s), MISSING))
            rs = cells([p.m["relative_forgetting"] for p in study.table1.get((s, c), [])],
                       marker=study.marker.get((s, c), MISSING))
            rows.append({"capability": c, "safety": s, "rel_forgetting_cap": rc[0], "rel_forgetting_cap_std": rc[1],
                         "rel_forgetting_safety": rs[0], "rel_forgetting_safety_std": rs[1]})
    df = pd.DataFrame(rows, columns=["capability", "safety", "rel_forgetting_cap", "rel_forgetting_cap_std",
                                     "rel_forgetting_safety", "rel_forgetting_safety_std"])
    num = lambda col: pd.to_numeric(df[col], errors="coerce").fillna(0.0).to_numpy() if len(df) else np.zeros(0)
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(df) + 2), 3.5))
    x = np.arange(len(df))
    ax.bar(x - 0.2, num("rel_forgetting_cap"), 0.4, yerr=num("rel_forgetting_cap_std"), label="capability task",
           color="tab:blue")
    ax.bar(x + 0.2, num("rel_forgetting_safety"), 0.4, yerr=num("rel_forgetting_safety_std"), label="safety task",
           color="tab:orange")
    for col, dx in (("rel_forgetting_cap", -0.2), ("rel_forgetting_safety", 0.2)):
        for xi, v in zip(x, df[col] if len(df) else []):
            if isinstance(v, str):  # a missing or failed cell: say so where the bar would be
                ax.text(xi + dx, 0, v, rotation=90, ha="center", va="bottom", fontsize=8, color="gray")
    ax.set_xticks(x, [f"{short(c)}-{short(s)}" for c, s in zip(df.get("capability", []), df.get("safety", []))])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("relative forgetting (%)")
    ax.set_title("Relative forgetting of the first task (mean over seeds, error bar = std)")
    ax.legend()
    save_figure(fig, df, out, "figure2")
    return ("## Figure 2: relative forgetting\n\n![figure 2](figure2.png)\n\n"
            "Relative forgetting (%) = forgetting / first-task accuracy of theta_A: the capability task in "
            "capability -> safety, the safety task in safety -> capability ([figure2.csv](figure2.csv)).\n")


def section_figure3(study, out, opts):
    """Figure 3: per-group forgetting bars for each safety -> capability chain, dotted line at the task's
    average forgetting."""
    chains = [(s, c) for s in study.safety for c in study.capability
              if any(p.m["group_forgetting"] for p in study.table1.get((s, c), []))]
    rows = []
    for A, B in chains:
        ps = study.table1[(A, B)]
        task_f = cells([p.m["forgetting"] for p in ps])[0]
        for g in sorted(set().union(*(p.m["group_forgetting"] for p in ps))):
            m, s = cells([p.m["group_forgetting"].get(g, float("nan")) for p in ps])
            rows.append({"first_task": A, "second_task": B, "group": g, "forgetting": m, "forgetting_std": s,
                         "task_forgetting": task_f, "n_seeds": len(ps)})
    df = pd.DataFrame(rows, columns=["first_task", "second_task", "group", "forgetting", "forgetting_std",
                                     "task_forgetting", "n_seeds"])
    firsts = [s for s in study.safety if any(a == s for a, _ in chains)]
    seconds = [c for c in study.capability if any(b == c for _, b in chains)]
    if not chains:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no safety -> capability chain with groups", ha="center", va="center")
        ax.axis("off")
    else:
        n_groups = df.groupby(["first_task", "second_task"]).size().max()
        fig, axes = plt.subplots(len(firsts), len(seconds), squeeze=False,
                                 figsize=(4.2 * len(seconds), 0.35 * n_groups * len(firsts) + 1.5))
        for i, A in enumerate(firsts):
            for j, B in enumerate(seconds):
                ax = axes[i][j]
                d = df[(df.first_task == A) & (df.second_task == B)]
                if d.empty:
                    ax.text(0.5, 0.5, study.marker.get((A, B), MISSING), ha="center", va="center")
                    ax.set_title(f"{short(A)} -> {short(B)}")
                    ax.axis("off")
                    continue
                d = d.assign(f=pd.to_numeric(d.forgetting, errors="coerce"),
                             e=pd.to_numeric(d.forgetting_std, errors="coerce").fillna(0)).sort_values("f")
                ax.barh(d.group, d.f, xerr=d.e, color="tab:orange")
                tf = pd.to_numeric(d.task_forgetting, errors="coerce").iloc[0]
                ax.axvline(tf, linestyle=":", color="tab:blue", label=f"task average {tf:.2f}%")
                ax.set_title(f"{short(A)} -> {short(B)}")
                ax.set_xlabel("forgetting (%)")
                ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
    save_figure(fig, df, out, "figure3")
    return ("## Figure 3: forgetting by group (safety -> capability)\n\n![figure 3](figure3.png)\n\n"
            "Bars: per-group forgetting (%); dotted line: the safety task's average forgetting "
            "([figure3.csv](figure3.csv)).\n")


def lr_series(study, which):
    """Forgetting of the first task per learning rate, per chain (percent, mean/std over seeds).
    which = "lr_a": first-stage lr varies, second-stage lr fixed at the main lr.
    which = "lr_b": second-stage lr varies, starting from the same first-stage models as Table 1."""
    rows = []
    for (A, B) in sorted({(p.A, p.B) for p in study.pairs}):
        if which == "lr_a":
            ps = [p for p in study.pairs if (p.A, p.B) == (A, B) and study.main_lr is not None
                  and math.isclose(p.lr_b, study.main_lr, rel_tol=1e-9)]
        else:
            parents = {p.first.run_id for p in study.table1.get((A, B), [])}
            ps = [p for p in study.pairs if (p.A, p.B) == (A, B) and p.first.run_id in parents]
        by_lr = defaultdict(list)
        for p in ps:
            by_lr[getattr(p, which)].append(p.m["forgetting"])
        for lr in sorted(by_lr):
            m, s = cells(by_lr[lr])
            order = ("safety->capability" if A in SAFETY_TASKS and B in CAPABILITY_TASKS
                     else "capability->safety" if A in CAPABILITY_TASKS and B in SAFETY_TASKS else "other")
            rows.append({"first_task": A, "second_task": B, "order": order, which: lr, "forgetting": m,
                         "forgetting_std": s, "n_seeds": len(by_lr[lr])})
    return pd.DataFrame(rows, columns=["first_task", "second_task", "order", which, "forgetting",
                                       "forgetting_std", "n_seeds"])


def _lr_plot(ax, df, which):
    for (A, B), d in df.groupby(["first_task", "second_task"], sort=True):
        y = pd.to_numeric(d.forgetting, errors="coerce")
        e = pd.to_numeric(d.forgetting_std, errors="coerce").fillna(0)
        ax.errorbar(d[which], y, yerr=e, marker="o", capsize=3, label=f"{short(A)} -> {short(B)}")
    ax.set_xscale("log")
    ax.set_xlabel("first-task lr" if which == "lr_a" else "second-task lr")
    ax.set_ylabel("forgetting of the first task (%)")
    if len(df):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)


def section_lr_figures(study, out, opts):
    """Figures 5 and 6 (safety -> capability: forgetting vs first- / second-task lr) and Figure 8 (every
    chain, both orders, both lrs)."""
    sa, sb = lr_series(study, "lr_a"), lr_series(study, "lr_b")
    text = "## Forgetting against learning rate (Figures 5, 6, 8)\n\n"
    for stem, df, which, title in (("figure5", sa[sa.order == "safety->capability"], "lr_a",
                                    "Figure 5: safety -> capability, first-task lr varies"),
                                   ("figure6", sb[sb.order == "safety->capability"], "lr_b",
                                    "Figure 6: safety -> capability, second-task lr varies")):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        _lr_plot(ax, df, which)
        ax.set_title(title)
        save_figure(fig, df, out, stem)
        n_lr = df.groupby(["first_task", "second_task"])[which].nunique().max() if len(df) else 0
        note = "" if n_lr and n_lr > 1 else " (no learning-rate sweep found in these runs: one point per chain)"
        text += f"### {title}{note}\n\n![{stem}]({stem}.png) ([{stem}.csv]({stem}.csv))\n\n"
    both = pd.concat([sa.rename(columns={"lr_a": "lr"}).assign(varied="lr_a"),
                      sb.rename(columns={"lr_b": "lr"}).assign(varied="lr_b")], ignore_index=True)
    both = both[["varied", "first_task", "second_task", "order", "lr", "forgetting", "forgetting_std", "n_seeds"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, which, d in ((axes[0], "lr_a", sa), (axes[1], "lr_b", sb)):
        _lr_plot(ax, d, which)
    axes[0].set_title("(a) by first-task lr")
    axes[1].set_title("(b) by second-task lr")
    save_figure(fig, both, out, "figure8")
    text += "### Figure 8: every chain, both orders\n\n![figure8](figure8.png) ([figure8.csv](figure8.csv))\n\n"
    if study.main_lr:
        text += (f"Second-stage lr held at the main lr ({study.main_lr:g}) in (a); in (b) the first-stage models "
                 "are those of Table 1.\n")
    return text


def section_first_task_acc(study, out, opts):
    """The appendix's table: first-task (theta_A) test accuracy per learning rate (and validation accuracy)."""
    groups = defaultdict(list)
    for r in study.runs:
        if r.stage == 1 and not r.problem:
            groups[(r.task, r.lr)].append(r)
    used = Counter(p.first.run_id for ps in study.table1.values() for p in ps)
    rows = []
    for (task, lr), rs in sorted(groups.items()):
        a, a_s = cells([r.acc(task) for r in rs])
        v, v_s = cells([r.acc(task, "val") for r in rs], marker=NA)
        rows.append({"task": task, "lr": lr, "acc": a, "acc_std": a_s, "val_acc": v, "val_acc_std": v_s,
                     "n_seeds": len(rs), "chained_runs_in_table1": sum(used[r.run_id] for r in rs)})
    df = pd.DataFrame(rows, columns=["task", "lr", "acc", "acc_std", "val_acc", "val_acc_std", "n_seeds",
                                     "chained_runs_in_table1"])
    write_csv(os.path.join(out, "first_task_acc_by_lr.csv"), df)
    write_text(os.path.join(out, "first_task_acc_by_lr.md"), markdown_table(df.assign(lr=df.lr.map("{:g}".format))))
    return ("## First-task accuracy per learning rate\n\nTest (and validation) accuracy of theta_A in percent, "
            "mean over seeds ([first_task_acc_by_lr.csv](first_task_acc_by_lr.csv)).\n\n"
            + markdown_table(df.assign(lr=df.lr.map("{:g}".format))))


CHANCE_COLUMNS = ["run", "chain", "seed", "task", "n", "acc", "chance", "at_chance", "why"]


def section_chance(study, out, opts):
    """chance.csv: every accuracy of the two-stage study's evaluations with its chance level (chance_flag), and
    the list of those at chance level: a forgetting or a group ranking read from them says little."""
    rows, unchecked = [], []
    for r in study.runs:
        if r.problem or not r.eval:
            continue
        recs = load_samples(r)
        if recs is None:
            unchecked.append(r.name)
            continue
        for task, block in sorted(r.eval["tasks"].items()):
            rt = [x for x in recs if x.get("task") == task]
            if not rt:
                continue
            chance, why = chance_flag(block["acc"], rt)
            rows.append({"run": r.name, "chain": "->".join(r.chain), "seed": r.seed, "task": task, "n": len(rt),
                         "acc": _r(100 * float(block["acc"])), "chance": _r(100 * chance), "at_chance": why is not None,
                         "why": why or NA})
    head = "## Accuracies at chance level\n\n"
    if not rows:
        return head + "No samples files beside the eval.json files: chance level not checked.\n"
    df = pd.DataFrame(rows, columns=CHANCE_COLUMNS)
    write_csv(os.path.join(out, "chance.csv"), df)
    flagged = df[df.at_chance]
    text = head + (f"Rule: an accuracy is at chance when every prediction picked the same option (collapsed), or when "
                   f"it lies within {CHANCE_SE:g} binomial standard errors, {CHANCE_SE:g} sqrt(c (1 - c) / n), of "
                   "c = the mean over its examples of 1 / (number of options), the accuracy of a uniform guess. "
                   f"{len(flagged)} of {len(df)} accuracies of the two-stage study are at chance "
                   "([chance.csv](chance.csv)); forgetting and group rankings of these models are mostly noise.\n\n")
    if len(flagged):
        text += markdown_table(flagged.drop(columns=["at_chance"]))
    if unchecked:
        text += f"\nNot checked (no samples file): {', '.join(unchecked)}.\n"
    return text


# ----------------------------------------------------------------------------------------------------
# curvature (paper §4.3, Figure 4) and the Taylor check (equations 3 and 4)

CURV_FIX = "it must be the curvature.json written by curvature.py; delete it and re-run curvature.py"
TAYLOR_FIX = "it must be the taylor.json written by curvature.py --reference; delete it and re-run curvature.py"


def ols_fit(x, y):
    """Ordinary least squares y = intercept + slope * x (scipy.stats.linregress), with n points:

        slope     = S_xy / S_xx,   intercept = mean(y) - slope * mean(x)
        R^2       = S_xy^2 / (S_xx S_yy)  (= r^2 = 1 - SS_res / SS_tot)
        p_value   = two-sided p of t = r sqrt((n - 2) / (1 - r^2)) under Student's t with n - 2 dof
                    (the null hypothesis slope = 0)
    where S_xy = sum (x_i - mean x)(y_i - mean y). Pairs with a nan are dropped. With fewer than 3 points
    (no residual degree of freedom) or constant x the fit is not defined: every value is nan and "note" says
    why. Returns {"n", "slope", "intercept", "r", "r_squared", "p_value", "slope_stderr", "note"}."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    res = {"n": int(len(x)), "slope": float("nan"), "intercept": float("nan"), "r": float("nan"),
           "r_squared": float("nan"), "p_value": float("nan"), "slope_stderr": float("nan"), "note": ""}
    if len(x) < 3:
        res["note"] = f"fewer than 3 points ({len(x)}): no fit"
        return res
    if np.all(x == x[0]):
        res["note"] = "all x values are equal: no fit"
        return res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # perfect fits: scipy divides by zero for the stderr
        r = stats.linregress(x, y)
    res.update(slope=float(r.slope), intercept=float(r.intercept), r=float(r.rvalue),
               r_squared=float(r.rvalue) ** 2, p_value=float(r.pvalue), slope_stderr=float(r.stderr))
    return res


def _num(v):
    """A JSON number as float; None, booleans, strings and missing values are nan."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _v(x):
    """A value for a CSV at full precision (curvatures and losses span many orders of magnitude): nan is
    "n/a", booleans and strings pass through."""
    if isinstance(x, (float, np.floating)) and not isinstance(x, bool):
        return NA if math.isnan(x) else float(x)
    return x


def _sig(df):
    """df with its float cells as 4 significant digits (for report.md tables of values of any scale)."""
    return df.apply(lambda col: col.map(lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) and
                                        not math.isnan(v) else v))


def find_curvature_files(runs_dir, exclude=None):
    """Every curvature.json and taylor.json under runs_dir (hidden folders and `exclude` skipped) ->
    (curvature, taylor): lists of (path relative to runs_dir, parsed JSON object), sorted by path.
    Folder names are not parsed: the files are paired to runs by their run_id fields."""
    found = {"curvature.json": [], "taylor.json": []}
    exclude = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(runs_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != exclude)
        for fname, fix in (("curvature.json", CURV_FIX), ("taylor.json", TAYLOR_FIX)):
            if fname in files:
                path = os.path.join(root, fname)
                found[fname].append((os.path.relpath(path, runs_dir), _read_json(path, fname, fix)))
    return found["curvature.json"], found["taylor.json"]


@dataclass
class Curvature:
    """One curvature.json paired (by run_id) with the run.json of the model it was computed at."""
    file: str                  # path relative to --runs
    data: dict
    run: Run = None            # None when no run.json has its run_id
    used: bool = False         # the one result taken for its run (see curvature_results)

    rho = property(lambda self: _num(self.data.get("rho")))
    converged = property(lambda self: self.data.get("converged") is True)


def curvature_results(curv_files, runs):
    """Pair curvature.json files to runs by run_id -> ({run_id: Curvature used for that run}, all, problems).

    A file is usable when its run_id matches a run.json, its "task" (if given) is that run's task and its
    "rho" is a number. Several usable files for one run (say a lanczos and a power solve): the one used is
    the converged one, then lanczos, then the first path; the others stay in curvature.csv (used = False)."""
    by_id = {r.run_id: r for r in runs}
    allc, problems, cand = [], [], defaultdict(list)
    for name, data in curv_files:
        c = Curvature(name, data)
        allc.append(c)
        rid = data.get("run_id")
        if not isinstance(rid, str) or not rid:
            problems.append(f"{name}: no run_id (curvature of a model without run.json?); cannot pair it with a "
                            f"run, left out")
            continue
        c.run = by_id.get(rid)
        if c.run is None:
            problems.append(f"{name}: its run_id {rid} matches no run.json under the runs folder; left out")
        elif data.get("task") not in (None, c.run.task):
            problems.append(f"{name}: curvature of the {data.get('task')} loss but run {c.run.name} was tuned on "
                            f"{c.run.task}; left out")
        elif math.isnan(c.rho):
            problems.append(f"{name}: no numeric rho ({data.get('rho')!r}); re-run curvature.py")
        else:
            cand[rid].append(c)
    chosen = {}
    for rid, cs in cand.items():
        cs.sort(key=lambda c: (not c.converged, c.data.get("method") != "lanczos", c.file))
        cs[0].used = True
        chosen[rid] = cs[0]
    return chosen, allc, problems


def first_task_models(study, curv_by_id):
    """The theta_A models whose curvature Figure 4 shows: {(task, seed): [Run, ...]}.

    For a first task and seed with chains in Table 1: the first-stage runs those chains start from (the
    models whose forgetting Table 1 and Figure 4b measure). Otherwise the first-stage runs of that task and
    seed at the lr closest to the main lr (without a main lr: the most common lr of the curvature results)."""
    sel = defaultdict(dict)
    for (A, _), ps in study.table1.items():
        for p in ps:
            sel[(A, p.seed)][p.first.run_id] = p.first
    ref_lr = study.main_lr
    if ref_lr is None:
        lrs = Counter(c.run.lr for c in curv_by_id.values() if c.run.stage == 1)
        ref_lr = min(lrs, key=lambda lr: (-lrs[lr], lr)) if lrs else None
    stage1 = defaultdict(list)
    for r in study.runs:
        if r.stage == 1 and isinstance(r.seed, int) and not run_failed(r.meta):
            stage1[(r.task, r.seed)].append(r)
    for key, rs in stage1.items():
        if key in sel:
            continue
        best = min(_lr_key(r.lr, ref_lr) for r in rs)
        if math.isinf(best):  # no reference lr at all: nothing sensible to pick
            continue
        sel[key] = {r.run_id: r for r in rs if _lr_key(r.lr, ref_lr) == best}
    return {k: list(v.values()) for k, v in sel.items()}


def taylor_rows(taylor_files, runs, curv_by_id):
    """One row per taylor.json: the paper's equations 3 and 4 checked at theta_A for the chain A->B,

        delta = theta_AB - theta_A,   actual = L_A(theta_AB) - L_A(theta_A)
        quadratic = 0.5 delta^T H delta   (eq. 3, H the Hessian of L_A at theta_A)
        bound     = 0.5 rho(H) ||delta||^2   (eq. 4)

    Pairing by run_id: reference.run_id is theta_AB's run.json run_id (its chain gives A, B, seed, lr_b),
    the file's run_id is theta_A's and must equal theta_AB's parent_run_id (when absent, the parent is
    used). When the file has no numeric rho (computed without a solve) or no numeric bound, the bound is
    recomputed as 0.5 * rho * delta_sq_norm with rho from the curvature.json of the same theta_A (found by
    run_id in curv_by_id; bound_source says which). quadratic_le_bound is quadratic <= bound * (1 + 1e-6)
    + 1e-12 (curvature.py's tolerance); actual_le_bound is actual <= bound.
    Returns (rows: list of dicts, problems: list of str)."""
    by_id = {r.run_id: r for r in runs}
    rows, problems = [], []
    for name, data in taylor_files:
        ref = data.get("reference")
        if not isinstance(ref, dict):
            problems.append(f"{name}: no \"reference\" block (not a Taylor check); {TAYLOR_FIX}")
            continue
        chained = by_id.get(ref.get("run_id"))
        if chained is None or chained.stage != 2 or not isinstance(chained.chain, list):
            why = ("matches no run.json" if chained is None else f"is the stage-{chained.stage} run {chained.name}")
            problems.append(f"{name}: reference run_id {ref.get('run_id')} {why}, not a chained run; left out")
            continue
        first_id = data.get("run_id") or chained.parent_run_id
        if first_id != chained.parent_run_id:
            problems.append(f"{name}: theta_A run_id {first_id} is not the parent ({chained.parent_run_id}) of "
                            f"{chained.name}; delta is not this chain's update, left out")
            continue
        A, B = chained.chain
        first = by_id.get(first_id)
        rho, bound = _num(data.get("rho")), _num(ref.get("bound"))
        dsq = _num(ref.get("delta_sq_norm"))
        source = "taylor.json"
        if math.isnan(rho) or math.isnan(bound):
            c = curv_by_id.get(first_id) if math.isnan(rho) else None
            if math.isnan(rho) and c is None:
                problems.append(f"{name}: no rho in the file and no curvature.json for its theta_A (run_id "
                                f"{first_id}); bound not computed")
                source = MISSING
            else:
                rho = c.rho if c is not None else rho
                bound = 0.5 * rho * dsq
                source = f"recomputed: 0.5 * rho({c.file}) * delta_sq_norm" if c is not None else \
                    "recomputed: 0.5 * rho(taylor.json) * delta_sq_norm"
        quad, actual = _num(ref.get("quadratic_term")), _num(ref.get("actual_loss_change"))
        have = not (math.isnan(bound) or math.isnan(quad))
        rows.append({"first_task": A, "second_task": B, "seed": chained.seed,
                     "lr_a": first.lr if first is not None else float("nan"), "lr_b": chained.lr,
                     "first_run_id": first_id, "chained_run_id": chained.run_id,
                     "delta_sq_norm": dsq, "loss_A_at_A": _num(ref.get("loss_A_at_A")),
                     "loss_A_at_AB": _num(ref.get("loss_A_at_AB")), "actual_loss_change": actual,
                     "quadratic_term": quad, "rho": rho, "bound": bound, "bound_source": source,
                     "quadratic_le_bound": (bool(quad <= bound * (1 + 1e-6) + 1e-12) if have else MISSING),
                     "actual_le_bound": (bool(actual <= bound) if not (math.isnan(bound) or math.isnan(actual))
                                         else MISSING),
                     "file": name})
    return rows, problems


def curvature_tables(study, curv_by_id):
    """Per first task: rho over seeds (Figure 4a) and its mean downstream forgetting (Figure 4b).

    rho of a task = mean over seeds of rho(theta_A) (theta_A from first_task_models; several models for one
    seed are averaged first), std over seeds (ddof=1). Downstream forgetting of A = for each seed the mean
    forgetting over the Table-1 chains A->B (second-stage lr = main lr), then mean and std over seeds.
    Returns (rows_a, rows_b, missing: [(task, seed, Run)], not_converged: [Curvature])."""
    models = first_task_models(study, curv_by_id)
    tasks = list(study.capability) + list(study.safety)
    tasks += sorted({t for t, _ in models} - set(tasks))
    rows_a, rows_b, missing, not_conv = [], [], [], []
    for A in tasks:
        per_seed, lrs, n_nc = {}, set(), 0
        for s in sorted(seed for t, seed in models if t == A):
            vals = []
            for r in models[(A, s)]:
                c = curv_by_id.get(r.run_id)
                if c is None:
                    missing.append((A, s, r))
                    continue
                vals.append(c.rho)
                lrs.add(r.lr)
                if not c.converged:
                    n_nc += 1
                    not_conv.append(c)
            if vals:
                per_seed[s] = float(np.mean(vals))
        kind = "capability" if A in CAPABILITY_TASKS else "safety" if A in SAFETY_TASKS else "other"
        m, sd, n = mean_std(list(per_seed.values()))
        mk = MISSING
        rows_a.append({"task": A, "kind": kind, "rho": _v(m) if n else mk, "rho_std": (_v(sd) if n > 1 else NA)
                       if n else mk, "n_seeds": n, "seeds": ";".join(map(str, sorted(per_seed))) or NA,
                       "lr": ";".join(f"{lr:g}" for lr in sorted(lrs)) or NA, "n_not_converged": n_nc})
        ps = [p for (a, _), pl in study.table1.items() if a == A for p in pl]
        by_seed = defaultdict(list)
        for p in ps:
            by_seed[p.seed].append(p.m["forgetting"])
        fm, fs, fn = mean_std([float(np.mean(v)) for v in by_seed.values()])
        fm, fs = (100 * fm, 100 * fs) if fn else (fm, fs)
        rows_b.append({"first_task": A, "kind": kind, "rho": rows_a[-1]["rho"], "rho_std": rows_a[-1]["rho_std"],
                       "n_rho_seeds": n,
                       "forgetting": _r(fm) if fn else mk, "forgetting_std": (_r(fs) if fn > 1 else NA) if fn else mk,
                       "n_forgetting_seeds": fn, "chains": ";".join(sorted({f"{p.A}->{p.B}" for p in ps})) or NA,
                       "in_fit": bool(n and fn)})
    return rows_a, rows_b, missing, not_conv


CURVATURE_COLUMNS = ["task", "seed", "lr", "run_id", "rho", "lambda_max", "lambda_min", "converged", "iterations",
                     "hvp_count", "method", "residual", "stage", "run", "file", "used_in_figure4"]


def section_curvature(study, out, opts):
    """Curvature (Figure 4) and the Taylor check: curvature.csv, figure4a/b.png+csv, curvature_fit.csv,
    taylor_check.csv. Nothing is written (and the section says so) when the runs folder has no
    curvature.json and no taylor.json."""
    curv_files, taylor_files = find_curvature_files(study.runs_dir, getattr(opts, "out", None))
    head = "## Curvature (Figure 4) and the Taylor check\n\n"
    if not curv_files and not taylor_files:
        return head + ("No curvature results: no curvature.json or taylor.json under the runs folder, so no "
                       "Figure 4 and no Taylor check (curvature.py writes them; run_all.sh runs it).\n")
    curv_by_id, allc, probs = curvature_results(curv_files, study.runs)
    study.problems.extend(probs)
    text = head
    if curv_files:
        text += _curvature_figures(study, out, curv_by_id, allc)
    else:
        text += "No curvature results (no curvature.json under the runs folder): no Figure 4.\n\n"
    rows, probs = taylor_rows(taylor_files, study.runs, curv_by_id)
    study.problems.extend(probs)
    text += _taylor_section(study, out, rows, bool(taylor_files))
    return text


def _curvature_figures(study, out, curv_by_id, allc):
    rows_a, rows_b, missing, not_conv = curvature_tables(study, curv_by_id)
    used_ids = {r.run_id for rs in first_task_models(study, curv_by_id).values() for r in rs}
    tab = []
    for c in allc:
        d, r = c.data, c.run
        tab.append({"task": r.task if r else d.get("task", NA), "seed": r.seed if r else NA,
                    "lr": r.lr if r else NA, "run_id": d.get("run_id") or NA, "rho": _v(c.rho),
                    "lambda_max": _v(_num(d.get("lambda_max"))), "lambda_min": _v(_num(d.get("lambda_min"))),
                    "converged": d.get("converged") if isinstance(d.get("converged"), bool) else "unknown",
                    "iterations": d.get("iterations", NA), "hvp_count": d.get("hvp_count", NA),
                    "method": d.get("method", NA), "residual": _v(_num(d.get("residual"))),
                    "stage": r.stage if r else NA, "run": r.name if r else NA, "file": c.file,
                    "used_in_figure4": bool(c.used and r is not None and r.run_id in used_ids)})
    for A, s, r in missing:
        study.problems.append(f"{r.name}: no curvature.json for this first-stage model (task {A}, seed {s}, "
                              f"run_id {r.run_id}); run curvature.py --model {r.path} --task {A} --out "
                              f"<runs>/curvature/{A}/lr{r.lr:g}/seed{s}/curvature.json")
        tab.append({"task": A, "seed": s, "lr": r.lr, "run_id": r.run_id, **{k: MISSING for k in CURVATURE_COLUMNS[4:12]},
                    "stage": r.stage, "run": r.name, "file": MISSING, "used_in_figure4": False})
    tab.sort(key=lambda t: (str(t["task"]), str(t["seed"]), str(t["lr"]), t["file"]))
    cdf = pd.DataFrame(tab, columns=CURVATURE_COLUMNS)
    write_csv(os.path.join(out, "curvature.csv"), cdf)

    colour = {"capability": "tab:blue", "safety": "tab:orange", "other": "tab:gray"}
    da = pd.DataFrame(rows_a, columns=["task", "kind", "rho", "rho_std", "n_seeds", "seeds", "lr", "n_not_converged"])
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(da) + 2), 3.6))
    x = np.arange(len(da))
    for xi, row in zip(x, da.itertuples()):
        if isinstance(row.rho, str):
            ax.text(xi, 0, row.rho, rotation=90, ha="center", va="bottom", fontsize=8, color="gray")
            continue
        err = row.rho_std if not isinstance(row.rho_std, str) else 0.0
        ax.bar(xi, row.rho, 0.6, yerr=err, capsize=3, color=colour[row.kind],
               hatch="//" if row.n_not_converged else None, edgecolor="black" if row.n_not_converged else None)
    handles = [Patch(color=colour[k], label=f"{k} task") for k in ("capability", "safety")
               if (da.kind == k).any()]
    if (da.n_not_converged > 0).any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                                                label="includes a non-converged solve"))
    if handles:
        ax.legend(handles=handles, fontsize=8)
    ax.set_xticks(x, [short(t) for t in da.task])
    ax.set_ylabel("spectral radius rho(H)")
    ax.set_title("Figure 4a: first-task minimum curvature (mean over seeds, error bar = std)")
    save_figure(fig, da, out, "figure4a")

    db = pd.DataFrame(rows_b, columns=["first_task", "kind", "rho", "rho_std", "n_rho_seeds", "forgetting",
                                       "forgetting_std", "n_forgetting_seeds", "chains", "in_fit"])
    pts = db[db.in_fit]
    xs = pts.rho.astype(float).to_numpy()
    ys = pts.forgetting.astype(float).to_numpy()
    fit = ols_fit(xs, ys)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    err = lambda col: pd.to_numeric(pts[col], errors="coerce").fillna(0.0).to_numpy()
    for kind in ("capability", "safety", "other"):
        k = (pts.kind == kind).to_numpy()
        if k.any():
            ax.errorbar(xs[k], ys[k], xerr=err("rho_std")[k], yerr=err("forgetting_std")[k], fmt="o", capsize=3,
                        color=colour[kind], label=f"{kind} task")
    for xi, yi, t in zip(xs, ys, pts.first_task):
        ax.annotate(short(t), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not math.isnan(fit["slope"]):
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(grid, fit["intercept"] + fit["slope"] * grid, "k--", linewidth=1,
                label=f"OLS: R^2 = {fit['r_squared']:.2f}, p = {fit['p_value']:.3g}")
    else:
        ax.text(0.5, 0.92, fit["note"], ha="center", transform=ax.transAxes, fontsize=8, color="gray")
    ax.set_xlabel("first-task spectral radius rho(H)")
    ax.set_ylabel("mean downstream forgetting (%)")
    ax.set_title("Figure 4b: forgetting against first-task curvature")
    if len(pts):
        ax.legend(fontsize=8)
    save_figure(fig, db, out, "figure4b")
    fit_df = pd.DataFrame([{"x": "rho (mean over seeds)", "y": "mean downstream forgetting (%)",
                            "n_tasks": fit["n"], "tasks": ";".join(pts.first_task) or NA,
                            "slope": _v(fit["slope"]), "intercept": _v(fit["intercept"]),
                            "r": _v(fit["r"]), "r_squared": _v(fit["r_squared"]),
                            "p_value": _v(fit["p_value"]), "slope_stderr": _v(fit["slope_stderr"]),
                            "note": fit["note"] or NA}])
    write_csv(os.path.join(out, "curvature_fit.csv"), fit_df)

    text = ("Spectral radius rho(H) = max(|lambda_max|, |lambda_min|) of the Hessian of the first-task loss at "
            "theta_A (curvature.py, HVPs on its training samples), paired to runs by run_id. The theta_A of a "
            "first task and seed are the first-stage models its Table-1 chains start from (else the first-stage "
            "runs at the main lr). All results: [curvature.csv](curvature.csv); per task "
            "([figure4a.csv](figure4a.csv)):\n\n" + markdown_table(_sig(da)))
    if not_conv:
        text += ("\n**Not converged** (rho is the solver's last estimate; hatched bars): "
                 + "; ".join(f"{c.file} ({c.run.task}, seed {c.run.seed}, {c.data.get('iterations', '?')} "
                             f"iterations, stop {c.data.get('stop_reason', '?')})" for c in not_conv) + ".\n")
    else:
        text += "\nEvery curvature result used here converged.\n"
    seen = {id(c) for c in not_conv}
    other_nc = [c for c in allc if not c.converged and id(c) not in seen]
    if other_nc:
        text += ("\nAlso not converged (not in Figure 4; converged = False in curvature.csv): "
                 + ", ".join(c.file for c in other_nc) + ".\n")
    if missing:
        text += ("\n**Missing curvature** (cells marked missing; listed under missing runs): "
                 + "; ".join(f"{r.name} ({A}, seed {s})" for A, s, r in missing) + ".\n")
    extra = [c for c in allc if c.run is not None and not c.used and math.isfinite(c.rho)]
    if extra:
        text += ("\nSeveral results for one model: used the converged / lanczos one; not used: "
                 + ", ".join(c.file for c in extra) + ".\n")
    text += ("\n![figure 4a](figure4a.png)\n\n### Figure 4b: mean downstream forgetting against first-task rho\n\n"
             "Per first task: forgetting averaged over its Table-1 chains for each seed, then mean (std) over "
             "seeds; rho mean (std) over seeds ([figure4b.csv](figure4b.csv)).\n\n![figure 4b](figure4b.png)\n\n")
    if math.isnan(fit["slope"]):
        n_tasks = fit["n"]
        text += (f"OLS fit: none. {n_tasks} first task(s) have both curvature and forgetting "
                 f"({', '.join(pts.first_task) or 'none'}); a fit needs at least 3 ({fit['note']}).\n")
    else:
        text += (f"OLS fit over {fit['n']} first tasks (forgetting % = {fit['intercept']:.4g} + {fit['slope']:.4g} "
                 f"* rho): slope {fit['slope']:.4g}, R^2 = {fit['r_squared']:.3f}, p = {fit['p_value']:.3g} "
                 f"([curvature_fit.csv](curvature_fit.csv)). The paper reports p <= 0.01, R^2 = 0.85 "
                 "(6 tasks, Llama-2-7B).\n")
    return text + "\n"


TAYLOR_COLUMNS = ["first_task", "second_task", "seed", "lr_a", "lr_b", "delta_sq_norm", "loss_A_at_A", "loss_A_at_AB",
                  "actual_loss_change", "quadratic_term", "rho", "bound", "quadratic_le_bound", "actual_le_bound",
                  "bound_source", "first_run_id", "chained_run_id", "file"]


def _taylor_section(study, out, rows, any_files):
    text = "### Taylor check (equations 3 and 4)\n\n"
    if not any_files:
        return text + "No taylor.json under the runs folder (curvature.py --reference writes it): no Taylor check.\n"
    df = pd.DataFrame([{k: _v(v) for k, v in r.items()} for r in rows],
                      columns=TAYLOR_COLUMNS)
    write_csv(os.path.join(out, "taylor_check.csv"), df)
    text += ("Per chain and seed, at theta_A: actual = L_A(theta_AB) - L_A(theta_A), quadratic = "
             "0.5 delta^T H delta (eq. 3), bound = 0.5 rho(H) ||delta||^2 (eq. 4), delta = theta_AB - theta_A "
             "([taylor_check.csv](taylor_check.csv)).\n\n")
    if not rows:
        return text + "No taylor.json could be paired with a chained run (see the problems above).\n"
    show = df[["first_task", "second_task", "seed", "lr_b", "delta_sq_norm", "actual_loss_change", "quadratic_term",
               "bound", "quadratic_le_bound", "actual_le_bound"]]
    text += markdown_table(_sig(show))
    q = [r["quadratic_le_bound"] for r in rows if isinstance(r["quadratic_le_bound"], bool)]
    a = [r["actual_le_bound"] for r in rows if isinstance(r["actual_le_bound"], bool)]
    text += (f"\nquadratic <= bound in {sum(q)} of {len(q)}; actual loss change <= bound in {sum(a)} of {len(a)} "
             "(the bound holds for the quadratic term by construction; the actual change also carries the "
             "higher-order terms and theta_A's nonzero gradient).\n")
    rec = [r for r in rows if r["bound_source"].startswith("recomputed")]
    if rec:
        text += (f"\n{len(rec)} bound(s) recomputed from the first-stage curvature.json (taylor.json without a "
                 "solve): " + "; ".join(f"{r['file']}" for r in rec) + ".\n")
    nob = [r for r in rows if r["bound_source"] == MISSING]
    if nob:
        text += "\nNo bound (no rho anywhere): " + "; ".join(r["file"] for r in nob) + ".\n"
    return text


# ----------------------------------------------------------------------------------------------------
# replay as a third stage (paper §5 and appendix 9.4: Figure 7, Figures 11-14)

REPLAY_COLUMNS = ["chain", "first_task", "second_task", "seed", "sweep", "fraction", "steps", "n_examples", "acc_a",
                  "acc_b", "forgetting_a", "change_b", "capability_forgetting", "a_examples_presented",
                  "a_examples_seen", "forgetting_source", "n_eval_a", "file"]
REPLAY_VALUES = ["acc_a", "acc_b", "forgetting_a", "change_b", "capability_forgetting"]
RECOVERY_TOL = 0.01  # "within 1 point": forgetting of A at most 0.01 (fraction units)
# replay.py before the units rule wrote "fraction" in percent, and its "units" string said so in these words
OLD_PERCENT_UNITS = re.compile(r"fraction is a percent", re.IGNORECASE)


def chain_name(tasks):
    return "->".join(tasks)


def _first_copy(study, run_id):
    cs = study.copies.get(run_id) or []
    return min(cs, key=_copy_key) if cs else None


def replay_rows(study):
    """One row per point of every replay_summary.json under --runs (fractions, not percent) -> (rows, problems).

    "fraction" is the share of A's training set in [0, 1]; a summary whose "units" string says it is a percent
    (replay.py before the units rule) is converted, one without a "units" string is left out (its unit cannot
    be told), and a point outside [0, 1] is left out, each with a problem.

    chain A->B and seed: the summary's task_a / task_b, the seed of its theta_AB run.json (model_run_id), else
    settings.seed. forgetting_a: the summary's (acc_A(theta_A) - acc_A(point)); when null and theta_A (the
    parent of theta_AB) has an eval.json holding A, acc_A(theta_A) comes from there (forgetting_source says
    which; the point's eval.json, in the summary's folder under the point's name, must be comparable with
    theta_A's, order.incomparable, else the forgetting is "incomparable").
    capability_forgetting = acc_B(theta_AB, the untrained 0 point) - acc_B(point) = -change_b.
    A-examples of a trained point: presented = steps * batch_size (settings.batch_size; the stage draws
    that many, in seeded epochs of its n_examples), seen = min(presented, n_examples) (distinct examples of A
    the stage read); 0 for an untrained point. Points made with other settings (settings_match false) are
    left out with a problem; a second summary of the same chain and seed is left out with a problem."""
    rows, problems, seen_keys = [], [], {}
    for name, s in study.replay:
        A, B, pts = s.get("task_a"), s.get("task_b"), s.get("points")
        if not isinstance(A, str) or not isinstance(B, str) or not isinstance(pts, list):
            problems.append(f"{name}: no task_a / task_b / points; {REPLAY_FIX}")
            continue
        settings = s.get("settings") if isinstance(s.get("settings"), dict) else {}
        model = _first_copy(study, s.get("model_run_id"))
        seed = model.seed if model is not None and isinstance(model.seed, int) else settings.get("seed")
        if not isinstance(seed, int):
            problems.append(f"{name}: its theta_AB (run_id {s.get('model_run_id')}) has no run.json under the runs "
                            f"folder and the summary names no seed; seed unknown")
            seed = NA
        key = (A, B, seed)
        if key in seen_keys:
            problems.append(f"{name}: a second replay summary of {A}->{B} seed {seed} (the first is "
                            f"{seen_keys[key]}); left out")
            continue
        units = s.get("units")
        if not isinstance(units, str):
            problems.append(f'{name}: no "units" string, so whether its "fraction" is a share in [0, 1] or a percent '
                            f"cannot be told; left out; {REPLAY_FIX}")
            continue
        per = 100.0 if OLD_PERCENT_UNITS.search(units) else 1.0  # what "fraction" is divided by
        if per != 1.0:
            study.cache.setdefault("replay_percent", []).append(name)
        seen_keys[key] = name
        bs = settings.get("batch_size")
        bs = bs if isinstance(bs, int) and not isinstance(bs, bool) else None
        ref = _num((s.get("first_stage") or {}).get("acc_a")) if isinstance(s.get("first_stage"), dict) else float("nan")
        fallback, parent = float("nan"), None
        if math.isnan(ref) and model is not None:
            parent = resolve_parent(model, study.copies)
            if parent is not None and parent.eval and A in parent.eval["tasks"]:
                fallback = parent.acc(A)
        good = [p for p in pts if isinstance(p, dict) and p.get("settings_match") is not False
                and isinstance(p.get("acc_a"), (int, float)) and isinstance(p.get("acc_b"), (int, float))]
        bad = [p for p in pts if p not in good]
        if bad:
            problems.append(f"{name}: {len(bad)} point(s) made with other settings or without accuracies left out "
                            f"({', '.join(str(p.get('name', '?')) if isinstance(p, dict) else '?' for p in bad)}); "
                            f"re-run replay.py")
        outside = [p for p in good if not 0 <= _num(p.get("fraction")) / per <= 1]
        if outside:
            problems.append(f"{name}: fraction {', '.join(str(p.get('fraction')) for p in outside)} not in [0, 1] "
                            f"(units: {units!r}); those points left out; {REPLAY_FIX}")
            good = [p for p in good if p not in outside]
        zero = [p for p in good if p.get("trained") is False or (p.get("steps") == 0)]
        zero_b = float(zero[0]["acc_b"]) if zero else float("nan")
        missing_f = False
        for p in good:
            trained = p.get("trained") if isinstance(p.get("trained"), bool) else bool(p.get("steps"))
            steps = int(p.get("steps") or 0) if trained else 0
            n_ex = int(p.get("n_examples") or 0) if trained else 0
            fa, src = _num(p.get("forgetting_a")), "replay_summary"
            if math.isnan(fa):
                if not math.isnan(fallback):
                    why = _point_incomparable(study, name, p, A, parent)
                    if why:
                        study.refused.append(f"replay point {name} {p.get('name')}: forgetting of {A} left out, "
                                             f"its evaluation and theta_A's cannot be compared: {why}")
                        src = INCOMPARABLE
                    else:
                        fa, src = fallback - float(p["acc_a"]), "theta_A eval.json"
                else:
                    src, missing_f = MISSING, True
            cb = _num(p.get("change_b"))
            capf = 0.0 - cb if not math.isnan(cb) else zero_b - float(p["acc_b"])
            presented = (steps * bs if bs else float("nan")) if trained else 0
            rows.append({"chain": chain_name([A, B]), "first_task": A, "second_task": B, "seed": seed,
                         "sweep": p.get("sweep", NA), "fraction": _num(p.get("fraction")) / per,
                         "steps": steps,
                         "n_examples": n_ex, "acc_a": float(p["acc_a"]), "acc_b": float(p["acc_b"]),
                         "forgetting_a": fa, "change_b": 0.0 - capf, "capability_forgetting": capf,
                         "a_examples_presented": presented,
                         "a_examples_seen": (min(presented, n_ex) if not math.isnan(presented) else float("nan"))
                         if trained else 0, "forgetting_source": src, "n_eval_a": p.get("n_eval_a", NA),
                         "file": name})
        if missing_f:
            problems.append(f"{name}: no forgetting of {A} (the summary has no first-stage reference and theta_A's "
                            f"eval.json was not found); re-run replay.py with --first_stage")
    return rows, problems


def _point_incomparable(study, name, point, A, parent):
    """Why a replay point's evaluation of A (eval.json in the summary's folder, under the point's name) cannot
    be paired with theta_A's (order.incomparable), or None. Without that file nothing says it can."""
    d = os.path.join(os.path.dirname(name), str(point.get("name")))
    path = os.path.join(study.runs_dir, d, "eval.json")
    if not os.path.isfile(path):
        return f"{d}/eval.json is missing, so its data source, split and examples are unknown"
    ev = _read_json(path, "eval.json", EVAL_FIX)
    _check_eval_json(path, ev)
    return incomparable(A, evaluation(parent), Evaluation(d, os.path.dirname(path), ev))


def _int_if_whole(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _x(row):
    return row["fraction"] if row["sweep"] == "fraction" else row["steps"]


def _pct(fraction):
    """A share in [0, 1] as the percent a table shows: 0.05 -> 5, not 5.000000000000001."""
    return _int_if_whole(round(100 * fraction, 9)) if isinstance(fraction, float) else fraction


def replay_means(rows):
    """Mean and std over seeds per chain, sweep and point (percent, fraction and x of the fraction sweep too;
    A-example counts as they are)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["first_task"], r["second_task"], r["sweep"], _x(r))].append(r)
    out = []
    for (A, B, sweep, x), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]), kv[0][3])):
        row = {"chain": chain_name([A, B]), "first_task": A, "second_task": B, "sweep": sweep,
               "x": _pct(x) if sweep == "fraction" else x, "fraction": _pct(rs[0]["fraction"]),
               "steps": rs[0]["steps"], "n_seeds": len(rs),
               "seeds": ";".join(str(r["seed"]) for r in rs)}
        for q in REPLAY_VALUES:
            refused = q == "forgetting_a" and all(r["forgetting_source"] == INCOMPARABLE for r in rs)
            row[q], row[q + "_std"] = cells([r[q] for r in rs], marker=INCOMPARABLE if refused else NA)
        row["a_examples_seen"] = _r(mean_std([r["a_examples_seen"] for r in rs])[0], 1)
        out.append(row)
    cols = ["chain", "first_task", "second_task", "sweep", "x", "fraction", "steps", "n_seeds", "seeds"]
    cols += [c for q in REPLAY_VALUES for c in (q, q + "_std")] + ["a_examples_seen"]
    return pd.DataFrame(out, columns=cols)


def recovery_fraction(fractions, forgetting, tol=RECOVERY_TOL):
    """The smallest replay fraction whose forgetting of A is at most `tol` (0.01: within 1 point of theta_A's
    accuracy, or above it: over-recovery counts as recovered). fractions in percent, forgetting in fraction
    units (nan: not measured, skipped). Returns the fraction, or None when no point qualifies."""
    ok = [f for f, v in zip(fractions, forgetting) if v is not None and not math.isnan(v) and v <= tol + 1e-12]
    return min(ok) if ok else None


def _plot_sweeps(df, col, ylabel, title, zero_line):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, sweep, xl, sub in ((axes[0], "fraction", "share of A's training data in the third stage (%)", "(a)"),
                               (axes[1], "steps", "third-stage optimisation steps (all of A's data)", "(b)")):
        d = df[df.sweep == sweep]
        for chain, g in d.groupby("chain", sort=True):
            y = pd.to_numeric(g[col], errors="coerce")
            e = pd.to_numeric(g[col + "_std"], errors="coerce").fillna(0)
            a, b = chain.split("->")
            ax.errorbar(g.x, y, yerr=e, marker="o", capsize=3, label=f"{short(a)} -> {short(b)}")
        if d.empty:
            ax.text(0.5, 0.5, f"no {sweep} sweep", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7)
        if zero_line:
            ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{sub} against {'replay fraction' if sweep == 'fraction' else 'steps'}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


REPLAY_FIGURES = [("figure7", "forgetting_a", "forgetting of the safety task A (%)",
                   "Figure 7: forgetting of A after a third stage on A (A -> B -> A)", True),
                  ("figure11", "acc_a", "safety task (A) accuracy (%)", "Figure 11: safety task accuracy after the "
                   "third stage", False),
                  ("figure12", "forgetting_a", "safety task (A) forgetting (%)", "Figure 12: safety task forgetting "
                   "after the third stage", True),
                  ("figure13", "acc_b", "capability task (B) accuracy (%)", "Figure 13: capability task accuracy "
                   "after the third stage", False),
                  ("figure14", "capability_forgetting", "capability task (B) forgetting (%)",
                   "Figure 14: capability task forgetting after the third stage", True)]


def _replay_data(study):
    if "replay" not in study.cache:
        rows, probs = replay_rows(study)
        study.problems.extend(probs)
        study.cache["replay"] = rows
    return study.cache["replay"]


def section_replay(study, out, opts):
    """replay.csv (per chain, seed and point), replay_mean.csv, figure7 and figure11-14 (.png + .csv),
    replay_recovery.csv. Nothing is written (the section says so) without a replay_summary.json."""
    head = "## Replay as a third stage (Figure 7; appendix Figures 11-14)\n\n"
    if not study.replay:
        return head + ("No replay results: no replay_summary.json under the runs folder (replay.py writes it; "
                       "run_all.sh runs it for every safety -> capability chain), so no Figure 7, no Figures "
                       "11-14 and no recovery fraction.\n")
    rows = _replay_data(study)
    def cell(r, k, v):
        if k == "forgetting_a" and r["forgetting_source"] == INCOMPARABLE:
            return INCOMPARABLE
        if k in REPLAY_VALUES:
            return _r(100 * v)
        return _pct(v) if k == "fraction" else _v(v) if k.startswith("a_examples") else v
    df = pd.DataFrame([{k: cell(r, k, v) for k, v in r.items()} for r in rows], columns=REPLAY_COLUMNS)
    write_csv(os.path.join(out, "replay.csv"), df)
    means = replay_means(rows)
    write_csv(os.path.join(out, "replay_mean.csv"), means)
    for stem, col, ylabel, title, zero in REPLAY_FIGURES:
        d = means[["chain", "first_task", "second_task", "sweep", "x", col, col + "_std", "n_seeds"]]
        save_figure(_plot_sweeps(d, col, ylabel, title, zero), d, out, stem)
    rec = []
    for (A, B), g in means[means.sweep == "fraction"].groupby(["first_task", "second_task"], sort=True):
        fr = g.fraction.astype(float).tolist()
        fo = [v / 100 if not isinstance(v, str) else float("nan") for v in g.forgetting_a]
        f = recovery_fraction(fr, fo)
        zero = [v for x, v in zip(fr, g.forgetting_a) if x == 0]
        have = any(not math.isnan(v) for v in fo)
        at = [v for x, v in zip(fr, g.forgetting_a) if f is not None and x == f]
        rec.append({"first_task": A, "second_task": B, "n_seeds": int(g.n_seeds.max()),
                    "forgetting_at_0": zero[0] if zero else MISSING,
                    "recovery_fraction": (f"{f:g}" if f is not None else "none") if have else MISSING,
                    "forgetting_at_recovery": at[0] if at else NA,
                    "fractions": ";".join(f"{x:g}" for x in fr),
                    "rule": f"smallest fraction with mean forgetting of A <= {100 * RECOVERY_TOL:g} point"})
    rec = pd.DataFrame(rec, columns=["first_task", "second_task", "n_seeds", "forgetting_at_0", "recovery_fraction",
                                     "forgetting_at_recovery", "fractions", "rule"])
    write_csv(os.path.join(out, "replay_recovery.csv"), rec)
    chains = sorted({(r["first_task"], r["second_task"]) for r in rows})
    seeds = sorted({str(r["seed"]) for r in rows})
    text = head + (f"{len(study.replay)} replay summaries, chains {', '.join(chain_name(c) for c in chains) or 'none'}, "
                   f"seeds {', '.join(seeds) or 'none'}. From theta_AB (after A -> B) a third stage tunes A again on "
                   "a share of its training data for a fixed number of steps (fraction sweep) or on all of it for a "
                   "number of steps (steps sweep); the 0 point is theta_AB itself. Forgetting of A = acc_A(theta_A) "
                   "- acc_A(point); capability forgetting = acc_B(theta_AB) - acc_B(point). Percent, mean (std) "
                   "over seeds; evaluated with replay.py's settings. Per point and seed: [replay.csv](replay.csv); "
                   "means: [replay_mean.csv](replay_mean.csv).\n\n")
    text += ("### Smallest replay fraction that recovers A\n\nThe smallest fraction whose mean forgetting of A is at "
             f"most {100 * RECOVERY_TOL:g} point (within 1 point of theta_A's accuracy, or above it), \"none\" when no "
             "fraction gets there ([replay_recovery.csv](replay_recovery.csv)).\n\n")
    text += markdown_table(rec.drop(columns=["rule"])) + "\n"
    for stem, _, _, title, _ in REPLAY_FIGURES:
        text += f"### {title}\n\n![{stem}]({stem}.png) ([{stem}.csv]({stem}.csv))\n\n"
    srcs = Counter(r["forgetting_source"] for r in rows)
    old = study.cache.get("replay_percent")
    if old:
        text += (f"{len(old)} summaries from an older replay.py give the replay fraction in percent (their \"units\" "
                 f"say so); read as such: {', '.join(old)}.\n\n")
    if srcs.get(INCOMPARABLE):
        text += (f"{srcs[INCOMPARABLE]} point(s) whose forgetting of A would pair evaluations that cannot be compared "
                 "are marked incomparable (see the refused pairs above).\n\n")
    if srcs.get("theta_A eval.json"):
        text += (f"{srcs['theta_A eval.json']} point(s) without a first-stage reference in their summary: forgetting "
                 "from theta_A's eval.json (its evaluation settings may differ from the replay points').\n")
    return text


# ----------------------------------------------------------------------------------------------------
# mitigations of the second stage compared with third-stage replay

MITIGATION_COLUMNS = ["first_task", "second_task", "method", "setting", "n_seeds", "seeds", "forgetting_a",
                      "forgetting_a_std", "acc_b", "acc_b_std", "extra_steps", "a_examples_seen",
                      "a_examples_presented", "fisher_samples", "n_eval_a", "runs"]


def _method_of(meta, A, B):
    """(method, setting, sort key) of a mitigated second stage from its run.json config."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    on = mitigation_of(meta)
    names, sets, key = [], [], []
    if "replay_fraction" in on:
        t = cfg.get("replay_task")
        names.append("mix" if t == A else f"mix({t})")
        sets.append(f"{100 * on['replay_fraction']:g}% of each batch from {t}")
        key.append((1, on["replay_fraction"]))
    if "l2_to_init" in on:
        names.append("l2")
        sets.append(f"lambda {on['l2_to_init']:g}")
        key.append((2, on["l2_to_init"]))
    if "ewc" in on:
        t = cfg.get("ewc_task")
        names.append("ewc" if t == A else f"ewc({t})")
        sets.append(f"lambda {on['ewc']:g}, Fisher on {t}")
        key.append((3, on["ewc"]))
    if "train_fraction" in on:
        names.append("train_fraction")
        sets.append(f"{100 * float(on['train_fraction']):g}% of {B}")
        key.append((4, float(on["train_fraction"])))
    return "+".join(names), "; ".join(sets), tuple(key)


def mitigation_rows(study):
    """Per chain A->B and seed: the plain chain of Table 1, every mitigated second stage (run.json config:
    replay_fraction / l2_to_init / ewc > 0, train_fraction set) and every trained third-stage replay point,
    with forgetting of A and accuracy of B (fractions) and their cost -> (rows, problems).

    Forgetting of a mitigated run = acc_A(theta_A) - acc_A(run), theta_A its parent (parent_run_id), both
    from eval.json. Cost, counted against the plain chain A->B of the same seed (Table 1):
      extra_steps      optimisation steps beyond the plain chain's second stage: steps - plain steps for a
                       mitigated second stage (0 when it has the same --steps), the third stage's steps for
                       a replay point;
      a_examples_presented  examples of A in training batches: for mixing, run.json replay.examples_replayed
                       (else floor(F * batch_size * steps + 1/2), finetune.py's count); for a replay point,
                       steps * batch_size; 0 for L2 and EWC;
      a_examples_seen  distinct examples of A read: min(presented, pool) (mixing: replay.n_pool; replay point:
                       its n_examples), plus for EWC the N samples of its Fisher estimate (these need A's
                       data though no optimisation step sees them); 0 for L2 and the plain chain.
    Chains with neither a mitigated run nor a replay summary are not listed."""
    rows, problems = [], []
    plain = {(p.A, p.B, p.seed): p for ps in study.table1.values() for p in ps}
    for r in study.all_runs:
        if _stage(r) != 2 or not mitigation_of(r.meta) or is_replay_point(r, study.replay_ids) or r.problem:
            continue
        A, B = r.chain
        parent = resolve_parent(r, study.copies)
        if parent is None or parent.problem or not parent.eval or A not in parent.eval["tasks"]:
            problems.append(f"{r.name}: its first-stage run (parent_run_id {r.parent_run_id}) "
                            + ("has no run.json under the runs folder" if parent is None else
                               f"{parent.name} has no usable eval.json holding {A}") + "; left out of mitigation.csv")
            continue
        if A not in r.eval["tasks"] or B not in r.eval["tasks"]:
            problems.append(f"{r.name}/eval.json has no result for {A if A not in r.eval['tasks'] else B}; re-run "
                            f"evaluate.py --tasks {A},{B}")
        why = incomparable(A, evaluation(parent), evaluation(r)) if A in r.eval["tasks"] else None
        if why:
            study.refused.append(refusal(A, B, why) + " (mitigation)")
        method, setting, key = _method_of(r.meta, A, B)
        cfg = r.meta.get("config") or {}
        steps, bs = r.meta.get("steps"), cfg.get("batch_size")
        p = plain.get((A, B, r.seed))
        extra = (steps - p.chained.meta.get("steps")) if p is not None and isinstance(steps, int) \
            and isinstance(p.chained.meta.get("steps"), int) else float("nan")
        presented = seen = fisher = 0
        on = mitigation_of(r.meta)
        if "replay_fraction" in on:
            rep = r.meta.get("replay") if isinstance(r.meta.get("replay"), dict) else {}
            presented = rep.get("examples_replayed")
            if not isinstance(presented, int):
                presented = (math.floor(on["replay_fraction"] * bs * steps + 0.5)
                             if isinstance(bs, int) and isinstance(steps, int) else float("nan"))
            pool = rep.get("n_pool")
            seen = min(presented, pool) if isinstance(pool, int) else presented
        if "ewc" in on:
            reg = r.meta.get("regularisation") if isinstance(r.meta.get("regularisation"), dict) else {}
            fi = reg.get("fisher") if isinstance(reg.get("fisher"), dict) else {}
            fisher = fi.get("n_samples", cfg.get("ewc_samples", float("nan")))
            seen = seen + fisher
        note = "" if p is None or p.first.run_id == parent.run_id else \
            f"theta_A {parent.name} is not Table 1's ({p.first.name})"
        if note:
            problems.append(f"{r.name}: {note}; forgetting measured from its own theta_A")
        rows.append({"first_task": A, "second_task": B, "seed": r.seed, "method": method, "setting": setting,
                     "key": (1,) + key, "refused": why,
                     "forgetting_a": float("nan") if why else forgetting(parent.acc(A), r.acc(A)), "acc_b": r.acc(B),
                     "extra_steps": extra, "a_examples_seen": seen, "a_examples_presented": presented,
                     "fisher_samples": fisher, "n_eval_a": r.eval["tasks"].get(A, {}).get("n", NA), "run": r.name})
    chains = {(x["first_task"], x["second_task"]) for x in rows}
    for x in _replay_data(study):
        if x["a_examples_seen"] == 0 and x["steps"] == 0:
            continue  # the untrained point is theta_AB
        chains.add((x["first_task"], x["second_task"]))
        sweep = x["sweep"]
        setting = (f"fraction {_pct(x['fraction']):g}%, {x['steps']} steps" if sweep == "fraction"
                   else f"{x['steps']} steps, all data")
        rows.append({"first_task": x["first_task"], "second_task": x["second_task"], "seed": x["seed"],
                     "method": f"replay ({sweep} sweep)", "setting": setting,
                     "key": (2 if sweep == "fraction" else 3, _x(x)), "forgetting_a": x["forgetting_a"],
                     "refused": x["forgetting_source"] == INCOMPARABLE or None,
                     "acc_b": x["acc_b"], "extra_steps": x["steps"], "a_examples_seen": x["a_examples_seen"],
                     "a_examples_presented": x["a_examples_presented"], "fisher_samples": 0,
                     "n_eval_a": x["n_eval_a"], "run": x["file"]})
    for (A, B) in sorted(chains):
        for p in study.table1.get((A, B), []):
            rows.append({"first_task": A, "second_task": B, "seed": p.seed, "method": "plain",
                         "setting": "Table 1 chain", "key": (0,), "forgetting_a": p.m["forgetting"],
                         "acc_b": p.m["acc_chained_b"], "extra_steps": 0, "a_examples_seen": 0,
                         "a_examples_presented": 0, "fisher_samples": 0,
                         "n_eval_a": p.chained.eval["tasks"][A].get("n", NA), "run": p.chained.name})
    return rows, problems


def mitigation_table(rows):
    """Mean (std) over seeds per chain, method and setting (percent; costs as mean counts)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["first_task"], r["second_task"], r["key"], r["method"], r["setting"])].append(r)
    out = []
    for (A, B, _, method, setting), rs in sorted(groups.items(), key=lambda kv: kv[0][:3]):
        f, fs = cells([r["forgetting_a"] for r in rs],
                      marker=INCOMPARABLE if all(r.get("refused") for r in rs) else MISSING)
        b, bsd = cells([r["acc_b"] for r in rs], marker=MISSING)
        cost = {k: _int_if_whole(_r(mean_std([_num(r[k]) for r in rs])[0], 1))
                for k in ("extra_steps", "a_examples_seen", "a_examples_presented", "fisher_samples")}
        n_eval = sorted({str(r["n_eval_a"]) for r in rs})
        out.append({"first_task": A, "second_task": B, "method": method, "setting": setting, "n_seeds": len(rs),
                    "seeds": ";".join(str(r["seed"]) for r in sorted(rs, key=lambda r: str(r["seed"]))),
                    "forgetting_a": f, "forgetting_a_std": fs, "acc_b": b, "acc_b_std": bsd, **cost,
                    "n_eval_a": ";".join(n_eval), "runs": ";".join(r["run"] for r in rs)})
    return pd.DataFrame(out, columns=MITIGATION_COLUMNS)


def _f(v, unit=""):
    return f"{v:.2f}{unit}" if isinstance(v, (int, float, np.floating)) and not math.isnan(v) else str(v)


def matched_cost(df):
    """Sentences comparing, per chain, each mitigation with the third-stage replay point (fraction sweep)
    whose A-examples seen are closest to it (ties: fewer extra steps, then the smaller fraction); L2 (no data
    of A) with the plain chain. df: mitigation_table."""
    lines = []
    for (A, B), g in df.groupby(["first_task", "second_task"], sort=True):
        plain = g[g.method == "plain"]
        rep = g[g.method == "replay (fraction sweep)"]
        rep = rep[rep.a_examples_seen.map(lambda v: isinstance(v, (int, float)) and not math.isnan(v))]
        others = g[~g.method.isin(["plain", "replay (fraction sweep)", "replay (steps sweep)"])]
        pl = (f"plain chain: forgetting of {A} {_f(plain.forgetting_a.iloc[0])}, {B} accuracy "
              f"{_f(plain.acc_b.iloc[0])}" if len(plain) else "plain chain: missing")
        head = f"- **{A} -> {B}** ({pl})."
        if others.empty:
            lines.append(head + " No mitigated second stage for this chain.")
            continue
        parts = []
        for m in others.itertuples():
            desc = (f"{m.method} ({m.setting}): forgetting {_f(m.forgetting_a)}, {B} {_f(m.acc_b)}, "
                    f"{_f(m.a_examples_seen)} A-examples seen, {_f(m.extra_steps)} extra steps")
            seen = m.a_examples_seen if isinstance(m.a_examples_seen, (int, float)) else float("nan")
            if m.method.startswith("l2") and seen == 0:
                ref = plain
                parts.append(desc + ("; against the plain chain (same cost in A-data): forgetting "
                                     f"{_f(ref.forgetting_a.iloc[0])}" if len(ref) else "; no plain chain to compare"))
                continue
            if rep.empty or math.isnan(seen):
                parts.append(desc + "; no third-stage replay point to match")
                continue
            d = rep.assign(_d=(rep.a_examples_seen.astype(float) - seen).abs(),
                           _e=pd.to_numeric(rep.extra_steps, errors="coerce"))
            best = d.sort_values(["_d", "_e"], kind="stable").iloc[0]
            better = (isinstance(m.forgetting_a, float) and isinstance(best.forgetting_a, float)
                      and not math.isnan(m.forgetting_a) and not math.isnan(best.forgetting_a))
            verdict = ("" if not better else "; the mitigation forgets less" if m.forgetting_a < best.forgetting_a
                       else "; replay forgets less" if m.forgetting_a > best.forgetting_a else "; equal forgetting")
            parts.append(desc + f"; replay at matched cost ({best.setting}: {_f(best.a_examples_seen)} A-examples "
                         f"seen, {_f(best.extra_steps)} extra steps): forgetting {_f(best.forgetting_a)}, {B} "
                         f"{_f(best.acc_b)}{verdict}")
        lines.append(head + "\n" + "\n".join(f"  - {x}." for x in parts))
    return "\n".join(lines) + "\n"


MARKERS = {"plain": ("o", "black"), "mix": ("s", "tab:blue"), "l2": ("^", "tab:green"), "ewc": ("v", "tab:red")}


def section_mitigation(study, out, opts):
    """mitigation.csv/.png (mean per chain and method), mitigation_runs.csv (per seed) and a matched-cost
    comparison. Nothing is written without a mitigated run or a replay summary."""
    head = "## Mitigations compared: mixing, L2, EWC and third-stage replay\n\n"
    rows, probs = mitigation_rows(study)
    study.problems.extend(probs)
    if not any(r["method"] != "plain" for r in rows):
        return head + ("No mitigation results: no second stage with replay mixing, L2 or EWC (finetune.py "
                       "--replay_task/--replay_fraction, --l2_to_init, --ewc) and no replay summary under the runs "
                       "folder.\n")
    per_seed = pd.DataFrame([{k: (INCOMPARABLE if k == "forgetting_a" and r.get("refused") else
                                  _r(100 * v) if k in ("forgetting_a", "acc_b") else _v(v))
                              for k, v in r.items() if k not in ("key", "refused")} for r in rows],
                            columns=["first_task", "second_task", "seed", "method", "setting", "forgetting_a", "acc_b",
                                     "extra_steps", "a_examples_seen", "a_examples_presented", "fisher_samples",
                                     "n_eval_a", "run"])
    write_csv(os.path.join(out, "mitigation_runs.csv"), per_seed)
    df = mitigation_table(rows)
    chains = list(df.groupby(["first_task", "second_task"], sort=True))
    fig, axes = plt.subplots(1, len(chains), figsize=(5.2 * len(chains), 4), squeeze=False)
    for ax, ((A, B), g) in zip(axes[0], chains):
        num = lambda s: pd.to_numeric(s, errors="coerce")
        for sweep, style in (("replay (fraction sweep)", "x--"), ("replay (steps sweep)", "+:")):
            d = g[g.method == sweep].sort_values("a_examples_seen", key=num)
            if len(d):
                ax.plot(num(d.a_examples_seen), num(d.forgetting_a), style, color="tab:purple", label=sweep)
        for m in g[~g.method.str.startswith("replay")].itertuples():
            mk, colour = MARKERS.get(m.method.split("(")[0].split("+")[0], ("D", "tab:gray"))
            ax.errorbar(_num(m.a_examples_seen), _num(m.forgetting_a),
                        yerr=_num(m.forgetting_a_std) if isinstance(m.forgetting_a_std, float) else None,
                        fmt=mk, color=colour, capsize=3, label=f"{m.method} ({m.setting})")
        ax.set_xscale("symlog", linthresh=10)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("examples of A seen (distinct)")
        ax.set_ylabel(f"forgetting of {short(A)} (%)")
        ax.set_title(f"{short(A)} -> {short(B)}")
        ax.legend(fontsize=6)
    fig.suptitle("Forgetting of the first task against the data of it each mitigation uses")
    fig.tight_layout()
    save_figure(fig, df, out, "mitigation")
    return (head + "Per chain A -> B: the plain chain of Table 1, second stages with a mitigation (from the same "
            "theta_A, found by run.json config: mixing A's data into B's batches, L2 pull to theta_A, EWC) and the "
            "trained third-stage replay points. Forgetting of A and accuracy of B in percent, mean (std) over "
            "seeds. Cost: extra optimisation steps beyond the plain chain; A-examples seen = distinct examples of A "
            "read (mixing: those replayed, at most A's training set; replay point: min(steps x batch size, its "
            "subset); EWC: the Fisher samples; L2: none); presented = A-examples in training batches, repeats "
            "counted. Replay points are evaluated with replay.py's settings (n_eval_a). "
            "([mitigation.csv](mitigation.csv), per seed: [mitigation_runs.csv](mitigation_runs.csv))\n\n"
            + markdown_table(df.drop(columns=["seeds", "runs"])) + "\n![mitigation](mitigation.png)\n\n"
            "### At matched cost\n\n" + matched_cost(df))


# ----------------------------------------------------------------------------------------------------
# chains longer than two

CHAIN_COLUMNS = ["chain", "seed", "lrs", "task", "tuned_at_stage", "after_stage", "after_task", "acc_tuned",
                 "acc_after", "forgetting", "run_tuned", "run_after"]


def chain_forgetting_rows(long_chains):
    """For every long chain and seed, the forgetting of every earlier task after every later stage (fractions):
    forgetting = acc_T(after the stage k that tuned T) - acc_T(after stage j), j > k, both from the eval.json
    of those stages. A task tuned again later is counted from its last tuning: the rows of stage k stop
    before the next stage that tunes T. Two evaluations of T that cannot be compared (order.incomparable) give
    no forgetting: the row's "refused" says why. -> (rows, problems)."""
    rows, problems = [], []
    for lc in long_chains:
        problems.extend(lc.problems)
        chain, st = lc.chain, lc.stages
        lrs = ";".join(f"{r.lr:g}" if r is not None and not r.problem else "?" for r in st)
        for k, T in enumerate(chain, 1):
            nxt = next((m for m in range(k + 1, len(chain) + 1) if chain[m - 1] == T), len(chain) + 1)
            rk = st[k - 1]
            for j in range(k + 1, nxt):
                rj = st[j - 1]
                vals = []
                for r in (rk, rj):
                    if r is None or r.problem or not r.eval or T not in r.eval["tasks"]:
                        if r is not None and r.eval and T not in r.eval["tasks"]:
                            problems.append(f"{r.name}/eval.json has no result for {T} (long chain "
                                            f"{chain_name(chain)}); re-run evaluate.py with every task of the chain")
                        vals.append(float("nan"))
                    else:
                        vals.append(r.acc(T))
                why = None
                if not any(math.isnan(v) for v in vals):
                    why = incomparable(T, evaluation(rk), evaluation(rj))
                rows.append({"chain": chain_name(chain), "seed": lc.seed, "lrs": lrs, "task": T, "tuned_at_stage": k,
                             "after_stage": j, "after_task": chain[j - 1], "acc_tuned": vals[0], "acc_after": vals[1],
                             "forgetting": float("nan") if why else vals[0] - vals[1], "refused": why,
                             "run_tuned": rk.name if rk is not None else MISSING,
                             "run_after": rj.name if rj is not None else MISSING})
    return rows, sorted(set(problems), key=problems.index)


def section_long_chains(study, out, opts):
    """chain_forgetting.csv (per chain, seed, task and later stage), figure_chain_forgetting.png/.csv (mean over
    seeds). Nothing is written without a chain longer than two."""
    head = "## Chains longer than two\n\n"
    if not study.long_chains:
        return head + ("No long chains: no run.json of stage 3 or more (other than replay points) under the runs "
                       "folder.\n")
    rows, probs = chain_forgetting_rows(study.long_chains)
    study.problems.extend(probs)
    study.refused += [f"long chain {r['chain']} seed {r['seed']}: forgetting of {r['task']} after stage "
                      f"{r['after_stage']} left out, its evaluations cannot be compared: {r['refused']}"
                      for r in rows if r["refused"]]
    df = pd.DataFrame([{k: (INCOMPARABLE if k == "forgetting" and r["refused"] else
                            _r(100 * v) if k in ("acc_tuned", "acc_after", "forgetting") else v)
                        for k, v in r.items()} for r in rows], columns=CHAIN_COLUMNS)
    write_csv(os.path.join(out, "chain_forgetting.csv"), df)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["chain"], r["lrs"], r["tuned_at_stage"], r["task"], r["after_stage"], r["after_task"])].append(r)
    mean = []
    for (c, lrs, k, T, j, tj), rs in groups.items():
        m, s = cells([r["forgetting"] for r in rs], marker=INCOMPARABLE if all(r["refused"] for r in rs) else MISSING)
        mean.append({"chain": c, "lrs": lrs, "task": T, "tuned_at_stage": k, "after_stage": j, "after_task": tj,
                     "forgetting": m, "forgetting_std": s, "n_seeds": sum(not math.isnan(r["forgetting"]) for r in rs),
                     "seeds": ";".join(str(r["seed"]) for r in rs)})
    mean = pd.DataFrame(mean, columns=["chain", "lrs", "task", "tuned_at_stage", "after_stage", "after_task",
                                       "forgetting", "forgetting_std", "n_seeds", "seeds"])
    chains = list(mean.groupby(["chain", "lrs"], sort=True))
    fig, axes = plt.subplots(1, max(1, len(chains)), figsize=(5 * max(1, len(chains)), 3.8), squeeze=False)
    for ax, ((c, lrs), g) in zip(axes[0], chains):
        for (k, T), d in g.groupby(["tuned_at_stage", "task"], sort=True):
            ax.errorbar(d.after_stage, pd.to_numeric(d.forgetting, errors="coerce"),
                        yerr=pd.to_numeric(d.forgetting_std, errors="coerce").fillna(0), marker="o", capsize=3,
                        label=f"{short(T)} (stage {k})")
        tasks = c.split("->")
        ax.set_xticks(range(1, len(tasks) + 1), [f"{i}: {short(t)}" for i, t in enumerate(tasks, 1)])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("after stage")
        ax.set_ylabel("forgetting (%)")
        ax.set_title(" -> ".join(short(t) for t in tasks) + (f" (lr {lrs})" if len(chains) > 1 else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, mean, out, "figure_chain_forgetting")
    seeds = sorted({str(lc.seed) for lc in study.long_chains})
    return (head + f"{len(study.long_chains)} long chain(s) (seeds {', '.join(seeds)}). Forgetting of task T after "
            "stage j = acc_T after the stage that tuned T - acc_T after stage j, in percent, mean (std) over seeds "
            "([chain_forgetting.csv](chain_forgetting.csv) per seed, [figure_chain_forgetting.csv]"
            "(figure_chain_forgetting.csv)). Stages are found by parent_run_id from each chain's last stage.\n\n"
            + markdown_table(mean.drop(columns=["seeds"])) + "\n![chain forgetting](figure_chain_forgetting.png)\n")


# ----------------------------------------------------------------------------------------------------
# curvature-guided task order

ORDER_COLUMNS = ["task_x", "task_y", "rho_x", "rho_y", "recommended", "forgetting_xy", "n_xy", "forgetting_yx",
                 "n_yx", "less_forgetting", "agrees", "agrees_order_json"]


def measured_chains(study, lr2=None):
    """order.measured_forgetting over every run.json of the runs folder (copies resolved as order.find_runs
    does): the measured chains order.py checks, so report.md and order.py agree on them -> (measured, problems)."""
    runs = {}
    for r in sorted(study.all_runs, key=_copy_key):
        runs.setdefault(r.run_id, {"path": r.path, "name": r.name, "run": r.meta, "eval": r.eval})
    return order.measured_forgetting(runs, lr2)


def find_order_json(runs_dir):
    for rel in (os.path.join("results", "order.json"), "order.json"):
        p = os.path.join(runs_dir, rel)
        if os.path.isfile(p):
            return rel, _read_json(p, "order.json", "it must be the JSON order.py --out writes; delete it or re-run "
                                                    "order.py")
    return None, None


def section_order(study, out, opts):
    """order.csv: per pair of tasks with curvature, the recommended order (the flatter first-task minimum first)
    and whether the measured chains agree (measured_chains: order.py's definition, with order.json's --lr2).
    rho and the recommendation come from <runs>/results/order.json (or <runs>/order.json) when it exists, else
    from the curvature results (Figure 4a's rho per task) through order.py's functions. An order.json whose
    verdict on a pair differs from the runs here is out of date: named among the problems."""
    head = "## Curvature-guided task order\n\n"
    recommend, check, impl = order.recommend_order, order.check_pairs, "order.py"
    rel, oj = find_order_json(study.runs_dir)
    lr2 = None
    if oj is not None:
        rho = {t: v for t, v in (oj.get("rho") or {}).items()
               if isinstance(v, dict) and not math.isnan(_num(v.get("rho")))}
        tasks = [t for t in (oj.get("tasks") or list(rho)) if t in rho]
        order_rec = oj.get("recommended_order") or recommend({t: rho[t] for t in tasks})
        src = f"{rel} (order.py)"
        theirs = {tuple(p.get("tasks", [])): p.get("agrees") for p in oj.get("pairs") or [] if isinstance(p, dict)}
        lr2 = _num((oj.get("settings") or {}).get("lr2"))
        lr2 = None if math.isnan(lr2) else lr2
    else:
        curv_files, _ = find_curvature_files(study.runs_dir, getattr(opts, "out", None))
        if not curv_files:
            return head + ("No task order: no results/order.json and no curvature results under the runs folder "
                           "(order.py and curvature.py write them).\n")
        curv_by_id, _, _ = curvature_results(curv_files, study.runs)
        rows_a = curvature_tables(study, curv_by_id)[0]
        rho = {r["task"]: {"rho": float(r["rho"]), "n": r["n_seeds"]} for r in rows_a
               if not isinstance(r["rho"], str)}
        tasks = [t for t in list(study.capability) + list(study.safety) if t in rho]
        if len(tasks) < 2:
            return head + (f"No task order: {len(tasks)} task(s) with curvature ({', '.join(tasks) or 'none'}); an "
                           "order needs two.\n")
        order_rec = recommend({t: rho[t] for t in tasks})
        src = f"the curvature results (Figure 4a's rho per task), ordered by {impl}"
        theirs = {}
    measured, probs = measured_chains(study, lr2)
    study.refused += [p for p in probs if "cannot be compared" in p and p not in study.refused]
    pairs = check(tasks, rho, measured)
    rows = []
    for p in pairs:
        x, y = p["tasks"]
        m = p["measured"]
        pf = lambda k: _r(100 * m[k]["forgetting"]) if m[k]["forgetting"] is not None else MISSING
        agr = theirs.get((x, y), theirs.get((y, x), NA)) if oj is not None else NA
        rows.append({"task_x": x, "task_y": y, "rho_x": _v(p["rho"][x]), "rho_y": _v(p["rho"][y]),
                     "recommended": "->".join(p["recommended"]), "forgetting_xy": pf(f"{x}->{y}"),
                     "n_xy": m[f"{x}->{y}"]["n"], "forgetting_yx": pf(f"{y}->{x}"), "n_yx": m[f"{y}->{x}"]["n"],
                     "less_forgetting": p["less_forgetting"] or NA,
                     "agrees": NA if p["agrees"] is None else bool(p["agrees"]),
                     "agrees_order_json": NA if agr is None else agr})
        if isinstance(agr, bool) and p["agrees"] is not None and agr != p["agrees"]:
            study.problems.append(f"{rel}: order.py said the recommendation {'agrees' if agr else 'disagrees'} for "
                                  f"{x},{y} but the measured chains here say it {'agrees' if p['agrees'] else 'disagrees'}"
                                  f"; order.json is out of date, re-run order.py --runs on this folder")
    df = pd.DataFrame(rows, columns=ORDER_COLUMNS)
    write_csv(os.path.join(out, "order.csv"), df)
    checked = [r for r in rows if isinstance(r["agrees"], bool)]
    rt = pd.DataFrame([{"task": t, "rho": _v(float(rho[t]["rho"])), "n": rho[t].get("n", NA)} for t in order_rec
                       if t in rho], columns=["task", "rho", "n"])
    return (head + f"Source: {src}. Recommended order (the flattest first-task minimum first, the sharpest last): "
            f"**{' -> '.join(order_rec)}**.\n\n" + markdown_table(_sig(rt))
            + "\nPer pair: the measured forgetting of the first task in both orders (percent, mean over every "
            "measured chain: the plain-recipe two-task runs order.py checks, every seed and learning rate"
            + (f", second-stage lr {lr2:g}" if lr2 is not None else "") + "); agrees = the recommended order is "
            "the one that forgot less; agrees_order_json = order.py's verdict in order.json, the same unless "
            "order.json is out of date ([order.csv](order.csv)).\n\n"
            + markdown_table(_sig(df)) + f"\n{sum(r['agrees'] for r in checked)} of {len(checked)} pairs measured in "
            "both orders agree.\n")


SECTIONS = [section_table1, section_groups, section_chance, section_figure2, section_figure3, section_lr_figures,
            section_first_task_acc, section_curvature, section_replay, section_mitigation, section_long_chains,
            section_order]


def write_report(study, out, opts):
    """Run every section, then report.md (provenance, problems, the sections) and summary.json."""
    os.makedirs(out, exist_ok=True)
    parts = [f(study, out, opts) for f in SECTIONS]  # sections may add problems (e.g. missing samples)
    base = sorted({str(r.meta.get("base_model")) for r in study.runs if r.meta.get("base_model")})
    sources = sorted({str(r.meta.get("data", {}).get("source")) for r in study.runs
                      if isinstance(r.meta.get("data"), dict) and r.meta["data"].get("source")}
                     | {str(t.get("source")) for r in study.runs if r.eval
                        for t in r.eval["tasks"].values() if t.get("source")})
    n1 = sum(r.stage == 1 for r in study.runs)
    n2 = sum(r.stage == 2 for r in study.runs)
    n_other = len(study.all_runs) - len(study.runs)
    head = ["# Chained tuning: forgetting and biased forgetting\n",
            f"- model (run.json base_model): {', '.join(base) or 'unknown'}",
            f"- data (source): {', '.join(sources) or 'unknown'}",
            f"- profile: {opts.profile}",
            f"- runs: {os.path.abspath(study.runs_dir)} ({n1} first-stage, {n2} chained run.json; "
            f"{len(study.pairs)} usable pairs; seeds {', '.join(map(str, study.seeds))})"
            + (f"; {n_other} other run.json (replay points, mitigated stages, long chains and their copies) "
               "outside Table 1" if n_other else ""),
            f"- main learning rate (second stage of Table 1): {study.main_lr:g} ({study.main_lr_from})"
            if study.main_lr else "- main learning rate: none (no chained run)",
            "- values in percent; mean and std (ddof=1) over seeds; n/a = a std over one seed, or not "
            "applicable (no groups, no bootstrap)\n"]
    if study.study_json:
        head.append("study.json:\n\n```json\n" + json.dumps(study.study_json, indent=2) + "\n```\n")
    probs, refused = study.problems, study.refused
    head.append(f"## Refused: evaluations that cannot be compared ({len(refused)})\n\n"
                + ("Forgetting needs both evaluations of a task made on the same data source, split and examples; "
                   "these pairs were not computed (their cells say incomparable):\n\n"
                   + "\n".join(f"- {p}" for p in refused) if refused else "None: every pair compares evaluations of "
                   "the same examples.") + "\n")
    head.append(f"## Missing or failed runs ({len(probs)})\n\n"
                + ("\n".join(f"- {p}" for p in probs) if probs else "None: every expected run is present.") + "\n")
    write_text(os.path.join(out, "report.md"), "\n".join(head) + "\n" + "\n".join(parts))
    summary = {"runs": os.path.abspath(study.runs_dir), "profile": opts.profile, "base_model": base,
               "data_source": sources, "main_lr": study.main_lr, "seeds": study.seeds,
               "n_pairs": len(study.pairs), "refused": refused, "problems": probs}
    write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return probs


def nothing_to_report(study, exclude=None):
    """None when the runs folder gives at least one result (a usable pair, a long chain, a replay summary, a
    mitigated second stage or a curvature file); else the one line saying what was found and what is missing."""
    if study.pairs or study.long_chains or study.replay:
        return None
    if any(_stage(r) == 2 and mitigation_of(r.meta) and not r.problem for r in study.all_runs):
        return None
    if any(find_curvature_files(study.runs_dir, exclude)):
        return None
    n1 = sum(_stage(r) == 1 for r in study.all_runs)
    n2 = sum(_stage(r) == 2 for r in study.all_runs)
    n_eval = sum(r.eval is not None for r in study.all_runs)
    why = study.refused + study.problems
    found = (f"{len(study.all_runs)} run.json ({n1} first-stage, {n2} chained, {len(study.all_runs) - n1 - n2} "
             f"other), {n_eval} with an eval.json, 0 usable pairs")
    if why:
        found += ": " + "; ".join(why[:3]) + (f"; and {len(why) - 3} more" if len(why) > 3 else "")
    return (f"nothing to report under {study.runs_dir}: {found}. A pair needs a first-stage run and a chained run "
            f"tuned from it (finetune.py --model <first stage>), each with an eval.json holding the first task "
            f"(evaluate.py --tasks A,B); no file written")


NUMERIC_RULES = {"lr": POSITIVE, "k": AT_LEAST_1, "n_boot": NON_NEGATIVE, "boot_seed": NON_NEGATIVE,
                 "ci": in_range(0, 1, open_lo=True, open_hi=True)}


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--runs", required=True, help="folder written by run_all.sh (searched for run.json files)")
    ap.add_argument("--out", required=True, help="folder for the tables, figures and report.md (percent)")
    ap.add_argument("--profile", default=None, help='profile named in report.md; unset: study.json "profile", '
                                                    'else "unknown"')
    ap.add_argument("--lr", type=float, default=None, help='learning rate (> 0) of the second stage of Table 1\'s '
                                                          'chains; unset: study.json "lr", else the most common '
                                                          'second-stage lr')
    ap.add_argument("--k", type=int, default=3, help="number of worst groups (>= 1) for top-k biased forgetting")
    ap.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples (>= 0; 0: no CIs)")
    ap.add_argument("--boot_seed", type=int, default=0, help="seed (>= 0) of the bootstrap")
    ap.add_argument("--ci", type=float, default=0.95, help="confidence level of the bootstrap CIs, a fraction in "
                                                          "(0, 1)")
    return ap


def run(opts):
    """metrics.py's work for parsed arguments: every output made in a temporary folder beside --out, then moved
    into it, so a user error at any point leaves --out as it was. Returns the exit code (0)."""
    check_args(vars(opts), NUMERIC_RULES)
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise UserError(f"--out {opts.out} is a file; give a folder")
    study = build_study(opts.runs, opts.lr, exclude=opts.out)
    empty = nothing_to_report(study, opts.out)
    if empty:
        raise UserError(empty)
    if opts.profile is None:
        opts.profile = str(study.study_json.get("profile", "unknown"))
    out = os.path.abspath(opts.out)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".tmp-{os.path.basename(out)}-")
    except OSError as e:
        raise UserError(f"cannot create --out {opts.out} ({e}); pass a writable folder") from None
    try:
        probs = write_report(study, tmp, opts)
        os.makedirs(out, exist_ok=True)
        for f in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, f), os.path.join(out, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"metrics: {len(study.pairs)} chained pairs from {opts.runs} -> {opts.out}/report.md (percent)")
    if study.refused:
        print(f"metrics: {len(study.refused)} refused, their evaluations cannot be compared (also in report.md):")
        for p in study.refused:
            print(f"  - {p}")
    if probs:
        print(f"metrics: {len(probs)} missing or failed runs (also in report.md):")
        for p in probs:
            print(f"  - {p}")
    return 0


def main(argv=None):
    """The CLI: returns 0; a user error exits 2 with one `error:` line (common.die_on_user_error)."""
    return die_on_user_error(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
