"""LoRA stages through PEFT (chained_tuning/lora.py): finetune -> evaluate -> curvature over the adapter; the merge
chain starts from PEFT's own merge_and_unload; the continue chain trains the same adapter; L2/EWC over the
adapter; the Hessian over adapter parameters against a dense one; bad input (one line, exit 2, nothing written).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_lora.py   (about a minute on 2 cores)
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chained_tuning import lora
from chained_tuning.checkpoint import load_model
from chained_tuning.evaluation import evaluate_checkpoint
from chained_tuning.hessian.reference import answer_loss_sum_ref
from chained_tuning.hessian.spectrum import hessian_spectrum, select_params
from chained_tuning.mitigations import AnchorPenalty
from chained_tuning.training import train_stage
from conftest import run_script

STAGE = {"steps": 3, "train_size": 48, "batch_size": 8, "max_length": 128}


def read(path, name="run.json"):
    with open(os.path.join(path, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def stage_a(tiny_path, tmp_path_factory):
    """A LoRA stage on the tiny base (rank 4, the default targets)."""
    out = str(tmp_path_factory.mktemp("lora") / "toxigen")
    train_stage({"model": "tiny", "task": "toxigen", "out": out, "lora_r": 4, "lora_alpha": 16, **STAGE})
    return out


def test_stage_saves_the_adapter_and_records_its_base(stage_a, tiny_path):
    files = set(os.listdir(stage_a))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run.json"} <= files
    assert not any(f.startswith("model") for f in files)  # the adapter alone, not the base's weights
    run = read(stage_a)
    cfg = read(stage_a, "adapter_config.json")
    assert cfg["base_model_name_or_path"] == os.path.abspath(tiny_path) and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert run["lora"]["base"] == {"path": os.path.abspath(tiny_path), "given": "tiny", "kind": "checkpoint",
                                   "run_id": read(tiny_path, "chained_tuning.json").get("run_id"),
                                   "sha256": lora.weights_sha256(tiny_path)}
    # the default targets: every linear layer but the head, the attention and MLP projections
    assert run["lora"]["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    base = load_model(tiny_path)
    n_base = sum(p.numel() for p in base.parameters())
    # rank 4 on every projection of every layer: 4 * (in + out) per projection
    by_hand = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert run["parameters"] == {"trainable": by_hand, "total": n_base + by_hand}
    assert sorted(load_file(os.path.join(stage_a, "adapter_model.safetensors"))) and run["final_loss"] > 0


def test_lora_settings_enter_the_run_id(stage_a, tmp_path):
    other = train_stage({"model": "tiny", "task": "toxigen", "out": str(tmp_path / "r2"), "lora_r": 2,
                         "lora_alpha": 16, **STAGE})
    full = train_stage({"model": "tiny", "task": "toxigen", "out": str(tmp_path / "full"), **STAGE})
    assert len({read(stage_a)["run_id"], other["run_id"], full["run_id"]}) == 3
    assert "lora" not in full and full["parameters"]["trainable"] == full["parameters"]["total"]


def test_evaluate_and_curvature_take_the_adapter_folder(stage_a, tmp_path, tiny_path):
    out = str(tmp_path / "eval.json")
    report = evaluate_checkpoint(stage_a, "toxigen", out, limit=12)
    assert report["run_id"] == read(stage_a)["run_id"] and os.path.isfile(out)
    # the evaluated model is the adapter merged into its base, not the base: the adapter changed the scores
    base = evaluate_checkpoint(tiny_path, "toxigen", str(tmp_path / "base.json"), limit=12)
    assert report["tasks"]["toxigen"]["loss"] != base["tasks"]["toxigen"]["loss"]
    r = run_script("curvature.py", "--model", stage_a, "--task", "toxigen", "--samples", "6", "--max_iter", "40",
                   "--out", tmp_path / "curv.json", "--backend", "torch")
    assert r.returncode == 0, r.stderr
    curv = read(tmp_path, "curv.json")
    assert curv["params"] == "trainable" and curv["n_params"] == read(stage_a)["parameters"]["trainable"]
    assert curv["converged"] and curv["rho"] > 0


def tiny_lora64(targets=("q_proj", "v_proj", "down_proj")):
    """A one-layer Llama in float64 with a LoRA adapter whose B is not zero (PEFT starts it at zero, where the
    Hessian's A-A block vanishes: a weaker check)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, attn_implementation="eager")
    model = lora.wrap(LlamaForCausalLM(cfg).to(torch.float64), 2, 4, 0.0, list(targets), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, t in ((3, 9), (2, 7)):
        ids = torch.randint(0, 40, (n, t), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -3:] = ids[:, -3:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def dense_over_trainable(model, bs):
    """The dense Hessian (torch.autograd.functional.hessian) of the answer loss over the parameters that require
    grad, the others held fixed: the independent reference."""
    from torch.func import functional_call
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in bs)

    def loss(x):
        d, o = dict(fixed), 0
        for n, p in named:
            d[n] = x[o:o + p.numel()].view(p.shape)
            o += p.numel()
        return sum(answer_loss_sum_ref(functional_call(model, d, (), {"input_ids": b["input_ids"],
                                                                      "attention_mask": b["attention_mask"]}).logits,
                                       b["labels"])[0] for b in bs) / total

    model.eval()
    ev = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat, vectorize=True))
    return float(ev[0]), float(ev[-1]), flat.numel()


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_adapter_hessian_matches_dense(backend):
    model = tiny_lora64()
    n = select_params(model, "trainable")
    lmin, lmax, n_dense = dense_over_trainable(model, batches())
    assert n == n_dense < sum(p.numel() for p in model.parameters()) / 2
    r = hessian_spectrum(model, batches(), rtol=1e-7, max_iter=n, stop="both", backend=backend)
    assert r["n_params"] == n
    assert abs(r["lambda_max"] - lmax) <= 1e-6 * abs(lmax) and abs(r["lambda_min"] - lmin) <= 1e-6 * abs(lmin)


