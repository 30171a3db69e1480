"""Curvature-guided task ordering: put the sharpest first-task minima last.

    python order.py --tasks toxigen,bbq,arc,csqa --curvature runs/tiny/curvature
    python order.py --tasks toxigen,arc --curvature runs/tiny --runs runs/tiny --out runs/tiny/order.json

The paper's finding is that a task whose first-stage minimum is sharp (large top Hessian eigenvalue rho)
is forgotten more when another task is tuned after it. So the recommended order sorts the tasks by rho
ascending: the flattest minimum first, the sharpest last (ties: the order given in --tasks).

rho of a task: every curvature.json under --curvature (curvature.py's output: fields "task", "rho",
"run_id"; see curvature.py's docstring) whose "task" is the task and whose rho is a number is a
measurement; the task's rho is their mean (--aggregate median|max|min to change it), and the number of
files and their values are reported. Files are found by their content, never by folder names. With --runs,
a curvature.json whose run_id matches a run.json there is kept only if that run was tuned on the file's task
(a mismatched file is reported and left out); --lr then keeps only files of first-stage runs with that
learning rate.

Check against measured chains (--runs): every run.json there with a two-task chain [X, Y] and an eval.json
holding X is a measured chain; its forgetting is Forgetting_XY = acc_X(theta_X) - acc_X(theta_XY), theta_X the
run whose run_id is its parent_run_id (its eval.json holding X). For each pair of the given tasks measured in
both orders, the mean forgetting of each order (over seeds and learning rates found, or those of --lr2 for the
second stage) says which order forgot less; the recommendation (the flatter task first) agrees when that
order is the one that forgot less. A pair measured in one order only, or with equal forgetting, is reported
with agrees = null. Note the two orders forget different tasks (X's accuracy in one, Y's in the other).

Output: a table on stdout and, with --out, JSON:
  {"tasks": [...], "recommended_order": [...], "rho": {task: {"rho", "n", "values", "files"}},
   "pairs": [{"tasks": [X, Y], "recommended": [flatter, sharper], "rho": {X: .., Y: ..},
              "measured": {"X->Y": {"forgetting": mean|null, "n": int, "run_ids": [..]}, "Y->X": {...}},
              "less_forgetting": "X->Y"|"Y->X"|null, "agrees": bool|null}],
   "agreement": {"checked": int, "agree": int}, "problems": [str], "settings": {...}}
"""
import argparse
import itertools
import json
import math
import os
import statistics
import sys

from common import UserError, die_on_user_error, write_json_atomic
from tasks import parse_tasks

AGGREGATES = {"mean": statistics.fmean, "median": statistics.median, "max": max, "min": min}


def _walk_json(root, fname):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if fname in files:
            path = os.path.join(d, fname)
            try:
                with open(path) as f:
                    yield path, json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{path} is not readable JSON ({e}); re-run the step that writes it or remove it") from None


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def find_runs(runs_dir):
    """{run_id: {"path", "run": run.json, "eval": eval.json or None}} of every run.json under runs_dir."""
    if not os.path.isdir(runs_dir):
        raise UserError(f"--runs {runs_dir} is not a folder; pass the folder run_all.sh wrote")
    runs = {}
    for path, run in _walk_json(runs_dir, "run.json"):
        d = os.path.dirname(path)
        ev = None
        if os.path.isfile(os.path.join(d, "eval.json")):
            with open(os.path.join(d, "eval.json")) as f:
                ev = json.load(f)
        if run.get("run_id"):
            runs[run["run_id"]] = {"path": d, "run": run, "eval": ev}
    return runs


def curvature_by_task(curv_dir, tasks, runs=None, lr=None, aggregate="mean"):
    """-> ({task: {"rho", "n", "values", "files"}}, problems). Tasks without a measurement are absent."""
    if not os.path.isdir(curv_dir):
        raise UserError(f"--curvature {curv_dir} is not a folder; pass the folder holding curvature.json files")
    found, problems = {t: [] for t in tasks}, []
    for path, c in _walk_json(curv_dir, "curvature.json"):
        t, rho = c.get("task"), _num(c.get("rho"))
        if t not in found:
            continue
        if rho is None:
            problems.append(f"{path}: no numeric rho ({c.get('rho')!r}); left out")
            continue
        if runs is not None and c.get("run_id") in runs:
            r = runs[c["run_id"]]["run"]
            if r.get("task") != t:
                problems.append(f"{path}: curvature of {t} at run {c['run_id']}, which was tuned on {r.get('task')}; "
                                f"left out")
                continue
            if lr is not None and not math.isclose(float(r.get("lr", math.nan)), lr, rel_tol=1e-9):
                continue
        elif lr is not None:
            problems.append(f"{path}: its run_id {c.get('run_id')} matches no run.json under --runs, so its learning "
                            f"rate is unknown; left out by --lr")
            continue
        found[t].append((path, rho))
    out = {}
    for t, items in found.items():
        if items:
            vals = [v for _, v in items]
            out[t] = {"rho": float(AGGREGATES[aggregate](vals)), "n": len(vals), "values": vals,
                      "files": [p for p, _ in items]}
    return out, problems


def recommend_order(rho):
    """Tasks sorted by rho ascending (flattest first, sharpest last); ties keep the given order.
    `rho`: {task: float} or {task: {"rho": float}} (insertion order = given order)."""
    val = {t: (v["rho"] if isinstance(v, dict) else float(v)) for t, v in rho.items()}
    return sorted(val, key=lambda t: val[t])


