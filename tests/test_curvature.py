"""curvature.py against the dense Hessian of a tiny Llama (a few thousand parameters).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_curvature.py
The extension tests build the C++ ops once with the JIT loader (about 20 s on 2 cores, cached in build/jit)
and skip, with the reason, when no compiler is available.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvature as C  # noqa: E402

VOCAB = 48


def tiny_llama(dtype=torch.float64, seed=0, vocab=VOCAB, hidden=12, inter=24):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype)


def make_batch(n, T, seed, n_answer=4, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, T - n_answer:] = ids[:, T - n_answer:]
    am = torch.ones_like(ids)
    am[0, -1] = 0  # right padding on the first row
    labels[0, -1] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def batches():
    return [make_batch(3, 10, 1), make_batch(2, 8, 2, n_answer=3)]


@pytest.fixture(scope="module")
def model64():
    return tiny_llama()


@pytest.fixture(scope="module")
def dense(model64):
    return dense_hessian(model64, batches())


def dense_hessian(model64, bs):
    """Dense Hessian (torch.autograd.functional.hessian, float64) of the same loss, built independently."""
    from torch.func import functional_call

    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in bs)

    def loss(x):
        d, o = {}, 0
        for n, s in zip(names, shapes):
            d[n] = x[o:o + s.numel()].view(s)
            o += s.numel()
        tot = 0
        for b in bs:
            out = functional_call(model64, d, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
            tot = tot + C.answer_loss_sum_ref(out.logits, b["labels"])[0]
        return tot / total

    model64.eval()
    H = torch.autograd.functional.hessian(loss, flat, vectorize=True)
    H = 0.5 * (H + H.T)
    ev = torch.linalg.eigvalsh(H)
    return {"H": H, "lmin": float(ev[0]), "lmax": float(ev[-1]), "rho": float(ev.abs().max()),
            "loss": float(loss(flat)), "flat": flat}


def ext_available():
    st = C.load_extension()
    return st["ok"], st["detail"]


needs_ext = pytest.mark.skipif(not ext_available()[0], reason=f"C++ extension unavailable: {ext_available()[1]}")


def rel(a, b):
    return abs(a - b) / abs(b)


def test_param_count_is_a_few_thousand(model64):
    n = sum(p.numel() for p in model64.parameters())
    assert 1000 <= n <= 5000


@pytest.mark.parametrize("backend,ce,stop", [("torch", "auto", "both"), ("torch", "auto", "dominant"),
                                             pytest.param("extension", "auto", "dominant", marks=needs_ext),
                                             pytest.param("extension", "softmax_xent", "both", marks=needs_ext)])
def test_lanczos_matches_dense(model64, dense, backend, ce, stop):
    r = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend=backend, cross_entropy=ce, stop=stop)
    assert r["converged"], r.get("warning")
    if backend == "extension":
        assert r["backend"]["cross_entropy"] == ("fused_linear_xent" if ce == "auto" else "fused_softmax_xent")
    assert r["settings"]["stop_rule"] == stop
    assert r["converged_ends"]["max" if abs(r["lambda_max"]) >= abs(r["lambda_min"]) else "min"]
    if stop == "both":
        assert r["converged_ends"] == {"max": True, "min": True}
    assert rel(r["lambda_max"], dense["lmax"]) <= 1e-5
    assert rel(r["lambda_min"], dense["lmin"]) <= 1e-5
    assert rel(r["rho"], dense["rho"]) <= 1e-5
    assert r["hvp_count"] == r["iterations"]
    assert r["backend"]["solver_loop"] == ("cpp" if backend == "extension" else "python")
    if backend == "extension" and ce == "auto":
        assert r["backend"]["last_layer"] == "answer_rows"  # the one-layer model's only layer, at the answer rows
    assert abs(r["loss"] - dense["loss"]) <= 1e-12 * max(1.0, dense["loss"])
    for k in ("lambda_max", "lambda_min", "rho", "iterations", "hvp_count", "residual", "converged",
              "wall_time_s", "peak_memory", "settings", "backend"):
        assert k in r


def test_default_rtol_is_within_bound(model64, dense):
    # the stop certifies |rho - rho_true| <= error_bound <= rtol * rho (residual, or residual^2/gap)
    r = C.hessian_spectrum(model64, batches(), backend="torch")
    assert r["converged"] and r["settings"]["stop_rule"] == "dominant" and r["settings"]["rtol"] == 1e-3
    assert r["error_bound"] <= 1e-3 * r["rho"] and r["error_bound"] <= r["residual"]
    assert abs(r["rho"] - dense["rho"]) <= r["error_bound"] + 1e-9 * dense["rho"]
    assert len(r["iteration_times_s"]) == len(r["rho_history"]) == r["iterations"]
    assert all(b >= a for a, b in zip(r["iteration_times_s"], r["iteration_times_s"][1:]))
    assert r["iteration_times_s"][0] >= r["setup_time_s"] and r["iteration_times_s"][-1] <= r["wall_time_s"]
    assert r["rho_history"][-1] == r["rho"]


def test_dominant_stop_rule(model64, dense):
    """The default rule stops once the end giving rho has converged and the other end is bounded below it;
    "both" waits for both ends. Both give rho within tol; the dominant rule never needs more HVPs."""
    dom = C.hessian_spectrum(model64, batches(), tol=1e-5, max_iter=400, backend="torch", stop="dominant")
    both = C.hessian_spectrum(model64, batches(), tol=1e-5, max_iter=400, backend="torch", stop="both")
    assert dom["converged"] and both["converged"]
    assert dom["hvp_count"] <= both["hvp_count"]
    assert both["stop_reason"] in ("bound_both_ends", "invariant_subspace")
    for r in (dom, both):
        assert rel(r["rho"], dense["rho"]) <= 1e-5
    if dom["stop_reason"] == "bound_dominant_end":
        small = min(abs(dom["lambda_min"]), abs(dom["lambda_max"]))
        other_res = dom["residual_min"] if abs(dom["lambda_max"]) >= abs(dom["lambda_min"]) else dom["residual_max"]
        assert small + other_res <= (1 - C.DOMINANT_MARGIN) * dom["rho"]
    with pytest.raises(C.CurvatureError):
        C.hessian_spectrum(model64, batches(), backend="torch", stop="either")


def test_warm_start_stops_where_the_subsample_is_certified(model64, dense, monkeypatch):
    """The warm start's sub-Lanczos stops once H_1's dominant end is certified to WARM_RTOL (at least 2 steps),
    else after WARM_STEPS; the full solve reaches the dense rho either way."""
    from chained_tuning.hessian import solvers
    steps = {}
    for warm_rtol in (1e30, 1e-30):  # certified at once; never
        monkeypatch.setattr(solvers, "WARM_RTOL", warm_rtol)
        r = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend="torch", start="subsample")
        steps[warm_rtol] = r["warm_start"]["steps"]
        assert r["sub_hvp_count"] == steps[warm_rtol] and rel(r["rho"], dense["rho"]) <= 1e-5
    assert steps == {1e30: 2, 1e-30: solvers.WARM_STEPS}


def test_start_vectors(model64, dense):
    """The subsample warm start, the gradient+random start and the random start all converge to the dense
    spectrum. By default Lanczos takes the warm start where it is cheap (8 samples or more) and its basis
    fits in a quarter of the memory budget, else gradient+random; power iteration starts from the random
    vector (eigenthings' way)."""
    warm = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend="torch", start="subsample")
    mixed = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend="torch")
    rnd = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend="torch", start="random")
    assert warm["settings"]["start_vector"] == "subsample" and warm["sub_hvp_count"] == warm["warm_start"]["steps"]
    assert warm["warm_start"]["samples"] == 2 and warm["warm_start"]["seconds"] >= 0
    assert warm["graphs"]["micro_batches"] == 3  # the 2 warm-start samples became a micro-batch of their own
    assert mixed["settings"]["start_vector"] == "gradient+random" and rnd["settings"]["start_vector"] == "random"
    assert mixed["sub_hvp_count"] == 0 and mixed["warm_start"] is None  # 5 samples: too few for the default
    for r in (warm, mixed, rnd):
        assert rel(r["rho"], dense["rho"]) <= 1e-5
        assert rel(r["lambda_min"], dense["lmin"]) <= 1e-5 and r["hvp_count"] == r["iterations"]
    many = [make_batch(3, 10, s) for s in range(4)]  # 12 samples: the warm start is the default
    auto = C.hessian_spectrum(model64, many, backend="torch")
    assert auto["settings"]["start_vector"] == "subsample" and auto["warm_start"]["samples"] == 2
    nbytes = sum(p.numel() * p.element_size() for p in model64.parameters())
    small = C.hessian_spectrum(model64, many, backend="torch", graph_memory_budget=20 * nbytes)
    assert small["settings"]["start_vector"] == "gradient+random"  # 6 vectors > a quarter of the budget
    assert abs(small["rho"] - auto["rho"]) <= small["error_bound"] + auto["error_bound"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pw = C.hessian_spectrum(model64, batches(), method="power", max_iter=2, backend="torch")
    assert pw["settings"]["start_vector"] == "random"
    with pytest.raises(C.CurvatureError):
        C.hessian_spectrum(model64, batches(), backend="torch", start="ones")


def test_first_micro_batch_hvp(model64):
    """keep_first=k splits the first k samples off (the operator is unchanged) and hvp_first is the Hessian of
    their share of the loss: scaled by the token ratio it equals the HVP of an operator built on them alone."""
    bs = batches()
    op = C.HessianOperator(model64, bs, keep_first=2)
    alone = C.HessianOperator(model64, [{k: v[:2] for k, v in bs[0].items()}])
    whole = C.HessianOperator(model64, bs)
    assert len(op.batches) == 3 and op.total_tokens == whole.total_tokens
    v = C._start_vector(op.params, 3)
    scale = op.total_tokens / alone.total_tokens
    got, want = op.hvp_first(v), alone.hvp(v)
    err = max(float((a * scale - b).abs().max()) for a, b in zip(got, want))
    # not 1e-12: HF's RMSNorm computes in float32 even in a float64 model, so the two loss scalings round apart
    assert err <= 1e-6 * max(float(b.abs().max()) for b in want)
    assert op.sub_hvp_count == 1 and op.hvp_count == 0
    full, ref = op.hvp(v), whole.hvp(v)
    assert max(float((a - b).abs().max()) for a, b in zip(full, ref)) <= 1e-6 * max(float(b.abs().max()) for b in ref)


@pytest.mark.parametrize("backend", ["torch", pytest.param("extension", marks=needs_ext)])
def test_power_iteration(model64, dense, backend):
    r = C.hessian_spectrum(model64, batches(), method="power", tol=1e-9, max_iter=1500, backend=backend)
    assert r["converged"]
    assert rel(r["rho"], dense["rho"]) <= 1e-4
    assert r["stop_reason"] == "relative_change"


def test_hvp_matches_dense(model64, dense):
    _, op = C.hessian_spectrum(model64, batches(), max_iter=1, backend="torch", return_operator=True)
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in op.params]
    hv = torch.cat([t.reshape(-1) for t in op.hvp(v)])
    ref = dense["H"] @ torch.cat([t.reshape(-1) for t in v])
    # HF's eager attention runs its softmax in float32 even in a float64 model: ~1e-7 relative noise
    assert float((hv - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("budget,retained", [(1, 0), ("one", 1)])
def test_recompute_when_over_budget(model64, dense, budget, retained):
    if budget == "one":  # the largest graph (measured first) fits, the second (estimated by its size) does not
        with pytest.warns(RuntimeWarning):
            _, op = C.hessian_spectrum(model64, batches(), max_iter=1, backend="auto", return_operator=True)
        budget = op.graph_bytes + op.graph_bytes // 2
    r = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend="auto", graph_memory_budget=budget,
                           gradient_checkpointing="off")  # rebuilt whole (auto: layer-wise, test_layerwise_hvp.py)
    assert r["graphs"]["retained"] == retained
    assert r["graphs"]["recomputed"] == 2 - retained
    assert r["backend"]["solver_loop"] == "python"
    assert rel(r["rho"], dense["rho"]) <= 1e-5
    assert abs(r["loss"] - dense["loss"]) <= 1e-12


@needs_ext
def test_extension_and_fallback_give_same_rho_float32():
    m = tiny_llama(torch.float32, seed=1)
    a = C.hessian_spectrum(m, batches(), tol=1e-5, max_iter=300, backend="torch", stop="both")
    b = C.hessian_spectrum(m, batches(), tol=1e-5, max_iter=300, backend="extension", stop="both")
    assert b["backend"]["cross_entropy"] == "fused_linear_xent"
    assert a["backend"]["cross_entropy"] == "torch_log_softmax_nll"
    assert rel(b["rho"], a["rho"]) <= 1e-5
    assert rel(b["lambda_min"], a["lambda_min"]) <= 1e-4


@needs_ext
def test_linear_xent_only_where_the_head_is_plain():
    """A model whose forward rescales the head's output (like soft-capping) fails the numerical check and
    gets the logits-level fused op; a tied-embedding head is a plain linear head."""
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = 2.0 * out.logits
            return out

    base = tiny_llama(seed=2)
    m = Scaled(base.config).to(torch.float64)
    m.load_state_dict(base.state_dict())
    assert C.linear_head(m) is not None and not C.verify_linear_head(m, batches()[0])
    a = C.hessian_spectrum(m, batches(), tol=1e-7, max_iter=300, backend="torch")
    b = C.hessian_spectrum(m, batches(), tol=1e-7, max_iter=300, backend="extension")
    assert b["backend"]["cross_entropy"] == "fused_softmax_xent"
    assert rel(b["rho"], a["rho"]) <= 1e-9
    with pytest.raises(C.CurvatureError, match="linear_xent"):
        C.hessian_spectrum(m, batches(), backend="extension", cross_entropy="linear_xent")
    tied = tiny_llama(seed=3)
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.model.embed_tokens.weight
    a = C.hessian_spectrum(tied, batches(), tol=1e-7, max_iter=300, backend="torch")
    b = C.hessian_spectrum(tied, batches(), tol=1e-7, max_iter=300, backend="extension")
    assert b["backend"]["cross_entropy"] == "fused_linear_xent"
    assert rel(b["rho"], a["rho"]) <= 1e-9


@needs_ext
def test_extension_and_fallback_same_iterates_float64(model64):
    a = C.hessian_spectrum(model64, batches(), tol=1e-6, max_iter=200, backend="torch")
    b = C.hessian_spectrum(model64, batches(), tol=1e-6, max_iter=200, backend="extension")
    assert a["iterations"] == b["iterations"]
    assert rel(b["rho"], a["rho"]) <= 1e-9


def test_nonconvergence_is_reported(model64):
    with pytest.warns(RuntimeWarning, match="did not converge"):
        r = C.hessian_spectrum(model64, batches(), max_iter=3, backend="torch")
    assert r["converged"] is False and r["stop_reason"] == "max_iter" and "warning" in r
    with pytest.warns(RuntimeWarning):
        r = C.hessian_spectrum(model64, batches(), method="power", max_iter=2, backend="torch")
    assert r["converged"] is False


def test_bad_inputs(model64):
    with pytest.raises(C.CurvatureError):
        C.hessian_spectrum(model64, batches(), method="arnoldi")
    with pytest.raises(C.CurvatureError):
        C.hessian_spectrum(model64, [], backend="torch")
    b = make_batch(2, 6, 0)
    b["labels"][:] = -100
    with pytest.raises(C.CurvatureError, match="no answer tokens"):
        C.hessian_spectrum(model64, [b], backend="torch")
    with pytest.raises(C.CurvatureError):
        C.hessian_spectrum(model64, batches(), tol=0)


def test_loss_matches_finetune_semantics(model64, dense):
    """The operator's loss equals the training loss finetune.py minimises (chained_tuning.loss.answer_loss_sum) and
    the same-semantics reference over full logits."""
    from chained_tuning.loss import answer_loss_sum

    fns = [(C.answer_loss_sum_ref, 1e-12), (answer_loss_sum, 1e-6)]  # the training loss computes in float32
    for fn, tol in fns:
        tot_l, tot_n = 0.0, 0
        with torch.no_grad():
            for b in batches():
                out = model64(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                s, n = fn(out.logits, b["labels"])
                tot_l += float(s)
                tot_n += int(n)
        assert abs(tot_l / tot_n - dense["loss"]) <= tol * dense["loss"]


def test_reference_taylor_terms(model64, dense):
    """0.5 d^T H d from one HVP equals the dense quadratic form; bound >= quadratic term."""
    res, op = C.hessian_spectrum(model64, batches(), tol=1e-7, max_iter=400, backend="torch", return_operator=True)
    g = torch.Generator().manual_seed(5)
    delta = [1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in op.params]
    d = torch.cat([t.reshape(-1) for t in delta])
    quad = 0.5 * float(sum((a * b).sum() for a, b in zip(delta, op.hvp(delta))))
    assert rel(quad, 0.5 * float(d @ dense["H"] @ d)) <= 1e-6
    assert quad <= 0.5 * res["rho"] * float(d @ d)


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(*args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "curvature.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=e, timeout=300)


def test_sample_indices_is_the_one_sampler_of_the_cli_and_the_benchmark():
    import random

    from chained_tuning import common
    assert common.sample_indices(100, 7, 3) == sorted(random.Random(3).sample(range(100), 7))
    assert common.sample_indices(5, 7, 0) == [0, 1, 2, 3, 4]  # fewer items than asked: all of them
    src = "".join(open(os.path.join(ROOT, *f)).read() for f in (["curvature.py"], ["bench", "bench_curvature.py"]))
    assert "random.Random" not in src and src.count("common.sample_indices(") == 2


def test_the_cli_encodes_with_the_training_loss_not_the_training_code():
    """curvature.py builds its batches with chained_tuning.loss at finetune.py's default --max_length, and loads
    neither finetune.py nor the training loop."""
    from chained_tuning import training
    assert C.FINETUNE_MAX_LENGTH == training.default_config()["max_length"]
    code = ("import sys, curvature; print(sorted(m for m in sys.modules if m in ('finetune', 'evaluate', 'tasks') "
            "or m in ('chained_tuning.training', 'chained_tuning.evaluation')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def test_cli_bad_model_dir(tmp_path):
    p = run_cli("--model", str(tmp_path / "nope"), "--task", "arc", "--out", str(tmp_path / "c.json"))
    assert p.returncode == 2
    assert p.stderr.startswith("error:") and "nope" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "c.json").exists()


def test_cli_bad_numbers(tmp_path):
    p = run_cli("--model", "tiny", "--task", "arc", "--out", str(tmp_path / "c.json"), "--samples", "0")
    assert p.returncode == 2 and "--samples" in p.stderr and "Traceback" not in p.stderr


def test_cli_end_to_end_tiny(tmp_path):
    out = tmp_path / "curv.json"
    p = run_cli("--model", "tiny", "--task", "arc", "--samples", "4", "--out", str(out), "--max_iter", "30",
                "--micro_batch_size", "2", "--backend", "torch")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["task"] == "arc" and r["n_samples"] == 4 and len(r["sample_ids"]) == 4
    assert r["rho"] == max(abs(r["lambda_max"]), abs(r["lambda_min"]))
    assert r["reference"] is None
    import random

    import tasks
    pool = tasks.load_task("arc", split="train", seed=0).examples  # the sample: random.Random(--seed), kept
    assert r["sample_ids"] == [pool[i].id for i in sorted(random.Random(0).sample(range(len(pool)), 4))]
    p2 = run_cli("--model", "tiny", "--task", "nosuchtask", "--out", str(out))
    assert p2.returncode == 2 and "nosuchtask" in p2.stderr


def test_cli_reference_taylor_check(tmp_path):
    """--reference: a theta_AB made by perturbing the tiny base; the four Taylor terms are reported."""
    from chained_tuning import checkpoint

    model, tok = checkpoint.load_model_and_tokenizer("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    ref_dir = tmp_path / "theta_ab"
    model.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    out = tmp_path / "curv.json"
    p = run_cli("--model", "tiny", "--task", "arc", "--samples", "4", "--out", str(out), "--max_iter", "40",
                "--micro_batch_size", "4", "--reference", str(ref_dir))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())["reference"]
    assert r["delta_sq_norm"] > 0
    assert r["actual_loss_change"] == pytest.approx(r["loss_A_at_AB"] - r["loss_A_at_A"])
    assert r["bound"] == pytest.approx(0.5 * json.loads(out.read_text())["rho"] * r["delta_sq_norm"])
    assert r["quadratic_le_bound"] == (r["quadratic_term"] <= r["bound"] * (1 + 1e-6) + 1e-12)
    bad = run_cli("--model", "tiny", "--task", "arc", "--out", str(out), "--reference", str(tmp_path / "none"))
    assert bad.returncode == 2 and "--reference" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_taylor_check_reuses_a_spectrum(tmp_path):
    """--spectrum_from takes rho from an earlier curvature.json of the same model and samples: the
    reference terms equal those of a full run, and a file of another model is refused."""
    from finetune import train_stage
    a, ab = str(tmp_path / "a"), str(tmp_path / "ab")
    train_stage({"model": "tiny", "task": "csqa2", "out": a, "steps": 2, "train_size": 32, "batch_size": 8})
    train_stage({"model": a, "task": "arc", "out": ab, "steps": 2, "train_size": 32, "batch_size": 8})
    base = [sys.executable, "curvature.py", "--model", a, "--task", "csqa2", "--samples", "6", "--max_iter", "60"]
    full = subprocess.run(base + ["--reference", ab, "--out", str(tmp_path / "full.json")], cwd=ROOT,
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    reuse = subprocess.run(base + ["--reference", ab, "--spectrum_from", str(tmp_path / "full.json"),
                                   "--out", str(tmp_path / "reuse.json")], cwd=ROOT, capture_output=True, text=True)
    assert reuse.returncode == 0, reuse.stderr
    f, r = (json.load(open(tmp_path / n)) for n in ("full.json", "reuse.json"))
    assert r["rho"] == f["rho"] and r["spectrum_from"].endswith("full.json")
    for k in ("delta_sq_norm", "actual_loss_change", "quadratic_term", "bound"):
        assert r["reference"][k] == pytest.approx(f["reference"][k], rel=1e-6)
    other = subprocess.run([sys.executable, "curvature.py", "--model", ab, "--task", "csqa2", "--samples", "6",
                            "--reference", ab, "--spectrum_from", str(tmp_path / "full.json"),
                            "--out", str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 2 and "computed for another model" in other.stderr
    assert not (tmp_path / "bad.json").exists()
    # several references in one process: each gets the file a one-reference run writes, --out the spectrum
    ab2 = str(tmp_path / "ab2")
    train_stage({"model": a, "task": "toxigen", "out": ab2, "steps": 2, "train_size": 32, "batch_size": 8})
    two = subprocess.run(base + ["--reference", ab, ab2, "--taylor_out", "taylor.json", "--out",
                                 str(tmp_path / "two.json")], cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    t = json.load(open(tmp_path / "two.json"))
    assert t["reference"] is None and t["taylor_files"] == [os.path.join(ab, "taylor.json"),
                                                            os.path.join(ab2, "taylor.json")]
    t1, t2 = (json.load(open(os.path.join(d, "taylor.json"))) for d in (ab, ab2))
    assert t1["rho"] == t["rho"] == t2["rho"] and t1["config"]["reference"] == ab and t2["reference"]["model"] == ab2
    for k in ("delta_sq_norm", "actual_loss_change", "quadratic_term", "bound"):
        assert t1["reference"][k] == pytest.approx(f["reference"][k], rel=1e-6)
    assert t2["reference"]["delta_sq_norm"] != t1["reference"]["delta_sq_norm"]
    many = subprocess.run(base + ["--reference", ab, ab2, "--out", str(tmp_path / "many.json")], cwd=ROOT,
                          capture_output=True, text=True)
    assert many.returncode == 2 and "--taylor_out" in many.stderr and not (tmp_path / "many.json").exists()


def test_rtol_bound_certified_against_arpack():
    """On the tiny checkpoint at the default rtol the returned rho is within the bound it reports of ARPACK's
    (scipy eigsh, tol 1e-6, on the same HVP operator; float64 vectors rounded to float32 for the HVP)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    from chained_tuning import checkpoint, common
    import tasks
    model, tok = checkpoint.load_model_and_tokenizer("tiny")
    pool = tasks.load_task("arc", split="train", seed=0).examples
    bs = C.build_batches(tok, [pool[i] for i in common.sample_indices(len(pool), 4, 0)], 4)
    r, op = C.hessian_spectrum(model, bs, return_operator=True)
    assert r["converged"] and r["settings"]["rtol"] == 1e-3 and r["error_bound"] <= 1e-3 * r["rho"]
    sizes = [p.numel() for p in op.params]

    def matvec(x):
        v = [torch.from_numpy(t.copy()).view(p.shape).float() for t, p in zip(np.split(x.ravel(), np.cumsum(sizes)[:-1]),
                                                                             op.params)]
        return torch.cat([t.reshape(-1) for t in op.hvp(v)]).double().numpy()

    n = sum(sizes)
    (lam,) = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LM", tol=1e-6, ncv=12,
                   return_eigenvectors=False, v0=np.ones(n))
    assert abs(r["rho"] - abs(lam)) <= r["error_bound"] + 1e-6 * abs(lam)  # + float32 HVP rounding


def _lanczos_numpy(d, v, k):
    """alphas, betas of k Lanczos steps (full reorthogonalisation) on diag(d) from v."""
    import numpy as np

    Q, a, b = [v / np.linalg.norm(v)], [], []
    for _ in range(k):
        w = d * Q[-1]
        a.append(float(w @ Q[-1]))
        for _ in range(2):
            for q in Q:
                w = w - (w @ q) * q
        b.append(float(np.linalg.norm(w)))
        Q.append(w / b[-1])
    return a, b


def test_gap_bound_needs_a_resolved_neighbour_and_a_settled_end():
    """r^2/gap only from k = 3 with the next Ritz value resolved, never below the last step's change of the end,
    never above r; and on a spectrum whose top is separated, once the bound is small enough to stop on, it holds
    against the true lambda_max."""
    import numpy as np

    rng = np.random.default_rng(0)
    d = np.concatenate([[9.0, 7.5], rng.uniform(-1.0, 6.0, 400)])
    v = rng.standard_normal(d.size)
    kinds = set()
    for k in range(1, 16):
        a, b = _lanczos_numpy(d, v, k)
        lmin, lmax, rmin, rmax, bmin, bmax = C.ritz_bounds(a, b)
        assert bmax <= rmax and bmin <= rmin
        if bmax <= 1e-2 * lmax:  # where a stop on rtol would take it: theta_max <= lambda_max <= theta + bound
            assert d.max() - lmax <= bmax * (1 + 1e-9) + 1e-12
        if k <= 2:
            assert bmax == rmax  # no gap known yet
        else:
            prev = C.ritz_bounds(a[:-1], b[:-1])[1]
            assert bmax >= min(rmax, abs(lmax - prev)) - 1e-12 * abs(lmax)
        kinds.add("gap" if bmax < rmax else "residual")
    assert kinds == {"gap", "residual"}  # both regimes exercised
