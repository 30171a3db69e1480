"""EXECUTOR=slurm through submitit's local backend (SLURM_CLUSTER=local: the jobs run on this machine, as
submitit's own tests run them) on a micro-study of four 2-step stages: every stage is a job submitted when its
inputs are ready; the driver, killed right after its first submissions, is run again and finds those jobs
instead of submitting them again; the study ends with the same outputs as with the local pool."""
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT

MICRO = {"CAP": "arc", "SAFE": "toxigen", "LRS": "1e-3", "MAIN_LR": "1e-3", "STEPS": "2", "EVAL_LIMIT": "10",
         "VAL_LIMIT": "10", "CURVATURE": "none", "FIRST_LR_CHAINS": "", "SECOND_LR_CHAINS": "", "REPLAY_CHAINS": "",
         "MITIGATION_CHAINS": "", "CHAINS": "", "EXECUTOR": "slurm", "SLURM_CLUSTER": "local", "SLURM_POLL_S": "0.5"}


def test_slurm_executor_survives_its_driver_and_finishes_the_study(tmp_path, tiny_path):
    runs = tmp_path / "runs"
    env = {**os.environ, **MICRO, "RUNS": str(runs), "PY": sys.executable, "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    jobs = runs / "slurm" / "jobs.json"
    driver = subprocess.Popen([sys.executable, "study.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (jobs.is_file() and json.loads(jobs.read_text())) and time.time() - t0 < 120:
        time.sleep(0.2)
    driver.kill()  # as a lost login session would
    driver.wait()
    submitted = json.loads(jobs.read_text())
    assert set(submitted) <= {"stage1-arc-lr1e-3-seed0", "stage1-toxigen-lr1e-3-seed0"} and submitted

    r = subprocess.run([sys.executable, "study.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name, rec in submitted.items():
        assert f"still running: {name} (Slurm job {rec['job_id']}" in r.stdout, r.stdout
        assert f"] {name} -> " not in r.stdout  # found again, not submitted again
    assert "stage2-arc-toxigen-lrA1e-3-lrB1e-3-seed0 -> " in r.stdout and "FAILED" not in r.stdout
    assert json.loads(jobs.read_text()) == {}  # every job accounted for
    for name in ("stage1-arc-lr1e-3-seed0", "stage2-toxigen-arc-lrA1e-3-lrB1e-3-seed0"):
        assert (runs / "logs" / f"{name}.settings.json").is_file()
        assert "finetune" in (runs / "logs" / f"{name}.log").read_text()
    t1 = pd.read_csv(runs / "results" / "table1.csv")
    assert list(t1[["capability", "safety"]].iloc[0]) == ["arc", "toxigen"]
    assert pd.notna(pd.to_numeric(t1["cs_forgetting_cap (%)"], errors="coerce")).all()
    assert any((runs / "slurm").glob("*/*_submitted.pkl"))  # submitit's own job folders, in $RUNS/slurm


def test_a_job_out_of_time_ends_its_stage_and_is_requeued_afresh(tmp_path):
    """submitit calls checkpoint() when the job's time is up, then requeues what it returns."""
    import study
    from chained_tuning.study import executors  # where the job's process keeps its stage's process
    job = study.StageJob([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "s.log"),
                         str(tmp_path / "out"), None, False, 0)
    with open(tmp_path / "s.log", "w") as f:
        executors._STAGE_PROCESS = subprocess.Popen(job.cmd, stdout=f, start_new_session=True)
        again = job.checkpoint()
    assert executors._STAGE_PROCESS.poll() is not None  # the stage's process ended with the job
    assert isinstance(again.function, study.StageJob) and again.function.cmd == job.cmd


def test_a_16_gpu_stage_is_a_two_node_job_under_torchrun(tmp_path, monkeypatch):
    import study
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for srun; nothing is submitted
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    c = study.settings({"PROFILE": "paper", "MODEL": "m", "DATA_DIR": "d", "RUNS": str(tmp_path / "runs"),
                        "EXECUTOR": "slurm", "SLURM_PARTITION": "gpu", "SLURM_ACCOUNT": "lab", "SLURM_TIME": "90",
                        "SLURM_EXTRA": "--qos=high --exclusive", "GPUS_PER_STAGE": "16"})
    pool = study.SlurmPool(c)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=16", "finetune.py", "--bf16"]
    params, nodes = pool.params(study.Stage("stage1-arc-lr1e-5-seed0", "first_stage", "x", cmd, gpus=16))
    pool.ex.update_parameters(**params)
    sbatch = pool.ex._executor._make_submission_file_text("cmd", "uid")
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--partition=gpu", "--account=lab",
                 "--time=90", "--qos=high", "--exclusive", "--cpus-per-task=10", "--signal=USR2@"):
        assert f"#SBATCH {line}" in sbatch, line
    node1 = study.torchrun_across_nodes(cmd, 2, 1, "gpu-node-07", "4242", 8)
    assert node1 == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1",
                     "--nproc_per_node=8", "--master_addr=gpu-node-07", f"--master_port={29500 + 4242 % 2000}",
                     "finetune.py", "--bf16"]
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(study.UserError, match="EXECUTOR=slurm: no srun on this machine"):
        study.SlurmPool(c)