def measured_forgetting(runs, lr2=None):
    """{(X, Y): [(forgetting of X, run_id of theta_XY)]} of every measured two-task chain, and problems."""
    out, problems = {}, []
    for rid, r in runs.items():
        chain = r["run"].get("chain") or []
        if len(chain) != 2 or chain[0] == chain[1]:
            continue
        x, y = chain
        if lr2 is not None and not math.isclose(float(r["run"].get("lr", math.nan)), lr2, rel_tol=1e-9):
            continue
        ev = r["eval"]
        if not ev or x not in ev.get("tasks", {}):
            problems.append(f"{r['path']}: chain {x} -> {y} without an eval.json holding {x}; left out")
            continue
        parent = runs.get(r["run"].get("parent_run_id"))
        if parent is None or not parent["eval"] or x not in parent["eval"].get("tasks", {}):
            problems.append(f"{r['path']}: its first stage (run {r['run'].get('parent_run_id')}) is not under --runs "
                            f"with an eval.json holding {x}; left out")
            continue
        f = float(parent["eval"]["tasks"][x]["acc"]) - float(ev["tasks"][x]["acc"])
        out.setdefault((x, y), []).append((f, rid))
    return out, problems


def check_pairs(tasks, rho, measured):
    """One row per pair of tasks (both with rho): the recommendation and the measured forgetting of both orders."""
    rows = []
    for x, y in itertools.combinations(tasks, 2):
        if x not in rho or y not in rho:
            continue
        rec = recommend_order({x: rho[x], y: rho[y]})
        m = {}
        for a, b in ((x, y), (y, x)):
            items = measured.get((a, b), [])
            m[f"{a}->{b}"] = {"forgetting": statistics.fmean(f for f, _ in items) if items else None,
                              "n": len(items), "run_ids": sorted(r for _, r in items)}
        fxy, fyx = m[f"{x}->{y}"]["forgetting"], m[f"{y}->{x}"]["forgetting"]
        less = None
        if fxy is not None and fyx is not None and fxy != fyx:
            less = f"{x}->{y}" if fxy < fyx else f"{y}->{x}"
        rows.append({"tasks": [x, y], "recommended": rec,
                     "rho": {x: rho[x]["rho"], y: rho[y]["rho"]}, "measured": m, "less_forgetting": less,
                     "agrees": None if less is None else less == f"{rec[0]}->{rec[1]}"})
    return rows


def run(args):
    tasks = parse_tasks(args.tasks)
    if len(set(tasks)) != len(tasks) or len(tasks) < 2:
        raise UserError("--tasks needs two or more different tasks")
    runs = find_runs(args.runs) if args.runs else None
    rho, problems = curvature_by_task(args.curvature, tasks, runs, args.lr, args.aggregate)
    missing = [t for t in tasks if t not in rho]
    if missing:
        raise UserError(f"no usable curvature.json for {', '.join(missing)} under {args.curvature}; run curvature.py "
                        f"on the first-stage model of each task (or drop it from --tasks)")
    order = recommend_order({t: rho[t] for t in tasks})
    pairs = []
    if runs is not None:
        measured, p2 = measured_forgetting(runs, args.lr2)
        problems += p2
        pairs = check_pairs(tasks, rho, measured)
    checked = [p for p in pairs if p["agrees"] is not None]
    result = {"tasks": tasks, "recommended_order": order, "rho": rho, "pairs": pairs,
              "agreement": {"checked": len(checked), "agree": sum(p["agrees"] for p in checked)},
              "problems": problems,
              "settings": {"curvature": os.path.abspath(args.curvature),
                           "runs": os.path.abspath(args.runs) if args.runs else None, "aggregate": args.aggregate,
                           "lr": args.lr, "lr2": args.lr2},
              "rule": "sort by rho ascending: the flattest first-task minimum first, the sharpest last"}
    print("recommended order (flattest minimum first, sharpest last): " + " -> ".join(order))
    for t in order:
        print(f"  {t:15s} rho {rho[t]['rho']:.6g}  ({aggregate_note(args.aggregate, rho[t]['n'])})")
    if runs is not None:
        print("check against measured forgetting (forgetting of the first task, mean over runs):")
        if not pairs:
            print("  no pair of the given tasks has curvature for both tasks")
        for p in pairs:
            x, y = p["tasks"]
            fm = lambda k: ("n/a" if p["measured"][k]["forgetting"] is None
                            else f"{p['measured'][k]['forgetting']:+.4f} (n={p['measured'][k]['n']})")
            verdict = {True: "agrees", False: "disagrees", None: "not checked"}[p["agrees"]]
            print(f"  {x}->{y}: {fm(f'{x}->{y}')}   {y}->{x}: {fm(f'{y}->{x}')}   recommended "
                  f"{p['recommended'][0]}->{p['recommended'][1]}: {verdict}")
        print(f"  {result['agreement']['agree']}/{result['agreement']['checked']} measured pairs agree")
    for p in problems:
        print(f"note: {p}", file=sys.stderr)
    if args.out:
        write_json_atomic(args.out, result)
        print(f"-> {args.out}")
    return result


def aggregate_note(agg, n):
    return f"{agg} of {n} curvature.json" if n > 1 else "1 curvature.json"


def build_parser():
    p = argparse.ArgumentParser(description="Recommend a task order from first-task curvature (sharpest last) and "
                                            "check it against measured forgetting.")
    p.add_argument("--tasks", required=True, help="comma-separated tasks to order")
    p.add_argument("--curvature", required=True, help="folder searched for curvature.json files")
    p.add_argument("--runs", default=None, help="runs folder with measured chains (run.json + eval.json)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--aggregate", default="mean", choices=list(AGGREGATES), help="rho of a task from several files")
    p.add_argument("--lr", type=float, default=None, help="only curvature of first-stage runs with this lr (needs --runs)")
    p.add_argument("--lr2", type=float, default=None, help="only measured chains whose second stage used this lr")
    return p


if __name__ == "__main__":
    die_on_user_error(lambda: run(build_parser().parse_args()))
