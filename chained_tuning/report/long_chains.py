"""The report's sections on chains longer than two: the forgetting of every earlier task after every later stage
(chain_forgetting.csv, figure_chain_forgetting), and the continual-learning metrics (continual.py: the accuracy
matrix, ACC, BWT, FWT; continual_accuracy_matrix.csv, continual_metrics.csv). Their inputs are the run.json and
eval.json of each stage, found by parent_run_id from each chain's last stage (runs.long_chain_lineages), and the
base model's eval.json (study.base) for FWT.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import math
from collections import defaultdict

import pandas as pd

from ..forgetting import NA
from ..runs import evaluation, incomparable
from .continual import Refused, chain_matrix, continual_metrics
from .format import INCOMPARABLE, MISSING, Section, cells, csv_text, markdown_table, rounded, short
from .plot import figure_files, plt
from .replay import chain_name

CHAIN_COLUMNS = ["chain", "seed", "lrs", "task", "tuned_at_stage", "after_stage", "after_task", "acc_tuned",
                 "acc_after", "forgetting", "run_tuned", "run_after"]


def chain_lrs(stages):
    """A long chain's learning rates, stage by stage ("?" for a stage not found or failed): chains with other
    learning rates are other experiments, never averaged together."""
    return ";".join(f"{r.lr:g}" if r is not None and not r.problem else "?" for r in stages)


def chain_forgetting_rows(long_chains):
    """For every long chain and seed, the forgetting of every earlier task after every later stage (fractions):
    forgetting = acc_T(after the stage k that tuned T) - acc_T(after stage j), j > k, both from the eval.json
    of those stages. A task tuned again later is counted from its last tuning: the rows of stage k stop
    before the next stage that tunes T. Two evaluations of T that cannot be compared (runs.incomparable) give
    no forgetting: the row's "refused" says why. -> (rows, problems)."""
    rows, problems = [], []
    for lc in long_chains:
        problems.extend(lc.problems)
        chain, stages = lc.chain, lc.stages
        lrs = chain_lrs(stages)
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


CONTINUAL_MATRIX_COLUMNS = ["chain", "seed", "lrs", "group", "after_stage", "after_task", "model", "task", "acc"]
CONTINUAL_COLUMNS = ["chain", "seed", "lrs", "group", "tasks", "ACC (%)", "BWT (%)", "FWT (%)", "n_bwt", "n_fwt"]
ALL = "all"  # the group column of the task-level rows


def continual_rows(long_chains, base, more=None):
    """For every long chain and seed: its accuracy matrix (long format, fractions; after_stage 0: the base model)
    and ACC / BWT / FWT, overall (group "all") and per group -> (matrix rows, metric rows, refused lines). A
    chain whose evaluations do not belong together (continual.Refused) gives no row, only its refusal line;
    without a usable base evaluation FWT is the reason it is not available, never a number."""
    mrows, rows, refused = [], [], []
    for lc in long_chains:
        name, lrs = chain_name(lc.chain), chain_lrs(lc.stages)
        try:
            tasks, R, G, b, bg, fwt_note = chain_matrix(lc.stages, base, more)
        except Refused as e:
            refused.append(f"long chain {name} seed {lc.seed}: accuracy matrix, ACC, BWT and FWT left out: {e}")
            continue
        for group, m, base_row in [(ALL, R, b)] + [(g, G[g], bg[g] if bg else None) for g in sorted(G)]:
            cols = [j for j in range(len(tasks)) if m[0][j] is not None]
            after = [(0, "base", base.name if base else None, base_row)] if base_row is not None else []
            after += [(i + 1, tasks[i], lc.stages[i].name, m[i]) for i in range(len(tasks))]
            for k, at, model, row in after:
                for j in cols:
                    mrows.append({"chain": name, "seed": lc.seed, "lrs": lrs, "group": group, "after_stage": k,
                                  "after_task": at, "model": model, "task": tasks[j], "acc": row[j]})
            cm = continual_metrics(m, base_row)
            rows.append({"chain": name, "seed": lc.seed, "lrs": lrs, "group": group,
                         "tasks": ";".join(tasks[j] for j in cols), "acc": cm["acc"], "bwt": cm["bwt"],
                         "fwt": cm["fwt"], "n_bwt": cm["n_bwt"], "n_fwt": cm["n_fwt"], "fwt_note": fwt_note})
    return mrows, rows, refused


