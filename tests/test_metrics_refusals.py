"""metrics.py refuses what it cannot compute honestly: pairs of evaluations that cannot be compared, ties
named as one worst group, accuracies at chance left unflagged, a folder with nothing to report; and the
shared rules with order.py (the measured chains), units in headers, --help and numeric flags.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_metrics_refusals.py
"""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from test_metrics import (LR, REPLAY_UNITS, ROOT, _id, _one_error_line, _point, build_runs, metrics_cli_on_built_runs,
                          run_cli, write_curvature, write_eval, write_run)

import metrics  # noqa: E402
import order  # noqa: E402
from chained_tuning.report import long_chains, mitigation, replay  # noqa: E402

approx = pytest.approx
S2 = os.path.join("stage2", "{}", "lrA1e-05_lrB1e-05", "seed{}")


def _edit_json(path, change):
    with open(path) as f:
        obj = json.load(f)
    change(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def _edit_samples(folder, change):
    path = os.path.join(folder, "eval_samples.jsonl")
    recs = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps(change(r)) + "\n" for r in recs)


def incomparable_runs(runs):
    """On top of build_runs: toxigen->csqa seed 0 scored toxigen on another data source, seed 1 on other
    examples (two ids renamed, same n); bbq->arc seed 0 on 5 examples with no samples file (config limit 5)."""
    d0, d1 = (os.path.join(runs, S2.format("toxigen-csqa", s)) for s in (0, 1))
    _edit_json(os.path.join(d0, "eval.json"), lambda ev: ev["tasks"]["toxigen"].update(source="/data/real"))
    _edit_samples(d1, lambda r: {**r, "id": r["id"] + "-other"} if r["id"] in ("toxigen-asian-0", "toxigen-black-0")
                  else r)
    d = os.path.join(runs, S2.format("bbq-arc", 0))
    os.remove(os.path.join(d, "eval_samples.jsonl"))

    def five(ev):
        ev["tasks"]["bbq"]["n"] = 5
        ev["config"] = {"limit": 5, "seed": 0}
    _edit_json(os.path.join(d, "eval.json"), five)


@pytest.fixture(scope="module")
def refused_out(tmp_path_factory):
    return metrics_cli_on_built_runs(tmp_path_factory.mktemp("refused"), incomparable_runs)


def test_incomparable_pairs_are_refused_by_name_and_marked(refused_out):
    runs, out, stdout = refused_out
    report = open(os.path.join(out, "report.md")).read()
    refused = report[report.index("## Refused"):report.index("## Missing or failed")]
    t0, t1 = S2.format("toxigen-csqa", 0), S2.format("toxigen-csqa", 1)
    for text in (f"{os.path.join('stage1', 'toxigen', 'lr1e-05', 'seed0')} vs {t0}: source 'synthetic' vs '/data/real'",
                 f"vs {t1}: example ids differ (8 shared, 2 only in the first, 2 only in the second)",
                 f"vs {S2.format('bbq-arc', 0)}: n 10 vs 5"):
        assert text in refused and text in stdout, text
    assert "## Refused: evaluations that cannot be compared (3)" in report
    t = pd.read_csv(os.path.join(out, "table1.csv"), dtype=str, keep_default_na=False).set_index(["capability", "safety"])
    # toxigen -> csqa: both seeds refused, so the cell says so (never the 0.0 a mixed pair would give)
    assert (t.loc[("csqa", "toxigen"), ["sc_forgetting_safety (%)", "sc_acc_safety (%)"]] == "incomparable").all()
    assert t.loc[("csqa", "toxigen"), "cs_forgetting_cap (%)"] == "missing"      # csqa -> toxigen: never run
    # bbq -> arc: seed 0 refused, seed 1 (100% -> 70%) stands alone
    assert float(t.loc[("arc", "bbq"), "sc_forgetting_safety (%)"]) == approx(30.0)
    assert t.loc[("arc", "bbq"), "sc_forgetting_safety_std (%)"] == "n/a"
    bf = pd.read_csv(os.path.join(out, "biased_forgetting.csv"))
    assert not ((bf.first_task == "toxigen") & (bf.second_task == "csqa")).any()
    assert json.load(open(os.path.join(out, "summary.json")))["refused"]


