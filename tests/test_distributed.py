"""Two gloo processes under torchrun give the one-process result: evaluate.py, finetune.py with --eval_tasks,
--l2_to_init + --ewc and replay mixing, and replay.py; only process 0 reads weight files; and the checkpoint is in
place before its evaluation (a stage killed while evaluating keeps its training)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, run_script

BASE = {"model": "tiny", "task": "toxigen", "steps": 3, "batch_size": 8, "train_size": 64, "seed": 0}
STAGES = {
    # the test split in place on the sharded model; SaFeRDialogues (generated) from the saved checkpoint
    "eval": {"eval_tasks": "toxigen,arc", "eval_limit": 40, "eval_val_tasks": "toxigen,saferdialogues",
             "eval_val_limit": 24},
    "anchored": {"l2_to_init": 5.0, "ewc": 50.0, "ewc_task": "arc", "ewc_samples": 8},
    "mixed": {"replay_task": "arc", "replay_fraction": 0.25},
}
REPLAY = ["--task", "toxigen", "--fractions", "0,0.5", "--steps", "2", "--batch_size", "8", "--train_size", "64",
          "--eval_limit", "30"]
EVAL = ["--model", "tiny", "--tasks", "toxigen,bbq", "--limit", "50", "--batch_size", "4"]


def torchrun(tmp, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "OPENS_LOG": str(tmp / "opens")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "torchrun_driver.py"), *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def weights(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def assert_same_weights(a, b, rel=1e-5):
    """Every tensor within rel of the other in norm (Adam's first steps move each weight by about lr whatever
    its gradient, so an element whose gradient is ~0 differs by rounding alone)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert float((wa[k] - wb[k]).norm()) <= rel * float(wa[k].norm()), k


