"""The `hessian` operator library of csrc/: loading it (installed, JIT-built or none), a typed wrapper of each op,
and the Python side of its registration (fake kernels and autograd formulas), as pytorch/extension-cpp's
extension_cpp/ops.py does it.

    from chained_tuning.hessian import ops
    ops.load_extension()                      # {"name", "detail", "ok"}; then ops.lanczos_step(...) and the rest
    python setup.py build_ext --inplace       # the library ahead of time (else JIT-built on first use)

Unlike extension-cpp's, this library is optional and loaded on demand (CURVATURE_EXT, backend="torch" never
builds it), and torch.library takes a fake kernel or an autograd formula only for an op whose schema is
registered, which comes with the library. So the formulas are module-level functions in two tables, FAKE_KERNELS
and AUTOGRAD_FORMULAS, registered once per process as soon as the library is there: at import where it was
loaded before (`import curvature_ext`), else by load_extension right after it loads it. Each registration is
skipped where the dispatcher already holds one, so a second import (this folder copied under another name, in
the same process) is harmless. Needs torch alone; the schemas and kernels are csrc/hessian.cpp's.
"""
from __future__ import annotations

import os
import time

import torch
from torch import Tensor

from .errors import ExtensionError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
# The one list of the library's sources, for setup.py and the JIT build (paths relative to the repository).
CPU_SOURCES = ["csrc/hessian.cpp", "csrc/cpu/hessian_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/hessian_cuda.cpp", "csrc/cuda/hessian_kernels.cu"]
EXT_MODES = ("auto", "installed", "jit", "none")


# ------------------------------------------------------------------------------------------- typed wrappers
def lanczos_step(w: list[Tensor], v: list[Tensor], v_prev: list[Tensor], beta: Tensor) -> Tensor:
    """One Lanczos step in place (v_prev becomes the next basis vector); returns [alpha, beta_next], float64."""
    return torch.ops.hessian.lanczos_step.default(w, v, v_prev, beta)


def power_step(w: list[Tensor], v: list[Tensor]) -> Tensor:
    """v <- w / ||w|| in place; returns [<w, v>, ||w||], float64."""
    return torch.ops.hessian.power_step.default(w, v)


def shard_dot(w: list[Tensor], v: list[Tensor]) -> Tensor:
    """[<w, v>, <w, w>] of one shard, float64 (the caller all-reduces)."""
    return torch.ops.hessian.shard_dot.default(w, v)


def lanczos_update(w: list[Tensor], v: list[Tensor], v_prev: list[Tensor], alpha: Tensor, beta: Tensor) -> Tensor:
    """v_prev <- w - alpha v - beta v_prev in place (not scaled); returns [||v_prev||^2] of this shard."""
    return torch.ops.hessian.lanczos_update.default(w, v, v_prev, alpha, beta)


def softmax_xent(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(loss per row, softmax probabilities) of the cross-entropy of `logits` against `labels`."""
    return torch.ops.hessian.softmax_xent.default(logits, labels, ignore_index)


def softmax_xent_backward(grad_loss: Tensor, probs: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    return torch.ops.hessian.softmax_xent_backward.default(grad_loss, probs, labels, ignore_index)


def softmax_xent_backward_backward(ggrad: Tensor, grad_loss: Tensor, probs: Tensor, labels: Tensor,
                                   ignore_index: int) -> tuple[Tensor, Tensor]:
    return torch.ops.hessian.softmax_xent_backward_backward.default(ggrad, grad_loss, probs, labels, ignore_index)


def softmax_backward(grad_probs: Tensor, probs: Tensor) -> Tensor:
    return torch.ops.hessian.softmax_backward.default(grad_probs, probs)


def softmax_backward_backward(ggrad: Tensor, grad_probs: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of softmax's backward along the last dim, one pass per row (CPU only)."""
    return torch.ops.hessian.softmax_backward_backward.default(ggrad, grad_probs, probs)


def multi_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """<a, b> over the two lists of tensors, float64 accumulation of exact products (CPU only)."""
    return torch.ops.hessian.multi_dot.default(a, b)


def rms_norm_backward(grad_y: Tensor, x: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_w) of y = w * x * rstd along the last dim, rstd = (mean(x^2) + eps)^-1/2 (CPU only)."""
    return torch.ops.hessian.rms_norm_backward.default(grad_y, x, w, rstd)


def rms_norm_backward_backward(gg_x: Tensor, gg_w: Tensor, grad_y: Tensor, x: Tensor, w: Tensor,
                               rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of rms_norm_backward w.r.t. (grad_y, x, w), rstd's dependence on x included (CPU only)."""
    return torch.ops.hessian.rms_norm_backward_backward.default(gg_x, gg_w, grad_y, x, w, rstd)


def swiglu_backward(grad_h: Tensor, a: Tensor, b: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) of h = silu(a) * b, given s = sigmoid(a) (CPU only)."""
    return torch.ops.hessian.swiglu_backward.default(grad_h, a, b, s)


def swiglu_backward_backward(gg_a: Tensor, gg_b: Tensor, grad_h: Tensor, a: Tensor, b: Tensor,
                             s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of swiglu_backward w.r.t. (grad_h, a, b), given s = sigmoid(a) (CPU only)."""
    return torch.ops.hessian.swiglu_backward_backward.default(gg_a, gg_b, grad_h, a, b, s)


def rotary(x: Tensor, cos: Tensor, sin: Tensor, adjoint: bool) -> Tensor:
    """x cos + rotate_half(x) sin (adjoint: x cos - rotate_half(x sin)), cos and sin broadcast to x (CPU only)."""
    return torch.ops.hessian.rotary.default(x, cos, sin, adjoint)


def linear_xent(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                chunk_rows: int = 0) -> tuple[Tensor, Tensor]:
    """(loss per row, probabilities) of the cross-entropy of hidden @ weight.T: the LM head and the loss fused."""
    return torch.ops.hessian.linear_xent.default(hidden, weight, labels, ignore_index, chunk_rows)


def linear_xent_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, probs: Tensor, labels: Tensor,
                         ignore_index: int, chunk_rows: int = 0) -> tuple[Tensor, Tensor]:
    return torch.ops.hessian.linear_xent_backward.default(grad_loss, hidden, weight, probs, labels, ignore_index,
                                                          chunk_rows)


