"""fused_layers.py (RMSNorm, the SwiGLU gate and the rotary embedding with their backward and its backward fused)
against autograd's own derivatives of HF's forms, torch.library.opcheck, gradgradcheck, and HessianOperator with
them against the operator without them and against the dense Hessian.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_fused_layers.py
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvature as C  # noqa: E402
from chained_tuning.hessian import fused_layers as FL  # noqa: E402
from chained_tuning.hessian import ops, solvers  # noqa: E402
from test_curvature import dense_hessian, make_batch, rel  # noqa: E402

EXT = C.load_extension()["ok"] and FL.fused_layers_available()
needs_ops = pytest.mark.skipif(not EXT, reason="the extension with the fused layer ops is not loaded")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def hf_rms_norm(x, w, eps):
    """HF LlamaRMSNorm's forward, in x's dtype (float64 here: the reference derivatives)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def autograd_second(f, inputs, seeds):
    """(first backward of f at `inputs` for output cotangent seeds[0], and the backward of that first backward
    for cotangents seeds[1:]), both by autograd: the independent reference of the kernels."""
    out = f(*inputs)
    first = torch.autograd.grad(out, inputs, seeds[0], create_graph=True)
    second = torch.autograd.grad(first, (seeds[0], *inputs), seeds[1:], allow_unused=True)
    return first, second


@needs_ops
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rms_norm_kernels_match_autograd(dtype, tol):
    """The two kernels against autograd's first and second derivatives of HF's RMSNorm (float64), on a
    non-contiguous [2, 5, 16] input."""
    g, eps = gen(0), 1e-5
    x = torch.randn(5, 2, 16, generator=g, dtype=torch.float64).transpose(0, 1).requires_grad_()
    w = torch.randn(16, generator=g, dtype=torch.float64).requires_grad_()
    gy = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).requires_grad_()
    A, B = torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    (gx, gw), (d_gy, d_x, d_w) = (tuple(t.detach() for t in ts) for ts in autograd_second(
        lambda x, w: hf_rms_norm(x, w, eps), (x, w), (gy, A, B)))
    d = lambda t: t.detach().to(dtype)  # noqa: E731
    rstd = FL._rstd(d(x), eps)
    got = ops.rms_norm_backward(d(gy), d(x), d(w), rstd) + ops.rms_norm_backward_backward(
        d(A), d(B), d(gy), d(x), d(w), rstd)
    for mine, want in zip(got, (gx, gw, d_gy, d_x, d_w)):
        assert mine.dtype == dtype and mine.shape == want.shape
        assert float((mine.double() - want).abs().max()) <= tol * float(want.abs().max())
    x, w, gy = x.detach(), w.detach(), gy.detach()
    refs = FL.rms_norm_backward_ref(gy, x, w, FL._rstd(x, eps)) + FL.rms_norm_backward_backward_ref(
        A, B, gy, x, w, FL._rstd(x, eps))
    for ref, want in zip(refs, (gx, gw, d_gy, d_x, d_w)):
        assert float((ref - want).abs().max()) <= 1e-12 * float(want.abs().max())


