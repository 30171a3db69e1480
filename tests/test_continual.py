"""The continual-learning metrics of long chains (report/continual.py, the report's section) against numbers by
hand: the accuracy matrix, ACC, BWT and FWT overall and per group, the refusals of evaluations that do not belong
together, FWT "not available" without a usable base evaluation; the base model evaluated once per study (a graph
node); the group heatmap's * from the corrected per-group decision. No model, no network: hand-built runs folders.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_continual.py
"""
import io
import json
import math
import os

import pandas as pd
import pytest

import metrics
from chained_tuning.report import figures, long_chains
from chained_tuning.report.continual import NO_BASE, Refused, StageEval, accuracy_matrix, continual_metrics
from chained_tuning.study import graph, profiles
from test_metrics import LR, build_runs, write_eval, write_run

approx = pytest.approx


# ---------------------------------------------------------------------------------------------- pure functions

def test_gem_formulas_by_hand():
    R = [[0.8, 0.3, 0.5],
         [0.6, 0.9, 0.4],
         [0.5, 0.7, 0.9]]
    m = continual_metrics(R, base=[0.4, 0.2, 0.3])
    assert m["acc"] == approx((0.5 + 0.7 + 0.9) / 3)                 # last row
    assert m["bwt"] == approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)        # -0.25: forgetting
    assert m["fwt"] == approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)        # R[1][2] - b2, R[2][3] - b3: 0.1
    assert (m["n_acc"], m["n_bwt"], m["n_fwt"]) == (3, 2, 2)
    no_base = continual_metrics(R)
    assert no_base["fwt"] is None and no_base["n_fwt"] == 0 and no_base["bwt"] == approx(-0.25)
    with pytest.raises(ValueError):
        continual_metrics([[0.5, 0.5]])                               # not square
    with pytest.raises(ValueError):
        continual_metrics(R, base=[0.1, 0.2])                         # one base accuracy per task


def _stage(k, task, acc, groups=None, parent=None, evaluated=None):
    return StageEval(f"lc/{k}-{task}", f"id{k}", parent if parent is not None else (f"id{k - 1}" if k > 1 else None),
                     task, acc, groups or {}, evaluated)


def _three_stages():
    """A (groups g, h) -> B (no groups) -> C (group g): group g covers A and C, h only A."""
    return [_stage(1, "A", {"A": 0.9, "B": 0.2, "C": 0.4}, {"A": {"g": 1.0, "h": 0.8}, "C": {"g": 0.5}}),
            _stage(2, "B", {"A": 0.7, "B": 0.8, "C": 0.3}, {"A": {"g": 0.6, "h": 0.8}, "C": {"g": 0.25}}),
            _stage(3, "C", {"A": 0.6, "B": 0.5, "C": 0.9}, {"A": {"g": 0.4, "h": 0.8}, "C": {"g": 1.0}})]


def test_accuracy_matrix_and_per_group_by_hand():
    tasks, R, G = accuracy_matrix(_three_stages())
    assert tasks == ["A", "B", "C"]
    assert R == [[0.9, 0.2, 0.4], [0.7, 0.8, 0.3], [0.6, 0.5, 0.9]]
    assert G["g"] == [[1.0, None, 0.5], [0.6, None, 0.25], [0.4, None, 1.0]]
    assert G["h"] == [[0.8, None, None]] * 3
    m = continual_metrics(R, [0.5, 0.1, 0.2])
    assert m["acc"] == approx(2 / 3) and m["bwt"] == approx((-0.3 - 0.3) / 2)
    assert m["fwt"] == approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    g = continual_metrics(G["g"], [0.7, None, 0.5])
    assert g["acc"] == approx((0.4 + 1.0) / 2) and g["n_acc"] == 2    # A and C: B has no groups
    assert g["bwt"] == approx(0.4 - 1.0) and g["n_bwt"] == 1          # only A comes before the last stage
    assert g["fwt"] == approx(0.25 - 0.5) and g["n_fwt"] == 1         # only C has a stage before it with g
    h = continual_metrics(G["h"], [0.6, None, None])
    assert h["acc"] == approx(0.8) and h["bwt"] == approx(0.0)
    assert math.isnan(h["fwt"]) and h["n_fwt"] == 0                   # A is tuned first: no forward transfer


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.__setitem__(1, None), "stage 2 has no run.json"),
    (lambda s: s.__setitem__(2, _stage(3, "C", s[2].acc, parent="other")),
     "lc/3-C: stage 3 was tuned from run other, not from stage 2 (lc/2-B, run id2)"),
    (lambda s: s.__setitem__(1, _stage(2, "B", s[1].acc, evaluated="id9")),
     "lc/2-B/eval.json scored checkpoint id9, not this stage's run id2"),
    (lambda s: s.__setitem__(2, _stage(3, "C", {"A": 0.6, "C": 0.9})), "lc/3-C/eval.json has no result for B"),
    (lambda s: s.__setitem__(2, _stage(3, "A", s[2].acc)), "tunes a task twice"),
])
def test_matrix_of_evaluations_that_do_not_belong_together_is_refused_by_name(change, needle):
    stages = _three_stages()
    change(stages)
    with pytest.raises(Refused) as e:
        accuracy_matrix(stages)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------- from a runs folder

