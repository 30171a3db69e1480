"""The report's curvature section: Figure 4 (the first-task minimum's spectral radius rho, and the mean downstream
forgetting against it with its OLS fit) and the Taylor check of equations 3 and 4. Its inputs are curvature.py's
curvature.json and taylor.json, read once by build_study; they pair with runs by run_id.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import io
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from scipy import stats

from ..forgetting import NA, mean_std
from ..runs import TAYLOR_FIX, lr_distance, number
from .format import MISSING, Section, csv_text, exact, markdown_table, rounded, short, significant
from .plot import figure_files, plt
from .study import CAPABILITY_TASKS, SAFETY_TASKS

# quadratic <= bound up to float error: the same rule as curvature.py's own quadratic_le_bound (its Taylor
# check, `quad <= bound * (1 + 1e-6) + 1e-12`); keep both in step (curvature.py needs torch, so the report
# cannot import it)
BOUND_RTOL, BOUND_ATOL = 1e-6, 1e-12


def ols_fit(x, y):
    """Ordinary least squares y = intercept + slope * x (scipy.stats.linregress), with n points:

        slope     = S_xy / S_xx,   intercept = mean(y) - slope * mean(x)
        R^2       = S_xy^2 / (S_xx S_yy)  (= r^2 = 1 - SS_res / SS_tot)
        p_value   = two-sided p of t = r sqrt((n - 2) / (1 - r^2)) under Student's t with n - 2 dof
                    (the null hypothesis slope = 0)
    where S_xy = sum (x_i - mean x)(y_i - mean y). Pairs with a nan are dropped. With fewer than 3 points
    (no residual degree of freedom) or constant x the fit is not defined: every value is nan and "note" says
    why. Returns {"n", "slope", "intercept", "r", "r_squared", "p_value", "slope_stderr", "note"}."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    res = {"n": int(len(x)), "slope": float("nan"), "intercept": float("nan"), "r": float("nan"),
           "r_squared": float("nan"), "p_value": float("nan"), "slope_stderr": float("nan"), "note": ""}
    if len(x) < 3:
        res["note"] = f"fewer than 3 points ({len(x)}): no fit"
        return res
    if np.all(x == x[0]):
        res["note"] = "all x values are equal: no fit"
        return res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # perfect fits: scipy divides by zero for the stderr
        r = stats.linregress(x, y)
    res.update(slope=float(r.slope), intercept=float(r.intercept), r=float(r.rvalue),
               r_squared=float(r.rvalue) ** 2, p_value=float(r.pvalue), slope_stderr=float(r.stderr))
    return res


@dataclass
class Curvature:
    """One curvature.json paired (by run_id) with the run.json of the model it was computed at."""
    file: str                  # path relative to --runs
    data: dict
    run: object = None         # the Run, None when no run.json has its run_id
    used: bool = False         # the one result taken for its run (see curvature_results)

    rho = property(lambda self: number(self.data.get("rho")))
    converged = property(lambda self: self.data.get("converged") is True)


def curvature_results(curv_files, runs):
    """Pair curvature.json files to runs by run_id -> ({run_id: Curvature used for that run}, all, problems).

    A file is usable when its run_id matches a run.json, its "task" (if given) is that run's task and its
    "rho" is a number. Several usable files for one run (say a lanczos and a power solve): the one used is
    the converged one, then lanczos, then the first path; the others stay in curvature.csv (used = False)."""
    by_id = {r.run_id: r for r in runs}
    every_result, problems, usable = [], [], defaultdict(list)
    for name, data in curv_files:
        c = Curvature(name, data)
        every_result.append(c)
        rid = data.get("run_id")
        if not isinstance(rid, str) or not rid:
            problems.append(f"{name}: no run_id (curvature of a model without run.json?); cannot pair it with a "
                            f"run, left out")
            continue
        c.run = by_id.get(rid)
        if c.run is None:
            problems.append(f"{name}: its run_id {rid} matches no run.json under the runs folder; left out")
        elif data.get("task") not in (None, c.run.task):
            problems.append(f"{name}: curvature of the {data.get('task')} loss but run {c.run.name} was tuned on "
                            f"{c.run.task}; left out")
        elif math.isnan(c.rho):
            problems.append(f"{name}: no numeric rho ({data.get('rho')!r}); re-run curvature.py")
        else:
            usable[rid].append(c)
    chosen = {}
    for rid, cs in usable.items():
        cs.sort(key=lambda c: (not c.converged, c.data.get("method") != "lanczos", c.file))
        cs[0].used = True
        chosen[rid] = cs[0]
    return chosen, every_result, problems


