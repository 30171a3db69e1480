"""The report's replay section (paper section 5 and appendix 9.4): replay of A as a third stage after A -> B,
swept over the share of A's training data and over steps; Figure 7, appendix Figures 11-14 and the smallest
fraction that recovers A. Its inputs are replay.py's replay_summary.json (and each point's eval.json).

Part of chained_tuning/report (metrics.py's report; docs/replay.md, docs/metrics.md).
"""
import collections
import math
import os
import re
from collections import Counter, defaultdict

import pandas as pd

from ..forgetting import NA, mean_std
from ..runs import (EVAL_FIX, REPLAY_FIX, Evaluation, check_eval_json, copy_preference, evaluation, incomparable,
                    number, read_json, resolve_parent)
from .format import INCOMPARABLE, MISSING, Section, cells, csv_text, exact, markdown_table, rounded, short
from .plot import figure_files, plt

REPLAY_COLUMNS = ["chain", "first_task", "second_task", "seed", "sweep", "fraction", "steps", "n_examples", "acc_a",
                  "acc_b", "forgetting_a", "change_b", "capability_forgetting", "a_examples_presented",
                  "a_examples_seen", "forgetting_source", "n_eval_a", "file"]
REPLAY_VALUES = ["acc_a", "acc_b", "forgetting_a", "change_b", "capability_forgetting"]
RECOVERY_TOL = 0.01  # "within 1 point": forgetting of A at most 0.01 (fraction units)
# replay.py before the units rule wrote "fraction" in percent, and its "units" string said so in these words
OLD_PERCENT_UNITS = re.compile(r"fraction is a percent", re.IGNORECASE)


def chain_name(tasks):
    return "->".join(tasks)


def preferred_copy(study, run_id):
    copies = study.copies.get(run_id) or []
    return min(copies, key=copy_preference) if copies else None


ReplayRows = collections.namedtuple("ReplayRows", "rows problems refused percent_units")


def replay_rows(study):
    """One row per point of every replay_summary.json under --runs (fractions, not percent) -> ReplayRows: the
    rows, problems, refusal lines and the summaries whose fraction was read as a percent.

    "fraction" is the share of A's training set in [0, 1]; a summary whose "units" string says it is a percent
    (replay.py before the units rule) is converted, one without a "units" string is left out (its unit cannot
    be told), and a point outside [0, 1] is left out, each with a problem.

    chain A->B and seed: the summary's task_a / task_b, the seed of its theta_AB run.json (model_run_id), else
    settings.seed. forgetting_a: the summary's (acc_A(theta_A) - acc_A(point)); when null and theta_A (the
    parent of theta_AB) has an eval.json holding A, acc_A(theta_A) comes from there (forgetting_source says
    which; the point's eval.json, in the summary's folder under the point's name, must be comparable with
    theta_A's, runs.incomparable, else the forgetting is "incomparable").
    capability_forgetting = acc_B(theta_AB, the untrained 0 point) - acc_B(point) = -change_b.
    A-examples of a trained point: presented = steps * batch_size (settings.batch_size; the stage draws
    that many, in seeded epochs of its n_examples), seen = min(presented, n_examples) (distinct examples of A
    the stage read); 0 for an untrained point. Points made with other settings (settings_match false) are
    left out with a problem; a second summary of the same chain and seed is left out with a problem."""
    out, seen_keys = ReplayRows([], [], [], []), {}
    for name, s in study.replay:
        summary_rows(study, name, s, seen_keys, out)
    return out