@needs_ops
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_swiglu_kernels_match_autograd(dtype, tol):
    g = gen(1)
    a = (3 * torch.randn(4, 24, generator=g, dtype=torch.float64)).t().requires_grad_()  # non-contiguous
    b = torch.randn(24, 4, generator=g, dtype=torch.float64).requires_grad_()
    gh = torch.randn(24, 4, generator=g, dtype=torch.float64).requires_grad_()
    A, B = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randn(24, 4, generator=g, dtype=torch.float64)
    (ga, gb), (d_gh, d_a, d_b) = (tuple(t.detach() for t in ts) for ts in autograd_second(
        lambda a, b: F.silu(a) * b, (a, b), (gh, A, B)))
    d = lambda t: t.detach().to(dtype)  # noqa: E731
    s = torch.sigmoid(d(a))
    got = ops.swiglu_backward(d(gh), d(a), d(b), s) + ops.swiglu_backward_backward(d(A), d(B), d(gh), d(a), d(b), s)
    for mine, want in zip(got, (ga, gb, d_gh, d_a, d_b)):
        assert mine.dtype == dtype
        assert float((mine.double() - want).abs().max()) <= tol * float(want.abs().max())


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotary_kernel_is_the_rotation_and_its_adjoint(dtype):
    """hessian::rotary against HF's rotation in PyTorch ops on a non-contiguous [B, H, T, D] with HF's broadcast
    cos and sin, and its adjoint against <R x, g> = <x, R^T g>."""
    g = gen(5)
    x = torch.randn(2, 6, 3, 8, generator=g, dtype=torch.float64).transpose(1, 2).to(dtype)
    cos, sin = (torch.randn(2, 1, 6, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    want = x * cos + FL._rotate_half(x) * sin
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((ops.rotary(x, cos, sin, False) - want).abs().max()) <= tol * float(want.abs().max())
    y = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dtype)
    lhs, rhs = float((want.double() * y.double()).sum()), float((x.double() * ops.rotary(y, cos, sin, True).double()).sum())
    assert abs(lhs - rhs) <= tol * float((want.double() * y.double()).abs().sum())
    torch.library.opcheck(torch.ops.hessian.rotary.default, (x, cos, sin, True))
    with pytest.raises(RuntimeError, match="broadcast"):
        ops.rotary(x, cos[:, :, :3], sin, False)
    with pytest.raises(RuntimeError, match="even"):
        ops.rotary(x[..., :3], cos[..., :3], sin[..., :3], False)


@needs_ops
def test_opcheck_and_bad_input():
    g = gen(2)
    x, gy, A = (torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(3))
    w, B = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    rstd = FL._rstd(x, 1e-6)
    lib = torch.ops.hessian
    torch.library.opcheck(lib.rms_norm_backward.default, (gy, x, w, rstd))
    torch.library.opcheck(lib.rms_norm_backward_backward.default, (A, B, gy, x, w, rstd))
    xt = x.t()  # non-contiguous rows
    torch.library.opcheck(lib.rms_norm_backward_backward.default, (A.t(), B[:3], gy.t(), xt, w[:3], FL._rstd(xt, 1e-6)))
    s = torch.sigmoid(x)
    torch.library.opcheck(lib.swiglu_backward.default, (gy, x, A, s))
    torch.library.opcheck(lib.swiglu_backward_backward.default, (A.t(), gy.t(), gy.t(), x.t(), A.t(), s.t()))
    torch.library.opcheck(lib.multi_dot.default, ([x, w], [A, B]))
    with pytest.raises(RuntimeError, match="one value per row"):
        ops.rms_norm_backward(gy, x, w, rstd[:2])
    with pytest.raises(RuntimeError, match="1-D of x's last size"):
        ops.rms_norm_backward(gy, x, w[:3], rstd)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.rms_norm_backward(gy.float(), x.float(), w, rstd.float())
    with pytest.raises(RuntimeError, match="one shape"):
        ops.swiglu_backward(gy, x, A[:2], s)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.swiglu_backward_backward(A, gy, gy, x, A, s.float())
    with pytest.raises(RuntimeError, match="sizes differ"):
        ops.multi_dot([x], [w])


@needs_ops
def test_multi_dot_is_the_float64_inner_product():
    """solvers._dot through hessian::multi_dot equals the float64 inner product of the float32 vectors (its
    products exact, as the chunked path's) to float64 rounding."""
    g = gen(3)
    a = [torch.randn(300, 7, generator=g), torch.randn(11, generator=g)]
    b = [torch.randn(300, 7, generator=g), torch.randn(11, generator=g)]
    want = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    assert solvers._multi_dot_applies(a, b)
    assert abs(solvers._dot(a, b) - want) <= 1e-12 * sum(float((x.double() * y.double()).abs().sum())
                                                        for x, y in zip(a, b))
    assert not solvers._multi_dot_applies(a, [b[0].double(), b[1].double()])  # mixed dtypes: the chunked path


@needs_ops
def test_functions_gradgradcheck():
    """The autograd Functions' first and second derivatives against finite differences (float64), the third
    (create_graph through the backward of the backward) included by gradgradcheck."""
    g = gen(4)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: FL._RMSNorm.apply(x, w, 1e-5), (x, w))
    a, b = (torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(FL._SwiGLU.apply, (a, b))
    cos, sin = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x: FL._Rotary.apply(x, cos, sin), (x,))
    W = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(FL._Linear.apply, (x, W))
    frozen = W.detach()  # a frozen weight (a LoRA base layer): no gradient of it is formed
    assert torch.autograd.gradgradcheck(lambda x: FL._Linear.apply(x, frozen), (x,))


