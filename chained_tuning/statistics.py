"""Tests behind the Findings' verdicts: multiple-comparison corrections (Holm, Benjamini-Hochberg) and the
permutation test of uneven forgetting across groups. Fractions and p values in, the same out.

Copy unit: numpy and scipy only (nothing else of the project), like chained_tuning/forgetting.py.

    from chained_tuning import statistics
    statistics.holm([0.01, 0.04, 0.03])                        # [0.03, 0.06, 0.06]
    statistics.adjust([0.01, 0.04, 0.03], "bh")                # [0.03, 0.04, 0.04]
    statistics.group_permutation_test([1, 1, 0, 0], [0, 0, 0, 0], ["a", "a", "b", "b"], n_permutations=200)
    statistics.paired_sign_flip_test([-3.0, -1.5, -2.0, 0.5])  # mean < 0? exact over the 16 sign patterns

The rules, and how metrics.py reports them: docs/metrics.md.
"""
import math

import numpy as np

CORRECTIONS = ("holm", "bh")


def _as_p(p_values):
    """p values as a float array; nan stays nan (an untestable comparison: not counted, not rejected)."""
    return np.asarray([float(p) for p in p_values], dtype=float)


def _ranked(p_values):
    """(p as floats, an all-nan result to fill, the indices of the non-nan p in increasing order)."""
    p = _as_p(p_values)
    keep = np.flatnonzero(~np.isnan(p))
    return p, np.full(p.shape, np.nan), keep[np.argsort(p[keep], kind="stable")]


def holm(p_values):
    """Holm's step-down adjusted p values (family-wise error control), in the input order. nan entries stay nan
    and do not count as comparisons."""
    p, out, order = _ranked(p_values)
    m = len(order)
    if not m:
        return out
    # step-down: the i-th smallest is multiplied by (m - i), then made monotone so a later one never drops below
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def benjamini_hochberg(p_values):
    """Benjamini-Hochberg adjusted p values (false discovery rate), in the input order; nan entries stay nan.
    Equal to scipy.stats.false_discovery_control(p, method="bh") on the non-nan entries."""
    p, out, order = _ranked(p_values)
    m = len(order)
    if not m:
        return out
    scaled = p[order] * m / np.arange(1, m + 1)
    # step-up: the adjusted value of the i-th smallest is the least scaled value at or above its rank
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def adjust(p_values, method="holm"):
    """Adjusted p values by `method`, "holm" (family-wise) or "bh" (Benjamini-Hochberg, false discovery rate)."""
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    raise ValueError(f"unknown correction {method!r}; pick one of {', '.join(CORRECTIONS)}")


def correction_name(method):
    """The name a verdict line gives a correction."""
    return {"holm": "Holm", "bh": "Benjamini-Hochberg"}[method]


def permutation_p(null, observed):
    """(k + 1) / (n + 1): k of the n null statistics at or above the observed one. The +1 counts the observed
    labelling as one of the permutations, so p is never 0 (a p of 0 would claim more than n draws can show)."""
    null = np.asarray(null, dtype=float)
    return float((np.sum(null >= observed - 1e-12) + 1) / (len(null) + 1))


def _group_sums(delta, codes, n_groups, perms):
    """Per permutation and group, the sum of delta over the group's examples: (len(perms), n_groups)."""
    rows = perms.shape[0]
    cell = (np.arange(rows)[:, None] * n_groups + codes[perms]).ravel()
    sums = np.bincount(cell, weights=np.broadcast_to(delta, perms.shape).ravel(), minlength=rows * n_groups)
    return sums.reshape(rows, n_groups)


def group_permutation_test(correct_first, correct_chained, groups, n_permutations=2000, seed=0, chunk=200):
    """Is forgetting uneven across groups beyond chance? A permutation test of the between-group spread.

    correct_first / correct_chained: 0/1 per example, shape (n,) or (seeds, n) with the same examples for every
    seed; groups: one label per example (None: in no group, left out). Per-group forgetting is the mean over the
    group's examples of the seed-averaged change correct_first - correct_chained. The statistic is its variance
    across groups (ddof=0); max - min is reported beside it. The null: group labels are exchangeable, so the
    labels are permuted over the examples while each example keeps its own pair of before/after answers.
    Per group, a two-sided p of its gap from the grouped average under the same permutations.
    Returns {"n", "n_groups", "n_permutations", "variance", "range", "null_variance_mean", "variance_excess",
    "variance_ratio", "p_value", "p_range", "groups": {g: {"gap", "p_value"}}}; p values nan with < 2 groups
    or no permutations. Deterministic for a seed."""
    first = np.atleast_2d(np.asarray(correct_first, dtype=float))
    chained = np.atleast_2d(np.asarray(correct_chained, dtype=float))
    if first.shape != chained.shape or len(groups) != first.shape[1]:
        raise ValueError(f"need one group per example and the same examples for both models, got {first.shape}, "
                         f"{chained.shape} and {len(groups)} groups")
    keep = np.array([g is not None for g in groups], dtype=bool)
    names = sorted({str(g) for g in groups if g is not None})
    delta = (first - chained).mean(0)[keep]
    codes = np.array([names.index(str(g)) for g in groups if g is not None], dtype=int)
    counts = np.bincount(codes, minlength=len(names)).astype(float)
    gap_of = _gaps(delta, codes, counts)
    observed = gap_of(np.arange(len(codes))[None, :])
    res = _spread(observed)
    res.update({"n": int(keep.sum()), "n_groups": len(names), "n_permutations": int(n_permutations)})
    null_var, null_range, null_gap = _null(gap_of, len(codes), n_permutations, seed, chunk)
    nan = float("nan")
    testable = len(names) >= 2 and n_permutations > 0
    res["null_variance_mean"] = float(null_var.mean()) if testable else nan
    res["variance_excess"] = res["variance"] - res["null_variance_mean"]
    res["variance_ratio"] = (res["variance"] / res["null_variance_mean"]
                             if testable and res["null_variance_mean"] > 0 else nan)
    res["p_value"] = permutation_p(null_var, res["variance"]) if testable else nan
    res["p_range"] = permutation_p(null_range, res["range"]) if testable else nan
    res["groups"] = {g: {"gap": float(observed[0, j]),
                         "p_value": permutation_p(np.abs(null_gap[:, j]), abs(observed[0, j])) if testable else nan}
                     for j, g in enumerate(names)}
    return res


