"""The layers of a Llama-family model for Hessian-vector products: each a node or two, its backward's backward in
one or two passes.

    from chained_tuning.hessian.fused_layers import fused_layers
    with fused_layers(model) as swapped:   # the model's norms, MLP gates, linear layers and rotary embedding
        loss = model(...)                   # the first-order graph built here makes every HVP through it cheaper

An HVP on a retained graph runs the first backward backwards, node by node. Autograd takes HF's RMSNorm (x in
float32, pow, mean, rsqrt, two products) through some thirty elementwise passes over [rows, hidden], the MLP's
silu(gate) * up through a dozen over [rows, intermediate], the rotary embedding's backward through a cat and two
zero-filled slices, and wraps every linear layer's matmuls in views and transposes that are nodes of their own
(about ten per linear layer; at some 10 us a node they were a sixth of the tiny Llama's HVP). Here:
- RMSNorm and the SwiGLU gate: one autograd node whose backward is another node (hessian::rms_norm_backward,
  swiglu_backward) whose backward is one kernel (rms_norm_backward_backward, swiglu_backward_backward; csrc/cpu);
- the rotary embedding x cos + rotate_half(x) sin: linear in x, so its backward is the adjoint rotation and that
  one's backward the rotation again, in four PyTorch ops each;
- a bias-free linear layer: two nodes, the same six matmuls per HVP as autograd's (_LinearBackward).
The forwards are the model's own ops, so the outputs are bit-identical; the derivatives are the closed forms
below, checked against autograd's in tests/test_fused_layers.py. A third derivative (create_graph through an HVP)
runs the same closed forms in differentiable PyTorch ops.

Only float32 or float64 modules on CPU of the shapes HF's Llama family uses are swapped:
- an RMSNorm: a module whose class name ends in "RMSNorm" with a 1-D `weight` and a float `variance_epsilon`
  (Llama, Mistral, Qwen2); y = weight * x * (mean(x^2) + eps)^-1/2, computed in float32 as HF does (a float64
  module is left alone: HF rounds it through float32, which the closed forms would not);
- a SwiGLU MLP: `gate_proj`, `up_proj` and `down_proj` linear layers and a SiLU `act_fn`;
  down_proj(silu(gate_proj(x)) * up_proj(x));
- an nn.Linear without bias (a LoRA adapter's too: a frozen weight gets no gradient formed);
- the attention's modeling module's apply_rotary_pos_emb(q, k, cos, sin) next to a rotate_half (swapped in the
  module for the context's length).
HessianOperator uses them only after finding the model's forward the same with them (answer_loss.py's probe),
so a module that only looks like these (Gemma's 1 + weight) is caught there. Imports ops.py alone.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from . import ops

FUSED_OPS = ("rms_norm_backward", "rms_norm_backward_backward", "swiglu_backward", "swiglu_backward_backward",
             "rotary")


def fused_layers_available() -> bool:
    """Whether the four ops are registered (a library built before they existed lacks them)."""
    try:
        return all(hasattr(torch.ops.hessian, name) for name in FUSED_OPS)
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------- the closed forms in PyTorch ops
def rms_norm_backward_ref(gy, x, w, rstd):
    """(gx, gw) of y = w x rstd: u = w gy, c = <x, u> / n; gx = rstd u - rstd^3 c x; gw = sum_rows gy x rstd."""
    n = x.shape[-1]
    u = w * gy
    c = (x * u).sum(-1, keepdim=True) / n
    return rstd * u - rstd ** 3 * c * x, (gy * x * rstd).reshape(-1, n).sum(0)


def rms_norm_backward_backward_ref(A, B, gy, x, w, rstd):
    """The backward of rms_norm_backward_ref w.r.t. (gy, x, w) given A = d/d gx, B = d/d gw (rstd a function of
    x): see csrc/cpu/hessian_cpu.cpp for the formula."""
    n = x.shape[-1]
    u = w * gy
    c = (x * u).sum(-1, keepdim=True) / n
    au, ax = (A * u).sum(-1, keepdim=True), (A * x).sum(-1, keepdim=True)
    bg = (B * gy * x).sum(-1, keepdim=True)
    r3 = rstd ** 3
    P = rstd * A - r3 * ax / n * x
    d_x = x * (3 * r3 * rstd ** 2 * c * ax - r3 * au - r3 * bg) / n - r3 * ax / n * u - r3 * c * A + rstd * B * gy
    return w * P + B * x * rstd, d_x, (gy * P).reshape(-1, n).sum(0)


def swiglu_backward_ref(gh, a, b):
    """(ga, gb) of h = silu(a) b."""
    s = torch.sigmoid(a)
    return gh * b * s * (1 + a * (1 - s)), gh * a * s


def swiglu_backward_backward_ref(A, B, gh, a, b):
    """The backward of swiglu_backward_ref w.r.t. (gh, a, b) given A = d/d ga, B = d/d gb."""
    s = torch.sigmoid(a)
    d1 = s * (1 + a * (1 - s))
    d2 = s * (1 - s) * (2 + a * (1 - 2 * s))
    return A * b * d1 + B * a * s, gh * (A * b * d2 + B * d1), A * gh * d1


# ------------------------------------------------------------------------------- the autograd nodes
def _rstd(x, eps):
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _RMSNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, w, rstd, eps):
        ctx.save_for_backward(gy, x, w, rstd)
        ctx.eps = eps
        return tuple(ops.rms_norm_backward(gy, x, w, rstd))

    @staticmethod
    def backward(ctx, A, B):
        gy, x, w, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative asked for: the closed form in differentiable ops, rstd
            return (*rms_norm_backward_backward_ref(A, B, gy, x, w, _rstd(x, ctx.eps)), None, None)  # of x
        return (*ops.rms_norm_backward_backward(A.contiguous(), B.contiguous(), gy, x, w, rstd), None, None)


class _RMSNorm(torch.autograd.Function):
    """y = w * x * rstd with HF's arithmetic; its backward differentiable through _RMSNormBackward."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, w, rstd)
        ctx.eps = eps
        return w * (x * rstd)

    @staticmethod
    def backward(ctx, gy):
        x, w, rstd = ctx.saved_tensors
        gx, gw = _RMSNormBackward.apply(gy.contiguous(), x, w, rstd, ctx.eps)
        return gx, gw, None