def first_task_models(study, curv_by_id):
    """The theta_A models whose curvature Figure 4 shows: {(task, seed): [Run, ...]}.

    For a first task and seed with chains in Table 1: the first-stage runs those chains start from (the
    models whose forgetting Table 1 and Figure 4b measure). Otherwise the first-stage runs of that task and
    seed at the lr closest to the main lr (without a main lr: the most common lr of the curvature results)."""
    models = defaultdict(dict)
    for (A, _), ps in study.table1.items():
        for p in ps:
            models[(A, p.seed)][p.first.run_id] = p.first
    ref_lr = study.main_lr
    if ref_lr is None:
        lrs = Counter(c.run.lr for c in curv_by_id.values() if c.run.stage == 1)
        ref_lr = min(lrs, key=lambda lr: (-lrs[lr], lr)) if lrs else None
    stage1 = defaultdict(list)
    for r in study.runs:
        if r.stage == 1 and isinstance(r.seed, int):
            stage1[(r.task, r.seed)].append(r)
    for key, rs in stage1.items():
        if key in models:
            continue
        best = min(lr_distance(r.lr, ref_lr) for r in rs)
        if math.isinf(best):  # no reference lr at all: nothing sensible to pick
            continue
        models[key] = {r.run_id: r for r in rs if lr_distance(r.lr, ref_lr) == best}
    return {k: list(v.values()) for k, v in models.items()}


def taylor_rows(taylor_files, runs, curv_by_id):
    """One row per taylor.json: the paper's equations 3 and 4 checked at theta_A for the chain A->B,

        delta = theta_AB - theta_A,   actual = L_A(theta_AB) - L_A(theta_A)
        quadratic = 0.5 delta^T H delta   (eq. 3, H the Hessian of L_A at theta_A)
        bound     = 0.5 rho(H) ||delta||^2   (eq. 4)

    Pairing by run_id: reference.run_id is theta_AB's run.json run_id (its chain gives A, B, seed, lr_b),
    the file's run_id is theta_A's and must equal theta_AB's parent_run_id (when absent, the parent is
    used). When the file has no numeric rho (computed without a solve) or no numeric bound, the bound is
    recomputed as 0.5 * rho * delta_sq_norm with rho from the curvature.json of the same theta_A (found by
    run_id in curv_by_id; bound_source says which). quadratic_le_bound is quadratic <= bound within
    BOUND_RTOL, BOUND_ATOL (curvature.py's tolerance); actual_le_bound is actual <= bound.
    Returns (rows: list of dicts, problems: list of str)."""
    by_id = {r.run_id: r for r in runs}
    rows, problems = [], []
    for name, data in taylor_files:
        ref = data.get("reference")
        if not isinstance(ref, dict):
            problems.append(f"{name}: no \"reference\" block (not a Taylor check); {TAYLOR_FIX}")
            continue
        chained = by_id.get(ref.get("run_id"))
        if chained is None or chained.stage != 2 or not isinstance(chained.chain, list):
            why = ("matches no run.json" if chained is None else f"is the stage-{chained.stage} run {chained.name}")
            problems.append(f"{name}: reference run_id {ref.get('run_id')} {why}, not a chained run; left out")
            continue
        first_id = data.get("run_id") or chained.parent_run_id
        if first_id != chained.parent_run_id:
            problems.append(f"{name}: theta_A run_id {first_id} is not the parent ({chained.parent_run_id}) of "
                            f"{chained.name}; delta is not this chain's update, left out")
            continue
        A, B = chained.chain
        first = by_id.get(first_id)
        rho, bound = number(data.get("rho")), number(ref.get("bound"))
        dsq = number(ref.get("delta_sq_norm"))
        source = "taylor.json"
        if math.isnan(rho) or math.isnan(bound):
            c = curv_by_id.get(first_id) if math.isnan(rho) else None
            if math.isnan(rho) and c is None:
                problems.append(f"{name}: no rho in the file and no curvature.json for its theta_A (run_id "
                                f"{first_id}); bound not computed")
                source = MISSING
            else:
                rho = c.rho if c is not None else rho
                bound = 0.5 * rho * dsq
                source = f"recomputed: 0.5 * rho({c.file}) * delta_sq_norm" if c is not None else \
                    "recomputed: 0.5 * rho(taylor.json) * delta_sq_norm"
        quad, actual = number(ref.get("quadratic_term")), number(ref.get("actual_loss_change"))
        have = not (math.isnan(bound) or math.isnan(quad))
        rows.append({"first_task": A, "second_task": B, "seed": chained.seed,
                     "lr_a": first.lr if first is not None else float("nan"), "lr_b": chained.lr,
                     "first_run_id": first_id, "chained_run_id": chained.run_id,
                     "delta_sq_norm": dsq, "loss_A_at_A": number(ref.get("loss_A_at_A")),
                     "loss_A_at_AB": number(ref.get("loss_A_at_AB")), "actual_loss_change": actual,
                     "quadratic_term": quad, "rho": rho, "bound": bound, "bound_source": source,
                     "quadratic_le_bound": (bool(quad <= bound * (1 + BOUND_RTOL) + BOUND_ATOL) if have else MISSING),
                     "actual_le_bound": (bool(actual <= bound) if not (math.isnan(bound) or math.isnan(actual))
                                         else MISSING),
                     "file": name})
    return rows, problems