# correct answers per group (test_metrics.TEST_SET: toxigen asian 4, black 4, muslim 2; arc 10; bbq Age 5, SES 4,
# Religion 1) after each stage of toxigen -> arc -> bbq, and of the base model
STAGES = [("toxigen", {"toxigen": [4, 3, 2], "arc": [5], "bbq": [3, 2, 1]}),     # 0.9, 0.5, 0.6
          ("arc", {"toxigen": [3, 2, 1], "arc": [8], "bbq": [2, 2, 1]}),         # 0.6, 0.8, 0.5
          ("bbq", {"toxigen": [2, 2, 0], "arc": [6], "bbq": [5, 4, 1]})]         # 0.4, 0.6, 1.0
BASE = {"toxigen": [2, 2, 1], "arc": [3], "bbq": [2, 1, 0]}                      # 0.5, 0.3, 0.3


def _edit_eval(folder, edit):
    p = os.path.join(folder, "eval.json")
    with open(p) as f:
        ev = json.load(f)
    edit(ev)
    with open(p, "w") as f:
        json.dump(ev, f)


def build_chain(root, base=True, shared=False):
    """runs/longchain/toxigen-arc-bbq/seed0/{1-toxigen,2-arc,3-bbq} (run.json, eval.json, samples) and, with base,
    runs/base/eval.json (a folder without run.json named base) -> the stage folders. shared: as the study makes
    them, stages 1 and 2 evaluated on their own tasks only, their scores on the later tasks in folders without
    run.json (evalchain-*: eval.json with the stage's run_id)."""
    runs = os.path.join(root, "runs")
    lc = os.path.join(runs, "longchain", "toxigen-arc-bbq", "seed0")
    parent, chain, folders = None, [], []
    for k, (task, counts) in enumerate(STAGES, 1):
        chain.append(task)
        d = os.path.join(lc, f"{k}-{task}")
        parent = write_run(d, list(chain), LR, 0, parent)
        own = {t: c for t, c in counts.items() if t in chain} if shared else counts
        write_eval(d, own)
        if shared and len(own) < len(counts):
            later = os.path.join(runs, "evalchain", f"{k}-{task}")
            os.makedirs(later)
            write_eval(later, {t: c for t, c in counts.items() if t not in own})
            _edit_eval(later, lambda ev, rid=parent: ev.update(run_id=rid))
        folders.append(d)
    if base:
        os.makedirs(os.path.join(runs, "base"))
        write_eval(os.path.join(runs, "base"), BASE)
    return runs, folders


def section(runs):
    study = metrics.build_study(runs)
    s = long_chains.section_continual(study, None)
    read = lambda name: pd.read_csv(io.StringIO(s.files[name]), dtype=str, keep_default_na=False)
    return s, read


def test_continual_section_by_hand(tmp_path):
    runs, _ = build_chain(tmp_path)
    s, read = section(runs)
    assert s.refused == [] and s.problems == []
    t = read("continual_metrics.csv").set_index("group")
    assert list(t.columns[:4]) == ["chain", "seed", "lrs", "tasks"]
    a = t.loc["all"]
    assert a.tasks == "toxigen;arc;bbq"
    assert float(a["ACC (%)"]) == approx(100 * (0.4 + 0.6 + 1.0) / 3, abs=1e-4)
    assert float(a["BWT (%)"]) == approx(100 * ((0.4 - 0.9) + (0.6 - 0.8)) / 2)          # -35
    assert float(a["FWT (%)"]) == approx(100 * ((0.5 - 0.3) + (0.5 - 0.3)) / 2)  # R12 - b_arc, R23 - b_bbq: 20
    asian = t.loc["asian"]                                   # toxigen only: tuned first, so no FWT term
    assert asian.tasks == "toxigen" and float(asian["ACC (%)"]) == approx(50.0)
    assert float(asian["BWT (%)"]) == approx(50.0 - 100.0) and asian["FWT (%)"] == "n/a" and asian.n_fwt == "0"
    ses = t.loc["SES"]                                       # bbq only: tuned last, so no BWT term
    assert ses.tasks == "bbq" and ses["BWT (%)"] == "n/a" and float(ses["FWT (%)"]) == approx(50.0 - 25.0)
    assert float(t.loc["Religion", "FWT (%)"]) == approx(100.0)                       # 1/1 after arc, 0/1 base
    m = read("continual_accuracy_matrix.csv")
    overall = m[m.group == "all"].set_index(["after_stage", "task"])["acc (%)"].astype(float)
    assert overall[("0", "arc")] == approx(30.0) and overall[("2", "bbq")] == approx(50.0)
    assert overall[("3", "toxigen")] == approx(40.0) and len(overall) == 4 * 3        # base + 3 stages, 3 tasks
    assert m[m.after_stage == "0"].model.unique().tolist() == ["base"]
    assert "### toxigen->arc->bbq" in s.text and "| theta_0 (base) | 50.00 | 30.00 | 30.00 |" in s.text
    assert "| all | ToxiGen, ARC-Easy, BBQ | 1 | 66.67 | n/a | -35.00 | n/a | 20.00 | n/a |" in s.text
    assert "| SES | BBQ | 1 | 100.00 | n/a | n/a | n/a | 25.00 | n/a |" in s.text   # no BWT term: n/a


