"""The metrics copy units, each copied into an empty folder and used there (what users do):
chained_tuning/forgetting.py alone (numpy and scipy) gives the paper's forgetting numbers and the same bootstrap as
the repository's copy; metrics.py with the chained_tuning/ folder beside it writes every section of the report,
byte for byte what the repository writes.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_copy_alone_metrics.py
"""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from test_metrics import ROOT, build_runs

from chained_tuning import forgetting

CORE = ["table1.csv", "table1.md", "table1_runs.csv", "forgetting_by_group.csv", "biased_forgetting.csv",
        "kendall_tau.csv", "figure2.png", "figure2.csv", "figure3.png", "figure3.csv", "chance.csv"]


def python_in(folder, *args):
    """Python run in `folder` with no project file on the import path but those copied there (-E: no PYTHONPATH,
    -s: no user site)."""
    return subprocess.run([sys.executable, "-E", "-s", *args], capture_output=True, text=True, cwd=folder,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# toxigen (groups asian 4, black 4, muslim 2 examples; the first k of each group correct): theta_A 4, 3, 2 correct,
# theta_AB seed 0 2, 3, 0 and seed 1 3, 2, 1 (test_metrics' toxigen -> arc chain, Table 1's 35.0)
USE_FORGETTING_ALONE = r"""
import json, sys
import forgetting as f
assert "copy this one file; needs numpy and scipy" in f.__doc__

def correct(counts, sizes=(4, 4, 2)):
    return [float(j < k) for k, n in zip(counts, sizes) for j in range(n)]

groups = ["asian"] * 4 + ["black"] * 4 + ["muslim"] * 2
first = [correct((4, 3, 2))] * 2
chained = [correct((2, 3, 0)), correct((3, 2, 1))]
acc = lambda c, g=None: sum(x for x, gg in zip(c, groups) if g in (None, gg)) / sum(g in (None, gg) for gg in groups)
gf0 = f.group_forgetting({g: {"acc": acc(first[0], g), "n": 1} for g in set(groups)},
                         {g: {"acc": acc(chained[0], g), "n": 1} for g in set(groups)})
f0 = f.forgetting(acc(first[0]), acc(chained[0]))
out = {"paper_example": f.forgetting(0.80, 0.70), "paper_biased": f.biased_forgetting({"a": 0.5, "b": 0.1}, 0.2),
       "relative": f.relative_forgetting(0.8, 0.6), "f0": f0, "gf0": gf0,
       "worst0": f.worst_group_forgetting(gf0), "biased0": f.biased_forgetting(gf0, f0),
       "label": f.worst_groups_label({"asian": 0.5, "black": 0.5, "muslim": 0.1}),
       "tau": f.kendall_tau_b({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3, "c": 2})[0],
       "boot": f.paired_bootstrap_ci(first, chained, groups, n_resamples=200, seed=3),
       "inputs": [first, chained, groups], "file": f.__file__, "loaded": sorted({"pandas", "matplotlib", "torch", "chained_tuning"} & set(sys.modules))}
print(json.dumps(out))
"""


def test_forgetting_py_alone_gives_the_paper_numbers(tmp_path):
    shutil.copy(os.path.join(ROOT, "chained_tuning", "forgetting.py"), tmp_path)
    r = python_in(str(tmp_path), "-c", USE_FORGETTING_ALONE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert os.path.dirname(out["file"]) == str(tmp_path) and out["loaded"] == []
    approx = pytest.approx
    assert out["paper_example"] == approx(0.10) and out["paper_biased"] == approx(0.3)
    assert out["relative"] == approx(0.25)
    assert out["f0"] == approx(0.4) and out["gf0"] == approx({"asian": 0.5, "black": 0.0, "muslim": 1.0})
    assert out["worst0"][0] == ["muslim"] and out["worst0"][1] == approx(1.0) and out["biased0"] == approx(0.6)
    assert out["label"] == "asian = black (tied)" and out["tau"] == approx(1 / 3)
    boot = out["boot"]
    assert boot["forgetting"]["estimate"] == approx(0.35)                        # Table 1's 35.0
    assert boot["biased_forgetting_max"]["estimate"] == approx((0.6 + 0.2) / 2)   # per seed 0.6 and 0.2
    assert boot["groups"]["muslim"]["estimate"] == approx(0.4)
    assert boot["groups"]["black"]["estimate"] == approx((-0.4 - 0.05) / 2)
    # the copy resamples exactly as the repository's module does (floats round-trip through JSON)
    here = forgetting.paired_bootstrap_ci(*out["inputs"], n_resamples=200, seed=3)
    assert json.dumps(here) == json.dumps(boot)


def test_metrics_py_with_the_package_copied_alone(tmp_path):
    runs = str(tmp_path / "runs")
    build_runs(runs)
    os.makedirs(os.path.join(runs, "results"))
    with open(os.path.join(runs, "results", "order.json"), "w") as f:   # order.py's output: the order section
        json.dump({"tasks": ["toxigen", "arc"], "recommended_order": ["arc", "toxigen"],
                   "rho": {"toxigen": {"rho": 5.0, "n": 2}, "arc": {"rho": 1.0, "n": 2}}, "pairs": []}, f)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(os.path.join(ROOT, "metrics.py"), copy)
    shutil.copytree(os.path.join(ROOT, "chained_tuning"), copy / "chained_tuning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    where = python_in(str(copy), "-c", "import chained_tuning.report.write as w; print(w.__file__)")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(copy)), where.stderr

    def metrics_in(folder, out, *args):
        return python_in(folder, os.path.join(folder, "metrics.py"), "--runs", runs, "--out", out, "--n_boot", "50",
                         *args)
    out, repo_out = tmp_path / "out", tmp_path / "repo_out"
    r = metrics_in(str(copy), str(out))
    assert r.returncode == 0, r.stderr
    for f in CORE:
        assert (out / f).is_file(), f
    t = pd.read_csv(out / "table1.csv", dtype=str).set_index(["capability", "safety"])
    assert float(t.loc[("arc", "toxigen"), "sc_forgetting_safety (%)"]) == 35.0     # test_metrics' hand value
    report = (out / "report.md").read_text()
    assert "needs" not in r.stdout and "Not in this report" not in report     # every section is there
    assert (out / "order.csv").is_file() and "**arc -> toxigen**" in report   # the order section
    assert "No replay results" in report and "No long chains" in report      # the replay and long-chain sections
    # the copy writes what the repository writes, byte for byte
    assert metrics_in(ROOT, str(repo_out)).returncode == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(repo_out))
    for f in os.listdir(out):
        assert (out / f).read_bytes() == (repo_out / f).read_bytes(), f
    # a bad flag in the copy: one error line and exit 2, nothing written
    bad = metrics_in(str(copy), str(tmp_path / "out_bad"), "--k", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --k must be at least 1, got 0", bad.stderr
    assert not (tmp_path / "out_bad").exists()
