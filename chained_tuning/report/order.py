"""The curvature-guided task order: the rule (recommend_order: the flattest first-task minimum first, the sharpest
last), its check against the forgetting measured in both orders (check_pairs; order.py prints it), and the
report's order section (order.csv).

Part of chained_tuning/report (metrics.py's report and order.py; docs/replay.md for order.py).
"""
import itertools
import math
import os
import statistics

import pandas as pd

from ..forgetting import NA
from ..runs import measured_forgetting, number, read_json, runs_by_id
from .curvature import curvature_results, curvature_tables
from .format import MISSING, Section, csv_text, exact, markdown_table, rounded, significant

ORDER_COLUMNS = ["task_x", "task_y", "rho_x", "rho_y", "recommended", "forgetting_xy", "n_xy", "forgetting_yx",
                 "n_yx", "less_forgetting", "agrees", "agrees_order_json"]


def recommend_order(rho):
    """Tasks sorted by rho ascending (flattest first, sharpest last); ties keep the given order.
    `rho`: {task: float} or {task: {"rho": float}} (insertion order = given order)."""
    val = {t: (v["rho"] if isinstance(v, dict) else float(v)) for t, v in rho.items()}
    return sorted(val, key=lambda t: val[t])


def check_pairs(tasks, rho, measured):
    """One row per pair of tasks (both with rho): the recommendation and the measured forgetting of both orders
    (measured: runs.measured_forgetting)."""
    rows = []
    for x, y in itertools.combinations(tasks, 2):
        if x not in rho or y not in rho:
            continue
        rec = recommend_order({x: rho[x], y: rho[y]})
        both = {}
        for a, b in ((x, y), (y, x)):
            items = measured.get((a, b), [])
            both[f"{a}->{b}"] = {"forgetting": statistics.fmean(f for f, _ in items) if items else None,
                                 "n": len(items), "run_ids": sorted(r for _, r in items)}
        fxy, fyx = both[f"{x}->{y}"]["forgetting"], both[f"{y}->{x}"]["forgetting"]
        less = None
        if fxy is not None and fyx is not None and fxy != fyx:
            less = f"{x}->{y}" if fxy < fyx else f"{y}->{x}"
        rows.append({"tasks": [x, y], "recommended": rec,
                     "rho": {x: rho[x]["rho"], y: rho[y]["rho"]}, "measured": both, "less_forgetting": less,
                     "agrees": None if less is None else less == f"{rec[0]}->{rec[1]}"})
    return rows


def find_order_json(runs_dir):
    for rel in (os.path.join("results", "order.json"), "order.json"):
        p = os.path.join(runs_dir, rel)
        if os.path.isfile(p):
            return rel, read_json(p, "order.json", "it must be the JSON order.py --out writes; delete it or re-run "
                                                    "order.py")
    return None, None


def order_from_json(oj):
    """rho, the tasks, the recommended order, order.py's verdict per pair and its --lr2, from an order.json."""
    rho = {t: v for t, v in (oj.get("rho") or {}).items()
           if isinstance(v, dict) and not math.isnan(number(v.get("rho")))}
    tasks = [t for t in (oj.get("tasks") or list(rho)) if t in rho]
    order_rec = oj.get("recommended_order") or recommend_order({t: rho[t] for t in tasks})
    theirs = {tuple(p.get("tasks", [])): p.get("agrees") for p in oj.get("pairs") or [] if isinstance(p, dict)}
    lr2 = number((oj.get("settings") or {}).get("lr2"))
    lr2 = None if math.isnan(lr2) else lr2
    return rho, tasks, order_rec, theirs, lr2


def rho_from_curvature(study):
    """{task: {"rho", "n"}} from the curvature results (Figure 4a's rho per task) and the study's tasks with one."""
    curv_by_id, _, _ = curvature_results(study.curvature_files, study.runs)
    rows_a = curvature_tables(study, curv_by_id)[0]
    rho = {r["task"]: {"rho": float(r["rho"]), "n": r["n_seeds"]} for r in rows_a
           if not isinstance(r["rho"], str)}
    tasks = [t for t in list(study.capability) + list(study.safety) if t in rho]
    return rho, tasks


