"""Curvature of the first-task minimum: the extreme Hessian eigenvalues and spectral radius rho of the loss
finetune.py minimised (its answer-token NLL on N seeded training samples), from Hessian-vector products, and
the Taylor check of the paper's eqs. 3-4 against the chains tuned from that minimum.

    python curvature.py --model runs/demo/toxigen --task toxigen --samples 50 --out runs/demo/curv/toxigen.json
    python curvature.py --model runs/demo/toxigen --task toxigen --reference runs/demo/toxigen-arc --out c.json
    python curvature.py --model runs/demo/toxigen --task toxigen --reference runs/demo/toxigen-arc runs/demo/mix \\
        --taylor_out taylor.json --out runs/demo/curv/toxigen.json      # one solve, <reference>/taylor.json each
    python setup.py build_ext --inplace        # the C++/CUDA extension ahead of time (else built on first use)

The command line needs common.py, tasks.py, finetune.py and synthetic.py beside it (tiny_base.py for --model
tiny); hessian_spectrum() alone needs torch and numpy (the extension in csrc/ is optional). Solvers, stop
rules, backends and what curvature.json holds: README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
IGNORE_INDEX = -100
CSRC = os.path.join(HERE, "csrc")


try:  # the project's UserError, so that callers catch one type and the CLI's handler prints it
    from common import UserError as _UserErrorBase
except ImportError:  # curvature.py copied alone: the solver needs no other file of the project
    _UserErrorBase = Exception


class CurvatureError(_UserErrorBase):
    """Bad input to curvature.py (the command line prints it as one `error: ...` line and exits 2)."""


# --------------------------------------------------------------------------------------------- extension
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
        raise CurvatureError(f"CURVATURE_EXT={mode!r} is not one of auto, installed, jit, none")
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

            build_dir = os.path.join(HERE, "build", "jit")
            os.makedirs(build_dir, exist_ok=True)
            sources = [os.path.join(CSRC, "hessian.cpp"), os.path.join(CSRC, "cpu", "hessian_cpu.cpp")]
            kwargs = {}
            if _cuda_sources_usable():
                sources += [os.path.join(CSRC, "cuda", "hessian_cuda.cpp"),
                            os.path.join(CSRC, "cuda", "hessian_kernels.cu")]
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

    @lib.register_fake("hessian::lanczos_step")
    def _(w, v, v_prev, beta):
        return w[0].new_empty((2,), dtype=torch.float64)

    @lib.register_fake("hessian::power_step")
    def _(w, v):
        return w[0].new_empty((2,), dtype=torch.float64)

    _PY_REGISTERED = True


# ------------------------------------------------------------------------------- plain-PyTorch reference ops
def lanczos_step_torch(w, v, v_prev, beta):
    """Reference of hessian::lanczos_step: same arithmetic (float64 per element, rounded to storage dtype)."""
    beta = float(beta)
    alpha = sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(w, v))
    sq = torch.zeros((), dtype=torch.float64, device=w[0].device)
    for a, b, p in zip(w, v, v_prev):
        p.copy_(a.double() - alpha * b.double() - beta * p.double())
        sq = sq + p.double().pow(2).sum()
    beta_next = sq.sqrt()
    inv = 1.0 / beta_next if float(beta_next) > 0 else torch.zeros_like(beta_next)
    for p in v_prev:
        p.copy_(p.double() * inv)
    return torch.stack([alpha.to(torch.float64).cpu(), beta_next.cpu()])


def power_step_torch(w, v):
    """Reference of hessian::power_step: [<w,v>, ||w||] in float64, v <- w/||w||."""
    rq = sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(w, v))
    nrm = sum(a.double().pow(2).sum() for a in w).sqrt()
    inv = 1.0 / nrm if float(nrm) > 0 else torch.zeros_like(nrm)
    for a, b in zip(w, v):
        b.copy_(a.double() * inv)
    return torch.stack([rq.cpu(), nrm.cpu()])


def answer_loss_sum_ref(logits, labels):
    """Same semantics as finetune.answer_loss_sum: (sum of answer-token NLL, number of answer tokens)."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    tg = labels[:, 1:].reshape(-1)
    n = int((tg != IGNORE_INDEX).sum())
    return torch.nn.functional.cross_entropy(lg, tg, ignore_index=IGNORE_INDEX, reduction="sum"), n


# ------------------------------------------------------------------------------------------- the operator
def _count_answer_tokens(batch):
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _prepare_model(model):
    model.eval()
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl is not None and impl not in ("eager", "sdpa"):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            cfg._attn_implementation = "eager"
    ckpt = getattr(model, "is_activation_checkpointing", None)
    if ckpt is None:
        ckpt = getattr(model, "is_gradient_checkpointing", False)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover
        return contextlib.nullcontext()


CE_MODES = ("torch", "softmax_xent", "linear_xent")


def _ce_mode(ce) -> str:
    """Normalise the cross-entropy choice: False/"torch" (autograd), True/"softmax_xent" (fused op on the
    logits), "linear_xent" (fused LM head + cross-entropy; the logits are never materialised whole)."""
    if ce is True:
        return "softmax_xent"
    if ce is False or ce is None:
        return "torch"
    if ce not in CE_MODES:
        raise CurvatureError(f"cross-entropy mode must be one of {', '.join(CE_MODES)}, got {ce!r}")
    return ce


def linear_head(model):
    """(decoder, lm_head) of a causal LM whose logits may be lm_head(decoder(...).last_hidden_state), else None.

    Only a structural guess (HF get_decoder/get_output_embeddings, an nn.Linear head without bias);
    HessianOperator checks it numerically on the first batch before using it."""
    get_out, get_dec = getattr(model, "get_output_embeddings", None), getattr(model, "get_decoder", None)
    if not callable(get_out) or not callable(get_dec):
        return None
    try:
        head, dec = get_out(), get_dec()
    except Exception:
        return None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or dec is None or dec is model:
        return None
    return dec, head


