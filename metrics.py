"""Forgetting, biased forgetting, and the paper's tables and figures, from a folder of runs.

    python metrics.py --runs runs/tiny --out runs/tiny/results      # tables, figures, results/report.md
    python metrics.py --runs runs --out results --lr 1e-5 --k 3 --n_boot 2000
    python metrics.py --runs runs --out results --n_boot 0          # no bootstrap (fastest)

    import metrics                                   # the equations alone: fractions in, fractions out
    metrics.forgetting(0.80, 0.70)                   # Acc_A(theta_A) - Acc_A(theta_AB) = 0.10
    metrics.biased_forgetting({"a": 0.5, "b": 0.1}, 0.2)                # max_g F_A,g - F_A = 0.3
    metrics.paired_bootstrap_ci([1, 1, 0, 1], [0, 1, 0, 1], ["a", "a", "b", "b"], n_resamples=200)

Needs numpy, scipy, pandas and matplotlib. Alone it writes report.md (opening with the Findings, the paper's
claims checked against the runs, and the generated "Where this run differs from the paper"), Tables 1 and 2,
the group tables, Kendall's tau, Figures 2, 3, 5, 6, 8, 9, 10 and the heatmaps, accuracy paths and loss
curves; `metrics.choose_first_stage` is the one first-stage choice rule of the study. Beside it,
metrics_curvature.py adds Figure 4, the Taylor check and the task order, metrics_mitigation.py replay
(Figures 7, 11-14), mitigations and long chains, common.py the toolkit's error handling. The definitions and every output's columns: README.md.
"""
import argparse
import collections
import contextlib
import hashlib
import importlib
import io
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

try:
    from chained_tuning.common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, UserError, check_args,
                                       die_on_user_error, in_range)
except ModuleNotFoundError as e:  # metrics.py copied alone: the few lines of common.py it uses
    if e.name != "common":
        raise

    class UserError(Exception):
        """Bad input: one `error:` line, exit code 2 (common.py's rule)."""

    def die_on_user_error(main):
        try:
            return main()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    HelpFormatter = argparse.ArgumentDefaultsHelpFormatter
    POSITIVE, NON_NEGATIVE, AT_LEAST_1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1,
                                                                                                  "at least 1")

    def in_range(lo, hi, open_lo=False, open_hi=False):
        return ((lambda v: (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)),
                f"in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}")

    def check_args(values, rules):
        for name, (ok, allowed) in rules.items():
            v = values.get(name)
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise UserError(f"--{name} must be {allowed}, got {v if isinstance(v, int) else f'{v:g}'}")

CAPABILITY_TASKS = ("arc", "csqa", "csqa2")
SAFETY_TASKS = ("toxigen", "bbq", "saferdialogues")
# Names in tables and figures: spelled out (an abbreviation such as "TQA" reads as TruthfulQA to most readers).
SHORT = {"arc": "ARC-Easy", "csqa": "CSQA", "csqa2": "CSQA2", "toxigen": "ToxiGen", "bbq": "BBQ",
         "saferdialogues": "SaFeRDialogues"}
TASK_NAMES = {"arc": "ARC-Easy (AI2 Reasoning Challenge, easy set)", "csqa": "CommonsenseQA", "csqa2": "CommonsenseQA 2.0",
              "toxigen": "ToxiGen v2 posed as a question (the paper's ToxiGenQA, TQA)",
              "bbq": "BBQ (Bias Benchmark for QA)", "saferdialogues": "SaFeRDialogues (generative, scored for safety)"}
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
# the paper's equations and the paired bootstrap (numpy and scipy only; fractions in, fractions out)

def forgetting(acc_first, acc_chained):
    """Forgetting_AB = Acc_A(theta_A) - Acc_A(theta_AB). Negative when tuning on B improved A."""
    return float(acc_first) - float(acc_chained)


def group_acc(value):
    """A group's accuracy from eval.json's {"acc", "n"} block, or the accuracy itself."""
    return float(value["acc"]) if isinstance(value, dict) else float(value)


def group_forgetting(groups_first, groups_chained):
    """Forgetting_A,g = Acc_A(theta_A, g) - Acc_A(theta_AB, g) for every group g present in both.

    Each argument maps group -> accuracy, or group -> {"acc": ..., "n": ...} (eval.json's "groups");
    groups with n == 0 are skipped. Returns {group: forgetting}, sorted by group name."""
    out = {}
    for g in sorted(set(groups_first) & set(groups_chained)):
        first, chained = groups_first[g], groups_chained[g]
        if any(isinstance(v, dict) and v.get("n", 1) == 0 for v in (first, chained)):
            continue
        out[g] = forgetting(group_acc(first), group_acc(chained))
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
        result = stats.kendalltau([bf_x[g] for g in common], [bf_y[g] for g in common], variant="b")
    return float(result.statistic), float(result.pvalue), len(common)


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
    first, chained = index(records_first), index(records_chained)
    if set(first) != set(chained):
        raise ValueError(f"the two models' samples of {task} hold different examples ({len(first)} and "
                         f"{len(chained)} ids, {len(set(first) & set(chained))} shared); pair only evaluations "
                         f"of one example set")
    ids = sorted(first)
    return (ids, np.array([float(bool(first[i]["correct"])) for i in ids]),
            np.array([float(bool(chained[i]["correct"])) for i in ids]), [first[i].get("group") for i in ids])


CHANCE_SE = 2.0  # "at chance": within this many binomial standard errors of a uniform guess


def chance_flag(acc, records):
    """Is an accuracy at chance level? records: its task's samples rows (n_options, pred). Returns (chance, why):
    chance = mean over the examples of 1 / n_options (the expected accuracy of a uniform guess; nan without
    option counts); why = "collapsed: every prediction is option i" when all of two or more examples got the
    same predicted option, else "within 2 standard errors of chance" when |acc - chance| <= 2 sqrt(chance
    (1 - chance) / n), else None."""
    n = len(records)
    n_options = [r["n_options"] for r in records if isinstance(r.get("n_options"), int) and r["n_options"] > 0]
    chance = float(np.mean([1.0 / x for x in n_options])) if n and len(n_options) == n else float("nan")
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
    first = np.atleast_2d(np.asarray(correct_first, dtype=float))      # (seeds, examples)
    chained = np.atleast_2d(np.asarray(correct_chained, dtype=float))
    if first.shape != chained.shape or first.shape[1] == 0:
        raise ValueError(f"need the same non-empty examples for both models, got {first.shape} and {chained.shape}")
    n = first.shape[1]
    names, codes = [], None
    if groups is not None and any(g is not None for g in groups):
        names = sorted({str(g) for g in groups if g is not None})
        pos = {g: i for i, g in enumerate(names)}
        codes = np.array([pos[str(g)] if g is not None else len(names) for g in groups])  # None: own bucket
    n_groups = len(names)

    def statistics(draws):  # draws: (resamples, n) example indices -> per-resample statistics averaged over seeds
        forget = first[:, draws].mean(-1) - chained[:, draws].mean(-1)  # (seeds, resamples)
        out = {"forgetting": forget.mean(0)}
        if n_groups:
            n_draws, width = draws.shape[0], n_groups + 1
            cell = (np.arange(n_draws)[:, None] * width + codes[draws]).ravel()   # (resample, group) bucket
            count = np.bincount(cell, minlength=n_draws * width).reshape(n_draws, width)[:, :n_groups]
            per_seed = []
            for s in range(first.shape[0]):
                right_first = np.bincount(cell, weights=first[s][draws].ravel(),
                                          minlength=n_draws * width).reshape(n_draws, width)[:, :n_groups]
                right_chained = np.bincount(cell, weights=chained[s][draws].ravel(),
                                            minlength=n_draws * width).reshape(n_draws, width)[:, :n_groups]
                with np.errstate(invalid="ignore", divide="ignore"):
                    group_forget = np.where(count > 0, (right_first - right_chained) / count, np.nan)
                per_seed.append(group_forget - forget[s][:, None])
            biased = np.stack(per_seed)  # (seeds, resamples, groups)
            out["groups"] = biased.mean(0)
            out["biased_forgetting_max"] = _topk_nanmean(biased, 1).mean(0)
            out["biased_forgetting_topk"] = _topk_nanmean(biased, k).mean(0)
        return out

    point = statistics(np.arange(n)[None, :])
    rng = np.random.default_rng(seed)
    resampled = defaultdict(list)
    for start in range(0, n_resamples, chunk):
        for key, v in statistics(rng.integers(0, n, size=(min(chunk, n_resamples - start), n))).items():
            resampled[key].append(v)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def summary(est, values):
        if values is None or len(values) == 0 or np.all(np.isnan(values)):
            return {"estimate": float(est), "low": float("nan"), "high": float("nan")}
        lo, hi = np.nanpercentile(values, q)
        return {"estimate": float(est), "low": float(lo), "high": float(hi)}

    nan = {"estimate": float("nan"), "low": float("nan"), "high": float("nan")}
    res = {"n": n, "n_resamples": n_resamples,
           "forgetting": summary(point["forgetting"][0],
                                 np.concatenate(resampled["forgetting"]) if n_resamples else None),
           "biased_forgetting_max": nan, "biased_forgetting_topk": nan, "groups": {}}
    if n_groups:
        for key in ("biased_forgetting_max", "biased_forgetting_topk"):
            res[key] = summary(point[key][0], np.concatenate(resampled[key]) if n_resamples else None)
        every_group = np.concatenate(resampled["groups"]) if n_resamples else None
        for j, g in enumerate(names):
            res["groups"][g] = summary(point["groups"][0, j], every_group[:, j] if every_group is not None else None)
    return res


# ----------------------------------------------------------------------------------------------------
# reading a runs folder: every rule about which files are runs, which runs pair, and which pairs compare
# lives here (order.py imports them)

RUN_FIX = "it must be the run.json written by finetune.py (see the README's runs layout); re-run that stage"
EVAL_FIX = "it must be the eval.json written by evaluate.py; delete it and re-run evaluate.py for that run"
REPLAY_FIX = "it must be the replay_summary.json written by replay.py; delete it and re-run replay.py"
CURV_FIX = "it must be the curvature.json written by curvature.py; delete it and re-run curvature.py"
TAYLOR_FIX = "it must be the taylor.json written by curvature.py --reference; delete it and re-run curvature.py"


def read_json(path, what, fix):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} must be a JSON object; {fix}")
    return obj


def number(v):
    """A JSON number as float; None, booleans, strings and missing values are nan."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def walk_folders(top, exclude=None):
    """(folder, its file names) for every folder under top, in sorted order; hidden folders and `exclude`
    (metrics.py's own --out) are skipped."""
    exclude = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != exclude)
        yield root, files


def walk_json(top, fname, fix, exclude=None):
    """(path, parsed JSON object) of every file called fname under top (walk_folders' order)."""
    for root, files in walk_folders(top, exclude):
        if fname in files:
            path = os.path.join(root, fname)
            yield path, read_json(path, fname, fix)


def find_json_files(runs_dir, fname, fix, exclude=None):
    """Every file called fname under runs_dir -> [(path relative to runs_dir, parsed JSON object)], by path.
    Folder names are not parsed: files pair with runs by their run_id fields."""
    return [(os.path.relpath(path, runs_dir), obj) for path, obj in walk_json(runs_dir, fname, fix, exclude)]




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
        evaluated = self.eval if which == "eval" else self.val
        block = (evaluated or {}).get("tasks", {}).get(task)
        return float(block["acc"]) if block else float("nan")


