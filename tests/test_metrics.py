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
    assert metrics.worst_group_forgetting(gf) == ("c", approx(1.0))
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
    assert metrics.worst_group_forgetting({})[0] is None


def test_negative_biased_forgetting_and_ties():
    gf = {"x": -0.2, "y": -0.2, "z": -0.5}                            # every group improved
    assert metrics.biased_forgetting(gf, -0.3) == approx(0.1)
    assert metrics.k_worst_groups(metrics.biased_forgetting_vector(gf, -0.3), 2) == [("x", approx(0.1)),
                                                                                     ("y", approx(0.1))]
    assert metrics.worst_group_forgetting(gf) == ("x", approx(-0.2))  # tie -> first group name


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
            for j in range(n):
                lines.append({"id": f"{task}-{g}-{j}", "task": task, "group": g, "prompt": "Q? Answer:",
                              "options": [" A.", " B."], "logliks": [-1.0, -2.0], "pred": 0, "label": 0 if j < k else 1,
                              "correct": j < k})
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
    Gaps: csqa->toxigen has no runs at all; bbq->csqa seed 0 has no eval.json and seed 1 failed;
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
                write_run(d, [A, B], lb, seed, parents[(A, la, seed)], status="failed", error="out of memory")
                continue
            write_run(d, [A, B], lb, seed, parents[(A, la, seed)])
            if (A, B) == ("bbq", "csqa"):
                continue                                                # no eval.json
            write_eval(d, CHAINED.get((A, B, la, lb, seed), default_chained(A, B, la)))
    with open(os.path.join(root, "study.json"), "w") as f:
        json.dump({"profile": "test-profile"}, f)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs, out = str(root / "runs"), str(root / "out")
    build_runs(runs)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "metrics.py"), "--runs", runs, "--out", out,
                        "--n_boot", "200"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return runs, out, r.stdout


def test_table1_columns_and_hand_computed_cells(study_out):
    _, out, _ = study_out
    t = pd.read_csv(os.path.join(out, "table1.csv"), dtype=str, keep_default_na=False).set_index(["capability", "safety"])
    assert list(pd.read_csv(os.path.join(out, "table1.csv")).columns) == metrics.TABLE1_COLUMNS
    assert len(t) == 4
    row = t.loc[("arc", "toxigen")]
    # arc -> toxigen: theta_A arc 80%; theta_AB arc 70% / 90% -> forgetting 10 / -10
    assert float(row.cs_acc_cap) == approx(80.0) and float(row.cs_acc_cap_std) == approx(14.1421)
    assert float(row.cs_forgetting_cap) == approx(0.0) and float(row.cs_forgetting_cap_std) == approx(14.1421)
    assert float(row.cs_acc_safety) == approx(90.0)              # toxigen 9/10 in both seeds
    # toxigen -> arc (the lr-1e-5 parents, best on validation): toxigen 90% -> 50% / 60%
    assert float(row.sc_acc_safety) == approx(55.0) and float(row.sc_acc_safety_std) == approx(7.0711)
    assert float(row.sc_forgetting_safety) == approx(35.0) and float(row.sc_acc_cap) == approx(75.0)
    # csqa -> toxigen has no runs at all: marked, not blank
    assert (t.loc[("csqa", "toxigen"), ["cs_acc_cap", "cs_forgetting_cap_std"]] == "missing").all()
    # bbq -> csqa: seed 0 unevaluated, seed 1 failed
    assert (t.loc[("csqa", "bbq"), ["sc_acc_cap", "sc_forgetting_safety"]] == "failed").all()
    # arc -> bbq: one seed only -> std n/a; forgetting 80 - 70 = 10
    assert float(t.loc[("arc", "bbq"), "cs_forgetting_cap"]) == approx(10.0)
    assert t.loc[("arc", "bbq"), "cs_forgetting_cap_std"] == "n/a"
    assert not (t == "").any().any()
    md = open(os.path.join(out, "table1.md")).read()
    assert md.splitlines()[0] == "| " + " | ".join(metrics.TABLE1_COLUMNS) + " |"
    used = pd.read_csv(os.path.join(out, "table1_runs.csv"))
    ta = used[(used.first_task == "toxigen") & (used.second_task == "arc")]
    assert sorted(ta.seed) == [0, 1] and set(ta.lr_a) == {LR} and set(ta.lr_b) == {LR}


