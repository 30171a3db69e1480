"""Reading a runs folder: which files are runs, which runs pair into chains, which evaluations compare, and
the one rule that picks a chain's first stage (choose_first_stage, used by the study and by Table 1).

    from chained_tuning.runs import find_runs, runs_by_id, measured_forgetting, choose_first_stage
    runs, problems = find_runs("runs/tiny", allow_copies=True)
    measured, problems = measured_forgetting(runs_by_id(runs))   # {(A, B): [(forgetting of A, run_id)]}
    choose_first_stage({1e-5: 0.61, 2e-5: 0.61}, 1e-5)            # 1e-5: a tie goes to the main lr

Every rule here is shared: metrics.py's report and order.py's check read runs through it. The runs layout
and each file's fields: docs/metrics.md.
"""
import collections
import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

from .common import UserError
from .forgetting import (TIE_TOL, biased_forgetting, biased_forgetting_vector, forgetting, group_acc,
                         group_forgetting, relative_forgetting, worst_group_forgetting)

RUN_FIX = "it must be the run.json written by finetune.py (docs/study.md: the runs folder); re-run that stage"
EVAL_FIX = "it must be the eval.json written by evaluate.py; delete it and re-run evaluate.py for that run"
REPLAY_FIX = "it must be the replay_summary.json written by replay.py; delete it and re-run replay.py"
CURV_FIX = "it must be the curvature.json written by curvature.py; delete it and re-run curvature.py"
TAYLOR_FIX = "it must be the taylor.json written by curvature.py --reference; delete it and re-run curvature.py"


def read_json(path, what, fix):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} must be a JSON object; {fix}")
    return obj


def number(v):
    """A JSON number as float; None, booleans, strings and missing values are nan."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def walk_folders(top, exclude=None):
    """(folder, its file names) for every folder under top, in sorted order; hidden folders and `exclude`
    (metrics.py's own --out) are skipped."""
    exclude = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != exclude)
        yield root, files


def walk_json(top, fname, fix, exclude=None):
    """(path, parsed JSON object) of every file called fname under top (walk_folders' order)."""
    for root, files in walk_folders(top, exclude):
        if fname in files:
            path = os.path.join(root, fname)
            yield path, read_json(path, fname, fix)


def find_json_files(runs_dir, fname, fix, exclude=None):
    """Every file called fname under runs_dir -> [(path relative to runs_dir, parsed JSON object)], by path.
    Folder names are not parsed: files pair with runs by their run_id fields."""
    return [(os.path.relpath(path, runs_dir), obj) for path, obj in walk_json(runs_dir, fname, fix, exclude)]


@dataclass
class Run:
    path: str                  # the folder holding run.json
    name: str                  # that folder relative to --runs (how problems name the run)
    meta: dict                 # run.json
    eval: dict = None          # eval.json, None when missing
    val: dict = None           # eval_val.json (stage 1), None when missing
    problem: str = None        # why the run can't be used (failed, no eval.json)

    run_id = property(lambda self: self.meta.get("run_id"))
    stage = property(lambda self: self.meta.get("stage"))
    task = property(lambda self: self.meta.get("task"))
    chain = property(lambda self: self.meta.get("chain"))
    lr = property(lambda self: float(self.meta.get("lr")))
    seed = property(lambda self: self.meta.get("seed"))
    parent_run_id = property(lambda self: self.meta.get("parent_run_id"))

    def acc(self, task, which="eval"):
        evaluated = self.eval if which == "eval" else self.val
        block = (evaluated or {}).get("tasks", {}).get(task)
        return float(block["acc"]) if block else float("nan")


