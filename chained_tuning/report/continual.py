"""The continual-learning metrics of a chain of T >= 2 tasks (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory";
as Avalanche and TRACE report them): the accuracy matrix R[i][j], the accuracy on the task tuned at stage j after
stage i (i, j = 1..T), and from it

    ACC = (1/T) sum_j R[T][j]                              average accuracy after the last stage
    BWT = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j])            backward transfer (negative: forgetting)
    FWT = 1/(T-1) sum_{j>=2} (R[j-1][j] - b_j)             forward transfer, b_j: the base model's accuracy on j

overall, and per group on the groups' accuracies (a group's averages run over the tasks that have it).

accuracy_matrix and continual_metrics are pure (plain numbers in, plain numbers out); chain_matrix builds their
inputs from a long chain's run.json / eval.json (plus the other evaluations of its stages' checkpoints, paired by
the run_id eval.json records) and the base model's evaluation, and refuses (Refused, naming
the files) a matrix whose evaluations do not belong together: a stage missing, a stage not tuned from the one
before it, an eval.json of another checkpoint, a task without a result, or two evaluations of a task on other
examples. No silent wrong result: a refused matrix gives no number.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
from dataclasses import dataclass, field

from ..runs import evaluation, incomparable

NO_BASE = "not available (no base evaluation)"


class Refused(ValueError):
    """A matrix built from evaluations that do not belong together; the message names them and the fix."""


@dataclass(frozen=True)
class StageEval:
    """One stage of a chain as the matrix needs it."""
    name: str                     # the run's folder relative to --runs (how refusals name it)
    run_id: str
    parent_run_id: str            # None for stage 1
    task: str                     # the task tuned at this stage
    acc: dict                     # {task: accuracy (fraction)} of this stage's eval.json
    groups: dict = field(default_factory=dict)   # {task: {group: accuracy}}
    evaluated_run_id: str = None  # the run_id eval.json says it scored (None: not recorded, e.g. older files)


def accuracy_matrix(stages):
    """stages: [StageEval], stage 1 first -> (tasks, R, G): tasks[j] the task tuned at stage j + 1, R[i][j] the
    accuracy on tasks[j] after stage i + 1, G {group: matrix like R with None where tasks[j] lacks the group}
    (a group counts for a task when every stage's evaluation of the task has it). Refused, naming the stage: a
    stage missing (None), a task tuned twice (GEM's matrix has one column per task), a stage whose parent is not
    the stage before it, an eval.json of another checkpoint, a task of the chain without a result."""
    if len(stages) < 2:
        raise Refused(f"a chain of {len(stages)} stage(s): the matrix needs at least 2")
    for k, st in enumerate(stages, 1):
        if st is None:
            raise Refused(f"stage {k} has no run.json under the runs folder (its lineage is broken)")
    tasks = [st.task for st in stages]
    if len(set(tasks)) < len(tasks):
        raise Refused(f"chain {'->'.join(tasks)} tunes a task twice; ACC, BWT and FWT (Lopez-Paz & Ranzato 2017) "
                      "need each task once (its forgetting is in chain_forgetting.csv)")
    for k, st in enumerate(stages, 1):
        if k > 1 and st.parent_run_id != stages[k - 2].run_id:
            raise Refused(f"{st.name}: stage {k} was tuned from run {st.parent_run_id}, not from stage {k - 1} "
                          f"({stages[k - 2].name}, run {stages[k - 2].run_id}); these evaluations are not one chain")
        if st.evaluated_run_id is not None and st.evaluated_run_id != st.run_id:
            raise Refused(f"{st.name}/eval.json scored checkpoint {st.evaluated_run_id}, not this stage's run "
                          f"{st.run_id}; re-run evaluate.py --model {st.name}")
        lacking = [t for t in tasks if not isinstance(st.acc.get(t), (int, float))]
        if lacking:
            raise Refused(f"{st.name}/eval.json has no result for {', '.join(lacking)}; re-run evaluate.py with every "
                          f"task of the chain (--tasks {','.join(tasks)})")
    R = [[float(st.acc[t]) for t in tasks] for st in stages]
    names = sorted({g for st in stages for t in tasks for g in (st.groups.get(t) or {})})
    G = {}
    for g in names:
        m = [[(st.groups.get(t) or {}).get(g) for t in tasks] for st in stages]
        covered = [all(isinstance(row[j], (int, float)) for row in m) for j in range(len(tasks))]
        if any(covered):
            G[g] = [[float(v) if covered[j] else None for j, v in enumerate(row)] for row in m]
    return tasks, R, G


def _mean(terms):
    terms = [x for x in terms if x is not None]
    return (sum(terms) / len(terms) if terms else float("nan")), len(terms)


def continual_metrics(R, base=None):
    """R: T x T accuracies (None: a task the scope does not cover, left out of every average), base: the base
    model's accuracy per task (None: no base evaluation, or an entry None: that task's term is left out) ->
    {"acc", "bwt", "fwt"} (nan where no term exists; fwt None without a base) and the number of terms of each
    ({"n_acc", "n_bwt", "n_fwt"}). With every entry present these are GEM's formulas exactly."""
    T = len(R)
    if T < 2 or any(len(row) != T for row in R):
        raise ValueError(f"R must be square with at least 2 stages, got {[len(r) for r in R]}")
    last = R[T - 1]
    acc, n_acc = _mean(last)
    bwt, n_bwt = _mean([last[j] - R[j][j] for j in range(T - 1) if last[j] is not None and R[j][j] is not None])
    out = {"acc": acc, "bwt": bwt, "n_acc": n_acc, "n_bwt": n_bwt, "fwt": None, "n_fwt": 0}
    if base is not None:
        if len(base) != T:
            raise ValueError(f"base must have one accuracy per task ({T}), got {len(base)}")
        out["fwt"], out["n_fwt"] = _mean([R[j - 1][j] - base[j] for j in range(1, T)
                                          if R[j - 1][j] is not None and base[j] is not None])
    return out


def stage_sources(run, more):
    """{task: runs.Evaluation} of one stage: its own eval.json, then the other evaluations of its checkpoint
    (more: {run_id: [Evaluation]}, e.g. the study's scores of a shared stage on the long chain's later tasks) for
    the tasks its own lacks."""
    src = {t: evaluation(run) for t in (run.eval.get("tasks") or {})}
    for e in sorted((more or {}).get(run.run_id, []), key=lambda e: e.name):
        for t in e.eval.get("tasks") or {}:
            src.setdefault(t, e)
    return src


def stage_eval(run, src):
    """A Run (runs.Run) and its {task: Evaluation} (stage_sources) -> StageEval; None for a stage not found. Its
    evaluated_run_id is its own eval.json's, or the first other evaluation's that differs (there should be none)."""
    if run is None:
        return None
    blocks = {t: e.eval["tasks"][t] for t, e in src.items()}
    seen = [e.eval.get("run_id") for e in src.values() if e.eval.get("run_id") is not None]
    return StageEval(run.name, run.run_id, run.parent_run_id, run.task,
                     {t: b.get("acc") for t, b in blocks.items()},
                     {t: {g: v.get("acc") for g, v in (b.get("groups") or {}).items()} for t, b in blocks.items()},
                     next((i for i in seen if i != run.run_id), seen[0] if seen else None))


def chain_matrix(stages, base, more=None):
    """A long chain's stages (runs.Run, stage 1 first; None where missing), the base model's evaluation
    (runs.Evaluation or None) and the other evaluations of the stages' checkpoints (more, {run_id: [Evaluation]})
    -> (tasks, R, G, b, bg, fwt_note): the matrices of accuracy_matrix, b the base model's accuracy per task and bg
    per group (None without a usable base evaluation; fwt_note then says why FWT is not available). Refused as
    accuracy_matrix, and when two evaluations of a task (each stage's and the stage that tuned it) were made on
    other examples (runs.incomparable)."""
    for r in stages:
        if r is not None and not r.eval:
            raise Refused(f"{r.name} has no eval.json; run evaluate.py --model {r.name} --out {r.name}/eval.json")
        if r is not None and r.problem:
            raise Refused(f"{r.name}: {r.problem}")
    sources = [stage_sources(r, more) if r is not None else {} for r in stages]
    tasks, R, G = accuracy_matrix([stage_eval(r, src) for r, src in zip(stages, sources)])
    for j, t in enumerate(tasks):
        for src in sources:  # every row against the stage that tuned t (the diagonal BWT subtracts)
            why = incomparable(t, sources[j][t], src[t])
            if why:
                raise Refused(why)
    if base is None:
        return tasks, R, G, None, None, NO_BASE
    lacking = [t for t in tasks if not isinstance(((base.eval.get("tasks") or {}).get(t) or {}).get("acc"),
                                                  (int, float))]
    if lacking:
        return tasks, R, G, None, None, (f"not available (the base evaluation {base.name} has no result for "
                                         f"{', '.join(lacking)})")
    for t in tasks:  # theta_0's row on the examples of every other row (those agree with stage 1's, checked above)
        why = incomparable(t, base, sources[0][t])
        if why:
            return tasks, R, G, None, None, f"not available (base evaluation incomparable: {why})"
    blocks = base.eval["tasks"]
    b = [float(blocks[t]["acc"]) for t in tasks]
    bg = {g: [((blocks[t].get("groups") or {}).get(g) or {}).get("acc") if m[0][j] is not None else None
              for j, t in enumerate(tasks)] for g, m in G.items()}
    return tasks, R, G, b, bg, None