def test_the_issue_case_real_against_synthetic_exits_2(tmp_path):
    """theta_A on real ToxiGen, theta_AB on the synthetic one: no "forgetting 0.0", exit 2, nothing written."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    a = write_run(str(runs / "toxigen"), ["toxigen"], LR, 0)
    write_eval(str(runs / "toxigen"), {"toxigen": [4, 3, 2]})
    _edit_json(str(runs / "toxigen" / "eval.json"), lambda ev: ev["tasks"]["toxigen"].update(source="/data/real"))
    write_run(str(runs / "toxigen-arc"), ["toxigen", "arc"], LR, 0, a)
    write_eval(str(runs / "toxigen-arc"), {"toxigen": [4, 3, 2], "arc": [8]})
    r = run_cli("--runs", str(runs), "--out", str(out), "--n_boot", "0")
    _one_error_line(r, "nothing to report", "0 usable pairs", "source '/data/real' vs 'synthetic'", "toxigen-arc")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_no_usable_pair_exits_2_with_what_was_found(tmp_path):
    """The README's recipe before the fix: theta_A never evaluated, so no pair."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    a = write_run(str(runs / "toxigen"), ["toxigen"], LR, 0)
    write_run(str(runs / "toxigen-arc"), ["toxigen", "arc"], LR, 0, a)
    write_eval(str(runs / "toxigen-arc"), {"toxigen": [4, 3, 2], "arc": [8]})
    r = run_cli("--runs", str(runs), "--out", str(out))
    _one_error_line(r, "nothing to report", "2 run.json (1 first-stage, 1 chained, 0 other), 1 with an eval.json",
                    "toxigen: no eval.json", "evaluate.py --tasks A,B", "no file written")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    # first stages alone, evaluated: still no forgetting to report
    runs2 = tmp_path / "runs2"
    write_run(str(runs2 / "toxigen"), ["toxigen"], LR, 0)
    write_eval(str(runs2 / "toxigen"), {"toxigen": [4, 3, 2]})
    _one_error_line(run_cli("--runs", str(runs2), "--out", str(out)), "1 first-stage, 0 chained")
    assert not out.exists()


def collapsed_runs(root):
    """toxigen (100%) -> arc, whose toxigen predictions all collapsed to option 0: every group at exactly 50%."""
    a = write_run(os.path.join(root, "toxigen"), ["toxigen"], LR, 0)
    write_eval(os.path.join(root, "toxigen"), {"toxigen": [4, 4, 2]})
    d = os.path.join(root, "toxigen-arc")
    write_run(d, ["toxigen", "arc"], LR, 0, a)
    write_eval(d, {"toxigen": [2, 2, 1], "arc": [8]})  # labels alternate: option 0 is right for half of each group
    _edit_samples(d, lambda r: {**r, "pred": 0, "correct": r["label"] == 0} if r["task"] == "toxigen" else r)


def test_ties_are_named_as_tied_and_chance_is_flagged(tmp_path):
    assert metrics.worst_groups_label({"asian": 0.5, "black": 0.5, "chinese": 0.5}) == "asian = black = chinese (tied)"
    assert metrics.worst_groups_label({"m": 0.4, "a": 0.1, "b": 0.1, "c": 0.1}, 3) == "m;a = b = c (tied)"
    assert metrics.worst_groups_label({"m": 0.4, "a": 0.1, "b": -0.2}, 2) == "m;a"
    assert metrics.worst_groups_label({"x": 0.3 - 0.1, "y": 0.4 - 0.2}) == "x = y (tied)"  # equal up to float noise
    assert metrics.worst_groups_label({}) == "n/a"
    recs = [{"n_options": 2, "pred": 0}] * 10
    assert metrics.chance_flag(0.5, recs) == (approx(0.5), "collapsed: every prediction is option 0")
    mixed = [{"n_options": 4, "pred": i % 4} for i in range(100)]           # chance 25%, 2 se = 8.66 points
    assert metrics.chance_flag(0.30, mixed)[1] == "within 2 standard errors of chance"
    assert metrics.chance_flag(0.40, mixed) == (approx(0.25), None)

    root = tmp_path
    runs, out = str(root / "runs"), str(root / "out")
    collapsed_runs(runs)
    r = run_cli("--runs", runs, "--out", out, "--n_boot", "50")
    assert r.returncode == 0, r.stderr
    b = pd.read_csv(os.path.join(out, "biased_forgetting.csv")).iloc[0]
    assert b.worst_group == "asian = black = muslim (tied)" and b.worst_3_groups == "asian = black = muslim (tied)"
    assert b["wg_forgetting (%)"] == approx(50.0)
    c = pd.read_csv(os.path.join(out, "chance.csv"))
    row = c[(c.run == "toxigen-arc") & (c.task == "toxigen")].iloc[0]
    assert bool(row.at_chance) and row.why == "collapsed: every prediction is option 0"
    assert row["acc (%)"] == approx(50.0) and row["chance (%)"] == approx(50.0)
    assert not c[(c.run == "toxigen") & (c.task == "toxigen")].at_chance.iloc[0]   # theta_A at 100%
    rep = open(os.path.join(out, "report.md")).read()
    sec = rep[rep.index("## Accuracies at chance level"):]
    assert "| toxigen-arc | toxigen->arc | 0 | toxigen | 10 | 50.00 | 50.00 | collapsed" in sec
    assert "asian = black = muslim (tied)" in rep