class _SwiGLUBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gh, a, b, s):
        ctx.save_for_backward(gh, a, b, s)
        return tuple(ops.swiglu_backward(gh, a, b, s))

    @staticmethod
    def backward(ctx, A, B):
        gh, a, b, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative asked for: the closed form in differentiable ops
            return (*swiglu_backward_backward_ref(A, B, gh, a, b), None)
        return (*ops.swiglu_backward_backward(A.contiguous(), B.contiguous(), gh, a, b, s), None)


class _SwiGLU(torch.autograd.Function):
    """h = silu(a) * b with HF's arithmetic, sigmoid(a) kept for the kernels; its backward differentiable
    through _SwiGLUBackward."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b, torch.sigmoid(a))
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, gh):
        a, b, s = ctx.saved_tensors
        return _SwiGLUBackward.apply(gh.contiguous(), a, b, s)


class _LinearBackward(torch.autograd.Function):
    """(gx, gW) = (gy W, gy^T x) of y = x W^T, rows flattened, each only where asked (a frozen LoRA base weight
    needs no gW); its backward, given A = d/d gx and B = d/d gW: d gy = A W^T + x B^T, d x = gy B,
    d W = gy^T A. The same six matmuls per linear as autograd's, in two nodes instead of about ten (the views and
    transposes around every mm were each a node of the HVP)."""

    @staticmethod
    def forward(ctx, gy, x, w, need_x, need_w):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, x, w)
        g2 = gy.reshape(-1, gy.shape[-1])
        return ((g2 @ w).view(x.shape) if need_x else None,
                (g2.t() @ x.reshape(-1, x.shape[-1])) if need_w else None)

    @staticmethod
    def backward(ctx, A, B):
        gy, x, w = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        g2 = gy.reshape(-1, gy.shape[-1])
        d_gy = d_x = d_w = None
        if need_gy and (A is not None or B is not None):
            x2 = x.reshape(-1, x.shape[-1])
            if A is None:
                d_gy = x2 @ B.t()
            else:
                d_gy = A.reshape(-1, A.shape[-1]) @ w.t()
                if B is not None:  # accumulated into by the matmul itself (out of place where graphed)
                    d_gy = torch.addmm(d_gy, x2, B.t()) if torch.is_grad_enabled() else d_gy.addmm_(x2, B.t())
            d_gy = d_gy.view(gy.shape)
        if need_x and B is not None:
            d_x = (g2 @ B).view(x.shape)
        if need_w and A is not None:
            d_w = g2.t() @ A.reshape(-1, A.shape[-1])
        return d_gy, d_x, d_w, None, None


class _Linear(torch.autograd.Function):
    """y = F.linear(x, W) (no bias), its backward differentiable through _LinearBackward."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx, gw = _LinearBackward.apply(gy, x, w, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _RotaryT(torch.autograd.Function):
    """R^T g = g cos - rotate_half(g sin), the adjoint of the rotation (hessian::rotary, one pass); linear in g,
    so its backward is R."""

    @staticmethod
    def forward(ctx, g, cos, sin):
        ctx.save_for_backward(cos, sin)
        return ops.rotary(g, cos, sin, True)

    @staticmethod
    def backward(ctx, gg):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative asked for: R through _Rotary, differentiable
            return _Rotary.apply(gg, cos, sin), None, None
        return ops.rotary(gg, cos, sin, False), None, None


