"""METHOD=full|lora|both and the one-GPU profile: the LoRA study's stage commands (a fresh adapter from the base,
the one before merged in every later stage, no Taylor check), the one-GPU dry run's memory and hours at Llama-2-7B
and at Llama-3-8B's shape, the refusals of bad settings, and a micro-study run by both methods end to end (Table 1
per method and their comparison)."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT
from chained_tuning.study import cost_model as cm

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
         "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA3_8B = dict(LLAMA, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256)


def study(env, *args, timeout=300):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **env}
    return subprocess.run([sys.executable, "study.py", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def test_a_lora_study_trains_adapters_and_merges_the_one_before(tmp_path):
    r = study({"PROFILE": "tiny", "METHOD": "lora", "RUNS": str(tmp_path / "runs")}, "--dry_run")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((tmp_path / "runs" / "plan.json").read_text())
    assert plan["method"] == "lora" and plan["lora"] == "--lora_r 8 --lora_alpha 16"
    trained = [s for s in plan["stages"] if "finetune.py" in s.get("cmd", "")]
    assert trained and all("--lora_r 8 --lora_alpha 16" in s["cmd"] for s in trained)
    first = [s for s in trained if s["kind"] == "first_stage"]
    later = [s for s in trained if s["kind"] != "first_stage"]
    assert first and not any("--lora_chain" in s["cmd"] for s in first)
    assert later and all("--lora_chain merge" in s["cmd"] for s in later)
    curv = [s for s in plan["stages"] if s["kind"] == "curvature"]
    assert curv and not any("--reference" in s["cmd"] for s in curv) and not any(
        s["kind"] == "taylor" for s in plan["stages"])
    # the checkpoints are the adapters: 4 bytes a parameter of r 8 on the tiny model's 7 projections x 4 layers
    assert plan["checkpoint_bytes"] < 0.1 * cm.checkpoint_bytes(plan["n_params"], "float32")
    assert "method: lora (--lora_r 8 --lora_alpha 16" in r.stdout


def test_method_both_plans_two_studies(tmp_path):
    r = study({"PROFILE": "tiny", "METHOD": "both", "RUNS": str(tmp_path / "runs")}, "--dry_run")
    assert r.returncode == 0, r.stderr[-2000:]
    full = json.loads((tmp_path / "runs" / "full" / "plan.json").read_text())
    lora = json.loads((tmp_path / "runs" / "lora" / "plan.json").read_text())
    assert full["method"] == "full" and not any("--lora_r" in s.get("cmd", "") for s in full["stages"])
    assert lora["method"] == "lora" and full["totals"]["stages"]["first_stage"] == lora["totals"]["stages"][
        "first_stage"]


@pytest.mark.parametrize("env, message", [
    ({"METHOD": "qlora"}, "METHOD='qlora' is not allowed"),
    ({"METHOD": "lora", "LORA_R": "0"}, "LORA_R='0' is not a whole number >= 1"),
    ({"METHOD": "lora", "LORA_ALPHA": "-1"}, "LORA_ALPHA='-1' is not a number > 0"),
    ({"METHOD": "lora", "LORA_LRS": "1e-3"}, "LORA_LRS is set but LORA_MAIN_LR is not"),
])
def test_bad_method_settings_are_refused_before_anything(tmp_path, env, message):
    r = study({"PROFILE": "tiny", "RUNS": str(tmp_path / "runs"), **env}, "--dry_run")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config, fits_24gb", [(LLAMA, True), (LLAMA3_8B, False)])
def test_one_gpu_profile_plans_memory_and_hours_at_7b_and_8b(tmp_path, config, fits_24gb):
    """LoRA on one GPU: training fits 80 GB with room (the cost model's 85% headroom), one GPU in the local pool;
    on 24 GB Llama-2-7B trains at a smaller micro-batch and Llama-3-8B's bf16 base does not fit."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    r = study({"PROFILE": "one-gpu", "MODEL": str(model), "DATA_DIR": str(tmp_path / "no-data"),
               "RUNS": str(tmp_path / "runs")}, "--dry_run")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((tmp_path / "runs" / "plan.json").read_text())
    rows = {(m["gpu"], m["what"].split(",")[0]): m for m in plan["memory"]}
    train80 = rows[("A100-80GB", "training")]
    assert train80["fits"].startswith("fits") and train80["bytes"] < 0.85 * 80e9
    train24 = rows[("RTX4090-24GB", "training")]
    assert train24["fits"].startswith("fits") == fits_24gb
    assert plan["totals"]["gpu_hours"] > 0 and list(plan["totals"]["wall_hours"])[0] == "local pool, 1 GPUs"
    assert plan["method"] == "lora" and "--lora_r 16 --lora_alpha 32" in plan["lora"]


def test_micro_study_by_both_methods_gives_table1_per_method_and_their_comparison(tmp_path):
    runs = tmp_path / "runs"
    env = {"PROFILE": "tiny", "METHOD": "both", "RUNS": str(runs), "CAP": "arc", "SAFE": "toxigen", "LRS": "1e-3",
           "MAIN_LR": "1e-3", "STEPS": "3", "EVAL_LIMIT": "30", "VAL_LIMIT": "20", "CURVATURE": "none",
           "FIRST_LR_CHAINS": "", "SECOND_LR_CHAINS": "", "REPLAY_CHAINS": "", "MITIGATION_CHAINS": "",
           "CHAINS": "", "SKIP_SETUP": "1", "PY": sys.executable}
    r = study(env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for method in ("full", "lora"):
        t1 = pd.read_csv(runs / method / "results" / "table1.csv")
        assert len(t1) == 1 and (t1["capability"] == "arc").all()
        assert json.loads((runs / method / "study.json").read_text())["method"] == method
    stage = runs / "lora" / "stage2" / "arc-toxigen"
    adapters = list(stage.glob("*/seed0/adapter_config.json"))
    assert adapters and not list(stage.glob("*/seed0/model.safetensors"))
    rows = pd.read_csv(runs / "results" / "methods.csv")
    assert set(zip(rows.first_task, rows.second_task)) == {("arc", "toxigen"), ("toxigen", "arc")}
    findings = pd.read_csv(runs / "results" / "methods_findings.csv")
    assert list(findings.verdict) == ["not testable here", "not testable here"]  # 2 chains: p >= 1/4
    assert "LoRA against full fine-tuning" in r.stdout