def test_units_in_headers(refused_out):
    _, out, _ = refused_out
    head = lambda f: list(pd.read_csv(os.path.join(out, f), nrows=0).columns)
    assert "forgetting (%)" in head("forgetting_by_group.csv") and "acc_first (%)" in head("forgetting_by_group.csv")
    assert {"forgetting (%)", "biased_forgetting_max (%)", "biased_forgetting_top3 (%)",
            "forgetting_ci_low (%)"} <= set(head("biased_forgetting.csv"))
    assert "forgetting (%)" in head("figure5.csv") and "rel_forgetting_cap (%)" in head("figure2.csv")
    assert {"acc (%)", "val_acc (%)", "n_seeds"} <= set(head("first_task_acc_by_lr.csv"))
    assert "n_seeds (%)" not in head("biased_forgetting.csv") and "tau_b" in head("kendall_tau.csv")
    rep = open(os.path.join(out, "report.md")).read()
    assert "| first_task | second_task | n_seeds | forgetting (%) |" in rep


def test_replay_fraction_units(tmp_path):
    """replay_summary.json's "fraction" is a fraction in [0, 1]; without a "units" string, or outside [0, 1],
    the summary (points) is left out with a problem, never read in the wrong unit."""
    runs = str(tmp_path / "runs")
    build_runs(runs)
    pts = [_point("fraction0", "fraction", 0, 0, 0, 0.5, 0.7, 0.4, 0.0),
           _point("fraction5", "fraction", 5, 10, 3, 0.85, 0.65, 0.05, -0.05)]
    for seed, units in ((0, None), (1, REPLAY_UNITS)):
        d = os.path.join(runs, "replay", f"seed{seed}")
        os.makedirs(d)
        s = {"task_a": "toxigen", "task_b": "arc", "model_run_id": _id(runs, S2.format("toxigen-arc", seed)),
             "first_stage": {"acc_a": 0.9},
             "settings": {"batch_size": 4, "seed": seed}, "points": pts}
        with open(os.path.join(d, "replay_summary.json"), "w") as f:
            json.dump({**s, **({"units": units} if units else {})}, f)
    rows, probs, _, _ = replay.replay_rows(metrics.build_study(runs))
    assert any('seed0' in p and 'no "units" string' in p for p in probs)
    assert any("seed1" in p and "fraction 5 not in [0, 1]" in p for p in probs)
    assert [(r["seed"], r["fraction"]) for r in rows] == [(1, 0.0)]


def test_long_chain_and_mitigation_refuse_incomparable_evaluations(tmp_path):
    runs = str(tmp_path / "runs")
    build_runs(runs)
    t1 = _id(runs, "stage1", "toxigen", "lr1e-05", "seed0")
    lc = os.path.join(runs, "longchain", "seed0")
    ab = write_run(os.path.join(lc, "2-arc"), ["toxigen", "arc"], LR, 0, t1, steps=11)
    write_eval(os.path.join(lc, "2-arc"), {"toxigen": [2, 3, 1], "arc": [7], "csqa": [5]}, samples=False)
    write_run(os.path.join(lc, "3-csqa"), ["toxigen", "arc", "csqa"], LR, 0, ab)
    write_eval(os.path.join(lc, "3-csqa"), {"toxigen": [2, 2, 1], "arc": [6], "csqa": [9]}, samples=False)
    _edit_json(os.path.join(lc, "3-csqa", "eval.json"), lambda ev: ev["tasks"]["arc"].update(split="validation"))
    d = os.path.join(runs, "mitigation", "l2")
    write_run(d, ["toxigen", "arc"], LR, 0, t1, config={"lr": LR, "seed": 0, "l2_to_init": 0.1})
    write_eval(d, {"toxigen": [4, 3, 2], "arc": [8]}, samples=False)
    _edit_json(os.path.join(d, "eval.json"), lambda ev: ev["tasks"]["toxigen"].update(n=7))
    study = metrics.build_study(runs)
    rows, _ = long_chains.chain_forgetting_rows(study.long_chains)
    arc = next(r for r in rows if r["task"] == "arc")
    assert arc["refused"] and "split 'test' vs 'validation'" in arc["refused"] and arc["forgetting"] != arc["forgetting"]
    tox = [r for r in rows if r["task"] == "toxigen"]
    assert all(r["refused"] is None for r in tox) and tox[-1]["forgetting"] == approx(0.4)   # 90% -> 50%
    mit, _ = mitigation.mitigation_rows(study)
    l2 = next(r for r in mit if r["method"] == "l2")
    assert "n 10 vs 7" in l2["refused"] and l2["forgetting_a"] != l2["forgetting_a"]
    assert mitigation.mitigation_table(mit).set_index("method").loc["l2", "forgetting_a"] == "incomparable"