def curvature_tables(study, curv_by_id):
    """Per first task: rho over seeds (Figure 4a) and its mean downstream forgetting (Figure 4b).

    rho of a task = mean over seeds of rho(theta_A) (theta_A from first_task_models; several models for one
    seed are averaged first), std over seeds (ddof=1). Downstream forgetting of A = for each seed the mean
    forgetting over the Table-1 chains A->B (second-stage lr = main lr), then mean and std over seeds.
    Returns (rows_a, rows_b, missing: [(task, seed, Run)], not_converged: [Curvature])."""
    models = first_task_models(study, curv_by_id)
    tasks = list(study.capability) + list(study.safety)
    tasks += sorted({t for t, _ in models} - set(tasks))
    rows_a, rows_b, missing, not_conv = [], [], [], []
    for A in tasks:
        per_seed, lrs, n_nc = {}, set(), 0
        for s in sorted(seed for t, seed in models if t == A):
            vals = []
            for r in models[(A, s)]:
                c = curv_by_id.get(r.run_id)
                if c is None:
                    missing.append((A, s, r))
                    continue
                vals.append(c.rho)
                lrs.add(r.lr)
                if not c.converged:
                    n_nc += 1
                    not_conv.append(c)
            if vals:
                per_seed[s] = float(np.mean(vals))
        kind = "capability" if A in CAPABILITY_TASKS else "safety" if A in SAFETY_TASKS else "other"
        m, sd, n = mean_std(list(per_seed.values()))
        mk = MISSING
        rows_a.append({"task": A, "kind": kind, "rho": exact(m) if n else mk, "rho_std": (exact(sd) if n > 1 else NA)
                       if n else mk, "n_seeds": n, "seeds": ";".join(map(str, sorted(per_seed))) or NA,
                       "lr": ";".join(f"{lr:g}" for lr in sorted(lrs)) or NA, "n_not_converged": n_nc})
        ps = [p for (a, _), pl in study.table1.items() if a == A for p in pl]
        by_seed = defaultdict(list)
        for p in ps:
            by_seed[p.seed].append(p.stats["forgetting"])
        fm, fs, fn = mean_std([float(np.mean(v)) for v in by_seed.values()])
        fm, fs = (100 * fm, 100 * fs) if fn else (fm, fs)
        rows_b.append({"first_task": A, "kind": kind, "rho": rows_a[-1]["rho"], "rho_std": rows_a[-1]["rho_std"],
                       "n_rho_seeds": n,
                       "forgetting": rounded(fm) if fn else mk,
                       "forgetting_std": (rounded(fs) if fn > 1 else NA) if fn else mk,
                       "n_forgetting_seeds": fn, "chains": ";".join(sorted({f"{p.A}->{p.B}" for p in ps})) or NA,
                       "in_fit": bool(n and fn)})
    return rows_a, rows_b, missing, not_conv


CURVATURE_COLUMNS = ["task", "seed", "lr", "run_id", "rho", "lambda_max", "lambda_min", "converged", "iterations",
                     "hvp_count", "method", "residual", "stage", "run", "file", "used_in_figure4"]


def section_curvature(study, opts):
    """Curvature (Figure 4) and the Taylor check: curvature.csv, figure4a/b.png+csv, curvature_fit.csv,
    taylor_check.csv. Nothing is written (and the section says so) when the runs folder has no
    curvature.json and no taylor.json."""
    head = "## Curvature (Figure 4) and the Taylor check\n\n"
    if not study.curvature_files and not study.taylor_files:
        return Section(head + ("No curvature results: no curvature.json or taylor.json under the runs folder, so "
                               "no Figure 4 and no Taylor check (curvature.py writes them; run_all.sh runs it).\n"))
    curv_by_id, every_result, problems = curvature_results(study.curvature_files, study.runs)
    section = Section(head, problems=problems)
    if study.curvature_files:
        text, files, missing = curvature_figures(study, curv_by_id, every_result)
        section.text += text
        section.files.update(files)
        section.problems += missing
    else:
        section.text += "No curvature results (no curvature.json under the runs folder): no Figure 4.\n\n"
    rows, problems = taylor_rows(study.taylor_files, study.runs, curv_by_id)
    section.problems += problems
    text, files = taylor_section(rows, bool(study.taylor_files))
    section.text += text
    section.files.update(files)
    return section