def test_params_all_takes_every_weight():
    model = tiny_lora64()
    n = select_params(model, "all")
    assert n == sum(p.numel() for p in model.parameters())
    lmin, lmax, _ = dense_over_trainable(model, batches())
    r = hessian_spectrum(model, batches(), rtol=1e-9, max_iter=300, stop="both", backend="torch")
    assert abs(r["lambda_max"] - lmax) <= 1e-6 * abs(lmax) and abs(r["lambda_min"] - lmin) <= 1e-6 * abs(lmin)


def to_merged_names(peft_state):
    """A PeftModel's base weights under the plain model's names (base_layer.weight -> weight); adapters dropped."""
    out = {}
    for n, t in peft_state.items():
        if "lora_" in n:
            continue
        n = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[n] = t
    return out


def test_merge_chain_starts_from_peft_merge_and_unload(stage_a, tiny_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    # PEFT alone: the base from transformers, stage A's adapter, merge_and_unload
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32), stage_a)
    ref = ref.merge_and_unload().state_dict()
    out = str(tmp_path / "merge")
    rec = train_stage({"model": stage_a, "task": "arc", "out": out, "lora_r": 2, "lora_chain": "merge", **STAGE})
    assert rec["lora"]["base"]["kind"] == "adapter" and rec["lora"]["base"]["path"] == os.path.abspath(stage_a)
    assert read(out, "adapter_config.json")["base_model_name_or_path"] == os.path.abspath(stage_a)
    assert rec["parent_run_id"] == read(stage_a)["run_id"] and rec["chain"] == ["toxigen", "arc"]
    loaded, _ = lora.load_model_and_tokenizer(out, merge=False)
    start = to_merged_names(loaded.state_dict())
    assert start.keys() == ref.keys()
    assert all(torch.equal(start[k], ref[k]) for k in ref)
    base = load_model(tiny_path).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ref[q], base[q])  # stage A's adapter moved the weights the chain starts from
    assert load_file(os.path.join(out, "adapter_model.safetensors")).keys() and rec["lora"]["r"] == 2


def test_continue_chain_trains_the_same_adapter(stage_a, tiny_path, tmp_path):
    saved_a = load_file(os.path.join(stage_a, "adapter_model.safetensors"))
    start = lora.start_model(stage_a, {"lora_chain": "continue"})
    got = {n.replace(".default", ""): p.detach() for n, p in start.named_parameters() if p.requires_grad}
    assert got.keys() == saved_a.keys() and all(torch.equal(got[k], saved_a[k]) for k in saved_a)
    out = str(tmp_path / "continue")
    rec = train_stage({"model": stage_a, "task": "arc", "out": out, "lora_chain": "continue", **STAGE})
    assert rec["lora"]["r"] == 4 and rec["lora"]["alpha"] == 16 and rec["lora"]["chain"] == "continue"
    assert rec["lora"]["base"] == read(stage_a)["lora"]["base"]  # the same base, not stage A's folder
    assert read(out, "adapter_config.json")["base_model_name_or_path"] == os.path.abspath(tiny_path)
    after = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert after.keys() == saved_a.keys() and any(not torch.equal(after[k], saved_a[k]) for k in after)


