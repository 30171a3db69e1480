"""LoRA stages under 2-process FSDP2 (gloo) equal one process: a fresh adapter (lora_A drawn from --seed) with its
built-in evaluation, one anchored by L2 + EWC over the adapter, a --lora_chain merge stage, a --lora_chain continue
stage and a full fine-tuning stage on it, and evaluate.py on the merge chain's adapter folder, all in ONE torchrun
launch. Compared: the losses per step, the run_id, PEFT's adapter files (the same tensor names, values within
float tolerance, the same adapter_config.json and lineage), and the evaluation files; only process 0 opens a weight
file. (replay.py from a LoRA stage takes the same path: its points are these stages and evaluations.)

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_lora_distributed.py   (about 60 s on 2 cores)
"""
import json

import pytest
import torch

from conftest import run_script
from test_distributed import assert_same_eval, assert_same_weights, torchrun, weights

BASE = {"model": "tiny", "task": "toxigen", "steps": 3, "batch_size": 8, "train_size": 64, "seed": 0,
        "lora_r": 4, "lora_alpha": 16, "lr": 1e-3}
# name: (its settings, the stage its --model is; None: the tiny base). Both runs' chains start from the one-process
# stage (two/fresh is compared with it on its own), so that their --model, and with it their run_id, is the same.
STAGES = {
    "fresh": ({"eval_tasks": "toxigen,arc", "eval_limit": 24}, None),
    "anchored": ({"l2_to_init": 5.0, "ewc": 50.0, "ewc_task": "arc", "ewc_samples": 8}, None),
    "merge": ({"task": "arc", "lora_r": 2, "lora_chain": "merge", "eval_tasks": "arc", "eval_limit": 24}, "fresh"),
    # with gradient checkpointing: PEFT's input-grad hook and the checkpointing set on the meta-built modules
    "continue": ({"task": "arc", "lora_r": None, "lora_alpha": None, "lora_chain": "continue",
                  "gradient_checkpointing": "on"}, "fresh"),
    # no LoRA flag: full fine-tuning from the adapter folder merged (a checkpoint folder comes out)
    "full": ({"task": "arc", "lora_r": None, "lora_alpha": None}, "fresh"),
}
ADAPTER_STAGES = [name for name in STAGES if name != "full"]
EVAL = ["--tasks", "toxigen,bbq", "--limit", "30", "--batch_size", "4"]


def configs(one, root):
    return [{**BASE, **extra, "model": str(one / parent) if parent else "tiny", "out": str(root / name)}
            for name, (extra, parent) in STAGES.items()]


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    """Every stage once in this process and once under one torchrun launch of 2 processes (evaluate.py last)."""
    import finetune
    tmp = tmp_path_factory.mktemp("lora_dist")
    one, two = tmp / "one", tmp / "two"
    torch.set_num_threads(1)
    for cfg in configs(one, one):
        finetune.train_stage(cfg)
    launch = configs(one, two) + [{"script": ["evaluate.py", "--model", str(two / "merge"), *EVAL,
                                         "--out", str(two / "eval_cli.json")]}]
    (tmp / "stages.json").write_text(json.dumps(launch))
    torchrun(tmp, "--stages", tmp / "stages.json")
    r = run_script("evaluate.py", "--model", one / "merge", *EVAL, "--out", one / "eval_cli.json",
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp, one, two


@pytest.mark.parametrize("name", ADAPTER_STAGES)
def test_lora_stage_two_processes_equal_one(runs, name):
    _, one, two = runs
    ra, rb = (json.load(open(d / name / "run.json")) for d in (one, two))
    assert ra["run_id"] == rb["run_id"] and (ra["world_size"], rb["world_size"]) == (1, 2)
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-5)
    assert ra["parameters"] == rb["parameters"] and ra["lora"] == rb["lora"]
    # PEFT's folder, written from the gathered shards: the same files, tensor names and configuration
    for f in ("adapter_config.json", "chained_tuning.json"):
        assert json.load(open(one / name / f)) == json.load(open(two / name / f)), f
    assert not (two / name / "model.safetensors").exists()
    # 1e-4 of each tensor's norm, not test_distributed's 1e-5: lora_B starts at zero, so its whole value is
    # Adam's few steps, whose rounding (moments that nearly cancel) no large starting weight dilutes
    assert_same_weights(one / name, two / name, rel=1e-4)
    wa = weights(one / name)
    assert all(".lora_A." in k or ".lora_B." in k for k in wa) and all(t.dtype == torch.float32 for t in wa.values())
    if name != "continue":  # a fresh lora_B starts at zero: nonzero now, the adapter was trained
        assert all(float(t.abs().max()) > 0 for k, t in wa.items() if ".lora_B." in k)
    if name == "anchored":
        ga, gb = ra["regularisation"], rb["regularisation"]
        assert ga["final_penalty"] > 0 and ga["final_penalty"] == pytest.approx(gb["final_penalty"], rel=1e-4)
        assert ga["fisher"]["fisher_sum"] == pytest.approx(gb["fisher"]["fisher_sum"], rel=1e-5)
    if name in ("fresh", "merge"):  # the built-in evaluation: the adapter merged, a whole copy per process
        assert_same_eval(str(one / name / "eval.json"), str(two / name / "eval.json"))


def test_full_stage_from_an_adapter_two_processes_equal_one(runs):
    _, one, two = runs
    ra, rb = (json.load(open(d / "full" / "run.json")) for d in (one, two))
    assert ra["run_id"] == rb["run_id"] and "lora" not in ra and "lora" not in rb
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-5)
    assert ra["parameters"]["trainable"] == ra["parameters"]["total"] == rb["parameters"]["trainable"]
    assert not (two / "full" / "adapter_config.json").exists()
    assert_same_weights(one / "full", two / "full")  # the whole model's weights: test_distributed's rule


def test_fresh_adapter_is_drawn_from_the_seed(runs, tiny_path):
    """The adapter process 0 builds and shares is the one-process draw: lora.start_model with the same --seed,
    read here directly (lora_A: Kaiming-uniform from the seed; lora_B: zeros)."""
    from chained_tuning import lora
    model = lora.start_model(tiny_path, {**BASE, "lora_dropout": 0.0, "lora_targets": None, "lora_chain": None})
    again = lora.start_model(tiny_path, {**BASE, "lora_dropout": 0.0, "lora_targets": None, "lora_chain": None})
    a, b = model.state_dict(), again.state_dict()
    keys = [k for k in a if ".lora_A." in k]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    assert all(float(a[k].abs().max()) > 0 for k in keys)
    meta = lora.start_model_on_meta(tiny_path, {**BASE, "lora_dropout": 0.0, "lora_targets": None,
                                                "lora_chain": None})
    assert lora.trainable_names(meta) == lora.trainable_names(model) and set(meta.state_dict()) == set(a)


def test_evaluate_adapter_two_processes_equal_one(runs):
    _, one, two = runs
    assert_same_eval(str(one / "eval_cli.json"), str(two / "eval_cli.json"))


def test_only_process_zero_reads_weights(runs):
    tmp, _, _ = runs
    read = {r: open(tmp / f"opens.rank{r}").read().split() if (tmp / f"opens.rank{r}").exists() else []
            for r in (0, 1)}
    assert any(p.endswith("adapter_model.safetensors") for p in read[0])  # the chains' adapters, read by process 0
    assert read[1] == [], read[1]