def curvature_csv(study, curv_by_id, every_result, missing):
    """curvature.csv: every curvature result, and a "missing" row for each first-stage model of Figure 4 without
    one -> (CSV text, problems naming those models)."""
    problems = []
    used_ids = {r.run_id for rs in first_task_models(study, curv_by_id).values() for r in rs}
    tab = []
    for c in every_result:
        d, r = c.data, c.run
        tab.append({"task": r.task if r else d.get("task", NA), "seed": r.seed if r else NA,
                    "lr": r.lr if r else NA, "run_id": d.get("run_id") or NA, "rho": exact(c.rho),
                    "lambda_max": exact(number(d.get("lambda_max"))), "lambda_min": exact(number(d.get("lambda_min"))),
                    "converged": d.get("converged") if isinstance(d.get("converged"), bool) else "unknown",
                    "iterations": d.get("iterations", NA), "hvp_count": d.get("hvp_count", NA),
                    "method": d.get("method", NA), "residual": exact(number(d.get("residual"))),
                    "stage": r.stage if r else NA, "run": r.name if r else NA, "file": c.file,
                    "used_in_figure4": bool(c.used and r is not None and r.run_id in used_ids)})
    for A, s, r in missing:
        problems.append(f"{r.name}: no curvature.json for this first-stage model (task {A}, seed {s}, "
                        f"run_id {r.run_id}); run curvature.py --model {r.path} --task {A} --out "
                        f"<runs>/curvature/{A}/lr{r.lr:g}/seed{s}/curvature.json")
        tab.append({"task": A, "seed": s, "lr": r.lr, "run_id": r.run_id,
                    **{k: MISSING for k in CURVATURE_COLUMNS[4:12]},
                    "stage": r.stage, "run": r.name, "file": MISSING, "used_in_figure4": False})
    tab.sort(key=lambda t: (str(t["task"]), str(t["seed"]), str(t["lr"]), t["file"]))
    return csv_text(pd.DataFrame(tab, columns=CURVATURE_COLUMNS)), problems


KIND_COLOURS = {"capability": "tab:blue", "safety": "tab:orange", "other": "tab:gray"}


def figure4a(rows_a):
    """Figure 4a: rho per first task (mean over seeds, std as error bar; hatched where a solve did not converge)
    -> (its table, files)."""
    da = pd.DataFrame(rows_a, columns=["task", "kind", "rho", "rho_std", "n_seeds", "seeds", "lr", "n_not_converged"])
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(da) + 2), 3.6))
    x = np.arange(len(da))
    for xi, row in zip(x, da.itertuples()):
        if isinstance(row.rho, str):
            ax.text(xi, 0, row.rho, rotation=90, ha="center", va="bottom", fontsize=8, color="gray")
            continue
        err = row.rho_std if not isinstance(row.rho_std, str) else 0.0
        ax.bar(xi, row.rho, 0.6, yerr=err, capsize=3, color=KIND_COLOURS[row.kind],
               hatch="//" if row.n_not_converged else None, edgecolor="black" if row.n_not_converged else None)
    handles = [Patch(color=KIND_COLOURS[k], label=f"{k} task") for k in ("capability", "safety")
               if (da.kind == k).any()]
    if (da.n_not_converged > 0).any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                                                label="includes a non-converged solve"))
    if handles:
        ax.legend(handles=handles, fontsize=8)
    ax.set_xticks(x, [short(t) for t in da.task])
    ax.set_ylabel("spectral radius rho(H)")
    ax.set_title("Figure 4a: first-task minimum curvature (mean over seeds, error bar = std)")
    return da, figure_files(fig, da, "figure4a")


