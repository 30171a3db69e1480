"""attention_hvp.py (causal blocks, the fused softmax double backward) against PyTorch's math SDPA kernel, and
HessianOperator with it against the operator without it and against the dense Hessian.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_attention_hvp.py
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chained_tuning.hessian import attention as A  # noqa: E402
import curvature as C  # noqa: E402
from test_curvature import dense_hessian, make_batch, needs_ext, rel  # noqa: E402

EXT = C.load_extension()["ok"]
FUSED = [False] + ([True] if EXT else [])
B, H, L, D = 2, 4, 24, 8


def qkv(seed, kv_heads=H):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, L, D, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return make(H), make(kv_heads), make(kv_heads)


def causal(pad_right=0, pad_left=0):
    """HF's boolean mask [B, 1, L, L]: causal and the key not padding (row 0 padded)."""
    keys = torch.ones(B, L, dtype=torch.bool)
    if pad_right:
        keys[0, -pad_right:] = False
    if pad_left:
        keys[0, :pad_left] = False
    return torch.ones(L, L, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]


def additive(mask):
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))


def not_causal():
    m = causal().clone()
    m[1, 0, 3, L - 1] = True  # one query sees one key past its block
    return m


MASKS = {
    "bool causal, right padding": lambda: {"attn_mask": causal(pad_right=5)},
    "float causal": lambda: {"attn_mask": additive(causal(pad_right=3))},
    "is_causal": lambda: {"is_causal": True},
    "left padding: fully masked rows": lambda: {"attn_mask": causal(pad_left=4)},
    "not causal (runs whole)": lambda: {"attn_mask": not_causal()},
    "no mask": lambda: {},
}


def sdpa_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def value_grad_hvp(fn, q, k, v, seed=7):
    """The output, the gradient of <out, w> and the Hessian-vector product of <out, w> along u, in float64."""
    out = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
    us = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v)]
    hv = torch.autograd.grad(sum((a * u).sum() for a, u in zip(grads, us)), (q, k, v))
    return [t.detach() for t in [out, *grads, *hv]]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("case", list(MASKS))
def test_block_sdpa_equals_the_math_kernel(case, fused):
    q, k, v = qkv(0)
    kw = MASKS[case]()
    want = value_grad_hvp(lambda a, b, c: sdpa_math(a, b, c, **kw), q, k, v)
    got = value_grad_hvp(lambda a, b, c: A.block_sdpa(a, b, c, **kw, min_block=4, fused=fused), q, k, v)
    for x, y in zip(got, want):
        assert float((x - y).abs().max()) <= 1e-12 * max(float(y.abs().max()), 1.0)
    if case.startswith("left"):
        assert bool((got[0][0, :, :4] == 0).all())  # the fully masked rows are 0, as the math kernel gives


@pytest.mark.parametrize("fused", FUSED)
def test_half_precision_is_computed_in_float32_as_the_math_kernel_does(fused):
    q, k, v = (t.detach().to(torch.bfloat16) for t in qkv(4))
    want = sdpa_math(q, k, v, attn_mask=causal(pad_right=5))
    got = A.block_sdpa(q, k, v, attn_mask=causal(pad_right=5), min_block=4, fused=fused)
    assert got.dtype == torch.bfloat16
    differ = float((got.float() != want.float()).double().mean())  # in bf16 arithmetic about half of them do
    assert differ <= 0.02, f"{differ:.1%} of the outputs differ from the math kernel's"


def test_causal_edges_only_where_every_later_key_is_masked():
    assert A.causal_edges(additive(causal(pad_right=5)), L, L, blocks=4, min_block=4) == [0, 6, 12, 18, 24]
    assert A.causal_edges(additive(causal()), L, L, blocks=4, min_block=8) == [0, 8, 16, 24]  # 3 blocks of >= 8
    assert A.causal_edges(additive(not_causal()), L, L, blocks=4, min_block=4) is None
    assert A.causal_edges(additive(causal()), L, L, blocks=4, min_block=13) is None  # one block: whole
    assert A.causal_edges(additive(causal())[..., :L - 1], L, L - 1, blocks=4, min_block=4) is None


@pytest.mark.parametrize("fused", FUSED)
def test_grouped_kv_heads(fused):
    q, k, v = qkv(1, kv_heads=2)
    want = value_grad_hvp(lambda a, b, c: sdpa_math(a, b, c, is_causal=True, enable_gqa=True), q, k, v)
    got = value_grad_hvp(lambda a, b, c: A.block_sdpa(a, b, c, is_causal=True, enable_gqa=True, min_block=4,
                                                        fused=fused), q, k, v)
    for x, y in zip(got, want):
        assert float((x - y).abs().max()) <= 1e-12 * max(float(y.abs().max()), 1.0)


@needs_ext
def test_fused_double_backward_gradgradcheck_and_third_order_branch():
    q, k, v = (t.detach()[:1, :2, :9].requires_grad_() for t in qkv(2))
    fn = lambda a, b, c: A.block_sdpa(a, b, c, is_causal=True, min_block=3, fused=True)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    # the same HVP with create_graph=True runs _SoftmaxBackward's differentiable branch, not the fused op
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    inner = sum((a * a.detach()).sum() for a in grads)
    hv_fused = torch.autograd.grad(inner, (q, k, v), retain_graph=True)
    hv_graph = torch.autograd.grad(inner, (q, k, v), create_graph=True)
    for x, y in zip(hv_fused, hv_graph):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