def assert_same_eval(a, b):
    ea, eb = json.load(open(a)), json.load(open(b))
    assert ea["tasks"].keys() == eb["tasks"].keys()
    for t in ea["tasks"]:
        ra, rb = ea["tasks"][t], eb["tasks"][t]
        assert (ra["acc"], ra["n"], ra["groups"]) == (rb["acc"], rb["n"], rb["groups"]), t
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    sa = [json.loads(x) for x in open(a.replace(".json", "_samples.jsonl"))]
    sb = [json.loads(x) for x in open(b.replace(".json", "_samples.jsonl"))]
    # same order, same predictions (scored tasks) and replies (generated ones)
    assert [(s["id"], s.get("pred"), s.get("generation")) for s in sa] == [(s["id"], s.get("pred"), s.get("generation"))
                                                                          for s in sb]
    for x, y in zip(sa, sb):
        for k in ("logliks", "toxicity", "reference_loglik"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    """Everything once in one process and once under torchrun with 2 processes."""
    import finetune
    tmp = tmp_path_factory.mktemp("dist")
    one, two = tmp / "one", tmp / "two"
    torch.set_num_threads(1)
    for name, extra in STAGES.items():
        finetune.train_stage({**BASE, **extra, "out": str(one / name)})
    finetune.train_stage({**BASE, "model": str(one / "eval"), "task": "arc", "out": str(tmp / "AB")})
    configs = [{**BASE, **extra, "out": str(two / name)} for name, extra in STAGES.items()]
    (tmp / "stages.json").write_text(json.dumps(configs))
    torchrun(tmp, "--stages", tmp / "stages.json")
    torchrun(tmp, "evaluate.py", *EVAL, "--out", two / "eval_cli.json")
    torchrun(tmp, "replay.py", "--model", tmp / "AB", "--out", two / "replay", *REPLAY)
    for script, *args in (("evaluate.py", *EVAL, "--out", one / "eval_cli.json"),
                          ("replay.py", "--model", tmp / "AB", "--out", one / "replay", *REPLAY)):
        r = run_script(script, *args, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
    return tmp, one, two


def test_evaluate_two_processes_equal_one(runs):
    _, one, two = runs
    assert_same_eval(str(one / "eval_cli.json"), str(two / "eval_cli.json"))


@pytest.mark.parametrize("name", list(STAGES))
def test_finetune_two_processes_equal_one(runs, name):
    _, one, two = runs
    ra, rb = (json.load(open(d / name / "run.json")) for d in (one, two))
    assert ra["run_id"] == rb["run_id"] and (ra["world_size"], rb["world_size"]) == (1, 2)
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-5)
    assert_same_weights(one / name, two / name)
    if name == "anchored":
        ga, gb = ra["regularisation"], rb["regularisation"]
        assert ga["final_penalty"] > 0 and ga["final_penalty"] == pytest.approx(gb["final_penalty"], rel=1e-4)
        assert ga["fisher"]["fisher_sum"] == pytest.approx(gb["fisher"]["fisher_sum"], rel=1e-5)
    if name == "mixed":
        assert ra["replay"]["examples_replayed"] == rb["replay"]["examples_replayed"] > 0
    if name == "eval":  # evaluated with the sharded model in memory, as evaluate.py scores the saved one
        for f in ("eval.json", "eval_val.json"):
            assert_same_eval(str(one / name / f), str(two / name / f))


def test_replay_two_processes_equal_one(runs):
    _, one, two = runs
    sa, sb = (json.load(open(d / "replay" / "replay_summary.json")) for d in (one, two))
    assert len(sa["points"]) == len(sb["points"]) == 2
    for pa, pb in zip(sa["points"], sb["points"]):
        assert (pa["name"], pa["run_id"], pa["acc_a"], pa["acc_b"]) == (pb["name"], pb["run_id"], pb["acc_a"], pb["acc_b"])
        assert pa["eval_loss_a"] == pytest.approx(pb["eval_loss_a"], rel=1e-5)
        if pa["trained"]:
            assert pa["loss"] == pytest.approx(pb["loss"], rel=1e-5)


def test_only_process_zero_reads_weights(runs):
    tmp, _, _ = runs
    from chained_tuning.classifier import default_classifier
    judge = os.path.realpath(default_classifier(True))  # the replies' judge (small) is loaded by every process
    read = {r: [p for p in open(tmp / f"opens.rank{r}").read().split() if not os.path.realpath(p).startswith(judge)]
            if (tmp / f"opens.rank{r}").exists() else [] for r in (0, 1)}
    assert any(p.endswith("model.safetensors") for p in read[0])  # the hook sees process 0's reads
    assert read[1] == [], read[1]


def test_killed_evaluation_keeps_the_checkpoint(tiny_path, tmp_path):
    """SIGKILL once training is done and the evaluation has started: the checkpoint is complete and in place."""
    out = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    p = subprocess.Popen([sys.executable, "finetune.py", "--model", "tiny", "--task", "arc", "--steps", "2",
                          "--batch_size", "4", "--out", str(out), "--eval_tasks", "arc,toxigen,bbq,csqa,csqa2"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in p.stdout:
        if line.startswith("evaluate: ") or time.time() > deadline:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / "run.json").is_file() and (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "eval.json").exists()
    r = run_script("evaluate.py", "--model", out, "--tasks", "arc", "--limit", "20", "--out", out / "eval.json")
    assert r.returncode == 0 and (out / "eval.json").is_file(), r.stderr[-2000:]


def test_save_dtype(tiny_path, tmp_path):
    """The base's own dtype by default (float32 for the tiny base); --save_dtype bfloat16 writes bf16 files that
    from_pretrained loads back as bf16, and a chain from them saves bf16 again."""
    import finetune
    from transformers import AutoModelForCausalLM
    finetune.train_stage({**BASE, "steps": 1, "out": str(tmp_path / "f32")})
    finetune.train_stage({**BASE, "steps": 1, "out": str(tmp_path / "b16"), "save_dtype": "bfloat16"})
    assert json.load(open(tmp_path / "f32" / "config.json"))["dtype"] == "float32"
    assert json.load(open(tmp_path / "b16" / "config.json"))["dtype"] == "bfloat16"
    assert {t.dtype for t in weights(tmp_path / "b16").values()} == {torch.bfloat16}
    assert {t.dtype for t in weights(tmp_path / "f32").values()} == {torch.float32}
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "b16", dtype="auto")
    assert m.dtype == torch.bfloat16
    ref = weights(tmp_path / "f32")
    assert finetune.resolve_save_dtype({"save_dtype": "auto"}, str(tmp_path / "b16")) == "bfloat16"
    rb, rf = (json.load(open(tmp_path / d / "run.json")) for d in ("b16", "f32"))
    assert rb["run_id"] != rf["run_id"] and rb["save_dtype"] == "bfloat16" and rf["save_dtype"] == "float32"
    assert rf["optimizer"]["no_weight_decay"].startswith("parameters with fewer than 2 dimensions")
    assert ref  # the float32 stage's weights are readable as saved
