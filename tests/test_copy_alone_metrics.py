"""metrics.py copied alone into an empty folder (what users do) writes Table 1, the group tables, Kendall's tau
and Figures 2/3, and names the file each missing section needs; with its two section files beside it, every
section (still without common.py, order.py or tasks.py).

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_copy_alone_metrics.py
"""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd

from test_metrics import ROOT, build_runs

CORE = ["table1.csv", "table1.md", "table1_runs.csv", "forgetting_by_group.csv", "biased_forgetting.csv",
        "kendall_tau.csv", "figure2.png", "figure2.csv", "figure3.png", "figure3.csv", "chance.csv"]


def metrics_in(folder, runs, out, *args):
    """metrics.py run from `folder` (no project file on the import path but those copied there)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, os.path.join(folder, "metrics.py"), "--runs", runs, "--out", out,
                           "--n_boot", "50", *args], capture_output=True, text=True, cwd=folder,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"})


def test_metrics_py_alone_then_with_its_section_files(tmp_path):
    runs = str(tmp_path / "runs")
    build_runs(runs)
    os.makedirs(os.path.join(runs, "results"))
    with open(os.path.join(runs, "results", "order.json"), "w") as f:   # order.py's output: the order section
        json.dump({"tasks": ["toxigen", "arc"], "recommended_order": ["arc", "toxigen"],
                   "rho": {"toxigen": {"rho": 5.0, "n": 2}, "arc": {"rho": 1.0, "n": 2}}, "pairs": []}, f)
    alone, full = tmp_path / "alone", tmp_path / "full"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "metrics.py"), alone)
    r = metrics_in(str(alone), runs, str(tmp_path / "out_alone"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out_alone"
    for f in CORE:
        assert (out / f).is_file(), f
    t = pd.read_csv(out / "table1.csv", dtype=str).set_index(["capability", "safety"])
    assert float(t.loc[("arc", "toxigen"), "sc_forgetting_safety (%)"]) == 35.0     # test_metrics' hand value
    for f in ("replay.csv", "mitigation.csv", "chain_forgetting.csv", "order.csv"):
        assert not (out / f).exists(), f
    report = (out / "report.md").read_text()
    for heading, module in (("Curvature (Figure 4)", "metrics_curvature.py"),
                            ("Replay as a third stage", "metrics_mitigation.py"),
                            ("Chains longer than two", "metrics_mitigation.py"),
                            ("Curvature-guided task order", "metrics_curvature.py")):
        section = report[report.index(f"## {heading}"):].split("\n\n")[1].strip()
        assert section == f"Not in this report: this section needs {module} beside metrics.py.", heading
    assert "needs metrics_curvature.py beside metrics.py" in r.stdout
    assert "needs metrics_mitigation.py beside metrics.py" in r.stdout
    # a bad flag without common.py: still one error line and exit 2, nothing written
    bad = metrics_in(str(alone), runs, str(tmp_path / "out_bad"), "--k", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --k must be at least 1, got 0", bad.stderr
    assert not (tmp_path / "out_bad").exists()

    # with its two section files (still no common.py, order.py or tasks.py): every section
    full.mkdir()
    for f in ("metrics.py", "metrics_curvature.py", "metrics_mitigation.py"):
        shutil.copy(os.path.join(ROOT, f), full)
    r = metrics_in(str(full), runs, str(tmp_path / "out_full"))
    assert r.returncode == 0, r.stderr
    out_full = tmp_path / "out_full"
    assert "needs" not in r.stdout and "Not in this report" not in (out_full / "report.md").read_text()
    report = (out_full / "report.md").read_text()
    assert (out_full / "order.csv").is_file() and "**arc -> toxigen**" in report   # metrics_curvature.py's
    assert "No replay results" in report and "No long chains" in report          # metrics_mitigation.py's
    for f in CORE:   # the core outputs do not depend on the section files
        assert (out / f).read_bytes() == (out_full / f).read_bytes(), f
