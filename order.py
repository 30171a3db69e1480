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

Check against measured chains (--runs): a measured chain is a run.json of the paper's plain recipe tuned on two
different tasks in turn (is_measured_chain: chain [X, Y], no replay mixing, L2, EWC or train_fraction in its
config; metrics.py uses the same definition) with an eval.json holding X; its forgetting is Forgetting_XY =
acc_X(theta_X) - acc_X(theta_XY), theta_X the run whose run_id is its parent_run_id (its eval.json holding X).
Both evaluations of X must be comparable (incomparable: same data source, split, number and ids of examples);
a chain whose are not is left out with a note naming both values. For each pair of the given tasks measured in
both orders, the mean forgetting of each order (over seeds and learning rates found, or those of --lr2 for the
second stage) says which order forgot less; the recommendation (the flatter task first) agrees when that
order is the one that forgot less. A pair measured in one order only, or with equal forgetting, is reported
with agrees = null. Note the two orders forget different tasks (X's accuracy in one, Y's in the other).

Output: a table on stdout (forgetting in percentage points) and, with --out, JSON (forgetting as fractions):
  {"tasks": [...], "recommended_order": [...], "rho": {task: {"rho", "n", "values", "files"}},
   "pairs": [{"tasks": [X, Y], "recommended": [flatter, sharper], "rho": {X: .., Y: ..},
              "measured": {"X->Y": {"forgetting": mean|null, "n": int, "run_ids": [..]}, "Y->X": {...}},
              "less_forgetting": "X->Y"|"Y->X"|null, "agrees": bool|null}],
   "agreement": {"checked": int, "agree": int}, "problems": [str], "settings": {...}}
"""
import argparse
import collections
import hashlib
import itertools
import json
import math
import os
import statistics
import sys

from common import POSITIVE, HelpFormatter, UserError, check_args, die_on_user_error, write_json_atomic
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


MITIGATION_OPTIONS = ("replay_fraction", "l2_to_init", "ewc")


def mitigation_of(meta):
    """The options beyond the paper's recipe a run.json's config turns on: {option: value} for replay_fraction,
    l2_to_init, ewc (> 0) and train_fraction (set); {} for a run of the plain recipe."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    on = {}
    for k in MITIGATION_OPTIONS:
        v = cfg.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            on[k] = float(v)
    if cfg.get("train_fraction") is not None:
        on["train_fraction"] = cfg["train_fraction"]
    return on


def is_measured_chain(meta):
    """The one definition of "a measured chain" (order.py's check, metrics.py's Table 1 and its order section):
    a run.json of the paper's plain recipe tuned on two different tasks in turn, chain [X, Y] with X != Y and no
    mitigation option (mitigation_of). Mitigated second stages forget differently by design, and replay points
    (stage 3) and longer chains are not two-task chains."""
    chain = meta.get("chain")
    return (isinstance(chain, list) and len(chain) == 2 and chain[0] != chain[1] and meta.get("stage", 2) == 2
            and not mitigation_of(meta))


def find_runs(runs_dir):
    """{run_id: {"path", "name", "run": run.json, "eval": eval.json or None}} of every run.json under runs_dir.
    Copies of one run (a long chain stores its first stages again) resolve as in metrics.py: the copy
    evaluated on the fewest tasks (the study's own, not the long chain's), with eval_val.json, then by path."""
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
            new = {"path": d, "name": os.path.relpath(d, runs_dir), "run": run, "eval": ev}
            old = runs.get(run["run_id"])
            if old is None or _copy_key(new) < _copy_key(old):
                runs[run["run_id"]] = new
    return runs


def _copy_key(r):
    return (len((r["eval"] or {}).get("tasks", {})), not os.path.isfile(os.path.join(r["path"], "eval_val.json")),
            r["name"])


# ----------------------------------------------------------------------------------------------------
# comparable evaluations: the one rule for every forgetting and paired statistic (metrics.py uses it too)

Evaluation = collections.namedtuple("Evaluation", "name folder eval")  # how messages call it, its folder, eval.json
COMPARED = ("source", "split", "n")   # fields of an eval.json task block that must agree


def samples_file(folder, ev):
    """The samples JSONL an eval.json names (beside it)."""
    return os.path.join(folder, (ev or {}).get("samples") or "eval_samples.jsonl")