def tiny_sdpa_llama(dtype, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norms away from 1, so that their derivatives are not the identity's
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@needs_ops
def test_context_swaps_and_restores_with_identical_forward():
    from transformers.models.llama import modeling_llama

    model = tiny_sdpa_llama(torch.float32)
    ids = make_batch(2, 9, 5)["input_ids"]
    original = modeling_llama.apply_rotary_pos_emb
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with FL.fused_layers(model) as swapped:
            got = model(input_ids=ids).logits
            assert modeling_llama.apply_rotary_pos_emb is not original
    # the norms, the MLPs, the bias-free linear layers (7 a layer and the head), the modeling module's rotary
    assert swapped == (2 * 2 + 1) + 2 + (2 * 7 + 1) + 1
    assert torch.equal(got, want)  # the models' own forward ops
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not any("forward" in vars(m) for m in model.modules())
    with FL.fused_layers(tiny_sdpa_llama(torch.float64)) as swapped64:
        assert swapped64 == 2 + 15 + 1  # a float64 model keeps HF's RMSNorm (it rounds through float32)


@needs_ops
def test_operator_with_fused_layers_matches_without():
    """HessianOperator on a float32 model: the fused layers swapped in (recorded), H v equal to the operator
    without them to float32 rounding."""
    model = tiny_sdpa_llama(torch.float32)
    bs = [make_batch(3, 10, 1), make_batch(2, 8, 2, n_answer=3)]
    op = C.HessianOperator(model, bs, fused_ce="auto")
    ref = C.HessianOperator(model, bs, fused_ce="auto", block_attention=False)
    assert op.fused_layers == 23 and ref.fused_layers == 0
    v = op.random(3)
    a, b = (torch.cat([t.reshape(-1) for t in o.hvp(v)]) for o in (op, ref))
    assert float((a - b).norm() / b.norm()) <= 1e-5


@needs_ops
def test_spectrum_with_fused_layers_matches_dense():
    """hessian_spectrum on a float64 model (its MLPs and rotary embedding fused) against the dense float64 Hessian
    of the model's own forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_sdpa_llama(torch.float64, layers=1)
    bs = [make_batch(3, 10, 1), make_batch(2, 8, 2, n_answer=3)]
    with sdpa_kernel(SDPBackend.MATH):
        dense = dense_hessian(model, bs)
    r, op = C.hessian_spectrum(model, bs, rtol=1e-7, max_iter=400, stop="both", return_operator=True)
    assert r["backend"]["fused_layers"] == 1 + 8 + 1  # MLP, linear layers, rotary (not the float64 norms)
    assert rel(r["lambda_max"], dense["lmax"]) <= 1e-5 and rel(r["lambda_min"], dense["lmin"]) <= 1e-5
    v = op.random(1)
    flat_v = torch.cat([t.reshape(-1) for t in v])
    Hv = torch.cat([t.reshape(-1) for t in op.hvp(v)])
    # HF's RMSNorm rounds through float32 even here (both sides), so agreement is to ~1e-7
    assert float((Hv - dense["H"] @ flat_v).norm() / (dense["H"] @ flat_v).norm()) <= 1e-6


class _OnePlusRMSNorm(torch.nn.Module):
    """Gemma's form, y = (1 + w) x rstd, under a name and attributes like Llama's: the probe must catch it."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


_OnePlusRMSNorm.__name__ = "LookalikeRMSNorm"


@needs_ops
def test_lookalike_norm_keeps_the_models_layers():
    """A norm the fused form does not compute: the operator keeps the model's layers (fused_layers 0) and still
    runs attention in blocks; its H v equals the operator's without either."""
    model = tiny_sdpa_llama(torch.float32)
    model.model.norm = _OnePlusRMSNorm(model.model.norm)
    bs = [make_batch(3, 10, 1)]
    op = C.HessianOperator(model, bs, fused_ce="auto")
    ref = C.HessianOperator(model, bs, fused_ce="auto", block_attention=False)
    assert op.fused_layers == 0 and op.attention == "blocks_fused"
    v = op.random(2)
    a, b = (torch.cat([t.reshape(-1) for t in o.hvp(v)]) for o in (op, ref))
    assert float((a - b).norm() / b.norm()) <= 1e-5