def _pct(v, note=None):
    return note if v is None else rounded(100 * v)


def section_continual(study, opts):
    """continual_accuracy_matrix.csv and continual_metrics.csv (per chain and seed) and, in report.md, each long
    chain's accuracy matrix and ACC / BWT / FWT, overall and per group (mean (std) over seeds)."""
    head = "## Continual-learning metrics of the long chains\n\n"
    if not study.long_chains:
        return Section(head + "No long chains: nothing to compute.\n")
    mrows, rows, refused = continual_rows(study.long_chains, study.base, study.more_evals)
    matrix = pd.DataFrame([dict(r, acc=rounded(100 * r["acc"])) for r in mrows],
                          columns=CONTINUAL_MATRIX_COLUMNS).rename(columns={"acc": "acc (%)"})
    table = pd.DataFrame([{**{k: r[k] for k in ("chain", "seed", "lrs", "group", "tasks")},
                           "ACC (%)": _pct(r["acc"]), "BWT (%)": _pct(r["bwt"]),
                           "FWT (%)": _pct(r["fwt"], r["fwt_note"]), "n_bwt": r["n_bwt"], "n_fwt": r["n_fwt"]}
                          for r in rows], columns=CONTINUAL_COLUMNS)
    files = {"continual_accuracy_matrix.csv": csv_text(matrix), "continual_metrics.csv": csv_text(table)}
    text = (head + "What continual-learning papers report (Lopez-Paz & Ranzato 2017): R[i][j] = test accuracy on the "
            "task tuned at stage j after stage i (stage 0: the base model theta_0, evaluated once per study); "
            "ACC = mean_j R[T][j], BWT = mean_{j<T} (R[T][j] - R[j][j]) (negative: forgetting), FWT = mean_{j>=2} "
            "(R[j-1][j] - b_j) with b_j the base model's accuracy on task j. Per group: the same formulas on the "
            "group's accuracies, averaged over the tasks that have the group (tasks column; n_bwt / n_fwt: the "
            "terms averaged). Percent, mean (std) over seeds; per seed in [continual_metrics.csv]"
            "(continual_metrics.csv) and [continual_accuracy_matrix.csv](continual_accuracy_matrix.csv). Computed "
            "from the same eval.json files as chain_forgetting.csv; a chain whose evaluations do not belong together "
            "is left out by name (see Refused).\n\n")
    if not rows:
        return Section(text + "No long chain gives a usable accuracy matrix.\n", files, [], refused)
    by_chain = defaultdict(list)
    for r in rows:
        by_chain[(r["chain"], r["lrs"])].append(r)
    for (c, lrs), rs in sorted(by_chain.items()):
        seeds = sorted({r["seed"] for r in rs}, key=str)
        text += f"### {c} (lr {lrs}; seeds {', '.join(map(str, seeds))})\n\n"
        ms = [m for m in mrows if m["chain"] == c and m["lrs"] == lrs and m["group"] == ALL]
        tasks = list(dict.fromkeys(m["task"] for m in ms))
        grid = []
        for k in sorted({m["after_stage"] for m in ms}):
            at = next(m["after_task"] for m in ms if m["after_stage"] == k)
            line = {"after": "theta_0 (base)" if k == 0 else f"stage {k}: {short(at)}"}
            for t in tasks:
                line[short(t)] = cells([m["acc"] for m in ms if m["after_stage"] == k and m["task"] == t])[0]
            grid.append(line)
        text += "Accuracy matrix R (rows: after stage, columns: task; percent, mean over seeds):\n\n"
        text += markdown_table(pd.DataFrame(grid)) + "\n"
        out = []
        for g in [ALL] + sorted({r["group"] for r in rs} - {ALL}):
            gs = [r for r in rs if r["group"] == g]
            line = {"group": g, "tasks": ", ".join(short(t) for t in gs[0]["tasks"].split(";")),
                    "n_seeds": len(gs)}
            for key, label in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT")):
                vals = [r[key] for r in gs if r[key] is not None]
                # None: FWT without a usable base (its reason); nan: no term in this scope (n/a)
                note = NA if vals else next(r["fwt_note"] for r in gs if r["fwt_note"])
                m, sd = cells(vals, marker=note)
                line[f"{label} (%)"], line[f"{label} std (%)"] = m, (NA if m == note else sd)
            out.append(line)
        text += markdown_table(pd.DataFrame(out)) + "\n"
    return Section(text, files, [], refused)
