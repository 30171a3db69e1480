"""metrics.py's paper-fidelity outputs: the one first-stage choice rule, Table 1 with every row the study asks
for, a SaFeRDialogues evaluation (no options, no groups), Table 2 beside the paper, Figures 9 and 10, the new
pictures, the Findings section first and the generated "Where this run differs from the paper" section.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_report_findings.py
"""
import json
import os

import pandas as pd
import pytest

import metrics
from conftest import DATA, needs_data
from test_metrics import build_runs, write_eval, write_run

approx = pytest.approx


# ---------------------------------------------------------------------------------------------- the choice rule

def test_choose_first_stage_best_then_log_distance_then_smaller_lr():
    assert metrics.choose_first_stage({1e-6: 0.5, 1e-5: 0.7, 2e-5: 0.6}, 1e-5) == 1e-5
    assert metrics.choose_first_stage({1e-6: 0.8, 1e-5: 0.7}, 1e-5) == 1e-6  # accuracy first
    # tie at 0.7: |log(lr / 1e-5)| = 0.693 for 5e-6, 0.405 for 1.5e-5 -> 1.5e-5
    assert metrics.choose_first_stage({5e-6: 0.7, 1.5e-5: 0.7}, 1e-5) == 1.5e-5
    # 5e-6 and 2e-5 are equally far on a log scale (a |lr - main| rule would pick 5e-6 for another reason):
    # the smaller lr wins the tie; so it does with no main lr
    assert metrics.choose_first_stage({2e-5: 0.7, 5e-6: 0.7}, 1e-5) == 5e-6
    assert metrics.choose_first_stage({2e-5: 0.7, 5e-6: 0.7}, None) == 5e-6
    # accuracies equal up to float noise are tied (TIE_TOL); a missing one never wins; nothing measured: None
    assert metrics.choose_first_stage({1e-5: 0.7, 2e-5: 0.7 + 1e-12}, 1e-5) == 1e-5
    assert metrics.choose_first_stage({1e-5: None, 2e-5: 0.1, 1e-6: float("nan")}, 1e-5) == 2e-5
    assert metrics.choose_first_stage({1e-5: None}, 1e-5) is None and metrics.choose_first_stage({}, 1e-5) is None


# ---------------------------------------------------------------------------------------------- a study with SD