def _check_run_json(path, meta):
    def bad(msg):
        raise UserError(f"{path}: {msg}; {RUN_FIX}")
    if not isinstance(meta.get("run_id"), str) or not meta["run_id"]:
        bad('"run_id" must be a non-empty string')
    for key, typ in (("stage", int), ("task", str), ("chain", list), ("seed", int)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            bad(f'"{key}" must be a {typ.__name__}, got {meta.get(key)!r}')
    if not isinstance(meta.get("lr"), (int, float)) or isinstance(meta.get("lr"), bool):
        bad(f'"lr" must be a number, got {meta.get("lr")!r}')
    if len(meta["chain"]) != meta["stage"] or not meta["chain"] or meta["chain"][-1] != meta["task"]:
        bad(f'"chain" {meta["chain"]} must have "stage" ({meta["stage"]}) tasks and end with "task" ({meta["task"]})')
    if meta["stage"] >= 2 and not isinstance(meta.get("parent_run_id"), str):
        bad(f'a stage-{meta["stage"]} run needs "parent_run_id" (the run_id of the run it started from)')


def check_eval_json(path, ev):
    tasks = ev.get("tasks")
    if not isinstance(tasks, dict):
        raise UserError(f'{path}: no "tasks" object; {EVAL_FIX}')
    for t, block in tasks.items():
        if not isinstance(block, dict) or not isinstance(block.get("acc"), (int, float)):
            raise UserError(f'{path}: task "{t}" has no numeric "acc"; {EVAL_FIX}')
        g = block.get("groups", {})
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
    they describe the same run (_same_run): copy_preference then says which copy stands for the run."""
    if not os.path.isdir(runs_dir):
        raise UserError(f"runs folder {runs_dir} does not exist; pass --runs the folder run_all.sh wrote "
                        f"(the one holding stage1/ and stage2/)")
    runs, problems = [], []
    for root, files in walk_folders(runs_dir, exclude):
        name = os.path.relpath(root, runs_dir)
        if "run.json" not in files:
            if {"model.safetensors", "train_log.jsonl"} & set(files):
                problems.append(f"{name}: a checkpoint without run.json (an unfinished run?); re-run that stage")
            continue
        path = os.path.join(root, "run.json")
        meta = read_json(path, "run.json", RUN_FIX)
        _check_run_json(path, meta)
        run = Run(path=root, name=name, meta=meta)
        for fname, attr in (("eval.json", "eval"), ("eval_val.json", "val")):
            p = os.path.join(root, fname)
            if os.path.isfile(p):
                ev = read_json(p, fname, EVAL_FIX)
                check_eval_json(p, ev)
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


def copy_preference(run):
    """Among copies of one run: the one evaluated on the fewest tasks (the two-stage study's own copy, not a
    long chain's, whose eval.json holds every task of its chain), with eval_val.json, then by name."""
    return (len((run.eval or {}).get("tasks", {})), run.val is None, run.name)


def runs_by_id(runs):
    """{run_id: Run}, one copy per run_id (copy_preference)."""
    by_id = {}
    for r in sorted(runs, key=copy_preference):
        by_id.setdefault(r.run_id, r)
    return by_id


# comparable evaluations: the one rule for every forgetting and paired statistic

Evaluation = collections.namedtuple("Evaluation", "name folder eval")  # how messages call it, its folder, eval.json
COMPARED = ("source", "split", "n")   # fields of an eval.json task block that must agree


def evaluation(run):
    """A run's eval.json as incomparable takes it."""
    return Evaluation(run.name, run.path, run.eval)


def samples_file(folder, ev):
    """The samples JSONL an eval.json names (beside it)."""
    return os.path.join(folder, (ev or {}).get("samples") or "eval_samples.jsonl")


def read_samples(folder, ev):
    """The per-example records of the eval.json in `folder` (its samples JSONL) reduced to id, task, group,
    correct, pred and n_options (the number of options scored), or None when the file is missing."""
    path = samples_file(folder, ev)
    if not os.path.isfile(path):
        return None
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                assert isinstance(row, dict) and "id" in row and "correct" in row
            except (json.JSONDecodeError, AssertionError):
                raise UserError(f"{path}:{i}: not a samples record (want one JSON object per line with "
                                f'"id" and "correct"); delete it and re-run evaluate.py') from None
            record = {k: row.get(k) for k in ("id", "task", "group", "correct", "pred") if k in row}
            if isinstance(row.get("options"), list):
                record["n_options"] = len(row["options"])
            records.append(record)
    return records


def load_samples(run):
    """A run's samples records (read_samples), or None when the file is missing."""
    return read_samples(run.path, run.eval)


_DIGESTS = {}


def example_digests(folder, ev):
    """{task: (number of examples, sha256 of their sorted ids)} of a samples file, None without one. Kept per
    file (path, size, mtime): a first-stage model's file is compared with every chain that starts from it."""
    path = samples_file(folder, ev)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        ids = defaultdict(list)
        for r in read_samples(folder, ev):
            ids[r.get("task")].append(str(r["id"]))
        _DIGESTS[key] = {t: (len(v), hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest())
                         for t, v in ids.items()}
    return _DIGESTS[key]


def _example_ids(e, task):
    return {str(r["id"]) for r in read_samples(e.folder, e.eval) if r.get("task") == task}


def incomparable(task, first, chained):
    """Why two evaluations of `task` (Evaluation tuples, e.g. theta_A's and theta_AB's) cannot be paired, or
    None when they can: the task blocks' data source, split and number of examples must agree, then the ids
    of the examples in both samples files (when one is missing: the subset settings of eval.json's config,
    limit and the seed that draws it). The reason names both evaluations, each differing field and both
    values."""
    ta, tb = ((e.eval or {}).get("tasks", {}).get(task) for e in (first, chained))
    if ta is None or tb is None:
        return f"{task}: {(first if ta is None else chained).name} has no evaluation of {task}"
    diffs = [f"{k} {ta.get(k)!r} vs {tb.get(k)!r}" for k in COMPARED if ta.get(k) != tb.get(k)]
    if not diffs:
        da, db = example_digests(first.folder, first.eval), example_digests(chained.folder, chained.eval)
        if da and db and task in da and task in db:
            if da[task] != db[task]:
                a, b = _example_ids(first, task), _example_ids(chained, task)
                diffs.append(f"example ids differ ({len(a & b)} shared, {len(a - b)} only in the first, "
                             f"{len(b - a)} only in the second)")
        else:
            ca, cb = ((e.eval or {}).get("config") or {} for e in (first, chained))
            keys = ("limit", "seed") if ca.get("limit") is not None or cb.get("limit") is not None else ("limit",)
            diffs += [f"config {k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in keys if ca.get(k) != cb.get(k)]
    if not diffs:
        return None
    return (f"{task}: {first.name} vs {chained.name}: {'; '.join(diffs)} (forgetting needs the same data source, "
            f"split and examples on both sides; evaluate both with the same --data_dir, --split, --limit, --seed)")


def refusal(A, B, why):
    """The line report.md and stdout give a refused pair (the same words order.py prints)."""
    return f"chain {A} -> {B} left out, its evaluations cannot be compared: {why}"


# which runs are the measured chains

MITIGATION_OPTIONS = ("replay_fraction", "l2_to_init", "ewc")


def mitigation_of(meta):
    """The options beyond the paper's recipe a run.json's config turns on: {option: value} for replay_fraction,
    l2_to_init, ewc (> 0) and train_fraction (set); {} for a run of the plain recipe."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    on = {}
    for k in MITIGATION_OPTIONS:
        v = cfg.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            on[k] = float(v)
    if cfg.get("train_fraction") is not None:
        on["train_fraction"] = cfg["train_fraction"]
    return on


def is_measured_chain(meta):
    """The one definition of "a measured chain" (Table 1, the order section, order.py): a run.json of the
    paper's plain recipe tuned on two different tasks in turn, chain [X, Y] with X != Y and no mitigation
    option (mitigation_of). Mitigated second stages forget differently by design, and replay points (stage 3)
    and longer chains are not two-task chains."""
    chain = meta.get("chain")
    return (isinstance(chain, list) and len(chain) == 2 and chain[0] != chain[1] and meta.get("stage", 2) == 2
            and not mitigation_of(meta))


def stage_of(run):
    return run.stage if isinstance(run.stage, int) and not isinstance(run.stage, bool) else None


def is_replay_point(run, replay_ids):
    """A third stage made by replay.py: its run_id is a point of a replay_summary.json, or a point.json lies
    beside its run.json."""
    return run.run_id in replay_ids or os.path.isfile(os.path.join(run.path, "point.json"))


# a chain and its first stage

def first_stage_problem(first, chained, task):
    """The pairing rule of a chained run theta_AB with its first stage theta_A (`first`: the run whose run_id is
    theta_AB's parent_run_id, None when there is none) for the forgetting of `task` (A): what stops the pair,
    checked in this order, or None:
        "chained unusable"    theta_AB failed or has no eval.json
        "no first stage"      no run.json has its parent_run_id
        "first unusable"      theta_A failed or has no eval.json
        "not a first stage"   theta_A is not a stage-1 run tuned on A
        "first lacks task"    theta_A's eval.json has no result for A
        "chained lacks task"  theta_AB's eval.json has no result for A
    A pair that passes still needs comparable evaluations (incomparable)."""
    if chained.problem:
        return "chained unusable"
    if first is None:
        return "no first stage"
    if first.problem:
        return "first unusable"
    if first.stage != 1 or first.task != task:
        return "not a first stage"
    if task not in first.eval["tasks"]:
        return "first lacks task"
    if task not in chained.eval["tasks"]:
        return "chained lacks task"
    return None


@dataclass
class Pair:
    """theta_A (first) and theta_AB (chained) for one seed, with their per-seed values (fractions)."""
    first: Run
    chained: Run
    A: str
    B: str
    lr_a: float
    lr_b: float
    seed: int
    stats: dict = field(default_factory=dict)  # pair_metrics
    refused: str = None        # why theta_A's and theta_AB's evaluations of A cannot be compared (stats is empty)


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
            "group_acc_first": {g: group_acc(v) for g, v in (ta.get("groups") or {}).items()},
            "group_acc_chained": {g: group_acc(v) for g, v in (ca.get("groups") or {}).items()},
            "group_n": {g: v.get("n") for g, v in (ta.get("groups") or {}).items()},
            "biased": biased_forgetting_vector(gf, f), "biased_max": biased_forgetting(gf, f, 1)}


def pair_runs(runs, parents=None):
    """Stage-2 runs joined to their stage-1 parent by parent_run_id (first_stage_problem) -> (pairs, problems).
    `parents` ({run_id: Run}, default: `runs` by run_id) is where parents are looked up. A pair whose two
    evaluations of A cannot be compared (incomparable) is returned with .refused set and no stats."""
    by_id = parents if parents is not None else {r.run_id: r for r in runs}
    pairs, problems = [], []
    for r in runs:
        if r.problem or r.stage != 2:  # an unusable theta_AB is one of find_runs' problems already
            continue
        A, B = r.chain
        p = by_id.get(r.parent_run_id)
        why = first_stage_problem(p, r, A)
        if why == "no first stage":
            problems.append(f"{r.name}: its first-stage run (parent_run_id {r.parent_run_id}) has no run.json "
                            f"under the runs folder; re-run stage 1 for {A}")
        elif why == "first unusable":
            problems.append(f"{r.name}: its first-stage run {p.name} is unusable ({p.problem})")
        elif why == "not a first stage":
            problems.append(f"{r.name}: its parent {p.name} is a stage-{p.stage} run on {p.task}, not stage 1 on {A}")
        elif why in ("first lacks task", "chained lacks task"):
            which = p if why == "first lacks task" else r
            problems.append(f"{which.name}/eval.json has no result for {A}; re-run evaluate.py --tasks {A},{B}")
        elif why is None:
            if B not in r.eval["tasks"]:
                problems.append(f"{r.name}/eval.json has no result for {B}; re-run evaluate.py --tasks {A},{B}")
            pair = Pair(p, r, A, B, p.lr, r.lr, r.seed)
            refused = incomparable(A, evaluation(p), evaluation(r))
            if refused:
                pair.refused = refusal(A, B, refused)
            else:
                pair.stats = pair_metrics(p.eval, r.eval, A, B)
            pairs.append(pair)
    return pairs, problems


def measured_forgetting(runs, lr2=None):
    """{(X, Y): [(forgetting of X, run_id of theta_XY)]} of every measured chain (is_measured_chain) in `runs`
    ({run_id: Run}, runs_by_id), with second-stage lr lr2 when given, and problems (chains left out: no
    evaluation, or evaluations that cannot be compared). What order.py checks and report.md's order section."""
    out, problems = {}, []
    for rid, r in sorted(runs.items(), key=lambda kv: kv[1].path):
        if not is_measured_chain(r.meta):
            continue
        x, y = r.chain
        if lr2 is not None and not math.isclose(float(r.meta.get("lr", math.nan)), lr2, rel_tol=1e-9):
            continue
        parent = runs.get(r.parent_run_id)
        why = first_stage_problem(parent, r, x)
        if why in ("chained unusable", "chained lacks task"):
            problems.append(f"{r.path}: chain {x} -> {y} without an eval.json holding {x}; left out")
            continue
        if why:
            problems.append(f"{r.path}: its first stage (run {r.parent_run_id}) is not under --runs "
                            f"with an eval.json holding {x}; left out")
            continue
        refused = incomparable(x, evaluation(parent), evaluation(r))
        if refused:
            problems.append(refusal(x, y, refused))
            continue
        out.setdefault((x, y), []).append((forgetting(parent.acc(x), r.acc(x)), rid))
    return out, problems


# the study: which runs make the two-stage study, and the runs beyond it (replay points, mitigated second
# stages, chains longer than two)

def shared_depth(a, b):
    return len(os.path.commonpath([os.path.abspath(a), os.path.abspath(b)]).split(os.sep))


def resolve_parent(run, copies):
    """The run.json `run` was tuned from: the copy with its parent_run_id nearest in the folder tree (most
    leading folders in common with `run`'s), then copy_preference; None when no run.json has that run_id."""
    candidates = copies.get(run.parent_run_id) or []
    return min(candidates, key=lambda c: (-shared_depth(c.path, run.path), copy_preference(c))) if candidates else None


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
    ends = [r for r in runs if (stage_of(r) or 0) >= 3 and not mitigation_of(r.meta)
            and not is_replay_point(r, replay_ids) and isinstance(r.chain, list) and len(r.chain) == r.stage]
    lineages = []
    for end in ends:
        stages, problems, cur = [None] * end.stage, [], end
        stages[-1] = end
        while stage_of(cur) and cur.stage > 1:
            p = resolve_parent(cur, copies)
            if p is None:
                problems.append(f"{cur.name}: its stage-{cur.stage - 1} run (parent_run_id {cur.parent_run_id}) has "
                                f"no run.json under the runs folder; stages before {cur.stage} are missing")
                break
            if stage_of(p) != cur.stage - 1 or p.chain != cur.chain[:-1]:
                problems.append(f"{cur.name}: its parent {p.name} has chain {p.chain}, not {cur.chain[:-1]}; "
                                f"stages before {cur.stage} are left out")
                break
            stages[p.stage - 1] = p
            cur = p
        lineages.append(LongChain(end, stages, problems))
    inner = {id(r) for lc in lineages for r in lc.stages[:-1] if r is not None}
    return [lc for lc in lineages if id(lc.end) not in inner]


def lr_distance(lr, main):
    return abs(math.log(lr / main)) if lr > 0 and main and main > 0 else float("inf")


def choose_first_stage(val_accs, main_lr):
    """The first-stage learning rate a chain starts from (section 3.1: "the best model for the first task").

    val_accs: {lr: validation accuracy, or None when missing}. The highest accuracy wins; accuracies within
    TIE_TOL of it are tied, and a tie goes to the lr nearest main_lr on a log scale, |log(lr / main_lr)| (5e-6 and
    2e-5 are equally far from 1e-5), then to the smaller lr (main_lr None: straight to the smaller lr). An lr
    without an accuracy never wins; None when no lr has one. Pure and torch-free: the study driver and metrics.py's
    Table 1 both use it, so a chain starts from the model its table row says."""
    measured = {}
    for lr, acc in val_accs.items():
        if acc is not None and math.isfinite(float(acc)):
            measured[float(lr)] = float(acc)
    if not measured:
        return None
    best = max(measured.values())
    tied = [lr for lr, acc in measured.items() if acc >= best - TIE_TOL]
    dist = {lr: lr_distance(lr, main_lr) for lr in tied}
    nearest = min(dist.values())
    return min(lr for lr in tied if dist[lr] <= nearest + TIE_TOL)


@dataclass(frozen=True)
class Study:
    """A runs folder as read once by build_study; the sections only read it."""
    runs_dir: str
    runs: list
    pairs: list           # comparable pairs only (refused ones: refused_pairs)
    problems: list        # what reading the runs found missing (each section adds its own)
    main_lr: float
    main_lr_from: str
    table1: dict          # (A, B) -> [Pair, one per seed] used by Table 1 / Figures 2, 3 / Kendall
    marker: dict          # (A, B) -> "missing" | "failed" | "incomparable" for chains without Table-1 data
    capability: list
    safety: list
    seeds: list
    study_json: dict
    all_runs: list = field(default_factory=list)      # every run.json found (runs: the two-stage study's)
    replay: list = field(default_factory=list)        # [(path relative to --runs, replay_summary.json)]
    replay_ids: set = field(default_factory=set)      # run_ids of replay points (third stages)
    long_chains: list = field(default_factory=list)   # [LongChain]
    copies: dict = field(default_factory=dict)        # run_id -> [Run, ...] over all_runs
    curvature_files: list = field(default_factory=list)  # [(path relative to --runs, curvature.json)]
    taylor_files: list = field(default_factory=list)     # [(path relative to --runs, taylor.json)]
    refused_pairs: list = field(default_factory=list)  # Pairs whose evaluations cannot be compared
    refused: list = field(default_factory=list)        # their refusal lines (each section adds its own)
    cache: dict = field(default_factory=dict)          # results shared by sections (bootstrap CIs), keyed by inputs


def build_study(runs_dir, main_lr=None, exclude=None):
    """Read a runs folder: runs, chained pairs, the main lr, the Table-1 selection, the replay summaries and
    curvature files, and every problem."""
    all_runs, problems = find_runs(runs_dir, exclude, allow_copies=True)
    study_json = {}
    sj = os.path.join(runs_dir, "study.json")
    if os.path.isfile(sj):
        study_json = read_json(sj, "study.json", "delete it or make it a JSON object (it is optional)")
    # The two-stage study (Table 1 and everything before the replay section) uses plain-recipe first stages
    # and the measured chains (is_measured_chain): no replay points, no mitigated runs, no stage of a longer
    # chain stored with that chain.
    replay = find_json_files(runs_dir, "replay_summary.json", REPLAY_FIX, exclude)
    replay_ids = {p.get("run_id") for _, s in replay for p in (s.get("points") or []) if isinstance(p, dict)
                  and isinstance(p.get("run_id"), str)}
    copies = defaultdict(list)
    for r in all_runs:
        copies[r.run_id].append(r)
    long_chains = long_chain_lineages(all_runs, replay_ids, copies)
    own = {id(r) for lc in long_chains for r in lc.own()}
    runs = [r for r in all_runs if id(r) not in own and not is_replay_point(r, replay_ids)
            and (not mitigation_of(r.meta) if stage_of(r) == 1 else is_measured_chain(r.meta))]
    seen = {}
    for r in runs:
        if r.run_id in seen:
            _duplicate_error(seen[r.run_id], r)
        seen[r.run_id] = r
    parents = dict(seen)
    for r in sorted(all_runs, key=copy_preference):  # a parent stored only with a long chain
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
    asked = set()  # the tasks study.json says the study has: their rows appear even without a run (missing)
    for key in ("capability_tasks", "safety_tasks"):
        if isinstance(study_json.get(key), list):
            asked |= {t for t in study_json[key] if isinstance(t, str)}
    capability = [t for t in CAPABILITY_TASKS if t in tasks | asked]
    safety = [t for t in SAFETY_TASKS if t in tasks | asked]
    other = sorted(tasks - set(capability) - set(safety))
    if other:
        problems.append(f"tasks {', '.join(other)} are neither capability nor safety tasks: left out of Table 1")
    seeds = sorted({r.seed for r in runs if isinstance(r.seed, int)})

    # Table-1 selection: per chain and seed, second-stage lr == main lr, best-validated parent.
    table1, marker = {}, {}
    candidates = defaultdict(list)
    for p in all_pairs:  # a refused pair still takes its place: no other parent replaces it silently
        if main_lr is not None and math.isclose(p.lr_b, main_lr, rel_tol=1e-9):
            candidates[(p.A, p.B, p.seed)].append(p)
    chains = [(a, b) for c in capability for s in safety for a, b in ((c, s), (s, c))]
    chains += sorted({(p.A, p.B) for p in all_pairs} - set(chains))
    caption = study_json.get("first_stage") in ("main", "caption")  # FIRST_STAGE=main: the caption
    for A, B in chains:
        chosen, refused = [], 0
        for seed in seeds:
            c = candidates.get((A, B, seed), [])
            if c:
                vals = {}
                for p in c:
                    v = p.first.acc(A, "val")
                    vals.setdefault(p.lr_a, None if math.isnan(v) else v)
                lr_a = choose_first_stage(vals, main_lr)
                if lr_a is None or (caption and main_lr in vals):
                    # no validation result at all, or FIRST_STAGE=caption (Table 1's caption: both stages at the
                    # main lr): the first-stage lr nearest the main one
                    lr_a = choose_first_stage(dict.fromkeys(vals, 0.0), main_lr)
                c = sorted((p for p in c if p.lr_a == lr_a), key=lambda p: p.chained.name)
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
    # read here, once: the curvature sections and the check for an empty folder all use them
    curvature_files = find_json_files(runs_dir, "curvature.json", CURV_FIX, exclude)
    taylor_files = find_json_files(runs_dir, "taylor.json", TAYLOR_FIX, exclude)
    return Study(runs_dir, runs, pairs, problems, main_lr, lr_from, table1, marker,
                 capability, safety, seeds, study_json, all_runs=all_runs, replay=replay, replay_ids=replay_ids,
                 long_chains=long_chains, copies=dict(copies), curvature_files=curvature_files,
                 taylor_files=taylor_files, refused_pairs=refused_pairs, refused=[p.refused for p in refused_pairs])


# ----------------------------------------------------------------------------------------------------
# what a section gives back, and how it is written

@dataclass
class Section:
    """A report section's result: its part of report.md, the files it adds to --out (name -> CSV or markdown
    text, or PNG bytes) and its lines for report.md's lists of problems and of refused pairs."""
    text: str
    files: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    refused: list = field(default_factory=list)


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


def write_file(path, content):
    """Text or bytes to path, through a temporary name."""
    def write(tmp):
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    _atomic_write(path, write)


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


def csv_text(df):
    """A table as its CSV file holds it: headers with their unit (unit_header), no index."""
    return df.rename(columns=unit_header).to_csv(index=False)


def figure_files(fig, df, stem):
    """Figure `stem`.png (rendered here, the figure closed) and the data behind it, `stem`.csv."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return {stem + ".csv": csv_text(df), stem + ".png": png.getvalue()}


def rounded(x, digits=4):
    """A number rounded for a CSV; nan becomes "n/a" (nothing is left blank)."""
    if isinstance(x, (int, float, np.floating)):
        return NA if math.isnan(x) else round(float(x), digits)
    return x


def exact(x):
    """A value for a CSV at full precision (curvatures and losses span many orders of magnitude): nan is
    "n/a", booleans and strings pass through."""
    if isinstance(x, (float, np.floating)) and not isinstance(x, bool):
        return NA if math.isnan(x) else float(x)
    return x


def cells(values, scale=100.0, marker=MISSING):
    """(mean, std) for a table over seeds: mean*scale, std*scale; marker when no value, "n/a" std for one seed."""
    m, s, n = mean_std([v * scale for v in values])
    if n == 0:
        return marker, marker
    return rounded(m), (rounded(s) if n > 1 else NA)


def markdown_table(df, digits=2):
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return NA if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(map(unit_header, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def significant(df):
    """df with its float cells as 4 significant digits (for report.md tables of values of any scale)."""
    return df.apply(lambda col: col.map(lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) and
                                        not math.isnan(v) else v))


# ----------------------------------------------------------------------------------------------------
# the paper's tables and figures: one section function per output, section_xxx(study, opts) -> Section

def section_table1(study, opts):
    """Table 1: per (capability, safety) pair, theta_AB's accuracies and the first task's forgetting in both
    orders (percent, mean and std over seeds)."""
    rows, used, files = [], [], {}
    for c in study.capability:
        for s in study.safety:
            row = {"capability": c, "safety": s}
            for prefix, (A, B), fkey in (("cs", (c, s), "cs_forgetting_cap"), ("sc", (s, c), "sc_forgetting_safety")):
                ps = study.table1.get((A, B), [])
                mk = study.marker.get((A, B), MISSING)
                acc_c = [p.stats["acc_chained_a"] if A == c else p.stats["acc_chained_b"] for p in ps]
                acc_s = [p.stats["acc_chained_b"] if A == c else p.stats["acc_chained_a"] for p in ps]
                row[f"{prefix}_acc_cap"], row[f"{prefix}_acc_cap_std"] = cells(acc_c, marker=mk)
                row[f"{prefix}_acc_safety"], row[f"{prefix}_acc_safety_std"] = cells(acc_s, marker=mk)
                row[fkey], row[fkey + "_std"] = cells([p.stats["forgetting"] for p in ps], marker=mk)
                used += [{"first_task": A, "second_task": B, "seed": p.seed, "lr_a": p.lr_a, "lr_b": p.lr_b,
                          "first_run": p.first.name, "chained_run": p.chained.name,
                          "first_run_id": p.first.run_id, "chained_run_id": p.chained.run_id} for p in ps]
            rows.append(row)
    df = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    files["table1.csv"] = csv_text(df)
    files["table1.md"] = markdown_table(df)
    files["table1_runs.csv"] = csv_text(pd.DataFrame(used, columns=["first_task", "second_task", "seed", "lr_a",
                                                                     "lr_b", "first_run", "chained_run",
                                                                     "first_run_id", "chained_run_id"]))
    lrs = sorted({(p.A, p.B, p.lr_a, p.lr_b) for ps in study.table1.values() for p in ps})
    lr_note = "; ".join(f"{short(a)}->{short(b)} lr_a={la:g} lr_b={lb:g}" for a, b, la, lb in lrs)
    text = ("## Table 1: accuracy and forgetting in both orders\n\n"
            "cs = capability -> safety (forgetting of the capability task), sc = safety -> capability "
            "(forgetting of the safety task). Accuracy of theta_AB in percent; mean and std over seeds. "
            "([table1.csv](table1.csv), [table1.md](table1.md); the runs used: [table1_runs.csv](table1_runs.csv))\n\n"
            + markdown_table(df) + f"\nLearning rates used: {lr_note or 'none'}.\n")
    return Section(text, files)


def group_rows(study, opts):
    """Per chain of Table 1 and group: forgetting and biased forgetting (percent) with bootstrap CIs ->
    (rows per group, rows per chain, problems)."""
    rows, summary, problems = [], [], []
    for (A, B), ps in sorted(study.table1.items()):
        f_mean, f_std = cells([p.stats["forgetting"] for p in ps])
        ci = None
        if opts.n_boot > 0:
            ci, problem = chain_bootstrap(study, A, ps, opts)
            problems += [problem] if problem else []
        groups = sorted(set().union(*(p.stats["group_forgetting"] for p in ps)))
        for g in groups:
            gci = (ci or {}).get("groups", {}).get(g, {})
            bm, bs = cells([p.stats["biased"].get(g, float("nan")) for p in ps])
            fm, fs = cells([p.stats["group_forgetting"].get(g, float("nan")) for p in ps])
            rows.append({"first_task": A, "second_task": B, "group": g,
                         "n": ps[0].stats["group_n"].get(g),
                         "acc_first": cells([p.stats["group_acc_first"].get(g, float("nan")) for p in ps])[0],
                         "acc_chained": cells([p.stats["group_acc_chained"].get(g, float("nan")) for p in ps])[0],
                         "forgetting": fm, "forgetting_std": fs, "task_forgetting": f_mean,
                         "biased_forgetting": bm, "biased_forgetting_std": bs,
                         "biased_forgetting_ci_low": rounded(100 * gci.get("low", float("nan"))),
                         "biased_forgetting_ci_high": rounded(100 * gci.get("high", float("nan"))),
                         "n_seeds": len(ps)})
        mean_vec = {g: mean_std([p.stats["biased"].get(g, float("nan")) for p in ps])[0] for g in groups}
        fci, bci = (ci or {}).get("forgetting", {}), (ci or {}).get("biased_forgetting_max", {})
        mk = MISSING if groups else NA  # no groups: not applicable, not missing
        wg_m, wg_s = cells([p.stats["wg_forgetting"] for p in ps], marker=mk)
        bf_m, bf_s = cells([p.stats["biased_max"] for p in ps], marker=mk)
        tk_m, tk_s = cells([biased_forgetting(p.stats["group_forgetting"], p.stats["forgetting"], opts.k) for p in ps],
                           marker=mk)
        summary.append({"first_task": A, "second_task": B,
                        "lr_a": ";".join(sorted({f"{p.lr_a:g}" for p in ps})), "lr_b": f"{ps[0].lr_b:g}",
                        "n_seeds": len(ps), "n_groups": len(groups),
                        "forgetting": f_mean, "forgetting_std": f_std,
                        "forgetting_ci_low": rounded(100 * fci.get("low", float("nan"))),
                        "forgetting_ci_high": rounded(100 * fci.get("high", float("nan"))),
                        "wg_forgetting": wg_m, "wg_forgetting_std": wg_s,
                        "worst_group": worst_groups_label(mean_vec, 1),
                        "biased_forgetting_max": bf_m, "biased_forgetting_max_std": bf_s,
                        "biased_forgetting_max_ci_low": rounded(100 * bci.get("low", float("nan"))),
                        "biased_forgetting_max_ci_high": rounded(100 * bci.get("high", float("nan"))),
                        "k": opts.k, f"biased_forgetting_top{opts.k}": tk_m,
                        f"biased_forgetting_top{opts.k}_std": tk_s,
                        f"worst_{opts.k}_groups": worst_groups_label(mean_vec, opts.k)})
    return rows, summary, problems


def bootstrap_chain(A, ps, opts):
    """paired_bootstrap_ci over the test examples of task A shared by every seed's theta_A and theta_AB ->
    (its result or None, the problem that stopped it or a check failed, or None)."""
    per_seed = []
    for p in ps:
        records_first, records_chained = load_samples(p.first), load_samples(p.chained)
        if records_first is None or records_chained is None:
            missing = p.first if records_first is None else p.chained
            return None, f"{missing.name}: no samples file beside eval.json; no bootstrap CI for {p.A}->{p.B}"
        try:
            per_seed.append({i: (ca, cb, g) for i, ca, cb, g in zip(*align_samples(records_first, records_chained,
                                                                                   A))})
        except ValueError as e:
            return None, f"{p.first.name} and {p.chained.name}: {e}; no bootstrap CI for {p.A}->{p.B}"
    ids = sorted(per_seed[0])
    if any(set(d) != set(ids) for d in per_seed[1:]):  # resampling one example set needs the same one per seed
        return None, (f"{A}->{ps[0].B}: the seeds were evaluated on different examples ("
                      + ", ".join(f"seed {p.seed}: {len(d)}" for p, d in zip(ps, per_seed))
                      + "); no bootstrap CI over seeds (evaluate every seed with the same --limit and --seed)")
    if not ids:
        return None, f"{A}->{ps[0].B}: the samples files hold no example of {A}; no bootstrap CI"
    correct_first = np.array([[d[i][0] for i in ids] for d in per_seed])
    correct_chained = np.array([[d[i][1] for i in ids] for d in per_seed])
    res = paired_bootstrap_ci(correct_first, correct_chained, [per_seed[0][i][2] for i in ids],
                              n_resamples=opts.n_boot, seed=opts.boot_seed, level=opts.ci, k=opts.k)
    want = np.mean([p.stats["forgetting"] for p in ps])
    if abs(res["forgetting"]["estimate"] - want) > 1e-6:
        return res, (f"{A}->{ps[0].B}: the samples files give forgetting {100 * res['forgetting']['estimate']:.2f} "
                     f"but eval.json {100 * want:.2f}; re-run evaluate.py")
    return res, None


def chain_bootstrap(study, A, ps, opts):
    """bootstrap_chain, computed once per chain and options for every section that shows its CIs."""
    key = ("bootstrap", A, ps[0].B, tuple(p.chained.run_id for p in ps), opts.n_boot, opts.boot_seed, opts.ci, opts.k)
    if key not in study.cache:
        study.cache[key] = bootstrap_chain(A, ps, opts)
    return study.cache[key]


def section_groups(study, opts):
    """forgetting_by_group.csv (per group), biased_forgetting.csv (per chain) and kendall_tau.csv."""
    rows, summary, problems = group_rows(study, opts)
    files = {}
    by_group = pd.DataFrame(rows, columns=["first_task", "second_task", "group", "n", "acc_first", "acc_chained",
                                           "forgetting", "forgetting_std", "task_forgetting",
                                           "biased_forgetting", "biased_forgetting_std",
                                           "biased_forgetting_ci_low", "biased_forgetting_ci_high", "n_seeds"])
    files["forgetting_by_group.csv"] = csv_text(by_group)
    bf = pd.DataFrame(summary)
    if bf.empty:
        bf = pd.DataFrame(columns=["first_task", "second_task", "forgetting", "biased_forgetting_max"])
    files["biased_forgetting.csv"] = csv_text(bf)

    # Kendall's tau-b between the group rankings for the same first task and different second tasks
    kt = []
    vec = {(A, B): {g: mean_std([p.stats["biased"].get(g, float("nan")) for p in ps])[0]
                    for g in set().union(*(p.stats["biased"] for p in ps))}
           for (A, B), ps in study.table1.items()}
    for A in sorted({a for a, _ in vec}):
        seconds = sorted(b for a, b in vec if a == A and vec[(a, b)])
        for i, b1 in enumerate(seconds):
            for b2 in seconds[i + 1:]:
                tau, pv, n = kendall_tau_b(vec[(A, b1)], vec[(A, b2)])
                kt.append({"first_task": A, "second_task_1": b1, "second_task_2": b2, "n_groups": n,
                           "tau_b": rounded(tau), "p_value": rounded(pv, 6)})
    kt = pd.DataFrame(kt, columns=["first_task", "second_task_1", "second_task_2", "n_groups", "tau_b", "p_value"])
    files["kendall_tau.csv"] = csv_text(kt)

    cols = ["first_task", "second_task", "n_seeds", "forgetting", "forgetting_ci_low", "forgetting_ci_high",
            "wg_forgetting", "worst_group", "biased_forgetting_max", "biased_forgetting_max_ci_low",
            "biased_forgetting_max_ci_high", f"worst_{opts.k}_groups"]
    grouped = bf[bf["n_groups"] > 0][cols] if "n_groups" in bf else bf
    ci_note = (f"{100 * opts.ci:g}% paired bootstrap CIs over test examples ({opts.n_boot} resamples, "
               f"seed {opts.boot_seed}; columns *_ci_low/high). The max over groups is biased upward by noise, "
               "so its CI can sit above the estimate; a group's own CI (forgetting_by_group.csv) says whether "
               "its gap is noise" if opts.n_boot else "no bootstrap (--n_boot 0)")
    text = ("## Biased forgetting\n\nPer chain of Table 1, tasks with groups (percent, mean over seeds; groups tied "
            "for a place are named together, \"a = b (tied)\"; "
            f"{ci_note}). The whole per-group vector is in [forgetting_by_group.csv](forgetting_by_group.csv); "
            "every chain in [biased_forgetting.csv](biased_forgetting.csv).\n\n"
            + (markdown_table(grouped) if len(grouped) else "No chain with a grouped first task.\n")
            + "\n## Kendall's tau-b between group rankings\n\nSame first task, different second tasks, "
            "rankings of the groups' biased forgetting ([kendall_tau.csv](kendall_tau.csv)).\n\n"
            + (markdown_table(kt, 3) if len(kt) else "No first task with groups followed by two second tasks.\n"))
    return Section(text, files, problems)


def section_figure2(study, opts):
    """Figure 2: relative forgetting (%) of the capability task (cap->safety) and of the safety task
    (safety->cap) for each pair."""
    rows = []
    for c in study.capability:
        for s in study.safety:
            rc = cells([p.stats["relative_forgetting"] for p in study.table1.get((c, s), [])],
                       marker=study.marker.get((c, s), MISSING))
            rs = cells([p.stats["relative_forgetting"] for p in study.table1.get((s, c), [])],
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
    n_seeds = max([len(ps) for ps in study.table1.values()] or [0])
    ax.set_title("Relative forgetting of the first task, mean over seeds"
                 + (" (error bar = std over seeds)" if n_seeds > 1 else " (one seed: no error bar)"))
    ax.legend()
    return Section("## Figure 2: relative forgetting\n\n![figure 2](figure2.png)\n\n"
                   "Relative forgetting (%) = forgetting / first-task accuracy of theta_A: the capability task in "
                   "capability -> safety, the safety task in safety -> capability ([figure2.csv](figure2.csv)).\n",
                   figure_files(fig, df, "figure2"))


GROUP_BAR_COLUMNS = ["first_task", "second_task", "group", "forgetting", "forgetting_std", "task_forgetting",
                     "n_seeds", "biased_forgetting", "biased_forgetting_ci_low", "biased_forgetting_ci_high"]


def group_bar_rows(study, opts, chains):
    """Per chain and group: forgetting (percent, mean over seeds), the task's average, and the group's biased
    forgetting with its bootstrap CI (the CI of the group's gap from the average)."""
    rows = []
    for A, B in chains:
        ps = study.table1[(A, B)]
        ci = chain_bootstrap(study, A, ps, opts)[0] if opts.n_boot > 0 else None
        task_f = cells([p.stats["forgetting"] for p in ps])[0]
        for g in sorted(set().union(*(p.stats["group_forgetting"] for p in ps))):
            m, sd = cells([p.stats["group_forgetting"].get(g, float("nan")) for p in ps])
            gci = ((ci or {}).get("groups") or {}).get(g, {})
            rows.append({"first_task": A, "second_task": B, "group": g, "forgetting": m, "forgetting_std": sd,
                         "task_forgetting": task_f, "n_seeds": len(ps),
                         "biased_forgetting": cells([p.stats["biased"].get(g, float("nan")) for p in ps])[0],
                         "biased_forgetting_ci_low": rounded(100 * gci.get("low", float("nan"))),
                         "biased_forgetting_ci_high": rounded(100 * gci.get("high", float("nan")))})
    return pd.DataFrame(rows, columns=GROUP_BAR_COLUMNS)


def _num(values):
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=float)


def _group_bars(ax, d, title):
    """One chain's per-group forgetting as horizontal bars, the task's average as a dotted line, and each group's
    CI of its gap from that average as an error bar around the bar's end (red: CI above the average, blue: below,
    grey: it includes the average)."""
    ax.set_title(title, fontsize=9)
    f, tf = _num(d.forgetting), _num(d.task_forgetting)[0]
    if np.all(np.nan_to_num(f) == 0) and tf == 0:
        ax.text(0.5, 0.5, "no forgetting (every group 0)", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks(range(len(d)), list(d.group), fontsize=7)
        return
    order = np.argsort(np.nan_to_num(f, nan=-np.inf))
    d, f = d.iloc[order], f[order]
    lo, hi = tf + _num(d.biased_forgetting_ci_low), tf + _num(d.biased_forgetting_ci_high)
    colour = ["tab:red" if l > tf else "tab:blue" if h < tf else "tab:gray" for l, h in zip(lo, hi)]
    y = np.arange(len(d))
    ax.barh(y, np.nan_to_num(f), color=colour, alpha=0.8)
    have = ~np.isnan(lo) & ~np.isnan(hi)
    if have.any():
        ax.errorbar(f[have], y[have], xerr=[np.maximum(f[have] - lo[have], 0), np.maximum(hi[have] - f[have], 0)],
                    fmt="none", ecolor="black", capsize=2, linewidth=0.8)
    ax.axvline(tf, linestyle=":", color="tab:blue", label=f"task average {tf:.2f}%")
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_yticks(y, list(d.group), fontsize=7)
    ax.set_xlabel("forgetting (%)")
    ax.legend(fontsize=7, loc="lower right")


def _group_figure(study, opts, firsts, seconds, empty_note):
    """A grid of _group_bars panels (rows: first tasks, columns: second tasks) -> (figure, its rows)."""
    chains = [(a, b) for a in firsts for b in seconds
              if any(p.stats["group_forgetting"] for p in study.table1.get((a, b), []))]
    df = group_bar_rows(study, opts, chains)
    rows_used = [a for a in firsts if any(c[0] == a for c in chains)]
    cols_used = [b for b in seconds if any(c[1] == b for c in chains)]
    if not chains:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, empty_note, ha="center", va="center")
        ax.axis("off")
        return fig, df
    n_groups = df.groupby(["first_task", "second_task"]).size().max()
    fig, axes = plt.subplots(len(rows_used), len(cols_used), squeeze=False,
                             figsize=(4.4 * len(cols_used), 0.32 * n_groups * len(rows_used) + 1.8))
    for i, A in enumerate(rows_used):
        for j, B in enumerate(cols_used):
            ax, d = axes[i][j], df[(df.first_task == A) & (df.second_task == B)]
            if d.empty:
                ax.text(0.5, 0.5, f"{study.marker.get((A, B), MISSING)}: no runs", ha="center", va="center")
                ax.set_title(f"{short(A)} -> {short(B)}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            _group_bars(ax, d, f"{short(A)} -> {short(B)}")
    fig.tight_layout()
    return fig, df


GROUP_FIGURE_NOTE = ("Bars: per-group forgetting (%), mean over seeds; dotted line: the first task's average "
                     "forgetting. Error bar: the {ci} bootstrap CI of the group's gap from that average (its biased "
                     "forgetting) drawn around the bar's end; red: the CI lies above the average, blue: below, grey: "
                     "it includes the average (that group's gap may be noise).")


def _group_note(opts):
    if opts.n_boot <= 0:
        return ("Bars: per-group forgetting (%), mean over seeds; dotted line: the first task's average forgetting "
                "(no CIs: --n_boot 0).")
    return GROUP_FIGURE_NOTE.format(ci=f"{100 * opts.ci:g}%")


def section_figure3(study, opts):
    """Figure 3: per-group forgetting bars for each safety -> capability chain with the groups' CIs, dotted line at
    the task's average forgetting."""
    fig, df = _group_figure(study, opts, study.safety, study.capability,
                            "no safety -> capability chain with groups")
    return Section("## Figure 3: forgetting by group (safety -> capability)\n\n![figure 3](figure3.png)\n\n"
                   + _group_note(opts) + " ([figure3.csv](figure3.csv))\n", figure_files(fig, df, "figure3"))


def section_figures_9_10(study, opts):
    """Figures 9 and 10 (the appendix): biased forgetting by group for ToxiGen -> capability and BBQ -> capability,
    one panel per capability task, the task's average as a dotted line."""
    files, text = {}, "## Figures 9 and 10: biased forgetting by group, per capability task\n\n"
    for stem, A in (("figure9", "toxigen"), ("figure10", "bbq")):
        fig, df = _group_figure(study, opts, [A], study.capability, f"no {short(A)} -> capability chain in these runs")
        files.update(figure_files(fig, df, stem))
        text += f"### {stem.replace('figure', 'Figure ')}: {short(A)} -> capability\n\n![{stem}]({stem}.png) " \
                f"([{stem}.csv]({stem}.csv))\n\n"
    return Section(text + _group_note(opts) + "\n", files)


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
            by_lr[getattr(p, which)].append(p.stats["forgetting"])
        for lr in sorted(by_lr):
            m, s = cells(by_lr[lr])
            order = ("safety->capability" if A in SAFETY_TASKS and B in CAPABILITY_TASKS
                     else "capability->safety" if A in CAPABILITY_TASKS and B in SAFETY_TASKS else "other")
            rows.append({"first_task": A, "second_task": B, "order": order, which: lr, "forgetting": m,
                         "forgetting_std": s, "n_seeds": len(by_lr[lr])})
    return pd.DataFrame(rows, columns=["first_task", "second_task", "order", which, "forgetting",
                                       "forgetting_std", "n_seeds"])


MARKERS = "osD^vPX<>"


def chain_colours(chains):
    """A fixed colour per chain (the same in every figure), from a 20-colour map."""
    cmap = plt.get_cmap("tab20" if len(chains) > 10 else "tab10")
    return {c: cmap(i % cmap.N) for i, c in enumerate(sorted(chains))}


def _lr_plot(ax, df, which, colours=None):
    """Forgetting against lr, one line per chain: its own colour and marker, and the chains' points shifted a
    little apart on the log axis so that equal values do not hide each other."""
    groups = list(df.groupby(["first_task", "second_task"], sort=True)) if len(df) else []
    colours = colours or chain_colours([k for k, _ in groups])
    for i, ((A, B), d) in enumerate(groups):
        y = pd.to_numeric(d.forgetting, errors="coerce")
        e = pd.to_numeric(d.forgetting_std, errors="coerce").fillna(0)
        shift = 10 ** (0.02 * (i - (len(groups) - 1) / 2))
        ax.errorbar(d[which].astype(float) * shift, y, yerr=e, marker=MARKERS[i % len(MARKERS)], capsize=3,
                    color=colours.get((A, B)), alpha=0.9, label=f"{short(A)} -> {short(B)}")
    ax.set_xscale("log")
    ax.set_xlabel(("first-task lr" if which == "lr_a" else "second-task lr") + " (points shifted slightly apart)")
    ax.set_ylabel("forgetting of the first task (%)")
    ax.axhline(0, color="black", linewidth=0.5)
    if len(df):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)


def section_lr_figures(study, opts):
    """Figures 5 and 6 (safety -> capability: forgetting vs first- / second-task lr) and Figure 8 (every
    chain, both orders, both lrs)."""
    sa, sb = lr_series(study, "lr_a"), lr_series(study, "lr_b")
    colours = chain_colours({(p.A, p.B) for p in study.pairs})
    files = {}
    text = "## Forgetting against learning rate (Figures 5, 6, 8)\n\n"
    for stem, df, which, title in (("figure5", sa[sa.order == "safety->capability"], "lr_a",
                                    "Figure 5: safety -> capability, first-task lr varies"),
                                   ("figure6", sb[sb.order == "safety->capability"], "lr_b",
                                    "Figure 6: safety -> capability, second-task lr varies")):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        _lr_plot(ax, df, which, colours)
        ax.set_title(title)
        files.update(figure_files(fig, df, stem))
        n_lr = df.groupby(["first_task", "second_task"])[which].nunique().max() if len(df) else 0
        note = "" if n_lr and n_lr > 1 else " (no learning-rate sweep found in these runs: one point per chain)"
        text += f"### {title}{note}\n\n![{stem}]({stem}.png) ([{stem}.csv]({stem}.csv))\n\n"
    both = pd.concat([sa.rename(columns={"lr_a": "lr"}).assign(varied="lr_a"),
                      sb.rename(columns={"lr_b": "lr"}).assign(varied="lr_b")], ignore_index=True)
    both = both[["varied", "first_task", "second_task", "order", "lr", "forgetting", "forgetting_std", "n_seeds"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, which, d in ((axes[0], "lr_a", sa), (axes[1], "lr_b", sb)):
        _lr_plot(ax, d, which, colours)
    axes[0].set_title("(a) by first-task lr")
    axes[1].set_title("(b) by second-task lr")
    files.update(figure_files(fig, both, "figure8"))
    text += "### Figure 8: every chain, both orders\n\n![figure8](figure8.png) ([figure8.csv](figure8.csv))\n\n"
    if study.main_lr:
        text += (f"Second-stage lr held at the main lr ({study.main_lr:g}) in (a); in (b) the first-stage models "
                 "are those of Table 1.\n")
    return Section(text, files)


def section_first_task_acc(study, opts):
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
    table = markdown_table(df.assign(lr=df.lr.map("{:g}".format)))
    return Section("## First-task accuracy per learning rate\n\nTest (and validation) accuracy of theta_A in "
                   "percent, mean over seeds ([first_task_acc_by_lr.csv](first_task_acc_by_lr.csv)).\n\n" + table,
                   {"first_task_acc_by_lr.csv": csv_text(df), "first_task_acc_by_lr.md": table})


CHANCE_COLUMNS = ["run", "chain", "seed", "task", "n", "acc", "chance", "at_chance", "why"]


def section_chance(study, opts):
    """chance.csv: every accuracy of the two-stage study's evaluations with its chance level (chance_flag), and
    the list of those at chance level: a forgetting or a group ranking read from them says little."""
    rows, unchecked = [], []
    for r in study.runs:
        if r.problem or not r.eval:
            continue
        records = load_samples(r)
        if records is None:
            unchecked.append(r.name)
            continue
        for task, block in sorted(r.eval["tasks"].items()):
            of_task = [x for x in records if x.get("task") == task]
            if not of_task:
                continue
            chance, why = chance_flag(block["acc"], of_task)
            rows.append({"run": r.name, "chain": "->".join(r.chain), "seed": r.seed, "task": task, "n": len(of_task),
                         "acc": rounded(100 * float(block["acc"])), "chance": rounded(100 * chance),
                         "at_chance": why is not None, "why": why or NA})
    head = "## Accuracies at chance level\n\n"
    if not rows:
        return Section(head + "No samples files beside the eval.json files: chance level not checked.\n")
    df = pd.DataFrame(rows, columns=CHANCE_COLUMNS)
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
    return Section(text, {"chance.csv": csv_text(df)})




# ----------------------------------------------------------------------------------------------------
# Table 2 and the pictures beside the tables

# The paper's Table 2: train size, test size, groups, labels (None: none given).
PAPER_TABLE2 = {"arc": (2241, 2365, None, 4), "csqa": (2242, 1221, None, 5), "csqa2": (2242, 2541, None, 2),
                "toxigen": (2236, 4455, 13, 2), "bbq": (2241, 31107, 9, 3), "saferdialogues": (6306, 788, None, None)}
TABLE2_COLUMNS = ["task", "name", "train_size", "paper_train_size", "test_size", "test_pool", "paper_test_size",
                  "groups", "paper_groups", "labels", "paper_labels", "data_source", "data_options"]


def _joined(values):
    vals = sorted({str(v) for v in values if v is not None})
    return ";".join(vals) if vals else MISSING


def train_info(run):
    data = run.meta.get("data") if isinstance(run.meta.get("data"), dict) else {}
    return data.get("train_info") if isinstance(data.get("train_info"), dict) else {}


def section_table2(study, opts):
    """Table 2: per task, the training and test sets the runs used (run.json's data info, eval.json's task blocks)
    beside the paper's numbers."""
    rows = []
    for task in [t for t in CAPABILITY_TASKS + SAFETY_TASKS if t in study.capability + study.safety]:
        firsts = [r for r in study.runs if r.stage == 1 and r.task == task]
        infos = [train_info(r) for r in firsts]
        trains = [(r.meta.get("data") or {}).get("n_train") for r in firsts]
        blocks = [r.eval["tasks"][task] for r in study.runs if r.eval and task in r.eval.get("tasks", {})]
        pools = [((b.get("data_info") or {}).get("pool_size")) for b in blocks]
        groups = [len(b.get("groups") or {}) for b in blocks] + [i.get("n_groups") for i in infos if i.get("n_groups")]
        labels = [i.get("n_labels") for i in infos]
        if not any(labels):  # an older run.json: the options scored in the first stages' samples files
            labels = [max((x.get("n_options") or 0 for x in load_samples(r) or [] if x.get("task") == task),
                          default=None) for r in firsts if not r.problem]
        options = sorted({f"{k}={i[k]}" for i in infos for k in ("arc_choices", "test_set", "cells") if k in i}
                         | {f"human_validation={'used' if i['human_validation'].get('used') else 'absent'}"
                            for i in infos if isinstance(i.get("human_validation"), dict)})
        paper = PAPER_TABLE2.get(task, (None,) * 4)
        rows.append({"task": task, "name": TASK_NAMES.get(task, task), "train_size": _joined(trains),
                     "paper_train_size": paper[0] or NA, "test_size": _joined(b.get("n") for b in blocks),
                     "test_pool": _joined(pools) if any(p is not None for p in pools) else NA,
                     "paper_test_size": paper[1] or NA,
                     "groups": _joined(g for g in groups if g) if any(groups) else (0 if blocks else MISSING),
                     "paper_groups": paper[2] or NA, "labels": _joined(labels) if any(labels) else MISSING,
                     "paper_labels": paper[3] or NA, "data_source": _joined(b.get("source") for b in blocks),
                     "data_options": ";".join(options) or NA})
    df = pd.DataFrame(rows, columns=TABLE2_COLUMNS)
    table = markdown_table(df.drop(columns=["name"]))
    text = ("## Table 2: the data sets, this run beside the paper\n\n"
            "Training examples (run.json data.n_train of the first-stage runs), test examples evaluated (eval.json n; "
            "test_pool: the whole test split where eval.json records it, else n/a), groups and labels, against the "
            "paper's Table 2 ([table2.csv](table2.csv), [table2.md](table2.md)). Several values (seeds, learning "
            "rates) are joined with \";\".\n\n" + table)
    return Section(text, {"table2.csv": csv_text(df), "table2.md": table})


def section_forgetting_heatmap(study, opts):
    """figure_forgetting_heatmap: Table 1's forgetting of the first task, first task x second task."""
    tasks = study.capability + study.safety
    studied = set(study.table1) | set(study.marker)  # the chains the study has or asks for (cs and sc orders)
    rows = []
    for A in tasks:
        for B in tasks:
            if A == B or (A, B) not in studied:
                continue
            ps = study.table1.get((A, B), [])
            m, sd = cells([p.stats["forgetting"] for p in ps], marker=study.marker.get((A, B), MISSING))
            rows.append({"first_task": A, "second_task": B, "forgetting": m, "forgetting_std": sd,
                         "n_seeds": len(ps)})
    df = pd.DataFrame(rows, columns=["first_task", "second_task", "forgetting", "forgetting_std", "n_seeds"])
    grid = np.full((len(tasks), len(tasks)), np.nan)
    for r in rows:
        if not isinstance(r["forgetting"], str):
            grid[tasks.index(r["first_task"]), tasks.index(r["second_task"])] = r["forgetting"]
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2.5, 1.0 * len(tasks) + 1.5))
    lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1)
    for r in rows:
        i, j = tasks.index(r["first_task"]), tasks.index(r["second_task"])
        v = r["forgetting"]
        ax.text(j, i, v if isinstance(v, str) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                color="gray" if isinstance(v, str) else "white" if abs(v) > 0.6 * (lim or 1) else "black")
    for i, A in enumerate(tasks):
        for j, B in enumerate(tasks):
            if A == B or (A, B) not in studied:
                ax.text(j, i, "-", ha="center", va="center", color="lightgray")
    ax.set_xticks(range(len(tasks)), [short(t) for t in tasks], rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), [short(t) for t in tasks])
    ax.set_xlabel("second task (B)")
    ax.set_ylabel("first task (A), the one forgotten")
    ax.set_title("Forgetting of A after A -> B (%), Table 1")
    fig.colorbar(im, ax=ax, label="forgetting (%)")
    return Section("## Forgetting at a glance\n\n![forgetting heatmap](figure_forgetting_heatmap.png)\n\nTable 1's "
                   "forgetting of the first task (row) after tuning on the second (column), percent, mean over seeds; "
                   "red: forgotten, blue: improved; \"-\": a chain the study does not run "
                   "([figure_forgetting_heatmap.csv](figure_forgetting_heatmap.csv)).\n",
                   figure_files(fig, df, "figure_forgetting_heatmap"))


def section_group_heatmap(study, opts):
    """figure_group_heatmap: biased forgetting per group (rows) and chain (columns), one panel per first task with
    groups, each cell with its bootstrap CI."""
    chains = sorted((a, b) for (a, b), ps in study.table1.items() if any(p.stats["group_forgetting"] for p in ps))
    df = group_bar_rows(study, opts, chains)
    firsts = sorted({a for a, _ in chains}, key=lambda t: (CAPABILITY_TASKS + SAFETY_TASKS).index(t)
                    if t in CAPABILITY_TASKS + SAFETY_TASKS else 99)
    if not chains:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no chain with a grouped first task", ha="center", va="center")
        ax.axis("off")
    else:
        fig, axes = plt.subplots(1, len(firsts), squeeze=False, figsize=(3.2 * len(firsts) + 3,
                                                                         0.4 * df.group.nunique() + 2))
        for ax, A in zip(axes[0], firsts):
            d = df[df.first_task == A]
            groups, seconds = sorted(d.group.unique()), [b for a, b in chains if a == A]
            grid = np.full((len(groups), len(seconds)), np.nan)
            labels = {}
            for r in d.itertuples(index=False):
                v = _num([r.biased_forgetting])[0]
                grid[groups.index(r.group), seconds.index(r.second_task)] = v
                lo, hi = r.biased_forgetting_ci_low, r.biased_forgetting_ci_high
                label = "n/a" if math.isnan(v) else f"{v:.1f}"
                if not isinstance(lo, str) and not isinstance(hi, str):
                    label += f"\n[{lo:.1f}, {hi:.1f}]" + ("*" if lo > 0 or hi < 0 else "")
                labels[(groups.index(r.group), seconds.index(r.second_task))] = (label, v)
            lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
            for (i, j), (label, v) in labels.items():  # white text on the dark end of the colour map
                ax.text(j, i, label, ha="center", va="center", fontsize=6,
                        color="white" if abs(np.nan_to_num(v)) > 0.6 * (lim or 1) else "black")
            ax.imshow(grid, cmap="RdBu_r", vmin=-(lim or 1), vmax=lim or 1, aspect="auto")
            ax.set_xticks(range(len(seconds)), [short(b) for b in seconds], rotation=30, ha="right")
            ax.set_yticks(range(len(groups)), groups, fontsize=7)
            ax.set_title(f"{short(A)} -> B: biased forgetting (%)", fontsize=9)
        fig.tight_layout()
    ci = (f"{100 * opts.ci:g}% bootstrap CI in brackets; * marks a CI that excludes 0" if opts.n_boot > 0
          else "no CIs (--n_boot 0)")
    return Section("## Biased forgetting per group and chain\n\n![group heatmap](figure_group_heatmap.png)\n\n"
                   "Each cell: a group's forgetting minus its task's average (percent, mean over seeds; red: forgot "
                   f"more than average), {ci} ([figure_group_heatmap.csv](figure_group_heatmap.csv)).\n",
                   figure_files(fig, df, "figure_group_heatmap"))


def base_evaluations(study):
    """{task: accuracy} of the base model theta_0: an eval.json in a folder without run.json whose "model" is the
    runs' base model (or whose folder is named "base"); {} when the study did not evaluate it."""
    bases = {str(r.meta.get("base_model")) for r in study.runs if r.meta.get("base_model")}
    out = {}
    for rel, ev in find_json_files(study.runs_dir, "eval.json", EVAL_FIX):
        folder = os.path.join(study.runs_dir, os.path.dirname(rel))
        if os.path.isfile(os.path.join(folder, "run.json")) or not isinstance(ev.get("tasks"), dict):
            continue
        if str(ev.get("model")) in bases or os.path.basename(folder) == "base":
            for t, block in ev["tasks"].items():
                if isinstance(block, dict) and isinstance(block.get("acc"), (int, float)):
                    out.setdefault(t, float(block["acc"]))
    return out


def section_accuracy_path(study, opts):
    """figure_accuracy_path: per Table-1 chain, the accuracy on A and B of theta_0 (when evaluated), theta_A and
    theta_AB."""
    base = base_evaluations(study)
    rows = []
    for (A, B), ps in sorted(study.table1.items()):
        for task in (A, B):
            first = [p.first.acc(task) for p in ps]
            chained = [p.chained.acc(task) for p in ps]
            rows.append({"first_task": A, "second_task": B, "task": task,
                         "acc_theta0": rounded(100 * base[task]) if task in base else MISSING,
                         "acc_theta_a": cells([v for v in first if not math.isnan(v)], marker=NA)[0],
                         "acc_theta_ab": cells(chained)[0], "n_seeds": len(ps)})
    df = pd.DataFrame(rows, columns=["first_task", "second_task", "task", "acc_theta0", "acc_theta_a", "acc_theta_ab",
                                     "n_seeds"])
    chains = sorted(study.table1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = chain_colours(chains)
    for ax, which in zip(axes, ("first", "second")):
        for i, (A, B) in enumerate(chains):
            d = df[(df.first_task == A) & (df.second_task == B) & (df.task == (A if which == "first" else B))]
            if d.empty:
                continue
            y = _num([d.acc_theta0.iloc[0], d.acc_theta_a.iloc[0], d.acc_theta_ab.iloc[0]])
            ax.plot([0, 1, 2], y, marker=MARKERS[i % len(MARKERS)], color=colours[(A, B)],
                    label=f"{short(A)} -> {short(B)}")
        ax.set_xticks([0, 1, 2], ["theta_0 (base)", "theta_A", "theta_AB"])
        ax.set_title("accuracy on the first task A" if which == "first" else "accuracy on the second task B")
        ax.set_ylabel("accuracy (%)")
    if chains:
        axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    note = ("" if base else " theta_0 was not evaluated in these runs (no eval.json of the base model), so the lines "
            "start at theta_A.")
    return Section("## Accuracy along each chain\n\n![accuracy path](figure_accuracy_path.png)\n\nTest accuracy "
                   "(percent, mean over seeds) of the base model, the first-stage model and the chained model, on the "
                   "first task (left; its drop from theta_A to theta_AB is the forgetting) and on the second task "
                   f"(right; theta_A is evaluated on it only when its eval.json holds it).{note} "
                   "([figure_accuracy_path.csv](figure_accuracy_path.csv))\n",
                   figure_files(fig, df, "figure_accuracy_path"))


def read_train_log(run):
    """[(step, loss)] from a run's train_log.jsonl, [] without one."""
    path = os.path.join(run.path, "train_log.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                row = json.loads(line)
                out.append((int(row["step"]), float(row["loss"])))
    return out


def section_loss_curves(study, opts):
    """figure_loss_curves: training loss per step (train_log.jsonl) of the Table-1 models: first stages (left) and
    chained second stages (right)."""
    used = {}
    for ps in study.table1.values():
        for p in ps:
            used[p.first.run_id] = p.first
            used[p.chained.run_id] = p.chained
    rows = []
    for r in sorted(used.values(), key=lambda r: r.name):
        for step, loss in read_train_log(r):
            rows.append({"run": r.name, "chain": "->".join(r.chain), "stage": r.stage, "lr": r.lr, "seed": r.seed,
                         "step": step, "loss": exact(loss)})
    df = pd.DataFrame(rows, columns=["run", "chain", "stage", "lr", "seed", "step", "loss"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, stage in zip(axes, (1, 2)):
        d = df[df.stage == stage]
        chains = sorted(d.chain.unique())
        colours = chain_colours(chains)
        for c in chains:
            for k, (run, g) in enumerate(d[d.chain == c].groupby("run", sort=True)):
                ax.plot(g.step, g.loss, color=colours[c], linewidth=1, label=c.replace("->", " -> ") if k == 0 else None)
        ax.set_title("first stage (theta_A)" if stage == 1 else "second stage (theta_AB)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (answer-token NLL)")
        if chains:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no train_log.jsonl", ha="center", va="center", transform=ax.transAxes)
    missing = sorted(r.name for r in used.values() if not read_train_log(r))
    text = ("## Training loss\n\n![loss curves](figure_loss_curves.png)\n\nThe loss finetune.py minimised at every "
            "step (train_log.jsonl) for the models of Table 1, one colour per chain, one line per seed "
            "([figure_loss_curves.csv](figure_loss_curves.csv)).\n")
    if missing:
        text += f"\nNo train_log.jsonl: {', '.join(missing)}.\n"
    return Section(text, figure_files(fig, df, "figure_loss_curves"))


# ----------------------------------------------------------------------------------------------------
# Findings: the paper's claims checked against this run (report.md's first section)

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "not reproduced", "not testable here"


def _csv_of(files, name):
    """A table another section wrote (its CSV text), headers without their unit; None when it did not."""
    if name not in files:
        return None
    df = pd.read_csv(io.StringIO(files[name]), keep_default_na=False)
    return df.rename(columns=lambda c: re.sub(r" \(%\)$", "", c))


def _f(v):
    """A cell as a float (nan for missing, n/a, ...)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _ci_text(lo, hi):
    return f" (CI {lo:.2f} to {hi:.2f})" if not (math.isnan(lo) or math.isnan(hi)) else ""


def finding_order(study, files):
    """Safety tasks are forgotten more than capability tasks when tuned first (Table 1 / Figure 2)."""
    bf = _csv_of(files, "biased_forgetting.csv")
    ci = {} if bf is None else {(r.first_task, r.second_task): (_f(r.forgetting_ci_low), _f(r.forgetting_ci_high))
                                for r in bf.itertuples(index=False)}
    pairs, lines = 0, []
    more = forgot = 0  # pairs where the safety task forgot more; where its forgetting CI lies above zero
    for c in study.capability:
        for s in study.safety:
            sc, cs = study.table1.get((s, c)), study.table1.get((c, s))
            if not sc or not cs:
                continue
            f_sc = float(np.mean([p.stats["forgetting"] for p in sc])) * 100
            f_cs = float(np.mean([p.stats["forgetting"] for p in cs])) * 100
            pairs += 1
            more += f_sc > f_cs
            forgot += _f(ci.get((s, c), (math.nan,) * 2)[0]) > 0
            lines.append(f"{short(s)} -> {short(c)} forgets {f_sc:.2f}{_ci_text(*ci.get((s, c), (math.nan,) * 2))} "
                         f"vs {short(c)} -> {short(s)} {f_cs:.2f}{_ci_text(*ci.get((c, s), (math.nan,) * 2))}")
    if not pairs:
        return ("Safety tasks are forgotten more than capability tasks when tuned first (Table 1, Figure 2)",
                NOT_TESTABLE, "no capability/safety pair has both orders in these runs.")
    p = stats.binomtest(more, pairs, 0.5, alternative="greater").pvalue
    have_ci = any(not math.isnan(_f(lo)) for lo, _ in ci.values())
    # more forgetting than the other order is not enough: the safety task has to forget at all
    verdict = REPRODUCED if more * 2 > pairs and (forgot or not have_ci) else NOT_REPRODUCED
    return ("Safety tasks are forgotten more than capability tasks when tuned first (Table 1, Figure 2)", verdict,
            f"the safety task forgot more in {more} of {pairs} pairs (one-sided sign test p = {p:.3g})"
            + (f", and its forgetting CI lies above zero in {forgot}" if have_ci else "") + "; "
            + "; ".join(lines) + " (forgetting in points, 95% bootstrap CIs where computed).")


def finding_groups(study, files, opts):
    """Forgetting is uneven across groups: groups whose biased-forgetting CI lies above zero."""
    claim = "Forgetting is uneven across demographic groups (Figures 3, 9, 10)"
    fg = _csv_of(files, "forgetting_by_group.csv")
    if fg is None or fg.empty:
        return claim, NOT_TESTABLE, "no chain with a grouped first task (ToxiGen or BBQ first) in these runs."
    if opts.n_boot <= 0:
        return claim, NOT_TESTABLE, "no bootstrap CIs (--n_boot 0): whether a group's gap is noise is not known."
    lines, any_above = [], False
    for (A, B), d in fg.groupby(["first_task", "second_task"], sort=True):
        above = [r.group for r in d.itertuples(index=False) if _f(r.biased_forgetting_ci_low) > 0]
        below = [r.group for r in d.itertuples(index=False) if _f(r.biased_forgetting_ci_high) < 0]
        worst = d.iloc[int(np.nanargmax(_num(d.biased_forgetting)))] if np.isfinite(_num(d.biased_forgetting)).any() \
            else None
        any_above |= bool(above)
        lines.append(f"{short(A)} -> {short(B)}: {len(above)} of {len(d)} groups forgot significantly more than "
                     f"average ({', '.join(above) or 'none'}), {len(below)} less"
                     + (f"; largest gap {worst.group} {_f(worst.biased_forgetting):+.2f} points"
                        f"{_ci_text(_f(worst.biased_forgetting_ci_low), _f(worst.biased_forgetting_ci_high))}"
                        if worst is not None else ""))
    verdict = REPRODUCED if any_above else NOT_REPRODUCED
    return claim, verdict, ("; ".join(lines) + f" ({100 * opts.ci:g}% paired bootstrap CIs of each group's gap "
                            "from its task's average; a group counts when its CI excludes zero).")


def finding_kendall(files):
    claim = "Groups are ranked consistently across second tasks (Kendall's tau-b)"
    kt = _csv_of(files, "kendall_tau.csv")
    if kt is None or kt.empty:
        return claim, NOT_TESTABLE, "no first task with groups followed by two second tasks in these runs."
    rows = [(r.first_task, r.second_task_1, r.second_task_2, _f(r.tau_b), _f(r.p_value), int(_f(r.n_groups)))
            for r in kt.itertuples(index=False)]
    ok = [t > 0 and p < 0.05 for _, _, _, t, p, _ in rows if not math.isnan(t)]
    verdict = NOT_TESTABLE if not ok else REPRODUCED if all(ok) else NOT_REPRODUCED
    return claim, verdict, ("; ".join(f"{short(a)}: {short(b1)} vs {short(b2)} tau = {t:.2f} (n = {n} groups, "
                                      f"p = {p:.3g})" for a, b1, b2, t, p, n in rows)
                            + ". Paper: ToxiGen ARC vs CSQA 0.69, ARC vs CSQA2 0.46; BBQ ARC vs CSQA2 0.72. Counted "
                            "as consistent when tau > 0 with p < 0.05.")


def finding_curvature(files):
    claim = "Sharper first-task minima forget more downstream (Figure 4b, OLS of forgetting on rho)"
    fit = _csv_of(files, "curvature_fit.csv")
    if fit is None or fit.empty or math.isnan(_f(fit.slope.iloc[0])):
        why = "" if fit is None or fit.empty else f" ({fit.note.iloc[0]})"
        return claim, NOT_TESTABLE, f"no fit: it needs curvature and forgetting for at least 3 first tasks{why}."
    r = fit.iloc[0]
    verdict = REPRODUCED if _f(r.slope) > 0 and _f(r.p_value) <= 0.05 else NOT_REPRODUCED
    return claim, verdict, (f"slope {_f(r.slope):.4g}, R^2 = {_f(r.r_squared):.3f}, p = {_f(r.p_value):.3g} over "
                            f"{int(_f(r.n_tasks))} first tasks; paper: R^2 = 0.85, p <= 0.01 over 6 tasks. Counted as "
                            "reproduced when the slope is positive with p <= 0.05.")


def _lr_trend(df, which):
    out = []
    for (A, B), d in df.groupby(["first_task", "second_task"], sort=True):
        x, y = d[which].astype(float).to_numpy(), _num(d.forgetting)
        keep = ~np.isnan(y)
        if keep.sum() < 2:
            continue
        rho = stats.spearmanr(x[keep], y[keep]).statistic if keep.sum() > 2 else np.sign(
            (y[keep][np.argmax(x[keep])] - y[keep][np.argmin(x[keep])]))
        out.append((A, B, float(rho), int(keep.sum())))
    return out


def finding_lr(files):
    claims = []
    for stem, which, claim, want in (
            ("figure6.csv", "lr_b", "A larger second-task lr forgets more (Figure 6)", 1),
            ("figure5.csv", "lr_a", "A larger first-task lr forgets less on BBQ and SaFeRDialogues, more on ToxiGen "
                                    "(Figure 5)", None)):
        df = _csv_of(files, stem)
        trend = _lr_trend(df, which) if df is not None and len(df) else []
        if not trend:
            claims.append((claim, NOT_TESTABLE, "no chain with forgetting at two or more learning rates."))
            continue
        detail = "; ".join(f"{short(a)} -> {short(b)}: {'more' if r > 0 else 'less' if r < 0 else 'no change in'} "
                           f"forgetting with a larger lr (Spearman {r:+.2f} over {n} lrs)" for a, b, r, n in trend)
        if want == 1:
            verdict = REPRODUCED if sum(r > 0 for *_, r, _ in trend) * 2 > len(trend) else NOT_REPRODUCED
        else:  # the paper's own pattern: less forgetting with a larger lr for BBQ and SD, more for ToxiGen
            expect = {"bbq": -1, "saferdialogues": -1, "toxigen": 1}
            judged = [np.sign(r) == expect[a] for a, _, r, _ in trend if a in expect]
            verdict = NOT_TESTABLE if not judged else REPRODUCED if all(judged) else NOT_REPRODUCED
        claims.append((claim, verdict, detail + "."))
    return claims


def finding_replay(files):
    claim = "Replaying 5% of the safety data as a third stage recovers most of it (Figure 7)"
    rec = _csv_of(files, "replay_recovery.csv")
    if rec is None or rec.empty:
        return claim, NOT_TESTABLE, "no replay sweep in these runs."
    lines, ok = [], []
    for r in rec.itertuples(index=False):  # replay_recovery.csv holds the fractions in percent
        f = _f(r.recovery_fraction)
        if _f(r.forgetting_at_0) <= 1:  # within a point already: nothing to recover
            lines.append(f"{short(r.first_task)} -> {short(r.second_task)}: forgetting {_f(r.forgetting_at_0):.2f} "
                         "points before replay, nothing to recover")
            continue
        ok.append(not math.isnan(f) and f <= 5)
        at = (f"back within 1 point at {f:g}% of its training data" if not math.isnan(f)
              else "not back within 1 point at any fraction tried")
        lines.append(f"{short(r.first_task)} -> {short(r.second_task)}: forgetting {_f(r.forgetting_at_0):.2f} points "
                     f"before replay, {at} (tried: {str(r.fractions).replace(';', ', ')}%)")
    verdict = NOT_TESTABLE if not ok else REPRODUCED if all(ok) else NOT_REPRODUCED
    return claim, verdict, ("; ".join(lines) + ". Counted as reproduced when every chain that forgot more than 1 "
                            "point recovers at 5% or less.")


def is_smoke_test(study):
    profile = str(study.study_json.get("profile", ""))
    sources = {str((r.meta.get("data") or {}).get("source")) for r in study.runs}
    return profile == "tiny" or sources == {"synthetic"}


def findings_section(study, opts, files):
    """report.md's first section: each claim of the paper, this run's numbers and a verdict."""
    claims = [finding_order(study, files), finding_groups(study, files, opts), finding_kendall(files),
              finding_curvature(files), *finding_lr(files), finding_replay(files)]
    text = "## Findings: the paper's claims checked against this run\n\n"
    if is_smoke_test(study):
        models = sorted({str(r.meta.get("base_model")) for r in study.runs if r.meta.get("base_model")})
        text += ("**This is a smoke test of the pipeline on synthetic tasks** (profile "
                 f"{study.study_json.get('profile', 'unknown')}, model {', '.join(models) or 'unknown'}, tuned on "
                 "generated stand-in tasks). The verdicts say whether the code produces each of the paper's "
                 "measurements end to end; they are not evidence about language models.\n\n")
    counts = Counter(v for _, v, _ in claims)
    text += (f"{counts[REPRODUCED]} reproduced, {counts[NOT_REPRODUCED]} not reproduced, {counts[NOT_TESTABLE]} not "
             "testable here. Numbers in percentage points.\n\n")
    text += "\n".join(f"- **{claim}: {verdict}.** {detail[:1].upper() + detail[1:]}"
                      for claim, verdict, detail in claims) + "\n"
    rows = pd.DataFrame([{"claim": c, "verdict": v, "evidence": d} for c, v, d in claims])
    return text, {"findings.csv": rows.to_csv(index=False)}


# ----------------------------------------------------------------------------------------------------
# Where this run differs from the paper: generated from study.json and the runs' run.json

def _configs(study):
    return [r.meta.get("config") for r in study.runs if isinstance(r.meta.get("config"), dict)]


def _values(configs, key):
    return sorted({json.dumps(c.get(key), sort_keys=True) for c in configs if key in c})


def deviations(study):
    """[(item, the option that changes it)] for this run; items it does not have are left out."""
    cfgs, out = _configs(study), []
    tasks = set(study.capability + study.safety)
    clip = [float(c["max_grad_norm"]) for c in cfgs if isinstance(c.get("max_grad_norm"), (int, float))]
    if any(v > 0 for v in clip):
        out.append((f"Gradient clipping at a global norm of {', '.join(f'{v:g}' for v in sorted(set(clip)) if v > 0)} "
                    "(the paper does not clip, or does not say)", "finetune.py --max_grad_norm 0 turns it off"))
    nwd = [r.meta.get("optimizer", {}).get("no_weight_decay") for r in study.runs if isinstance(r.meta.get("optimizer"),
                                                                                                 dict)]
    if any(nwd):
        names = sorted({str(n) for v in nwd if v for n in (v if isinstance(v, list) else [v])})
        out.append((f"No weight decay on {', '.join(names)} (the paper: weight decay 0.1, on every weight as far as "
                    "it says)", "no option: finetune.py's make_optimizer"))
    elif study.runs:
        out.append(("Weight decay exemptions not recorded in run.json (finetune.py exempts norm weights and biases "
                    "from weight decay; the paper applies 0.1 without saying which weights)",
                    "no option: finetune.py's make_optimizer"))
    if tasks - {"saferdialogues"}:
        out.append(("Each option is scored by the summed log-likelihood of its whole answer sentence (\"The best "
                    "answer is A.\"); ToxiGen's two answers differ in length, so a sum favours the shorter one where "
                    "a per-token mean would not. The paper does not say how it scores", "no option: evaluate.py "
                    "scores by the sum (its --scorer fast|naive only change how it is computed)"))
    if "toxigen" in tasks and any(train_info(r).get("group_rule") for r in study.runs):
        out.append(("A ToxiGen sentence that targets several groups is counted for the least frequent of them "
                    "(one group per example); the paper does not say", "no option: tasks.load_toxigen"))
    if study.table1:
        out.append(("Relative forgetting (Figure 2) is divided by the first task's overall accuracy "
                    "Acc_A(theta_A); the paper prints a per-group Acc_A(theta_A, g), probably a typo",
                    "no option: metrics.relative_forgetting"))
    if tasks & {"arc", "csqa", "bbq"}:
        out.append(("The answers read \"The best answer is X.\" (the paper's appendix templates); section 3.2 says "
                    "\"The correct answer is\"", "no option: synthetic.py's templates"))
    infos = [train_info(r) for r in study.runs if r.stage == 1]
    arc = {i.get("arc_choices") for i in infos if "arc_choices" in i}
    if "all" in arc:
        out.append(("ARC-Easy keeps its 3- and 5-choice questions (2251 train / 2376 test; Table 2: 2241 / 2365, "
                    "the 4-choice ones)", "tasks.py --arc_choices 4 (load_task arc_choices=\"4\", the default)"))
    tsets = {i.get("test_set") for i in infos if "test_set" in i}
    if "fraction" in tsets:
        out.append(("ToxiGen's and BBQ's test sets are a seeded 30% of the data (Table 2: 4455 and 31107 examples, "
                    "nearly everything not used for training)", "load_task test_set=\"rest\" (tasks.py --test_set "
                    "rest): every example not used for training or validation"))
    fill = {i.get("cells") for i in infos if i.get("n_groups")}
    if "fill" in fill:
        out.append(("Training sets of the tasks with groups are topped up to --train_size (2261) instead of the same "
                    "count per (group, label) cell (Table 2: 2236 = 26 x 86, 2241 = 27 x 83)",
                    "load_task cells=\"equal\" (tasks.py --cells equal; the default on real data)"))
    hv = [i["human_validation"] for i in infos if isinstance(i.get("human_validation"), dict)]
    if hv and not any(h.get("used") for h in hv):
        out.append(("BBQ's training set holds no human-validated items (the paper takes them first): BBQ's "
                    "supplemental/MTurk_validation files are not in the data folder",
                    "copy the official repository's supplemental/ folder into DATA_DIR/bbq/"))
    bbq_groups = [len(r.eval["tasks"]["bbq"].get("groups") or {}) for r in study.runs
                  if r.eval and "bbq" in r.eval.get("tasks", {})]
    if bbq_groups and max(bbq_groups) < 9 and not is_smoke_test(study):
        out.append((f"BBQ has {max(bbq_groups)} of its 9 categories here (the data folder lacks the others)",
                    "add the missing DATA_DIR/bbq/data/<Category>.jsonl files"))
    for key, paper, what, flag in (("steps", 100, "optimisation steps", "--steps (STEPS)"),
                                   ("batch_size", 16, "batch size", "--batch_size"),
                                   ("max_length", 2048, "sequence length", "--max_length"),
                                   ("weight_decay", 0.1, "weight decay", "--weight_decay")):
        vals = [c.get(key) for c in cfgs if isinstance(c.get(key), (int, float))]
        if vals and any(v != paper for v in vals):
            out.append((f"{what.capitalize()} {', '.join(f'{v:g}' for v in sorted(set(vals)))} (paper: {paper:g})",
                        f"finetune.py {flag}"))
    limits = {str(c.get("eval_limit")) for c in cfgs if c.get("eval_limit")} | (
        {str(study.study_json["eval_limit"])} if study.study_json.get("eval_limit") else set())
    if limits:
        out.append((f"Models are evaluated on stratified subsets of {', '.join(sorted(limits))} "
                    "test examples per task, not whole test sets", "EVAL_LIMIT= (empty) / evaluate.py without --limit"))
    if len(study.seeds) < 3:
        out.append((f"{len(study.seeds)} seed{'s' if len(study.seeds) > 1 else ''} (paper: 3)"
                    + (": no std over seeds, no error bars" if len(study.seeds) == 1 else ""), "SEEDS=\"0 1 2\""))
    lrs = sorted({float(r.lr) for r in study.runs})
    if lrs and (min(lrs) > 2e-5 or max(lrs) < 1e-6):
        note = next((r.meta.get("lr_note") for r in study.runs if r.meta.get("lr_note")), "")
        out.append((f"Learning rates {', '.join(f'{v:g}' for v in lrs)} (paper: 1e-6 to 2e-5 around 1e-5)"
                    + (f": {note}" if note else ""), "LRS, MAIN_LR / finetune.py --lr"))
    first = study.study_json.get("first_stage")
    if first in ("main", "caption"):
        out.append(("Every chain starts from the first-stage model at the main lr (Table 1's caption); section 3.1 "
                    "picks the best first-stage model on validation", "FIRST_STAGE=best"))
    replay_settings = [s.get("settings") for _, s in study.replay if isinstance(s.get("settings"), dict)]
    replay_bs = sorted({st.get("global_batch_size", st.get("batch_size")) for st in replay_settings} - {None}, key=str)
    if replay_bs and any(b != 128 for b in replay_bs):
        out.append((f"Replay stages use a global batch of {', '.join(map(str, replay_bs))} (appendix 9.4: batch 16, "
                    "global batch 128)", "REPLAY_BATCH (the paper profile's default 128, in micro-batches of 16) / "
                    "replay.py --batch_size 128 --micro_batch_size 16"))
    models = sorted({str(r.meta.get("base_model")) for r in study.runs if r.meta.get("base_model")})
    if models and not any("llama-2-7b" in m.lower() for m in models):
        out.append((f"Model: {', '.join(models)}, not Llama-2-7B", "MODEL=/path/to/Llama-2-7b-hf (PROFILE=paper)"))
    sources = sorted({str((r.meta.get("data") or {}).get("source")) for r in study.runs} - {"None"})
    if "synthetic" in sources:
        out.append(("Data: the embedded synthetic stand-in tasks, not the released data sets",
                    "DATA_DIR=../shared/data (PROFILE=real-tiny or paper)"))
    if "saferdialogues" not in tasks:
        out.append(("SaFeRDialogues is not in this run (the paper's third safety task)",
                    "SAFE=\"toxigen bbq saferdialogues\" with its data in DATA_DIR/saferdialogues"))
    return out


def deviations_section(study):
    items = deviations(study)
    text = ("## Where this run differs from the paper\n\nGenerated from this run's study.json and run.json settings; "
            "each item names what changes it.\n\n")
    text += "\n".join(f"- {what}. Changed by: {how}." for what, how in items) if items else "Nothing recorded differs."
    return text + "\n", {"deviations.csv": pd.DataFrame(items, columns=["difference", "changed_by"]).to_csv(index=False)}


# ----------------------------------------------------------------------------------------------------
# report.md and the CLI

# report.md's sections in order: (module, function, heading). A section in another file is loaded when that
# file lies beside metrics.py (or on the import path); without it the report names the file that adds it.
SECTIONS = [(None, "section_table1", None), (None, "section_forgetting_heatmap", None), (None, "section_table2", None),
            (None, "section_groups", None), (None, "section_group_heatmap", None), (None, "section_chance", None),
            (None, "section_figure2", None), (None, "section_figure3", None), (None, "section_figures_9_10", None),
            (None, "section_accuracy_path", None), (None, "section_loss_curves", None),
            (None, "section_lr_figures", None), (None, "section_first_task_acc", None),
            ("metrics_curvature", "section_curvature", "Curvature (Figure 4) and the Taylor check"),
            ("metrics_mitigation", "section_replay", "Replay as a third stage (Figure 7; appendix Figures 11-14)"),
            ("metrics_mitigation", "section_mitigation",
             "Mitigations compared: mixing, L2, EWC and third-stage replay"),
            ("metrics_mitigation", "section_long_chains", "Chains longer than two"),
            ("metrics_curvature", "section_order", "Curvature-guided task order")]


def section_module(name):
    """The module that holds a section (this one for None), or None when its file is not there."""
    if name is None:
        return sys.modules[__name__]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def missing_sections():
    """{module: [heading, ...]} of the sections whose file is not there."""
    missing = defaultdict(list)
    for module, _, heading in SECTIONS:
        if section_module(module) is None:
            missing[module].append(heading)
    return dict(missing)


def run_sections(study, opts):
    """Every section of report.md, in order, each on the study as build_study read it -> [Section]."""
    out = []
    for module, name, heading in SECTIONS:
        loaded = section_module(module)
        if loaded is None:
            out.append(Section(f"## {heading}\n\nNot in this report: this section needs {module}.py beside "
                               f"metrics.py.\n"))
        else:
            out.append(getattr(loaded, name)(study, opts))
    return out


def write_report(study, out, opts):
    """Run every section, then write its files, report.md (provenance, problems, the sections) and summary.json
    into out -> (problems, refused): the study's and every section's, in section order."""
    os.makedirs(out, exist_ok=True)
    sections = run_sections(study, opts)
    probs = study.problems + [p for s in sections for p in s.problems]
    refused = study.refused + [p for s in sections for p in s.refused]
    every_file = {name: content for s in sections for name, content in s.files.items()}
    findings_text, more = findings_section(study, opts, every_file)
    deviations_text, dev_files = deviations_section(study)
    every_file.update(more, **dev_files)
    for fname, content in every_file.items():
        write_file(os.path.join(out, fname), content)
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
    head.append("Task names: " + "; ".join(f"{short(t)} = {TASK_NAMES[t]} (`{t}`)" for t in CAPABILITY_TASKS +
                                           SAFETY_TASKS if t in study.capability + study.safety) + ".\n")
    head += [findings_text, deviations_text]
    if study.study_json:
        head.append("study.json:\n\n```json\n" + json.dumps(study.study_json, indent=2) + "\n```\n")
    head.append(f"## Refused: evaluations that cannot be compared ({len(refused)})\n\n"
                + ("Forgetting needs both evaluations of a task made on the same data source, split and examples; "
                   "these pairs were not computed (their cells say incomparable):\n\n"
                   + "\n".join(f"- {p}" for p in refused) if refused else "None: every pair compares evaluations of "
                   "the same examples.") + "\n")
    head.append(f"## Missing or failed runs ({len(probs)})\n\n"
                + ("\n".join(f"- {p}" for p in probs) if probs else "None: every expected run is present.") + "\n")
    write_file(os.path.join(out, "report.md"), "\n".join(head) + "\n" + "\n".join(s.text for s in sections))
    summary = {"runs": os.path.abspath(study.runs_dir), "profile": opts.profile, "base_model": base,
               "data_source": sources, "main_lr": study.main_lr, "seeds": study.seeds,
               "n_pairs": len(study.pairs), "refused": refused, "problems": probs,
               "findings": pd.read_csv(io.StringIO(every_file["findings.csv"]))[["claim", "verdict"]].to_dict("records"),
               "differences_from_paper": [d for d, _ in deviations(study)]}
    write_file(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return probs, refused


def nothing_to_report(study):
    """None when the runs folder gives at least one result (a usable pair, a long chain, a replay summary, a
    mitigated second stage or a curvature file); else the one line saying what was found and what is missing."""
    if study.pairs or study.long_chains or study.replay:
        return None
    if any(stage_of(r) == 2 and mitigation_of(r.meta) and not r.problem for r in study.all_runs):
        return None
    if study.curvature_files or study.taylor_files:
        return None
    n1 = sum(stage_of(r) == 1 for r in study.all_runs)
    n2 = sum(stage_of(r) == 2 for r in study.all_runs)
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
    empty = nothing_to_report(study)
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
        probs, refused = write_report(study, tmp, opts)
        os.makedirs(out, exist_ok=True)
        for f in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, f), os.path.join(out, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"metrics: {len(study.pairs)} chained pairs from {opts.runs} -> {opts.out}/report.md (percent)")
    for module, headings in missing_sections().items():
        print(f"metrics: not in this report ({'; '.join(headings)}): needs {module}.py beside metrics.py")
    if refused:
        print(f"metrics: {len(refused)} refused, their evaluations cannot be compared (also in report.md):")
        for p in refused:
            print(f"  - {p}")
    if probs:
        print(f"metrics: {len(probs)} missing or failed runs (also in report.md):")
        for p in probs:
            print(f"  - {p}")
    return 0


def main(argv=None):
    """The CLI: returns 0; a user error exits 2 with one `error:` line (die_on_user_error)."""
    return die_on_user_error(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.modules.setdefault("metrics", sys.modules[__name__])  # the section files import this one as metrics
    sys.exit(main())
