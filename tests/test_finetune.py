"""finetune.py: the answer-only, token-normalised loss; accumulation and 2-process FSDP2 giving the
one-process result; determinism; the checkpoint, run.json and lineage of a chain; bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune
import tasks
from chained_tuning.checkpoint import load_model_and_tokenizer
from conftest import ROOT, run_script


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_model_and_tokenizer(tiny_path)[1]


def test_encode_example_labels_only_the_answer(tok):
    ex = tasks.load_task("bbq", "test").examples[0]
    enc = finetune.encode_example(tok, ex, 2048)
    answer = [t for t in enc["labels"] if t != -100]
    assert tok.decode(answer[:-1]) == ex.continuation(ex.label) and answer[-1] == tok.eos_token_id
    first = enc["labels"].index(answer[0])
    assert enc["labels"][:first] == [-100] * first and enc["input_ids"][first:] == answer
    assert tok.decode(enc["input_ids"][1:first]) == ex.prompt and not enc["truncated"]


def test_truncation_cuts_the_prompt_start_never_the_answer(tok):
    ex = tasks.load_task("arc", "test").examples[0]
    full = finetune.encode_example(tok, ex, 2048)
    short = finetune.encode_example(tok, ex, 30)
    assert short["truncated"] and len(short["input_ids"]) == 30 and short["input_ids"][0] == tok.bos_token_id
    n = sum(t != -100 for t in full["labels"])
    assert short["input_ids"][-n:] == full["input_ids"][-n:] and short["labels"][-n:] == full["labels"][-n:]


def test_answer_loss_sum_against_a_manual_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    s, n = finetune.answer_loss_sum(logits, labels)
    manual = 0.0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != -100:
                manual -= torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
    assert n == 6 and s.item() == pytest.approx(manual, rel=1e-6)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def small_cfg(out, **kw):
    return {"model": "tiny", "task": "csqa2", "out": str(out), "steps": 3, "train_size": 96, "batch_size": 8, **kw}


def test_accumulation_gives_the_full_batch_result(tmp_path, tiny_path):
    a = finetune.train_stage(small_cfg(tmp_path / "full"))
    b = finetune.train_stage(small_cfg(tmp_path / "accum", micro_batch_size=2))
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "accum")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 5e-5  # Adam amplifies float noise a little


def test_same_seed_same_model_other_seed_other_data(tmp_path, tiny_path):
    a = finetune.train_stage(small_cfg(tmp_path / "a"))
    b = finetune.train_stage(small_cfg(tmp_path / "b"))
    c = finetune.train_stage(small_cfg(tmp_path / "c", seed=1))
    assert a["losses"] == b["losses"] and a["run_id"] == b["run_id"] != c["run_id"]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["data"]["train_info"]["ids_sha256"] != c["data"]["train_info"]["ids_sha256"]


def test_chain_checkpoint_run_json_and_lineage(tmp_path, tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    first = tmp_path / "toxigen"
    r1 = run_script("finetune.py", "--model", "tiny", "--task", "toxigen", "--out", first, "--steps", "4",
                    "--train_size", "64", "--batch_size", "8")
    assert r1.returncode == 0, r1.stderr
    r2 = run_script("finetune.py", "--model", first, "--task", "arc", "--out", tmp_path / "toxigen-arc",
                    "--steps", "2", "--train_size", "32", "--batch_size", "8", "--lr", "5e-4")
    assert r2.returncode == 0, r2.stderr
    run1 = json.load(open(first / "run.json"))
    run2 = json.load(open(tmp_path / "toxigen-arc" / "run.json"))
    assert run1["chain"] == ["toxigen"] and run1["stage"] == 1 and run1["parent_run_id"] is None
    assert run2["chain"] == ["toxigen", "arc"] and run2["parent_run_id"] == run1["run_id"] and run2["stage"] == 2
    assert run1["lr"] == 1e-3 and "tiny-model default" in run1["lr_note"] and run2["lr"] == 5e-4
    assert len(run1["losses"]) == 4 and run1["final_loss"] == run1["losses"][-1]
    assert run1["data"]["source"] == "synthetic" and run1["data"]["n_train"] == 64 and run1["versions"]["torch"]
    assert run1["config"]["weight_decay"] == 0.1 and run1["config"]["beta2"] == 0.95 and run1["base_model"] == "tiny"
    log = [json.loads(line) for line in open(first / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[0]["lr"] == 1e-3 and log[3]["lr"] == pytest.approx(2.5e-4)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "toxigen-arc", use_safetensors=True)
    t = AutoTokenizer.from_pretrained(tmp_path / "toxigen-arc")
    assert m.get_input_embeddings().weight.shape[0] == len(t)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_two_process_fsdp_matches_one_process(tmp_path, tiny_path):
    one = finetune.train_stage(small_cfg(tmp_path / "one", micro_batch_size=4))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "finetune.py", "--model", "tiny", "--task", "csqa2", "--out", str(tmp_path / "two"), "--steps", "3",
           "--train_size", "96", "--batch_size", "8"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "run.json"))
    assert two["world_size"] == 2 and two["run_id"] == one["run_id"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-5


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def test_bad_input(tmp_path, tiny_path):
    (tmp_path / "notackpt").mkdir()
    r = run_script("finetune.py", "--model", tmp_path / "notackpt", "--task", "arc", "--out", tmp_path / "o")
    assert one_error_line(r) and "no config.json" in r.stderr and not (tmp_path / "o").exists()
    r = run_script("finetune.py", "--model", tmp_path / "missing", "--task", "arc", "--out", tmp_path / "o")
    assert one_error_line(r) and "not found" in r.stderr
    r = run_script("finetune.py", "--model", "tiny", "--task", "arcc", "--out", tmp_path / "o")
    assert r.returncode == 2 and "invalid choice: 'arcc'" in r.stderr
    (tmp_path / "exists").mkdir()
    r = run_script("finetune.py", "--model", "tiny", "--task", "arc", "--out", tmp_path / "exists")
    assert one_error_line(r) and "already exists; pass --overwrite" in r.stderr
    r = run_script("finetune.py", "--model", "tiny", "--task", "arc", "--out", tmp_path / "o", "--data_dir", tmp_path)
    assert one_error_line(r) and "ARC-Easy-Train.jsonl" in r.stderr and not (tmp_path / "o").exists()
    # a tokenizer that does not belong to the model: a larger vocabulary than the embedding
    from transformers import AutoModelForCausalLM, AutoTokenizer
    bad = tmp_path / "mismatch"
    m = AutoModelForCausalLM.from_pretrained(tiny_path)
    m.resize_token_embeddings(100)
    m.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(bad)
    r = run_script("finetune.py", "--model", bad, "--task", "arc", "--out", tmp_path / "o")
    assert one_error_line(r) and "do not belong together" in r.stderr and not (tmp_path / "o").exists()


def test_answer_logits_match_the_full_right_padded_loss(tiny_path, tok):
    """Left padding + logits of the last K positions only gives the loss of all logits, right padded."""
    model = load_model_and_tokenizer(tiny_path)[0].eval()
    exs = tasks.load_task("toxigen", "test").examples[:3] + tasks.load_task("arc", "test").examples[:3]
    enc = [finetune.encode_example(tok, ex, 2048) for ex in exs]
    right = finetune.collate(enc, tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        s_full, n_full = finetune.answer_loss_sum(full, right["labels"])
        logits, labels = finetune.answer_logits(model, finetune.collate(enc, tok.pad_token_id, "left"))
        s, n = finetune.answer_loss_sum(logits, labels)
    assert n == n_full and logits.shape[1] < full.shape[1] and s.item() == pytest.approx(s_full.item(), rel=1e-5)


def test_eval_after_training_equals_evaluate_py(tmp_path, tiny_path):
    """--eval_tasks/--eval_val_tasks write what evaluate.py writes for the saved folder (same JSON, same
    samples); a bad task name fails before any training and leaves no folder."""
    out = tmp_path / "m"
    r = run_script("finetune.py", "--model", "tiny", "--task", "toxigen", "--out", out, "--steps", "2",
                   "--train_size", "32", "--batch_size", "8", "--eval_tasks", "toxigen,arc", "--eval_limit", "20",
                   "--eval_val_tasks", "toxigen", "--eval_val_limit", "10")
    assert r.returncode == 0, r.stderr
    for name, extra in (("eval", ["--tasks", "toxigen,arc", "--limit", "20"]),
                        ("eval_val", ["--tasks", "toxigen", "--limit", "10", "--split", "validation"])):
        e = run_script("evaluate.py", "--model", out, "--out", tmp_path / f"{name}.json", *extra)
        assert e.returncode == 0, e.stderr
        mine, ref = json.load(open(out / f"{name}.json")), json.load(open(tmp_path / f"{name}.json"))
        assert mine["samples"] == f"{name}_samples.jsonl"
        mine.pop("samples"), ref.pop("samples")
        assert mine == ref and mine["model"] == str(out) and mine["run_id"]
        assert (out / f"{name}_samples.jsonl").read_text() == (tmp_path / f"{name}_samples.jsonl").read_text()
    run = json.load(open(out / "run.json"))
    plain = finetune.train_stage({"model": "tiny", "task": "toxigen", "out": str(tmp_path / "plain"), "steps": 2,
                                  "train_size": 32, "batch_size": 8})
    assert run["run_id"] == plain["run_id"]  # evaluating is not part of the run's identity
    r = run_script("finetune.py", "--model", "tiny", "--task", "toxigen", "--out", tmp_path / "bad", "--steps", "2",
                   "--eval_tasks", "toxigen,arcc")
    assert one_error_line(r) and "arcc" in r.stderr and not (tmp_path / "bad").exists()
    assert "finetune:" not in r.stdout  # refused before training
