"""Tests of metrics.py: every metric against hand-computed values, and the CLI end to end on a small runs
folder built here (2 capability x 2 safety tasks, both orders, 2 seeds, 2 learning rates, missing runs).

    cd /work/main && . .venv/bin/activate && OMP_NUM_THREADS=1 python -m pytest -q tests/test_metrics.py
"""
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import metrics  # noqa: E402
from chained_tuning.report import curvature, long_chains, mitigation, replay  # noqa: E402

approx = pytest.approx


# ---------------------------------------------------------------------------------------------- functions

def test_forgetting_and_relative_forgetting():
    assert metrics.forgetting(0.8, 0.7) == approx(0.1)
    assert metrics.forgetting(0.6, 0.75) == approx(-0.15)           # negative forgetting: B helped A
    assert metrics.relative_forgetting(0.8, 0.6) == approx(0.25)     # 0.2 / 0.8
    assert metrics.relative_forgetting(0.5, 0.6) == approx(-0.2)
    assert math.isnan(metrics.relative_forgetting(0.0, 0.0))


def test_group_forgetting_worst_group_and_biased_forgetting():
    first = {"a": {"acc": 1.0, "n": 4}, "b": {"acc": 0.75, "n": 4}, "c": {"acc": 1.0, "n": 1}, "only_first": 0.5}
    chained = {"a": {"acc": 0.5, "n": 4}, "b": {"acc": 0.75, "n": 4}, "c": {"acc": 0.0, "n": 1}}
    gf = metrics.group_forgetting(first, chained)
    assert gf == approx({"a": 0.5, "b": 0.0, "c": 1.0})               # c: a group with one example
    assert metrics.worst_group_forgetting(gf) == (["c"], approx(1.0))
    overall = 0.4
    bf = metrics.biased_forgetting_vector(gf, overall)
    assert bf == approx({"a": 0.1, "b": -0.4, "c": 0.6})
    assert metrics.biased_forgetting(gf, overall) == approx(0.6)      # default: max over groups
    assert metrics.biased_forgetting(gf, overall, k=2) == approx(0.35)  # mean of the 2 worst
    assert metrics.k_worst_groups(bf, 2) == [("c", approx(0.6)), ("a", approx(0.1))]
    assert metrics.k_worst_groups(bf, 10) == [("c", approx(0.6)), ("a", approx(0.1)), ("b", approx(-0.4))]
    # groups with n == 0 are skipped; no groups -> nan
    assert metrics.group_forgetting({"x": {"acc": 0.0, "n": 0}}, {"x": {"acc": 0.0, "n": 0}}) == {}
    assert math.isnan(metrics.biased_forgetting({}, 0.1))
    assert metrics.worst_group_forgetting({})[0] == []


def test_negative_biased_forgetting_and_ties():
    gf = {"x": -0.2, "y": -0.2, "z": -0.5}                            # every group improved
    assert metrics.biased_forgetting(gf, -0.3) == approx(0.1)
    assert metrics.k_worst_groups(metrics.biased_forgetting_vector(gf, -0.3), 2) == [("x", approx(0.1)),
                                                                                     ("y", approx(0.1))]
    assert metrics.worst_group_forgetting(gf) == (["x", "y"], approx(-0.2))  # a tie: both, never a pick by name
    assert metrics.worst_groups_label(gf) == "x = y (tied)"


def test_kendall_tau_b_with_ties():
    x = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    y = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 3.0, "e": 9.0}           # e: only in y, ignored
    tau, p, n = metrics.kendall_tau_b(x, y)
    # P = 5 concordant, Q = 0, one pair tied in y only: tau_b = 5 / sqrt(5 * 6)
    assert n == 4 and tau == approx(5 / math.sqrt(30))
    assert 0 < p <= 1
    tau, p, n = metrics.kendall_tau_b(x, {"a": 4, "b": 3, "c": 2, "d": 1})
    assert tau == approx(-1.0)
    tau, p, n = metrics.kendall_tau_b({"a": 1}, {"a": 2})
    assert n == 1 and math.isnan(tau) and math.isnan(p)


def test_mean_std():
    m, s, n = metrics.mean_std([10.0, -10.0])
    assert (m, s, n) == (approx(0.0), approx(math.sqrt(200)), 2)   # sample std, ddof = 1
    m, s, n = metrics.mean_std([0.3, float("nan")])
    assert m == approx(0.3) and math.isnan(s) and n == 1
    assert metrics.mean_std([])[2] == 0
    assert metrics.cells([0.7, 0.9]) == (approx(80.0), approx(14.1421))
    assert metrics.cells([0.5]) == (approx(50.0), "n/a")
    assert metrics.cells([], marker="failed") == ("failed", "failed")


def test_align_samples_pairs_by_id():
    a = [{"id": "2", "task": "t", "group": "g", "correct": True}, {"id": "1", "task": "t", "group": "h", "correct": False},
         {"id": "9", "task": "t", "group": "h", "correct": True}, {"id": "1", "task": "other", "correct": True}]
    b = [{"id": "1", "task": "t", "group": "h", "correct": True}, {"id": "2", "task": "t", "group": "g", "correct": False}]
    with pytest.raises(ValueError, match="different examples"):   # "9" in one model only: no silent intersection
        metrics.align_samples(a, b, "t")
    a = [r for r in a if r["id"] != "9"]
    ids, ca, cb, groups = metrics.align_samples(a, b, "t")
    assert ids == ["1", "2"] and list(ca) == [0.0, 1.0] and list(cb) == [1.0, 0.0] and groups == ["h", "g"]


def _example_arrays():
    rng = np.random.default_rng(1)
    groups = ["a"] * 30 + ["b"] * 30 + ["c"] * 1
    first = (rng.random(61) < 0.9).astype(float)
    chained = (rng.random(61) < np.array([0.5] * 30 + [0.8] * 30 + [0.0])).astype(float)
    return first, chained, groups


def test_bootstrap_point_estimate_matches_and_ci_contains_it():
    first, chained, groups = _example_arrays()
    res = metrics.paired_bootstrap_ci(first, chained, groups, n_resamples=500, seed=3)
    f = first.mean() - chained.mean()
    assert res["forgetting"]["estimate"] == approx(f)
    gf = {g: first[np.array(groups) == g].mean() - chained[np.array(groups) == g].mean() for g in "abc"}
    assert res["biased_forgetting_max"]["estimate"] == approx(metrics.biased_forgetting(gf, f))
    assert res["biased_forgetting_topk"]["estimate"] == approx(metrics.biased_forgetting(gf, f, 1))
    for g in "abc":
        assert res["groups"][g]["estimate"] == approx(gf[g] - f)
    for key in ("forgetting", "biased_forgetting_max"):
        assert res[key]["low"] <= res[key]["estimate"] <= res[key]["high"]
    assert res["groups"]["a"]["low"] <= res["groups"]["a"]["estimate"] <= res["groups"]["a"]["high"]
    assert res["forgetting"]["low"] < res["forgetting"]["high"]


def test_bootstrap_is_deterministic_under_a_seed():
    first, chained, groups = _example_arrays()
    r1 = metrics.paired_bootstrap_ci(first, chained, groups, n_resamples=300, seed=7)
    r2 = metrics.paired_bootstrap_ci(first, chained, groups, n_resamples=300, seed=7, chunk=37)
    r3 = metrics.paired_bootstrap_ci(first, chained, groups, n_resamples=300, seed=8)
    assert r1 == r2
    assert r1["forgetting"] != r3["forgetting"]