def test_l2_and_ewc_over_the_adapter(stage_a, tmp_path):
    rec = train_stage({"model": stage_a, "task": "arc", "out": str(tmp_path / "reg"), "lora_chain": "continue",
                       "l2_to_init": 10.0, "ewc": 100.0, "ewc_task": "toxigen", "ewc_samples": 4, **STAGE})
    log = [json.loads(line) for line in open(tmp_path / "reg" / "train_log.jsonl")]
    assert log[0]["penalty"] == 0.0 and log[1]["penalty"] > 0
    assert rec["regularisation"]["fisher"]["fisher_sum"] > 0
    model = lora.start_model(stage_a, {"lora_chain": "continue"})
    anchor = AnchorPenalty(model, l2=1.0)  # the anchor holds the adapter's starting values, nothing else
    assert sum(a.numel() for a in anchor.anchor) == read(stage_a)["parameters"]["trainable"] and anchor() == 0.0


def one_error(r, out):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not os.path.exists(out)
    return lines[0]


def test_bad_input(stage_a, tiny_path, tmp_path):
    out = str(tmp_path / "never")
    args = ["finetune.py", "--task", "arc", "--out", out, "--steps", "1"]
    assert "--lora_r must be at least 1" in one_error(run_script(*args, "--model", "tiny", "--lora_r", "0"), out)
    line = one_error(run_script(*args, "--model", "tiny", "--lora_r", "2", "--lora_targets", "q_proj,qkv"), out)
    assert "qkv is not a linear module" in line and "q_proj" in line.split("choose from")[1]
    line = one_error(run_script(*args, "--model", "tiny", "--lora_r", "2", "--lora_chain", "merge"), out)
    assert "--lora_chain merge" in line and "not a LoRA stage's adapter folder" in line
    # an adapter whose base is missing
    moved = str(tmp_path / "moved")
    shutil.copytree(stage_a, moved)
    cfg = read(moved, "adapter_config.json")
    with open(os.path.join(moved, "adapter_config.json"), "w") as f:
        json.dump({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}, f)
    line = one_error(run_script(*args, "--model", moved, "--lora_r", "2", "--lora_chain", "merge"), out)
    assert str(tmp_path / "gone") in line and "is missing" in line
    # an adapter whose base differs from the one it was trained on (a weight changed in a copy of it)
    other = str(tmp_path / "other_base")
    shutil.copytree(tiny_path, other)
    w = load_file(os.path.join(other, "model.safetensors"))
    w["lm_head.weight"][0, 0] += 1.0
    save_file(w, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(moved, "adapter_config.json"), "w") as f:
        json.dump({**cfg, "base_model_name_or_path": other}, f)
    line = one_error(run_script(*args, "--model", moved, "--lora_chain", "continue"), out)
    assert other in line and "differs from the one it was trained on" in line
    line = one_error(run_script("evaluate.py", "--model", moved, "--tasks", "arc", "--out", out), out)
    assert "differs from the one it was trained on" in line


def test_full_stage_from_an_adapter_starts_from_its_merge(stage_a, tmp_path):
    """No LoRA flags on an adapter --model: a full fine-tuning stage from the merged weights, chained as usual."""
    out = str(tmp_path / "full")
    rec = train_stage({"model": stage_a, "task": "arc", "out": out, **STAGE})
    assert "lora" not in rec and os.path.isfile(os.path.join(out, "model.safetensors"))
    assert rec["parent_run_id"] == read(stage_a)["run_id"] and rec["chain"] == ["toxigen", "arc"]
    assert rec["parameters"]["trainable"] == rec["parameters"]["total"] == sum(
        p.numel() for p in load_model(out).parameters())