def _answer_positions(batch, dev):
    ids = batch["input_ids"].to(dev)
    am = batch.get("attention_mask")
    am = am.to(dev) if am is not None else torch.ones_like(ids)
    labels = batch["labels"].to(dev)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    return ids, am, keep, targets


def _answer_logits(model, ids, am, keep, answer_logits_only=True):
    with _math_sdpa():
        try:
            if not answer_logits_only:
                raise TypeError
            out = model(input_ids=ids, attention_mask=am, logits_to_keep=keep, use_cache=False)
        except TypeError:
            out = model(input_ids=ids, attention_mask=am)
    logits = out.logits if hasattr(out, "logits") else out[0]
    del out
    if logits.dim() == 3:
        logits = logits[keep] if logits.shape[1] == keep.shape[1] else None
    return logits


def _answer_hidden(dec, ids, am, keep):
    with _math_sdpa():
        out = dec(input_ids=ids, attention_mask=am, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[keep]


def batch_answer_loss_sum(model, batch, fused=False, answer_logits_only: bool = True):
    """Sum of answer-token NLL of one batch; logits are only projected at positions that predict an answer
    token (HF `logits_to_keep` boolean mask), falling back to full logits for models without it.

    fused: the cross-entropy (see _ce_mode): False/"torch", True/"softmax_xent", "linear_xent" (the decoder's
    answer-row hidden states through hessian::linear_xent with the LM head's weight; only for models where
    linear_head() holds -- HessianOperator verifies it). answer_logits_only=False projects every position
    (finetune.answer_loss_sum's way; benchmarks only)."""
    mode = _ce_mode(fused)
    dev = next(model.parameters()).device
    ids, am, keep, targets = _answer_positions(batch, dev)
    if mode == "linear_xent":
        parts = linear_head(model)
        if parts is None:
            raise CurvatureError("linear_xent needs an HF causal LM with an nn.Linear LM head without bias")
        rows = _answer_hidden(parts[0], ids, am, keep)
        losses, _ = torch.ops.hessian.linear_xent(rows, parts[1].weight, targets, IGNORE_INDEX)
        return losses.sum()
    logits = _answer_logits(model, ids, am, keep, answer_logits_only)
    if logits is None or logits.shape[0] != targets.shape[0]:
        raise RuntimeError("model output does not line up with the labels (expected [batch, seq, vocab] logits)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # finetune.answer_loss_sum's precision (only answer rows are projected)
    if mode == "softmax_xent":
        losses, _ = torch.ops.hessian.softmax_xent(logits, targets, IGNORE_INDEX)
        return losses.sum()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def verify_linear_head(model, batch) -> bool:
    """True when lm_head(decoder(batch)) equals the model's own answer-row logits (no soft-capping, scaling or
    bias hidden in the model's forward); checked once, without gradients, on the first two rows of a batch."""
    parts = linear_head(model)
    if parts is None:
        return False
    dev = next(model.parameters()).device
    small = {k: v[:2] for k, v in batch.items() if torch.is_tensor(v)}  # two rows are enough for the check
    ids, am, keep, _ = _answer_positions(small if _count_answer_tokens(small) else batch, dev)
    if not bool(keep.any()):
        return False  # nothing to compare: stay with the logits path
    try:
        with torch.no_grad():
            ref = _answer_logits(model, ids, am, keep)
            mine = parts[1](_answer_hidden(parts[0], ids, am, keep))
    except Exception:
        return False
    if ref is None or ref.shape != mine.shape or ref.numel() == 0:
        return False
    tol = 1e-2 if ref.dtype in (torch.float16, torch.bfloat16) or mine.dtype != ref.dtype else 1e-4
    ref, mine = ref.double(), mine.double()
    return bool(float((ref - mine).abs().max()) <= tol * max(float(ref.abs().max()), 1e-6))


def _default_budget(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.7 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.5 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 << 30


class HessianOperator:
    """H v for the answer-token loss of `batches` at the model's current parameters (eval mode: no dropout;
    attention through the eager path or SDPA's math kernel, the only ones with a double backward).

    An HVP is a double backward through first-order graphs built once (create_graph=True) and retained for
    every iteration. Where the graphs of all micro-batches do not fit in graph_memory_budget bytes (one graph's
    size is measured with saved-tensor hooks while it is built), as many as fit are retained and the others
    are rebuilt for every HVP."""

    def __init__(self, model, batches, fused_ce=False, graph_memory_budget: int | None = None,
                 answer_logits_only: bool = True, keep_first: int = 0):
        """fused_ce: False/"torch" (autograd cross-entropy), "softmax_xent" (fused op on the logits),
        "linear_xent" (fused LM head + cross-entropy, required), True/"auto" (linear_xent where
        verify_linear_head() holds on the first batch, else softmax_xent). Needs the extension unless "torch"."""
        self.answer_logits_only = answer_logits_only
        if not batches:
            raise CurvatureError("no batches given: the Hessian needs at least one sample")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise CurvatureError("the model has no trainable parameters")
        self.batches = list(batches)
        k = int(keep_first or 0)
        n0 = int(self.batches[0]["input_ids"].shape[0])
        if 0 < k < n0:
            b0 = self.batches[0]
            self.batches[:1] = [{key: (v[:k] if torch.is_tensor(v) else v) for key, v in b0.items()},
                                {key: (v[k:] if torch.is_tensor(v) else v) for key, v in b0.items()}]
        self.total_tokens = sum(_count_answer_tokens(b) for b in self.batches)
        if self.total_tokens == 0:
            raise CurvatureError("the batches contain no answer tokens (every label is -100)")
        probe = next(b for b in self.batches if _count_answer_tokens(b) > 0)
        if fused_ce is True or fused_ce == "auto":
            self.ce = "linear_xent" if verify_linear_head(model, probe) else "softmax_xent"
        else:
            self.ce = _ce_mode(fused_ce)
            if self.ce == "linear_xent" and not verify_linear_head(model, probe):
                raise CurvatureError("cross-entropy linear_xent: the model's logits are not "
                                     "lm_head(decoder hidden states) (or it has no plain linear LM head)")
        self.fused = self.ce != "torch"
        dev = self.params[0].device
        self.budget = int(graph_memory_budget) if graph_memory_budget is not None else _default_budget(dev)
        self.hvp_count = 0
        self.grads_count = 0
        self.loss_value = 0.0
        self._g_sum = None
        self.recompute = []
        self.graph_bytes = 0
        self._keep_first = keep_first
        self.first_out, self.first_index, self.first_tokens = None, None, 0
        self.sub_hvp_count = 0
        self._build()

    def _first_order(self, batch, create_graph=True):
        loss = batch_answer_loss_sum(self.model, batch, self.ce, self.answer_logits_only) / self.total_tokens
        self.loss_value += float(loss.detach())
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        self.grads_count += 1
        return grads

    def _build(self):
        param_ptrs = {p.untyped_storage().data_ptr() for p in self.params}
        seen = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in param_ptrs and ptr not in seen:
                    seen[ptr] = st.nbytes()
            except Exception:
                pass
            return t

        kept = 0
        for i, b in enumerate(self.batches):
            if i == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    grads = self._first_order(b)
                self.graph_bytes = int(sum(seen.values()))
                n_fit = self.budget // max(self.graph_bytes, 1)
                if n_fit < 1:
                    del grads
                    self.recompute = list(self.batches)
                    for rest in self.batches[1:]:
                        self.loss_value += float(self._loss_only(rest))
                    self.retained = 0
                    return
            elif kept >= n_fit:
                self.recompute.append(b)
                self.loss_value += float(self._loss_only(b))
                continue
            else:
                grads = self._first_order(b)
            kept += 1
            if kept == 1 and self._keep_first and len(self.batches) > 1 and _count_answer_tokens(b) > 0:
                fi = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
                self.first_index, self.first_out = fi, [grads[j] for j in fi]
                self.first_tokens = _count_answer_tokens(b)
            if self._g_sum is None:
                self._g_sum = list(grads)
            else:
                self._g_sum = [a if g is None else (g if a is None else a + g) for a, g in zip(self._g_sum, grads)]
            del grads
        self.retained = kept
        idx = [i for i, g in enumerate(self._g_sum) if g is not None and g.requires_grad]
        self.g_index = idx
        self.g_out = [self._g_sum[i] for i in idx]

    @property
    def retained_count(self):
        return getattr(self, "retained", 0)

    def _loss_only(self, b):
        with torch.no_grad():
            return batch_answer_loss_sum(self.model, b, self.ce, self.answer_logits_only) / self.total_tokens

    def hvp_first(self, v):
        """H_1 v, H_1 the Hessian of the split-off samples' share of the loss (their graph is part of the full one)."""
        self.sub_hvp_count += 1
        res = torch.autograd.grad(self.first_out, self.params, grad_outputs=[v[i] for i in self.first_index],
                                  retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if o is None else o.contiguous() for o, p in zip(res, self.params)]

    def hvp(self, v):
        """H v as a list of tensors shaped like the parameters (v: list of the same)."""
        self.hvp_count += 1
        out = [None] * len(self.params)
        if self._g_sum is not None and self.g_out:
            res = torch.autograd.grad(self.g_out, self.params, grad_outputs=[v[i] for i in self.g_index],
                                      retain_graph=True, allow_unused=True)
            out = list(res)
        for b in self.recompute:
            loss = batch_answer_loss_sum(self.model, b, self.ce, self.answer_logits_only) / self.total_tokens
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not idx:
                continue
            res = torch.autograd.grad([grads[i] for i in idx], self.params, grad_outputs=[v[i] for i in idx],
                                      allow_unused=True)
            out = [r if o is None else (o if r is None else o + r) for o, r in zip(out, res)]
        return [torch.zeros_like(p) if o is None else o.contiguous() for o, p in zip(out, self.params)]


# --------------------------------------------------------------------------------------------- solvers
def ritz_extremes(alphas, betas):
    """Ritz values of T_k; returns (theta_min, theta_max, res_min, res_max) with res = |beta_k s_last|."""
    k = len(alphas)
    tridiag = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        off = np.asarray(betas[: k - 1], dtype=np.float64)
        tridiag += np.diag(off, 1) + np.diag(off, -1)
    theta, eigvecs = np.linalg.eigh(tridiag)
    beta_k = float(betas[k - 1])
    return float(theta[0]), float(theta[-1]), abs(beta_k * eigvecs[-1, 0]), abs(beta_k * eigvecs[-1, -1])


STOP_RULES = {"both": 0, "dominant": 1}
START_VECTORS = ("subsample", "gradient+random", "random")
DOMINANT_MARGIN = 0.05
STOP_REASONS = {0: "max_iter", 1: "residual_both_ends", 2: "invariant_subspace", 3: "residual_dominant_end"}


def _lanczos_stop(alphas, betas, tol, stop="dominant", margin=DOMINANT_MARGIN):
    """Stop code after step k (the rule of csrc/hessian.cpp's lanczos_stop_code). For the extreme Ritz pairs
    (theta, s) of T_k some eigenvalue lies within r = |beta_k s_k| of theta; rho_k = max |theta|.
    "both": both ends have r <= tol * rho_k. "dominant": the end giving rho_k has r <= tol * rho_k and the other
    end is bounded away from it, |theta_o| + r_o <= (1 - margin) * rho_k; the dominant end is then as accurate as
    under "both". That assumes, as every Krylov stop does for the dominant end too, that the other end's
    extreme Ritz value tracks its extreme eigenvalue (it is never outside the spectrum); use "both" where a
    second end beyond rho matters. Either stops when beta_k <= 1e-12 rho_k (an invariant subspace: exact)."""
    lmin, lmax, rmin, rmax = ritz_extremes(alphas, betas)
    scale = max(abs(lmin), abs(lmax))
    if betas[-1] <= 1e-12 * max(scale, 1e-300):
        return 2
    if max(rmin, rmax) <= tol * scale:
        return 1
    if stop == "dominant":
        rd, other = (rmax, abs(lmin) + rmin) if abs(lmax) >= abs(lmin) else (rmin, abs(lmax) + rmax)
        if rd <= tol * scale and other <= (1.0 - margin) * scale:
            return 3
    return 0


def _start_vector(params, seed):
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
            for p in params]


def _mixed_start_vector(op, seed, r=None):
    """g/||g|| + r/||r||: the loss gradient (a by-product of the graph build; it leans towards the top of the
    spectrum) plus a seeded Gaussian r of the same weight, which keeps every eigenvector in the Krylov space
    almost surely. Falls back to r alone where no gradient is available or it is zero / not finite.
    r: that random vector when the caller already drew it (_start_vector(op.params, seed))."""
    r = _start_vector(op.params, seed) if r is None else r
    g = getattr(op, "_g_sum", None)
    if g is None:
        return r, "random"
    g = [torch.zeros_like(p) if t is None else t.detach() for t, p in zip(g, op.params)]
    gn, rn = _norm(g), _norm(r)
    if not (gn > 0 and math.isfinite(gn)):
        return r, "random"
    return [(a.double() / gn + b.double() / rn).to(p.dtype).contiguous() for a, b, p in zip(g, r, op.params)], \
        "gradient+random"


WARM_STEPS = 3        # Lanczos steps on the subsample (its Ritz vector stops improving after ~3 on tiny checkpoints)
WARM_RANDOM = 0.05    # weight of the seeded random part added to the warm-start vector
WARM_VECTORS = 6      # parameter-sized vectors the warm start holds at once (basis + work + first gradient)


def _dot(a, b):
    """<a, b> over lists of tensors, accumulated in float64."""
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)))