def test_shared_stages_scored_on_later_tasks_are_paired_by_run_id(tmp_path):
    runs, _ = build_chain(tmp_path, shared=True)
    s, read = section(runs)
    assert s.refused == []
    a = read("continual_metrics.csv").set_index("group").loc["all"]
    assert (float(a["BWT (%)"]), float(a["FWT (%)"])) == (approx(-35.0), approx(20.0))   # as test_..._by_hand
    m = read("continual_accuracy_matrix.csv").set_index(["group", "after_stage", "task"])["acc (%)"].astype(float)
    assert m[("all", "1", "bbq")] == approx(60.0) and m[("SES", "2", "bbq")] == approx(50.0)
    # the same scores recorded for another checkpoint: they are no evaluation of stage 2, whose bbq is missing
    _edit_eval(os.path.join(runs, "evalchain", "2-arc"), lambda ev: ev.update(run_id="0123456789ab"))
    s, _ = section(runs)
    assert len(s.refused) == 1 and "2-arc/eval.json has no result for bbq" in s.refused[0]


def test_without_base_fwt_is_not_available_never_invented(tmp_path):
    runs, _ = build_chain(tmp_path, base=False)
    s, read = section(runs)
    t = read("continual_metrics.csv").set_index("group")
    assert t.loc["all", "FWT (%)"] == NO_BASE and t.loc["SES", "FWT (%)"] == NO_BASE
    assert float(t.loc["all", "BWT (%)"]) == approx(-35.0)              # ACC and BWT need no base
    assert "0" not in set(read("continual_accuracy_matrix.csv").after_stage)
    assert NO_BASE in s.text


def test_base_on_other_examples_gives_no_fwt(tmp_path):
    runs, _ = build_chain(tmp_path)
    _edit_eval(os.path.join(runs, "base"), lambda ev: ev["tasks"]["arc"].update(n=11))
    s, read = section(runs)
    fwt = read("continual_metrics.csv").set_index("group").loc["all", "FWT (%)"]
    assert fwt.startswith("not available (base evaluation incomparable: arc: base vs ") and "n 11 vs 10" in fwt


@pytest.mark.parametrize("edit, needle", [
    (lambda ev: ev.update(run_id="0123456789ab"), "2-arc/eval.json scored checkpoint 0123456789ab"),
    (lambda ev: ev["tasks"].pop("bbq"), "2-arc/eval.json has no result for bbq"),
    (lambda ev: ev["tasks"]["toxigen"].update(split="validation"), "split 'test' vs 'validation'"),
])
def test_chain_whose_evaluations_do_not_belong_together_is_refused(tmp_path, edit, needle):
    runs, folders = build_chain(tmp_path)
    _edit_eval(folders[1], edit)
    s, read = section(runs)
    assert len(s.refused) == 1 and needle in s.refused[0], s.refused
    assert s.refused[0].startswith("long chain toxigen->arc->bbq seed 0: accuracy matrix, ACC, BWT and FWT left out")
    assert len(read("continual_metrics.csv")) == 0 and "No long chain gives a usable accuracy matrix" in s.text


# ---------------------------------------------------------------------------------------------- the study graph