def figure4b(rows_b):
    """Figure 4b: mean downstream forgetting against rho per first task, with the OLS fit -> (the points in the
    fit, the fit, files: figure4b and curvature_fit.csv)."""
    db = pd.DataFrame(rows_b, columns=["first_task", "kind", "rho", "rho_std", "n_rho_seeds", "forgetting",
                                       "forgetting_std", "n_forgetting_seeds", "chains", "in_fit"])
    pts = db[db.in_fit]
    xs = pts.rho.astype(float).to_numpy()
    ys = pts.forgetting.astype(float).to_numpy()
    fit = ols_fit(xs, ys)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    err = lambda col: pd.to_numeric(pts[col], errors="coerce").fillna(0.0).to_numpy()
    for kind in ("capability", "safety", "other"):
        k = (pts.kind == kind).to_numpy()
        if k.any():
            ax.errorbar(xs[k], ys[k], xerr=err("rho_std")[k], yerr=err("forgetting_std")[k], fmt="o", capsize=3,
                        color=KIND_COLOURS[kind], label=f"{kind} task")
    for xi, yi, t in zip(xs, ys, pts.first_task):
        ax.annotate(short(t), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not math.isnan(fit["slope"]):
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(grid, fit["intercept"] + fit["slope"] * grid, "k--", linewidth=1,
                label=f"OLS: R^2 = {fit['r_squared']:.2f}, p = {fit['p_value']:.3g}")
    else:
        ax.text(0.5, 0.92, fit["note"], ha="center", transform=ax.transAxes, fontsize=8, color="gray")
    ax.set_xlabel("first-task spectral radius rho(H)")
    ax.set_ylabel("mean downstream forgetting (%)")
    ax.set_title("Figure 4b: forgetting against first-task curvature")
    if len(pts):
        ax.legend(fontsize=8)
    files = figure_files(fig, db, "figure4b")
    fit_df = pd.DataFrame([{"x": "rho (mean over seeds)", "y": "mean downstream forgetting (%)",
                            "n_tasks": fit["n"], "tasks": ";".join(pts.first_task) or NA,
                            "slope": exact(fit["slope"]), "intercept": exact(fit["intercept"]),
                            "r": exact(fit["r"]), "r_squared": exact(fit["r_squared"]),
                            "p_value": exact(fit["p_value"]), "slope_stderr": exact(fit["slope_stderr"]),
                            "note": fit["note"] or NA}])
    files["curvature_fit.csv"] = csv_text(fit_df)
    return pts, fit, files


def curvature_text(da, pts, fit, not_conv, every_result, missing):
    """The section's text about Figure 4: the rho table, what did not converge or is missing, and the fit."""
    text = ("Spectral radius rho(H) = max(|lambda_max|, |lambda_min|) of the Hessian of the first-task loss at "
            "theta_A (curvature.py, HVPs on its training samples), paired to runs by run_id. The theta_A of a "
            "first task and seed are the first-stage models its Table-1 chains start from (else the first-stage "
            "runs at the main lr). All results: [curvature.csv](curvature.csv); per task "
            "([figure4a.csv](figure4a.csv)):\n\n" + markdown_table(significant(da)))
    if not_conv:
        text += ("\n**Not converged** (rho is the solver's last estimate; hatched bars): "
                 + "; ".join(f"{c.file} ({c.run.task}, seed {c.run.seed}, {c.data.get('iterations', '?')} "
                             f"iterations, stop {c.data.get('stop_reason', '?')})" for c in not_conv) + ".\n")
    else:
        text += "\nEvery curvature result used here converged.\n"
    seen = {id(c) for c in not_conv}
    other_nc = [c for c in every_result if not c.converged and id(c) not in seen]
    if other_nc:
        text += ("\nAlso not converged (not in Figure 4; converged = False in curvature.csv): "
                 + ", ".join(c.file for c in other_nc) + ".\n")
    if missing:
        text += ("\n**Missing curvature** (cells marked missing; listed under missing runs): "
                 + "; ".join(f"{r.name} ({A}, seed {s})" for A, s, r in missing) + ".\n")
    extra = [c for c in every_result if c.run is not None and not c.used and math.isfinite(c.rho)]
    if extra:
        text += ("\nSeveral results for one model: used the converged / lanczos one; not used: "
                 + ", ".join(c.file for c in extra) + ".\n")
    text += ("\n![figure 4a](figure4a.png)\n\n### Figure 4b: mean downstream forgetting against first-task rho\n\n"
             "Per first task: forgetting averaged over its Table-1 chains for each seed, then mean (std) over "
             "seeds; rho mean (std) over seeds ([figure4b.csv](figure4b.csv)).\n\n![figure 4b](figure4b.png)\n\n")
    if math.isnan(fit["slope"]):
        n_tasks = fit["n"]
        text += (f"OLS fit: none. {n_tasks} first task(s) have both curvature and forgetting "
                 f"({', '.join(pts.first_task) or 'none'}); a fit needs at least 3 ({fit['note']}).\n")
    else:
        text += (f"OLS fit over {fit['n']} first tasks (forgetting % = {fit['intercept']:.4g} + {fit['slope']:.4g} "
                 f"* rho): slope {fit['slope']:.4g}, R^2 = {fit['r_squared']:.3f}, p = {fit['p_value']:.3g} "
                 f"([curvature_fit.csv](curvature_fit.csv)). The paper reports p <= 0.01, R^2 = 0.85 "
                 "(6 tasks, Llama-2-7B).\n")
    return text


def curvature_figures(study, curv_by_id, every_result):
    """curvature.csv, Figure 4a/b and the OLS fit -> (report text, files, problems: first-stage models
    without a curvature result)."""
    rows_a, rows_b, missing, not_conv = curvature_tables(study, curv_by_id)
    csv, problems = curvature_csv(study, curv_by_id, every_result, missing)
    files = {"curvature.csv": csv}
    da, more = figure4a(rows_a)
    files.update(more)
    pts, fit, more = figure4b(rows_b)
    files.update(more)
    text = curvature_text(da, pts, fit, not_conv, every_result, missing) + "\n"
    more_text, more = measures_section(study, curv_by_id, rows_b)
    if more:
        rho_fit = pd.read_csv(io.StringIO(files["curvature_fit.csv"]), keep_default_na=False, dtype=str)
        rho_fit["measure"] = "rho"
        files["curvature_fit.csv"] = csv_text(pd.concat([rho_fit, more.pop("fits")], ignore_index=True))
        files.update(more)
    return text + more_text, files, problems


# ------------------------------------------------------------------------- the measures beyond rho
def _mean(xs):
    xs = [number(x) for x in xs or []]
    return float(np.mean(xs)) if xs else float("nan")


# measure -> (the scalar of a curvature.json's measures record that the fit takes, its name in the report)
MEASURE_SCALARS = {
    "rho": (lambda m: number(m.get("rho")), "rho = max abs(lambda)"),
    "trace": (lambda m: number(m.get("trace")), "trace (Hutch++)"),
    "density": (lambda m: number((m.get("moments") or [None, None])[1]),
                "mean squared eigenvalue (SLQ, ||H||_F^2 / n)"),
    "topk": (lambda m: _mean(m.get("largest")), "mean of the top-k eigenvalues"),
    "blocks": (lambda m: max([number(b.get("rho")) for b in m.get("blocks") or []] or [float("nan")]),
               "largest per-block rho"),
}
DENSITY_SIGMA = 0.01  # the density's Gaussian broadening: this share of the nodes' range (all curves alike)


def measure_value(data, name):
    """The fit's scalar of measure `name` in one curvature.json (nan where it was not computed)."""
    if name == "rho":
        return number(data.get("rho"))
    rec = (data.get("measures") or {}).get(name)
    return MEASURE_SCALARS[name][0](rec) if isinstance(rec, dict) else float("nan")


def measure_fits(study, curv_by_id, rows_b):
    """Per measure present: the OLS fit of the first tasks' mean downstream forgetting (Figure 4b's) on the
    measure's scalar (MEASURE_SCALARS), averaged like rho (the models of a task and seed, then the seeds)."""
    models = first_task_models(study, curv_by_id)
    present = [m for m in MEASURE_SCALARS if m != "rho" and any(
        m in (c.data.get("measures") or {}) for c in curv_by_id.values())]
    if not present:
        return []
    forgetting = {r["first_task"]: r["forgetting"] for r in rows_b if r["in_fit"]}
    out = []
    for name in ["rho"] + present:
        xs, ys, tasks = [], [], []
        for A, f in forgetting.items():
            per_seed = []
            for key, rs in models.items():
                v = [measure_value(curv_by_id[r.run_id].data, name) for r in rs if key[0] == A and
                     r.run_id in curv_by_id]
                v = [x for x in v if math.isfinite(x)]  # a model solved without this measure: left out
                if v:
                    per_seed.append(float(np.mean(v)))
            x = float(np.mean(per_seed)) if per_seed else float("nan")
            if math.isfinite(x):
                xs.append(x), ys.append(float(f)), tasks.append(A)
        hvps = [number((c.data.get("measures") or {}).get(name, {}).get("hvp_count")) for c in curv_by_id.values()
                if name in (c.data.get("measures") or {})]
        secs = [number((c.data.get("measures") or {}).get(name, {}).get("seconds")) for c in curv_by_id.values()
                if name in (c.data.get("measures") or {})]
        out.append({"measure": name, "x": MEASURE_SCALARS[name][1], "tasks": tasks,
                    "mean_hvp_count": _mean(hvps), "mean_seconds": _mean(secs), **ols_fit(xs, ys)})
    return out


def density_figure(study, curv_by_id):
    """figure_density: the SLQ density of each first-task minimum (one curve per chain's first stage: the
    theta_A models of Figure 4), the nodes broadened by a Gaussian of DENSITY_SIGMA of their range, on a log
    scale -> files, or {} when no model has one."""
    curves = []
    for (A, seed), rs in sorted(first_task_models(study, curv_by_id).items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        for r in rs:
            c = curv_by_id.get(r.run_id)
            d = ((c.data.get("measures") or {}).get("density") if c else None) or {}
            if d.get("nodes"):
                nodes = np.concatenate([np.asarray(x, float) for x in d["nodes"]])
                weights = np.concatenate([np.asarray(w, float) for w in d["weights"]]) / len(d["nodes"])
                curves.append((A, seed, r.run_id, nodes, weights))
    if not curves:
        return {}
    lo = min(float(c[3].min()) for c in curves)
    hi = max(float(c[3].max()) for c in curves)
    sigma = DENSITY_SIGMA * max(hi - lo, 1e-12)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 400)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = []
    for A, seed, rid, nodes, weights in curves:
        dens = (weights[None, :] * np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)).sum(1) \
            / (sigma * math.sqrt(2 * math.pi))
        ax.plot(grid, np.maximum(dens, 1e-12), linewidth=1, label=f"{short(A)} seed {seed}")
        rows += [{"first_task": A, "seed": seed, "run_id": rid, "eigenvalue": exact(float(x)),
                  "density": exact(float(y)), "sigma": exact(sigma)} for x, y in zip(grid, dens)]
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue of H")
    ax.set_ylabel("spectral density (SLQ)")
    ax.set_title("Hessian spectral density at each first-task minimum")
    ax.legend(fontsize=7)
    return figure_files(fig, pd.DataFrame(rows), "figure_density")