def linear_xent_hvp(u: Tensor | None, U: Tensor | None, grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                    probs: Tensor, labels: Tensor, ignore_index: int,
                    chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.hessian.linear_xent_hvp.default(u, U, grad_loss, hidden, weight, probs, labels, ignore_index,
                                                     chunk_rows)


def lanczos_solve(grads: list[Tensor], grad_index: list[int], params: list[Tensor], v0: list[Tensor],
                  max_iter: int, tol: float, stop_rule: int = 1,
                  margin: float = 0.05) -> tuple[Tensor, Tensor, int, Tensor]:
    """A whole Lanczos solve on a retained first-order graph in one call: (alphas, betas, stop code, times)."""
    return torch.ops.hessian.lanczos_solve.default(grads, grad_index, params, v0, max_iter, tol, stop_rule, margin)


def power_solve(grads: list[Tensor], grad_index: list[int], params: list[Tensor], v0: list[Tensor], max_iter: int,
                tol: float) -> tuple[Tensor, int, Tensor]:
    """A whole power iteration in one call: (history [k, 2], stop code, times)."""
    return torch.ops.hessian.power_solve.default(grads, grad_index, params, v0, max_iter, tol)


# ------------------------------------------------------------------------------------ autograd formulas
def _xent_setup(ctx, inputs, output):
    # forward: loss rows and softmax probabilities (the one logits-sized buffer kept for backward)
    _, labels, ignore_index = inputs
    ctx.set_materialize_grads(False)  # an unused probs output must not cost a softmax VJP
    ctx.save_for_backward(output[1], labels)
    ctx.ignore_index = ignore_index


def _xent_backward(ctx, grad_loss, grad_probs):
    probs, labels = ctx.saved_tensors
    g = None
    if grad_loss is not None:
        g = softmax_xent_backward(grad_loss, probs, labels, ctx.ignore_index)
    if grad_probs is not None:
        gp = softmax_backward(grad_probs, probs)
        g = gp if g is None else g + gp
    return g, None, None


def _xent_backward_setup(ctx, inputs, output):
    # the backward is itself differentiable (double backward for HVPs)
    grad_loss, probs, labels, ignore_index = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_loss, probs, labels)
    ctx.ignore_index = ignore_index


def _xent_backward_backward(ctx, ggrad):
    if ggrad is None:
        return None, None, None, None
    grad_loss, probs, labels = ctx.saved_tensors
    gg, gp = softmax_xent_backward_backward(ggrad, grad_loss, probs, labels, ctx.ignore_index)
    return gg, gp, None, None


def _linear_xent_setup(ctx, inputs, output):
    # probs (the one [N, V] buffer kept) is a non-differentiable output; the backward op takes its derivative
    # analytically through hidden and weight (see csrc/hessian.cpp)
    hidden, weight, labels, ignore_index, chunk_rows = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, weight, output[1], labels)
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows


def _linear_xent_backward(ctx, grad_loss, grad_probs):
    if grad_loss is None:
        return None, None, None, None, None
    hidden, weight, probs, labels = ctx.saved_tensors
    gh, gw = linear_xent_backward(grad_loss, hidden, weight, probs, labels, ctx.ignore_index, ctx.chunk_rows)
    return gh, gw, None, None, None