def _norm(v):
    return math.sqrt(max(_dot(v, v), 0.0))


def _subsample_start_vector(op, seed, steps=WARM_STEPS):
    """Warm start from a subsample: `steps` Lanczos steps (stored basis, full reorthogonalisation) on H_1, the
    Hessian of the k samples HessianOperator(keep_first=k) split off (k = ceil(N/10), at least 2: an H_1 v
    costs about k/N of an H v), and its Ritz vector y of the end of largest magnitude, plus
    WARM_RANDOM * r/||r|| (r the seeded Gaussian, so every eigenvector stays in the Krylov space). y is
    close to H's dominant eigenvector as far as k samples represent all N (squared overlap 0.91-0.96 with 5
    of 50 samples on the tiny ARC checkpoint), which saves the full solve about two HVPs to rho within 1e-3.
    The full solve is unchanged: same operator, same stop rule."""
    r = _start_vector(op.params, seed)
    q0, _ = _mixed_start_vector(op, seed, r)  # the subsample's graph sits inside g: the same lean
    basis, alphas, betas = [_normalize(q0)], [], []
    for j in range(steps):
        w = op.hvp_first(basis[-1])
        alphas.append(_dot(w, basis[-1]))
        for _ in range(2):  # twice is enough (Kahan)
            for q in basis:
                c = _dot(w, q)
                w = [a - c * b for a, b in zip(w, q)]
        b = _norm(w)
        betas.append(b)
        if j == steps - 1 or not b > 1e-12 * max(abs(a) for a in alphas):
            break
        basis.append([t / b for t in w])
    k = len(alphas)
    tridiag = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
    theta, eigvecs = np.linalg.eigh(tridiag)
    col = eigvecs[:, -1] if abs(theta[-1]) >= abs(theta[0]) else eigvecs[:, 0]
    y = [sum(float(col[i]) * basis[i][n] for i in range(k)) for n in range(len(op.params))]
    y = _normalize(y)
    v0 = [a + (WARM_RANDOM / _norm(r)) * b for a, b in zip(y, r)]
    return v0, {"steps": k, "samples": int(op.batches[0]["input_ids"].shape[0]), "answer_tokens": op.first_tokens,
                "subsample_ritz": [float(theta[0]), float(theta[-1])]}