def measures_section(study, curv_by_id, rows_b):
    """The fits of forgetting on each measure present beside rho's (R^2 and p side by side) and the density
    figure -> (text, files with "fits": the rows added to curvature_fit.csv); ("", {}) without measures."""
    fits = measure_fits(study, curv_by_id, rows_b)
    if not fits:
        return "", {}
    tab = pd.DataFrame([{"measure": f["measure"], "x": f["x"], "n_tasks": f["n"], "r_squared": f["r_squared"],
                         "p_value": f["p_value"], "slope": f["slope"], "mean_hvp_count": f["mean_hvp_count"],
                         "mean_seconds": f["mean_seconds"]} for f in fits])
    rows = pd.DataFrame([{"x": f"{f['x']} (mean over seeds)", "y": "mean downstream forgetting (%)",
                          "n_tasks": f["n"], "tasks": ";".join(f["tasks"]) or NA, "slope": exact(f["slope"]),
                          "intercept": exact(f["intercept"]), "r": exact(f["r"]), "r_squared": exact(f["r_squared"]),
                          "p_value": exact(f["p_value"]), "slope_stderr": exact(f["slope_stderr"]),
                          "note": f["note"] or NA, "measure": f["measure"],
                          "mean_hvp_count": exact(f["mean_hvp_count"]), "mean_seconds": exact(f["mean_seconds"])}
                         for f in fits[1:]])
    text = ("### Curvature measures beyond rho\n\nMean downstream forgetting against each measure curvature.py "
            "--measures computed (per first task, averaged like rho), OLS fit of each; R^2 and p side by side, "
            "with each measure's mean HVP count and seconds per solve (rows after rho's in "
            "[curvature_fit.csv](curvature_fit.csv)):\n\n" + markdown_table(significant(tab)))
    files = {"fits": rows}
    dens = density_figure(study, curv_by_id)
    if dens:
        files.update(dens)
        text += ("\n![density](figure_density.png)\n\nThe SLQ spectral density at each first-task minimum (nodes "
                 f"broadened by a Gaussian of {DENSITY_SIGMA:g} of their range; "
                 "[figure_density.csv](figure_density.csv)).\n")
    return text + "\n", files