def test_measured_chains_shared_by_order_and_report(tmp_path):
    """order.py and report.md count the same chains: the mitigated toxigen->arc runs (which forget nothing
    here) are not chains for either, and both reach the same verdict from the same means."""
    runs = str(tmp_path / "runs")
    build_runs(runs)
    t1 = _id(runs, "stage1", "toxigen", "lr1e-05", "seed0")
    for name, cfg in (("mix", {"replay_task": "toxigen", "replay_fraction": 0.5}), ("l2", {"l2_to_init": 1.0})):
        d = os.path.join(runs, "mitigation", name)
        write_run(d, ["toxigen", "arc"], LR, 0, t1, config={"lr": LR, "seed": 0, **cfg})
        write_eval(d, {"toxigen": [4, 3, 2], "arc": [8]})
    assert not metrics.is_measured_chain(json.load(open(os.path.join(runs, "mitigation", "l2", "run.json"))))
    assert metrics.is_measured_chain(json.load(open(os.path.join(runs, S2.format("toxigen-arc", 0), "run.json"))))
    for task, rho in (("toxigen", 5.0), ("arc", 1.0)):
        write_curvature(os.path.join(runs, "curvature", task, "curvature.json"),
                        _id(runs, "stage1", task, "lr1e-05", "seed0"), task, rho)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "order.py"), "--tasks", "toxigen,arc", "--curvature",
                        os.path.join(runs, "curvature"), "--runs", runs, "--out",
                        os.path.join(runs, "results", "order.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "toxigen->arc: +18.33% (n=6)" in r.stdout and "percentage points" in r.stdout   # printed in percent
    oj = json.load(open(os.path.join(runs, "results", "order.json")))
    pair = oj["pairs"][0]
    assert pair["measured"]["toxigen->arc"]["n"] == 6                     # not 8: the mitigated runs left out
    assert pair["measured"]["toxigen->arc"]["forgetting"] == approx(110 / 6 / 100)   # JSON: fractions
    out = str(tmp_path / "out")
    r = run_cli("--runs", runs, "--out", out, "--n_boot", "0")
    assert r.returncode == 0, r.stderr
    o = pd.read_csv(os.path.join(out, "order.csv")).iloc[0]
    assert o.n_xy == 6 and o["forgetting_xy (%)"] == approx(100 * pair["measured"]["toxigen->arc"]["forgetting"],
                                                         abs=1e-3)
    assert o.agrees == pair["agrees"] and o.agrees_order_json == pair["agrees"]
    assert "out of date, re-run order.py" not in open(os.path.join(out, "report.md")).read()


def test_help_and_numeric_flags_checked_before_reading(tmp_path):
    for script in ("metrics.py", "order.py"):
        h = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                           cwd=ROOT)
        assert h.returncode == 0 and "learning rate (> 0)" in " ".join(h.stdout.split())
        parser = (metrics if script == "metrics.py" else order).build_parser()
        assert all(a.help for a in parser._actions), script
    h = " ".join(run_cli("--help").stdout.split())
    assert "(default: 1000)" in h and "(default: 0.95)" in h and "fraction in (0, 1)" in h
    nope = str(tmp_path / "nope")   # a runs folder that does not exist: the flag is refused first
    for flag, value, allowed in (("--n_boot", "-1", ">= 0"), ("--k", "0", "at least 1"), ("--ci", "1.5", "in (0, 1)"),
                                 ("--ci", "0", "in (0, 1)"), ("--lr", "0", "> 0"), ("--boot_seed", "-2", ">= 0")):
        _one_error_line(run_cli("--runs", nope, "--out", str(tmp_path / "o"), flag, value), flag, allowed)
    assert not (tmp_path / "o").exists()
    for args, needle in ((["--lr2", "-1"], "--lr2 must be > 0"), (["--lr", "1e-3"], "pass --runs too")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "order.py"), "--tasks", "toxigen,arc", "--curvature",
                            nope, *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
