"""replay.py: both sweeps end to end on the tiny model, the fraction-0 point equal to evaluate.py on theta_AB,
the stage records, forgetting against theta_A, idempotence, checkpoints, bad input."""
import json
import os

import pytest

from conftest import run_script

SMALL = ["--train_size", "32", "--batch_size", "8", "--eval_limit", "20"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_path):
    from finetune import train_stage
    root = tmp_path_factory.mktemp("replay")
    a, ab = str(root / "A"), str(root / "AB")
    ra = train_stage({"model": "tiny", "task": "toxigen", "out": a, "steps": 5, "train_size": 64, "batch_size": 8})
    rab = train_stage({"model": a, "task": "arc", "out": ab, "steps": 3, "train_size": 32, "batch_size": 8})
    return root, a, ab, ra, rab


@pytest.fixture(scope="module")
def sweep(chain):
    root, a, ab, _, _ = chain
    out = root / "out"
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", out, "--fractions", "0,0.25,1",
                   "--steps", "2", "--first_stage", a, *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    # the steps sweep as a second invocation into the same folder (as run_all.sh runs them)
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", out, "--steps_sweep", "0,1,2",
                   "--first_stage", a, *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def load(p):
    return json.load(open(p))


def test_sweeps_summary_and_stage_records(chain, sweep):
    root, a, ab, ra, rab = chain
    out, _ = sweep
    s = load(out / "replay_summary.json")
    assert s["task_a"] == "toxigen" and s["task_b"] == "arc" and s["chain"] == ["toxigen", "arc"]
    pts = {p["name"]: p for p in s["points"]}
    assert list(pts) == ["fraction0", "fraction0.25", "fraction1", "steps0", "steps1", "steps2"]
    assert [pts[n]["fraction"] for n in pts] == [0, 0.25, 1, 1, 1, 1]
    assert [pts[n]["n_examples"] for n in pts] == [0, 8, 32, 0, 32, 32]
    assert not pts["fraction0"]["trained"] and pts["fraction0"]["loss"] is None and pts["fraction0"]["steps"] == 0
    for n in ("fraction0.25", "fraction1", "steps1"):
        run = load(out / n / "run.json")
        assert run["chain"] == ["toxigen", "arc", "toxigen"] and run["stage"] == 3
        assert run["parent_run_id"] == rab["run_id"] and run["run_id"] == pts[n]["run_id"]
        assert run["final_loss"] == pts[n]["loss"] and len(run["losses"]) == pts[n]["steps"]
        assert not (out / n / "model.safetensors").exists() and not (out / n / "config.json").exists()
        ev = load(out / n / "eval.json")
        assert ev["tasks"]["toxigen"]["acc"] == pts[n]["acc_a"] and ev["tasks"]["arc"]["acc"] == pts[n]["acc_b"]
        assert ev["tasks"]["toxigen"]["n"] == 20 and (out / n / "eval_samples.jsonl").is_file()
    assert load(out / "fraction0.25" / "run.json")["data"]["train_info"]["train_fraction"] == 0.25
    # the fraction-1 point at --steps 2 and the 2-step point are one run: evaluated once, one run.json
    assert pts["steps2"]["same_run_as"] == "fraction1" and not (out / "steps2" / "run.json").exists()
    assert pts["steps2"]["acc_a"] == pts["fraction1"]["acc_a"] and pts["steps0"]["same_run_as"] == "fraction0"
    # forgetting against theta_A (evaluated here with the replay settings: its folder has no eval.json)
    ref = load(out / "first_stage_eval.json")["tasks"]["toxigen"]["acc"]
    assert s["first_stage"]["acc_a"] == ref and s["first_stage"]["run_id"] == ra["run_id"]
    for p in s["points"]:
        assert p["forgetting_a"] == pytest.approx(ref - p["acc_a"])
        assert p["change_b"] == pytest.approx(p["acc_b"] - pts["fraction0"]["acc_b"])
        assert p["wall_time_s"] >= 0
    assert set(s["sweeps"]) == {"fraction", "steps"} and s["sweeps"]["steps"]["values"] == [0, 1, 2]
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_zero_point_equals_evaluate_py_on_theta_ab(chain, sweep, tmp_path):
    _, _, ab, _, rab = chain
    out, _ = sweep
    r = run_script("evaluate.py", "--model", ab, "--tasks", "toxigen,arc", "--out", tmp_path / "e.json",
                   "--limit", "20")
    assert r.returncode == 0, r.stderr
    mine, ref = load(out / "fraction0" / "eval.json"), load(tmp_path / "e.json")
    assert mine["tasks"] == ref["tasks"] and mine["run_id"] == ref["run_id"] == rab["run_id"]
    rows = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    assert rows(out / "fraction0" / "eval_samples.jsonl") == rows(tmp_path / "e_samples.jsonl")


def test_rerun_skips_and_adds_points_with_a_checkpoint(chain, sweep):
    _, a, ab, _, _ = chain
    out, _ = sweep
    before = os.path.getmtime(out / "fraction0.25" / "point.json")
    # theta_A's own eval.json, made with the same limit and seed, is used as the reference when present
    r = run_script("evaluate.py", "--model", a, "--tasks", "toxigen", "--out", os.path.join(a, "eval.json"),
                   "--limit", "20")
    assert r.returncode == 0, r.stderr
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", out, "--fractions", "0,0.25,0.5",
                   "--steps", "2", "--first_stage", a, "--save_checkpoints", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fraction0.25: done already" in r.stdout and "1 point(s) to make" in r.stdout
    assert os.path.getmtime(out / "fraction0.25" / "point.json") == before
    assert (out / "fraction0.5" / "model.safetensors").is_file() and (out / "fraction0.5" / "run.json").is_file()
    s = load(out / "replay_summary.json")
    assert [p["name"] for p in s["points"]][:4] == ["fraction0", "fraction0.25", "fraction0.5", "fraction1"]
    assert len(s["points"]) == 7
    assert s["first_stage"]["source"] == os.path.join(os.path.abspath(a), "eval.json")
    assert s["first_stage"]["acc_a"] == load(out / "first_stage_eval.json")["tasks"]["toxigen"]["acc"]
    # the saved checkpoint is the stage: its evaluation by evaluate.py gives the point's accuracies
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "fraction0.5", use_safetensors=True)


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def test_bad_input(chain, sweep, tmp_path):
    root, a, ab, _, _ = chain
    out, _ = sweep
    r = run_script("replay.py", "--model", ab, "--task", "arc", "--out", tmp_path / "o", "--fractions", "0")
    assert one_error_line(r) and "not an earlier task" in r.stderr
    r = run_script("replay.py", "--model", a, "--task", "toxigen", "--out", tmp_path / "o", "--fractions", "0")
    assert one_error_line(r) and "not a chained model" in r.stderr
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", tmp_path / "o", "--fractions", "0,1.5")
    assert one_error_line(r) and "outside [0, 1]" in r.stderr
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", tmp_path / "o")
    assert one_error_line(r) and "nothing to do" in r.stderr
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", tmp_path / "o", "--fractions", "0",
                   "--first_stage", ab)
    assert one_error_line(r) and "is not the toxigen stage" in r.stderr
    # an existing point made with other settings is not silently reused
    r = run_script("replay.py", "--model", ab, "--task", "toxigen", "--out", out, "--fractions", "0.25", "--steps", "2",
                   "--lr", "1e-4", *SMALL)
    assert one_error_line(r) and "exists with other settings" in r.stderr and "lr" in r.stderr
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