def _gaps(delta, codes, counts):
    """A function: permutations (rows of example indices) -> each group's forgetting minus the grouped average."""
    average = float(delta.mean()) if len(delta) else float("nan")

    def gap_of(perms):
        with np.errstate(invalid="ignore", divide="ignore"):
            return _group_sums(delta, codes, len(counts), perms) / counts - average
    return gap_of


def _spread(gaps):
    """The observed statistics of one labelling: variance and max - min of per-group forgetting."""
    g = gaps[0]
    if len(g) == 0:
        return {"variance": float("nan"), "range": float("nan")}
    return {"variance": float(np.var(g)), "range": float(np.max(g) - np.min(g))}


def _null(gap_of, n, n_permutations, seed, chunk):
    """The null statistics of n_permutations seeded permutations of the group labels: (variances, ranges, gaps)."""
    rng = np.random.default_rng(seed)
    var, rng_, gaps = [], [], []
    for start in range(0, n_permutations, chunk):
        rows = min(chunk, n_permutations - start)
        # permuting the example indices that index the codes is permuting the labels over the examples
        perms = np.argsort(rng.random((rows, n)), axis=1)
        g = gap_of(perms)
        var.append(np.var(g, axis=1))
        rng_.append(np.max(g, axis=1) - np.min(g, axis=1) if g.shape[1] else np.full(rows, np.nan))
        gaps.append(g)
    if not var:
        return np.empty(0), np.empty(0), np.empty((0, 0))
    return np.concatenate(var), np.concatenate(rng_), np.concatenate(gaps)


def tau_summary(taus, p_values, method="holm", alpha=0.05):
    """Kendall's taus across comparisons: undefined ones (nan, a constant ranking) left out and counted; the rest's
    p values adjusted by `method`. Returns {"n", "n_defined", "n_undefined", "p_adjusted" (input order),
    "testable" (at least half defined), "consistent" (every defined tau > 0 with adjusted p < alpha)}."""
    taus, p = _as_p(taus), _as_p(p_values)
    defined = ~np.isnan(taus) & ~np.isnan(p)
    adj = adjust(np.where(defined, p, np.nan), method)
    n, n_defined = len(taus), int(defined.sum())
    testable = n_defined > 0 and 2 * n_defined >= n
    consistent = testable and bool(np.all((taus[defined] > 0) & (adj[defined] < alpha)))
    return {"n": n, "n_defined": n_defined, "n_undefined": n - n_defined, "p_adjusted": adj,
            "testable": testable, "consistent": consistent}


def paired_sign_flip_test(differences, n_permutations=20000, seed=0, exact_up_to=16):
    """Is the mean of paired differences below zero beyond chance? The sign-flip permutation test (one-sided,
    alternative: mean < 0): under the null each difference is as likely negative as positive. Exact (all 2^n
    sign patterns) for n <= exact_up_to, else `n_permutations` seeded draws with p = (k + 1) / (n + 1).
    nan differences are left out. Returns {"n", "mean", "p_value", "exact"}; p is nan with fewer than 2."""
    d = _as_p(differences)
    d = d[~np.isnan(d)]
    n = len(d)
    if n < 2:
        return {"n": n, "mean": float(d.mean()) if n else float("nan"), "p_value": float("nan"), "exact": True}
    observed = d.mean()
    if n <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)   # every pattern, the observed one too
        null = (signs * np.abs(d)).mean(axis=1)
        p = float(np.mean(null <= observed + 1e-12 * max(1.0, abs(observed))))
        return {"n": n, "mean": float(observed), "p_value": p, "exact": True}
    rng = np.random.default_rng(seed)
    null = (rng.choice([-1.0, 1.0], size=(n_permutations, n)) * np.abs(d)).mean(axis=1)
    k = int(np.sum(null <= observed + 1e-12 * max(1.0, abs(observed))))
    return {"n": n, "mean": float(observed), "p_value": (k + 1) / (n_permutations + 1), "exact": False}


def is_number(x):
    """A float that is not nan."""
    try:
        return not math.isnan(float(x))
    except (TypeError, ValueError):
        return False
