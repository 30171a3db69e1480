"""The study as the report reads it: a runs folder read once (build_study) into the two-stage study (its runs,
chained pairs, main learning rate and the Table-1 selection) and the runs beyond it (replay summaries, long
chains, curvature and Taylor files); every report section only reads the Study.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..runs import (CURV_FIX, EVAL_FIX, REPLAY_FIX, TAYLOR_FIX, Evaluation, check_eval_json, choose_first_stage,
                    copy_preference, duplicate_error, find_json_files, find_runs, is_measured_chain, is_replay_point,
                    long_chain_lineages, mitigation_of, pair_runs, read_json, stage_of)
from ..data.registry import CAPABILITY_TASKS, SAFETY_TASKS
from .format import FAILED, INCOMPARABLE, MISSING


@dataclass(frozen=True)
class Study:
    """A runs folder as read once by build_study; the sections only read it."""
    runs_dir: str
    runs: list
    pairs: list           # comparable pairs only (refused ones: refused_pairs)
    problems: list        # what reading the runs found missing (each section adds its own)
    main_lr: float
    main_lr_from: str
    table1: dict          # (A, B) -> [Pair, one per seed] used by Table 1 / Figures 2, 3 / Kendall
    marker: dict          # (A, B) -> "missing" | "failed" | "incomparable" for chains without Table-1 data
    capability: list
    safety: list
    seeds: list
    study_json: dict
    all_runs: list = field(default_factory=list)      # every run.json found (runs: the two-stage study's)
    replay: list = field(default_factory=list)        # [(path relative to --runs, replay_summary.json)]
    replay_ids: set = field(default_factory=set)      # run_ids of replay points (third stages)
    long_chains: list = field(default_factory=list)   # [LongChain]
    copies: dict = field(default_factory=dict)        # run_id -> [Run, ...] over all_runs
    curvature_files: list = field(default_factory=list)  # [(path relative to --runs, curvature.json)]
    taylor_files: list = field(default_factory=list)     # [(path relative to --runs, taylor.json)]
    refused_pairs: list = field(default_factory=list)  # Pairs whose evaluations cannot be compared
    refused: list = field(default_factory=list)        # their refusal lines (each section adds its own)
    cache: dict = field(default_factory=dict)          # results shared by sections (bootstrap CIs), keyed by inputs
    base: Evaluation = None   # the base model theta_0's eval.json (loose_evaluations), None when not evaluated
    more_evals: dict = field(default_factory=dict)  # run_id -> [Evaluation] of its checkpoint beyond its eval.json


def read_study_json(runs_dir):
    """<runs>/study.json (what run_all.sh ran: profile, tasks, main lr), {} without one: it is optional."""
    sj = os.path.join(runs_dir, "study.json")
    if os.path.isfile(sj):
        return read_json(sj, "study.json", "delete it or make it a JSON object (it is optional)")
    return {}


def replay_point_ids(replay):
    """The run_ids of the points of every replay_summary.json: third stages, not part of the two-stage study."""
    return {p.get("run_id") for _, s in replay for p in (s.get("points") or []) if isinstance(p, dict)
            and isinstance(p.get("run_id"), str)}


def two_stage_runs(all_runs, long_chains, replay_ids):
    """The runs of the two-stage study and where their parents are looked up -> (runs, {run_id: parent Run}).

    Table 1 and everything before the replay section use plain-recipe first stages and the measured chains
    (is_measured_chain): no replay points, no mitigated runs, no stage of a longer chain stored with that
    chain. A parent may still be stored only with a long chain."""
    own = {id(r) for lc in long_chains for r in lc.own()}
    runs = [r for r in all_runs if id(r) not in own and not is_replay_point(r, replay_ids)
            and (not mitigation_of(r.meta) if stage_of(r) == 1 else is_measured_chain(r.meta))]
    seen = {}
    for r in runs:
        if r.run_id in seen:
            duplicate_error(seen[r.run_id], r)
        seen[r.run_id] = r
    parents = dict(seen)
    for r in sorted(all_runs, key=copy_preference):  # a parent stored only with a long chain
        if not mitigation_of(r.meta) and not is_replay_point(r, replay_ids):
            parents.setdefault(r.run_id, r)
    return runs, parents


def main_lr_of(main_lr, study_json, all_pairs):
    """The second-stage lr of Table 1's chains and where it came from: --lr, else study.json, else the most
    common second-stage lr (ties: the smaller) -> (lr or None, source)."""
    lr_from = "--lr"
    if main_lr is None:
        for key in ("lr", "main_lr"):
            if isinstance(study_json.get(key), (int, float)):
                main_lr, lr_from = float(study_json[key]), f"study.json {key}"
                break
    if main_lr is None and all_pairs:
        counts = Counter(p.lr_b for p in all_pairs)
        main_lr = min(counts, key=lambda lr: (-counts[lr], lr))
        lr_from = "most common second-stage lr"
    return main_lr, lr_from


def study_tasks(runs, study_json, problems):
    """(capability tasks, safety tasks) of the study: those its runs tuned and those study.json asks for (their
    rows appear even without a run: missing). Other tasks are named in problems."""
    tasks = {t for r in runs for t in (r.chain or [r.task]) if isinstance(t, str)}
    asked = set()
    for key in ("capability_tasks", "safety_tasks"):
        if isinstance(study_json.get(key), list):
            asked |= {t for t in study_json[key] if isinstance(t, str)}
    capability = [t for t in CAPABILITY_TASKS if t in tasks | asked]
    safety = [t for t in SAFETY_TASKS if t in tasks | asked]
    other = sorted(tasks - set(capability) - set(safety))
    if other:
        problems.append(f"tasks {', '.join(other)} are neither capability nor safety tasks: left out of Table 1")
    return capability, safety


def first_stage_lr(candidates, A, main_lr, caption):
    """The first-stage lr a Table-1 chain of A starts from, among its candidate pairs: the best validated
    (choose_first_stage); without any validation result, or with FIRST_STAGE=caption (Table 1's caption: both
    stages at the main lr), the one nearest the main lr."""
    vals = {}
    for p in candidates:
        v = p.first.acc(A, "val")
        vals.setdefault(p.lr_a, None if math.isnan(v) else v)
    lr_a = choose_first_stage(vals, main_lr)
    if lr_a is None or (caption and main_lr in vals):
        lr_a = choose_first_stage(dict.fromkeys(vals, 0.0), main_lr)
    return lr_a


def table1_selection(all_pairs, runs, capability, safety, seeds, main_lr, study_json, problems):
    """Per chain and seed: the pair with second-stage lr == main lr from the best-validated parent ->
    (table1 {(A, B): [Pair]}, marker {(A, B): missing | failed | incomparable} for chains without data)."""
    table1, marker = {}, {}
    candidates = defaultdict(list)
    for p in all_pairs:  # a refused pair still takes its place: no other parent replaces it silently
        if main_lr is not None and math.isclose(p.lr_b, main_lr, rel_tol=1e-9):
            candidates[(p.A, p.B, p.seed)].append(p)
    chains = [(a, b) for c in capability for s in safety for a, b in ((c, s), (s, c))]
    chains += sorted({(p.A, p.B) for p in all_pairs} - set(chains))
    caption = study_json.get("first_stage") in ("main", "caption")  # FIRST_STAGE=main: the caption
    studied = capability + safety
    for A, B in chains:
        chosen, refused = [], 0
        for seed in seeds:
            c = candidates.get((A, B, seed), [])
            if c:
                lr_a = first_stage_lr(c, A, main_lr, caption)
                c = sorted((p for p in c if p.lr_a == lr_a), key=lambda p: p.chained.name)
                if c[0].refused:
                    refused += 1
                else:
                    chosen.append(c[0])
            elif A in studied and B in studied:
                problems.append(f"chain {A}->{B} seed {seed}: no usable chained run with second-stage lr "
                                f"{main_lr:g}" if main_lr else f"chain {A}->{B} seed {seed}: no usable chained run")
        if chosen:
            table1[(A, B)] = chosen
        elif refused:
            marker[(A, B)] = INCOMPARABLE
        else:
            failed = any(r.stage == 2 and r.chain == [A, B] and r.problem for r in runs)
            marker[(A, B)] = FAILED if failed else MISSING
    return table1, marker


def loose_evaluations(runs_dir, runs, exclude=None):
    """The eval.json files in folders without run.json -> (base, more): base the base model theta_0's evaluation
    (runs.Evaluation; None when the study did not evaluate it): "model" is the runs' base model (run.json
    base_model) or the folder is named "base" (run_all.sh's <runs>/base/eval.json), the first by path when
    several are; more {run_id: [Evaluation]}: the other evaluations of a run's checkpoint (the run_id eval.json
    records), e.g. a long chain's shared stages scored on its later tasks. One base serves every chain: the
    accuracy path's theta_0 and the long chains' forward transfer."""
    bases = {str(r.meta.get("base_model")) for r in runs if r.meta.get("base_model")}
    ids = {r.run_id for r in runs}
    base, more = None, defaultdict(list)
    for rel, ev in find_json_files(runs_dir, "eval.json", EVAL_FIX, exclude):
        folder = os.path.join(runs_dir, os.path.dirname(rel))
        if os.path.isfile(os.path.join(folder, "run.json")) or not isinstance(ev.get("tasks"), dict):
            continue
        e = Evaluation(os.path.dirname(rel) or ".", folder, ev)
        if ev.get("run_id") in ids:
            check_eval_json(os.path.join(folder, "eval.json"), ev)
            more[ev["run_id"]].append(e)
        elif base is None and (str(ev.get("model")) in bases or os.path.basename(folder) == "base"):
            base = e
    return base, dict(more)


def build_study(runs_dir, main_lr=None, exclude=None):
    """Read a runs folder: runs, chained pairs, the main lr, the Table-1 selection, the replay summaries and
    curvature files, and every problem."""
    all_runs, problems = find_runs(runs_dir, exclude, allow_copies=True)
    study_json = read_study_json(runs_dir)
    replay = find_json_files(runs_dir, "replay_summary.json", REPLAY_FIX, exclude)
    replay_ids = replay_point_ids(replay)
    copies = defaultdict(list)
    for r in all_runs:
        copies[r.run_id].append(r)
    long_chains = long_chain_lineages(all_runs, replay_ids, copies)
    runs, parents = two_stage_runs(all_runs, long_chains, replay_ids)
    all_pairs, more = pair_runs(runs, parents)
    problems += more
    pairs = [p for p in all_pairs if not p.refused]
    main_lr, lr_from = main_lr_of(main_lr, study_json, all_pairs)
    capability, safety = study_tasks(runs, study_json, problems)
    seeds = sorted({r.seed for r in runs if isinstance(r.seed, int)})
    table1, marker = table1_selection(all_pairs, runs, capability, safety, seeds, main_lr, study_json, problems)
    refused_pairs = [p for p in all_pairs if p.refused]
    # read here, once: the curvature sections and the check for an empty folder all use them
    curvature_files = find_json_files(runs_dir, "curvature.json", CURV_FIX, exclude)
    taylor_files = find_json_files(runs_dir, "taylor.json", TAYLOR_FIX, exclude)
    base, more = loose_evaluations(runs_dir, all_runs, exclude)
    return Study(runs_dir, runs, pairs, problems, main_lr, lr_from, table1, marker,
                 capability, safety, seeds, study_json, all_runs=all_runs, replay=replay, replay_ids=replay_ids,
                 long_chains=long_chains, copies=dict(copies), curvature_files=curvature_files,
                 taylor_files=taylor_files, refused_pairs=refused_pairs, refused=[p.refused for p in refused_pairs],
                 base=base, more_evals=more)


def nothing_to_report(study):
    """None when the runs folder gives at least one result (a usable pair, a long chain, a replay summary, a
    mitigated second stage or a curvature file); else the one line saying what was found and what is missing."""
    if study.pairs or study.long_chains or study.replay:
        return None
    if any(stage_of(r) == 2 and mitigation_of(r.meta) and not r.problem for r in study.all_runs):
        return None
    if study.curvature_files or study.taylor_files:
        return None
    n1 = sum(stage_of(r) == 1 for r in study.all_runs)
    n2 = sum(stage_of(r) == 2 for r in study.all_runs)
    n_eval = sum(r.eval is not None for r in study.all_runs)
    why = study.refused + study.problems
    found = (f"{len(study.all_runs)} run.json ({n1} first-stage, {n2} chained, {len(study.all_runs) - n1 - n2} "
             f"other), {n_eval} with an eval.json, 0 usable pairs")
    if why:
        found += ": " + "; ".join(why[:3]) + (f"; and {len(why) - 3} more" if len(why) > 3 else "")
    return (f"nothing to report under {study.runs_dir}: {found}. A pair needs a first-stage run and a chained run "
            f"tuned from it (finetune.py --model <first stage>), each with an eval.json holding the first task "
            f"(evaluate.py --tasks A,B); no file written")
