"""The Findings, report.md's first section: each claim of the paper checked against this run's numbers (read
from the CSVs the other sections wrote), with a verdict: reproduced, not reproduced, or not testable here.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import io
import math
import re
from collections import Counter

import numpy as np
import pandas as pd
from scipy import stats

from ..statistics import correction_name, holm, tau_summary
from .format import as_floats, short

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
    test = "pairs counted (a one-sided sign test over the pairs reported beside them, not required)"
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
                NOT_TESTABLE, rule(test, "none (one claim)", 0, "more than half the pairs")
                + "no capability/safety pair has both orders in these runs.")
    p = stats.binomtest(more, pairs, 0.5, alternative="greater").pvalue
    have_ci = any(not math.isnan(_f(lo)) for lo, _ in ci.values())
    # more forgetting than the other order is not enough: the safety task has to forget at all
    verdict = REPRODUCED if more * 2 > pairs and (forgot or not have_ci) else NOT_REPRODUCED
    threshold = "more than half the pairs" + (" and a forgetting CI above zero in at least one" if have_ci else "")
    return ("Safety tasks are forgotten more than capability tasks when tuned first (Table 1, Figure 2)", verdict,
            rule(test, "none (one claim)", pairs, threshold)
            + f"the safety task forgot more in {more} of {pairs} pairs (one-sided sign test p = {p:.3g})"
            + (f", and its forgetting CI lies above zero in {forgot}" if have_ci else "") + "; "
            + "; ".join(lines) + " (forgetting in points, 95% bootstrap CIs where computed).")


def rule(test, correction, n, threshold):
    """The one line every verdict states: its test, its correction, the number of comparisons and the threshold."""
    return (f"Rule: {test}; correction: {correction}; {n} comparison{'s' if n != 1 else ''}; threshold: {threshold}. "
            "Evidence: ")


def _p_list(values):
    return [_f(v) for v in values]


def finding_groups(study, files, opts):
    """Forgetting is uneven across groups: the permutation test of the spread of per-group forgetting, one per pair,
    Holm across the pairs; the per-group tests (corrected within each pair) are its detail."""
    claim = "Forgetting is uneven across demographic groups (Figures 3, 9, 10)"
    fg, bf = _csv_of(files, "forgetting_by_group.csv"), _csv_of(files, "biased_forgetting.csv")
    alpha = 1 - opts.ci
    test = (f"permutation test of the variance of per-group forgetting, group labels permuted over the examples "
            f"({opts.n_perm} permutations, seed {opts.boot_seed}, p = (k + 1) / (n + 1))")
    if fg is None or fg.empty or bf is None or "spread_p_value" not in bf:
        return claim, NOT_TESTABLE, (rule(test, "Holm across pairs", 0, f"adjusted p < {alpha:g}")
                                     + "no chain with a grouped first task (ToxiGen or BBQ first) in these runs.")
    bf = bf[[not math.isnan(p) for p in _p_list(bf.spread_p_value)]]
    if bf.empty:
        return claim, NOT_TESTABLE, (rule(test, "Holm across pairs", 0, f"adjusted p < {alpha:g}")
                                     + "no pair has the test (--n_perm 0, no samples files or fewer than 2 groups).")
    adj = holm(_p_list(bf.spread_p_value))
    lines = []
    for r, a in zip(bf.itertuples(index=False), adj):
        d = fg[(fg.first_task == r.first_task) & (fg.second_task == r.second_task)]
        more = [g for g, s in zip(d.group, d.significant) if s == "more"]
        lines.append(f"{short(r.first_task)} -> {short(r.second_task)}: variance {_f(r.group_variance_pts2):.3g} "
                     f"points^2 (max - min {_f(r.group_range):.2f} points, {_f(r.variance_ratio):.2f} times the null "
                     f"mean), p = {_f(r.spread_p_value):.3g}, Holm {a:.3g}; groups forgetting more than average after "
                     f"{correction_name(opts.correction)} within the pair: {', '.join(more) or 'none'}")
    verdict = REPRODUCED if bool(np.any(adj < alpha)) else NOT_REPRODUCED
    return claim, verdict, (rule(test, "Holm across pairs", len(bf), f"adjusted p < {alpha:g} in at least one pair")
                            + "; ".join(lines) + ".")


def finding_kendall(files, alpha=0.05):
    """Groups ranked consistently: every defined tau positive with its Holm-adjusted p below alpha; undefined taus
    (a constant ranking) are left out and counted, and fewer than half defined is not testable."""
    claim = "Groups are ranked consistently across second tasks (Kendall's tau-b)"
    kt = _csv_of(files, "kendall_tau.csv")
    test, correction = "Kendall's tau-b, two-sided", "Holm across the defined comparisons"
    threshold = f"every tau > 0 with adjusted p < {alpha:g}; at least half defined"
    if kt is None or kt.empty:
        return claim, NOT_TESTABLE, (rule(test, correction, 0, threshold)
                                     + "no first task with groups followed by two second tasks in these runs.")
    rows = [(r.first_task, r.second_task_1, r.second_task_2, _f(r.tau_b), _f(r.p_value), int(_f(r.n_groups)))
            for r in kt.itertuples(index=False)]
    summary = tau_summary([t for *_, t, _, _ in rows], [p for *_, p, _ in rows], "holm", alpha)
    verdict = (NOT_TESTABLE if not summary["testable"] else REPRODUCED if summary["consistent"] else NOT_REPRODUCED)
    shown = "; ".join(f"{short(a)}: {short(b1)} vs {short(b2)} " + (
        f"tau = {t:.2f} (n = {n} groups, p = {p:.3g}, Holm {q:.3g})" if not math.isnan(t) else
        f"tau undefined (n = {n} groups, a constant ranking)") for (a, b1, b2, t, p, n), q in
        zip(rows, summary["p_adjusted"]))
    return claim, verdict, (rule(test, correction, summary["n_defined"], threshold)
                            + f"{summary['n_undefined']} of {summary['n']} undefined (left out); " + shown
                            + ". Paper: ToxiGen ARC vs CSQA 0.69, ARC vs CSQA2 0.46; BBQ ARC vs CSQA2 0.72.")


CURVATURE_TEST = "OLS of forgetting on rho, t test of the slope"


def finding_curvature(files):
    claim = "Sharper first-task minima forget more downstream (Figure 4b, OLS of forgetting on rho)"
    fit = _csv_of(files, "curvature_fit.csv")
    if fit is None or fit.empty or math.isnan(_f(fit.slope.iloc[0])):
        why = "" if fit is None or fit.empty else f" ({fit.note.iloc[0]})"
        return claim, NOT_TESTABLE, (rule(CURVATURE_TEST, "none (one test)", 0, "slope > 0 with p <= 0.05")
                                     + f"no fit: it needs curvature and forgetting for at least 3 first tasks{why}.")
    r = fit.iloc[0]
    verdict = REPRODUCED if _f(r.slope) > 0 and _f(r.p_value) <= 0.05 else NOT_REPRODUCED
    return claim, verdict, (rule(CURVATURE_TEST, "none (one test)", 1, "slope > 0 with p <= 0.05")
                            + f"slope {_f(r.slope):.4g}, R^2 = {_f(r.r_squared):.3f}, p = {_f(r.p_value):.3g} over "
                            f"{int(_f(r.n_tasks))} first tasks; paper: R^2 = 0.85, p <= 0.01 over 6 tasks. Counted as "
                            "reproduced when the slope is positive with p <= 0.05." + best_measure(fit))


def best_measure(fit):
    """The sentence naming the curvature measure (curvature.py --measures: the rows of curvature_fit.csv) whose
    fit explains forgetting best, by R^2 (ties: the smaller p); "" where rho is the only measure. Descriptive:
    the verdict above stays rho's (the paper's claim), the other fits are not corrected for choosing the best."""
    if "measure" not in fit.columns or len(fit) < 2:
        return ""
    fits = [(str(r.measure), _f(r.r_squared), _f(r.p_value)) for r in fit.itertuples(index=False)]
    ok = [f for f in fits if not math.isnan(f[1])]
    if len(ok) < 2:
        return " No other curvature measure has a fit here."
    best = max(ok, key=lambda f: (f[1], -f[2]))
    return (f" Of the {len(ok)} curvature measures, {best[0]} explains forgetting best in this run (R^2 = "
            f"{best[1]:.3f}, p = {best[2]:.3g}; " + ", ".join(f"{m}: R^2 = {r2:.3f}, p = {p:.3g}"
                                                            for m, r2, p in ok if m != best[0]) + ").")


def _lr_trend(df, which):
    out = []
    for (A, B), d in df.groupby(["first_task", "second_task"], sort=True):
        x, y = d[which].astype(float).to_numpy(), as_floats(d.forgetting)
        keep = ~np.isnan(y)
        if keep.sum() < 2:
            continue
        rho = stats.spearmanr(x[keep], y[keep]).statistic if keep.sum() > 2 else np.sign(
            (y[keep][np.argmax(x[keep])] - y[keep][np.argmin(x[keep])]))
        out.append((A, B, float(rho), int(keep.sum())))
    return out


LR_TEST = "sign of Spearman's rho of forgetting on lr per chain (no p)"


def finding_lr(files):
    claims = []
    for stem, which, claim, want in (
            ("figure6.csv", "lr_b", "A larger second-task lr forgets more (Figure 6)", 1),
            ("figure5.csv", "lr_a", "A larger first-task lr forgets less on BBQ and SaFeRDialogues, more on ToxiGen "
                                    "(Figure 5)", None)):
        df = _csv_of(files, stem)
        trend = _lr_trend(df, which) if df is not None and len(df) else []
        if not trend:
            claims.append((claim, NOT_TESTABLE, rule(LR_TEST, "none", 0, "the trend's sign in the chains")
                           + "no chain with forgetting at two or more learning rates."))
            continue
        detail = "; ".join(f"{short(a)} -> {short(b)}: {'more' if r > 0 else 'less' if r < 0 else 'no change in'} "
                           f"forgetting with a larger lr (Spearman {r:+.2f} over {n} lrs)" for a, b, r, n in trend)
        if want == 1:
            verdict = REPRODUCED if sum(r > 0 for *_, r, _ in trend) * 2 > len(trend) else NOT_REPRODUCED
            head = rule(LR_TEST, "none", len(trend), "more than half positive")
        else:  # the paper's own pattern: less forgetting with a larger lr for BBQ and SD, more for ToxiGen
            expect = {"bbq": -1, "saferdialogues": -1, "toxigen": 1}
            judged = [np.sign(r) == expect[a] for a, _, r, _ in trend if a in expect]
            verdict = NOT_TESTABLE if not judged else REPRODUCED if all(judged) else NOT_REPRODUCED
            head = rule(LR_TEST, "none", len(judged),
                        "every BBQ, SaFeRDialogues and ToxiGen chain with the paper's sign")
        claims.append((claim, verdict, head + detail + "."))
    return claims


REPLAY_TEST = "recovery read per chain (no test)"
REPLAY_THRESHOLD = "every chain that forgot more than 1 point back within 1 point at <= 5%"


def finding_replay(files):
    claim = "Replaying 5% of the safety data as a third stage recovers most of it (Figure 7)"
    rec = _csv_of(files, "replay_recovery.csv")
    if rec is None or rec.empty:
        return claim, NOT_TESTABLE, (rule(REPLAY_TEST, "none", 0, REPLAY_THRESHOLD) + "no replay sweep in these runs.")
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
    return claim, verdict, (rule(REPLAY_TEST, "none", len(ok), REPLAY_THRESHOLD)
                            + "; ".join(lines) + ". Counted as reproduced when every chain that forgot more than 1 "
                            "point recovers at 5% or less.")


def is_smoke_test(study):
    profile = str(study.study_json.get("profile", ""))
    sources = {str((r.meta.get("data") or {}).get("source")) for r in study.runs}
    return profile == "tiny" or sources == {"synthetic"}


def findings_section(study, opts, files):
    """report.md's first section: each claim of the paper, this run's numbers and a verdict."""
    claims = [finding_order(study, files), finding_groups(study, files, opts), finding_kendall(files, 1 - opts.ci),
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