def _warm_start_fits(params, budget):
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return WARM_VECTORS * nbytes <= 0.25 * budget


def _normalize(v):
    nrm = _norm(v)
    if nrm == 0:
        raise CurvatureError("start vector is zero")
    return [(t.double() / nrm).to(t.dtype).contiguous() for t in v]


def _lanczos_python(op, v0, max_iter, tol, step, stop="dominant", margin=DOMINANT_MARGIN, times=None, progress=None):
    """The three-term recurrence without a stored basis (three parameter-sized vectors). Without
    reorthogonalisation converged Ritz values come back as "ghost" copies, which leaves the extreme Ritz
    values, all this reads, where they are."""
    t0 = time.perf_counter()
    v = _normalize(v0)
    vp = [torch.zeros_like(t) for t in v]
    beta = torch.zeros((), dtype=torch.float64, device=v[0].device)
    alphas, betas, code = [], [], 0
    for _ in range(max_iter):
        w = op.hvp(v)
        ab = step(w, v, vp, beta)
        del w
        v, vp = vp, v
        beta = ab[1].to(v[0].device)
        a, b = ab.tolist()
        alphas.append(a)
        betas.append(b)
        code = _lanczos_stop(alphas, betas, tol, stop, margin)
        if times is not None:
            times.append(time.perf_counter() - t0)
        if progress is not None:
            lo, hi = ritz_extremes(alphas, betas)[:2]
            progress(len(alphas), max(abs(lo), abs(hi)))
        if code:
            break
    return alphas, betas, code


