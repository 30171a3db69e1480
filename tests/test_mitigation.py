"""finetune.py's mitigation options (replay during the second stage, L2 to the start, EWC), --train_fraction,
chains of three stages, and order.py (curvature-guided ordering) on hand-made files."""
import fractions
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chained_tuning import common
import finetune
import metrics
import order
import tasks
from chained_tuning.common import UserError
from chained_tuning.checkpoint import load_model_and_tokenizer
from conftest import run_script


def cfg(out, **kw):
    return {"model": "tiny", "task": "csqa2", "out": str(out), "steps": 3, "train_size": 48, "batch_size": 8, **kw}


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


# ----------------------------------------------------------------------------- replay mixing


@pytest.mark.parametrize("fraction,bs,steps", [(0.25, 8, 5), (0.05, 16, 100), (0.3, 16, 7), (1 / 3, 6, 9), (1.0, 4, 3)])
def test_replay_proportions_are_exact(fraction, bs, steps):
    counts = finetune.replay_counts(steps, bs, fraction)
    f = finetune.exact(fraction)
    assert sum(counts) == math.floor(f * bs * steps + fractions.Fraction(1, 2))
    assert all(math.floor(f * bs) <= k <= math.ceil(f * bs) for k in counts)
    n_main, n_rep = 37, 11
    batches = finetune.mixed_batch_order(n_main, n_rep, steps, bs, fraction, seed=3)
    assert len(batches) == steps and all(len(b) == bs for b in batches)
    assert [sum(i >= n_main for i in b) for b in batches] == counts
    main = [i for b in batches for i in b if i < n_main]
    rep = [i - n_main for b in batches for i in b if i >= n_main]
    # each source is read as seeded epochs: every example floor or ceil(used / n) times
    for idx, n in ((main, n_main), (rep, n_rep)):
        c = np.bincount(idx, minlength=n) if idx else np.zeros(n)
        assert c.min() >= len(idx) // n and c.max() <= -(-len(idx) // n)
    assert batches == finetune.mixed_batch_order(n_main, n_rep, steps, bs, fraction, seed=3)


def test_replay_keeps_the_stage_stream_of_batch_order():
    """The stage's examples of batch s are the next bs - k_s of batch_order's stream (positions permuted)."""
    plain = [i for b in finetune.batch_order(20, 6, 8, 0) for i in b]
    counts = finetune.replay_counts(6, 8, 0.3)
    at = 0
    for b, k in zip(finetune.mixed_batch_order(20, 5, 6, 8, 0.3, 0), counts):
        assert sorted(i for i in b if i < 20) == sorted(plain[at:at + 8 - k])
        at += 8 - k


def test_fraction_subset_sizes_nesting_and_order():
    data = tasks.load_task("toxigen", "train", train_size=64)
    s5 = finetune.fraction_subset(data, 0.05, 0)
    s25 = finetune.fraction_subset(data, 0.25, 0)
    s_small = finetune.fraction_subset(data, 0.001, 0)
    assert len(s5.examples) == 3 and len(s25.examples) == 16 and len(s_small.examples) == 1
    pos = {ex.id: i for i, ex in enumerate(data.examples)}
    assert {e.id for e in s5.examples} <= {e.id for e in s25.examples}
    assert [pos[e.id] for e in s25.examples] == sorted(pos[e.id] for e in s25.examples)
    assert s25.info["ids_sha256"] != data.info["ids_sha256"] and s25.info["fraction_of"] == 64
    assert {e.id for e in finetune.fraction_subset(data, 0.25, 1).examples} != {e.id for e in s25.examples}