def read_samples(folder, ev):
    """The per-example records of the eval.json in `folder` (its samples JSONL) reduced to id, task, group,
    correct, pred and n_options (the number of options scored), or None when the file is missing."""
    path = samples_file(folder, ev)
    if not os.path.isfile(path):
        return None
    recs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                assert isinstance(r, dict) and "id" in r and "correct" in r
            except (json.JSONDecodeError, AssertionError):
                raise UserError(f"{path}:{i}: not a samples record (want one JSON object per line with "
                                f'"id" and "correct"); delete it and re-run evaluate.py') from None
            rec = {k: r.get(k) for k in ("id", "task", "group", "correct", "pred") if k in r}
            if isinstance(r.get("options"), list):
                rec["n_options"] = len(r["options"])
            recs.append(rec)
    return recs


_DIGESTS = {}


def example_digests(folder, ev):
    """{task: (number of examples, sha256 of their sorted ids)} of a samples file, None without one. Kept per
    file (path, size, mtime): a first-stage model's file is compared with every chain that starts from it."""
    path = samples_file(folder, ev)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        ids = collections.defaultdict(list)
        for r in read_samples(folder, ev):
            ids[r.get("task")].append(str(r["id"]))
        _DIGESTS[key] = {t: (len(v), hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest())
                         for t, v in ids.items()}
    return _DIGESTS[key]


def _ids(e, task):
    return {str(r["id"]) for r in read_samples(e.folder, e.eval) if r.get("task") == task}


def incomparable(task, first, chained):
    """Why two evaluations of `task` (Evaluation tuples, e.g. theta_A's and theta_AB's) cannot be paired, or
    None when they can: the task blocks' data source, split and number of examples must agree, then the ids
    of the examples in both samples files (when one is missing: the subset settings of eval.json's config,
    limit and the seed that draws it). The reason names both evaluations, each differing field and both
    values."""
    ta, tb = ((e.eval or {}).get("tasks", {}).get(task) for e in (first, chained))
    if ta is None or tb is None:
        return f"{task}: {(first if ta is None else chained).name} has no evaluation of {task}"
    diffs = [f"{k} {ta.get(k)!r} vs {tb.get(k)!r}" for k in COMPARED if ta.get(k) != tb.get(k)]
    if not diffs:
        da, db = example_digests(first.folder, first.eval), example_digests(chained.folder, chained.eval)
        if da and db and task in da and task in db:
            if da[task] != db[task]:
                a, b = _ids(first, task), _ids(chained, task)
                diffs.append(f"example ids differ ({len(a & b)} shared, {len(a - b)} only in the first, "
                             f"{len(b - a)} only in the second)")
        else:
            ca, cb = ((e.eval or {}).get("config") or {} for e in (first, chained))
            keys = ("limit", "seed") if ca.get("limit") is not None or cb.get("limit") is not None else ("limit",)
            diffs += [f"config {k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in keys if ca.get(k) != cb.get(k)]
    if not diffs:
        return None
    return (f"{task}: {first.name} vs {chained.name}: {'; '.join(diffs)} (forgetting needs the same data source, "
            f"split and examples on both sides; evaluate both with the same --data_dir, --split, --limit, --seed)")


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
    """{(X, Y): [(forgetting of X, run_id of theta_XY)]} of every measured chain (is_measured_chain), and
    problems (chains left out: no evaluation, or evaluations that cannot be compared)."""
    out, problems = {}, []
    for rid, r in sorted(runs.items(), key=lambda kv: kv[1]["path"]):
        if not is_measured_chain(r["run"]):
            continue
        x, y = r["run"]["chain"]
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
        why = incomparable(x, Evaluation(parent.get("name", parent["path"]), parent["path"], parent["eval"]),
                           Evaluation(r.get("name", r["path"]), r["path"], ev))
        if why:
            problems.append(f"chain {x} -> {y} left out, its evaluations cannot be compared: {why}")
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


NUMERIC_RULES = {"lr": POSITIVE, "lr2": POSITIVE}


def run(args):
    check_args(vars(args), NUMERIC_RULES)
    if args.lr is not None and not args.runs:
        raise UserError(f"--lr {args.lr:g} picks curvature files by their first-stage run's lr, read from run.json: "
                        f"pass --runs too")
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
                                            "check it against measured forgetting.", formatter_class=HelpFormatter)
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