def _linear_xent_backward_setup(ctx, inputs, output):
    grad_loss, hidden, weight, probs, labels, ignore_index, chunk_rows = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_loss, hidden, weight, probs, labels)
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows


def _linear_xent_backward_backward(ctx, u, U):
    grad_loss, hidden, weight, probs, labels = ctx.saved_tensors
    if u is None and U is None:
        return (None,) * 7
    gg, dh, dw = linear_xent_hvp(u, U, grad_loss, hidden, weight, probs.detach(), labels, ctx.ignore_index,
                                 ctx.chunk_rows)
    return gg if ctx.needs_input_grad[0] else None, dh, dw, None, None, None, None


# op -> (backward, setup_context)
AUTOGRAD_FORMULAS = {
    "softmax_xent": (_xent_backward, _xent_setup),
    "softmax_xent_backward": (_xent_backward_backward, _xent_backward_setup),
    "linear_xent": (_linear_xent_backward, _linear_xent_setup),
    "linear_xent_backward": (_linear_xent_backward_backward, _linear_xent_backward_setup),
}


# ------------------------------------------------------------------------------------------- fake kernels
def _loss_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _linear_xent_fake(hidden, weight, labels, ignore_index, chunk_rows=0):
    dt = _loss_dtype(hidden)
    return hidden.new_empty(hidden.shape[:1], dtype=dt), hidden.new_empty((hidden.shape[0], weight.shape[0]),
                                                                           dtype=dt)


def _linear_xent_backward_fake(grad_loss, hidden, weight, probs, labels, ignore_index, chunk_rows=0):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _linear_xent_hvp_fake(u, U, grad_loss, hidden, weight, probs, labels, ignore_index, chunk_rows=0):
    return torch.empty_like(grad_loss), torch.empty_like(hidden), torch.empty_like(weight)


def _softmax_xent_fake(logits, labels, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=_loss_dtype(logits)), torch.empty_like(logits)


def _softmax_xent_backward_fake(grad_loss, probs, labels, ignore_index):
    return torch.empty_like(probs)


def _softmax_xent_backward_backward_fake(ggrad, grad_loss, probs, labels, ignore_index):
    return torch.empty_like(grad_loss), torch.empty_like(probs)


def _softmax_backward_fake(grad_probs, probs):
    return torch.empty_like(probs)


def _softmax_backward_backward_fake(ggrad, grad_probs, probs):  # contiguous outputs, whatever the inputs' strides
    return probs.new_empty(probs.shape), probs.new_empty(probs.shape)


def _multi_dot_fake(a, b):
    return a[0].new_empty((), dtype=torch.float64)


def _rms_norm_backward_fake(grad_y, x, w, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w)


def _rms_norm_backward_backward_fake(gg_x, gg_w, grad_y, x, w, rstd):
    out = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return out(x), out(x), out(w)


def _swiglu_backward_fake(grad_h, a, b, s):
    return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for _ in range(2))


def _swiglu_backward_backward_fake(gg_a, gg_b, grad_h, a, b, s):
    return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for _ in range(3))


def _rotary_fake(x, cos, sin, adjoint):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lanczos_step_fake(w, v, v_prev, beta):
    return w[0].new_empty((2,), dtype=torch.float64)


def _power_step_fake(w, v):
    return w[0].new_empty((2,), dtype=torch.float64)


def _shard_dot_fake(w, v):
    return w[0].new_empty((2,), dtype=torch.float64)


def _lanczos_update_fake(w, v, v_prev, alpha, beta):
    return w[0].new_empty((1,), dtype=torch.float64)


FAKE_KERNELS = {
    "linear_xent": _linear_xent_fake,
    "linear_xent_backward": _linear_xent_backward_fake,
    "linear_xent_hvp": _linear_xent_hvp_fake,
    "softmax_xent": _softmax_xent_fake,
    "softmax_xent_backward": _softmax_xent_backward_fake,
    "softmax_xent_backward_backward": _softmax_xent_backward_backward_fake,
    "softmax_backward": _softmax_backward_fake,
    "softmax_backward_backward": _softmax_backward_backward_fake,
    "multi_dot": _multi_dot_fake,
    "rms_norm_backward": _rms_norm_backward_fake,
    "rms_norm_backward_backward": _rms_norm_backward_backward_fake,
    "swiglu_backward": _swiglu_backward_fake,
    "swiglu_backward_backward": _swiglu_backward_backward_fake,
    "rotary": _rotary_fake,
    "lanczos_step": _lanczos_step_fake,
    "power_step": _power_step_fake,
    "shard_dot": _shard_dot_fake,
    "lanczos_update": _lanczos_update_fake,
}