def summary_rows(study, name, s, seen_keys, out):
    """One replay_summary.json's rows, problems and refusals, appended to out (a ReplayRows). seen_keys:
    {(A, B, seed): the summary that holds it}; a second summary of one chain and seed is left out."""
    problems = out.problems
    A, B, pts = s.get("task_a"), s.get("task_b"), s.get("points")
    if not isinstance(A, str) or not isinstance(B, str) or not isinstance(pts, list):
        problems.append(f"{name}: no task_a / task_b / points; {REPLAY_FIX}")
        return
    settings = s.get("settings") if isinstance(s.get("settings"), dict) else {}
    model = preferred_copy(study, s.get("model_run_id"))
    seed = model.seed if model is not None and isinstance(model.seed, int) else settings.get("seed")
    if not isinstance(seed, int):
        problems.append(f"{name}: its theta_AB (run_id {s.get('model_run_id')}) has no run.json under the runs "
                        f"folder and the summary names no seed; seed unknown")
        seed = NA
    key = (A, B, seed)
    if key in seen_keys:
        problems.append(f"{name}: a second replay summary of {A}->{B} seed {seed} (the first is "
                        f"{seen_keys[key]}); left out")
        return
    units = s.get("units")
    if not isinstance(units, str):
        problems.append(f'{name}: no "units" string, so whether its "fraction" is a share in [0, 1] or a percent '
                        f"cannot be told; left out; {REPLAY_FIX}")
        return
    per = 100.0 if OLD_PERCENT_UNITS.search(units) else 1.0  # what "fraction" is divided by
    if per != 1.0:
        out.percent_units.append(name)
    seen_keys[key] = name
    bs = settings.get("batch_size")
    bs = bs if isinstance(bs, int) and not isinstance(bs, bool) else None
    fallback, parent = theta_a_reference(study, s.get("first_stage"), model, A)
    good = usable_points(name, pts, per, units, problems)
    zero = [p for p in good if p.get("trained") is False or (p.get("steps") == 0)]
    zero_b = float(zero[0]["acc_b"]) if zero else float("nan")
    missing_f = False
    for p in good:
        row = point_row(study, name, p, (A, B, seed), bs, per, zero_b, fallback, parent, out.refused)
        missing_f = missing_f or row["forgetting_source"] == MISSING
        out.rows.append(row)
    if missing_f:
        problems.append(f"{name}: no forgetting of {A} (the summary has no first-stage reference and theta_A's "
                        f"eval.json was not found); re-run replay.py with --first_stage")


def theta_a_reference(study, first_stage, model, A):
    """When a summary has no first-stage reference: theta_A's accuracy on A from its eval.json (theta_A the
    parent of the summary's theta_AB) -> (that accuracy or nan, theta_A or None)."""
    ref = number(first_stage.get("acc_a")) if isinstance(first_stage, dict) else float("nan")
    fallback, parent = float("nan"), None
    if math.isnan(ref) and model is not None:
        parent = resolve_parent(model, study.copies)
        if parent is not None and parent.eval and A in parent.eval["tasks"]:
            fallback = parent.acc(A)
    return fallback, parent


def usable_points(name, pts, per, units, problems):
    """A summary's points made with its settings, with accuracies and a fraction in [0, 1]; the others are left
    out with a problem."""
    good = [p for p in pts if isinstance(p, dict) and p.get("settings_match") is not False
            and isinstance(p.get("acc_a"), (int, float)) and isinstance(p.get("acc_b"), (int, float))]
    bad = [p for p in pts if p not in good]
    if bad:
        problems.append(f"{name}: {len(bad)} point(s) made with other settings or without accuracies left out "
                        f"({', '.join(str(p.get('name', '?')) if isinstance(p, dict) else '?' for p in bad)}); "
                        f"re-run replay.py")
    outside = [p for p in good if not 0 <= number(p.get("fraction")) / per <= 1]
    if outside:
        problems.append(f"{name}: fraction {', '.join(str(p.get('fraction')) for p in outside)} not in [0, 1] "
                        f"(units: {units!r}); those points left out; {REPLAY_FIX}")
        good = [p for p in good if p not in outside]
    return good


