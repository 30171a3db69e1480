"""The `hessian` operator library of csrc/: loading it (installed, JIT-built or none) and the Python side of
its registration (autograd formulas and fake kernels), as pytorch/extension-cpp's ops.py does it.

    import ops; ops.load_extension()          # then torch.ops.hessian.* (see csrc/hessian.cpp for the schemas)
    python setup.py build_ext --inplace       # the library ahead of time (else JIT-built on first use)

Needs torch alone; curvature.py is its user.
"""
from __future__ import annotations

import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
# The one list of the library's sources, for setup.py and the JIT build (paths relative to the repository).
CPU_SOURCES = ["csrc/hessian.cpp", "csrc/cpu/hessian_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/hessian_cuda.cpp", "csrc/cuda/hessian_kernels.cu"]

try:  # the project's UserError, so that the command line's handler prints it as one line
    from ..common import UserError as _UserErrorBase
except ImportError:  # copied without common.py
    _UserErrorBase = Exception


class ExtensionError(_UserErrorBase):
    """A bad CURVATURE_EXT value."""


_EXT_STATE: dict | None = None


def _cuda_sources_usable() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def load_extension(mode: str | None = None, verbose: bool = False) -> dict:
    """Load the `hessian` operator library (csrc/) once per process; return {"name", "detail", "ok"}.

    mode: "auto" (installed, else JIT, else none), "installed", "jit", "none". Default: $CURVATURE_EXT or auto.
    installed: the module curvature_ext built by `python setup.py build_ext --inplace` (or pip install); jit: a
    torch.utils.cpp_extension.load build into build/jit (about 20 s once on 2 cores); none: plain PyTorch.
    The state is cached: whichever library loaded first stays loaded (registering twice is an error).
    """
    global _EXT_STATE
    mode = (mode or os.environ.get("CURVATURE_EXT") or "auto").lower()
    if mode not in ("auto", "installed", "jit", "none"):
        raise ExtensionError(f"CURVATURE_EXT={mode!r} is not one of auto, installed, jit, none")
    if _EXT_STATE is not None and (_EXT_STATE["ok"] or mode == "none"):
        return _EXT_STATE
    if mode == "none":
        return {"name": "none", "detail": "disabled (CURVATURE_EXT=none)", "ok": False}
    errors = []
    if hasattr(torch.ops, "hessian") and hasattr(torch.ops.hessian, "lanczos_step"):
        _EXT_STATE = {"name": "preloaded", "detail": "hessian ops already registered in this process", "ok": True}
    if _EXT_STATE is None and mode in ("auto", "installed"):
        try:
            import curvature_ext  # noqa: F401  (built by setup.py; importing runs TORCH_LIBRARY initialisers)

            _EXT_STATE = {"name": "installed", "detail": getattr(curvature_ext, "__file__", "?"), "ok": True}
        except ImportError as e:
            errors.append(f"installed: {e}")
    if _EXT_STATE is None and mode in ("auto", "jit"):
        try:
            from torch.utils.cpp_extension import load

            build_dir = os.path.join(ROOT, "build", "jit")
            os.makedirs(build_dir, exist_ok=True)
            sources = [os.path.join(ROOT, f) for f in CPU_SOURCES]
            kwargs = {}
            if _cuda_sources_usable():
                sources += [os.path.join(ROOT, f) for f in CUDA_SOURCES]
                kwargs["extra_cuda_cflags"] = ["-O3"]
            t0 = time.time()
            load(name="curvature_ext_jit" + ("_cuda" if "extra_cuda_cflags" in kwargs else ""), sources=sources,
                 extra_cflags=["-O3"], build_directory=build_dir, is_python_module=False, verbose=verbose,
                 **kwargs)
            _EXT_STATE = {"name": "jit", "ok": True,
                          "detail": f"torch.utils.cpp_extension.load into {build_dir} ({time.time() - t0:.1f} s)"}
        except Exception as e:  # compiler missing, build error, ...
            msg = str(e).strip().splitlines()
            errors.append(f"jit: {msg[-1] if msg else type(e).__name__}")
    if _EXT_STATE is None:
        return {"name": "none", "detail": "plain PyTorch fallback; " + "; ".join(errors), "ok": False}
    _register_python_side()
    return _EXT_STATE


_PY_REGISTERED = False