def test_named_streams_are_the_draws_runs_were_made_with():
    """Each seeded draw of a stage has its named stream; the numbers behind the names are part of every run's
    data (and run_id), so they are pinned here, and each use is checked against default_rng([seed, k])."""
    assert common.STREAMS == {"batch_order": None, "replay": 1, "mix_positions": 2, "ewc": 3, "train_fraction": 5}
    for name, k in common.STREAMS.items():
        want = np.random.default_rng(11 if k is None else [11, k]).permutation(30)
        assert (common.seeded_rng(11, name).permutation(30) == want).all()
    with pytest.raises(KeyError):
        common.seeded_rng(0, "unnamed")
    data = tasks.load_task("toxigen", "train", train_size=64)
    sub = finetune.fraction_subset(data, 0.25, 0)
    keep = sorted(np.random.default_rng([0, 5]).permutation(64)[:16].tolist())
    assert [e.id for e in sub.examples] == [data.examples[i].id for i in keep]
    assert sub.info["ids_sha256"] == hashlib.sha256("\n".join(e.id for e in sub.examples).encode()).hexdigest()
    # mixing: the replayed examples are the epochs of stream 1, each batch's positions a stream-2 permutation
    counts = finetune.replay_counts(6, 8, 0.3)
    main_rng, rep_rng = np.random.default_rng(0), np.random.default_rng([0, 1])
    main = np.concatenate([main_rng.permutation(20) for _ in range(3)]).tolist()
    rep = np.concatenate([rep_rng.permutation(5) for _ in range(4)]).tolist()
    positions = np.random.default_rng([0, 2])
    at_main = at_rep = 0
    for batch, k in zip(finetune.mixed_batch_order(20, 5, 6, 8, 0.3, 0), counts):
        unshuffled = main[at_main:at_main + 8 - k] + [20 + j for j in rep[at_rep:at_rep + k]]
        assert batch == [unshuffled[i] for i in positions.permutation(8)]
        at_main, at_rep = at_main + 8 - k, at_rep + k


def test_replay_run_mixes_exactly_and_is_recorded(tmp_path, tiny_path):
    r = finetune.train_stage(cfg(tmp_path / "mix", replay_task="toxigen", replay_fraction=0.25))
    log = [json.loads(line) for line in open(tmp_path / "mix" / "train_log.jsonl")]
    assert [x["replayed"] for x in log] == [2, 2, 2]
    assert r["replay"]["examples_replayed"] == 6 and r["replay"]["examples_total"] == 24
    assert r["replay"]["task"] == "toxigen" and r["config"]["replay_fraction"] == 0.25
    plain = finetune.train_stage(cfg(tmp_path / "plain"))
    assert r["run_id"] != plain["run_id"] and "replay" not in plain


# ----------------------------------------------------------------------------- options off: unchanged


def original_run_id(c, lr, parent, data_sha):
    """The run_id formula before the options existed (the keys of the original default_config)."""
    keys = ["model", "task", "data_dir", "train_size", "lr", "steps", "batch_size", "max_length", "weight_decay",
            "beta1", "beta2", "eps", "max_grad_norm", "seed", "bf16"]
    full = {**finetune.default_config(), **c}
    conf = {k: full[k] for k in keys}
    return hashlib.sha256(json.dumps({"config": conf, "lr": lr, "parent": parent, "data": data_sha},
                                     sort_keys=True).encode()).hexdigest()[:16]


def test_options_off_give_the_run_they_gave_before(tmp_path, tiny_path):
    c = cfg(tmp_path / "off")
    r = finetune.train_stage(c)
    data = tasks.load_task("csqa2", "train", None, 48, 0)
    assert r["run_id"] == original_run_id(c, r["lr"], None, data.info["ids_sha256"])
    # explicit zero / None values of the options are the same run
    r0 = finetune.train_stage(cfg(tmp_path / "zero", replay_fraction=0.0, l2_to_init=0.0, ewc=0.0, ewc_samples=7,
                                  train_fraction=None, replay_task="toxigen"))
    assert r0["run_id"] == r["run_id"] and r0["losses"] == r["losses"]
    # bit-identical to the recipe built from the pieces (no replay, no penalty)
    model, tok = load_model_and_tokenizer(tiny_path)
    full = {**finetune.default_config(), **c}
    torch.manual_seed(0)
    enc = [finetune.encode_example(tok, ex, full["max_length"]) for ex in data.examples]
    opt, sched = finetune.make_optimizer(model, r["lr"], full)
    model.config.use_cache = False
    model.train()
    losses = [finetune.optimisation_step(model, opt, sched, enc, b, tok.pad_token_id, full)[0]
              for b in finetune.batch_order(len(enc), 3, 8, 0)]
    assert losses == r["losses"]
    w = weights(tmp_path / "off")
    sd = model.state_dict()
    assert all(torch.equal(w[k], sd[k]) for k in w)
    assert all(torch.equal(w[k], v) for k, v in weights(tmp_path / "zero").items())