def _power_python(op, v0, max_iter, tol, step, times=None, progress=None):
    """Power iteration with pytorch-hessian-eigenthings' stop rule, |rq_k - rq_{k-1}| / |rq_k| < tol (rq_0 = 0)."""
    t0 = time.perf_counter()
    v = _normalize(v0)
    hist, prev, code = [], 0.0, 0
    for _ in range(max_iter):
        w = op.hvp(v)
        rq, nrm = step(w, v).tolist()
        del w
        hist.append((rq, nrm))
        err = 1.0 if rq == 0.0 else abs((rq - prev) / rq)
        if times is not None:
            times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(len(hist), abs(rq))
        if err < tol:
            code = 1
            break
        prev = rq
    return hist, code


def _peak_memory(device):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1024 if sys.platform != "darwin" else 1)
    cuda = None
    if device.type == "cuda":
        cuda = int(torch.cuda.max_memory_allocated(device))
    return {"device": str(device), "peak_rss_bytes": int(rss), "cuda_peak_allocated_bytes": cuda}


def hessian_spectrum(model, batches, method="lanczos", tol=1e-4, max_iter=100, seed=0, *, backend="auto",
                     stop="dominant", start=None, cross_entropy="auto", graph_memory_budget=None,
                     v0=None, return_operator=False, progress=None):
    """Extreme eigenvalues of the Hessian of the answer-token loss over `batches` (see HessianOperator).

    backend: "auto" (extension if it loads, else plain PyTorch), "extension" (required), "torch" (plain).
    stop (lanczos): "dominant" (default: the end giving rho converged to tol and the other end bounded below
        rho) or "both" (both ends converged to tol * rho).
    start: the start vector: "subsample" (lanczos default where its vectors fit: a few Lanczos steps on the
        Hessian of the first ceil(N/10) samples give a Ritz vector near the dominant eigenvector, see
        _subsample_start_vector), "gradient+random" (g/||g|| + r/||r||, see _mixed_start_vector; the lanczos
        default otherwise: fewer than 8 samples, or WARM_VECTORS parameter-sized vectors over a quarter of the
        memory budget) or "random" (seeded Gaussian r; the default for power, like eigenthings); v0 overrides it.
    cross_entropy (extension backend): "auto" (linear_xent where the LM head is verified to be a plain linear
        layer, else softmax_xent), "linear_xent", "softmax_xent", or "torch" (autograd's).
    progress: called as progress(iteration, running rho) after every iteration of the Python solver loops
        (the C++ loop runs the whole solve in one call and reports nothing until it returns).
    Returns the result dict; with return_operator=True, (dict, HessianOperator).
    """
    if method not in ("lanczos", "power"):
        raise CurvatureError(f"method must be 'lanczos' or 'power', got {method!r}")
    if not (tol > 0):
        raise CurvatureError(f"tol must be > 0, got {tol}")
    if int(max_iter) < 1:
        raise CurvatureError(f"max_iter must be >= 1, got {max_iter}")
    if backend not in ("auto", "extension", "torch"):
        raise CurvatureError(f"backend must be auto, extension or torch, got {backend!r}")
    if stop not in STOP_RULES:
        raise CurvatureError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    if cross_entropy != "auto":
        _ce_mode(cross_entropy)
    auto_start = start is None
    if start is None:
        start = "subsample" if method == "lanczos" else "random"
    if start not in START_VECTORS:
        raise CurvatureError(f"start must be one of {', '.join(START_VECTORS)}, got {start!r}")
    ext = load_extension("none" if backend == "torch" else None)
    if backend == "extension" and not ext["ok"]:
        raise CurvatureError(f"the C++ extension is not available ({ext['detail']}); build it with "
                             "`python setup.py build_ext --inplace` or use backend='torch'")
    use_ext = ext["ok"] and backend != "torch"
    if cross_entropy != "auto" and cross_entropy != "torch" and not use_ext:
        raise CurvatureError(f"cross_entropy={cross_entropy!r} needs the C++ extension (backend='torch' or "
                             f"extension unavailable: {ext['detail']})")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _prepare_model(model)
    t0 = time.perf_counter()
    ce = ("auto" if use_ext else "torch") if cross_entropy == "auto" else cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    budget = graph_memory_budget if graph_memory_budget is not None else _default_budget(device)
    n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    warm_rows = min(int(batches[0]["input_ids"].shape[0]), max(2, math.ceil(n_samples / 10))) if batches else 0
    want_warm = v0 is None and start == "subsample" and 0 < warm_rows < n_samples
    if want_warm and auto_start and not (warm_rows <= n_samples / 4 and _warm_start_fits(params, budget)):
        want_warm = False  # too few samples for a cheap subsample, or (7B) the basis does not fit: three vectors
    op = HessianOperator(model, batches, fused_ce=ce, graph_memory_budget=graph_memory_budget,
                         keep_first=warm_rows if want_warm else 0)
    t_setup = time.perf_counter() - t0
    warm = None
    if v0 is not None:
        start_used = "given"
    elif start == "random":
        v0, start_used = _start_vector(op.params, seed), "random"
    elif want_warm and op.first_out is not None:
        tw = time.perf_counter()
        v0, warm = _subsample_start_vector(op, seed)
        warm["seconds"] = time.perf_counter() - tw
        start_used = "subsample"
        op.first_out = None  # the full solve needs the summed graph only
    else:
        v0, start_used = _mixed_start_vector(op, seed)
    cpp_loop = use_ext and not op.recompute
    times = []
    t_solve = time.perf_counter()
    if method == "lanczos":
        if cpp_loop:
            a, b, code, tt = torch.ops.hessian.lanczos_solve(op.g_out, op.g_index, op.params, list(v0), int(max_iter),
                                                             float(tol), STOP_RULES[stop], DOMINANT_MARGIN)
            alphas, betas, times = a.tolist(), b.tolist(), tt.tolist()
            op.hvp_count += len(alphas)
        else:
            step = torch.ops.hessian.lanczos_step if use_ext else lanczos_step_torch
            alphas, betas, code = _lanczos_python(op, v0, int(max_iter), float(tol), step, stop, DOMINANT_MARGIN,
                                                  times, progress)
    else:
        if cpp_loop:
            h, code, tt = torch.ops.hessian.power_solve(op.g_out, op.g_index, op.params, list(v0), int(max_iter),
                                                        float(tol))
            hist, times = [tuple(r) for r in h.tolist()], tt.tolist()
            op.hvp_count += len(hist)
        else:
            step = torch.ops.hessian.power_step if use_ext else power_step_torch
            hist, code = _power_python(op, v0, int(max_iter), float(tol), step, times, progress)
    wall = time.perf_counter() - t0
    offset = t_solve - t0  # iteration times counted from the start of this call (graph build included)
    times = [offset + t for t in times]
    if method == "lanczos":
        lmin, lmax, rmin, rmax = ritz_extremes(alphas, betas)
        max_dom = abs(lmax) >= abs(lmin)
        rho = abs(lmax) if max_dom else abs(lmin)
        hist = [list(ritz_extremes(alphas[:k], betas[:k])[:2]) for k in range(1, len(alphas) + 1)]
        res = {"method": "lanczos", "lambda_max": lmax, "lambda_min": lmin, "rho": rho,
               "iterations": len(alphas), "residual": rmax if max_dom else rmin, "residual_max": rmax,
               "residual_min": rmin, "converged": code in (1, 2, 3), "stop_reason": STOP_REASONS[int(code)],
               "converged_ends": {"max": bool(code == 2 or rmax <= tol * rho),
                                  "min": bool(code == 2 or rmin <= tol * rho)},
               "ritz_history": hist, "rho_history": [max(abs(x), abs(y)) for x, y in hist]}
    else:
        rq, nrm = hist[-1]
        res = {"method": "power", "lambda_max": rq if rq >= 0 else None, "lambda_min": rq if rq < 0 else None,
               "rho": abs(rq), "iterations": len(hist), "residual": math.sqrt(max(nrm * nrm - rq * rq, 0.0)),
               "residual_max": None, "residual_min": None, "converged": code == 1,
               "stop_reason": "relative_change" if code == 1 else "max_iter", "ritz_history": [h[0] for h in hist],
               "rho_history": [abs(h[0]) for h in hist]}
    if not res["converged"]:
        res["warning"] = (f"{method} did not converge in {res['iterations']} iterations (tol={tol}); "
                          f"rho={res['rho']:.6g} is an estimate with residual {res['residual']:.3g}")
        warnings.warn(res["warning"], RuntimeWarning, stacklevel=2)
    res.update({
        "hvp_count": op.hvp_count, "sub_hvp_count": op.sub_hvp_count, "warm_start": warm, "wall_time_s": wall,
        "setup_time_s": t_setup, "iteration_times_s": times,
        "peak_memory": _peak_memory(device),
        "settings": {"method": method, "tol": tol, "max_iter": int(max_iter), "seed": seed,
                     "stop_rule": stop if method == "lanczos" else "relative_change", "start_vector": start_used,
                     "dominant_margin": DOMINANT_MARGIN if method == "lanczos" and stop == "dominant" else None,
                     "graph_memory_budget": op.budget, "dtype": str(op.params[0].dtype).replace("torch.", ""),
                     "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
                     "sdpa_backend": "math"},
        "backend": {"extension": ext["name"] if use_ext else "none",
                    "extension_detail": ext["detail"] if use_ext or backend != "torch" else "not requested",
                    "solver_loop": "cpp" if cpp_loop else "python", "step": "fused_op" if use_ext else "torch",
                    "cross_entropy": {"torch": "torch_log_softmax_nll", "softmax_xent": "fused_softmax_xent",
                                      "linear_xent": "fused_linear_xent"}[op.ce]},
        "graphs": {"micro_batches": len(op.batches), "retained": op.retained_count, "recomputed": len(op.recompute),
                   "saved_bytes_per_graph": op.graph_bytes},
        "n_params": int(sum(p.numel() for p in op.params)), "n_samples": int(sum(b["input_ids"].shape[0]
                                                                                 for b in op.batches)),
        "n_answer_tokens": op.total_tokens, "loss": op.loss_value,
    })
    order = ["method", "lambda_max", "lambda_min", "rho", "iterations", "hvp_count", "residual", "converged"]
    res = {**{k: res[k] for k in order}, **{k: v for k, v in res.items() if k not in order}}
    return (res, op) if return_operator else res