def point_row(study, name, p, chain, bs, per, zero_b, fallback, parent, refused):
    """One point's row (fractions, not percent); a forgetting of A that would pair evaluations that cannot be
    compared is refused (a line appended to refused)."""
    A, B, seed = chain
    trained = p.get("trained") if isinstance(p.get("trained"), bool) else bool(p.get("steps"))
    steps = int(p.get("steps") or 0) if trained else 0
    n_ex = int(p.get("n_examples") or 0) if trained else 0
    fa, src = number(p.get("forgetting_a")), "replay_summary"
    if math.isnan(fa):
        if not math.isnan(fallback):
            why = point_incomparable(study, name, p, A, parent)
            if why:
                refused.append(f"replay point {name} {p.get('name')}: forgetting of {A} left out, "
                               f"its evaluation and theta_A's cannot be compared: {why}")
                src = INCOMPARABLE
            else:
                fa, src = fallback - float(p["acc_a"]), "theta_A eval.json"
        else:
            src = MISSING
    cb = number(p.get("change_b"))
    capf = 0.0 - cb if not math.isnan(cb) else zero_b - float(p["acc_b"])
    presented = (steps * bs if bs else float("nan")) if trained else 0
    return {"chain": chain_name([A, B]), "first_task": A, "second_task": B, "seed": seed,
            "sweep": p.get("sweep", NA), "fraction": number(p.get("fraction")) / per,
            "steps": steps,
            "n_examples": n_ex, "acc_a": float(p["acc_a"]), "acc_b": float(p["acc_b"]),
            "forgetting_a": fa, "change_b": 0.0 - capf, "capability_forgetting": capf,
            "a_examples_presented": presented,
            "a_examples_seen": (min(presented, n_ex) if not math.isnan(presented) else float("nan"))
            if trained else 0, "forgetting_source": src, "n_eval_a": p.get("n_eval_a", NA),
            "file": name}


def point_incomparable(study, name, point, A, parent):
    """Why a replay point's evaluation of A (eval.json in the summary's folder, under the point's name) cannot
    be paired with theta_A's (runs.incomparable), or None. Without that file nothing says it can."""
    d = os.path.join(os.path.dirname(name), str(point.get("name")))
    path = os.path.join(study.runs_dir, d, "eval.json")
    if not os.path.isfile(path):
        return f"{d}/eval.json is missing, so its data source, split and examples are unknown"
    ev = read_json(path, "eval.json", EVAL_FIX)
    check_eval_json(path, ev)
    return incomparable(A, evaluation(parent), Evaluation(d, os.path.dirname(path), ev))


