"""Curvature-guided task ordering: put the sharpest first-task minima last (the flattest minimum first), and
check the recommendation against the forgetting measured in both orders.

    python order.py --tasks toxigen,bbq,arc,csqa --curvature runs/tiny/curvature
    python order.py --tasks toxigen,arc --curvature runs/tiny --runs runs/tiny --out runs/tiny/results/order.json
    python order.py --tasks toxigen,arc --curvature runs/tiny --runs runs/tiny --lr 1e-3 --lr2 1e-3
    python order.py --tasks toxigen,arc,csqa --curvature runs/tiny --aggregate median

rho of a task: every curvature.json under --curvature for that task (found by content, not folder names),
aggregated over the files; the measured chains (--runs), their pairing with their first stages and the
comparability of two evaluations are chained_tuning/runs.py's rules, the ordering rule
chained_tuning/report/order.py's (report.md's order section uses the same). Stdout in percentage points, --out
JSON in fractions.

Files needed: order.py and the chained_tuning/ folder beside it (numpy, scipy, pandas, matplotlib; no torch).
The manual (the rule, the --out fields): docs/replay.md.
"""
import argparse
import math
import os
import statistics
import sys

from chained_tuning.common import POSITIVE, HelpFormatter, UserError, check_args, die_on_user_error, write_json_atomic
from chained_tuning.data.tasks import parse_tasks
from chained_tuning.report.order import check_pairs, recommend_order
from chained_tuning.runs import CURV_FIX, find_runs, measured_forgetting, number, runs_by_id, walk_json

AGGREGATES = {"mean": statistics.fmean, "median": statistics.median, "max": max, "min": min}


def curvature_by_task(curv_dir, tasks, runs=None, lr=None, aggregate="mean"):
    """-> ({task: {"rho", "n", "values", "files"}}, problems). Tasks without a measurement are absent. `runs`:
    {run_id: Run} (runs.runs_by_id), to check each file's task against its run's and to filter by --lr."""
    if not os.path.isdir(curv_dir):
        raise UserError(f"--curvature {curv_dir} is not a folder; pass the folder holding curvature.json files")
    found, problems = {t: [] for t in tasks}, []
    for path, c in walk_json(curv_dir, "curvature.json", CURV_FIX):
        t, rho = c.get("task"), number(c.get("rho"))
        if t not in found:
            continue
        if not math.isfinite(rho):
            problems.append(f"{path}: no numeric rho ({c.get('rho')!r}); left out")
            continue
        if runs is not None and c.get("run_id") in runs:
            r = runs[c["run_id"]]
            if r.task != t:
                problems.append(f"{path}: curvature of {t} at run {c['run_id']}, which was tuned on {r.task}; "
                                f"left out")
                continue
            if lr is not None and not math.isclose(r.lr, lr, rel_tol=1e-9):
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


def read_runs(runs_dir):
    """{run_id: Run} of every run.json under runs_dir, one copy per run_id (runs.runs_by_id)."""
    return runs_by_id(find_runs(runs_dir, allow_copies=True)[0])


NUMERIC_RULES = {"lr": POSITIVE, "lr2": POSITIVE}


def run(args):
    check_args(vars(args), NUMERIC_RULES)
    if args.lr is not None and not args.runs:
        raise UserError(f"--lr {args.lr:g} picks curvature files by their first-stage run's lr, read from run.json: "
                        f"pass --runs too")
    tasks = parse_tasks(args.tasks)
    if len(set(tasks)) != len(tasks) or len(tasks) < 2:
        raise UserError("--tasks needs two or more different tasks")
    runs = read_runs(args.runs) if args.runs else None
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
        print("check against measured forgetting (forgetting of the first task in percentage points, mean over "
              "runs):")
        if not pairs:
            print("  no pair of the given tasks has curvature for both tasks")
        for p in pairs:
            x, y = p["tasks"]
            fm = lambda k: ("n/a" if p["measured"][k]["forgetting"] is None
                            else f"{100 * p['measured'][k]['forgetting']:+.2f}% (n={p['measured'][k]['n']})")
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
                                            "check it against measured forgetting.", formatter_class=HelpFormatter,
                                epilog="The manual: docs/replay.md")
    p.add_argument("--tasks", required=True, help="comma-separated tasks to order (two or more)")
    p.add_argument("--curvature", required=True, help="folder searched for curvature.json files")
    p.add_argument("--runs", default=None, help="runs folder with measured chains (run.json + eval.json); unset: no "
                                                "check against measured forgetting")
    p.add_argument("--out", default=None, help="write the result JSON here (forgetting as fractions); unset: stdout "
                                               "only")
    p.add_argument("--aggregate", default="mean", choices=list(AGGREGATES),
                   help="how the rho of a task is made from several curvature.json")
    p.add_argument("--lr", type=float, default=None, help="learning rate (> 0): only curvature of first-stage runs "
                                                          "tuned with it (needs --runs); unset: every lr")
    p.add_argument("--lr2", type=float, default=None, help="learning rate (> 0): only measured chains whose second "
                                                           "stage used it; unset: every lr")
    return p


if __name__ == "__main__":
    die_on_user_error(lambda: run(build_parser().parse_args()))
