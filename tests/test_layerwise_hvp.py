"""layerwise_hvp.py (the HVP one decoder layer at a time) against autograd's double backward and the dense Hessian.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_layerwise_hvp.py
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curvature as C  # noqa: E402
from chained_tuning.hessian.layerwise import LayerwiseHVP, unsupported  # noqa: E402
from test_curvature import batches, dense_hessian, make_batch, rel  # noqa: E402


def llama(layers=2, tied=False, pad=None, attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=12, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn, tie_word_embeddings=tied, pad_token_id=pad)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def direction(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """HF's RMSNorm computes in float32 even in a float64 model, and forward-mode and reverse-mode round that
    cast differently (~5e-8); with the same function in float64 the two products agree to rounding."""
    import transformers.models.llama.modeling_llama as M

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(M.LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize("tied,pad", [(False, None), (True, 5), (False, 5)])
def test_equals_double_backward_to_rounding(float64_rmsnorm, tied, pad):
    """Two layers, padded rows, a tied LM head and a padding row in the embedding: the same H v as the retained
    double backward (which excludes the padding row, as nn.Embedding's backward does)."""
    model = llama(tied=tied, pad=pad)
    bs = batches()
    if pad is not None:
        for b in bs:
            b["input_ids"][:, 0] = pad  # the padding id inside attended text: its row gets no gradient
    op = C.HessianOperator(model, bs, fused_ce="torch")
    v = direction(op.params)
    ref = flat(op.hvp(v))
    lw = LayerwiseHVP(model, op.params, op.total_tokens, C._answer_positions, C._math_sdpa)
    parts = [[torch.zeros_like(p) if t is None else t for t, p in zip(lw.hvp(b, v), op.params)] for b in bs]
    got = sum(flat(x) for x in parts)
    assert float((got - ref).norm() / ref.norm()) <= 1e-12
    if pad is not None and not tied:
        assert float(sum(x[0][pad].abs().sum() for x in parts)) == 0  # params[0]: the embedding
    assert abs(sum(float(lw.loss(b)) for b in bs) - op.loss_value) <= 1e-12


def test_matches_the_dense_hessian():
    """gradient_checkpointing='on' (every micro-batch layer-wise, no graph retained) against the dense float64
    Hessian of curvature.py's tests (eager attention, whose softmax runs in float32: ~1e-7)."""
    from test_curvature import tiny_llama

    model = tiny_llama()
    dense = dense_hessian(model, batches())
    r, op = C.hessian_spectrum(model, batches(), rtol=1e-9, max_iter=400, stop="both",
                               gradient_checkpointing="on", return_operator=True)
    assert r["graphs"] == {**r["graphs"], "retained": 0, "recomputed": 0, "layerwise": 2}
    assert r["settings"]["gradient_checkpointing"] == "on" and r["settings"]["start_vector"] != "subsample"
    for k, d in (("lambda_max", "lmax"), ("lambda_min", "lmin"), ("rho", "rho")):
        assert rel(r[k], dense[d]) <= 1e-5, k
    v = direction(op.params)
    hv = flat(op.hvp(v))
    ref = dense["H"] @ flat(v)
    assert float((hv - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    assert abs(r["loss"] - dense["loss"]) <= 1e-12


@pytest.mark.parametrize("mode,recomputed,layerwise", [("auto", 0, 2), ("off", 2, 0)])
def test_over_budget_goes_layerwise_in_auto(mode, recomputed, layerwise):
    """Where no graph fits the budget, auto takes the micro-batches layer by layer, off rebuilds them whole;
    both give the dense Hessian's rho."""
    from test_curvature import tiny_llama

    model = tiny_llama()
    dense = dense_hessian(model, batches())
    r = C.hessian_spectrum(model, batches(), rtol=1e-9, max_iter=400, graph_memory_budget=1,
                           gradient_checkpointing=mode)
    assert (r["graphs"]["retained"], r["graphs"]["recomputed"], r["graphs"]["layerwise"]) == (0, recomputed, layerwise)
    assert rel(r["rho"], dense["rho"]) <= 1e-5


def test_partly_retained_partly_layerwise():
    """Graphs retained up to the budget, the rest layer-wise: the same H v as all retained."""
    model = llama(layers=1, attn="eager")
    bs = [make_batch(3, 10, s) for s in range(4)]
    full = C.HessianOperator(model, bs, fused_ce="torch")
    part = C.HessianOperator(model, bs, fused_ce="torch", graph_memory_budget=full.graph_bytes * 2)
    assert part.retained >= 1 and part.layerwise and not part.recompute
    v = direction(full.params)
    a, b = flat(full.hvp(v)), flat(part.hvp(v))
    assert float((a - b).norm() / a.norm()) <= 1e-6


def test_unsupported_model_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=32, n_embd=8, n_layer=1, n_head=2)).double().eval()
    assert "not laid out like an HF Llama" in unsupported(gpt2)
    with pytest.raises(C.CurvatureError, match="--gradient_checkpointing auto or off"):
        C.hessian_spectrum(gpt2, batches(), gradient_checkpointing="on")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = C.hessian_spectrum(gpt2, batches(), graph_memory_budget=1, max_iter=3)  # auto: rebuilt whole
    assert r["graphs"]["recomputed"] == 2 and r["graphs"]["layerwise"] == 0
    with pytest.raises(C.CurvatureError, match="gradient_checkpointing must be one of auto, on, off"):
        C.hessian_spectrum(gpt2, batches(), gradient_checkpointing="yes")


def test_cli_flag(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(ROOT, "curvature.py"), "--model", "tiny", "--task", "arc", "--samples", "4",
            "--micro_batch_size", "2", "--device", "cpu"]
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad.json"), "--gradient_checkpointing", "maybe"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "--gradient_checkpointing" in bad.stderr and not (tmp_path / "bad.json").exists()
    ok = subprocess.run(base + ["--out", str(tmp_path / "c.json"), "--gradient_checkpointing", "on"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    import json
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["graphs"]["layerwise"] == 2 and res["graphs"]["retained"] == 0
    assert res["settings"]["gradient_checkpointing"] == "on" and res["rho"] > 0


def test_subsample_start_with_checkpointing_on_refused_before_work(tmp_path):
    from test_curvature import tiny_llama

    with pytest.raises(C.CurvatureError, match="--start subsample needs"):
        C.run_cli(C.build_parser().parse_args(["--model", str(tmp_path / "absent"), "--task", "arc", "--out",
                                               str(tmp_path / "c.json"), "--start", "subsample",
                                               "--gradient_checkpointing", "on"]))
    with pytest.raises(C.CurvatureError, match="start subsample needs"):
        C.hessian_spectrum(tiny_llama(), batches(), start="subsample", gradient_checkpointing="on")
    assert not (tmp_path / "c.json").exists()