def order_rows(pairs, theirs, rel):
    """order.csv's rows from check_pairs' pairs, beside order.json's verdicts (theirs; None without an
    order.json) -> (rows, problems: the pairs where order.json is out of date)."""
    problems = []
    rows = []
    for p in pairs:
        x, y = p["tasks"]
        m = p["measured"]
        pf = lambda k: rounded(100 * m[k]["forgetting"]) if m[k]["forgetting"] is not None else MISSING
        agr = theirs.get((x, y), theirs.get((y, x), NA)) if theirs is not None else NA
        rows.append({"task_x": x, "task_y": y, "rho_x": exact(p["rho"][x]), "rho_y": exact(p["rho"][y]),
                     "recommended": "->".join(p["recommended"]), "forgetting_xy": pf(f"{x}->{y}"),
                     "n_xy": m[f"{x}->{y}"]["n"], "forgetting_yx": pf(f"{y}->{x}"), "n_yx": m[f"{y}->{x}"]["n"],
                     "less_forgetting": p["less_forgetting"] or NA,
                     "agrees": NA if p["agrees"] is None else bool(p["agrees"]),
                     "agrees_order_json": NA if agr is None else agr})
        if isinstance(agr, bool) and p["agrees"] is not None and agr != p["agrees"]:
            problems.append(f"{rel}: order.py said the recommendation {'agrees' if agr else 'disagrees'} for "
                            f"{x},{y} but the measured chains here say it {'agrees' if p['agrees'] else 'disagrees'}"
                            f"; order.json is out of date, re-run order.py --runs on this folder")
    return rows, problems


def section_order(study, opts):
    """order.csv: per pair of tasks with curvature, the recommended order (the flatter first-task minimum first)
    and whether the measured chains agree (measured_forgetting, order.py's check too, with order.json's --lr2).
    rho and the recommendation come from <runs>/results/order.json (or <runs>/order.json) when it exists, else
    from the curvature results (Figure 4a's rho per task) through recommend_order and check_pairs, order.py's
    rule. An order.json whose verdict on a pair differs from the runs here is out of date: named among the
    problems."""
    head = "## Curvature-guided task order\n\n"
    rel, oj = find_order_json(study.runs_dir)
    if oj is not None:
        rho, tasks, order_rec, theirs, lr2 = order_from_json(oj)
        src = f"{rel} (order.py)"
    else:
        if not study.curvature_files:
            return Section(head + ("No task order: no results/order.json and no curvature results under the runs "
                                   "folder (order.py and curvature.py write them).\n"))
        rho, tasks = rho_from_curvature(study)
        if len(tasks) < 2:
            return Section(head + (f"No task order: {len(tasks)} task(s) with curvature "
                                   f"({', '.join(tasks) or 'none'}); an order needs two.\n"))
        order_rec = recommend_order({t: rho[t] for t in tasks})
        src = "the curvature results (Figure 4a's rho per task), ordered by order.py"
        theirs, lr2 = None, None
    measured, problems = measured_forgetting(runs_by_id(study.all_runs), lr2)
    # a chain refused here is one of the study's refused pairs already, unless it is outside the study
    refused = [p for p in problems if "cannot be compared" in p and p not in study.refused]
    rows, problems = order_rows(check_pairs(tasks, rho, measured), theirs, rel)
    df = pd.DataFrame(rows, columns=ORDER_COLUMNS)
    checked = [r for r in rows if isinstance(r["agrees"], bool)]
    rt = pd.DataFrame([{"task": t, "rho": exact(float(rho[t]["rho"])), "n": rho[t].get("n", NA)} for t in order_rec
                       if t in rho], columns=["task", "rho", "n"])
    text = (head + f"Source: {src}. Recommended order (the flattest first-task minimum first, the sharpest last): "
            f"**{' -> '.join(order_rec)}**.\n\n" + markdown_table(significant(rt))
            + "\nPer pair: the measured forgetting of the first task in both orders (percent, mean over every "
            "measured chain: the plain-recipe two-task runs order.py checks, every seed and learning rate"
            + (f", second-stage lr {lr2:g}" if lr2 is not None else "") + "); agrees = the recommended order is "
            "the one that forgot less; agrees_order_json = order.py's verdict in order.json, the same unless "
            "order.json is out of date ([order.csv](order.csv)).\n\n"
            + markdown_table(significant(df)) + f"\n{sum(r['agrees'] for r in checked)} of {len(checked)} pairs "
            "measured in both orders agree.\n")
    return Section(text, {"order.csv": csv_text(df)}, problems, refused)
