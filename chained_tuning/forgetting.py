"""The paper's forgetting equations and the paired bootstrap: fractions in, fractions out.

Copy unit: copy this one file; needs numpy and scipy (nothing else of the project, no pandas or matplotlib).

    import forgetting                                # or: from chained_tuning import forgetting
    forgetting.forgetting(0.80, 0.70)                # Acc_A(theta_A) - Acc_A(theta_AB) = 0.10
    forgetting.biased_forgetting({"a": 0.5, "b": 0.1}, 0.2)              # max_g F_A,g - F_A = 0.3
    forgetting.paired_bootstrap_ci([1, 1, 0, 1], [0, 1, 0, 1], ["a", "a", "b", "b"], n_resamples=200)

The definitions, and how metrics.py reports them: docs/metrics.md.
"""
import math
import warnings
from collections import defaultdict

import numpy as np
from scipy import stats

NA = "n/a"  # a value that does not apply (no groups, a std over one seed): tables never leave a cell blank
TIE_TOL = 1e-9  # equal accuracies reach a forgetting through different float sums: they differ in the last bits


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


def _group_codes(groups):
    """(sorted group names, an integer code per example), ([], None) without groups. An example whose group is
    None gets the code len(names): a bucket of its own that no group statistic reads."""
    if groups is None or not any(g is not None for g in groups):
        return [], None
    names = sorted({str(g) for g in groups if g is not None})
    pos = {g: i for i, g in enumerate(names)}
    return names, np.array([pos[str(g)] if g is not None else len(names) for g in groups])


def _resample_statistics(first, chained, codes, n_groups, k, draws):
    """draws: (resamples, n) example indices -> per-resample statistics averaged over seeds."""
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


def _percentile_ci(est, values, q):
    """{"estimate", "low", "high"}: the q percentiles of the resampled values (nan without any)."""
    if values is None or len(values) == 0 or np.all(np.isnan(values)):
        return {"estimate": float(est), "low": float("nan"), "high": float("nan")}
    lo, hi = np.nanpercentile(values, q)
    return {"estimate": float(est), "low": float(lo), "high": float(hi)}


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
    names, codes = _group_codes(groups)
    n_groups = len(names)

    def statistics(draws):
        return _resample_statistics(first, chained, codes, n_groups, k, draws)

    point = statistics(np.arange(n)[None, :])
    rng = np.random.default_rng(seed)
    resampled = defaultdict(list)
    for start in range(0, n_resamples, chunk):
        for key, v in statistics(rng.integers(0, n, size=(min(chunk, n_resamples - start), n))).items():
            resampled[key].append(v)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    nan = {"estimate": float("nan"), "low": float("nan"), "high": float("nan")}
    res = {"n": n, "n_resamples": n_resamples,
           "forgetting": _percentile_ci(point["forgetting"][0],
                                        np.concatenate(resampled["forgetting"]) if n_resamples else None, q),
           "biased_forgetting_max": nan, "biased_forgetting_topk": nan, "groups": {}}
    if n_groups:
        for key in ("biased_forgetting_max", "biased_forgetting_topk"):
            res[key] = _percentile_ci(point[key][0], np.concatenate(resampled[key]) if n_resamples else None, q)
        every_group = np.concatenate(resampled["groups"]) if n_resamples else None
        for j, g in enumerate(names):
            res["groups"][g] = _percentile_ci(point["groups"][0, j],
                                              every_group[:, j] if every_group is not None else None, q)
    return res
