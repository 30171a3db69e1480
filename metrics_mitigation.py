"""metrics.py's sections beyond the paper's two stages: replay as a third stage (Figure 7, appendix Figures
11-14, the smallest fraction that recovers A), mitigated second stages (mixing, L2, EWC) against replay at
matched cost, and chains longer than two.

    python metrics.py --runs runs/tiny --out runs/tiny/results     # finds this file beside metrics.py

Needs metrics.py beside it; its inputs are replay.py's replay_summary.json (and each point's eval.json),
finetune.py's run.json of mitigated and longer chains. Each section takes the study and returns a
metrics.Section.
"""
import collections
import math
import os
import re
from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from metrics import (EVAL_FIX, INCOMPARABLE, MISSING, NA, REPLAY_FIX, Evaluation, Section, cells, check_eval_json,
                     copy_preference, csv_text, evaluation, exact, figure_files, forgetting, incomparable,
                     is_replay_point, markdown_table, mean_std, mitigation_of, number, read_json, refusal,
                     resolve_parent, rounded, short, stage_of)
import matplotlib.pyplot as plt  # noqa: E402 - after metrics, which picks the Agg backend


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
    theta_A's, metrics.incomparable, else the forgetting is "incomparable").
    capability_forgetting = acc_B(theta_AB, the untrained 0 point) - acc_B(point) = -change_b.
    A-examples of a trained point: presented = steps * batch_size (settings.batch_size; the stage draws
    that many, in seeded epochs of its n_examples), seen = min(presented, n_examples) (distinct examples of A
    the stage read); 0 for an untrained point. Points made with other settings (settings_match false) are
    left out with a problem; a second summary of the same chain and seed is left out with a problem."""
    rows, problems, refused, percent_units, seen_keys = [], [], [], [], {}
    for name, s in study.replay:
        A, B, pts = s.get("task_a"), s.get("task_b"), s.get("points")
        if not isinstance(A, str) or not isinstance(B, str) or not isinstance(pts, list):
            problems.append(f"{name}: no task_a / task_b / points; {REPLAY_FIX}")
            continue
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
            continue
        units = s.get("units")
        if not isinstance(units, str):
            problems.append(f'{name}: no "units" string, so whether its "fraction" is a share in [0, 1] or a percent '
                            f"cannot be told; left out; {REPLAY_FIX}")
            continue
        per = 100.0 if OLD_PERCENT_UNITS.search(units) else 1.0  # what "fraction" is divided by
        if per != 1.0:
            percent_units.append(name)
        seen_keys[key] = name
        bs = settings.get("batch_size")
        bs = bs if isinstance(bs, int) and not isinstance(bs, bool) else None
        first_stage = s.get("first_stage")
        ref = number(first_stage.get("acc_a")) if isinstance(first_stage, dict) else float("nan")
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
        outside = [p for p in good if not 0 <= number(p.get("fraction")) / per <= 1]
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
                    src, missing_f = MISSING, True
            cb = number(p.get("change_b"))
            capf = 0.0 - cb if not math.isnan(cb) else zero_b - float(p["acc_b"])
            presented = (steps * bs if bs else float("nan")) if trained else 0
            rows.append({"chain": chain_name([A, B]), "first_task": A, "second_task": B, "seed": seed,
                         "sweep": p.get("sweep", NA), "fraction": number(p.get("fraction")) / per,
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
    return ReplayRows(rows, problems, refused, percent_units)


def point_incomparable(study, name, point, A, parent):
    """Why a replay point's evaluation of A (eval.json in the summary's folder, under the point's name) cannot
    be paired with theta_A's (metrics.incomparable), or None. Without that file nothing says it can."""
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

    def cell(r, k, v):
        if k == "forgetting_a" and r["forgetting_source"] == INCOMPARABLE:
            return INCOMPARABLE
        if k in REPLAY_VALUES:
            return rounded(100 * v)
        return percent(v) if k == "fraction" else exact(v) if k.startswith("a_examples") else v
    df = pd.DataFrame([{k: cell(r, k, v) for k, v in r.items()} for r in rows], columns=REPLAY_COLUMNS)
    files["replay.csv"] = csv_text(df)
    means = replay_means(rows)
    files["replay_mean.csv"] = csv_text(means)
    for stem, col, ylabel, title, zero in REPLAY_FIGURES:
        d = means[["chain", "first_task", "second_task", "sweep", "x", col, col + "_std", "n_seeds"]]
        files.update(figure_files(plot_sweeps(d, col, ylabel, title, zero), d, stem))
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
    rec = pd.DataFrame(rec, columns=["first_task", "second_task", "n_seeds", "forgetting_at_0", "recovery_fraction",
                                     "forgetting_at_recovery", "fractions", "rule"])
    files["replay_recovery.csv"] = csv_text(rec)
    chains = sorted({(r["first_task"], r["second_task"]) for r in rows})
    seeds = sorted({str(r["seed"]) for r in rows})
    text = head + (f"{len(study.replay)} replay summaries, chains "
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
    return Section(text, files, problems, refused)


# ----------------------------------------------------------------------------------------------------
# mitigations of the second stage compared with third-stage replay

MITIGATION_COLUMNS = ["first_task", "second_task", "method", "setting", "n_seeds", "seeds", "forgetting_a",
                      "forgetting_a_std", "acc_b", "acc_b_std", "extra_steps", "a_examples_seen",
                      "a_examples_presented", "fisher_samples", "n_eval_a", "runs"]


def method_of(meta, A, B):
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
    Chains with neither a mitigated run nor a replay summary are not listed. A mitigated run whose evaluation of
    A cannot be compared with its theta_A's has no forgetting, and "refused" says why."""
    rows, problems = [], []
    plain = {(p.A, p.B, p.seed): p for ps in study.table1.values() for p in ps}
    for r in study.all_runs:
        if stage_of(r) != 2 or not mitigation_of(r.meta) or is_replay_point(r, study.replay_ids) or r.problem:
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
        method, setting, key = method_of(r.meta, A, B)
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
    for x in replay_rows(study).rows:
        if x["a_examples_seen"] == 0 and x["steps"] == 0:
            continue  # the untrained point is theta_AB
        chains.add((x["first_task"], x["second_task"]))
        sweep = x["sweep"]
        setting = (f"fraction {percent(x['fraction']):g}%, {x['steps']} steps" if sweep == "fraction"
                   else f"{x['steps']} steps, all data")
        rows.append({"first_task": x["first_task"], "second_task": x["second_task"], "seed": x["seed"],
                     "method": f"replay ({sweep} sweep)", "setting": setting,
                     "key": (2 if sweep == "fraction" else 3, sweep_x(x)), "forgetting_a": x["forgetting_a"],
                     "refused": x["forgetting_source"] == INCOMPARABLE or None,
                     "acc_b": x["acc_b"], "extra_steps": x["steps"], "a_examples_seen": x["a_examples_seen"],
                     "a_examples_presented": x["a_examples_presented"], "fisher_samples": 0,
                     "n_eval_a": x["n_eval_a"], "run": x["file"]})
    for (A, B) in sorted(chains):
        for p in study.table1.get((A, B), []):
            rows.append({"first_task": A, "second_task": B, "seed": p.seed, "method": "plain",
                         "setting": "Table 1 chain", "key": (0,), "forgetting_a": p.stats["forgetting"],
                         "acc_b": p.stats["acc_chained_b"], "extra_steps": 0, "a_examples_seen": 0,
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
        cost = {k: int_if_whole(rounded(mean_std([number(r[k]) for r in rs])[0], 1))
                for k in ("extra_steps", "a_examples_seen", "a_examples_presented", "fisher_samples")}
        n_eval = sorted({str(r["n_eval_a"]) for r in rs})
        out.append({"first_task": A, "second_task": B, "method": method, "setting": setting, "n_seeds": len(rs),
                    "seeds": ";".join(str(r["seed"]) for r in sorted(rs, key=lambda r: str(r["seed"]))),
                    "forgetting_a": f, "forgetting_a_std": fs, "acc_b": b, "acc_b_std": bsd, **cost,
                    "n_eval_a": ";".join(n_eval), "runs": ";".join(r["run"] for r in rs)})
    return pd.DataFrame(out, columns=MITIGATION_COLUMNS)


def fmt2(v, unit=""):
    """A number with 2 decimals for report.md's sentences; anything else as it is."""
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
        pl = (f"plain chain: forgetting of {A} {fmt2(plain.forgetting_a.iloc[0])}, {B} accuracy "
              f"{fmt2(plain.acc_b.iloc[0])}" if len(plain) else "plain chain: missing")
        head = f"- **{A} -> {B}** ({pl})."
        if others.empty:
            lines.append(head + " No mitigated second stage for this chain.")
            continue
        parts = []
        for m in others.itertuples():
            desc = (f"{m.method} ({m.setting}): forgetting {fmt2(m.forgetting_a)}, {B} {fmt2(m.acc_b)}, "
                    f"{fmt2(m.a_examples_seen)} A-examples seen, {fmt2(m.extra_steps)} extra steps")
            seen = m.a_examples_seen if isinstance(m.a_examples_seen, (int, float)) else float("nan")
            if m.method.startswith("l2") and seen == 0:
                ref = plain
                parts.append(desc + ("; against the plain chain (same cost in A-data): forgetting "
                                     f"{fmt2(ref.forgetting_a.iloc[0])}" if len(ref)
                                     else "; no plain chain to compare"))
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
            parts.append(desc + f"; replay at matched cost ({best.setting}: {fmt2(best.a_examples_seen)} A-examples "
                         f"seen, {fmt2(best.extra_steps)} extra steps): forgetting {fmt2(best.forgetting_a)}, {B} "
                         f"{fmt2(best.acc_b)}{verdict}")
        lines.append(head + "\n" + "\n".join(f"  - {x}." for x in parts))
    return "\n".join(lines) + "\n"


MARKERS = {"plain": ("o", "black"), "mix": ("s", "tab:blue"), "l2": ("^", "tab:green"), "ewc": ("v", "tab:red")}


def section_mitigation(study, opts):
    """mitigation.csv/.png (mean per chain and method), mitigation_runs.csv (per seed) and a matched-cost
    comparison. Nothing is written without a mitigated run or a replay summary."""
    head = "## Mitigations compared: mixing, L2, EWC and third-stage replay\n\n"
    rows, problems = mitigation_rows(study)
    if not any(r["method"] != "plain" for r in rows):
        return Section(head + ("No mitigation results: no second stage with replay mixing, L2 or EWC (finetune.py "
                               "--replay_task/--replay_fraction, --l2_to_init, --ewc) and no replay summary under "
                               "the runs folder.\n"), problems=problems)
    refused = [refusal(r["first_task"], r["second_task"], r["refused"]) + " (mitigation)" for r in rows
               if r["key"][0] == 1 and r["refused"]]
    per_seed = pd.DataFrame([{k: (INCOMPARABLE if k == "forgetting_a" and r.get("refused") else
                                  rounded(100 * v) if k in ("forgetting_a", "acc_b") else exact(v))
                              for k, v in r.items() if k not in ("key", "refused")} for r in rows],
                            columns=["first_task", "second_task", "seed", "method", "setting", "forgetting_a", "acc_b",
                                     "extra_steps", "a_examples_seen", "a_examples_presented", "fisher_samples",
                                     "n_eval_a", "run"])
    files = {"mitigation_runs.csv": csv_text(per_seed)}
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
            ax.errorbar(number(m.a_examples_seen), number(m.forgetting_a),
                        yerr=number(m.forgetting_a_std) if isinstance(m.forgetting_a_std, float) else None,
                        fmt=mk, color=colour, capsize=3, label=f"{m.method} ({m.setting})")
        ax.set_xscale("symlog", linthresh=10)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("examples of A seen (distinct)")
        ax.set_ylabel(f"forgetting of {short(A)} (%)")
        ax.set_title(f"{short(A)} -> {short(B)}")
        ax.legend(fontsize=6)
    fig.suptitle("Forgetting of the first task against the data of it each mitigation uses")
    fig.tight_layout()
    files.update(figure_files(fig, df, "mitigation"))
    text = (head + "Per chain A -> B: the plain chain of Table 1, second stages with a mitigation (from the same "
            "theta_A, found by run.json config: mixing A's data into B's batches, L2 pull to theta_A, EWC) and the "
            "trained third-stage replay points. Forgetting of A and accuracy of B in percent, mean (std) over "
            "seeds. Cost: extra optimisation steps beyond the plain chain; A-examples seen = distinct examples of A "
            "read (mixing: those replayed, at most A's training set; replay point: min(steps x batch size, its "
            "subset); EWC: the Fisher samples; L2: none); presented = A-examples in training batches, repeats "
            "counted. Replay points are evaluated with replay.py's settings (n_eval_a). "
            "([mitigation.csv](mitigation.csv), per seed: [mitigation_runs.csv](mitigation_runs.csv))\n\n"
            + markdown_table(df.drop(columns=["seeds", "runs"])) + "\n![mitigation](mitigation.png)\n\n"
            "### At matched cost\n\n" + matched_cost(df))
    return Section(text, files, problems, refused)


# ----------------------------------------------------------------------------------------------------
# chains longer than two

CHAIN_COLUMNS = ["chain", "seed", "lrs", "task", "tuned_at_stage", "after_stage", "after_task", "acc_tuned",
                 "acc_after", "forgetting", "run_tuned", "run_after"]


def chain_forgetting_rows(long_chains):
    """For every long chain and seed, the forgetting of every earlier task after every later stage (fractions):
    forgetting = acc_T(after the stage k that tuned T) - acc_T(after stage j), j > k, both from the eval.json
    of those stages. A task tuned again later is counted from its last tuning: the rows of stage k stop
    before the next stage that tunes T. Two evaluations of T that cannot be compared (metrics.incomparable) give
    no forgetting: the row's "refused" says why. -> (rows, problems)."""
    rows, problems = [], []
    for lc in long_chains:
        problems.extend(lc.problems)
        chain, stages = lc.chain, lc.stages
        lrs = ";".join(f"{r.lr:g}" if r is not None and not r.problem else "?" for r in stages)
        for k, T in enumerate(chain, 1):
            retuned = next((m for m in range(k + 1, len(chain) + 1) if chain[m - 1] == T), len(chain) + 1)
            tuned = stages[k - 1]
            for j in range(k + 1, retuned):
                after = stages[j - 1]
                vals = []
                for r in (tuned, after):
                    if r is None or r.problem or not r.eval or T not in r.eval["tasks"]:
                        if r is not None and r.eval and T not in r.eval["tasks"]:
                            problems.append(f"{r.name}/eval.json has no result for {T} (long chain "
                                            f"{chain_name(chain)}); re-run evaluate.py with every task of the chain")
                        vals.append(float("nan"))
                    else:
                        vals.append(r.acc(T))
                why = None
                if not any(math.isnan(v) for v in vals):
                    why = incomparable(T, evaluation(tuned), evaluation(after))
                rows.append({"chain": chain_name(chain), "seed": lc.seed, "lrs": lrs, "task": T, "tuned_at_stage": k,
                             "after_stage": j, "after_task": chain[j - 1], "acc_tuned": vals[0], "acc_after": vals[1],
                             "forgetting": float("nan") if why else vals[0] - vals[1], "refused": why,
                             "run_tuned": tuned.name if tuned is not None else MISSING,
                             "run_after": after.name if after is not None else MISSING})
    return rows, sorted(set(problems), key=problems.index)


def section_long_chains(study, opts):
    """chain_forgetting.csv (per chain, seed, task and later stage), figure_chain_forgetting.png/.csv (mean over
    seeds). Nothing is written without a chain longer than two."""
    head = "## Chains longer than two\n\n"
    if not study.long_chains:
        return Section(head + ("No long chains: no run.json of stage 3 or more (other than replay points) under "
                               "the runs folder.\n"))
    rows, problems = chain_forgetting_rows(study.long_chains)
    refused = [f"long chain {r['chain']} seed {r['seed']}: forgetting of {r['task']} after stage "
               f"{r['after_stage']} left out, its evaluations cannot be compared: {r['refused']}"
               for r in rows if r["refused"]]
    df = pd.DataFrame([{k: (INCOMPARABLE if k == "forgetting" and r["refused"] else
                            rounded(100 * v) if k in ("acc_tuned", "acc_after", "forgetting") else v)
                        for k, v in r.items()} for r in rows], columns=CHAIN_COLUMNS)
    files = {"chain_forgetting.csv": csv_text(df)}
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
    files.update(figure_files(fig, mean, "figure_chain_forgetting"))
    seeds = sorted({str(lc.seed) for lc in study.long_chains})
    text = (head + f"{len(study.long_chains)} long chain(s) (seeds {', '.join(seeds)}). Forgetting of task T after "
            "stage j = acc_T after the stage that tuned T - acc_T after stage j, in percent, mean (std) over seeds "
            "([chain_forgetting.csv](chain_forgetting.csv) per seed, [figure_chain_forgetting.csv]"
            "(figure_chain_forgetting.csv)). Stages are found by parent_run_id from each chain's last stage.\n\n"
            + markdown_table(mean.drop(columns=["seeds"])) + "\n![chain forgetting](figure_chain_forgetting.png)\n")
    return Section(text, files, problems, refused)