# ------------------------------------------------------------------------------------------- registration
def library_loaded() -> bool:
    """Whether the library's schemas are registered in this process (whoever loaded it)."""
    return hasattr(torch.ops, "hessian") and hasattr(torch.ops.hessian, "lanczos_step")


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"hessian::{op}", key)


def _register_python_side():
    """FAKE_KERNELS and AUTOGRAD_FORMULAS, each unless the dispatcher holds one already (a second copy of this
    module, or a second call)."""
    for op, fake in FAKE_KERNELS.items():
        if not _has_kernel(op, "Meta"):
            torch.library.register_fake(f"hessian::{op}", fake)
    for op, (backward, setup) in AUTOGRAD_FORMULAS.items():
        if not _has_kernel(op, "Autograd"):
            torch.library.register_autograd(f"hessian::{op}", backward, setup_context=setup)


# ------------------------------------------------------------------------------------------------ loading
_EXT_STATE: dict | None = None


def _cuda_sources_usable() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def _load_installed(errors):
    try:
        import curvature_ext  # noqa: F401  (built by setup.py; importing runs TORCH_LIBRARY initialisers)
    except ImportError as e:
        errors.append(f"installed: {e}")
        return None
    return {"name": "installed", "detail": getattr(curvature_ext, "__file__", "?"), "ok": True}


STALE_LOCK_S = 900  # a build takes well under a minute; a lock this old was left by a build that was killed


def _drop_stale_lock(build_dir):
    """torch's JIT build waits, without end, for the lock file of a build that was killed (Ctrl-C, a timeout):
    remove one older than any build takes, so the next run builds instead of hanging."""
    lock = os.path.join(build_dir, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
    except FileNotFoundError:
        pass


def _load_jit(errors, verbose):
    try:
        from torch.utils.cpp_extension import load

        build_dir = os.path.join(ROOT, "build", "jit")
        os.makedirs(build_dir, exist_ok=True)
        _drop_stale_lock(build_dir)
        sources = [os.path.join(ROOT, f) for f in CPU_SOURCES]
        kwargs = {}
        if _cuda_sources_usable():
            sources += [os.path.join(ROOT, f) for f in CUDA_SOURCES]
            kwargs["extra_cuda_cflags"] = ["-O3"]
        t0 = time.time()
        load(name="curvature_ext_jit" + ("_cuda" if "extra_cuda_cflags" in kwargs else ""), sources=sources,
             extra_cflags=["-O3"], build_directory=build_dir, is_python_module=False, verbose=verbose, **kwargs)
    except Exception as e:  # compiler missing, build error, ...
        msg = str(e).strip().splitlines()
        errors.append(f"jit: {msg[-1] if msg else type(e).__name__}")
        return None
    return {"name": "jit", "ok": True,
            "detail": f"torch.utils.cpp_extension.load into {build_dir} ({time.time() - t0:.1f} s)"}


def load_extension(mode: str | None = None, verbose: bool = False) -> dict:
    """Load the `hessian` operator library (csrc/) once per process; return {"name", "detail", "ok"}.

    mode: "auto" (installed, else JIT, else none), "installed", "jit", "none". Default: $CURVATURE_EXT or auto.
    installed: the module curvature_ext built by `python setup.py build_ext --inplace` (or pip install); jit: a
    torch.utils.cpp_extension.load build into build/jit (about 20 s once on 2 cores); none: plain PyTorch.
    The state is cached: whichever library loaded first stays loaded (registering twice is an error).
    """
    global _EXT_STATE
    mode = (mode or os.environ.get("CURVATURE_EXT") or "auto").lower()
    if mode not in EXT_MODES:
        raise ExtensionError(f"CURVATURE_EXT={mode!r} is not one of {', '.join(EXT_MODES)}")
    if _EXT_STATE is not None and (_EXT_STATE["ok"] or mode == "none"):
        return _EXT_STATE
    if mode == "none":
        return {"name": "none", "detail": "disabled (CURVATURE_EXT=none)", "ok": False}
    errors = []
    if library_loaded():
        _EXT_STATE = {"name": "preloaded", "detail": "hessian ops already registered in this process", "ok": True}
    if _EXT_STATE is None and mode in ("auto", "installed"):
        _EXT_STATE = _load_installed(errors)
    if _EXT_STATE is None and mode in ("auto", "jit"):
        _EXT_STATE = _load_jit(errors, verbose)
    if _EXT_STATE is None:
        return {"name": "none", "detail": "plain PyTorch fallback; " + "; ".join(errors), "ok": False}
    _register_python_side()
    return _EXT_STATE


if library_loaded():  # loaded before this import (extension-cpp's order): its Python side now
    _register_python_side()
