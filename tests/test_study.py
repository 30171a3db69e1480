"""run_all.sh (study.py) end to end on a micro setting of the tiny profile (1 capability x 1 safety task, 2
learning rates, 3 steps a stage): every stage runs, the tables come out, a second run skips every
stage, --status shows them done, a stage killed midway is redone alone, and failed stages are named with a
non-zero exit."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT

MICRO = {"CAP": "arc", "SAFE": "toxigen", "LRS": "1e-3 2e-3", "MAIN_LR": "1e-3", "STEPS": "3", "EVAL_LIMIT": "30",
         "VAL_LIMIT": "20", "CURV_SAMPLES": "4", "FIRST_LR_CHAINS": "toxigen-arc", "SECOND_LR_CHAINS": "arc-toxigen",
         "REPLAY_CHAINS": "toxigen-arc", "REPLAY_FRACTIONS": "0,0.05,1", "REPLAY_STEPS": "0,2", "MITIGATION_CHAINS": "toxigen-arc",
         "MITIGATIONS": "mix0.25 l2_0.01 ewc_10", "CHAINS": "toxigen-arc-csqa2",
         "CURV_MEASURES": "trace"}  # the tiny profile's five cost minutes; one shows the study passes them on


def run_all(runs, **env):
    e = {**os.environ, **MICRO, "SKIP_SETUP": "1", "PY": sys.executable, "RUNS": str(runs), "TQDM_DISABLE": "1",
         **env}
    return subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    runs = tmp_path_factory.mktemp("study") / "runs"
    return runs, run_all(runs)


def test_micro_study_runs_every_stage(study):
    runs, r = study
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "study finished" in r.stdout and "FAILED" not in r.stdout
    for t in ("arc", "toxigen"):
        for lr in ("1e-3", "2e-3"):
            d = runs / "stage1" / t / f"lr{lr}" / "seed0"
            assert (d / "run.json").is_file() and (d / "eval.json").is_file() and (d / "eval_val.json").is_file()
    chains = sorted(p.name for p in (runs / "stage2").iterdir())
    assert chains == ["arc-toxigen", "toxigen-arc"]
    # toxigen -> arc from both first-stage lrs (first-lr sweep); arc -> toxigen at both second-stage lrs
    assert len(list((runs / "stage2" / "toxigen-arc").iterdir())) == 2
    assert len(list((runs / "stage2" / "arc-toxigen").iterdir())) == 2
    t1 = pd.read_csv(runs / "results" / "table1.csv")
    assert list(t1[["capability", "safety"]].iloc[0]) == ["arc", "toxigen"]
    assert pd.notna(pd.to_numeric(t1["cs_forgetting_cap (%)"], errors="coerce")).all()
    assert pd.notna(pd.to_numeric(t1["sc_forgetting_safety (%)"], errors="coerce")).all()
    replay = runs / "replay" / "toxigen-arc" / "seed0"
    assert (replay / "replay_summary.json").is_file()
    assert sorted(p.name for p in replay.iterdir() if p.is_dir()) == ["fraction0", "fraction0.05", "fraction1",
                                                                       "steps0", "steps2"]
    assert sorted(p.name for p in (runs / "mitigation" / "toxigen-arc").iterdir()) == ["ewc_10", "l2_0.01", "mix0.25"]
    assert (runs / "longchain" / "toxigen-arc-csqa2" / "seed0" / "3-csqa2" / "eval.json").is_file()
    for t in ("arc", "toxigen"):
        assert len(list((runs / "curvature" / t).glob("lr*/seed0/curvature.json"))) == 1
        curv = json.loads(next((runs / "curvature" / t).glob("lr*/seed0/curvature.json")).read_text())
        assert list(curv["measures"]) == ["rho", "trace"] and curv["measures"]["trace"]["hvp_count"] > 0
    assert len(list((runs / "stage2").glob("*/*/seed0/taylor.json"))) == 2
    assert (runs / "results" / "order.json").is_file()
    for f in ("replay.csv", "replay_recovery.csv", "figure7.png", "mitigation.csv", "chain_forgetting.csv",
              "curvature.csv", "figure4a.png", "taylor_check.csv"):
        assert (runs / "results" / f).is_file(), f
    report = (runs / "results" / "report.md").read_text()
    assert "tiny" in report and "scaled for the tiny model" in report
    assert (runs / "study.json").is_file() and (runs / "logs").is_dir()


def test_second_run_skips_every_stage(study):
    runs, _ = study
    r = run_all(runs)
    assert r.returncode == 0, r.stdout[-2000:]
    started = [line for line in r.stdout.splitlines() if " -> " in line and "done already" not in line
               and "study:" not in line and "base:" not in line and "metrics" not in line
               and "order ->" not in line]  # the summaries rerun every time
    assert started == [], started
    assert r.stdout.count("done already") >= 8


def test_failed_stages_are_named_and_exit_nonzero(tmp_path):
    r = run_all(tmp_path / "runs", DATA_DIR=str(tmp_path / "empty"), LRS="1e-3", FIRST_LR_CHAINS="",
                SECOND_LR_CHAINS="", PROFILE="tiny")
    assert r.returncode == 1
    assert "FAILED: stage1-arc-lr1e-3-seed0" in r.stdout and "not a folder" in r.stdout
    assert "stage(s) failed or were skipped" in r.stdout and not (tmp_path / "runs" / "stage1" / "arc").exists()


def test_status_shows_every_stage_done(study):
    runs, _ = study
    e = {**os.environ, **MICRO, "PY": sys.executable, "RUNS": str(runs)}
    r = subprocess.run([sys.executable, "study.py", "--status"], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    states = r.stdout.splitlines()[-1]
    assert states.startswith("states: done ") and "ready" not in states and "waiting" not in states, states
    assert "done        stage2-toxigen-arc-lrA1e-3-lrB1e-3-seed0 [chain, 0 GPUs; after choose-toxigen-seed0]" in r.stdout


def test_resume_fills_missing_evaluations_and_taylor_checks_and_redoes_a_killed_stage(study):
    """A runs folder with a model but not its evaluation, a curvature.json without a chain's taylor.json
    (an older or interrupted study), or a stage killed midway (no output, its temporary folder left) gets
    exactly the missing files on the next run: the rest is not made again."""
    runs, _ = study
    val = runs / "stage1" / "arc" / "lr2e-3" / "seed0" / "eval_val.json"
    taylor = sorted((runs / "stage2").glob("*/*/seed0/taylor.json"))[0]
    killed = runs / "mitigation" / "toxigen-arc" / "l2_0.01" / "seed0"
    val.unlink()
    taylor.unlink()
    shutil.rmtree(killed)
    stale = killed.parent / ".tmp-seed0-k1ll3d"  # what common.atomic_dir leaves when its process is killed
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a checkpoint")
    r = run_all(runs)
    assert r.returncode == 0, r.stdout[-2000:]
    started = [line.split("] ", 1)[1].split(" -> ")[0] for line in r.stdout.splitlines()
               if " -> " in line and "done already" not in line and "study:" not in line and "base:" not in line
               and "metrics" not in line and "order ->" not in line]
    chain = taylor.parent.parent.parent.name
    assert sorted(started) == sorted(["evalval-stage1-arc-lr2e-3-seed0", f"taylor-{chain}-seed0",
                                      "mitigation-toxigen-arc-l2_0.01-seed0"]), started
    assert val.is_file() and taylor.is_file() and (killed / "eval.json").is_file() and not stale.exists()


def test_mitigation_in_percent_is_refused_before_any_stage(tmp_path):
    r = run_all(tmp_path / "runs", MITIGATIONS="mix5 l2_0.01")
    assert r.returncode == 2 and "'mix5' is not mix<F> with F a fraction in (0, 1]" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs" / "stage1").exists()


def test_saferdialogues_rows_and_curvature_point(tmp_path):
    """SaFeRDialogues as the safety task of a micro-study: generated and judged in both chain orders, its Table 1
    row filled and its first-stage minimum a point of Figure 4b."""
    runs = tmp_path / "runs"
    r = run_all(runs, SAFE="saferdialogues", LRS="1e-3", FIRST_LR_CHAINS="", SECOND_LR_CHAINS="", REPLAY_CHAINS="",
                MITIGATION_CHAINS="", CHAINS="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t1 = pd.read_csv(runs / "results" / "table1.csv")
    row = t1[(t1["capability"] == "arc") & (t1["safety"] == "saferdialogues")]
    assert len(row) == 1
    for col in ("cs_forgetting_cap (%)", "sc_forgetting_safety (%)"):
        assert pd.notna(pd.to_numeric(row[col], errors="coerce")).all(), col
    ev = pd.read_json(runs / "stage1" / "saferdialogues" / "lr1e-3" / "seed0" / "eval_samples.jsonl", lines=True)
    assert {"generation", "toxicity", "safe"} <= set(ev.columns) and len(ev) == 30
    f4b = pd.read_csv(runs / "results" / "figure4b.csv")
    sd = f4b[f4b["first_task"] == "saferdialogues"]
    assert len(sd) == 1 and pd.notna(pd.to_numeric(sd["rho"], errors="coerce")).all()