def test_base_model_is_evaluated_once_per_study(tmp_path):
    env = {"PROFILE": "tiny", "RUNS": str(tmp_path / "runs"), "SEEDS": "0 1", "CAP": "arc", "SAFE": "toxigen",
           "CHAINS": "toxigen-arc-csqa2 arc-toxigen-csqa", "EVAL_LIMIT": "30"}
    g = graph.Builder(profiles.settings(env), {}, plan=True).build()
    # every stage that evaluates the base model itself (evaluate.py --model tiny): one for 2 seeds and 2 chains
    base = [st for st in g.stages.values() if st.cmd and "evaluate.py" in st.cmd
            and st.cmd[st.cmd.index("--model") + 1] == "tiny"]
    assert [st.name for st in base] == ["eval-base"] and base[0].kind == "evaluate" and base[0].after == []
    cmd = base[0].cmd
    assert cmd[cmd.index("--tasks") + 1] == "arc,toxigen,csqa2,csqa"    # the study's tasks and its chains'
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "runs" / "base" / "eval.json")
    assert cmd[cmd.index("--model") + 1] == "tiny" and cmd[cmd.index("--limit") + 1] == "30"
    # a long chain's stages shared with the study (stage 1; stage 2 = the Table-1 chain) scored on its later tasks
    later = {st.name: st.cmd[st.cmd.index("--tasks") + 1] for st in g.stages.values()
             if st.name.startswith("evalchain")}
    assert len(later) == 2 * 2 * 2
    assert later["evalchain-toxigen-arc-csqa2-1-toxigen-seed1"] == "arc,csqa2"
    assert later["evalchain-toxigen-arc-csqa2-2-arc-seed1"] == "csqa2"
    st = g.stages["evalchain-arc-toxigen-csqa-2-toxigen-seed0"]
    assert st.after == ["stage2-arc-toxigen-lrA1e-3-lrB1e-3-seed0"] and st.out.endswith(
        os.path.join("longchain", "arc-toxigen-csqa", "seed0", "2-toxigen", "eval.json"))


# ---------------------------------------------------------------------------------------------- the group heatmap

def test_group_heatmap_star_is_the_corrected_decision():
    assert figures.heatmap_star("more", -1.0, 1.0) and figures.heatmap_star("less", -1.0, 1.0)
    assert not figures.heatmap_star("no", 2.0, 5.0)                 # a raw CI excluding 0 is not enough
    assert figures.heatmap_star("n/a", 2.0, 5.0) and not figures.heatmap_star("n/a", -2.0, 5.0)  # no test run
    assert not figures.heatmap_star("n/a", "n/a", "n/a")


def test_group_heatmap_csv_and_caption_follow_the_decision(tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    build_runs(runs)
    study = metrics.build_study(runs)
    opts = metrics.build_parser().parse_args(["--runs", runs, "--out", "o", "--n_boot", "50", "--n_perm", "50"])
    # every group "no" by its corrected test: no star, whatever the raw CIs say
    monkeypatch.setattr(figures, "group_decisions", lambda perm, o: {g: (0.5, 0.5, "no") for g in
                                                                      (perm or {}).get("groups", {})})
    s = figures.section_group_heatmap(study, opts)
    df = pd.read_csv(io.StringIO(s.files["figure_group_heatmap.csv"]), dtype=str,
                     keep_default_na=False)
    assert len(df) and set(df.significant) == {"no"} and set(df.star) == {"False"}
    assert "holm" in s.text.lower() and "significant column of forgetting_by_group.csv" in s.text
    monkeypatch.setattr(figures, "group_decisions", lambda perm, o: {g: (0.01, 0.02, "more") for g in
                                                                      (perm or {}).get("groups", {})})
    df = pd.read_csv(io.StringIO(figures.section_group_heatmap(study, opts).files[
        "figure_group_heatmap.csv"]), dtype=str, keep_default_na=False)
    assert set(df.star) == {"True"}


def test_accuracy_path_starts_at_the_base_evaluation(tmp_path):
    runs = str(tmp_path / "runs")
    build_runs(runs)
    opts = metrics.build_parser().parse_args(["--runs", runs, "--out", "o"])
    before = figures.section_accuracy_path(metrics.build_study(runs), opts)
    assert "theta_0 was not evaluated" in before.text
    os.makedirs(os.path.join(runs, "base"))
    write_eval(os.path.join(runs, "base"), {"toxigen": [1, 1, 0], "arc": [4]})     # 20%, 40%
    s = figures.section_accuracy_path(metrics.build_study(runs), opts)
    df = pd.read_csv(io.StringIO(s.files["figure_accuracy_path.csv"]), dtype=str, keep_default_na=False)
    row = df[(df.first_task == "toxigen") & (df.second_task == "arc")].set_index("task")
    assert float(row.loc["toxigen", "acc_theta0"]) == approx(20.0)
    assert float(row.loc["arc", "acc_theta0"]) == approx(40.0)
    assert set(df[df.task == "bbq"].acc_theta0) == {"missing"}                      # bbq not in the base's eval.json
    assert "theta_0 was not evaluated" not in s.text