# ------------------------------------------------------------------------------------------------ CLI
def _run_id(model_dir):
    try:
        with open(os.path.join(model_dir, "run.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return None


def _loss_value(model, batches, fused):
    total = sum(_count_answer_tokens(b) for b in batches)
    with torch.no_grad():
        return float(sum(float(batch_answer_loss_sum(model, b, fused)) for b in batches) / total)


def build_batches(tokenizer, examples, micro_batch_size, max_length=None):
    """Encode with finetune.encode_example and collate with finetune.collate (length-sorted micro-batches)."""
    import finetune

    if max_length is None:  # finetune.py's own default, so the loss is the one it minimised
        max_length = finetune.default_config()["max_length"] if hasattr(finetune, "default_config") else 2048
    enc = [finetune.encode_example(tokenizer, ex, max_length) for ex in examples]
    enc.sort(key=lambda e: len(e["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [finetune.collate(enc[i:i + micro_batch_size], pad) for i in range(0, len(enc), micro_batch_size)]


def build_parser():
    from common import HelpFormatter
    ap = argparse.ArgumentParser(description="Hessian spectral radius of the first-task loss (paper section 4.3)",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="theta_A: a checkpoint folder tuned on --task (or 'tiny', a hub "
                    "id)")
    ap.add_argument("--task", required=True, help="the task whose training loss is differentiated (theta_A's task)")
    ap.add_argument("--samples", type=int, default=50, help="training examples in the loss (seeded sample, >= 1)")
    ap.add_argument("--out", required=True, help="curvature.json path; refused if it exists, unless --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --taylor_out files)")
    ap.add_argument("--method", choices=["lanczos", "power"], default="lanczos", help="eigen-solver")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the stop rule (> 0)")
    ap.add_argument("--stop", choices=["dominant", "both"], default="dominant",
                    help="lanczos stop rule: the end giving rho converged (and the other end bounded below rho), "
                         "or both ends converged")
    ap.add_argument("--start", choices=list(START_VECTORS), default=None,
                    help="start vector: a Ritz vector of the Hessian of the first N/10 samples (lanczos default "
                         "where it fits in memory), the loss gradient plus a seeded random vector (lanczos "
                         "otherwise), or the random vector alone (power default)")
    ap.add_argument("--max_iter", type=int, default=100, help="most solver iterations, one HVP each (>= 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample and the random start vector (>= 0)")
    ap.add_argument("--reference", nargs="+", default=None,
                    help="checkpoint dir(s) of theta_AB for the Taylor check (several need --taylor_out; unset: "
                         "no Taylor check)")
    ap.add_argument("--taylor_out", default=None, metavar="NAME",
                    help="write each reference's Taylor check to <reference dir>/NAME (e.g. taylor.json); --out "
                         "then holds the spectrum alone (unset: the check goes into --out)")
    ap.add_argument("--spectrum_from", default=None,
                    help="with --reference: take the spectrum from this curvature.json of the same model and "
                         "samples instead of solving again (the Taylor check then costs one HVP)")
    ap.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: the synthetic "
                    "tasks)")
    ap.add_argument("--micro_batch_size", type=int, default=10, help="samples per retained graph (>= 1)")
    ap.add_argument("--max_length", type=int, default=None, help="tokens per example (unset: finetune.py's "
                    "default, so the loss is the one it minimised)")
    ap.add_argument("--graph_memory_budget_gb", type=float, default=None,
                    help="memory for retained graphs, GiB (> 0; unset: a share of the device's memory)")
    ap.add_argument("--backend", choices=["auto", "extension", "torch"], default="auto",
                    help="auto: the C++ extension if it loads, else plain PyTorch")
    return ap


CLI_NEEDS = "curvature.py's command line needs common.py, tasks.py and finetune.py beside it"


def main(argv=None):
    try:
        from common import die_on_user_error
    except ImportError as e:
        print(f"error: {e}: {CLI_NEEDS}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    result = die_on_user_error(lambda: run_cli(args))
    print(json.dumps({k: result.get(k) for k in ("rho", "lambda_max", "lambda_min", "iterations", "hvp_count",
                                                  "converged", "wall_time_s")}))
    if not result["converged"]:
        print(f"warning: {result.get('warning')}", file=sys.stderr)
    return 0


PROGRESS_EVERY = 10   # iterations between progress lines
PROGRESS_S = 30.0     # ... or seconds, whichever comes first


def _progress_printer():
    last = [time.time()]

    def progress(k, rho):
        if k % PROGRESS_EVERY == 0 or time.time() - last[0] >= PROGRESS_S:
            last[0] = time.time()
            print(f"curvature: iteration {k}: rho {rho:.6g}", flush=True)
    return progress


def run_cli(args):
    try:
        import common
        import finetune  # noqa: F401
        import tasks
    except ImportError as e:
        raise CurvatureError(f"{e}: {CLI_NEEDS}") from None
    # every check before anything is loaded: numbers, names, then the outputs
    common.check_args(vars(args), {"samples": common.AT_LEAST_1, "tol": common.POSITIVE, "max_iter": common.AT_LEAST_1,
                                   "seed": common.NON_NEGATIVE, "micro_batch_size": common.AT_LEAST_1,
                                   "max_length": common.AT_LEAST_1, "graph_memory_budget_gb": common.POSITIVE})
    if args.task not in tasks.TASKS:
        raise CurvatureError(f"--task {args.task!r} is not one of {', '.join(tasks.TASKS)}")
    refs = list(args.reference or [])
    for r in refs:
        if not os.path.isdir(r):
            raise CurvatureError(f"--reference {r}: no such checkpoint directory (pass theta_AB's dir)")
    if len(refs) > 1 and not args.taylor_out:
        raise CurvatureError("several --reference dirs need --taylor_out NAME (each gets <dir>/NAME)")
    if args.taylor_out and (not refs or os.sep in args.taylor_out or not args.taylor_out.endswith(".json")):
        raise CurvatureError(f"--taylor_out {args.taylor_out!r}: give a file name such as taylor.json (written "
                             "into each --reference dir), together with --reference")
    model_path = common.resolve_model_path(args.model)
    common.check_out(args.out, args.overwrite, example="curvature.json")
    for r in refs if args.taylor_out else []:
        common.check_out(os.path.join(r, args.taylor_out), args.overwrite, flag="--taylor_out")
    meta = common.read_meta(model_path)
    chain = list(meta.get("chain") or [])
    task_in_chain = args.task in chain
    if not task_in_chain:
        print(f"warning: --task {args.task} is not in --model's chain ({' -> '.join(chain) or 'none: a base model'}); "
              f"this is the curvature of a loss the model was never tuned on", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data = tasks.load_task(args.task, split="train", data_dir=args.data_dir, seed=args.seed)
    pool = list(data.examples)
    if not pool:
        raise CurvatureError(f"task {args.task} has no training examples (data: {data.source})")
    chosen = common.sample_indices(len(pool), args.samples, args.seed)
    if len(chosen) < args.samples:
        print(f"note: task {args.task} has only {len(pool)} training examples; using all", file=sys.stderr)
    examples = [pool[i] for i in chosen]
    ext = load_extension("none" if args.backend == "torch" else None)
    print(f"curvature: {args.model} (chain {' -> '.join(chain) or 'none'}), task {args.task} [{data.source}], "
          f"{len(examples)} samples, {args.method}, backend {ext['name'] if ext['ok'] else 'torch'} "
          f"-> {args.out}", flush=True)
    model, tok = common.load_model_and_tokenizer(model_path)
    batches = build_batches(tok, examples, args.micro_batch_size, args.max_length)
    budget = None if args.graph_memory_budget_gb is None else int(args.graph_memory_budget_gb * (1 << 30))
    if args.spectrum_from is not None:
        print(f"curvature: the spectrum from {args.spectrum_from}", flush=True)
        res, op = spectrum_from_file(args, model, batches, examples, budget)
    else:
        print(f"curvature: building the graphs and solving (tol {args.tol:g}, at most {args.max_iter} iterations)",
              flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res, op = hessian_spectrum(model, batches, method=args.method, tol=args.tol, max_iter=args.max_iter,
                                       seed=args.seed, backend=args.backend, stop=args.stop, start=args.start,
                                       graph_memory_budget=budget,
                                       return_operator=True, progress=_progress_printer())
        print(f"curvature: rho {res['rho']:.6g} after {res['iterations']} iterations ({res['hvp_count']} HVPs, "
              f"{res['backend']['solver_loop']} loop, {'converged' if res['converged'] else 'NOT converged'}) in "
              f"{res['wall_time_s']:.1f}s", flush=True)
    checks = []
    for r in refs:
        print(f"curvature: Taylor check against {r}", flush=True)
        checks.append(reference_check(op, res["rho"], r, batches, common))
    metadata = common.run_metadata()

    def record(ref, config):
        out = dict(res)
        out.update({"model": args.model, "run_id": _run_id(args.model), "task": args.task, "chain": chain,
                    "task_in_chain": task_in_chain, "sample_ids": [str(ex.id) for ex in examples],
                    "data": {"source": str(data.source), "split": "train", "n_available": len(pool)},
                    "reference": ref, "config": config, "metadata": metadata})
        return out

    if args.taylor_out:
        files = []
        for r, chk in zip(refs, checks):
            path = os.path.join(r, args.taylor_out)
            common.write_json_atomic(path, record(chk, {**vars(args), "reference": r, "taylor_out": None,
                                                        "out": path}))
            files.append(path)
            print(f"curvature: Taylor check -> {path}", flush=True)
        result = record(None, vars(args))
        result["taylor_files"] = files
    else:
        result = record(checks[0] if checks else None, {**vars(args), "reference": refs[0] if refs else None})
    common.write_json_atomic(args.out, result)  # last: run_all.sh takes --out as the sign that all is written
    print(f"curvature: -> {args.out}", flush=True)
    return result


def spectrum_from_file(args, model, batches, examples, budget):
    """The spectrum of an earlier curvature.json of the same model and samples, and an operator for
    the reference terms (no solve)."""
    if not args.reference:
        raise CurvatureError("--spectrum_from needs --reference (it only skips the solve of a Taylor check)")
    try:
        with open(args.spectrum_from) as f:
            prev = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CurvatureError(f"--spectrum_from {args.spectrum_from}: cannot read it ({e}); run curvature.py on "
                             f"--model first") from None
    ids = [str(ex.id) for ex in examples]
    if prev.get("task") != args.task or prev.get("sample_ids") != ids or prev.get("run_id") != _run_id(args.model):
        raise CurvatureError(f"--spectrum_from {args.spectrum_from} was computed for another model, task or sample "
                             f"set; use the curvature.json of --model with the same --task, --samples and --seed")
    _prepare_model(model)
    ext = load_extension("none" if args.backend == "torch" else None)
    ce = "auto" if (ext["ok"] and args.backend != "torch") else "torch"
    op = HessianOperator(model, batches, fused_ce=ce, graph_memory_budget=budget)
    keep = ("method", "lambda_max", "lambda_min", "rho", "iterations", "hvp_count", "residual", "converged",
            "stop_reason", "warning", "settings", "backend", "n_params", "n_samples", "n_answer_tokens", "loss",
            "wall_time_s")
    res = {k: prev[k] for k in keep if k in prev}
    res["spectrum_from"] = os.path.abspath(args.spectrum_from)
    return res, op


def reference_check(op, rho, ref_dir, batches, common):
    """Paper eqs. 3-4 at theta_A: ||delta||^2, L_A(theta_AB) - L_A(theta_A), 0.5 d^T H d, 0.5 rho ||d||^2."""
    model = op.model
    ref_model, _ = common.load_model_and_tokenizer(ref_dir)
    ref_model.to(op.params[0].device)
    _prepare_model(ref_model)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    delta = []
    for p in op.params:
        name = names[id(p)]
        ref_p = ref_params.get(name)
        if ref_p is None or ref_p.shape != p.shape:
            raise CurvatureError(f"--reference {ref_dir}: parameter {name} is missing or has another shape; "
                                 "pass a checkpoint tuned from --model")
        delta.append((ref_p.detach().to(p.dtype) - p.detach()).contiguous())
    delta_sq = float(sum(d.double().pow(2).sum() for d in delta))
    loss_a = _loss_value(model, batches, op.fused)
    loss_ab = _loss_value(ref_model, batches, op.fused)
    h_delta = op.hvp(delta)
    quad = 0.5 * float(sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(delta, h_delta)))
    bound = 0.5 * rho * delta_sq
    return {"model": ref_dir, "run_id": _run_id(ref_dir), "delta_sq_norm": delta_sq, "loss_A_at_A": loss_a,
            "loss_A_at_AB": loss_ab, "actual_loss_change": loss_ab - loss_a, "quadratic_term": quad,
            "bound": bound, "quadratic_le_bound": bool(quad <= bound * (1 + 1e-6) + 1e-12)}


if __name__ == "__main__":
    sys.exit(main())