def test_the_mode_routes_cpu_sdpa_without_dropout_only():
    q, k, v = qkv(3)
    with A.block_attention(min_block=4, fused=False) as mode:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        F.scaled_dot_product_attention(q, k, v, scale=-0.1)
        torch.matmul(q, k.transpose(-2, -1))
    assert mode.routed == 1
    with pytest.raises(ValueError, match="dropout"):
        A.block_sdpa(q, k, v, dropout_p=0.1)


# ------------------------------------------------------------------------------------- in HessianOperator
def sdpa_llama(attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(torch.float64)


def long_batches():
    return [make_batch(3, 70, 1, n_answer=5), make_batch(2, 66, 2, n_answer=3)]


@pytest.mark.parametrize("ce", ["torch"] + (["auto"] if EXT else []))
def test_operator_with_blocks_equals_the_models_attention(ce):
    """70-token rows: blocks of 32 rows at the operator's defaults; loss, H v and the first-order gradient equal
    the operator built on the model's own SDPA (autograd's double backward of the math kernel)."""
    model = sdpa_llama()
    C._prepare_model(model)
    mine = C.HessianOperator(model, long_batches(), fused_ce=ce, block_attention=True)
    ref = C.HessianOperator(model, long_batches(), fused_ce=ce, block_attention=False)
    assert mine.attention == ("blocks_fused" if ce == "auto" else "blocks") and ref.attention == "model"
    assert abs(mine.loss_value - ref.loss_value) <= 1e-13 * abs(ref.loss_value)
    v = mine.random(5)
    for a, b in zip(mine.hvp(v), ref.hvp(v)):
        assert float((a - b).abs().max()) <= 1e-11 * max(float(b.abs().max()), 1e-6)
    for a, b in zip(mine.gradient(), ref.gradient()):
        assert float((a - b).abs().max()) <= 1e-12 * max(float(b.abs().max()), 1e-6)


def test_eager_attention_runs_as_sdpa_in_the_blocks():
    """A float32 model loaded with eager attention: the operator switches it to SDPA inside its forwards (the same
    function and arithmetic), routes that into the blocks, and gives the model back as it was; its H v matches
    the model's own to float32 rounding. A float64 model keeps eager (its softmax rounds in float32, SDPA's
    would not)."""
    model = sdpa_llama(attn="eager").float()
    C._prepare_model(model)
    op = C.HessianOperator(model, long_batches()[:1], fused_ce="torch")
    ref = C.HessianOperator(model, long_batches()[:1], fused_ce="torch", block_attention=False)
    assert op.attention == "blocks" and ref.attention == "model"
    assert model.config._attn_implementation == "eager"
    assert abs(op.loss_value - ref.loss_value) <= 1e-5 * abs(ref.loss_value)
    v = op.random(5)
    a, b = (torch.cat([t.reshape(-1) for t in x.hvp(v)]) for x in (op, ref))
    assert float((a - b).norm() / b.norm()) <= 1e-4
    wide = sdpa_llama(attn="eager")
    C._prepare_model(wide)
    assert C.HessianOperator(wide, long_batches()[:1], fused_ce="torch").attention == "model"


@pytest.mark.parametrize("backend", ["torch"] + (["extension"] if EXT else []))
def test_lanczos_with_blocks_matches_dense(backend, monkeypatch):
    """hessian_spectrum on an SDPA model, blocks forced down to 4 rows (so that 10-token rows use them), against
    the dense float64 Hessian built with the model's own attention."""
    monkeypatch.setattr(A, "MIN_BLOCK", 4)
    model = sdpa_llama()
    bs = [make_batch(3, 10, 1), make_batch(2, 8, 2, n_answer=3)]
    with sdpa_kernel(SDPBackend.MATH):  # the one SDPA kernel with a double backward
        dense = dense_hessian(model, bs)
    r = C.hessian_spectrum(model, bs, rtol=1e-7, max_iter=400, backend=backend, stop="both")
    assert r["converged"], r.get("warning")
    assert r["backend"]["attention"] == ("blocks_fused" if backend == "extension" else "blocks")
    assert rel(r["lambda_max"], dense["lmax"]) <= 1e-5
    assert rel(r["lambda_min"], dense["lmin"]) <= 1e-5
    assert rel(r["loss"], dense["loss"]) <= 1e-12
    with pytest.raises(C.CurvatureError, match="block_attention must be True or False"):
        C.hessian_spectrum(model, bs, block_attention="yes")


def test_cat_and_prefix_slices_second_derivatives():
    """_Cat (the KV cache's torch.cat inside the context) and _Prefixes (the blocks' key and value slices): first
    and second derivatives against finite differences (float64), and the context routes a cat only where a
    gradient is needed."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: A._Cat.apply(-2, a, b), (a, b))
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: A._Prefixes.apply(x, [2, 5, 7], -1), (x,))
    with A.block_attention():
        routed = torch.cat([a, b], dim=-2)
        plain = torch.cat([a.detach(), b.detach()], dim=-2)
    assert type(routed.grad_fn).__name__ == "_CatBackward" and plain.grad_fn is None
    assert torch.equal(routed, torch.cat([a, b], dim=-2))
