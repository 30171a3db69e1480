"""The report's section on chains longer than two: the forgetting of every earlier task after every later stage
(chain_forgetting.csv, figure_chain_forgetting). Its inputs are the run.json and eval.json of each stage, found by
parent_run_id from each chain's last stage (runs.long_chain_lineages).

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import math
from collections import defaultdict

import pandas as pd

from ..runs import evaluation, incomparable
from .format import INCOMPARABLE, MISSING, Section, cells, csv_text, markdown_table, rounded, short
from .plot import figure_files, plt
from .replay import chain_name

CHAIN_COLUMNS = ["chain", "seed", "lrs", "task", "tuned_at_stage", "after_stage", "after_task", "acc_tuned",
                 "acc_after", "forgetting", "run_tuned", "run_after"]


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
