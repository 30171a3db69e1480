"""evaluate.py: the fast scorer gives the naive scorer's predictions (and log-likelihoods) on every
task, both on its one-distribution path and its KV-cache path; the naive scorer agrees with an
unbatched reference; results JSON and samples JSONL recompute each other; bad input."""
import json
import math

import pytest
import torch

import evaluate as ev
import tasks
from chained_tuning.checkpoint import load_model_and_tokenizer
from conftest import DATA, needs_data, run_script


@pytest.fixture(scope="module")
def loaded(tuned_toxigen):
    model, tok = load_model_and_tokenizer(tuned_toxigen)
    return model.eval(), tok


def subset(task, n=24, split="test", data_dir=None):
    ex = tasks.load_task(task, split, data_dir).examples
    return sorted(tasks.stratified_sample(ex, n, 0, "test"), key=lambda e: e.id)


def reference_loglik(model, ids, start):
    """Unbatched, unpadded: log p(ids[start:] | ids[:start]) from one forward of the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids)))


@pytest.mark.parametrize("scorer", ["fast", "kv"])
@pytest.mark.parametrize("task", ["arc", "csqa", "csqa2", "toxigen", "bbq"])
def test_fast_equals_naive_equals_reference(loaded, task, scorer):
    model, tok = loaded
    exs = subset(task)
    reqs = ev.build_requests(tok, exs, 2048)
    fast = ev.SCORERS[scorer](model, reqs, 5, tok.pad_token_id, "cpu")
    naive = ev.score_naive(model, reqs, 7, tok.pad_token_id, "cpu")
    for e in range(len(exs)):
        assert max(range(len(fast[e])), key=fast[e].__getitem__) == max(range(len(naive[e])), key=naive[e].__getitem__)
        assert fast[e] == pytest.approx(naive[e], abs=2e-4)
    for e in range(3):  # the naive scorer itself against a forward of one unpadded sequence
        for i, (ids, start) in enumerate(reqs[e]):
            assert naive[e][i] == pytest.approx(reference_loglik(model, ids, start), abs=2e-4)


def test_one_forward_per_batch_and_the_kv_path(loaded, monkeypatch):
    """The packed scorer runs one forward per batch, with or without tails after the shared prefix;
    the KV scorer runs the prefix with a cache, then the tails on it."""
    model, tok = loaded
    ex = tasks.Example("one", "arc", "Instructions: pick.\n\nPrompt: a b\n\nAnswer:", ["A", "B", "C"], 1)
    reqs = ev.build_requests(tok, [ex], 2048)
    assert {len(ids) - ev.split_shared(reqs[0]) for ids, _ in reqs[0]} == {1}  # one token after the prefix
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k.get("past_key_values")) or forward(*a, **k))
    naive = ev.score_naive(model, reqs, 4, tok.pad_token_id, "cpu")[0]
    calls.clear()
    assert ev.score_packed(model, reqs, 4, tok.pad_token_id, "cpu")[0] == pytest.approx(naive, abs=2e-4)
    assert ev.score_kv(model, reqs, 4, tok.pad_token_id, "cpu")[0] == pytest.approx(naive, abs=2e-4)
    assert calls == [None, None]  # a single next-token distribution: one forward each
    calls.clear()
    long = ev.build_requests(tok, tasks.load_task("toxigen", "test").examples[:3], 2048)  # multi-token tails
    ev.score_packed(model, long, 4, tok.pad_token_id, "cpu")
    assert calls == [None]
    calls.clear()
    ev.score_kv(model, long, 4, tok.pad_token_id, "cpu")
    assert len(calls) == 2 and calls[0] is None and calls[1] is not None


def test_cli_results_and_samples_recompute_each_other(tuned_toxigen, tmp_path):
    out = tmp_path / "e" / "eval.json"
    r = run_script("evaluate.py", "--model", tuned_toxigen, "--tasks", "toxigen,bbq", "--out", out, "--limit", "60")
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["samples"] == "eval_samples.jsonl" and res["chain"] == ["toxigen"] and res["run_id"]
    samples = [json.loads(line) for line in open(out.parent / "eval_samples.jsonl")]
    for task in ("toxigen", "bbq"):
        t, rows = res["tasks"][task], [s for s in samples if s["task"] == task]
        acc = sum(s["correct"] for s in rows) / len(rows)
        assert t["n"] == len(rows) == 60 and t["acc"] == pytest.approx(acc)
        assert t["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 59))
        assert t["source"] == "synthetic" and t["split"] == "test"
        for g, v in t["groups"].items():
            grp = [s["correct"] for s in rows if s["group"] == g]
            assert v["n"] == len(grp) and v["acc"] == pytest.approx(sum(grp) / len(grp))
        for s in rows:
            assert s["pred"] == max(range(len(s["logliks"])), key=s["logliks"].__getitem__)
            assert s["correct"] == (s["pred"] == s["label"]) and s["prompt"].endswith("Answer:")
        loss = -sum(s["logliks"][s["label"]] for s in rows) / sum(s["n_tokens"][s["label"]] for s in rows)
        assert t["loss"] == pytest.approx(loss)
    assert len(res["tasks"]["toxigen"]["groups"]) == 13
    assert set(res["tasks"]["bbq"]["context_condition"]) == {"ambig", "disambig"}
    assert sum(v["n"] for v in res["tasks"]["bbq"]["context_condition"].values()) == 60
    # Tuning shows in the answer loss by a factor that no CPU's rounding can flip (here 8.2 -> 0.83); the
    # accuracy after 40 steps (0.75 here, 0.58 on another EPYC) is too close to chance to assert on.
    base_model, base_tok = load_model_and_tokenizer("tiny")
    base, _ = ev.evaluate(base_model, base_tok, ["toxigen"], limit=60)
    assert res["tasks"]["toxigen"]["loss"] < 0.5 * base["toxigen"]["loss"]


def test_same_input_same_results_json(tuned_toxigen, tmp_path):
    for name in ("a", "b"):
        r = run_script("evaluate.py", "--model", tuned_toxigen, "--tasks", "csqa2", "--out", tmp_path / f"{name}.json",
                       "--limit", "40")
        assert r.returncode == 0, r.stderr
    a, b = json.load(open(tmp_path / "a.json")), json.load(open(tmp_path / "b.json"))
    a.pop("samples"), b.pop("samples")
    assert a == b
    assert open(tmp_path / "a_samples.jsonl").read() == open(tmp_path / "b_samples.jsonl").read()


def test_bad_input(tuned_toxigen, tmp_path):
    out = tmp_path / "x.json"
    r = run_script("evaluate.py", "--model", tuned_toxigen, "--tasks", "arc,foo", "--out", out)
    assert r.returncode == 2 and r.stderr.strip() == ("error: unknown task 'foo' in --tasks; choose from arc, csqa, "
                                                      "csqa2, toxigen, bbq, saferdialogues")
    r = run_script("evaluate.py", "--model", tuned_toxigen, "--tasks", "saferdialogues", "--out", out,
                   "--max_new_tokens", "0")
    assert r.returncode == 2 and "--max_new_tokens" in r.stderr and "Traceback" not in r.stderr
    r = run_script("evaluate.py", "--model", tuned_toxigen, "--tasks", "saferdialogues", "--out", out,
                   "--classifier", tuned_toxigen)  # a causal LM is not a sequence classifier
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_script("evaluate.py", "--model", tmp_path / "nothing", "--tasks", "arc", "--out", out)
    assert r.returncode == 2 and "not found" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp*"))


@needs_data
@pytest.mark.parametrize("task", ["arc", "toxigen"])
def test_real_data_fast_equals_naive(loaded, task):
    model, tok = loaded
    exs = subset(task, 40, data_dir=DATA)
    reqs = ev.build_requests(tok, exs, 2048)
    fast = ev.score_packed(model, reqs, 8, tok.pad_token_id, "cpu")
    naive = ev.score_naive(model, reqs, 8, tok.pad_token_id, "cpu")
    assert [max(range(len(f)), key=f.__getitem__) for f in fast] == [max(range(len(n)), key=n.__getitem__) for n in naive]
    assert all(f == pytest.approx(n, abs=5e-4) for f, n in zip(fast, naive))