def write_sd_eval(folder, n_safe, n=10):
    """eval.json and samples as a SaFeRDialogues evaluation writes them: correct per example plus the reply and
    its toxicity, no options or logliks, no groups."""
    rows = [{"id": f"sd-{i}", "task": "saferdialogues", "group": None, "prompt": "ctx", "generation": "sorry",
             "toxicity": 0.1 if i < n_safe else 0.9, "safe": i < n_safe, "correct": i < n_safe} for i in range(n)]
    with open(os.path.join(folder, "eval_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ev = json.load(open(os.path.join(folder, "eval.json"))) if os.path.isfile(os.path.join(folder, "eval.json")) \
        else {"model": folder, "config": {}, "tasks": {}, "samples": "eval_samples.jsonl"}
    ev["tasks"]["saferdialogues"] = {"acc": n_safe / n, "acc_stderr": 0.1, "n": n, "loss": 2.0, "groups": {},
                                     "source": "synthetic", "split": "test"}
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump(ev, f)


def add_saferdialogues(root):
    """SD -> arc (SD safe 8 -> 6 of 10; the chained model's eval.json also holds arc); no arc -> SD run."""
    d1 = os.path.join(root, "stage1", "saferdialogues", "lr1e-05", "seed0")
    sd_id = write_run(d1, ["saferdialogues"], 1e-5, 0)
    write_sd_eval(d1, 8)
    d2 = os.path.join(root, "stage2", "saferdialogues-arc", "lrA1e-05_lrB1e-05", "seed0")
    write_run(d2, ["saferdialogues", "arc"], 1e-5, 0, sd_id)
    write_eval(d2, {"arc": [7]})
    rows = [json.loads(x) for x in open(os.path.join(d2, "eval_samples.jsonl"))]
    write_sd_eval(d2, 6)  # replaces the samples file: keep arc's rows too
    with open(os.path.join(d2, "eval_samples.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(root, "study.json"), "w") as f:
        json.dump({"profile": "tiny", "capability_tasks": ["arc", "csqa", "csqa2"],
                   "safety_tasks": ["toxigen", "bbq", "saferdialogues"]}, f)
    with open(os.path.join(root, "stage1", "arc", "lr1e-05", "seed0", "train_log.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 6))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    runs, out = str(root / "runs"), str(root / "out")
    build_runs(runs)
    add_saferdialogues(runs)
    assert metrics.main(["--runs", runs, "--out", out, "--n_boot", "100"]) == 0
    return runs, out


def _csv(out, name):
    return pd.read_csv(os.path.join(out, name), dtype=str, keep_default_na=False)


def test_table1_has_every_row_the_study_asks_for(report):
    _, out = report
    t1 = _csv(out, "table1.csv")
    assert len(t1) == 9 and set(t1.capability) == {"arc", "csqa", "csqa2"}
    assert set(t1.safety) == {"toxigen", "bbq", "saferdialogues"}
    row = t1[(t1.capability == "csqa2") & (t1.safety == "bbq")].iloc[0]
    assert row["cs_forgetting_cap (%)"] == row["sc_forgetting_safety (%)"] == "missing"
    sd = t1[(t1.capability == "arc") & (t1.safety == "saferdialogues")].iloc[0]
    assert float(sd["sc_forgetting_safety (%)"]) == approx(20.0) and sd["cs_forgetting_cap (%)"] == "missing"


def test_saferdialogues_has_no_group_analysis_and_no_chance_crash(report):
    _, out = report
    assert "saferdialogues" not in set(_csv(out, "forgetting_by_group.csv").first_task)
    bf = _csv(out, "biased_forgetting.csv")
    sd = bf[bf.first_task == "saferdialogues"].iloc[0]
    assert sd.n_groups == "0" and float(sd["forgetting (%)"]) == approx(20.0)
    chance = _csv(out, "chance.csv")
    assert set(chance[chance.task == "saferdialogues"]["chance (%)"]) == {"n/a"}  # no options: no uniform guess


def test_figures_9_10_and_the_new_pictures_each_with_their_csv(report):
    _, out = report
    for stem in ("figure9", "figure10", "figure_forgetting_heatmap", "figure_group_heatmap", "figure_accuracy_path",
                 "figure_loss_curves"):
        assert os.path.getsize(os.path.join(out, stem + ".png")) > 1000 and os.path.isfile(os.path.join(out, stem + ".csv"))
    f9, f10 = _csv(out, "figure9.csv"), _csv(out, "figure10.csv")
    assert set(f9.first_task) == {"toxigen"} and set(f10.first_task) == {"bbq"}
    ta = f9[f9.second_task == "arc"].set_index("group")
    assert float(ta.loc["muslim", "forgetting (%)"]) == approx(75.0)  # (2 - 0.5) of 2, mean over seeds
    assert float(ta.loc["muslim", "task_forgetting (%)"]) == approx(35.0)
    assert float(ta.loc["muslim", "biased_forgetting_ci_low (%)"]) <= 40.0 <= float(
        ta.loc["muslim", "biased_forgetting_ci_high (%)"])
    heat = _csv(out, "figure_forgetting_heatmap.csv").set_index(["first_task", "second_task"])
    assert float(heat.loc[("toxigen", "arc"), "forgetting (%)"]) == approx(35.0)
    assert heat.loc[("csqa", "toxigen"), "forgetting (%)"] == "missing"
    assert ("arc", "csqa") not in heat.index  # a chain the study does not run
    loss = _csv(out, "figure_loss_curves.csv")
    assert len(loss) == 5 and float(loss.loss.iloc[-1]) == approx(0.4)


def test_report_opens_with_findings_then_deviations(report):
    _, out = report
    text = open(os.path.join(out, "report.md")).read()
    f, d, t1 = (text.index(h) for h in ("## Findings", "## Where this run differs", "## Table 1"))
    assert f < d < t1
    assert "smoke test of the pipeline on synthetic tasks" in text
    findings = _csv(out, "findings.csv")
    assert set(findings.verdict) <= {"reproduced", "not reproduced", "not testable here"}
    order = findings[findings.claim.str.startswith("Safety tasks")].iloc[0]
    # pairs with both orders: toxigen/arc and bbq/arc (arc -> SD is missing, so SD's pair is not counted)
    assert order.verdict == "reproduced" and "2 of 2 pairs" in order.evidence
    assert "TQA" not in open(os.path.join(out, "table1.md")).read()


# ---------------------------------------------------------------------------------------------- deviations

def _one_pair(root, config, train_info, seeds=(0,), base="tiny", optimizer=None):
    for seed in seeds:
        d1 = os.path.join(root, "stage1", "toxigen", f"seed{seed}")
        extra = {"data": {"source": "/data", "n_train": 2236, "train_info": train_info}, "base_model": base,
                 "config": config}
        if optimizer is not None:
            extra["optimizer"] = optimizer
        rid = write_run(d1, ["toxigen"], 1e-5, seed, **extra)
        write_eval(d1, {"toxigen": [4, 3, 2]})
        d2 = os.path.join(root, "stage2", "toxigen-arc", f"seed{seed}")
        write_run(d2, ["toxigen", "arc"], 1e-5, seed, rid, **extra)
        write_eval(d2, {"toxigen": [2, 3, 0], "arc": [7]})
    return metrics.deviations(metrics.build_study(root))


def test_deviations_list_what_a_run_has_and_drop_what_it_does_not(tmp_path):
    paperish = {"max_grad_norm": 0, "steps": 100, "batch_size": 16, "max_length": 2048, "weight_decay": 0.1}
    ours = {**paperish, "max_grad_norm": 1.0, "steps": 5, "eval_limit": 200}
    info_ours = {"arc_choices": "all", "test_set": "fraction", "cells": "fill", "n_groups": 13,
                 "group_rule": "least frequent", "human_validation": {"used": False}}
    info_paper = {"arc_choices": "4", "test_set": "rest", "cells": "equal", "n_groups": 13,
                  "human_validation": {"used": True}}
    a = " | ".join(f"{w} -> {h}" for w, h in _one_pair(str(tmp_path / "a"), ours, info_ours,
                                                        optimizer={"no_weight_decay": ["norm weights", "biases"]}))
    for needle in ("Gradient clipping at a global norm of 1", "--max_grad_norm 0", "No weight decay on biases, norm",
                   "summed log-likelihood", "least frequent", "Acc_A(theta_A, g)", "The correct answer is",
                   "--arc_choices 4", "test_set=\"rest\"", "cells=\"equal\"", "human-validated",
                   "Optimisation steps 5", "subsets of 200", "1 seed (paper: 3)", "Model: tiny", "SaFeRDialogues"):
        assert needle in a, needle
    b = " | ".join(f"{w} -> {h}" for w, h in _one_pair(str(tmp_path / "b"), paperish, info_paper, seeds=(0, 1, 2),
                                                        base="/models/Llama-2-7b-hf"))
    for gone in ("Gradient clipping", "No weight decay on", "--arc_choices", "test_set=", "cells=", "human-validated",
                 "Optimisation steps", "subsets of", "seed", "Model:", "least frequent"):
        assert gone not in b, gone
    assert "not recorded in run.json" in b  # an old run.json: said, not guessed


# ---------------------------------------------------------------------------------------------- Table 2, real data

@needs_data
def test_table2_from_runs_on_the_real_files(tmp_path):
    import tasks
    root = str(tmp_path / "runs")
    for task in ("arc", "toxigen"):
        train = tasks.load_task(task, "train", DATA, test_set="rest")
        test = tasks.load_task(task, "test", DATA, test_set="rest")
        d = os.path.join(root, "stage1", task)
        write_run(d, [task], 1e-5, 0, data={"source": DATA, "n_train": len(train.examples), "train_info": train.info})
        with open(os.path.join(d, "eval.json"), "w") as f:
            json.dump({"tasks": {task: {"acc": 0.5, "n": len(test.examples), "source": DATA, "split": "test",
                                        "groups": {g: {"acc": 0.5, "n": 1} for g in {e.group for e in test.examples}
                                                   if g}}}}, f)
    opts = metrics.build_parser().parse_args(["--runs", root, "--out", str(tmp_path / "out")])
    section = metrics.section_table2(metrics.build_study(root), opts)  # first stages alone: no pair to report
    with open(tmp_path / "table2.csv", "w") as f:
        f.write(section.files["table2.csv"])
    t2 = _csv(str(tmp_path), "table2.csv").set_index("task")
    assert (t2.loc["arc", "train_size"], t2.loc["arc", "test_size"]) == ("2241", "2365")  # = the paper's
    assert (t2.loc["arc", "paper_train_size"], t2.loc["arc", "paper_test_size"]) == ("2241", "2365")
    assert t2.loc["toxigen", "train_size"] == "2236" == t2.loc["toxigen", "paper_train_size"]
    assert t2.loc["toxigen", "groups"] == "13" and t2.loc["toxigen", "labels"] == "2"
    assert "test_set=rest" in t2.loc["toxigen", "data_options"] and "arc_choices=4" in t2.loc["arc", "data_options"]
    assert int(t2.loc["toxigen", "test_size"]) == 6514 - 2236 - 653  # every example not trained or validated on