# ----------------------------------------------------------------------------- penalties


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.Parameter(torch.ones(2))


def test_penalty_gradient_and_value_by_hand():
    torch.manual_seed(0)
    m = Tiny()
    theta0 = [p.detach().clone() for p in m.parameters()]
    fisher = [torch.rand_like(p) for p in m.parameters()]
    pen = finetune.AnchorPenalty(m, l2=0.3, ewc=2.0, fisher=fisher)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 3)
    data_loss = (m.lin(x) * m.norm).square().sum()
    data_loss.backward()
    data_grads = [p.grad.clone() for p in m.parameters()]
    value = pen()
    # by hand: d/dtheta [l2/2 |d|^2 + ewc/2 sum F d^2] = (l2 + ewc F) d
    for p, p0, f, g in zip(m.parameters(), theta0, fisher, data_grads):
        d = p.detach() - p0
        assert torch.allclose(p.grad, g + 0.3 * d + 2.0 * f * d, atol=1e-6)
    by_hand = sum(0.15 * (p.detach() - p0).square().sum() + 1.0 * (f * (p.detach() - p0).square()).sum()
                  for p, p0, f in zip(m.parameters(), theta0, fisher))
    assert value == pytest.approx(float(by_hand), rel=1e-6) and pen.value() == pytest.approx(value, rel=1e-6)
    # and autograd of loss + penalty written out gives the same gradient
    m2 = Tiny()
    m2.load_state_dict(m.state_dict())
    total = (m2.lin(x) * m2.norm).square().sum() + sum(
        0.15 * (p - p0).square().sum() + 1.0 * (f * (p - p0).square()).sum()
        for p, p0, f in zip(m2.parameters(), theta0, fisher))
    total.backward()
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


def test_l2_only_penalty_and_zero_at_the_start():
    m = Tiny()
    pen = finetune.AnchorPenalty(m, l2=5.0)
    assert pen() == 0.0 and all(torch.count_nonzero(p.grad) == 0 for p in m.parameters())
    with torch.no_grad():
        m.norm.add_(1.0)
    m.zero_grad(set_to_none=True)
    assert pen() == pytest.approx(0.5 * 5.0 * 2) and torch.allclose(m.norm.grad, torch.full((2,), 5.0))
    assert m.lin.weight.grad.abs().max() == 0


