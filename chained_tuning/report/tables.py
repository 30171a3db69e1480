"""The report's tables: Table 1 (accuracy and forgetting in both orders), the group tables (forgetting and
biased forgetting per group with bootstrap CIs, Kendall's tau-b), first-task accuracy per learning rate,
accuracies at chance level, and Table 2 (the data sets beside the paper's). One section function per output:
section_xxx(study, opts) -> Section.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from ..forgetting import (CHANCE_SE, NA, align_samples, biased_forgetting, chance_flag, kendall_tau_b, mean_std,
                          paired_bootstrap_ci, worst_groups_label)
from ..runs import load_samples
from ..statistics import adjust, group_permutation_test, holm, is_number
from .format import MISSING, TASK_NAMES, Section, cells, csv_text, markdown_table, rounded, short
from .study import CAPABILITY_TASKS, SAFETY_TASKS

TABLE1_COLUMNS = ["capability", "safety",
                  "cs_acc_cap", "cs_acc_cap_std", "cs_acc_safety", "cs_acc_safety_std",
                  "cs_forgetting_cap", "cs_forgetting_cap_std",
                  "sc_acc_cap", "sc_acc_cap_std", "sc_acc_safety", "sc_acc_safety_std",
                  "sc_forgetting_safety", "sc_forgetting_safety_std"]


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
        perm = chain_permutation(study, A, ps, opts) if groups else None
        decided = group_decisions(perm, opts)
        for g in groups:
            gci = (ci or {}).get("groups", {}).get(g, {})
            raw, adj, decision = decided.get(g, (float("nan"), float("nan"), NA))
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
                         "n_seeds": len(ps), "p_value": rounded(raw, 6), "p_adjusted": rounded(adj, 6),
                         "significant": decision})
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
                        f"worst_{opts.k}_groups": worst_groups_label(mean_vec, opts.k), **spread_cells(perm)})
    return rows, summary, problems


def chain_samples(A, ps):
    """The paired 0/1 answers on the test examples of task A shared by every seed's theta_A and theta_AB ->
    ((correct_first, correct_chained, groups) or None, the problem that stopped it or None)."""
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
    return (np.array([[d[i][0] for i in ids] for d in per_seed]), np.array([[d[i][1] for i in ids] for d in per_seed]),
            [per_seed[0][i][2] for i in ids]), None


def bootstrap_chain(A, ps, opts):
    """paired_bootstrap_ci over the test examples of task A shared by every seed's theta_A and theta_AB ->
    (its result or None, the problem that stopped it or a check failed, or None)."""
    samples, problem = chain_samples(A, ps)
    if samples is None:
        return None, problem
    correct_first, correct_chained, groups = samples
    res = paired_bootstrap_ci(correct_first, correct_chained, groups,
                              n_resamples=opts.n_boot, seed=opts.boot_seed, level=opts.ci, k=opts.k)
    want = np.mean([p.stats["forgetting"] for p in ps])
    if abs(res["forgetting"]["estimate"] - want) > 1e-6:
        return res, (f"{A}->{ps[0].B}: the samples files give forgetting {100 * res['forgetting']['estimate']:.2f} "
                     f"but eval.json {100 * want:.2f}; re-run evaluate.py")
    return res, None


def chain_permutation(study, A, ps, opts):
    """group_permutation_test of the chain's examples (None without samples, groups or --n_perm), once per chain
    and options for every section that reads it."""
    key = ("permutation", A, ps[0].B, tuple(p.chained.run_id for p in ps), opts.n_perm, opts.boot_seed)
    if key not in study.cache:
        samples = chain_samples(A, ps)[0] if opts.n_perm > 0 else None
        has_groups = samples is not None and any(g is not None for g in samples[2])
        study.cache[key] = group_permutation_test(*samples, n_permutations=opts.n_perm, seed=opts.boot_seed) \
            if has_groups else None
    return study.cache[key]


def group_decisions(perm, opts):
    """{group: (raw p, adjusted p, decision)} of one chain: the per-group p values of the permutation test adjusted
    within the chain by --correction; decision "more" / "less" (than the task's average) when the adjusted p is
    below 1 - --ci, else "no"; {} without a test."""
    if not perm:
        return {}
    names = sorted(perm["groups"])
    raw = [perm["groups"][g]["p_value"] for g in names]
    adj = adjust(raw, opts.correction)
    alpha = 1 - opts.ci
    return {g: (p, a, NA if np.isnan(a) else "no" if a >= alpha else "more" if perm["groups"][g]["gap"] > 0
                else "less") for g, p, a in zip(names, raw, adj)}


def spread_cells(perm):
    """biased_forgetting.csv's columns of the unevenness test (percent points; variances in points squared)."""
    if not perm:
        return {c: NA for c in SPREAD_COLUMNS}
    return {"n_permutations": perm["n_permutations"], "group_variance_pts2": rounded(1e4 * perm["variance"]),
            "group_range": rounded(100 * perm["range"]),
            "null_variance_mean_pts2": rounded(1e4 * perm["null_variance_mean"]),
            "variance_excess_pts2": rounded(1e4 * perm["variance_excess"]),
            "variance_ratio": rounded(perm["variance_ratio"]), "spread_p_value": rounded(perm["p_value"], 6),
            "range_p_value": rounded(perm["p_range"], 6)}


SPREAD_COLUMNS = ["n_permutations", "group_variance_pts2", "group_range", "null_variance_mean_pts2",
                  "variance_excess_pts2", "variance_ratio", "spread_p_value", "range_p_value"]


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
                                           "biased_forgetting_ci_low", "biased_forgetting_ci_high", "n_seeds",
                                           "p_value", "p_adjusted", "significant"])
    files["forgetting_by_group.csv"] = csv_text(by_group)
    bf = pd.DataFrame(summary)
    if bf.empty:
        bf = pd.DataFrame(columns=["first_task", "second_task", "forgetting", "biased_forgetting_max",
                                   *SPREAD_COLUMNS])
    # the unevenness verdict reads every pair at once: Holm across the pairs with a test (family-wise)
    spread_p = [float(v) if is_number(v) else float("nan") for v in bf["spread_p_value"]]
    bf["spread_p_holm"] = [rounded(v, 6) for v in holm(spread_p)]
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
                           "tau_b": rounded(tau), "p_value": rounded(pv, 6),
                           "defined": "no (a constant ranking)" if np.isnan(tau) else "yes"})
    kt = pd.DataFrame(kt, columns=["first_task", "second_task_1", "second_task_2", "n_groups", "tau_b", "p_value",
                                   "defined"])
    kt.insert(6, "p_holm", [rounded(v, 6) for v in holm([float(v) if is_number(v) else float("nan")
                                                         for v in kt.p_value])])
    files["kendall_tau.csv"] = csv_text(kt)

    cols = ["first_task", "second_task", "n_seeds", "forgetting", "forgetting_ci_low", "forgetting_ci_high",
            "wg_forgetting", "worst_group", "biased_forgetting_max", "biased_forgetting_max_ci_low",
            "biased_forgetting_max_ci_high", f"worst_{opts.k}_groups", "spread_p_value", "spread_p_holm"]
    grouped = bf[bf["n_groups"] > 0][cols] if "n_groups" in bf else bf
    ci_note = (f"{100 * opts.ci:g}% paired bootstrap CIs over test examples ({opts.n_boot} resamples, "
               f"seed {opts.boot_seed}; columns *_ci_low/high). The max over groups is biased upward by noise, "
               "so its CI can sit above the estimate; a group's own CI (forgetting_by_group.csv) says whether "
               "its gap is noise" if opts.n_boot else "no bootstrap (--n_boot 0)")
    text = ("## Biased forgetting\n\nPer chain of Table 1, tasks with groups (percent, mean over seeds; groups tied "
            "for a place are named together, \"a = b (tied)\"; "
            f"{ci_note}). Whether the groups differ beyond chance: spread_p_value, a permutation test of the "
            f"variance of per-group forgetting ({opts.n_perm} permutations of the group labels over the examples, seed "
            f"{opts.boot_seed}; p = (k + 1) / (n + 1)), spread_p_holm that p adjusted by Holm across the pairs; "
            "per group, p_value and p_adjusted (--correction within the pair) in forgetting_by_group.csv. "
            "The whole per-group vector is in [forgetting_by_group.csv](forgetting_by_group.csv); "
            "every chain in [biased_forgetting.csv](biased_forgetting.csv).\n\n"
            + (markdown_table(grouped) if len(grouped) else "No chain with a grouped first task.\n")
            + "\n## Kendall's tau-b between group rankings\n\nSame first task, different second tasks, "
            "rankings of the groups' biased forgetting ([kendall_tau.csv](kendall_tau.csv)).\n\n"
            + (markdown_table(kt, 3) if len(kt) else "No first task with groups followed by two second tasks.\n"))
    return Section(text, files, problems)


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