TAYLOR_COLUMNS = ["first_task", "second_task", "seed", "lr_a", "lr_b", "delta_sq_norm", "loss_A_at_A", "loss_A_at_AB",
                  "actual_loss_change", "quadratic_term", "rho", "bound", "quadratic_le_bound", "actual_le_bound",
                  "bound_source", "first_run_id", "chained_run_id", "file"]


def taylor_figure(df):
    """figure_taylor: actual loss change and quadratic term against the bound 0.5 rho ||delta||^2, log-log where
    every value is positive (symlog otherwise), with the diagonal y = x."""
    d = df[["first_task", "second_task", "seed", "actual_loss_change", "quadratic_term", "bound"]].copy()
    num = {c: pd.to_numeric(d[c], errors="coerce") for c in ("actual_loss_change", "quadratic_term", "bound")}
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    chains = sorted({(a, b) for a, b in zip(d.first_task, d.second_task)})
    cmap = plt.get_cmap("tab10")
    for i, (a, b) in enumerate(chains):
        k = ((d.first_task == a) & (d.second_task == b)).to_numpy()
        x = num["bound"][k] * 10 ** (0.01 * (i - (len(chains) - 1) / 2))  # equal values stay visible side by side
        no_bound = bool(num["bound"][k].isna().all())
        ax.scatter(x, num["actual_loss_change"][k], marker="o", color=cmap(i % 10),
                   label=f"{short(a)} -> {short(b)}" + (" (no bound: not drawn)" if no_bound else ""))
        ax.scatter(x, num["quadratic_term"][k], marker="x", color=cmap(i % 10))
    vals = pd.concat(num.values()).dropna()
    if len(vals):
        lo, hi = float(vals[vals > 0].min()) if (vals > 0).any() else 1e-6, float(vals.abs().max())
        positive = bool((vals > 0).all())
        ax.set_xscale("log" if positive else "symlog", **({} if positive else {"linthresh": lo}))
        ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": lo}))
        grid = np.geomspace(lo, hi, 50)
        ax.plot(grid, grid, "k--", linewidth=1, label="y = bound")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("bound 0.5 rho ||delta||^2")
    ax.set_ylabel("loss change of A (o actual, x quadratic)")
    ax.set_title("Taylor check (equations 3 and 4)")
    return figure_files(fig, d, "figure_taylor")