class _Rotary(torch.autograd.Function):
    """R x = x cos + rotate_half(x) sin (HF's rotary embedding, its arithmetic) for cos and sin without gradient:
    linear in x, so its backward is R^T and that one's backward R again. Autograd's backward of HF's form goes
    through a cat and two slices (each a zero-filled tensor) per call."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return (x * cos) + (_rotate_half(x) * sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _RotaryT.apply(g, cos, sin), None, None


def _rotary(original):
    """HF's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) through _Rotary (the original where cos or sin
    carries a gradient, the call has other arguments, or q, k, cos and sin are not float32/float64 CPU tensors of
    one dtype: the kernel's case. OLMo-2 rotates float64 q and k by float32 cos and sin; the probe, a forward
    without gradients, would not see the backward's dtype error)."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        dim = kwargs.get("unsqueeze_dim", args[0] if len(args) == 1 else 1)
        if (len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or cos.requires_grad or sin.requires_grad
                or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64)
                or not q.dtype == k.dtype == cos.dtype == sin.dtype):
            return original(q, k, cos, sin, *args, **kwargs)
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
        return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)
    apply_rotary_pos_emb.fused = True
    return apply_rotary_pos_emb


# ------------------------------------------------------------------------------------ the modules
def _is_rms_norm(m) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.dtype == torch.float32 and w.device.type == "cpu"
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_swiglu_mlp(m) -> bool:
    parts = [getattr(m, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(m, "act_fn", None)
    return (all(isinstance(p, torch.nn.Linear) for p in parts) and isinstance(act, torch.nn.Module)
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation")
            and parts[0].weight.dtype in (torch.float32, torch.float64) and parts[0].weight.device.type == "cpu")


def _is_plain_linear(m) -> bool:
    return (type(m) is torch.nn.Linear and m.bias is None and m.weight.dtype in (torch.float32, torch.float64)
            and m.weight.device.type == "cpu")


def _linear_forward(m):
    def forward(x):
        if x.dtype != m.weight.dtype:
            return F.linear(x, m.weight)
        return _Linear.apply(x, m.weight)
    return forward


def _rms_norm_forward(m):
    def forward(x):
        if x.dtype != torch.float32:
            return type(m).forward(m, x)
        return _RMSNorm.apply(x, m.weight, m.variance_epsilon)
    return forward


def _swiglu_forward(m):
    def forward(x):
        return m.down_proj(_SwiGLU.apply(m.gate_proj(x), m.up_proj(x)))
    return forward


def _rotary_modules(model):
    """The modeling modules (sys.modules entries) of the model's attention layers that define HF's
    apply_rotary_pos_emb beside rotate_half, not yet swapped."""
    found = {}
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if (type(m).__name__.endswith("Attention") and callable(fn) and callable(getattr(mod, "rotate_half", None))
                and not getattr(fn, "fused", False)):
            found[mod.__name__] = mod
    return list(found.values())


@contextlib.contextmanager
def fused_layers(model):
    """A context: inside it the model's RMSNorm and SwiGLU MLP modules and its modeling module's
    apply_rotary_pos_emb (see the module docstring) run the fused forms; yields the number of modules swapped
    (0: none matched or the ops are not loaded)."""
    if not fused_layers_available():
        yield 0
        return
    swapped, rotary = [], _rotary_modules(model)
    for m in model.modules():
        if "forward" in vars(m):  # already swapped (a nested context) or patched by someone else: leave it
            continue
        if _is_rms_norm(m):
            m.forward = _rms_norm_forward(m)
            swapped.append(m)
        elif _is_swiglu_mlp(m):
            m.forward = _swiglu_forward(m)
            swapped.append(m)
        elif _is_plain_linear(m):
            m.forward = _linear_forward(m)
            swapped.append(m)
    originals = [mod.apply_rotary_pos_emb for mod in rotary]
    for mod, fn in zip(rotary, originals):
        mod.apply_rotary_pos_emb = _rotary(fn)
    try:
        yield len(swapped) + len(rotary)
    finally:
        for m in swapped:
            del m.forward
        for mod, fn in zip(rotary, originals):
            mod.apply_rotary_pos_emb = fn