def int_if_whole(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def sweep_x(row):
    return row["fraction"] if row["sweep"] == "fraction" else row["steps"]


def percent(fraction):
    """A share in [0, 1] as the percent a table shows: 0.05 -> 5, not 5.000000000000001."""
    return int_if_whole(round(100 * fraction, 9)) if isinstance(fraction, float) else fraction


def replay_means(rows):
    """Mean and std over seeds per chain, sweep and point (percent, fraction and x of the fraction sweep too;
    A-example counts as they are)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["first_task"], r["second_task"], r["sweep"], sweep_x(r))].append(r)
    out = []
    for (A, B, sweep, x), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]), kv[0][3])):
        row = {"chain": chain_name([A, B]), "first_task": A, "second_task": B, "sweep": sweep,
               "x": percent(x) if sweep == "fraction" else x, "fraction": percent(rs[0]["fraction"]),
               "steps": rs[0]["steps"], "n_seeds": len(rs),
               "seeds": ";".join(str(r["seed"]) for r in rs)}
        for q in REPLAY_VALUES:
            refused = q == "forgetting_a" and all(r["forgetting_source"] == INCOMPARABLE for r in rs)
            row[q], row[q + "_std"] = cells([r[q] for r in rs], marker=INCOMPARABLE if refused else NA)
        row["a_examples_seen"] = rounded(mean_std([r["a_examples_seen"] for r in rs])[0], 1)
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


def plot_sweeps(df, col, ylabel, title, zero_line):
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


def replay_cell(r, k, v):
    """A replay.csv cell: accuracies and forgetting in percent (a refused forgetting "incomparable"), the
    fraction as a percent, A-example counts exact."""
    if k == "forgetting_a" and r["forgetting_source"] == INCOMPARABLE:
        return INCOMPARABLE
    if k in REPLAY_VALUES:
        return rounded(100 * v)
    return percent(v) if k == "fraction" else exact(v) if k.startswith("a_examples") else v


def recovery_table(means):
    """replay_recovery.csv: per chain, the smallest replay fraction that recovers A (recovery_fraction), from the
    fraction sweep's means."""
    rec = []
    for (A, B), g in means[means.sweep == "fraction"].groupby(["first_task", "second_task"], sort=True):
        fractions = g.fraction.astype(float).tolist()
        forgot = [v / 100 if not isinstance(v, str) else float("nan") for v in g.forgetting_a]   # fraction units
        f = recovery_fraction(fractions, forgot)
        zero = [v for x, v in zip(fractions, g.forgetting_a) if x == 0]
        have = any(not math.isnan(v) for v in forgot)
        at = [v for x, v in zip(fractions, g.forgetting_a) if f is not None and x == f]
        rec.append({"first_task": A, "second_task": B, "n_seeds": int(g.n_seeds.max()),
                    "forgetting_at_0": zero[0] if zero else MISSING,
                    "recovery_fraction": (f"{f:g}" if f is not None else "none") if have else MISSING,
                    "forgetting_at_recovery": at[0] if at else NA,
                    "fractions": ";".join(f"{x:g}" for x in fractions),
                    "rule": f"smallest fraction with mean forgetting of A <= {100 * RECOVERY_TOL:g} point"})
    return pd.DataFrame(rec, columns=["first_task", "second_task", "n_seeds", "forgetting_at_0", "recovery_fraction",
                                      "forgetting_at_recovery", "fractions", "rule"])


def replay_text(study, rows, rec, percent_units):
    """The section's text after its heading: what was swept, the recovery table, the figures and notes."""
    chains = sorted({(r["first_task"], r["second_task"]) for r in rows})
    seeds = sorted({str(r["seed"]) for r in rows})
    text = (f"{len(study.replay)} replay summaries, chains "
            f"{', '.join(chain_name(c) for c in chains) or 'none'}, "
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
    if percent_units:
        text += (f"{len(percent_units)} summaries from an older replay.py give the replay fraction in percent (their "
                 f"\"units\" say so); read as such: {', '.join(percent_units)}.\n\n")
    if srcs.get(INCOMPARABLE):
        text += (f"{srcs[INCOMPARABLE]} point(s) whose forgetting of A would pair evaluations that cannot be compared "
                 "are marked incomparable (see the refused pairs above).\n\n")
    if srcs.get("theta_A eval.json"):
        text += (f"{srcs['theta_A eval.json']} point(s) without a first-stage reference in their summary: forgetting "
                 "from theta_A's eval.json (its evaluation settings may differ from the replay points').\n")
    return text


def section_replay(study, opts):
    """replay.csv (per chain, seed and point), replay_mean.csv, figure7 and figure11-14 (.png + .csv),
    replay_recovery.csv. Nothing is written (the section says so) without a replay_summary.json."""
    head = "## Replay as a third stage (Figure 7; appendix Figures 11-14)\n\n"
    if not study.replay:
        return Section(head + ("No replay results: no replay_summary.json under the runs folder (replay.py writes "
                               "it; run_all.sh runs it for every safety -> capability chain), so no Figure 7, no "
                               "Figures 11-14 and no recovery fraction.\n"))
    rows, problems, refused, percent_units = replay_rows(study)
    files = {}
    df = pd.DataFrame([{k: replay_cell(r, k, v) for k, v in r.items()} for r in rows], columns=REPLAY_COLUMNS)
    files["replay.csv"] = csv_text(df)
    means = replay_means(rows)
    files["replay_mean.csv"] = csv_text(means)
    for stem, col, ylabel, title, zero in REPLAY_FIGURES:
        d = means[["chain", "first_task", "second_task", "sweep", "x", col, col + "_std", "n_seeds"]]
        files.update(figure_files(plot_sweeps(d, col, ylabel, title, zero), d, stem))
    rec = recovery_table(means)
    files["replay_recovery.csv"] = csv_text(rec)
    return Section(head + replay_text(study, rows, rec, percent_units), files, problems, refused)