def taylor_section(rows, any_files):
    """taylor_check.csv and its part of the report -> (text, files)."""
    text = "### Taylor check (equations 3 and 4)\n\n"
    if not any_files:
        return (text + "No taylor.json under the runs folder (curvature.py --reference writes it): no Taylor "
                "check.\n"), {}
    df = pd.DataFrame([{k: exact(v) for k, v in r.items()} for r in rows], columns=TAYLOR_COLUMNS)
    files = {"taylor_check.csv": csv_text(df)}
    text += ("Per chain and seed, at theta_A: actual = L_A(theta_AB) - L_A(theta_A), quadratic = "
             "0.5 delta^T H delta (eq. 3), bound = 0.5 rho(H) ||delta||^2 (eq. 4), delta = theta_AB - theta_A "
             "([taylor_check.csv](taylor_check.csv)).\n\n")
    if not rows:
        return text + "No taylor.json could be paired with a chained run (see the problems above).\n", files
    show = df[["first_task", "second_task", "seed", "lr_b", "delta_sq_norm", "actual_loss_change", "quadratic_term",
               "bound", "quadratic_le_bound", "actual_le_bound"]]
    text += markdown_table(significant(show))
    files.update(taylor_figure(df))
    text += ("\n![Taylor check](figure_taylor.png)\n\nEach point one chain and seed: the actual change of A's loss "
             "(circles) and the quadratic term (crosses) against the bound; below the diagonal, the bound holds "
             "([figure_taylor.csv](figure_taylor.csv)).\n\n")
    q = [r["quadratic_le_bound"] for r in rows if isinstance(r["quadratic_le_bound"], bool)]
    a = [r["actual_le_bound"] for r in rows if isinstance(r["actual_le_bound"], bool)]
    text += (f"\nquadratic <= bound in {sum(q)} of {len(q)}; actual loss change <= bound in {sum(a)} of {len(a)} "
             "(the bound holds for the quadratic term by construction; the actual change also carries the "
             "higher-order terms and theta_A's nonzero gradient).\n")
    rec = [r for r in rows if r["bound_source"].startswith("recomputed")]
    if rec:
        text += (f"\n{len(rec)} bound(s) recomputed from the first-stage curvature.json (taylor.json without a "
                 "solve): " + "; ".join(f"{r['file']}" for r in rec) + ".\n")
    nob = [r for r in rows if r["bound_source"] == MISSING]
    if nob:
        text += "\nNo bound (no rho anywhere): " + "; ".join(r["file"] for r in nob) + ".\n"
    return text, files


# ----------------------------------------------------------------------------------------------------