def test_group_and_biased_forgetting_outputs(study_out):
    _, out, _ = study_out
    g = pd.read_csv(os.path.join(out, "forgetting_by_group.csv"))
    ta = g[(g.first_task == "toxigen") & (g.second_task == "arc")].set_index("group")
    # seed 0: asian 50, black 0, muslim 100; seed 1: asian 25, black 25, muslim 50
    assert ta.loc["asian", "forgetting"] == approx(37.5) and ta.loc["muslim", "forgetting"] == approx(75.0)
    assert ta.loc["muslim", "biased_forgetting"] == approx(40.0)   # (60 + 20) / 2
    assert ta.loc["muslim", "biased_forgetting_std"] == approx(28.2843)
    assert list(ta.task_forgetting) == approx([35.0] * 3)
    rel = g[(g.first_task == "bbq") & (g.second_task == "arc")].set_index("group")
    assert rel.loc["Religion", "n"] == 1 and rel.loc["Religion", "forgetting"] == approx(100.0)
    assert rel.loc["Religion", "biased_forgetting"] == approx(70.0)   # 100 - 30
    b = pd.read_csv(os.path.join(out, "biased_forgetting.csv")).set_index(["first_task", "second_task"])
    r = b.loc[("toxigen", "arc")]
    assert r.biased_forgetting_max == approx(40.0) and r.worst_group == "muslim"
    assert r.wg_forgetting == approx(75.0) and r.n_seeds == 2
    assert r.worst_3_groups == "muslim;asian;black"
    # top-3 = mean of all 3 groups: seed 0 (10 - 40 + 60) / 3, seed 1 (-5 - 5 + 20) / 3
    assert r.biased_forgetting_top3 == approx((10 + 10 / 3) / 2, abs=1e-3)
    assert float(r.forgetting_ci_low) <= 35.0 <= float(r.forgetting_ci_high)
    assert b.loc[("bbq", "arc"), "worst_group"] == "Religion"
    assert b.loc[("bbq", "arc"), "biased_forgetting_max"] == approx(70.0)


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
    assert pngs == ["figure2.png", "figure3.png", "figure5.png", "figure6.png", "figure8.png"]
    for p in pngs:
        assert os.path.getsize(os.path.join(out, p)) > 1000
        assert os.path.isfile(os.path.join(out, p[:-4] + ".csv"))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    f5 = pd.read_csv(os.path.join(out, "figure5.csv"))
    ta = f5[(f5.first_task == "toxigen") & (f5.second_task == "arc")].set_index("lr_a")
    assert sorted(ta.index) == [LR, LR2]
    assert ta.loc[LR, "forgetting"] == approx(35.0)
    assert ta.loc[LR2, "forgetting"] == approx(10.0)              # 80% -> 70%, both seeds
    f6 = pd.read_csv(os.path.join(out, "figure6.csv"))
    ta = f6[(f6.first_task == "toxigen") & (f6.second_task == "arc")].set_index("lr_b")
    assert sorted(ta.index) == [LR, LR2] and ta.loc[LR2, "forgetting"] == approx(10.0)
    f2 = pd.read_csv(os.path.join(out, "figure2.csv"), dtype=str).set_index(["capability", "safety"])
    assert float(f2.loc[("arc", "toxigen"), "rel_forgetting_safety"]) == approx(35 / 0.9)
    acc = pd.read_csv(os.path.join(out, "first_task_acc_by_lr.csv"))
    tox = acc[acc.task == "toxigen"].set_index("lr")
    assert tox.loc[LR, "acc"] == approx(90.0) and tox.loc[LR2, "acc"] == approx(80.0)
    assert tox.loc[LR, "val_acc"] == approx(90.0)


def test_missing_runs_are_reported_by_name(study_out):
    _, out, stdout = study_out
    report = open(os.path.join(out, "report.md")).read()
    for text in (os.path.join("stage2", "bbq-csqa", "lrA1e-05_lrB1e-05", "seed0") + ": no eval.json",
                 os.path.join("stage2", "bbq-csqa", "lrA1e-05_lrB1e-05", "seed1") + ": failed",
                 "out of memory", "chain csqa->toxigen seed 0", "chain arc->bbq seed 1"):
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


def test_bad_input_malformed_files(tmp_path, capsys):
    runs = tmp_path / "runs"
    d = runs / "stage1" / "arc" / "lr1e-05" / "seed0"
    write_run(str(d), ["arc"], LR, 0)
    write_eval(str(d), {"arc": [8]})
    (d / "run.json").write_text("{not json")
    assert metrics.main(["--runs", str(runs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(d / "run.json") in err[0]
    write_run(str(d), ["arc"], LR, 0)
    (d / "eval.json").write_text(json.dumps({"tasks": {"arc": {"n": 10}}}))
    assert metrics.main(["--runs", str(runs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d / "eval.json") in err[0] and '"acc"' in err[0]
    write_run(str(d), ["arc"], "fast", 0)
    assert metrics.main(["--runs", str(runs), "--out", str(tmp_path / "o")]) == 2
    assert '"lr"' in capsys.readouterr().err


def test_stage1_only_runs_still_report(tmp_path):
    runs = tmp_path / "runs"
    d = runs / "stage1" / "toxigen" / "lr1e-05" / "seed0"
    write_run(str(d), ["toxigen"], LR, 0)
    write_eval(str(d), {"toxigen": [4, 3, 2]})
    r = run_cli("--runs", str(runs), "--out", str(tmp_path / "o"), "--n_boot", "0")
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "o" / "table1.csv", dtype=str)
    assert t.empty  # no capability task -> no pair rows
    assert "profile: unknown" in (tmp_path / "o" / "report.md").read_text()