def test_replay_and_taylor_check_of_a_lora_chain(stage_a, tmp_path):
    import curvature
    import replay
    cont = str(tmp_path / "cont")
    train_stage({"model": stage_a, "task": "arc", "out": cont, "lora_chain": "continue", **STAGE})
    summary = replay.main(replay.build_parser().parse_args(
        ["--model", cont, "--task", "toxigen", "--out", str(tmp_path / "replay"), "--fractions", "0.5", "--steps",
         "2", "--batch_size", "8", "--train_size", "48", "--max_length", "128", "--eval_limit", "8",
         "--save_checkpoints"]))
    point = read(tmp_path / "replay" / "fraction0.5", "point.json")
    assert point["settings"]["lora"] == {"chain": "merge", "r": 4, "alpha": 16, "dropout": 0.0,
                                         "targets": read(stage_a)["lora"]["targets"]}
    stage_run = read(tmp_path / "replay" / "fraction0.5")
    assert stage_run["lora"]["base"]["path"] == os.path.abspath(cont) and summary
    # Taylor check: theta_AB continues theta_A's adapter, so the delta is in the adapter's coordinates
    args = ["--model", stage_a, "--task", "toxigen", "--samples", "4", "--max_iter", "30", "--backend", "torch"]
    res = curvature.run_cli(curvature.build_parser().parse_args(args + ["--reference", cont, "--out",
                                                                        str(tmp_path / "t.json")]))
    assert res["params"] == "trainable" and res["reference"]["delta_sq_norm"] > 0
    assert res["reference"]["quadratic_le_bound"]
    merged = str(tmp_path / "replay" / "fraction0.5")
    with pytest.raises(curvature.CommandLineError, match="not an adapter on --model's base"):
        curvature.run_cli(curvature.build_parser().parse_args(args + ["--reference", cont, merged, "--taylor_out",
                                                                      "t.json", "--out", str(tmp_path / "u.json")]))


def test_option_checks(tiny_path):
    from chained_tuning.common import UserError
    from chained_tuning.stage_config import default_config
    from chained_tuning.training import check_options
    ok = {**default_config(), "task": "arc", "lora_r": 2}
    check_options(dict(ok), 1)
    check_options(dict(ok), 2)  # under torchrun too (tests/test_lora_distributed.py)
    for bad, world, msg in [({"lora_r": 2.5}, 1, "whole number"), ({"lora_alpha": 0.0}, 1, "--lora_alpha must be > 0"),
                            ({"lora_dropout": 1.0}, 1, r"--lora_dropout must be in \[0, 1\)"),
                            ({"lora_r": None, "lora_alpha": 4.0}, 1, "--lora_alpha needs --lora_r"),
                            ({"save_dtype": "bfloat16"}, 1, "in float32"), ({"save_dtype": "bfloat16"}, 2, "in float32"),
                            ({"lora_chain": "fork"}, 1, "choose from merge, continue")]:
        with pytest.raises(UserError, match=msg):
            check_options({**ok, **bad}, world)


def test_bf16_stage_keeps_the_base_in_bfloat16_and_the_adapter_in_float32(tmp_path):
    """One process, --bf16: the frozen base is loaded in bfloat16 (what the one-gpu profile's memory plans), the
    adapter trains and is saved in float32, and run.json says so."""
    out = str(tmp_path / "bf16")
    model = lora.start_model(lora.resolve("tiny"), {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                     "lora_targets": None, "seed": 0}, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    train_stage({"model": "tiny", "task": "toxigen", "out": out, "lora_r": 4, "bf16": True, **STAGE})
    run = read(out)
    assert run["lora"]["base_dtype"] == "bfloat16" and run["final_loss"] > 0
    assert {t.dtype for t in load_file(os.path.join(out, "adapter_model.safetensors")).values()} == {torch.float32}


def test_a_4bit_base_is_refused_by_name_where_it_cannot_run(tmp_path):
    """QLoRA (--lora_base_4bit) needs bitsandbytes on a CUDA GPU, in one process: on this CPU machine it is refused
    with one line before anything is loaded or written (bench/gpu_check.sh runs it where a GPU is)."""
    import importlib.util
    out = str(tmp_path / "never")
    args = ["finetune.py", "--task", "arc", "--out", out, "--steps", "1", "--model", "tiny"]
    line = one_error(run_script(*args, "--lora_base_4bit"), out)
    assert "--lora_base_4bit needs --lora_r" in line
    missing = ("a CUDA GPU" if not torch.cuda.is_available() else
               "bitsandbytes" if importlib.util.find_spec("bitsandbytes") is None else None)
    if missing:  # (where both are there, gpu_check.sh trains a 4-bit stage)
        line = one_error(run_script(*args, "--lora_r", "2", "--lora_base_4bit"), out)
        assert f"--lora_base_4bit needs {missing}" in line
    with pytest.raises(lora.UserError, match="runs in one process"):
        lora.check_4bit(world=2)