def _register_python_side():
    """Autograd formulas and fake (meta) kernels of the C++ ops."""
    global _PY_REGISTERED
    if _PY_REGISTERED:
        return
    ops = torch.ops.hessian
    lib = torch.library

    # forward: loss rows and softmax probabilities (the one logits-sized buffer kept for backward)
    def xent_setup(ctx, inputs, output):
        _, labels, ignore_index = inputs
        ctx.set_materialize_grads(False)  # an unused probs output must not cost a softmax VJP
        ctx.save_for_backward(output[1], labels)
        ctx.ignore_index = ignore_index

    def xent_backward(ctx, grad_loss, grad_probs):
        probs, labels = ctx.saved_tensors
        g = None
        if grad_loss is not None:
            g = ops.softmax_xent_backward(grad_loss, probs, labels, ctx.ignore_index)
        if grad_probs is not None:
            gp = ops.softmax_backward(grad_probs, probs)
            g = gp if g is None else g + gp
        return g, None, None

    lib.register_autograd("hessian::softmax_xent", xent_backward, setup_context=xent_setup)

    # the backward is itself differentiable (double backward for HVPs)
    def xb_setup(ctx, inputs, output):
        grad_loss, probs, labels, ignore_index = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_loss, probs, labels)
        ctx.ignore_index = ignore_index

    def xb_backward(ctx, ggrad):
        if ggrad is None:
            return None, None, None, None
        grad_loss, probs, labels = ctx.saved_tensors
        gg, gp = ops.softmax_xent_backward_backward(ggrad, grad_loss, probs, labels, ctx.ignore_index)
        return gg, gp, None, None

    lib.register_autograd("hessian::softmax_xent_backward", xb_backward, setup_context=xb_setup)

    # fused linear + cross-entropy: probs (the one [N, V] buffer kept) is a non-differentiable output; the
    # backward op takes its derivative analytically through hidden and weight (see csrc/hessian.cpp)
    def lx_setup(ctx, inputs, output):
        hidden, weight, labels, ignore_index, chunk_rows = inputs
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(hidden, weight, output[1], labels)
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows

    def lx_backward(ctx, grad_loss, grad_probs):
        if grad_loss is None:
            return None, None, None, None, None
        hidden, weight, probs, labels = ctx.saved_tensors
        gh, gw = ops.linear_xent_backward(grad_loss, hidden, weight, probs, labels, ctx.ignore_index, ctx.chunk_rows)
        return gh, gw, None, None, None

    lib.register_autograd("hessian::linear_xent", lx_backward, setup_context=lx_setup)

    def lxb_setup(ctx, inputs, output):
        grad_loss, hidden, weight, probs, labels, ignore_index, chunk_rows = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_loss, hidden, weight, probs, labels)
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows

    def lxb_backward(ctx, u, U):
        grad_loss, hidden, weight, probs, labels = ctx.saved_tensors
        if u is None and U is None:
            return (None,) * 7
        gg, dh, dw = ops.linear_xent_hvp(u, U, grad_loss, hidden, weight, probs.detach(), labels, ctx.ignore_index,
                                         ctx.chunk_rows)
        return gg if ctx.needs_input_grad[0] else None, dh, dw, None, None, None, None

    lib.register_autograd("hessian::linear_xent_backward", lxb_backward, setup_context=lxb_setup)

    fake_dtype = lambda t: torch.float64 if t.dtype == torch.float64 else torch.float32  # noqa: E731

    @lib.register_fake("hessian::linear_xent")
    def _(hidden, weight, labels, ignore_index, chunk_rows=0):
        dt = fake_dtype(hidden)
        return hidden.new_empty(hidden.shape[:1], dtype=dt), hidden.new_empty((hidden.shape[0], weight.shape[0]),
                                                                               dtype=dt)

    @lib.register_fake("hessian::linear_xent_backward")
    def _(grad_loss, hidden, weight, probs, labels, ignore_index, chunk_rows=0):
        return torch.empty_like(hidden), torch.empty_like(weight)

    @lib.register_fake("hessian::linear_xent_hvp")
    def _(u, U, grad_loss, hidden, weight, probs, labels, ignore_index, chunk_rows=0):
        return torch.empty_like(grad_loss), torch.empty_like(hidden), torch.empty_like(weight)

    @lib.register_fake("hessian::softmax_xent")
    def _(logits, labels, ignore_index):
        return logits.new_empty(logits.shape[:1], dtype=fake_dtype(logits)), torch.empty_like(logits)

    @lib.register_fake("hessian::softmax_xent_backward")
    def _(grad_loss, probs, labels, ignore_index):
        return torch.empty_like(probs)

    @lib.register_fake("hessian::softmax_xent_backward_backward")
    def _(ggrad, grad_loss, probs, labels, ignore_index):
        return torch.empty_like(grad_loss), torch.empty_like(probs)

    @lib.register_fake("hessian::softmax_backward")
    def _(grad_probs, probs):
        return torch.empty_like(probs)

    @lib.register_fake("hessian::softmax_backward_backward")
    def _(ggrad, grad_probs, probs):  # contiguous outputs, whatever the inputs' strides
        return probs.new_empty(probs.shape), probs.new_empty(probs.shape)

    @lib.register_fake("hessian::lanczos_step")
    def _(w, v, v_prev, beta):
        return w[0].new_empty((2,), dtype=torch.float64)

    @lib.register_fake("hessian::power_step")
    def _(w, v):
        return w[0].new_empty((2,), dtype=torch.float64)

    @lib.register_fake("hessian::shard_dot")
    def _(w, v):
        return w[0].new_empty((2,), dtype=torch.float64)

    @lib.register_fake("hessian::lanczos_update")
    def _(w, v, v_prev, alpha, beta):
        return w[0].new_empty((1,), dtype=torch.float64)

    _PY_REGISTERED = True