def test_fisher_is_the_mean_squared_per_sample_gradient(tiny_path):
    model, tok = load_model_and_tokenizer(tiny_path)
    exs = tasks.load_task("toxigen", "train", train_size=32).examples[:3]
    fisher = finetune.estimate_fisher(model, tok, exs, 2048)
    params = list(model.parameters())
    ref = [torch.zeros_like(p) for p in params]
    model.eval()
    for ex in exs:  # independently: full logits, right padding, sequence NLL of the answer
        enc = finetune.encode_example(tok, ex, 2048)
        b = finetune.collate([enc], tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = torch.log_softmax(logits[0, :-1], -1)
        tgt = b["labels"][0, 1:]
        nll = -sum(lp[t, tgt[t]] for t in range(len(tgt)) if tgt[t] != -100)
        for r, g in zip(ref, torch.autograd.grad(nll, params)):
            r += g.square() / len(exs)
    rel = max(((f - r).abs().max() / r.abs().max().clamp(min=1e-12)).item() for f, r in zip(fisher, ref))
    assert rel < 1e-4


def test_l2_and_ewc_runs(tmp_path, tiny_path):
    base = finetune.train_stage(cfg(tmp_path / "base", steps=2))
    l2 = finetune.train_stage(cfg(tmp_path / "l2", steps=2, l2_to_init=1e3))
    ewc = finetune.train_stage(cfg(tmp_path / "ewc", steps=2, ewc=50.0, ewc_task="toxigen", ewc_samples=4))
    assert len({base["run_id"], l2["run_id"], ewc["run_id"]}) == 3
    assert l2["config"]["l2_to_init"] == 1e3 and l2["regularisation"]["fisher"] is None
    f = ewc["regularisation"]["fisher"]
    assert f["task"] == "toxigen" and f["n_samples"] == 4 and f["fisher_sum"] > 0
    pool = tasks.load_task("toxigen", "train", None, 48, 0).examples  # the Fisher's samples: the "ewc" stream (3)
    drawn = sorted(np.random.default_rng([0, 3]).permutation(len(pool))[:4].tolist())
    assert f["sample_ids_sha256"] == hashlib.sha256("\n".join(pool[i].id for i in drawn).encode()).hexdigest()
    log = [json.loads(line) for line in open(tmp_path / "l2" / "train_log.jsonl")]
    assert log[0]["penalty"] == 0.0 and log[1]["penalty"] > 0
    assert base["losses"][0] == l2["losses"][0] == ewc["losses"][0]  # the same data loss at the start
    init = weights(tiny_path)
    dist = lambda path: sum((w - init[k]).square().sum().item() for k, w in weights(path).items())  # noqa: E731
    assert dist(tmp_path / "l2") < dist(tmp_path / "base")


def test_option_checks():
    ok = {**finetune.default_config(), "task": "arc"}
    for bad, msg in [({"replay_fraction": 0.5}, "needs --replay_task"), ({"replay_fraction": 1.5}, "[0, 1]"),
                     ({"ewc": 1.0}, "needs --ewc_task"), ({"train_fraction": 0.0}, "(0, 1]"),
                     ({"steps": 0}, "at least 1"), ({"l2_to_init": -1.0}, ">= 0")]:
        with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("(", r"\(")):
            finetune.check_options({**ok, **bad}, 1)
    for bad, msg in [({"save_dtype": "fp8"}, "--save_dtype"), ({"gradient_checkpointing": "maybe"}, "choose from"),
                     ({"dist_timeout_min": 0}, "> 0")]:
        with pytest.raises(UserError, match=msg):
            finetune.check_options({**ok, **bad}, 1)
    # every option runs under FSDP (tests/test_distributed.py compares them with one process)
    finetune.check_options({**ok, "l2_to_init": 1.0}, 2)
    finetune.check_options({**ok, "ewc": 1.0, "ewc_task": "arc"}, 2)
    finetune.check_options({**ok, "replay_task": "arc", "replay_fraction": 0.5}, 2)