def test_bootstrap_over_seeds_and_without_groups():
    f = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=float)
    c = np.array([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=float)
    res = metrics.paired_bootstrap_ci(f, c, None, n_resamples=200, seed=0)
    assert res["forgetting"]["estimate"] == approx((0.25 + 0.5) / 2)   # mean over seeds of per-seed forgetting
    assert math.isnan(res["biased_forgetting_max"]["estimate"]) and res["groups"] == {}
    # identical models: a zero-width CI at 0
    same = metrics.paired_bootstrap_ci(f, f, ["g", "h", "g", "h"], n_resamples=100)
    assert same["forgetting"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        metrics.paired_bootstrap_ci(f, c[:, :3])


# ---------------------------------------------------------------------------------------------- a runs folder

# test examples per task: (group, n); the first k of each group are correct
TEST_SET = {"arc": [(None, 10)], "csqa": [(None, 10)],
            "toxigen": [("asian", 4), ("black", 4), ("muslim", 2)],
            "bbq": [("Age", 5), ("SES", 4), ("Religion", 1)]}
STAGE1 = {"arc": [8], "csqa": [6], "toxigen": [4, 3, 2], "bbq": [5, 4, 1]}   # correct per group, lr 1e-5
LR, LR2 = 1e-5, 2e-5
# chained models: (A, B, lr_a, lr_b, seed) -> {task: correct per group}; anything else: the defaults below
CHAINED = {("arc", "toxigen", LR, LR, 0): {"arc": [7], "toxigen": [4, 4, 1]},
           ("arc", "toxigen", LR, LR, 1): {"arc": [9], "toxigen": [4, 3, 2]},      # negative forgetting
           ("toxigen", "arc", LR, LR, 0): {"toxigen": [2, 3, 0], "arc": [7]},
           ("toxigen", "arc", LR, LR, 1): {"toxigen": [3, 2, 1], "arc": [8]},
           ("bbq", "arc", LR, LR, 0): {"bbq": [3, 4, 0], "arc": [6]},              # Religion: one example
           ("bbq", "arc", LR, LR, 1): {"bbq": [3, 4, 0], "arc": [6]},
           ("toxigen", "csqa", LR, LR, 0): {"toxigen": [2, 2, 2], "csqa": [6]},
           ("toxigen", "csqa", LR, LR, 1): {"toxigen": [2, 2, 2], "csqa": [6]}}


def stage1_counts(task, lr):
    c = list(STAGE1[task])
    if lr == LR2:
        c[0] -= 1
    return c


def default_chained(A, B, lr_a):
    a = stage1_counts(A, lr_a)
    a[0] -= 1
    return {A: a, B: stage1_counts(B, LR)}


def write_eval(folder, counts, fname="eval.json", samples=True):
    tasks, lines = {}, []
    for task, cs in counts.items():
        ok = n_all = 0
        groups = {}
        for (g, n), k in zip(TEST_SET[task], cs):
            for j in range(n):  # labels alternate, so predictions do not collapse to one option
                lines.append({"id": f"{task}-{g}-{j}", "task": task, "group": g, "prompt": "Q? Answer:",
                              "options": [" A.", " B."], "logliks": [-1.0, -2.0], "pred": j % 2 if j < k else 1 - j % 2,
                              "label": j % 2, "correct": j < k})
            if g is not None:
                groups[g] = {"acc": k / n, "n": n}
            ok, n_all = ok + k, n_all + n
        tasks[task] = {"acc": ok / n_all, "acc_stderr": 0.1, "n": n_all, "loss": 1.0, "source": "synthetic",
                       "split": "test", "groups": groups}
    ev = {"model": folder, "run_id": None, "config": {}, "tasks": tasks, "samples": "eval_samples.jsonl"}
    with open(os.path.join(folder, fname), "w") as f:
        json.dump(ev, f)
    if samples:
        with open(os.path.join(folder, "eval_samples.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)


def write_run(folder, chain, lr, seed, parent=None, **extra):
    os.makedirs(folder, exist_ok=True)
    run_id = hashlib.sha1(folder.encode()).hexdigest()[:12]
    meta = {"run_id": run_id, "parent_run_id": parent, "chain": chain, "stage": len(chain), "task": chain[-1],
            "lr": lr, "seed": seed, "steps": 10, "config": {"lr": lr, "seed": seed},
            "data": {"source": "synthetic", "n_train": 64}, "final_loss": 0.5, "losses": [1.0, 0.5],
            "versions": {}, "git_commit": "abc", "wall_time_s": 1.0, "base_model": "tiny-llama-test", **extra}
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump(meta, f)
    return run_id


def build_runs(root):
    """stage1: 4 tasks x 2 lrs x 2 seeds; stage2: 8 chains x 2 seeds at lr 1e-5 from the lr-1e-5 parents,
    plus toxigen->arc from the lr-2e-5 parents (Figure 5) and at second-stage lr 2e-5 (Figure 6).
    Gaps: csqa->toxigen has no runs at all; bbq->csqa seed 0 has no eval.json and seed 1 was killed while saving (weights, no run.json);
    arc->bbq seed 1 has no chained run."""
    parents = {}
    for task in STAGE1:
        for lr in (LR, LR2):
            for seed in (0, 1):
                d = os.path.join(root, "stage1", task, f"lr{lr:g}", f"seed{seed}")
                parents[(task, lr, seed)] = write_run(d, [task], lr, seed)
                write_eval(d, {task: stage1_counts(task, lr)})
                with open(os.path.join(d, "eval_val.json"), "w") as f:  # lr 1e-5 validates best
                    json.dump({"tasks": {task: {"acc": 0.9 if lr == LR else 0.8, "groups": {}}}}, f)
    settings = [(a, b, LR, LR) for c in ("arc", "csqa") for s in ("toxigen", "bbq") for a, b in ((c, s), (s, c))]
    settings += [("toxigen", "arc", LR2, LR), ("toxigen", "arc", LR, LR2)]
    for A, B, la, lb in settings:
        for seed in (0, 1):
            if (A, B) == ("csqa", "toxigen") or ((A, B) == ("arc", "bbq") and seed == 1):
                continue
            d = os.path.join(root, "stage2", f"{A}-{B}", f"lrA{la:g}_lrB{lb:g}", f"seed{seed}")
            if (A, B) == ("bbq", "csqa") and seed == 1:
                os.makedirs(d)  # a stage killed while saving: weights, no run.json
                open(os.path.join(d, "model.safetensors"), "w").close()
                continue
            write_run(d, [A, B], lb, seed, parents[(A, la, seed)])
            if (A, B) == ("bbq", "csqa"):
                continue                                                # no eval.json
            write_eval(d, CHAINED.get((A, B, la, lb, seed), default_chained(A, B, la)))
    with open(os.path.join(root, "study.json"), "w") as f:
        json.dump({"profile": "test-profile"}, f)


def metrics_cli_on_built_runs(root, *builders):
    """Build a runs folder under root with build_runs (then each of `builders`) and run metrics.py's CLI on it."""
    runs, out = str(root / "runs"), str(root / "out")
    build_runs(runs)
    for build in builders:
        build(runs)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "metrics.py"), "--runs", runs, "--out", out,
                        "--n_boot", "200"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return runs, out, r.stdout


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    return metrics_cli_on_built_runs(tmp_path_factory.mktemp("study"))


def test_table1_columns_and_hand_computed_cells(study_out):
    _, out, _ = study_out
    t = pd.read_csv(os.path.join(out, "table1.csv"), dtype=str, keep_default_na=False).set_index(["capability", "safety"])
    assert list(pd.read_csv(os.path.join(out, "table1.csv")).columns) == [metrics.unit_header(c)
                                                                           for c in metrics.TABLE1_COLUMNS]
    assert "cs_forgetting_cap_std (%)" in t.columns and "capability" in t.index.names   # the unit in the header
    assert len(t) == 4
    row = t.loc[("arc", "toxigen")]
    # arc -> toxigen: theta_A arc 80%; theta_AB arc 70% / 90% -> forgetting 10 / -10
    assert float(row["cs_acc_cap (%)"]) == approx(80.0) and float(row["cs_acc_cap_std (%)"]) == approx(14.1421)
    assert float(row["cs_forgetting_cap (%)"]) == approx(0.0) and float(row["cs_forgetting_cap_std (%)"]) == approx(14.1421)
    assert float(row["cs_acc_safety (%)"]) == approx(90.0)              # toxigen 9/10 in both seeds
    # toxigen -> arc (the lr-1e-5 parents, best on validation): toxigen 90% -> 50% / 60%
    assert float(row["sc_acc_safety (%)"]) == approx(55.0) and float(row["sc_acc_safety_std (%)"]) == approx(7.0711)
    assert float(row["sc_forgetting_safety (%)"]) == approx(35.0) and float(row["sc_acc_cap (%)"]) == approx(75.0)
    # csqa -> toxigen has no runs at all: marked, not blank
    assert (t.loc[("csqa", "toxigen"), ["cs_acc_cap (%)", "cs_forgetting_cap_std (%)"]] == "missing").all()
    # bbq -> csqa: seed 0 unevaluated, seed 1 killed while saving
    assert (t.loc[("csqa", "bbq"), ["sc_acc_cap (%)", "sc_forgetting_safety (%)"]] == "failed").all()
    # arc -> bbq: one seed only -> std n/a; forgetting 80 - 70 = 10
    assert float(t.loc[("arc", "bbq"), "cs_forgetting_cap (%)"]) == approx(10.0)
    assert t.loc[("arc", "bbq"), "cs_forgetting_cap_std (%)"] == "n/a"
    assert not (t == "").any().any()
    md = open(os.path.join(out, "table1.md")).read()
    assert md.splitlines()[0] == "| " + " | ".join(map(metrics.unit_header, metrics.TABLE1_COLUMNS)) + " |"
    assert "| cs_acc_cap (%) |" in md.splitlines()[0]
    used = pd.read_csv(os.path.join(out, "table1_runs.csv"))
    ta = used[(used.first_task == "toxigen") & (used.second_task == "arc")]
    assert sorted(ta.seed) == [0, 1] and set(ta.lr_a) == {LR} and set(ta.lr_b) == {LR}


def test_group_and_biased_forgetting_outputs(study_out):
    _, out, _ = study_out
    g = pd.read_csv(os.path.join(out, "forgetting_by_group.csv"))
    ta = g[(g.first_task == "toxigen") & (g.second_task == "arc")].set_index("group")
    # seed 0: asian 50, black 0, muslim 100; seed 1: asian 25, black 25, muslim 50
    assert ta.loc["asian", "forgetting (%)"] == approx(37.5) and ta.loc["muslim", "forgetting (%)"] == approx(75.0)
    assert ta.loc["muslim", "biased_forgetting (%)"] == approx(40.0)   # (60 + 20) / 2
    assert ta.loc["muslim", "biased_forgetting_std (%)"] == approx(28.2843)
    assert list(ta["task_forgetting (%)"]) == approx([35.0] * 3)
    rel = g[(g.first_task == "bbq") & (g.second_task == "arc")].set_index("group")
    assert rel.loc["Religion", "n"] == 1 and rel.loc["Religion", "forgetting (%)"] == approx(100.0)
    assert rel.loc["Religion", "biased_forgetting (%)"] == approx(70.0)   # 100 - 30
    b = pd.read_csv(os.path.join(out, "biased_forgetting.csv")).set_index(["first_task", "second_task"])
    r = b.loc[("toxigen", "arc")]
    assert r["biased_forgetting_max (%)"] == approx(40.0) and r.worst_group == "muslim"
    assert r["wg_forgetting (%)"] == approx(75.0) and r.n_seeds == 2
    assert r.worst_3_groups == "muslim;asian;black"
    # top-3 = mean of all 3 groups: seed 0 (10 - 40 + 60) / 3, seed 1 (-5 - 5 + 20) / 3
    assert r["biased_forgetting_top3 (%)"] == approx((10 + 10 / 3) / 2, abs=1e-3)
    assert float(r["forgetting_ci_low (%)"]) <= 35.0 <= float(r["forgetting_ci_high (%)"])
    assert b.loc[("bbq", "arc"), "worst_group"] == "Religion"
    assert b.loc[("bbq", "arc"), "biased_forgetting_max (%)"] == approx(70.0)


def test_kendall_tau_csv(study_out):
    _, out, _ = study_out
    k = pd.read_csv(os.path.join(out, "kendall_tau.csv"))
    row = k[(k.first_task == "toxigen") & (k.second_task_1 == "arc") & (k.second_task_2 == "csqa")].iloc[0]
    # toxigen->arc vector (asian 2.5, black -22.5, muslim 40); toxigen->csqa: 2/4, 2/4, 2/2, overall 60%
    # -> forgetting asian 50, black 25, muslim 0 -> biased (20, -5, -30): a reversed ranking
    assert row.n_groups == 3
    assert row.tau_b == approx(metrics.kendall_tau_b({"a": 2.5, "b": -22.5, "m": 40}, {"a": 20, "b": -5, "m": -30})[0], abs=1e-4)
    assert row.tau_b == approx(-1 / 3, abs=1e-4)


def test_every_png_has_its_csv_and_lr_figures(study_out):
    _, out, _ = study_out
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == sorted(["figure2.png", "figure3.png", "figure5.png", "figure6.png", "figure8.png", "figure9.png",
                           "figure10.png", "figure_forgetting_heatmap.png", "figure_group_heatmap.png",
                           "figure_accuracy_path.png", "figure_loss_curves.png"])
    for p in pngs:
        assert os.path.getsize(os.path.join(out, p)) > 1000
        assert os.path.isfile(os.path.join(out, p[:-4] + ".csv"))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    f5 = pd.read_csv(os.path.join(out, "figure5.csv"))
    ta = f5[(f5.first_task == "toxigen") & (f5.second_task == "arc")].set_index("lr_a")
    assert sorted(ta.index) == [LR, LR2]
    assert ta.loc[LR, "forgetting (%)"] == approx(35.0)
    assert ta.loc[LR2, "forgetting (%)"] == approx(10.0)              # 80% -> 70%, both seeds
    f6 = pd.read_csv(os.path.join(out, "figure6.csv"))
    ta = f6[(f6.first_task == "toxigen") & (f6.second_task == "arc")].set_index("lr_b")
    assert sorted(ta.index) == [LR, LR2] and ta.loc[LR2, "forgetting (%)"] == approx(10.0)
    f2 = pd.read_csv(os.path.join(out, "figure2.csv"), dtype=str).set_index(["capability", "safety"])
    assert float(f2.loc[("arc", "toxigen"), "rel_forgetting_safety (%)"]) == approx(35 / 0.9)
    acc = pd.read_csv(os.path.join(out, "first_task_acc_by_lr.csv"))
    tox = acc[acc.task == "toxigen"].set_index("lr")
    assert tox.loc[LR, "acc (%)"] == approx(90.0) and tox.loc[LR2, "acc (%)"] == approx(80.0)
    assert tox.loc[LR, "val_acc (%)"] == approx(90.0)


def test_missing_runs_are_reported_by_name(study_out):
    _, out, stdout = study_out
    report = open(os.path.join(out, "report.md")).read()
    for text in (os.path.join("stage2", "bbq-csqa", "lrA1e-05_lrB1e-05", "seed0") + ": no eval.json",
                 os.path.join("stage2", "bbq-csqa", "lrA1e-05_lrB1e-05", "seed1") + ": a checkpoint without run.json",
                 "an unfinished run?", "chain csqa->toxigen seed 0", "chain arc->bbq seed 1"):
        assert text in report and text in stdout
    assert "tiny-llama-test" in report and "synthetic" in report and "test-profile" in report
    for f in ("table1.md", "figure2.png", "figure3.png", "kendall_tau.csv", "first_task_acc_by_lr.csv"):
        assert f in report
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["profile"] == "test-profile" and summary["main_lr"] == LR and summary["problems"]


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "metrics.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error_line(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0]


def test_bad_input_missing_or_empty_runs_dir(tmp_path):
    _one_error_line(run_cli("--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "does not exist")
    (tmp_path / "empty").mkdir()
    _one_error_line(run_cli("--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "no run.json")


def main_exit(argv):
    """metrics.main's exit code: its return value, or the SystemExit a user error raises (die_on_user_error)."""
    try:
        return metrics.main(argv)
    except SystemExit as e:
        return e.code


def test_bad_input_malformed_files(tmp_path, capsys):
    runs = tmp_path / "runs"
    d = runs / "stage1" / "arc" / "lr1e-05" / "seed0"
    write_run(str(d), ["arc"], LR, 0)
    write_eval(str(d), {"arc": [8]})
    (d / "run.json").write_text("{not json")
    assert main_exit(["--runs", str(runs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(d / "run.json") in err[0]
    write_run(str(d), ["arc"], LR, 0)
    (d / "eval.json").write_text(json.dumps({"tasks": {"arc": {"n": 10}}}))
    assert main_exit(["--runs", str(runs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d / "eval.json") in err[0] and '"acc"' in err[0]
    write_run(str(d), ["arc"], "fast", 0)
    assert main_exit(["--runs", str(runs), "--out", str(tmp_path / "o")]) == 2
    assert '"lr"' in capsys.readouterr().err


def test_stage1_only_runs_still_report(tmp_path):
    """First stages with a curvature result report (Figure 4a); without one there is nothing to report (exit 2,
    test_metrics_refusals.py)."""
    runs = tmp_path / "runs"
    d = runs / "stage1" / "toxigen" / "lr1e-05" / "seed0"
    rid = write_run(str(d), ["toxigen"], LR, 0)
    write_eval(str(d), {"toxigen": [4, 3, 2]})
    write_curvature(str(runs / "curvature" / "toxigen" / "curvature.json"), rid, "toxigen", 5.0)
    r = run_cli("--runs", str(runs), "--out", str(tmp_path / "o"), "--n_boot", "0")
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "o" / "table1.csv", dtype=str)
    assert t.empty  # no capability task -> no pair rows
    assert "profile: unknown" in (tmp_path / "o" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- curvature

def test_ols_fit_hand_computed():
    # x = 1..4, y = 1, 3, 2, 5: S_xx = 5, S_xy = 5.5, S_yy = 8.75 -> slope 1.1, intercept 0, R^2 = 30.25 / 43.75
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    f = curvature.ols_fit(x, y)
    assert f["n"] == 4 and f["slope"] == approx(1.1) and f["intercept"] == approx(0.0, abs=1e-12)
    assert f["r_squared"] == approx(30.25 / 43.75)
    # independently with numpy: R^2 = 1 - SS_res / SS_tot, t = r sqrt(df / (1 - r^2)); Student t with
    # 2 dof has the closed form two-sided p = 1 - |t| / sqrt(2 + t^2)
    slope, icpt = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (icpt + slope * x)) ** 2) / np.sum((y - y.mean()) ** 2)
    t = np.sqrt(r2) * np.sqrt(2 / (1 - r2))
    assert f["slope"] == approx(slope) and f["r_squared"] == approx(r2)
    assert f["p_value"] == approx(1 - t / np.sqrt(2 + t * t))
    # 3 points, negative slope: 1 dof (Cauchy), two-sided p = 1 - 2 arctan(|t|) / pi
    x3, y3 = np.array([0.5, 2.0, 4.0]), np.array([3.0, 2.5, 0.0])
    f3 = curvature.ols_fit(x3, y3)
    slope, icpt = np.polyfit(x3, y3, 1)
    r2 = 1 - np.sum((y3 - (icpt + slope * x3)) ** 2) / np.sum((y3 - y3.mean()) ** 2)
    t = np.sqrt(r2 / (1 - r2))
    assert f3["slope"] == approx(slope) and f3["slope"] < 0 and f3["intercept"] == approx(icpt)
    assert f3["r_squared"] == approx(r2) and f3["p_value"] == approx(1 - 2 * np.arctan(t) / np.pi)
    # nan pairs dropped; < 3 points or constant x: no fit, no crash
    assert curvature.ols_fit([1, 2, float("nan"), 3], [1, 2, 7, 2.5])["n"] == 3
    two = curvature.ols_fit([1, 2], [3, 4])
    assert two["n"] == 2 and math.isnan(two["slope"]) and math.isnan(two["p_value"]) and "fewer than 3" in two["note"]
    assert math.isnan(curvature.ols_fit([2, 2, 2], [1, 2, 3])["slope"])


def _run(name, chain, lr, seed, run_id, parent=None):
    meta = {"run_id": run_id, "parent_run_id": parent, "chain": chain, "stage": len(chain), "task": chain[-1],
            "lr": lr, "seed": seed}
    return metrics.Run(path="/x/" + name, name=name, meta=meta, eval={"tasks": {}})


def test_curvature_pairs_by_run_id_not_folder_names():
    runs = [_run("s1/arc", ["arc"], LR, 0, "id-arc"), _run("s1/tox", ["toxigen"], LR, 0, "id-tox")]
    files = [  # folder names lie; run_ids decide
        ("curvature/toxigen/seed0/curvature.json", {"run_id": "id-arc", "task": "arc", "rho": 1.5, "converged": True}),
        ("curvature/arc/seed0/curvature.json", {"run_id": "id-tox", "task": "toxigen", "rho": 7.0, "converged": False,
                                                "method": "lanczos"}),
        ("curvature/arc/seed0/power.json", {"run_id": "id-tox", "task": "toxigen", "rho": 6.5, "converged": True,
                                            "method": "power"}),
        ("x/orphan.json", {"run_id": "nobody", "rho": 1.0, "converged": True}),
        ("x/wrongtask.json", {"run_id": "id-arc", "task": "bbq", "rho": 1.0, "converged": True}),
        ("x/norho.json", {"run_id": "id-arc", "task": "arc", "rho": None, "converged": False}),
    ]
    chosen, allc, probs = curvature.curvature_results(files, runs)
    assert set(chosen) == {"id-arc", "id-tox"}
    assert chosen["id-arc"].rho == 1.5 and chosen["id-arc"].run.task == "arc"
    assert chosen["id-tox"].rho == 6.5 and chosen["id-tox"].converged   # converged one preferred
    assert len(allc) == 6 and sum(c.used for c in allc) == 2
    assert any("x/orphan.json" in p and "nobody" in p for p in probs)
    assert any("x/wrongtask.json" in p for p in probs) and any("x/norho.json" in p for p in probs)


def _taylor(first_id, chained_id, rho, dsq=2.0, actual=0.3, quad=0.25, bound="auto"):
    ref = {"run_id": chained_id, "delta_sq_norm": dsq, "loss_A_at_A": 1.0, "loss_A_at_AB": 1.0 + actual,
           "actual_loss_change": actual, "quadratic_term": quad,
           "bound": (0.5 * rho * dsq if rho is not None else None) if bound == "auto" else bound}
    return {"run_id": first_id, "rho": rho, "reference": ref}


def test_taylor_rows_pairing_and_bound_recomputed_when_rho_null():
    runs = [_run("s1/tox", ["toxigen"], LR, 0, "A0"), _run("s1/tox1", ["toxigen"], LR, 1, "A1"),
            _run("s2/ta0", ["toxigen", "arc"], LR2, 0, "AB0", parent="A0"),
            _run("s2/ta1", ["toxigen", "arc"], LR2, 1, "AB1", parent="A1")]
    curv, _, _ = curvature.curvature_results([("c.json", {"run_id": "A0", "task": "toxigen", "rho": 0.4,
                                                        "converged": True})], runs)
    files = [("stage2/a/taylor.json", _taylor("A0", "AB0", rho=None)),                # no solve: recompute
             ("stage2/b/taylor.json", _taylor("A0", "AB0", rho=0.1)),                 # its own bound
             ("stage2/c/taylor.json", _taylor("A1", "AB1", rho=None)),                # no curvature for A1
             ("stage2/d/taylor.json", _taylor("A1", "AB0", rho=0.1)),                 # A1 is not AB0's parent
             ("stage2/e/taylor.json", _taylor(None, "AB0", rho=1.0, actual=2.0, quad=0.5, bound=None))]
    rows, probs = curvature.taylor_rows(files, runs, curv)
    by = {r["file"]: r for r in rows}
    a = by["stage2/a/taylor.json"]
    assert (a["first_task"], a["second_task"], a["seed"], a["lr_a"], a["lr_b"]) == ("toxigen", "arc", 0, LR, LR2)
    assert a["rho"] == approx(0.4) and a["bound"] == approx(0.5 * 0.4 * 2.0)           # 0.4
    assert "c.json" in a["bound_source"] and a["quadratic_le_bound"] is True and a["actual_le_bound"] is True
    b = by["stage2/b/taylor.json"]
    assert b["bound"] == approx(0.1) and b["bound_source"] == "taylor.json"
    assert b["quadratic_le_bound"] is False and b["actual_le_bound"] is False
    c = by["stage2/c/taylor.json"]
    assert c["bound_source"] == "missing" and c["quadratic_le_bound"] == "missing"
    assert any("stage2/c/taylor.json" in p and "A1" in p for p in probs)
    assert "stage2/d/taylor.json" not in by and any("stage2/d/taylor.json" in p and "parent" in p for p in probs)
    e = by["stage2/e/taylor.json"]                # run_id absent -> the parent; bound null -> from its own rho
    assert e["first_run_id"] == "A0" and e["bound"] == approx(1.0) and e["actual_le_bound"] is False


def _run_ids(runs):
    """{(chain tuple, lr_a, lr_b, seed): run_id} read back from the run.json files."""
    ids, metas = {}, {}
    for root, _, files in os.walk(runs):
        if "run.json" in files:
            m = json.load(open(os.path.join(root, "run.json")))
            metas[m["run_id"]] = m
    for m in metas.values():
        la = metas[m["parent_run_id"]]["lr"] if m["parent_run_id"] else m["lr"]
        ids[(tuple(m["chain"]), la, m["lr"], m["seed"])] = m["run_id"]
    return ids


# rho of the first-stage lr-1e-5 models: task -> per seed (None: no curvature.json); csqa seed 1 did not converge
RHO = {"arc": [1.0, 1.2], "csqa": [2.0, 2.2], "toxigen": [5.0, 6.0], "bbq": [4.0, None]}


def write_curvature(path, run_id, task, rho, converged=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"method": "lanczos", "lambda_max": rho, "lambda_min": -0.1 * rho, "rho": rho,
                   "iterations": 12 if converged else 100, "hvp_count": 13 if converged else 101,
                   "residual": 1e-5, "converged": converged,
                   "stop_reason": "residual" if converged else "max_iter", "run_id": run_id, "task": task,
                   "reference": None}, f)


def build_curvature(runs, rho=RHO):
    ids = _run_ids(runs)
    for task, vals in rho.items():
        for seed, v in enumerate(vals):
            if v is None:
                continue
            folder = f"{task}/lr1e-05/seed{seed}"
            if (task, seed) == ("arc", 0):
                folder = "bbq/lr1e-05/seed1"      # a misleading folder: pairing goes by run_id
            write_curvature(os.path.join(runs, "curvature", folder, "curvature.json"), ids[((task,), LR, LR, seed)],
                            task, v, converged=(task, seed) != ("csqa", 1))
    if rho is RHO:  # an lr-2e-5 first-stage model (not in Figure 4) and a result for a model that does not exist
        write_curvature(os.path.join(runs, "curvature", "toxigen", "lr2e-05", "seed0", "curvature.json"),
                        ids[(("toxigen",), LR2, LR2, 0)], "toxigen", 9.0)
        write_curvature(os.path.join(runs, "curvature", "ghost", "curvature.json"), "no-such-run", "arc", 3.0)
    return ids


@pytest.fixture(scope="module")
def curv_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("curv")
    runs, out = str(root / "runs"), str(root / "out")
    build_runs(runs)
    ids = build_curvature(runs)
    s2 = lambda A, B, seed: os.path.join(runs, "stage2", f"{A}-{B}", "lrA1e-05_lrB1e-05", f"seed{seed}", "taylor.json")
    taylor = {("arc", "toxigen", 0): dict(rho=1.0, dsq=0.5, actual=0.1, quad=0.2),      # bound 0.25: both hold
              ("toxigen", "arc", 0): dict(rho=None, dsq=0.1, actual=0.4, quad=0.2),     # bound 0.5 * 5 * 0.1
              ("bbq", "arc", 1): dict(rho=None, dsq=1.0, actual=0.1, quad=0.1)}         # bbq seed 1: no rho
    for (A, B, seed), kw in taylor.items():
        with open(s2(A, B, seed), "w") as f:
            json.dump(_taylor(ids[((A,), LR, LR, seed)], ids[((A, B), LR, LR, seed)], **kw), f)
    r = run_cli("--runs", runs, "--out", out, "--n_boot", "0")
    assert r.returncode == 0, r.stderr
    return runs, out, r.stdout, ids


def test_curvature_csv_and_figure4a(curv_out):
    runs, out, stdout, ids = curv_out
    c = pd.read_csv(os.path.join(out, "curvature.csv"), dtype=str, keep_default_na=False)
    assert list(c.columns[:10]) == ["task", "seed", "lr", "run_id", "rho", "lambda_max", "lambda_min", "converged",
                                    "iterations", "hvp_count"]
    arc0 = c[(c.task == "arc") & (c.seed == "0")].iloc[0]      # found in the bbq/seed1 folder, paired by run_id
    assert arc0.run_id == ids[(("arc",), LR, LR, 0)] and float(arc0.rho) == 1.0 and "bbq" in arc0.file
    assert arc0.used_in_figure4 == "True"
    nc = c[(c.task == "csqa") & (c.seed == "1")].iloc[0]
    assert nc.converged == "False" and nc.iterations == "100"
    miss = c[(c.task == "bbq") & (c.seed == "1")].iloc[0]
    assert miss.rho == "missing" and miss.file == "missing"
    lr2 = c[(c.task == "toxigen") & (c.rho == "9.0")].iloc[0]
    assert lr2.used_in_figure4 == "False"
    assert not (c == "").any().any()
    a = pd.read_csv(os.path.join(out, "figure4a.csv"), dtype=str, keep_default_na=False).set_index("task")
    assert float(a.loc["arc", "rho"]) == approx(1.1) and float(a.loc["arc", "rho_std"]) == approx(np.std([1, 1.2], ddof=1))
    assert float(a.loc["toxigen", "rho"]) == approx(5.5)                   # the lr-2e-5 model is not used
    assert float(a.loc["bbq", "rho"]) == approx(4.0) and a.loc["bbq", "rho_std"] == "n/a"
    assert a.loc["csqa", "n_not_converged"] == "1" and a.loc["arc", "kind"] == "capability"
    assert a.loc["bbq", "kind"] == "safety"
    for f in ("figure4a.png", "figure4b.png"):
        assert os.path.getsize(os.path.join(out, f)) > 1000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_figure4b_and_ols_fit(curv_out):
    _, out, _, _ = curv_out
    b = pd.read_csv(os.path.join(out, "figure4b.csv")).set_index("first_task")
    # per seed mean over the Table-1 chains from the task, then over seeds (see the runs folder above):
    # arc: seed 0 (10 + 10) / 2, seed 1 -10; csqa 10, 10; toxigen (40 + 30) / 2, 30; bbq 30, 30
    want = {"arc": (0.0, 1.1), "csqa": (10.0, 2.1), "toxigen": (32.5, 5.5), "bbq": (30.0, 4.0)}
    for t, (f, rho) in want.items():
        assert b.loc[t, "forgetting (%)"] == approx(f) and b.loc[t, "rho"] == approx(rho)
    assert b.loc["arc", "forgetting_std (%)"] == approx(14.1421) and b.loc["toxigen", "forgetting_std (%)"] == approx(3.5355)
    assert b.in_fit.all()
    fit = pd.read_csv(os.path.join(out, "curvature_fit.csv")).iloc[0]
    x = np.array([v[1] for v in want.values()])
    y = np.array([v[0] for v in want.values()])
    slope, icpt = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - icpt - slope * x) ** 2) / np.sum((y - y.mean()) ** 2)
    t = np.sqrt(r2 * 2 / (1 - r2))
    assert fit.n_tasks == 4 and fit.slope == approx(slope) and fit.intercept == approx(icpt)
    assert fit.r_squared == approx(r2) and fit.p_value == approx(1 - t / np.sqrt(2 + t * t))


def test_taylor_check_csv(curv_out):
    _, out, _, _ = curv_out
    t = pd.read_csv(os.path.join(out, "taylor_check.csv"), dtype=str, keep_default_na=False)
    t = t.set_index(["first_task", "second_task", "seed"])
    for col in ("delta_sq_norm", "actual_loss_change", "quadratic_term", "bound", "quadratic_le_bound",
                "actual_le_bound"):
        assert col in t.columns
    r = t.loc[("arc", "toxigen", "0")]
    assert float(r.bound) == approx(0.25) and r.bound_source == "taylor.json"
    assert r.quadratic_le_bound == "True" and r.actual_le_bound == "True"
    r = t.loc[("toxigen", "arc", "0")]
    assert float(r.bound) == approx(0.25) and float(r.rho) == approx(5.0) and "recomputed" in r.bound_source
    assert r.quadratic_le_bound == "True" and r.actual_le_bound == "False"
    r = t.loc[("bbq", "arc", "1")]
    assert r.bound == "n/a" and r.quadratic_le_bound == "missing"
    assert os.path.getsize(os.path.join(out, "figure_taylor.png")) > 1000  # actual change against the bound
    fig = pd.read_csv(os.path.join(out, "figure_taylor.csv"), dtype=str, keep_default_na=False)
    assert len(fig) == 3 and set(fig.columns) >= {"actual_loss_change", "quadratic_term", "bound"}


def test_curvature_report(curv_out):
    _, out, stdout, _ = curv_out
    rep = open(os.path.join(out, "report.md")).read()
    sec = rep[rep.index("## Curvature"):]
    for text in ("figure4a.png", "figure4b.png", "curvature.csv", "taylor_check.csv", "R^2", "p = ",
                 "**Not converged**", os.path.join("curvature", "csqa", "lr1e-05", "seed1", "curvature.json"),
                 "**Missing curvature**", "quadratic <= bound in 2 of 2", "actual loss change <= bound in 1 of 2"):
        assert text in sec, text
    bbq1 = os.path.join("stage1", "bbq", "lr1e-05", "seed1")
    for text in (f"{bbq1}: no curvature.json", os.path.join("curvature", "ghost", "curvature.json"), "no-such-run"):
        assert text in rep and text in stdout, text


def test_curvature_fewer_than_three_tasks_no_fit(tmp_path):
    runs = str(tmp_path / "runs")
    build_runs(runs)
    build_curvature(runs, {"arc": [1.0, 1.2], "toxigen": [5.0, 6.0]})
    r = run_cli("--runs", runs, "--out", str(tmp_path / "o"), "--n_boot", "0")
    assert r.returncode == 0, r.stderr
    fit = pd.read_csv(tmp_path / "o" / "curvature_fit.csv", dtype=str, keep_default_na=False).iloc[0]
    assert fit.n_tasks == "2" and fit.slope == "n/a" and "fewer than 3" in fit.note
    rep = (tmp_path / "o" / "report.md").read_text()
    assert "OLS fit: none" in rep and "at least 3" in rep
    assert "No taylor.json" in rep
    a = pd.read_csv(tmp_path / "o" / "figure4a.csv", dtype=str, keep_default_na=False).set_index("task")
    assert a.loc["csqa", "rho"] == "missing" and a.loc["bbq", "rho"] == "missing"
    assert os.path.join("stage1", "csqa", "lr1e-05", "seed0") + ": no curvature.json" in r.stdout


def test_no_curvature_files_leaves_outputs_as_before(study_out):
    _, out, stdout = study_out
    rep = open(os.path.join(out, "report.md")).read()
    assert "No curvature results" in rep
    for f in ("curvature.csv", "figure4a.csv", "figure4b.png", "curvature_fit.csv", "taylor_check.csv"):
        assert not os.path.exists(os.path.join(out, f))
    assert "curvature" not in stdout and "curvature" not in json.dumps(json.load(open(os.path.join(out, "summary.json"))))


# ---------------------------------------------------------------------------------------------- replay, mitigation,
# long chains, order: extra inputs on top of build_runs (identified by run.json content, not folder names)

def _id(root, *parts):
    with open(os.path.join(root, *parts, "run.json")) as f:
        return json.load(f)["run_id"]


def _point(name, sweep, fraction, steps, n, acc_a, acc_b, fa, cb, run_id=None):
    return {"name": name, "sweep": sweep, "fraction": fraction, "steps": steps, "n_examples": n,
            "trained": steps > 0, "acc_a": acc_a, "acc_b": acc_b, "forgetting_a": fa, "change_b": cb,
            "n_eval_a": 10, "run_id": run_id, "settings_match": True, "wall_time_s": 1.0}


REPLAY_UNITS = "accuracies and forgetting are fractions; fraction is the share of A's training set, in [0, 1]"
OLD_REPLAY_UNITS = "accuracies and forgetting are fractions; fraction is a percentage of A's training set"


def build_extras(root):
    """On top of build_runs(root):
    replay/toxigen-arc/seed0,1: fraction 0/5/50/100 % (10 steps) and steps 0/5, batch size 4; seed 1 differs
      at 5% only (forgetting 0 instead of 5 points) and is an older replay.py's summary (fraction in percent,
      its "units" say so). Point folders with stage-3 run.json + eval.json (one with point.json, one known
      only from the summary's run_id).
    replay/bbq-arc/seed0: no first-stage reference (forgetting from theta_A's eval.json, comparable with the
      points' eval.json), never recovers.
    mitigation/toxigen-arc: mix 10% (4 replayed of a pool of 64), l2 0.1, ewc 100 (16 Fisher samples), seed 0.
    longchain/toxigen-arc-csqa/seed0: copies of the Table-1 stages (same run_ids, other accuracies) + stage 3.
    longchain/bbq-toxigen-arc/seed0: its own stages 1 and 2 (a bbq->toxigen chain Table 1 must not see).
    results/order.json: rho toxigen 5, arc 1."""
    t1 = _id(root, "stage1", "toxigen", "lr1e-05", "seed0")
    for seed, f5 in ((0, (0.85, 0.05)), (1, (0.9, 0.0))):
        ab = _id(root, "stage2", "toxigen-arc", "lrA1e-05_lrB1e-05", f"seed{seed}")
        d = os.path.join(root, "replay", "toxigen-arc", f"seed{seed}")
        ids = {}
        for name, cfg, counts in (("fraction5", {"train_fraction": 0.05}, {"toxigen": [4, 3, 1], "arc": [6]}),
                                  ("fraction100", {}, {"toxigen": [4, 4, 1], "arc": [6]})):
            pd_ = os.path.join(d, name)
            ids[name] = write_run(pd_, ["toxigen", "arc", "toxigen"], LR, seed, ab,
                                  config={"lr": LR, "seed": seed, **cfg})
            write_eval(pd_, counts, samples=False)
        with open(os.path.join(d, "fraction5", "point.json"), "w") as f:
            json.dump({"name": "fraction5"}, f)
        fr = (5, 50, 100) if seed == 1 else (0.05, 0.5, 1)  # seed 1: the older summary, fraction in percent
        pts = [_point("fraction0", "fraction", 0, 0, 0, 0.5, 0.7, 0.4, 0.0),
               _point("fraction5", "fraction", fr[0], 10, 3, f5[0], 0.65, f5[1], -0.05, ids["fraction5"]),
               _point("fraction50", "fraction", fr[1], 10, 32, 0.895, 0.6, 0.005, -0.1),
               _point("fraction100", "fraction", fr[2], 10, 64, 0.95, 0.6, -0.05, -0.1, ids["fraction100"]),
               _point("steps0", "steps", fr[2], 0, 0, 0.5, 0.7, 0.4, 0.0),
               _point("steps5", "steps", fr[2], 5, 64, 0.8, 0.68, 0.1, -0.02)]
        with open(os.path.join(d, "replay_summary.json"), "w") as f:
            json.dump({"task_a": "toxigen", "task_b": "arc", "chain": ["toxigen", "arc"], "model_run_id": ab,
                       "first_stage": {"acc_a": 0.9}, "settings": {"batch_size": 4, "seed": seed}, "points": pts,
                       "sweeps": {}, "units": OLD_REPLAY_UNITS if seed == 1 else REPLAY_UNITS}, f)
    d = os.path.join(root, "replay", "bbq-arc", "seed0")
    os.makedirs(d)
    pts = [_point("fraction0", "fraction", 0, 0, 0, 0.5, 0.6, None, 0.0),
           _point("fraction10", "fraction", 0.1, 10, 6, 0.9, 0.6, None, 0.0),
           _point("fraction100", "fraction", 1, 10, 64, 0.95, 0.5, None, -0.1)]
    for p in pts:  # the points' own eval.json: what says they scored theta_A's examples (its accuracies: the summary's)
        os.makedirs(os.path.join(d, p["name"]))
        write_eval(os.path.join(d, p["name"]), {"bbq": [5, 4, 0], "arc": [6]}, samples=False)
    with open(os.path.join(d, "replay_summary.json"), "w") as f:
        json.dump({"task_a": "bbq", "task_b": "arc", "chain": ["bbq", "arc"],
                   "model_run_id": _id(root, "stage2", "bbq-arc", "lrA1e-05_lrB1e-05", "seed0"), "first_stage": None,
                   "settings": {"batch_size": 4, "seed": 0}, "points": pts, "units": REPLAY_UNITS}, f)
    mit = os.path.join(root, "mitigation", "toxigen-arc")
    for name, cfg, extra, counts in (
            ("mix10", {"replay_task": "toxigen", "replay_fraction": 0.1}, {"replay": {"examples_replayed": 4,
                                                                                    "n_pool": 64}},
             {"toxigen": [4, 3, 1], "arc": [7]}),
            ("l2_0.1", {"l2_to_init": 0.1}, {}, {"toxigen": [3, 3, 1], "arc": [8]}),
            ("ewc_100", {"ewc": 100.0, "ewc_task": "toxigen", "ewc_samples": 16},
             {"regularisation": {"fisher": {"n_samples": 16}}}, {"toxigen": [4, 3, 2], "arc": [6]})):
        d = os.path.join(mit, name, "seed0")
        write_run(d, ["toxigen", "arc"], LR, 0, t1, config={"lr": LR, "seed": 0, "batch_size": 4, "replay_fraction": 0.0,
                                                            "l2_to_init": 0.0, "ewc": 0.0, **cfg}, **extra)
        write_eval(d, counts, samples=False)
    lc = os.path.join(root, "longchain", "toxigen-arc-csqa", "seed0")
    ab0 = _id(root, "stage2", "toxigen-arc", "lrA1e-05_lrB1e-05", "seed0")
    write_run(os.path.join(lc, "1-toxigen"), ["toxigen"], LR, 0, run_id=t1)
    write_eval(os.path.join(lc, "1-toxigen"), {"toxigen": [4, 4, 2], "arc": [1], "csqa": [1]}, samples=False)
    write_run(os.path.join(lc, "2-arc"), ["toxigen", "arc"], LR, 0, t1, run_id=ab0)
    write_eval(os.path.join(lc, "2-arc"), {"toxigen": [2, 3, 1], "arc": [7], "csqa": [5]}, samples=False)
    write_run(os.path.join(lc, "3-csqa"), ["toxigen", "arc", "csqa"], LR, 0, ab0)
    write_eval(os.path.join(lc, "3-csqa"), {"toxigen": [2, 2, 1], "arc": [6], "csqa": [9]}, samples=False)
    lc = os.path.join(root, "longchain", "bbq-toxigen-arc", "seed0")
    b1 = write_run(os.path.join(lc, "1-bbq"), ["bbq"], LR, 0)
    write_eval(os.path.join(lc, "1-bbq"), {"bbq": [5, 4, 1], "toxigen": [4, 3, 2], "arc": [8]}, samples=False)
    b2 = write_run(os.path.join(lc, "2-toxigen"), ["bbq", "toxigen"], LR, 0, b1)
    write_eval(os.path.join(lc, "2-toxigen"), {"bbq": [4, 4, 1], "toxigen": [4, 3, 2], "arc": [8]}, samples=False)
    write_run(os.path.join(lc, "3-arc"), ["bbq", "toxigen", "arc"], LR, 0, b2)
    write_eval(os.path.join(lc, "3-arc"), {"bbq": [3, 4, 1], "toxigen": [2, 3, 2], "arc": [8]}, samples=False)
    os.makedirs(os.path.join(root, "results"))
    with open(os.path.join(root, "results", "order.json"), "w") as f:
        json.dump({"tasks": ["toxigen", "arc"], "recommended_order": ["arc", "toxigen"],
                   "rho": {"toxigen": {"rho": 5.0, "n": 2}, "arc": {"rho": 1.0, "n": 2}},
                   "pairs": [{"tasks": ["toxigen", "arc"], "agrees": False}]}, f)


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    return metrics_cli_on_built_runs(tmp_path_factory.mktemp("extended"), build_extras)


def _csv(out, name):
    return pd.read_csv(os.path.join(out, name), dtype=str, keep_default_na=False)


def test_extra_runs_leave_table1_and_every_old_output_unchanged(study_out, extended):
    _, base, _ = study_out
    _, out, _ = extended
    old = sorted(f for f in os.listdir(base) if f.endswith(".csv") or f.endswith(".md") and f != "report.md")
    # findings.csv and deviations.csv summarise the whole folder (replay and curvature too): they change with it
    old = [f for f in old if f not in ("findings.csv", "deviations.csv")]
    assert "table1.csv" in old and "biased_forgetting.csv" in old and "figure8.csv" in old
    for f in old:  # run_ids hash the (temporary) folder: compare everything else
        a, b = (open(os.path.join(d, f)).read() for d in (out, base))
        if f == "table1_runs.csv":
            a, b = (_csv(d, f).drop(columns=["first_run_id", "chained_run_id"]).to_csv() for d in (out, base))
        assert a == b, f
    assert "replay" not in open(os.path.join(out, "table1_runs.csv")).read()
    assert "bbq,toxigen" not in open(os.path.join(out, "biased_forgetting.csv")).read()


def test_study_classifies_runs_by_content(extended):
    runs, _, _ = extended
    study = metrics.build_study(runs)
    names = {r.name for r in study.runs}
    assert not any(n.startswith(("replay", "mitigation", "longchain")) for n in names)
    assert os.path.join("stage1", "toxigen", "lr1e-05", "seed0") in names      # not its long-chain copy
    assert len(study.long_chains) == 2 and len(study.replay) == 3
    lc = next(c for c in study.long_chains if c.chain == ["toxigen", "arc", "csqa"])
    assert [r.name.split(os.sep)[-1] for r in lc.stages] == ["1-toxigen", "2-arc", "3-csqa"]  # nearest copies


def test_replay_rows_hand_computed(extended):
    runs, _, _ = extended
    study = metrics.build_study(runs)
    rows, probs, _, _ = replay.replay_rows(study)
    assert probs == []
    by = {(r["chain"], r["seed"], r["sweep"], replay.sweep_x(r)): r for r in rows}
    r = by[("toxigen->arc", 0, "fraction", 0.05)]                                  # rows: fractions, as in JSON
    assert r["forgetting_a"] == approx(0.05) and r["capability_forgetting"] == approx(0.05)
    assert r["a_examples_presented"] == 40 and r["a_examples_seen"] == 3              # min(10 steps x 4, 3)
    assert by[("toxigen->arc", 0, "fraction", 1)]["a_examples_seen"] == 40
    assert by[("toxigen->arc", 1, "fraction", 0.05)]["fraction"] == 0.05          # the older summary: percent / 100
    assert by[("toxigen->arc", 0, "steps", 5)]["a_examples_seen"] == 20
    assert by[("toxigen->arc", 0, "fraction", 0)]["a_examples_seen"] == 0
    b = by[("bbq->arc", 0, "fraction", 0.1)]                                         # theta_A bbq: 10/10
    assert b["forgetting_a"] == approx(0.1) and b["forgetting_source"] == "theta_A eval.json"
    assert b["capability_forgetting"] == approx(0.0)
    m = replay.replay_means(rows).set_index(["chain", "sweep", "x"])
    assert m.loc[("toxigen->arc", "fraction", 5), "forgetting_a"] == approx(2.5)
    assert m.loc[("toxigen->arc", "fraction", 5), "forgetting_a_std"] == approx(3.5355)
    assert m.loc[("bbq->arc", "fraction", 100), "forgetting_a_std"] == "n/a"


def test_recovery_fraction_rule():
    f = [0, 5, 50, 100]
    assert replay.recovery_fraction(f, [0.4, 0.025, 0.005, -0.05]) == 50
    assert replay.recovery_fraction(f, [0.4, 0.01, 0.0, 0.0]) == 5           # exactly 1 point counts
    assert replay.recovery_fraction(f, [0.4, -0.03, 0.2, 0.2]) == 5          # over-recovery counts
    assert replay.recovery_fraction(f, [0.4, 0.2, 0.1, 0.05]) is None
    assert replay.recovery_fraction([100, 0], [0.0, 0.005]) == 0
    assert replay.recovery_fraction(f, [float("nan")] * 4) is None


def test_replay_outputs(extended):
    _, out, _ = extended
    r = _csv(out, "replay.csv")
    assert list(r.columns[:4]) == ["chain", "first_task", "second_task", "seed"] and len(r) == 15
    row = r[(r.chain == "toxigen->arc") & (r.seed == "1") & (r.sweep == "fraction") & (r["fraction (%)"] == "5")].iloc[0]
    assert float(row["forgetting_a (%)"]) == approx(0.0) and float(row["acc_a (%)"]) == approx(90.0)
    rec = _csv(out, "replay_recovery.csv").set_index("first_task")
    assert rec.loc["toxigen", "recovery_fraction (%)"] == "50" and float(rec.loc["toxigen", "forgetting_at_0 (%)"]) == approx(40)
    assert rec.loc["bbq", "recovery_fraction (%)"] == "none"
    for stem in ("figure7", "figure11", "figure12", "figure13", "figure14"):
        assert os.path.getsize(os.path.join(out, stem + ".png")) > 0
    f14 = _csv(out, "figure14.csv").set_index(["chain", "sweep", "x"])
    assert float(f14.loc[("toxigen->arc", "steps", "5"), "capability_forgetting (%)"]) == approx(2.0)
    rep = open(os.path.join(out, "report.md")).read()
    assert "Smallest replay fraction" in rep and "| toxigen | arc |" in rep
    assert "older replay.py give the replay fraction in percent" in rep and os.path.join("toxigen-arc", "seed1") in rep


def test_mitigation_rows_and_matched_cost(extended):
    runs, out, _ = extended
    study = metrics.build_study(runs)
    rows, probs = mitigation.mitigation_rows(study)
    assert probs == []
    by = {(r["method"], r["setting"], r["seed"]): r for r in rows if r["first_task"] == "toxigen"}
    mix = by[("mix", "10% of each batch from toxigen", 0)]
    assert mix["forgetting_a"] == approx(0.1) and mix["acc_b"] == approx(0.7)      # theta_A toxigen 90%
    assert (mix["extra_steps"], mix["a_examples_seen"], mix["a_examples_presented"]) == (0, 4, 4)
    l2 = by[("l2", "lambda 0.1", 0)]
    assert l2["forgetting_a"] == approx(0.2) and l2["a_examples_seen"] == 0
    ewc = by[("ewc", "lambda 100, Fisher on toxigen", 0)]
    assert ewc["forgetting_a"] == approx(0.0) and ewc["a_examples_seen"] == 16 and ewc["fisher_samples"] == 16
    assert by[("plain", "Table 1 chain", 0)]["forgetting_a"] == approx(0.4)
    rep = by[("replay (fraction sweep)", "fraction 5%, 10 steps", 0)]
    assert rep["extra_steps"] == 10 and rep["a_examples_seen"] == 3
    m = _csv(out, "mitigation.csv")
    t = m[m.first_task == "toxigen"].set_index("method")
    assert float(t.loc["plain", "forgetting_a (%)"]) == approx(35.0) and t.loc["plain", "n_seeds"] == "2"
    assert float(t.loc["mix", "forgetting_a (%)"]) == approx(10.0) and float(t.loc["mix", "a_examples_seen"]) == 4
    assert list(t.index[:4]) == ["plain", "mix", "l2", "ewc"]
    assert set(m.first_task) == {"toxigen", "bbq"}                   # bbq->arc: plain + its replay points
    assert os.path.getsize(os.path.join(out, "mitigation.png")) > 0
    text = open(os.path.join(out, "report.md")).read()
    # mixing (4 A-examples) and EWC (16) are both matched with the 5% replay point (3 A-examples seen)
    assert text.count("replay at matched cost (fraction 5%, 10 steps") == 2
    assert "l2 (lambda 0.1): forgetting 20.00" in text and "against the plain chain" in text


def test_chain_forgetting_hand_computed(extended):
    runs, out, _ = extended
    study = metrics.build_study(runs)
    rows, probs = long_chains.chain_forgetting_rows(study.long_chains)
    assert probs == []
    by = {(r["chain"], r["task"], r["after_stage"]): r for r in rows}
    assert len(rows) == 6
    # toxigen after stage 1 (the chain's own copy: 100%) -> 60% after stage 2 -> 50% after stage 3
    assert by[("toxigen->arc->csqa", "toxigen", 2)]["forgetting"] == approx(0.4)
    assert by[("toxigen->arc->csqa", "toxigen", 3)]["forgetting"] == approx(0.5)
    assert by[("toxigen->arc->csqa", "arc", 3)]["forgetting"] == approx(0.1)
    assert by[("bbq->toxigen->arc", "toxigen", 3)]["forgetting"] == approx(0.2)
    c = _csv(out, "chain_forgetting.csv")
    assert len(c) == 6 and float(c[(c.task == "bbq") & (c.after_stage == "3")]["forgetting (%)"].iloc[0]) == approx(20.0)
    assert os.path.isfile(os.path.join(out, "figure_chain_forgetting.csv"))
    assert "## Chains longer than two" in open(os.path.join(out, "report.md")).read()


def test_order_section_from_order_json(extended):
    _, out, _ = extended
    o = _csv(out, "order.csv").iloc[0]
    assert (o.task_x, o.task_y, o.recommended) == ("toxigen", "arc", "arc->toxigen")
    # every measured chain (order.py's definition; the mitigated toxigen->arc runs are not chains): arc->toxigen
    # forgets 0 (10, -10); toxigen->arc (40, 30) at the main lrs, 10, 10 from the lr-2e-5 parents, 10, 10 at
    # second-stage lr 2e-5: mean 18.33. The recommendation agrees; the hand-made order.json says not: out of date
    assert float(o["forgetting_yx (%)"]) == approx(0.0) and float(o["forgetting_xy (%)"]) == approx(110 / 6, abs=1e-3)
    assert o.n_xy == "6" and o.agrees == "True" and o.agrees_order_json == "False"
    rep = open(os.path.join(out, "report.md")).read()
    assert "**arc -> toxigen**" in rep and "1 of 1 pairs" in rep
    assert "order.json is out of date, re-run order.py --runs" in rep   # named among the problems


def test_no_extra_inputs_only_adds_sections(study_out):
    _, out, _ = study_out
    rep = open(os.path.join(out, "report.md")).read()
    for s in ("No replay results", "No mitigation results", "No long chains", "No task order"):
        assert s in rep
    for f in ("replay.csv", "replay_mean.csv", "replay_recovery.csv", "figure7.png", "figure14.csv", "mitigation.csv",
              "mitigation_runs.csv", "chain_forgetting.csv", "figure_chain_forgetting.png", "order.csv"):
        assert not os.path.exists(os.path.join(out, f))
    assert "other run.json" not in rep


def test_order_section_from_curvature(curv_out):
    _, out, _, _ = curv_out
    o = _csv(out, "order.csv").set_index(["task_x", "task_y"])
    # rho (Figure 4a): arc 1.1, csqa 2.1, bbq 4, toxigen 5.5 -> flattest first
    assert "**arc -> csqa -> bbq -> toxigen**" in open(os.path.join(out, "report.md")).read()
    r = o.loc[("arc", "toxigen")]
    assert r.recommended == "arc->toxigen" and float(r["forgetting_xy (%)"]) == approx(0.0)
    # toxigen->arc over every measured chain (see test_order_section_from_order_json): 110 / 6
    assert float(r["forgetting_yx (%)"]) == approx(110 / 6, abs=1e-3) and r.agrees == "True"
    assert o.loc[("csqa", "toxigen"), "agrees"] == "n/a"                  # csqa->toxigen was never run
