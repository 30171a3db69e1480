"""The `hessian` C++ ops against plain-PyTorch references, torch.library.opcheck, gradcheck/gradgradcheck.

Needs the extension (installed with `python setup.py build_ext --inplace`, else JIT-built once into build/jit);
skipped, with the reason, when neither loads (e.g. no C++ compiler). CUDA tests skip without a GPU.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvature as C  # noqa: E402

_STATE = C.load_extension()
pytestmark = pytest.mark.skipif(not _STATE["ok"], reason=f"hessian extension unavailable: {_STATE['detail']}")
ops = torch.ops.hessian if _STATE["ok"] else None
IGN = -100
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensors(dtype, seed, device="cpu", shapes=((7, 5), (13,), (3, 4, 6), (70001,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def xent_inputs(N=9, V=37, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[1] = IGN
    y[N - 1] = IGN
    return x.requires_grad_(requires_grad), y


# ------------------------------------------------------------------------------------- multi-tensor steps
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_lanczos_step_matches_reference(dtype, tol, device):
    w, v, vp = tensors(dtype, 0, device), tensors(dtype, 1, device), tensors(dtype, 2, device)
    beta = torch.tensor(0.37, dtype=torch.float64, device=device)
    vp_ref = [t.clone() for t in vp]
    out = ops.lanczos_step(w, v, vp, beta)
    ref = C.lanczos_step_torch(w, v, vp_ref, 0.37)
    assert out.dtype == torch.float64
    assert torch.allclose(out.cpu(), ref, rtol=1e-12 if dtype == torch.float64 else 1e-5)
    for a, b in zip(vp, vp_ref):
        assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)
    # float64 accumulation: the new vector has unit norm to float64 rounding of the stored values
    nrm = sum(float(t.double().pow(2).sum()) for t in vp) ** 0.5
    assert abs(nrm - 1) < (1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 1e-2)


def test_lanczos_step_noncontiguous_w():
    w = [t.t() for t in tensors(torch.float32, 0, shapes=((5, 7), (6, 8)))]
    v, vp = tensors(torch.float32, 1, shapes=((7, 5), (8, 6))), tensors(torch.float32, 2, shapes=((7, 5), (8, 6)))
    ref_vp = [t.clone() for t in vp]
    out = ops.lanczos_step(w, v, vp, torch.tensor(0.5, dtype=torch.float64))
    ref = C.lanczos_step_torch(w, v, ref_vp, 0.5)
    assert torch.allclose(out, ref, rtol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(vp, ref_vp))


def test_float64_accumulation_beats_float32():
    # 4M float32 ones/sqrt(n): a float32 running sum drifts; the op's float64 accumulation does not
    n = 1 << 22
    v = [torch.full((n,), 1.0 / n ** 0.5, dtype=torch.float32)]
    w = [t.clone() for t in v]
    out = ops.power_step(w, [t.clone() for t in v])
    exact = float(v[0].double().pow(2).sum())
    assert abs(float(out[0]) - exact) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_power_step_matches_reference(dtype, device):
    w, v = tensors(dtype, 0, device), tensors(dtype, 1, device)
    v_ref = [t.clone() for t in v]
    out = ops.power_step(w, v)
    ref = C.power_step_torch(w, v_ref)
    assert torch.allclose(out.cpu(), ref, rtol=1e-12 if dtype == torch.float64 else 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 1e-2
    assert all(torch.allclose(a.double(), b.double(), atol=tol) for a, b in zip(v, v_ref))


def test_step_opcheck():
    w, v, vp = tensors(torch.float32, 0), tensors(torch.float32, 1), tensors(torch.float32, 2)
    torch.library.opcheck(ops.lanczos_step, (w, v, vp, torch.tensor(0.2, dtype=torch.float64)))
    torch.library.opcheck(ops.power_step, (w, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shard_ops_match_reference(dtype, device):
    w, v, vp = tensors(dtype, 0, device), tensors(dtype, 1, device), tensors(dtype, 2, device)
    vp_ref = [t.clone() for t in vp]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(ops.shard_dot(w, v).cpu(), C.shard_dot_torch(w, v), rtol=tol)
    a, b = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)
    sq = ops.lanczos_update(w, v, vp, a.to(device), b.to(device))
    ref = C.lanczos_update_torch(w, v, vp_ref, a, b)
    assert torch.allclose(sq.cpu(), ref, rtol=tol)
    assert all(torch.allclose(x.double(), y.double(), rtol=tol, atol=tol) for x, y in zip(vp, vp_ref))


def _two_shards(step, full_args, split):
    """Run `step` on two shards of flat vectors in two threads, allreduce = the sum over the threads."""
    import threading
    barrier, parts, out = threading.Barrier(2), {}, [None, None]

    def allreduce(t):
        parts[threading.get_ident()] = t.clone()
        barrier.wait()  # both parts in
        total = sum(parts.values())
        barrier.wait()  # both summed before either writes its next part
        return total

    def run(r):
        out[r] = step(*[[a[0][split[r]:split[r + 1]]] for a in full_args[:3]], *full_args[3:], allreduce=allreduce)
    ths = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    return out


@pytest.mark.parametrize("use_ext", [True, False])
def test_sharded_lanczos_step_equals_unsharded(use_ext):
    """Two shards, each stepped with its local halves and the float64 scalars summed, give the step on the
    whole vector: the same [alpha, beta_next] and the same next Lanczos vector."""
    n = 1001
    w, v, vp = (torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (0, 1, 2))
    beta = torch.tensor(0.4, dtype=torch.float64)
    whole_vp = [vp.clone()]
    ref = ops.lanczos_step([w], [v], whole_vp, beta)
    shard_vp = vp.clone()
    split = [0, 400, n]
    outs = _two_shards(lambda a, b, c, bt, allreduce: C.sharded_lanczos_step(a, b, c, bt, allreduce, use_ext),
                       ([w], [v], [shard_vp], beta), split)
    for o in outs:
        assert torch.allclose(o, ref, rtol=1e-12)
    assert torch.allclose(shard_vp, whole_vp[0], rtol=1e-12, atol=1e-14)  # the shards wrote their slices
    pv = v.clone()
    pouts = _two_shards(lambda a, b, c, allreduce: C.sharded_power_step(a, b, allreduce, use_ext),
                        ([w], [pv], [pv]), split)
    pref_v = [v.clone()]
    pref = ops.power_step([w], pref_v)
    assert all(torch.allclose(o, pref, rtol=1e-12) for o in pouts)
    assert torch.allclose(pv, pref_v[0], rtol=1e-12)


def test_shard_ops_opcheck():
    w, v, vp = tensors(torch.float32, 0), tensors(torch.float32, 1), tensors(torch.float32, 2)
    torch.library.opcheck(ops.shard_dot, (w, v))
    a, b = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    torch.library.opcheck(ops.lanczos_update, (w, v, vp, a, b))


# ---------------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_softmax_xent_forward(dtype, tol, device):
    x, y = xent_inputs(dtype=dtype, device=device)
    loss, probs = ops.softmax_xent(x, y, IGN)
    ref = F.cross_entropy(x, y, ignore_index=IGN, reduction="none")
    assert torch.allclose(loss, ref.to(loss.dtype), rtol=tol, atol=tol)
    valid = y != IGN
    assert torch.allclose(probs[valid], torch.softmax(x[valid], -1), rtol=tol, atol=tol)
    assert (probs[~valid] == 0).all()


def test_softmax_xent_large_vocab_bf16():
    x, y = xent_inputs(N=4, V=32000, dtype=torch.bfloat16)
    loss, probs = ops.softmax_xent(x, y, IGN)
    ref = F.cross_entropy(x.float(), y, ignore_index=IGN, reduction="none")
    assert loss.dtype == torch.float32 and probs.dtype == torch.bfloat16
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-4)


def test_softmax_xent_bad_label():
    x, y = xent_inputs()
    y[0] = 10_000
    with pytest.raises(RuntimeError, match="out of range"):
        ops.softmax_xent(x, y, IGN)


def _fused_loss(x, y):
    return ops.softmax_xent(x, y, IGN)[0].sum()


def test_softmax_xent_gradients_match_autograd():
    x, y = xent_inputs(requires_grad=True)
    (g1,) = torch.autograd.grad(_fused_loss(x, y), x, create_graph=True)
    (g2,) = torch.autograd.grad(F.cross_entropy(x, y, ignore_index=IGN, reduction="sum"), x, create_graph=True)
    assert torch.allclose(g1, g2, atol=1e-12)
    V = torch.randn_like(x)
    (h1,) = torch.autograd.grad(g1, x, V)  # Hessian-vector product with respect to the logits
    (h2,) = torch.autograd.grad(g2, x, V)
    assert torch.allclose(h1, h2, atol=1e-12)


def test_softmax_xent_gradcheck_gradgradcheck():
    x, y = xent_inputs(N=5, V=7, requires_grad=True)
    # both outputs (loss rows and probabilities) are differentiable
    assert torch.autograd.gradcheck(lambda t: ops.softmax_xent(t, y, IGN), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.softmax_xent(t, y, IGN)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.softmax_xent(t, y, IGN)[0] * torch.arange(5.0, dtype=t.dtype)
                                        , (x,))


def test_xent_backward_ops_gradcheck():
    x, y = xent_inputs(N=4, V=6)
    p = torch.softmax(x, -1).masked_fill((y == IGN)[:, None], 0).requires_grad_()
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.softmax_xent_backward(a, b, y, IGN), (g, p))


def test_xent_ops_opcheck():
    x, y = xent_inputs(requires_grad=True)
    torch.library.opcheck(ops.softmax_xent, (x, y, IGN))
    p = torch.softmax(x.detach(), -1).requires_grad_()
    g = torch.randn(x.shape[0], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.softmax_xent_backward, (g, p, y, IGN))
    W = torch.randn_like(p)
    torch.library.opcheck(ops.softmax_xent_backward_backward, (W, g.detach(), p.detach(), y, IGN))
    torch.library.opcheck(ops.softmax_backward, (W, p.detach()))


def test_xent_backward_backward_matches_reference():
    x, y = xent_inputs()
    p = torch.softmax(x, -1).masked_fill((y == IGN)[:, None], 0)
    g = torch.randn(x.shape[0], dtype=torch.float64)
    W = torch.randn_like(x)
    gg, gp = ops.softmax_xent_backward_backward(W, g, p, y, IGN)
    valid = (y != IGN).double()
    onehot = F.one_hot(y.clamp(min=0), x.shape[1]).double()
    assert torch.allclose(gg, valid * ((W * (p - onehot)).sum(-1)), atol=1e-12)
    assert torch.allclose(gp, valid[:, None] * g[:, None] * W, atol=1e-12)
    G = torch.randn_like(x)
    out = ops.softmax_backward(G, p)
    assert torch.allclose(out, p * (G - (p * G).sum(-1, keepdim=True)), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_softmax_backward_backward_matches_autograd(dtype, tol):
    """Against autograd's own double backward of softmax (softmax_double_backward), on [B, H, L, S] with a
    masked upper triangle (zeros in p, as attention's causal mask leaves them) and a fully masked row."""
    g = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    x = x.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    x[0, 1, 2] = float("-inf")
    x = x.requires_grad_()
    G = torch.randn(x.shape, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(x.shape, generator=g, dtype=torch.float64)
    p = torch._safe_softmax(x, -1)
    dx = torch._softmax_backward_data(G, p, -1, p.dtype)
    want_G, want_p = torch.autograd.grad(dx, (G, p), W)
    d = lambda t: t.detach().to(dtype)  # noqa: E731
    got_G, got_p = ops.softmax_backward_backward(d(W), d(G), d(p))
    assert got_G.dtype == dtype and got_p.dtype == dtype
    scale = max(float(want_G.abs().max()), float(want_p.abs().max()))
    assert float((got_G.double() - want_G).abs().max()) <= tol * scale
    assert float((got_p.double() - want_p).abs().max()) <= tol * scale
    assert bool((got_G[0, 1, 2] == 0).all())  # a fully masked row (p = 0) gets nothing


def test_softmax_backward_backward_opcheck_and_bad_input():
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(3, 4, 9, generator=g, dtype=torch.float64), -1)
    W = torch.randn(p.shape, generator=g, dtype=torch.float64)
    G = torch.randn(p.shape, generator=g, dtype=torch.float64)
    torch.library.opcheck(ops.softmax_backward_backward, (W, G, p))
    torch.library.opcheck(ops.softmax_backward_backward, (W.transpose(0, 1), G.transpose(0, 1), p.transpose(0, 1)))
    with pytest.raises(RuntimeError, match="one shape"):
        ops.softmax_backward_backward(W[:, :2], G, p)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.softmax_backward_backward(W.float(), G, p)


# ---------------------------------------------------------------------------- fused linear + cross-entropy
def lx_inputs(N=9, d=5, V=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = (2 * torch.randn(V, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = IGN
    y[N - 1] = IGN
    return h, W, y


@pytest.mark.parametrize("chunk", [0, 2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_linear_xent_matches_autograd(dtype, tol, chunk):
    """Loss, gradient and Hessian-vector products (both cotangents, and each alone) against autograd's
    F.linear + F.cross_entropy, with ignored rows, row weights and several row chunks."""
    h, W, y = lx_inputs(dtype=dtype)
    wt = torch.randn(h.shape[0], dtype=dtype)
    f = lambda a, b: (ops.linear_xent(a, b, y, IGN, chunk)[0] * wt).sum()  # noqa: E731
    r = lambda a, b: (F.cross_entropy(a @ b.T, y, ignore_index=IGN, reduction="none") * wt).sum()  # noqa: E731
    assert torch.allclose(f(h, W), r(h, W), rtol=tol, atol=tol)
    g1 = torch.autograd.grad(f(h, W), (h, W), create_graph=True)
    g2 = torch.autograd.grad(r(h, W), (h, W), create_graph=True)
    assert all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(g1, g2))
    u, U = torch.randn_like(h), torch.randn_like(W)
    for outs, cot in (((0, 1), (u, U)), ((0,), (u,)), ((1,), (U,))):
        h1 = torch.autograd.grad([g1[i] for i in outs], (h, W), cot, retain_graph=True)
        h2 = torch.autograd.grad([g2[i] for i in outs], (h, W), cot, retain_graph=True)
        assert all(torch.allclose(a, b, rtol=10 * tol, atol=10 * tol) for a, b in zip(h1, h2))


def test_linear_xent_probs_and_bf16():
    h, W, y = lx_inputs(N=6, d=8, V=3000, dtype=torch.bfloat16)
    loss, probs = ops.linear_xent(h, W, y, IGN)
    assert loss.dtype == torch.float32 and probs.dtype == torch.float32 and not probs.requires_grad
    ref = F.cross_entropy((h @ W.T).float(), y, ignore_index=IGN, reduction="none")
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-4)
    valid = y != IGN
    assert torch.allclose(probs[valid], torch.softmax((h @ W.T).float()[valid], -1), atol=1e-6)
    assert (probs[~valid] == 0).all()
    (gh, gW) = torch.autograd.grad(loss.sum(), (h, W), create_graph=True)
    (rh, rW) = torch.autograd.grad(ref.sum(), (h, W), create_graph=True)
    assert gh.dtype == torch.bfloat16 and torch.allclose(gh.float(), rh.float(), rtol=2e-2, atol=2e-2)
    u = torch.randn_like(h)
    hv = torch.autograd.grad(gh, (h, W), u, retain_graph=True)
    rv = torch.autograd.grad(rh, (h, W), u)
    for a, b in zip(hv, rv):
        assert float((a.float() - b.float()).norm()) <= 3e-2 * float(b.float().norm())


def test_linear_xent_gradcheck_gradgradcheck():
    h, W, y = lx_inputs(N=5, d=3, V=7)
    fn = lambda a, b: ops.linear_xent(a, b, y, IGN, 2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, W))
    assert torch.autograd.gradgradcheck(fn, (h, W))

    # the backward op with probs = linear_xent(hidden, weight)[1] (its documented contract)
    def bw(g, a, b):
        p = ops.linear_xent(a.detach(), b.detach(), y, IGN)[1]
        return ops.linear_xent_backward(g, a, b, p, y, IGN, 3)

    g = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bw, (g, h, W))


def test_linear_xent_bad_inputs():
    h, W, y = lx_inputs()
    y[0] = 10_000
    with pytest.raises(RuntimeError, match="out of range"):
        ops.linear_xent(h, W, y, IGN)
    with pytest.raises(RuntimeError, match="hidden"):
        ops.linear_xent(h, W[:, :3], y, IGN)


def test_linear_xent_opcheck():
    h, W, y = lx_inputs()
    torch.library.opcheck(ops.linear_xent, (h, W, y, IGN, 4))
    p = ops.linear_xent(h.detach(), W.detach(), y, IGN)[1]
    g = torch.randn(h.shape[0], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.linear_xent_backward, (g, h, W, p, y, IGN, 4))
    u, U = torch.randn_like(h), torch.randn_like(W)
    torch.library.opcheck(ops.linear_xent_hvp, (u, U, g.detach(), h.detach(), W.detach(), p, y, IGN, 4))
    torch.library.opcheck(ops.linear_xent_hvp, (None, U, g.detach(), h.detach(), W.detach(), p, y, IGN, 0))


# ------------------------------------------------------------------------------------------ solve loops
def _quadratic_problem(n=40, seed=0):
    """A quadratic loss 0.5 x^T A x with known spectrum, as a retained first-order graph."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(-2.0, 5.0, n, dtype=torch.float64)
    A = Q @ torch.diag(ev) @ Q.T
    x1 = torch.randn(n // 2, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(n - n // 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.cat([x1, x2])
    loss = 0.5 * x @ A @ x
    grads = torch.autograd.grad(loss, [x1, x2], create_graph=True)
    return list(grads), [x1, x2], ev


def test_lanczos_solve_op_matches_python_loop():
    grads, params, ev = _quadratic_problem()
    v0 = C._start_vector(params, 0)
    a, b, code, times = ops.lanczos_solve(grads, [0, 1], params, v0, 100, 1e-10, 0)
    assert code in (1, 2)
    assert times.shape == a.shape and bool((times.diff() >= 0).all())
    lmin, lmax, _, _ = C.ritz_extremes(a.tolist(), b.tolist())
    assert abs(lmax - 5.0) < 1e-9 and abs(lmin + 2.0) < 1e-9

    class Op:
        def hvp(self, v):
            return list(torch.autograd.grad(grads, params, v, retain_graph=True))

    a2, b2, code2 = C._lanczos_python(Op(), v0, 100, 1e-10, C.lanczos_step_torch, "both")
    assert code2 == code and len(a2) == a.numel()
    assert torch.allclose(a, torch.tensor(a2, dtype=torch.float64), atol=1e-10)
    # the dominant-end rule (the op's default) stops no later, on the same code as the Python rule
    a3, b3, code3, _ = ops.lanczos_solve(grads, [0, 1], params, v0, 100, 1e-10)
    a4, _, code4 = C._lanczos_python(Op(), v0, 100, 1e-10, C.lanczos_step_torch, "dominant")
    assert code3 == code4 and a3.numel() == len(a4) <= a.numel()
    assert abs(C.ritz_extremes(a3.tolist(), b3.tolist())[1] - 5.0) < 1e-9


def test_power_solve_op_matches_python_loop():
    grads, params, ev = _quadratic_problem()
    v0 = C._start_vector(params, 1)
    h, code, times = ops.power_solve(grads, [0, 1], params, v0, 2000, 1e-12)
    assert times.numel() == h.shape[0]

    class Op:
        def hvp(self, v):
            return list(torch.autograd.grad(grads, params, v, retain_graph=True))

    hist, code2 = C._power_python(Op(), v0, 2000, 1e-12, C.power_step_torch)
    assert code == code2 == 1 and h.shape[0] == len(hist)
    assert abs(h[-1, 0].item() - hist[-1][0]) < 1e-10
    assert abs(h[-1, 0].item() - 5.0) < 1e-4


def test_solve_ops_are_functional():
    # opcheck cannot drive these: its test_schema runs the op on detached copies, and the loop needs the
    # caller's autograd graph. Check instead what test_schema would: no declared or undeclared mutation.
    for op in (ops.lanczos_solve, ops.power_solve):
        assert all(a.alias_info is None for a in op.default._schema.arguments)
    grads, params, _ = _quadratic_problem(n=10)
    v0 = C._start_vector(params, 0)
    before = [t.clone() for t in v0 + [p.detach() for p in params]]
    ops.lanczos_solve(grads, [0, 1], params, v0, 5, 1e-8)
    ops.power_solve(grads, [0, 1], params, v0, 5, 1e-8)
    assert all(torch.equal(a, b) for a, b in zip(before, v0 + [p.detach() for p in params]))


# ----------------------------------------------------------------------------------------------- builds
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernels_compile_with_nvcc_without_torch(tmp_path):
    src = os.path.join(ROOT, "csrc", "cuda", "hessian_kernels.cu")
    p = subprocess.run(["nvcc", "-std=c++17", "-O1", "-c", src, "-o", str(tmp_path / "k.o")], capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_xent_double_backward_matches_cpu():
    x, y = xent_inputs(N=6, V=1000, dtype=torch.float32)
    xc = x.cuda().requires_grad_()
    xh = x.clone().requires_grad_()
    (gc,) = torch.autograd.grad(_fused_loss(xc, y.cuda()), xc, create_graph=True)
    (gh,) = torch.autograd.grad(_fused_loss(xh, y), xh, create_graph=True)
    V = torch.randn_like(x)
    (hc,) = torch.autograd.grad(gc, xc, V.cuda())
    (hh,) = torch.autograd.grad(gh, xh, V)
    assert torch.allclose(hc.cpu(), hh, atol=1e-5)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_setup_py_builds_cpu_extension(tmp_path):
    env = dict(os.environ, HESSIAN_FORCE_CPU="1", MAX_JOBS="2")
    p = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert any(f.startswith("curvature_ext") and f.endswith(".so") for f in os.listdir(tmp_path / "lib"))


def test_a_killed_builds_lock_is_dropped_a_live_one_kept(tmp_path):
    from chained_tuning.hessian import ops
    lock = tmp_path / "lock"
    lock.write_text("")
    ops._drop_stale_lock(str(tmp_path))
    assert lock.exists()  # a build may hold it now
    old = time.time() - ops.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    ops._drop_stale_lock(str(tmp_path))
    assert not lock.exists()  # left by a killed build: torch would wait for it forever
    ops._drop_stale_lock(str(tmp_path))  # no lock: nothing to do
