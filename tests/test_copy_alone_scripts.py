"""Copy-alone use of the stage scripts: finetune.py, evaluate.py and replay.py copied into an empty folder beside the
package folder chained_tuning/ (what their docstrings name) run there as a user runs them."""
import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT

SMALL = ["--steps", "2", "--train_size", "16", "--batch_size", "4"]


def copy_alone(folder, *scripts):
    folder.mkdir(exist_ok=True)
    for name in scripts:
        shutil.copy(os.path.join(ROOT, name), folder / name)
    shutil.copytree(os.path.join(ROOT, "chained_tuning"), folder / "chained_tuning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def run_in(folder, *args):
    # -E: no PYTHONPATH, so nothing is imported from the repository, only from `folder`
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-E", *map(str, args)], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=600)


def test_finetune_and_evaluate_run_alone(tmp_path, tiny_path):
    train_dir = copy_alone(tmp_path / "train", "finetune.py")
    r = run_in(train_dir, "finetune.py", "--model", "tiny", "--task", "arc", "--out", "s1", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((train_dir / "s1" / "run.json").read_text())["chain"] == ["arc"]

    eval_dir = copy_alone(tmp_path / "eval", "evaluate.py")
    r = run_in(eval_dir, "evaluate.py", "--model", train_dir / "s1", "--tasks", "arc,toxigen", "--limit", "8",
               "--out", "e.json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((eval_dir / "e.json").read_text())
    assert report["chain"] == ["arc"] and {t: v["n"] for t, v in report["tasks"].items()} == {"arc": 8, "toxigen": 8}
    assert (eval_dir / "e_samples.jsonl").is_file()

    # finetune.py with --eval_tasks evaluates the saved model, as evaluate.py does
    shutil.copy(os.path.join(ROOT, "finetune.py"), eval_dir / "finetune.py")
    r = run_in(eval_dir, "finetune.py", "--model", train_dir / "s1", "--task", "csqa2", "--out", "s2", *SMALL,
               "--eval_tasks", "arc", "--eval_limit", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((eval_dir / "s2" / "run.json").read_text())
    assert run["chain"] == ["arc", "csqa2"] and run["parent_run_id"] is not None
    assert json.loads((eval_dir / "s2" / "eval.json").read_text())["tasks"]["arc"]["n"] == 8

    # replay.py finds every part of its sweep in the package (its run: tests/test_replay.py)
    shutil.copy(os.path.join(ROOT, "replay.py"), eval_dir / "replay.py")
    r = run_in(eval_dir, "replay.py", "--help")
    assert r.returncode == 0 and "docs/replay.md" in r.stdout, r.stderr[-2000:]
