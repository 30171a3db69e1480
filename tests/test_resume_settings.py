"""A stage output made with other settings than the ones asked for is never taken as done: stage_check.py
on its own (fast), then run_all.sh on a two-task study of 2-step stages (STEPS=2, then 3)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from chained_tuning.study import stage_check
from conftest import ROOT

CMD = ["python", "finetune.py", "--model", "tiny", "--task", "arc", "--lr", "1e-3", "--seed", "0", "--steps", "5",
       "--eval_tasks", "arc", "--eval_limit", "10"]


def with_opt(cmd, flag, value):
    cmd = list(cmd)
    i = cmd.index(flag)
    cmd[i + 1] = value
    return cmd


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    (r / "stage1" / "arc").mkdir(parents=True)
    return r


def made(runs, name, cmd, out=None):
    out = str(out or runs / "stage1" / "arc")
    stage_check.record(str(runs), name, out, cmd + ["--out", out])
    return out


def check(runs, name, out, cmd):
    return stage_check.check(str(runs), name, out, cmd + ["--out", out])


def test_same_settings_match_whatever_the_spelling_and_the_device(runs):
    out = made(runs, "s1", CMD + ["--device", "cpu"])
    same = ["torchrun", "--nproc_per_node=8"] + with_opt(CMD, "--lr", "0.001")[1:] + ["--device", "cuda"]
    assert check(runs, "s1", out, same) == ([], "")


def test_a_changed_setting_names_the_stage_the_setting_and_both_values(runs, capsys):
    out = made(runs, "stage1-arc", CMD)
    rc = stage_check.main(["check", str(runs), "stage1-arc", out, "--", *with_opt(CMD, "--steps", "7"), "--out", out])
    line = capsys.readouterr().out.strip()
    assert rc == stage_check.MISMATCH == 3
    assert line.startswith("stage stage1-arc (") and "--steps was 5 when it was made, this study asks for 7" in line


def test_a_flag_dropped_or_added_is_a_difference(runs):
    out = made(runs, "s1", CMD + ["--bf16"])
    problems, _ = check(runs, "s1", out, CMD)
    assert len(problems) == 1 and "--bf16 was on when it was made, this study asks for (not given)" in problems[0]


def test_a_stage_whose_input_was_made_again_is_not_done(runs):
    parent = runs / "stage1" / "arc"
    (parent / "run.json").write_text(json.dumps({"run_id": "a", "wall_time_s": 1.0}))
    cmd = with_opt(CMD, "--model", str(parent))
    out = made(runs, "s2", cmd, runs / "stage2")
    assert check(runs, "s2", out, cmd) == ([], "")
    (parent / "run.json").write_text(json.dumps({"run_id": "a", "wall_time_s": 2.0}))  # trained again
    problems, _ = check(runs, "s2", out, cmd)
    assert len(problems) == 1 and f"its input {runs}/stage1/arc was made again" in problems[0]


def test_the_chains_a_taylor_check_writes_into_are_no_settings_or_inputs(runs):
    chain = runs / "stage2"
    chain.mkdir()
    (chain / "run.json").write_text("{}")
    curv = ["python", "curvature.py", "--model", "tiny", "--task", "arc", "--samples", "4"]
    out = made(runs, "curv", curv + ["--reference", str(chain), "--taylor_out", "taylor.json"], runs / "c.json")
    (chain / "run.json").write_text('{"made": "again"}')
    assert check(runs, "curv", out, curv) == ([], "")  # a resumed study passes no --reference once taylor.json exists


def test_a_moved_runs_folder_still_matches(runs, tmp_path):
    parent = runs / "stage1" / "arc"
    (parent / "run.json").write_text("{}")
    out = made(runs, "s2", with_opt(CMD, "--model", str(parent)), runs / "stage2")
    moved = tmp_path / "moved"
    shutil.move(str(runs), moved)
    cmd = with_opt(CMD, "--model", str(moved / "stage1" / "arc"))
    assert check(moved, "s2", str(moved / "stage2"), cmd) == ([], "")


def test_an_older_output_without_a_record_is_compared_with_its_run_json(runs):
    out = runs / "stage1" / "arc"
    config = {"model": "tiny", "task": "arc", "lr": 0.001, "seed": 0, "steps": 5, "bf16": False, "eval_tasks": "arc",
              "eval_limit": 10, "out": str(out), "device": None}
    (out / "run.json").write_text(json.dumps({"config": config}))
    assert check(runs, "s1", str(out), CMD) == ([], "no settings record (an older study's output); checked against "
                                                    "its run.json")
    problems, _ = check(runs, "s1", str(out), with_opt(CMD, "--steps", "7"))
    assert problems == [f"stage s1 ({out}): --steps was 5 when it was made (its run.json), this study asks for 7"]


def test_an_older_output_it_cannot_read_is_reported_as_not_checked(runs):
    problems, note = check(runs, "s1", str(runs / "stage1" / "arc"), CMD)
    assert problems == [] and "not checked" in note


# --- run_all.sh ------------------------------------------------------------------------------------------

TWO_TASKS = {"CAP": "arc", "SAFE": "toxigen", "LRS": "1e-3", "MAIN_LR": "1e-3", "EVAL_LIMIT": "10", "VAL_LIMIT": "10",
             "CURVATURE": "none", "FIRST_LR_CHAINS": "", "SECOND_LR_CHAINS": "", "REPLAY_CHAINS": "",
             "MITIGATION_CHAINS": "", "CHAINS": ""}


def run_all(runs, **env):
    e = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the logs' progress lines are checked too
    e = {**e, **TWO_TASKS, "SKIP_SETUP": "1", "PY": sys.executable, "RUNS": str(runs), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)


def steps_of(d):
    return json.loads((d / "run.json").read_text())["config"]["steps"]


def test_changed_steps_stop_the_study_before_any_stage_and_redo_makes_them_again(tmp_path):
    runs = tmp_path / "runs"
    s1 = runs / "stage1" / "arc" / "lr1e-3" / "seed0"
    chain = runs / "stage2" / "toxigen-arc" / "lrA1e-3_lrB1e-3" / "seed0"
    r = run_all(runs, STEPS="2")
    assert "FAILED: stage" not in r.stdout and steps_of(s1) == 2 and steps_of(chain) == 2, r.stdout[-3000:]
    log = (runs / "logs" / "stage1-arc-lr1e-3-seed0.log").read_text()
    assert "\r" not in log and "finetune arc: 2/2 (100%)" in log and ".tmp-" not in log

    # asked again with 3 steps and a new learning rate: nothing runs, not even the new stage
    r = run_all(runs, STEPS="3", LRS="1e-3 2e-3")
    assert r.returncode == 2, r.stdout[-3000:]
    assert "--steps was 2 when it was made, this study asks for 3" in r.stdout
    assert f"stage stage1-arc-lr1e-3-seed0 ({s1})" in r.stdout and "REDO=changed" in r.stdout and "RUNS=" in r.stdout
    started = [x for x in r.stdout.splitlines() if " -> " in x and "study:" not in x and "base:" not in x]
    assert started == [] and not (runs / "stage1" / "arc" / "lr2e-3").exists()
    assert json.loads((runs / "study.json").read_text())["steps"] == 2  # still what the runs are

    r = run_all(runs, STEPS="3", REDO="changed")
    assert "redo (REDO=changed): stage1-arc-lr1e-3-seed0" in r.stdout, r.stdout[-3000:]
    assert "FAILED: stage" not in r.stdout and "STOPPED" not in r.stdout
    assert steps_of(s1) == 3 and steps_of(chain) == 3  # the chain is made again from the new first stage
    assert json.loads((runs / "study.json").read_text())["steps"] == 3
    r = run_all(runs, STEPS="3")
    assert "done already: stage2-toxigen-arc-lrA1e-3-lrB1e-3-seed0" in r.stdout and "STOPPED" not in r.stdout