def _check_run_json(path, meta):
    def bad(msg):
        raise UserError(f"{path}: {msg}; {RUN_FIX}")
    if not isinstance(meta.get("run_id"), str) or not meta["run_id"]:
        bad('"run_id" must be a non-empty string')
    for key, typ in (("stage", int), ("task", str), ("chain", list), ("seed", int)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            bad(f'"{key}" must be a {typ.__name__}, got {meta.get(key)!r}')
    if not isinstance(meta.get("lr"), (int, float)) or isinstance(meta.get("lr"), bool):
        bad(f'"lr" must be a number, got {meta.get("lr")!r}')
    if len(meta["chain"]) != meta["stage"] or not meta["chain"] or meta["chain"][-1] != meta["task"]:
        bad(f'"chain" {meta["chain"]} must have "stage" ({meta["stage"]}) tasks and end with "task" ({meta["task"]})')
    if meta["stage"] >= 2 and not isinstance(meta.get("parent_run_id"), str):
        bad(f'a stage-{meta["stage"]} run needs "parent_run_id" (the run_id of the run it started from)')


def check_eval_json(path, ev):
    tasks = ev.get("tasks")
    if not isinstance(tasks, dict):
        raise UserError(f'{path}: no "tasks" object; {EVAL_FIX}')
    for t, block in tasks.items():
        if not isinstance(block, dict) or not isinstance(block.get("acc"), (int, float)):
            raise UserError(f'{path}: task "{t}" has no numeric "acc"; {EVAL_FIX}')
        g = block.get("groups", {})
        if not isinstance(g, dict) or any(not isinstance(v, dict) or not isinstance(v.get("acc"), (int, float))
                                          for v in g.values()):
            raise UserError(f'{path}: task "{t}" has malformed "groups" (want {{group: {{"acc", "n"}}}}); {EVAL_FIX}')


def _same_run(a, b):
    """Two run.json files with one run_id describe the same run (a copy, e.g. the first stages of a long chain
    re-made with the same settings) when chain, stage, lr, seed, steps and parent agree."""
    keys = ("chain", "stage", "lr", "seed", "steps", "parent_run_id")
    return all(a.meta.get(k) == b.meta.get(k) for k in keys)


def duplicate_error(a, b):
    raise UserError(f"run_id {a.run_id} appears in {a.path}/run.json and {b.path}/run.json; remove the stale copy")


def find_runs(runs_dir, exclude=None, allow_copies=False):
    """Every folder under runs_dir with a run.json -> (runs sorted by name, problems).

    Reads eval.json (and eval_val.json) beside each run.json. Malformed files raise UserError;
    a failed run or one without eval.json is kept with .problem set; a checkpoint folder without a
    run.json becomes a problem line. Two run.json with one run_id are an error, unless allow_copies and
    they describe the same run (_same_run): copy_preference then says which copy stands for the run."""
    if not os.path.isdir(runs_dir):
        raise UserError(f"runs folder {runs_dir} does not exist; pass --runs the folder run_all.sh wrote "
                        f"(the one holding stage1/ and stage2/)")
    runs, problems = [], []
    for root, files in walk_folders(runs_dir, exclude):
        name = os.path.relpath(root, runs_dir)
        if "run.json" not in files:
            if {"model.safetensors", "train_log.jsonl"} & set(files):
                problems.append(f"{name}: a checkpoint without run.json (an unfinished run?); re-run that stage")
            continue
        path = os.path.join(root, "run.json")
        meta = read_json(path, "run.json", RUN_FIX)
        _check_run_json(path, meta)
        run = Run(path=root, name=name, meta=meta)
        for fname, attr in (("eval.json", "eval"), ("eval_val.json", "val")):
            p = os.path.join(root, fname)
            if os.path.isfile(p):
                ev = read_json(p, fname, EVAL_FIX)
                check_eval_json(p, ev)
                setattr(run, attr, ev)
        if run.eval is None and run.problem is None:
            run.problem = "no eval.json (not evaluated yet); run evaluate.py on it"
        runs.append(run)
    if not runs:
        raise UserError(f"no run.json found under {runs_dir}; run run_all.sh (or finetune.py) first, or pass "
                        f"--runs the folder that holds stage1/ and stage2/")
    seen = {}
    for r in runs:
        if r.run_id in seen and not (allow_copies and _same_run(seen[r.run_id], r)):
            duplicate_error(seen[r.run_id], r)
        seen.setdefault(r.run_id, r)
    for r in runs:
        if r.problem:
            problems.append(f"{r.name}: {r.problem}")
    return runs, problems


def copy_preference(run):
    """Among copies of one run: the one evaluated on the fewest tasks (the two-stage study's own copy, not a
    long chain's, whose eval.json holds every task of its chain), with eval_val.json, then by name."""
    return (len((run.eval or {}).get("tasks", {})), run.val is None, run.name)


def runs_by_id(runs):
    """{run_id: Run}, one copy per run_id (copy_preference)."""
    by_id = {}
    for r in sorted(runs, key=copy_preference):
        by_id.setdefault(r.run_id, r)
    return by_id


# comparable evaluations: the one rule for every forgetting and paired statistic

Evaluation = collections.namedtuple("Evaluation", "name folder eval")  # how messages call it, its folder, eval.json
COMPARED = ("source", "split", "n")   # fields of an eval.json task block that must agree


def evaluation(run):
    """A run's eval.json as incomparable takes it."""
    return Evaluation(run.name, run.path, run.eval)


def samples_file(folder, ev):
    """The samples JSONL an eval.json names (beside it)."""
    return os.path.join(folder, (ev or {}).get("samples") or "eval_samples.jsonl")


def read_samples(folder, ev):
    """The per-example records of the eval.json in `folder` (its samples JSONL) reduced to id, task, group,
    correct, pred and n_options (the number of options scored), or None when the file is missing."""
    path = samples_file(folder, ev)
    if not os.path.isfile(path):
        return None
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                assert isinstance(row, dict) and "id" in row and "correct" in row
            except (json.JSONDecodeError, AssertionError):
                raise UserError(f"{path}:{i}: not a samples record (want one JSON object per line with "
                                f'"id" and "correct"); delete it and re-run evaluate.py') from None
            record = {k: row.get(k) for k in ("id", "task", "group", "correct", "pred") if k in row}
            if isinstance(row.get("options"), list):
                record["n_options"] = len(row["options"])
            records.append(record)
    return records


def load_samples(run):
    """A run's samples records (read_samples), or None when the file is missing."""
    return read_samples(run.path, run.eval)


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
        ids = defaultdict(list)
        for r in read_samples(folder, ev):
            ids[r.get("task")].append(str(r["id"]))
        _DIGESTS[key] = {t: (len(v), hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest())
                         for t, v in ids.items()}
    return _DIGESTS[key]


def _example_ids(e, task):
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
                a, b = _example_ids(first, task), _example_ids(chained, task)
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


def refusal(A, B, why):
    """The line report.md and stdout give a refused pair (the same words order.py prints)."""
    return f"chain {A} -> {B} left out, its evaluations cannot be compared: {why}"


# which runs are the measured chains

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
    """The one definition of "a measured chain" (Table 1, the order section, order.py): a run.json of the
    paper's plain recipe tuned on two different tasks in turn, chain [X, Y] with X != Y and no mitigation
    option (mitigation_of). Mitigated second stages forget differently by design, and replay points (stage 3)
    and longer chains are not two-task chains."""
    chain = meta.get("chain")
    return (isinstance(chain, list) and len(chain) == 2 and chain[0] != chain[1] and meta.get("stage", 2) == 2
            and not mitigation_of(meta))


def stage_of(run):
    return run.stage if isinstance(run.stage, int) and not isinstance(run.stage, bool) else None


def is_replay_point(run, replay_ids):
    """A third stage made by replay.py: its run_id is a point of a replay_summary.json, or a point.json lies
    beside its run.json."""
    return run.run_id in replay_ids or os.path.isfile(os.path.join(run.path, "point.json"))


# a chain and its first stage

def first_stage_problem(first, chained, task):
    """The pairing rule of a chained run theta_AB with its first stage theta_A (`first`: the run whose run_id is
    theta_AB's parent_run_id, None when there is none) for the forgetting of `task` (A): what stops the pair,
    checked in this order, or None:
        "chained unusable"    theta_AB failed or has no eval.json
        "no first stage"      no run.json has its parent_run_id
        "first unusable"      theta_A failed or has no eval.json
        "not a first stage"   theta_A is not a stage-1 run tuned on A
        "first lacks task"    theta_A's eval.json has no result for A
        "chained lacks task"  theta_AB's eval.json has no result for A
    A pair that passes still needs comparable evaluations (incomparable)."""
    if chained.problem:
        return "chained unusable"
    if first is None:
        return "no first stage"
    if first.problem:
        return "first unusable"
    if first.stage != 1 or first.task != task:
        return "not a first stage"
    if task not in first.eval["tasks"]:
        return "first lacks task"
    if task not in chained.eval["tasks"]:
        return "chained lacks task"
    return None


@dataclass
class Pair:
    """theta_A (first) and theta_AB (chained) for one seed, with their per-seed values (fractions)."""
    first: Run
    chained: Run
    A: str
    B: str
    lr_a: float
    lr_b: float
    seed: int
    stats: dict = field(default_factory=dict)  # pair_metrics
    refused: str = None        # why theta_A's and theta_AB's evaluations of A cannot be compared (stats is empty)


def pair_metrics(first_eval, chained_eval, task_a, task_b):
    """All per-seed metrics of one chain A->B from theta_A's and theta_AB's eval.json (fractions)."""
    ta, ca = first_eval["tasks"][task_a], chained_eval["tasks"][task_a]
    cb = chained_eval["tasks"].get(task_b)
    f = forgetting(ta["acc"], ca["acc"])
    gf = group_forgetting(ta.get("groups") or {}, ca.get("groups") or {})
    wg, wg_v = worst_group_forgetting(gf)  # wg: every group tied at the max
    return {"acc_first": float(ta["acc"]), "acc_chained_a": float(ca["acc"]),
            "acc_chained_b": float(cb["acc"]) if cb else float("nan"),
            "forgetting": f, "relative_forgetting": relative_forgetting(ta["acc"], ca["acc"]),
            "group_forgetting": gf, "wg_forgetting": wg_v, "worst_groups": wg,
            "group_acc_first": {g: group_acc(v) for g, v in (ta.get("groups") or {}).items()},
            "group_acc_chained": {g: group_acc(v) for g, v in (ca.get("groups") or {}).items()},
            "group_n": {g: v.get("n") for g, v in (ta.get("groups") or {}).items()},
            "biased": biased_forgetting_vector(gf, f), "biased_max": biased_forgetting(gf, f, 1)}


def pair_runs(runs, parents=None):
    """Stage-2 runs joined to their stage-1 parent by parent_run_id (first_stage_problem) -> (pairs, problems).
    `parents` ({run_id: Run}, default: `runs` by run_id) is where parents are looked up. A pair whose two
    evaluations of A cannot be compared (incomparable) is returned with .refused set and no stats."""
    by_id = parents if parents is not None else {r.run_id: r for r in runs}
    pairs, problems = [], []
    for r in runs:
        if r.problem or r.stage != 2:  # an unusable theta_AB is one of find_runs' problems already
            continue
        A, B = r.chain
        p = by_id.get(r.parent_run_id)
        why = first_stage_problem(p, r, A)
        if why == "no first stage":
            problems.append(f"{r.name}: its first-stage run (parent_run_id {r.parent_run_id}) has no run.json "
                            f"under the runs folder; re-run stage 1 for {A}")
        elif why == "first unusable":
            problems.append(f"{r.name}: its first-stage run {p.name} is unusable ({p.problem})")
        elif why == "not a first stage":
            problems.append(f"{r.name}: its parent {p.name} is a stage-{p.stage} run on {p.task}, not stage 1 on {A}")
        elif why in ("first lacks task", "chained lacks task"):
            which = p if why == "first lacks task" else r
            problems.append(f"{which.name}/eval.json has no result for {A}; re-run evaluate.py --tasks {A},{B}")
        elif why is None:
            if B not in r.eval["tasks"]:
                problems.append(f"{r.name}/eval.json has no result for {B}; re-run evaluate.py --tasks {A},{B}")
            pair = Pair(p, r, A, B, p.lr, r.lr, r.seed)
            refused = incomparable(A, evaluation(p), evaluation(r))
            if refused:
                pair.refused = refusal(A, B, refused)
            else:
                pair.stats = pair_metrics(p.eval, r.eval, A, B)
            pairs.append(pair)
    return pairs, problems


def measured_forgetting(runs, lr2=None):
    """{(X, Y): [(forgetting of X, run_id of theta_XY)]} of every measured chain (is_measured_chain) in `runs`
    ({run_id: Run}, runs_by_id), with second-stage lr lr2 when given, and problems (chains left out: no
    evaluation, or evaluations that cannot be compared). What order.py checks and report.md's order section."""
    out, problems = {}, []
    for rid, r in sorted(runs.items(), key=lambda kv: kv[1].path):
        if not is_measured_chain(r.meta):
            continue
        x, y = r.chain
        if lr2 is not None and not math.isclose(float(r.meta.get("lr", math.nan)), lr2, rel_tol=1e-9):
            continue
        parent = runs.get(r.parent_run_id)
        why = first_stage_problem(parent, r, x)
        if why in ("chained unusable", "chained lacks task"):
            problems.append(f"{r.path}: chain {x} -> {y} without an eval.json holding {x}; left out")
            continue
        if why:
            problems.append(f"{r.path}: its first stage (run {r.parent_run_id}) is not under --runs "
                            f"with an eval.json holding {x}; left out")
            continue
        refused = incomparable(x, evaluation(parent), evaluation(r))
        if refused:
            problems.append(refusal(x, y, refused))
            continue
        out.setdefault((x, y), []).append((forgetting(parent.acc(x), r.acc(x)), rid))
    return out, problems


# the runs beyond the two-stage study: a run's parent among several copies, chains longer than two

def shared_depth(a, b):
    return len(os.path.commonpath([os.path.abspath(a), os.path.abspath(b)]).split(os.sep))


def resolve_parent(run, copies):
    """The run.json `run` was tuned from: the copy with its parent_run_id nearest in the folder tree (most
    leading folders in common with `run`'s), then copy_preference; None when no run.json has that run_id."""
    candidates = copies.get(run.parent_run_id) or []
    return min(candidates, key=lambda c: (-shared_depth(c.path, run.path), copy_preference(c))) if candidates else None


@dataclass
class LongChain:
    """A chain of three or more stages: stages[k] is the Run of stage k + 1 (None where it was not found)."""
    end: Run
    stages: list
    problems: list

    chain = property(lambda self: list(self.end.chain))
    seed = property(lambda self: self.end.seed)

    def own(self):
        """The stages stored inside the folder that holds the last stage (the long chain's own copies)."""
        root = os.path.abspath(os.path.dirname(self.end.path)) + os.sep
        return [r for r in self.stages if r is not None and os.path.abspath(r.path).startswith(root)]


def long_chain_lineages(runs, replay_ids, copies):
    """Chains longer than two: every run.json of stage >= 3 of the plain recipe (no mitigation option, not a
    replay point) that is not a stage of a longer such chain, with its stages found by following
    parent_run_id back to stage 1 (resolve_parent: the nearest copy). A stage whose parent is missing, or
    whose parent's chain is not its chain minus the last task, ends the walk with a problem."""
    ends = [r for r in runs if (stage_of(r) or 0) >= 3 and not mitigation_of(r.meta)
            and not is_replay_point(r, replay_ids) and isinstance(r.chain, list) and len(r.chain) == r.stage]
    lineages = []
    for end in ends:
        stages, problems, cur = [None] * end.stage, [], end
        stages[-1] = end
        while stage_of(cur) and cur.stage > 1:
            p = resolve_parent(cur, copies)
            if p is None:
                problems.append(f"{cur.name}: its stage-{cur.stage - 1} run (parent_run_id {cur.parent_run_id}) has "
                                f"no run.json under the runs folder; stages before {cur.stage} are missing")
                break
            if stage_of(p) != cur.stage - 1 or p.chain != cur.chain[:-1]:
                problems.append(f"{cur.name}: its parent {p.name} has chain {p.chain}, not {cur.chain[:-1]}; "
                                f"stages before {cur.stage} are left out")
                break
            stages[p.stage - 1] = p
            cur = p
        lineages.append(LongChain(end, stages, problems))
    inner = {id(r) for lc in lineages for r in lc.stages[:-1] if r is not None}
    return [lc for lc in lineages if id(lc.end) not in inner]


def lr_distance(lr, main):
    return abs(math.log(lr / main)) if lr > 0 and main and main > 0 else float("inf")


def choose_first_stage(val_accs, main_lr):
    """The first-stage learning rate a chain starts from (section 3.1: "the best model for the first task").

    val_accs: {lr: validation accuracy, or None when missing}. The highest accuracy wins; accuracies within
    TIE_TOL of it are tied, and a tie goes to the lr nearest main_lr on a log scale, |log(lr / main_lr)| (5e-6 and
    2e-5 are equally far from 1e-5), then to the smaller lr (main_lr None: straight to the smaller lr). An lr
    without an accuracy never wins; None when no lr has one. Pure and torch-free: the study driver and metrics.py's
    Table 1 both use it, so a chain starts from the model its table row says."""
    measured = {}
    for lr, acc in val_accs.items():
        if acc is not None and math.isfinite(float(acc)):
            measured[float(lr)] = float(acc)
    if not measured:
        return None
    best = max(measured.values())
    tied = [lr for lr, acc in measured.items() if acc >= best - TIE_TOL]
    dist = {lr: lr_distance(lr, main_lr) for lr in tied}
    nearest = min(dist.values())
    return min(lr for lr in tied if dist[lr] <= nearest + TIE_TOL)