def test_cli_bad_option(tmp_path, tiny_path):
    r = run_script("finetune.py", "--model", "tiny", "--task", "arc", "--out", tmp_path / "o", "--replay_fraction", "0.2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "needs --replay_task" in lines[0] and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- chains of three


def test_chain_of_three_stages(tmp_path, tiny_path):
    small = {"steps": 2, "train_size": 32, "batch_size": 8}
    r1 = finetune.train_stage({"model": "tiny", "task": "toxigen", "out": str(tmp_path / "A"), **small})
    r2 = finetune.train_stage({"model": str(tmp_path / "A"), "task": "arc", "out": str(tmp_path / "AB"), **small})
    r3 = finetune.train_stage({"model": str(tmp_path / "AB"), "task": "bbq", "out": str(tmp_path / "ABC"), **small})
    run3 = json.load(open(tmp_path / "ABC" / "run.json"))
    assert run3["chain"] == ["toxigen", "arc", "bbq"] and run3["stage"] == 3 and run3["task"] == "bbq"
    assert run3["parent_run_id"] == r2["run_id"] and r2["parent_run_id"] == r1["run_id"] and run3 == r3
    assert len({r1["run_id"], r2["run_id"], r3["run_id"]}) == 3 and run3["base_model"] == "tiny"
    lineage = json.load(open(tmp_path / "ABC" / "chained_tuning.json"))
    assert lineage["chain"] == ["toxigen", "arc", "bbq"] and lineage["run_id"] == r3["run_id"]


# ----------------------------------------------------------------------------- order.py


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def make_study(root):
    """Hand-made runs: first stages of toxigen, bbq, arc with curvature; chains in both orders."""
    acc1 = {"toxigen": 0.90, "bbq": 0.80, "arc": 0.70}
    rho = {"toxigen": 40.0, "bbq": 5.0, "arc": 12.0}
    for t in acc1:
        write(f"{root}/s1/{t}/run.json", {"run_id": f"id-{t}", "parent_run_id": None, "chain": [t], "task": t,
                                          "lr": 1e-3, "stage": 1, "seed": 0})
        write(f"{root}/s1/{t}/eval.json", {"tasks": {t: {"acc": acc1[t]}}})
        write(f"{root}/curv/{t}/curvature.json", {"task": t, "rho": rho[t], "run_id": f"id-{t}"})
    write(f"{root}/curv/toxigen-b/curvature.json", {"task": "toxigen", "rho": 60.0, "run_id": "id-toxigen"})
    # measured chains: acc of the first task after the second stage (two seeds for toxigen->arc)
    chained = {("toxigen", "arc", 0): 0.60, ("toxigen", "arc", 1): 0.70, ("arc", "toxigen", 0): 0.65,
               ("bbq", "arc", 0): 0.78, ("arc", "bbq", 0): 0.60, ("toxigen", "bbq", 0): 0.89, ("bbq", "toxigen", 0): 0.70}
    for (x, y, s), acc in chained.items():
        write(f"{root}/s2/{x}-{y}/seed{s}/run.json", {"run_id": f"id-{x}-{y}-{s}", "parent_run_id": f"id-{x}",
                                                      "chain": [x, y], "task": y, "lr": 1e-3, "stage": 2, "seed": s})
        write(f"{root}/s2/{x}-{y}/seed{s}/eval.json", {"tasks": {x: {"acc": acc}, y: {"acc": 0.5}}})
    return rho


def test_order_recommendation_and_check(tmp_path):
    root = str(tmp_path / "study")
    make_study(root)
    rho, problems = order.curvature_by_task(f"{root}/curv", ["toxigen", "bbq", "arc"])
    assert rho["toxigen"]["rho"] == 50.0 and rho["toxigen"]["n"] == 2 and not problems
    assert order.recommend_order({"toxigen": 50.0, "bbq": 5.0, "arc": 12.0}) == ["bbq", "arc", "toxigen"]
    assert order.recommend_order({"a": 1.0, "b": 1.0}) == ["a", "b"]
    runs = order.read_runs(root)
    measured, _ = order.measured_forgetting(runs)
    assert sorted(f for f, _ in measured[("toxigen", "arc")]) == pytest.approx([0.2, 0.3])
    pairs = {tuple(p["tasks"]): p for p in order.check_pairs(["toxigen", "bbq", "arc"], rho, measured)}
    ta = pairs[("toxigen", "arc")]  # toxigen->arc forgets 0.25 on average, arc->toxigen 0.05: arc first is better
    assert ta["recommended"] == ["arc", "toxigen"] and ta["less_forgetting"] == "arc->toxigen" and ta["agrees"] is True
    assert ta["measured"]["toxigen->arc"]["forgetting"] == pytest.approx(0.25)
    assert ta["measured"]["toxigen->arc"]["n"] == 2
    ba = pairs[("bbq", "arc")]  # bbq->arc forgets 0.02, arc->bbq 0.10: bbq first (flatter) agrees
    assert ba["recommended"] == ["bbq", "arc"] and ba["agrees"] is True
    tb = pairs[("toxigen", "bbq")]  # toxigen->bbq 0.01, bbq->toxigen 0.10: recommendation (bbq first) disagrees
    assert tb["recommended"] == ["bbq", "toxigen"] and tb["less_forgetting"] == "toxigen->bbq" and tb["agrees"] is False


def test_order_cli(tmp_path):
    root = str(tmp_path / "study")
    make_study(root)
    out = tmp_path / "order.json"
    r = run_script("order.py", "--tasks", "toxigen,bbq,arc", "--curvature", f"{root}/curv", "--runs", root, "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["recommended_order"] == ["bbq", "arc", "toxigen"] and res["agreement"] == {"checked": 3, "agree": 2}
    assert "bbq -> arc -> toxigen" in r.stdout and "rho 50" in r.stdout
    assert "toxigen->arc: +25.00% (n=2)" in r.stdout          # printed in percent; order.json keeps fractions
    ta = next(p for p in res["pairs"] if p["tasks"] == ["toxigen", "arc"])
    assert ta["measured"]["toxigen->arc"]["forgetting"] == pytest.approx(0.25)
    # a curvature file of the wrong task for its run is left out with a note; --lr filters by the run's lr
    write(f"{root}/curv/wrong/curvature.json", {"task": "arc", "rho": 1e6, "run_id": "id-bbq"})
    res, problems = order.curvature_by_task(f"{root}/curv", ["arc"], order.read_runs(root))
    assert res["arc"]["rho"] == 12.0 and any("tuned on bbq" in p for p in problems)
    assert not order.curvature_by_task(f"{root}/curv", ["arc"], order.read_runs(root), lr=1e-4)[0]
    # bad input: a task without curvature, an unknown task
    r = run_script("order.py", "--tasks", "toxigen,csqa", "--curvature", f"{root}/curv")
    assert r.returncode == 2 and r.stderr.startswith("error: no usable curvature.json for csqa")
    r = run_script("order.py", "--tasks", "toxigen,nope", "--curvature", f"{root}/curv")
    assert r.returncode == 2 and "unknown task" in r.stderr
    r = run_script("order.py", "--tasks", "toxigen,arc", "--curvature", tmp_path / "missing")
    assert r.returncode == 2 and "is not a folder" in r.stderr
    assert np.isfinite(res["arc"]["rho"])


def test_order_measured_chains_leave_out_mitigated_and_incomparable(tmp_path):
    """Only plain-recipe two-task chains are measured (metrics.is_measured_chain, order.py's rule too), and
    only when both evaluations of the first task are comparable (metrics.incomparable)."""
    root = str(tmp_path / "study")
    make_study(root)
    for name, cfg in (("l2", {"l2_to_init": 0.1}), ("mix", {"replay_task": "toxigen", "replay_fraction": 0.05}),
                      ("ewc", {"ewc": 10.0}), ("part", {"train_fraction": 0.5})):
        write(f"{root}/mit/{name}/run.json", {"run_id": f"id-{name}", "parent_run_id": "id-toxigen", "stage": 2,
                                              "chain": ["toxigen", "arc"], "task": "arc", "lr": 1e-3, "seed": 0,
                                              "config": cfg})
        write(f"{root}/mit/{name}/eval.json", {"tasks": {"toxigen": {"acc": 0.90}, "arc": {"acc": 0.5}}})
    # a chain whose toxigen evaluation is another data source / fewer examples than its first stage's
    write(f"{root}/s1/toxigen/eval.json", {"tasks": {"toxigen": {"acc": 0.90, "source": "synthetic", "n": 10}}})
    for s_, block in ((0, {"source": "synthetic", "n": 10}), (1, {"source": "synthetic", "n": 10}),
                      (2, {"source": "/data/real", "n": 10}), (3, {"source": "synthetic", "n": 4})):
        write(f"{root}/s2/toxigen-arc/seed{s_}/run.json", {"run_id": f"id-ta-{s_}", "parent_run_id": "id-toxigen",
                                                          "chain": ["toxigen", "arc"], "task": "arc", "lr": 1e-3,
                                                          "stage": 2, "seed": s_})
        write(f"{root}/s2/toxigen-arc/seed{s_}/eval.json",
              {"tasks": {"toxigen": {"acc": 0.6 + 0.1 * (s_ % 2), **block}, "arc": {"acc": 0.5}}})
    runs = order.read_runs(root)
    assert not metrics.is_measured_chain(runs["id-l2"].meta) and metrics.is_measured_chain(runs["id-ta-0"].meta)
    assert metrics.mitigation_of(runs["id-part"].meta) == {"train_fraction": 0.5}
    measured, problems = order.measured_forgetting(runs)
    assert sorted(r for _, r in measured[("toxigen", "arc")]) == ["id-ta-0", "id-ta-1"]
    assert sorted(f for f, _ in measured[("toxigen", "arc")]) == pytest.approx([0.2, 0.3])
    assert any("seed2" in p and "source 'synthetic' vs '/data/real'" in p for p in problems)
    assert any("seed3" in p and "n 10 vs 4" in p and "cannot be compared" in p for p in problems)
    # the numbers are checked before anything is read
    r = run_script("order.py", "--tasks", "toxigen,arc", "--curvature", f"{root}/curv", "--runs", root, "--lr2", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr2 must be > 0, got 0"
