"""The report's figures: Figure 2 (relative forgetting), Figure 3 and Figures 9-10 (forgetting by group with
each group's CI), Figures 5, 6 and 8 (forgetting against learning rate), the forgetting and biased-forgetting
heatmaps, the accuracy along each chain and the training loss curves. Each figure comes with the CSV of the data
behind it. One section function per output: section_xxx(study, opts) -> Section.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import contextlib
import json
import math
import os
from collections import defaultdict

import numpy as np
import pandas as pd

from ..forgetting import NA
from ..statistics import correction_name
from .format import MISSING, Section, as_floats, cells, exact, rounded, short
from .plot import MARKERS, chain_colours, figure_files, plt
from .study import CAPABILITY_TASKS, SAFETY_TASKS
from .tables import chain_bootstrap, chain_permutation, group_decisions


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
                     "n_seeds", "biased_forgetting", "biased_forgetting_ci_low", "biased_forgetting_ci_high",
                     "p_value", "p_adjusted", "significant"]


def group_bar_rows(study, opts, chains):
    """Per chain and group: forgetting (percent, mean over seeds), the task's average, and the group's biased
    forgetting with its bootstrap CI (the CI of the group's gap from the average) and its permutation p, raw and
    corrected within the chain (--correction), with the corrected decision."""
    rows = []
    for A, B in chains:
        ps = study.table1[(A, B)]
        ci = chain_bootstrap(study, A, ps, opts)[0] if opts.n_boot > 0 else None
        decided = group_decisions(chain_permutation(study, A, ps, opts), opts)
        task_f = cells([p.stats["forgetting"] for p in ps])[0]
        for g in sorted(set().union(*(p.stats["group_forgetting"] for p in ps))):
            m, sd = cells([p.stats["group_forgetting"].get(g, float("nan")) for p in ps])
            gci = ((ci or {}).get("groups") or {}).get(g, {})
            raw, adj, decision = decided.get(g, (float("nan"), float("nan"), NA))
            rows.append({"first_task": A, "second_task": B, "group": g, "forgetting": m, "forgetting_std": sd,
                         "task_forgetting": task_f, "n_seeds": len(ps),
                         "biased_forgetting": cells([p.stats["biased"].get(g, float("nan")) for p in ps])[0],
                         "biased_forgetting_ci_low": rounded(100 * gci.get("low", float("nan"))),
                         "biased_forgetting_ci_high": rounded(100 * gci.get("high", float("nan"))),
                         "p_value": rounded(raw, 6), "p_adjusted": rounded(adj, 6), "significant": decision})
    return pd.DataFrame(rows, columns=GROUP_BAR_COLUMNS)


def _group_bars(ax, d, title):
    """One chain's per-group forgetting as horizontal bars, the task's average as a dotted line, and each group's
    CI of its gap from that average as an error bar around the bar's end (red: CI above the average, blue: below,
    grey: it includes the average)."""
    ax.set_title(title, fontsize=9)
    f, tf = as_floats(d.forgetting), as_floats(d.task_forgetting)[0]
    if np.all(np.nan_to_num(f) == 0) and tf == 0:
        ax.text(0.5, 0.5, "no forgetting (every group 0)", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks(range(len(d)), list(d.group), fontsize=7)
        return
    order = np.argsort(np.nan_to_num(f, nan=-np.inf))
    d, f = d.iloc[order], f[order]
    lo, hi = tf + as_floats(d.biased_forgetting_ci_low), tf + as_floats(d.biased_forgetting_ci_high)
    # the highlight is the corrected decision (many groups, one chain: raw CIs alone flag some by chance); the CI
    # decides only where no test was run (--n_perm 0 or no samples)
    colour = [{"more": "tab:red", "less": "tab:blue", "no": "tab:gray"}.get(s) or
              ("tab:red" if l > tf else "tab:blue" if h < tf else "tab:gray")
              for s, l, h in zip(d.significant, lo, hi)]
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
                     "forgetting) drawn around the bar's end; red: the group forgot more than average by its "
                     "permutation test, corrected for the chain's groups ({correction}, adjusted p < {alpha:g}), blue: "
                     "less, grey: not significant (without the test: the CI decides).")


def _group_note(opts):
    if opts.n_boot <= 0:
        return ("Bars: per-group forgetting (%), mean over seeds; dotted line: the first task's average forgetting "
                "(no CIs: --n_boot 0)" + (f"; red / blue: forgot more / less than average by the per-group permutation "
                                          f"test ({correction_name(opts.correction)}, adjusted p < {1 - opts.ci:g})"
                                          if opts.n_perm > 0 else "") + ".")
    return GROUP_FIGURE_NOTE.format(ci=f"{100 * opts.ci:g}%", correction=correction_name(opts.correction),
                                    alpha=1 - opts.ci)


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
                v = as_floats([r.biased_forgetting])[0]
                grid[groups.index(r.group), seconds.index(r.second_task)] = v
                lo, hi = r.biased_forgetting_ci_low, r.biased_forgetting_ci_high
                label = "n/a" if math.isnan(v) else f"{v:.1f}"
                if not isinstance(lo, str) and not isinstance(hi, str):
                    label += f"\n[{lo:.1f}, {hi:.1f}]"
                label += "*" if heatmap_star(r.significant, lo, hi) else ""
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
    df.insert(len(df.columns), "star", [heatmap_star(r.significant, r.biased_forgetting_ci_low,
                                                     r.biased_forgetting_ci_high) for r in df.itertuples()])
    return Section("## Biased forgetting per group and chain\n\n![group heatmap](figure_group_heatmap.png)\n\n"
                   "Each cell: a group's forgetting minus its task's average (percent, mean over seeds; red: forgot "
                   f"more than average), {heatmap_note(opts)} ([figure_group_heatmap.csv](figure_group_heatmap.csv): "
                   "its significant column is the corrected decision, star the mark drawn).\n",
                   figure_files(fig, df, "figure_group_heatmap"))


def heatmap_star(decision, lo, hi):
    """Whether a group-heatmap cell gets its *: the corrected per-group decision of forgetting_by_group.csv
    (more / less than the task's average; many groups per chain, so raw CIs alone flag some by chance); only
    where no test was run (--n_perm 0, no samples: decision n/a) does the bootstrap CI excluding 0 decide."""
    if decision in ("more", "less"):
        return True
    if decision == "no":
        return False
    return not isinstance(lo, str) and not isinstance(hi, str) and (lo > 0 or hi < 0)


def heatmap_note(opts):
    """The caption's words on the brackets and the * of figure_group_heatmap (the rule heatmap_star applies)."""
    ci = f"{100 * opts.ci:g}% bootstrap CI in brackets" if opts.n_boot > 0 else "no CIs (--n_boot 0)"
    if opts.n_perm > 0:
        rule = (f"* marks a group whose per-group permutation test, corrected for the chain's groups "
                f"({correction_name(opts.correction)}, adjusted p < {1 - opts.ci:g}), says it forgot more or less "
                "than average (the significant column of forgetting_by_group.csv)"
                + ("; where no test could run, a CI that excludes 0" if opts.n_boot > 0 else ""))
    else:
        rule = "* marks a CI that excludes 0 (no permutation test: --n_perm 0)" if opts.n_boot > 0 else "no * marks"
    return f"{ci}; {rule}"


def base_evaluations(study):
    """{task: accuracy} of the base model theta_0 (study.base, report/study.py's loose_evaluations); {} when the
    study did not evaluate it."""
    tasks = study.base.eval["tasks"] if study.base else {}
    return {t: float(b["acc"]) for t, b in tasks.items()
            if isinstance(b, dict) and isinstance(b.get("acc"), (int, float))}


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
            y = as_floats([d.acc_theta0.iloc[0], d.acc_theta_a.iloc[0], d.acc_theta_ab.iloc[0]])
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
                ax.plot(g.step, g.loss, color=colours[c], linewidth=1,
                        label=c.replace("->", " -> ") if k == 0 else None)
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

