"""Curvature of the first-task minimum: the extreme Hessian eigenvalues and spectral radius rho of the loss
finetune.py minimised (its answer-token NLL on N seeded training samples), from Hessian-vector products, and
the Taylor check of the paper's eqs. 3-4 against the chains tuned from that minimum.

    python curvature.py --model runs/demo/toxigen --task toxigen --samples 50 --out runs/demo/curv/toxigen.json
    python curvature.py --model runs/demo/toxigen --task toxigen --reference runs/demo/toxigen-arc --out c.json
    python curvature.py --model runs/demo/toxigen --task toxigen --reference runs/demo/toxigen-arc runs/demo/mix \\
        --taylor_out taylor.json --out runs/demo/curv/toxigen.json      # one solve, <reference>/taylor.json each
    torchrun --nproc_per_node=8 curvature.py --model llama-7b-toxigen --task toxigen --dtype bfloat16 \\
        --data_dir ../shared/data --out curv.json   # samples split across GPUs, solver vectors sharded
    python setup.py build_ext --inplace        # the C++/CUDA extension ahead of time (else built on first use)

The file reads as: the operator (HessianOperator; ShardedOperator under a process group), the solvers
(Lanczos with a certified stop on --rtol, power iteration), the command line. The command line needs
common.py, tasks.py, finetune.py and synthetic.py beside it (tiny_base.py for --model tiny);
hessian_spectrum() alone needs torch, numpy and ops.py (which loads the optional extension in csrc/);
layerwise_hvp.py beside it adds the HVP one decoder layer at a time (--gradient_checkpointing), answer_rows.py
the last decoder layer run at the answer rows only (the rows the loss reads; every HVP costs less by that),
attention_hvp.py attention in causal blocks with the softmax's double backward fused (CPU; the same).
Solvers, stop rules, backends and what curvature.json holds: README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch

from ..hessian.ops import ExtensionError, load_extension  # noqa: F401  (the extension: loading and registration)

HERE = os.path.dirname(os.path.abspath(__file__))
IGNORE_INDEX = -100


try:  # the project's UserError, so that callers catch one type and the CLI's handler prints it
    from ..common import UserError as _UserErrorBase
except ImportError:  # curvature.py copied alone: the solver needs no other file of the project
    _UserErrorBase = Exception


class CurvatureError(_UserErrorBase):
    """Bad input to curvature.py (the command line prints it as one `error: ...` line and exits 2)."""


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


def shard_dot_torch(w, v):
    """Reference of hessian::shard_dot: [<w,v>, <w,w>] in float64 (one shard; the caller all-reduces)."""
    d = sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) for a, b in zip(w, v))
    q = sum(a.double().pow(2).sum() for a in w)
    return torch.stack([d.cpu(), q.cpu()]).to(torch.float64)


def lanczos_update_torch(w, v, v_prev, alpha, beta):
    """Reference of hessian::lanczos_update: v_prev <- w - alpha v - beta v_prev (float64 per element, rounded
    to the storage dtype); returns [||v_prev||^2] of this shard."""
    alpha, beta = float(alpha), float(beta)
    sq = torch.zeros((), dtype=torch.float64)
    for a, b, p in zip(w, v, v_prev):
        p.copy_(a.double() - alpha * b.double() - beta * p.double())
        sq = sq + p.double().pow(2).sum().cpu()
    return sq.reshape(1)


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
    if _checkpointing(model):  # non-reentrant: the only kind with a double backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover
        return contextlib.nullcontext()


CE_MODES = ("torch", "softmax_xent", "linear_xent")
CHECKPOINTING = ("auto", "on", "off")  # HessianOperator's gradient_checkpointing


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


def _answer_hidden(dec, ids, am, keep, last_rows=None):
    """dec's last hidden state at keep's rows; last_rows: an answer_rows.AnswerRows that runs dec's last layer
    at those rows only (verified by _last_layer_rows)."""
    with _math_sdpa():
        if last_rows is not None and bool(keep.any()):
            return last_rows(dec, ids, am, keep)
        out = dec(input_ids=ids, attention_mask=am, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[keep]


def _last_layer_rows(model, batch):
    """An answer_rows.AnswerRows for model's decoder where it equals the decoder's own forward on two rows of
    `batch` (_probe, _same_forward), else None (the full forward, as before)."""
    parts = linear_head(model)
    try:
        from ..hessian.answer_rows import AnswerRows
    except ImportError:  # curvature.py copied without it: the full forward
        return None
    rows = AnswerRows.build(parts[0]) if parts is not None else None
    if rows is None:
        return None
    ids, am, keep = _probe(model, batch)
    if not bool(keep.any()):
        return None
    ok = _same_forward(lambda: _answer_hidden(parts[0], ids, am, keep),
                       lambda: _answer_hidden(parts[0], ids, am, keep, rows))
    return rows if ok else None


def batch_answer_loss_sum(model, batch, fused=False, answer_logits_only: bool = True, last_rows=None):
    """Sum of answer-token NLL of one batch; logits are only projected at positions that predict an answer
    token (HF `logits_to_keep` boolean mask), falling back to full logits for models without it.

    fused: the cross-entropy (see _ce_mode): False/"torch", True/"softmax_xent", "linear_xent" (the decoder's
    answer-row hidden states through hessian::linear_xent with the LM head's weight; only for models where
    linear_head() holds -- HessianOperator verifies it). answer_logits_only=False projects every position
    (finetune.answer_loss_sum's way; benchmarks only). last_rows (linear_xent): the decoder's last layer run at
    the answer rows only (_last_layer_rows; HessianOperator verifies it)."""
    mode = _ce_mode(fused)
    dev = next(model.parameters()).device
    ids, am, keep, targets = _answer_positions(batch, dev)
    if mode == "linear_xent":
        parts = linear_head(model)
        if parts is None:
            raise CurvatureError("linear_xent needs an HF causal LM with an nn.Linear LM head without bias")
        rows = _answer_hidden(parts[0], ids, am, keep, last_rows)
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


def _probe(model, batch):
    """(ids, attention_mask, keep) of the first two rows of `batch` (all of it where they hold no answer token):
    enough to check a forward against the model's own, once, without gradients."""
    small = {k: v[:2] for k, v in batch.items() if torch.is_tensor(v)}
    ids, am, keep, _ = _answer_positions(small if _count_answer_tokens(small) else batch,
                                         next(model.parameters()).device)
    return ids, am, keep


def _same_forward(ref_fn, mine_fn) -> bool:
    """True when mine_fn() equals ref_fn() (the model's own forward) to 1e-4 of its largest entry (1e-2 in half
    precision); any failure, a missing output or a shape that differs is False (keep the model's own)."""
    try:
        with torch.no_grad():
            ref, mine = ref_fn(), mine_fn()
    except Exception:  # noqa: BLE001 - a forward this file cannot run is one it does not use
        return False
    if ref is None or ref.shape != mine.shape or ref.numel() == 0:
        return False
    tol = 1e-2 if ref.dtype in (torch.float16, torch.bfloat16) or mine.dtype != ref.dtype else 1e-4
    ref, mine = ref.double(), mine.double()
    return bool(float((ref - mine).abs().max()) <= tol * max(float(ref.abs().max()), 1e-6))


def verify_linear_head(model, batch) -> bool:
    """True when lm_head(decoder(batch)) equals the model's own answer-row logits (no soft-capping, scaling or
    bias hidden in the model's forward); checked once, without gradients, on the first two rows of a batch."""
    parts = linear_head(model)
    if parts is None:
        return False
    ids, am, keep = _probe(model, batch)
    if not bool(keep.any()):
        return False  # nothing to compare: stay with the logits path
    return _same_forward(lambda: _answer_logits(model, ids, am, keep),
                         lambda: parts[1](_answer_hidden(parts[0], ids, am, keep)))


def _block_attention(model, batch, fused):
    """("blocks_fused" | "blocks", context) where attention_hvp.block_attention (fused: its softmax double
    backward from the extension) gives the model's answer-row logits on two rows of `batch` as the model does
    (blocks of 4 rows, so that short probes use them too) and took over the model's attention; else ("model",
    nullcontext): the model's own attention, as before."""
    try:
        from ..hessian import attention as attention_hvp
    except ImportError:  # curvature.py copied without it
        return "model", contextlib.nullcontext
    ids, am, keep = _probe(model, batch)
    if not bool(keep.any()):
        return "model", contextlib.nullcontext
    fused = bool(fused) and attention_hvp.fused_softmax_available()
    routed = []

    def mine():
        with attention_hvp.block_attention(min_block=4, fused=fused) as mode:
            out = _answer_logits(model, ids, am, keep)
        routed.append(mode.routed)
        return out
    if not _same_forward(lambda: _answer_logits(model, ids, am, keep), mine) or not any(routed):
        return "model", contextlib.nullcontext
    return ("blocks_fused" if fused else "blocks"), functools.partial(attention_hvp.block_attention, fused=fused)


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
    every iteration. The largest micro-batch is built first and its graph measured with saved-tensor hooks;
    the others are retained while their graphs (estimated from it by their token counts) fit in
    graph_memory_budget bytes. Those beyond it are recomputed for every HVP: their graph rebuilt where the
    largest of them fits beside the retained ones, else (gradient_checkpointing "auto") one decoder layer at a
    time (layerwise_hvp.py: each layer's input kept, the layer rebuilt, ~1.2x a rebuilt graph's time);
    "on" takes every micro-batch layer-wise (no graph retained: the least memory), "off" never does (the
    rebuilt graph may then exceed the budget). Vectors in and out are in vec_dtype
    (float64 for a float64 model, else float32: a bfloat16 model's HVP is computed in bfloat16, the solver's
    vectors stay float32)."""

    def __init__(self, model, batches, fused_ce=False, graph_memory_budget: int | None = None,
                 answer_logits_only: bool = True, keep_first: int = 0, first_batch=None, subsample=False,
                 total_tokens: int | None = None, gradient_checkpointing: str = "auto", last_layer_rows: bool = True,
                 block_attention: bool = True):
        """fused_ce: False/"torch" (autograd cross-entropy), "softmax_xent" (fused op on the logits),
        "linear_xent" (fused LM head + cross-entropy, required), True/"auto" (linear_xent where
        verify_linear_head() holds on the first batch, else softmax_xent). Needs the extension unless "torch".
        keep_first=k: the first k samples of batches[0] become a micro-batch of their own, whose Hessian
        hvp_first() applies (the subsample warm start); first_batch: that micro-batch given directly, ahead of
        batches; subsample=True with first_batch None: this process holds none of the subsample's rows
        (hvp_first gives zeros). total_tokens: the loss's denominator where batches are one process's share.
        gradient_checkpointing: "auto", "on" or "off" (above); "on" needs a model layerwise_hvp supports.
        last_layer_rows (linear_xent): run the decoder's last layer at the answer rows only (answer_rows.py:
        its other positions feed no answer token), where that equals the decoder's forward on the first batch.
        block_attention (CPU): the graphs' SDPA attention in causal blocks with the softmax's double backward
        fused (attention_hvp.py), where the model's forward is the same with it on the first batch; `attention`
        says which ran ("blocks_fused", "blocks" without the extension, or "model")."""
        self.answer_logits_only = answer_logits_only
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise CurvatureError("the model has no trainable parameters")
        self.vec_dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.batches = [b for b in batches if b is not None]
        k = int(keep_first or 0)
        if k and self.batches and first_batch is None and 0 < k < int(self.batches[0]["input_ids"].shape[0]):
            b0 = self.batches[0]
            first_batch = {key: (v[:k] if torch.is_tensor(v) else v) for key, v in b0.items()}
            self.batches[0] = {key: (v[k:] if torch.is_tensor(v) else v) for key, v in b0.items()}
        self.subsample = first_batch is not None or bool(subsample)
        if first_batch is not None:
            self.batches.insert(0, first_batch)
        if not self.batches and total_tokens is None:
            raise CurvatureError("no batches given: the Hessian needs at least one sample")
        own_tokens = sum(_count_answer_tokens(b) for b in self.batches)
        self.total_tokens = own_tokens if total_tokens is None else int(total_tokens)
        if self.total_tokens == 0:
            raise CurvatureError("the batches contain no answer tokens (every label is -100)")
        probe = next((b for b in self.batches if _count_answer_tokens(b) > 0), None)
        if fused_ce not in (False, None, "torch") and not load_extension()["ok"]:
            if fused_ce not in (True, "auto"):
                raise CurvatureError(f"cross-entropy {fused_ce!r} needs the C++ extension: {load_extension()['detail']}")
            fused_ce = "torch"  # auto without the extension: autograd's cross-entropy
        if fused_ce is True or fused_ce == "auto":
            self.ce = "linear_xent" if probe is not None and verify_linear_head(model, probe) else "softmax_xent"
        else:
            self.ce = _ce_mode(fused_ce)
            if self.ce == "linear_xent" and probe is not None and not verify_linear_head(model, probe):
                raise CurvatureError("cross-entropy linear_xent: the model's logits are not "
                                     "lm_head(decoder hidden states) (or it has no plain linear LM head)")
        self.fused = self.ce != "torch"
        self.last_rows = None
        if self.ce == "linear_xent" and last_layer_rows and probe is not None:
            self.last_rows = _last_layer_rows(model, probe)
        dev = self.params[0].device
        self.attention, self._attn = "model", contextlib.nullcontext
        if block_attention and probe is not None and dev.type == "cpu":
            self.attention, self._attn = _block_attention(model, probe, fused=self.fused)
        self.budget = int(graph_memory_budget) if graph_memory_budget is not None else _default_budget(dev)
        if gradient_checkpointing not in CHECKPOINTING:
            raise CurvatureError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                                 f"got {gradient_checkpointing!r}")
        self.checkpointing = gradient_checkpointing
        self.layerwise, self._lw = [], None
        if gradient_checkpointing == "on":
            try:
                from ..hessian.layerwise import unsupported
            except ImportError as e:
                raise CurvatureError(f"gradient checkpointing of the HVP needs layerwise_hvp.py beside curvature.py "
                                     f"({e})") from None
            why = unsupported(model)
            if why:
                raise CurvatureError(f"gradient checkpointing of the HVP: {why}; use --gradient_checkpointing auto "
                                     "or off (in Python gradient_checkpointing='auto' or 'off'): the graphs are then "
                                     "retained or rebuilt whole")
        self.hvp_count = 0
        self.grads_count = 0
        self.loss_value = 0.0
        self._g_sum = None
        self.recompute = []
        self.graph_bytes = 0
        self.first_out, self.first_index, self.first_tokens = None, None, 0
        if first_batch is not None:
            self.first_tokens = _count_answer_tokens(first_batch)
        self.sub_hvp_count = 0
        self.retained = 0
        self.g_index, self.g_out = [], []
        if self.batches and gradient_checkpointing == "on":
            if first_batch is not None:
                raise CurvatureError("the subsample warm start needs a retained graph: with gradient_checkpointing "
                                     "'on' use start 'gradient+random' or 'random'")
            self.layerwise = list(self.batches)
            self.loss_value = float(sum(float(self._loss_only(b)) for b in self.batches))
        elif self.batches:
            self._build(has_first=first_batch is not None)
        if self.layerwise:
            from ..hessian.layerwise import LayerwiseHVP
            self._lw = LayerwiseHVP(model, self.params, self.total_tokens, _answer_positions, _math_sdpa)

    def _first_order(self, batch, create_graph=True):
        loss = self._loss(batch)
        self.loss_value += float(loss.detach())
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        self.grads_count += 1
        return grads

    def _measured_first_order(self, batch):
        """The first-order graph of `batch` and the bytes of the tensors it saved (parameters excluded)."""
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

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grads = self._first_order(batch)
        return grads, int(sum(seen.values()))

    def _build(self, has_first=False):
        sizes = [int(b["input_ids"].numel()) for b in self.batches]
        largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
        # the largest first (its graph is the measurement), then the subsample's (the warm start needs it)
        order = [largest] + ([0] if has_first and largest != 0 else [])
        order += [i for i in range(len(sizes)) if i not in order]
        used = 0
        for i in order:
            b = self.batches[i]
            if i == largest:
                grads, self.graph_bytes = self._measured_first_order(b)
                need = self.graph_bytes
            else:
                need = self.graph_bytes * sizes[i] // max(sizes[largest], 1)
            if used + need > self.budget:
                if i == largest:
                    del grads
                self.recompute.append(b)
                if i != largest:
                    self.loss_value += float(self._loss_only(b))
                continue
            if i != largest:
                grads = self._first_order(b)
            used += need
            self.retained += 1
            if i == 0 and has_first:
                fi = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
                self.first_index, self.first_out = fi, [grads[j] for j in fi]
            if self._g_sum is None:
                self._g_sum = list(grads)
            else:
                self._g_sum = [a if g is None else (g if a is None else a + g) for a, g in zip(self._g_sum, grads)]
            del grads
        if self._g_sum is not None:
            self.g_index = [i for i, g in enumerate(self._g_sum) if g is not None and g.requires_grad]
            self.g_out = [self._g_sum[i] for i in self.g_index]
        self._split_recompute(used, sizes[largest])

    def _split_recompute(self, used, largest_size):
        """Rebuild the recomputed graphs where the largest fits beside the retained ones, else go layer-wise."""
        if not self.recompute or self.checkpointing == "off":
            return
        try:
            from ..hessian.layerwise import unsupported
        except ImportError:  # curvature.py copied without it: rebuilt whole
            return
        if unsupported(self.model):
            return
        need = [self.graph_bytes * int(b["input_ids"].numel()) // max(largest_size, 1) for b in self.recompute]
        if used + max(need) <= self.budget:
            return
        room = self.budget - used
        self.layerwise = [b for b, n in zip(self.recompute, need) if n > room]
        self.recompute = [b for b, n in zip(self.recompute, need) if n <= room]

    def _loss(self, b):
        with self._attn():
            loss = batch_answer_loss_sum(self.model, b, self.ce, self.answer_logits_only, self.last_rows)
        return loss / self.total_tokens

    @property
    def retained_count(self):
        return self.retained

    def _loss_only(self, b):
        with torch.no_grad():
            return self._loss(b)

    def _as_params(self, v):
        return [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(v, self.params)]

    def _out(self, out):
        return [torch.zeros_like(p, dtype=self.vec_dtype) if o is None else o.to(self.vec_dtype).contiguous()
                for o, p in zip(out, self.params)]

    def hvp_first(self, v):
        """H_1 v, H_1 the Hessian of the split-off samples' share of the loss (their graph is part of the full one)."""
        self.sub_hvp_count += 1
        if not self.first_out:
            return self._out([None] * len(self.params))
        v = self._as_params(v)
        res = torch.autograd.grad(self.first_out, self.params, grad_outputs=[v[i] for i in self.first_index],
                                  retain_graph=True, allow_unused=True)
        return self._out(res)

    def hvp(self, v):
        """H v as a list of tensors shaped like the parameters (v: list of the same)."""
        self.hvp_count += 1
        v = self._as_params(v)
        out = [None] * len(self.params)
        if self.g_out:
            out = list(torch.autograd.grad(self.g_out, self.params, grad_outputs=[v[i] for i in self.g_index],
                                           retain_graph=True, allow_unused=True))
        for b in self.recompute:
            loss = self._loss(b)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not idx:
                continue
            res = torch.autograd.grad([grads[i] for i in idx], self.params, grad_outputs=[v[i] for i in idx],
                                      allow_unused=True)
            out = [r if o is None else (o if r is None else o + r) for o, r in zip(out, res)]
        for b in self.layerwise:
            res = self._lw.hvp(b, v)
            out = [r if o is None else (o if r is None else o + r) for o, r in zip(out, res)]
        return self._out(out)

    # the vector space the solvers work in (ShardedOperator has the same four)
    def dot(self, a, b):
        return _dot(a, b)

    def random(self, seed):
        return _start_vector(self.params, seed, self.vec_dtype)

    def gradient(self):
        """The loss gradient (a by-product of the graph build), or None where no graph is retained."""
        if self._g_sum is None:
            return None
        return [torch.zeros_like(p, dtype=self.vec_dtype) if t is None else t.detach().to(self.vec_dtype)
                for t, p in zip(self._g_sum, self.params)]

    def reduce_sum(self, x: float) -> float:
        return float(x)


# --------------------------------------------------------------------------------- several processes
BUCKET_ELEMS = 1 << 26  # elements per collective call: bounds the temporaries of the gather / reduce


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def shard_bounds(n, rank, world):
    """(lo, hi, S): rank's flat slice [lo, hi) of an n-element vector; every shard is stored with S = ceil(n /
    world) elements (the last one zero-padded), so that the collectives see equal sizes."""
    S = -(-n // world)
    lo = min(n, rank * S)
    return lo, min(n, lo + S), S


def split_rows(batches, rank, world, first_rows=0):
    """This rank's samples: ([its rows of the first `first_rows` samples of batches[0]] collated or None,
    [its other rows in micro-batches]). Each group is balanced across ranks by answer tokens (longest
    first to the least loaded rank; ties: the lower rank), rows keep their order, and micro-batches hold at
    most as many rows as the largest given batch; trailing padding is trimmed and re-added."""
    rows = []
    for b in batches:
        am = b.get("attention_mask")
        for r in range(int(b["input_ids"].shape[0])):
            length = int(b["input_ids"].shape[1])
            if am is not None:
                nz = torch.nonzero(am[r]).flatten()
                length = int(nz[-1]) + 1 if nz.numel() else 1
            row = {"input_ids": b["input_ids"][r, :length], "labels": b["labels"][r, :length],
                   "attention_mask": (am[r, :length] if am is not None else torch.ones(length, dtype=torch.long))}
            rows.append((int((row["labels"][1:] != IGNORE_INDEX).sum()), len(rows), row))
    per = max(int(b["input_ids"].shape[0]) for b in batches)
    groups = [rows[:first_rows], rows[first_rows:]]
    mine = []
    for g in groups:
        load = [(0, 0)] * world
        owner = {}
        for tok, idx, _ in sorted(g, key=lambda x: (-x[0], x[1])):
            k = min(range(world), key=lambda j: (load[j], j))
            owner[idx] = k
            load[k] = (load[k][0] + tok, load[k][1] + 1)
        mine.append([row for _, idx, row in g if owner[idx] == rank])
    first = _collate_rows(mine[0]) if mine[0] else None
    rest = sorted(mine[1], key=lambda r: len(r["input_ids"]))
    return first, [_collate_rows(rest[i:i + per]) for i in range(0, len(rest), per)]


def _collate_rows(rows):
    T = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        t = torch.full((len(rows), T), fill, dtype=rows[0][key].dtype)
        for i, r in enumerate(rows):
            t[i, :len(r[key])] = r[key]
        out[key] = t
    return out


class ShardedOperator:
    """H v with every vector sharded across the ranks of the process group: rank r holds the flat slice
    shard_bounds(n, r, world) of the parameter vector in vec_dtype (float32; float64 for a float64 model),
    as [one 1-D tensor]. The model is replicated; `op` is this rank's HessianOperator over its own samples
    (its loss divided by the global answer-token count), so H = sum_r H_r. An HVP all-gathers v into the
    parameters' shapes (in the parameters' dtype; one flat buffer, reused), applies H_r, and reduce-scatters
    the sum into shards (summed in vec_dtype, in buckets of BUCKET_ELEMS; all-reduce + slice where the backend
    has no reduce-scatter, e.g. gloo: twice the traffic). Dot products are local float64 sums all-reduced."""

    def __init__(self, op):
        self.dist = _dist()
        self.op = op
        self.rank, self.world = self.dist.get_rank(), self.dist.get_world_size()
        self.params = op.params
        self.sizes = [p.numel() for p in op.params]
        self.n = sum(self.sizes)
        self.lo, self.hi, self.S = shard_bounds(self.n, self.rank, self.world)
        self.vec_dtype = op.vec_dtype
        self.device = op.params[0].device
        pdt = {p.dtype for p in op.params}
        self.buf_dtype = pdt.pop() if len(pdt) == 1 else self.vec_dtype
        self._buf = torch.zeros(self.world * self.S, dtype=self.buf_dtype, device=self.device)
        self.reduce_scatter = self.dist.get_backend() == "nccl"
        # the *_single names of torch >= 2.13, the *_tensor ones before
        self._all_gather = getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor
        self._reduce_scatter = getattr(self.dist, "reduce_scatter_single", None) or self.dist.reduce_scatter_tensor

    @property
    def hvp_count(self):
        return self.op.hvp_count

    @property
    def sub_hvp_count(self):
        return self.op.sub_hvp_count

    def _views(self):
        flat = self._buf[:self.n]
        return [t.view(p.shape) for t, p in zip(flat.split(self.sizes), self.params)]

    def gather(self, v):
        """[shard] -> tensors shaped like the parameters (views of the reused buffer: valid until the next call)."""
        shard = v[0]
        grid = self._buf.view(self.world, self.S)
        for o in range(0, self.S, BUCKET_ELEMS):
            b = min(BUCKET_ELEMS, self.S - o)
            parts = torch.empty(self.world * b, dtype=self.vec_dtype, device=self.device)
            self._all_gather(parts, shard[o:o + b].contiguous())
            grid[:, o:o + b].copy_(parts.view(self.world, b))
        return self._views()

    def scatter_sum(self, tensors):
        """Tensors shaped like the parameters, summed over ranks -> [this rank's shard] (clears `tensors`)."""
        flat = self._buf
        off = 0
        for i, t in enumerate(tensors):
            flat[off:off + t.numel()].copy_(t.reshape(-1))
            off += t.numel()
            tensors[i] = None
        flat[off:].zero_()
        grid = flat.view(self.world, self.S)
        out = torch.empty(self.S, dtype=self.vec_dtype, device=self.device)
        for o in range(0, self.S, BUCKET_ELEMS):
            b = min(BUCKET_ELEMS, self.S - o)
            chunk = grid[:, o:o + b].to(self.vec_dtype).contiguous().view(-1)
            if self.reduce_scatter:
                self._reduce_scatter(out[o:o + b], chunk)
            else:
                self.dist.all_reduce(chunk)
                out[o:o + b].copy_(chunk.view(self.world, b)[self.rank])
        return [out]

    def hvp(self, v):
        return self.scatter_sum(self.op.hvp(self.gather(v)))

    def hvp_first(self, v):
        return self.scatter_sum(self.op.hvp_first(self.gather(v)))

    def allreduce(self, t):
        t = t.to(device=self.device if self.dist.get_backend() == "nccl" else "cpu", dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.cpu()

    def reduce_sum(self, x: float) -> float:
        return float(self.allreduce(torch.tensor([float(x)]))[0])

    def dot(self, a, b):
        return self.reduce_sum(_dot(a, b))

    def random(self, seed):
        return [_random_flat(self.n, self.lo, self.hi, seed, self.S).to(self.device, self.vec_dtype)]

    def gradient(self):
        g = self.op.gradient()
        if g is None:  # no graph retained on this rank: zeros, so that the collective still runs
            g = [torch.zeros_like(p, dtype=self.vec_dtype) for p in self.params]
        return self.scatter_sum(g)

    def local(self, tensors):
        """The shard of a vector every rank holds whole (tensors shaped like the parameters)."""
        out = torch.zeros(self.S, dtype=self.vec_dtype, device=self.device)
        off = 0
        for t in tensors:
            a, b = max(off, self.lo), min(off + t.numel(), self.hi)
            if a < b:
                out[a - self.lo:b - self.lo].copy_(t.reshape(-1)[a - off:b - off])
            off += t.numel()
        return [out]

    def lanczos_step(self, use_ext):
        return functools.partial(sharded_lanczos_step, allreduce=self.allreduce, use_ext=use_ext)

    def power_step(self, use_ext):
        return functools.partial(sharded_power_step, allreduce=self.allreduce, use_ext=use_ext)


def sharded_lanczos_step(w, v, vp, beta, allreduce, use_ext=True):
    """hessian::lanczos_step on one shard of vectors split across processes: the local halves
    (shard_dot, lanczos_update) with their float64 scalars summed by allreduce(tensor) -> tensor."""
    dot2 = torch.ops.hessian.shard_dot if use_ext else shard_dot_torch
    update = torch.ops.hessian.lanczos_update if use_ext else lanczos_update_torch
    alpha = allreduce(dot2(w, v))[0]
    sq = float(allreduce(update(w, v, vp, alpha.to(v[0].device), beta.to(v[0].device)))[0])
    beta_next = math.sqrt(max(sq, 0.0))
    for t in vp:
        t.mul_(1.0 / beta_next if beta_next > 0 else 0.0)
    return torch.tensor([float(alpha), beta_next], dtype=torch.float64)


def sharded_power_step(w, v, allreduce, use_ext=True):
    """hessian::power_step on one shard (see sharded_lanczos_step)."""
    dot2 = torch.ops.hessian.shard_dot if use_ext else shard_dot_torch
    rq, sq = allreduce(dot2(w, v)).tolist()
    nrm = math.sqrt(max(sq, 0.0))
    for a, b in zip(w, v):
        b.copy_(a * (1.0 / nrm if nrm > 0 else 0.0))
    return torch.tensor([rq, nrm], dtype=torch.float64)


# --------------------------------------------------------------------------------------------- solvers
def ritz_bounds(alphas, betas):
    """Extreme Ritz values of T_k and their certified error bounds (the rule of csrc/hessian.cpp's
    ritz_bounds): (theta_min, theta_max, r_min, r_max, bound_min, bound_max). r = |beta_k s_k| puts an
    eigenvalue within r of theta. The tighter r^2 / gap (Parlett 11.7) needs the gap from that eigenvalue to
    the rest of the spectrum, which a Krylov space knows only once the next Ritz value of the same end is
    resolved: k >= 3 and that neighbour theta_n has r_n < |theta - theta_n| / 2 (its eigenvalue is then the
    next one, the assumption the stop rules make of the extreme Ritz values). gap = min over the other Ritz
    values theta_j of |theta - theta_j| - r_j, used where it exceeds r, and trusted no further than the last
    step's change of theta (an end still moving by more has not met the eigenvalue the gap assumes: on the
    tiny CommonsenseQA checkpoint, whose top eigenvalues cluster, a bare r^2/gap claimed 9e-4 at an error of
    1.5e-3, and with k = 2, where the other Ritz value mixes all the rest, 1e-3 at 3e-3). bound is the smaller
    of r and max(r^2 / gap, |theta_k - theta_{k-1}|)."""
    k = len(alphas)
    tridiag = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        off = np.asarray(betas[: k - 1], dtype=np.float64)
        tridiag += np.diag(off, 1) + np.diag(off, -1)
    theta, eigvecs = np.linalg.eigh(tridiag)
    r = np.abs(float(betas[k - 1]) * eigvecs[-1, :])
    prev = np.linalg.eigvalsh(tridiag[: k - 1, : k - 1]) if k >= 3 else None

    def bound(i, n):
        if k < 3 or not r[n] < 0.5 * abs(theta[i] - theta[n]):
            return float(r[i])
        gap = min(abs(theta[i] - theta[j]) - r[j] for j in range(k) if j != i)
        if not (math.isfinite(gap) and gap > r[i]):
            return float(r[i])
        moved = abs(theta[i] - (prev[0] if i == 0 else prev[-1]))
        return float(min(r[i], max(r[i] ** 2 / gap, moved)))
    return float(theta[0]), float(theta[-1]), float(r[0]), float(r[-1]), bound(0, 1), bound(k - 1, k - 2)


def ritz_extremes(alphas, betas):
    """Ritz values of T_k; returns (theta_min, theta_max, res_min, res_max) with res = |beta_k s_last|."""
    return ritz_bounds(alphas, betas)[:4]


STOP_RULES = {"both": 0, "dominant": 1}
START_VECTORS = ("subsample", "gradient+random", "random")
DOMINANT_MARGIN = 0.05
STOP_REASONS = {0: "max_iter", 1: "bound_both_ends", 2: "invariant_subspace", 3: "bound_dominant_end"}
DEFAULT_RTOL = 1e-3


def _lanczos_stop(alphas, betas, rtol, stop="dominant", margin=DOMINANT_MARGIN):
    """Stop code after step k (the rule of csrc/hessian.cpp's lanczos_stop_code), rtol a tolerance on the
    eigenvalue itself. "both": both extreme Ritz values have bound <= rtol * rho_k (ritz_bounds). "dominant":
    the end giving rho_k has bound <= rtol * rho_k and the other end is bounded away from it, |theta_o| + r_o <=
    (1 - margin) * rho_k. That assumes, as every Krylov stop does for the dominant end too, that an extreme
    Ritz value tracks the extreme eigenvalue of its end (it is never outside the spectrum); use "both" where a
    second end near rho matters. Either stops when beta_k <= 1e-12 rho_k (an invariant subspace: exact)."""
    lmin, lmax, rmin, rmax, bmin, bmax = ritz_bounds(alphas, betas)
    scale = max(abs(lmin), abs(lmax))
    if betas[-1] <= 1e-12 * max(scale, 1e-300):
        return 2
    if max(bmin, bmax) <= rtol * scale:
        return 1
    if stop == "dominant":
        bd, other = (bmax, abs(lmin) + rmin) if abs(lmax) >= abs(lmin) else (bmin, abs(lmax) + rmax)
        if bd <= rtol * scale and other <= (1.0 - margin) * scale:
            return 3
    return 0


RANDOM_BLOCK = 1 << 20  # elements per seeded block of the random vector


def _random_flat(n, lo, hi, seed, length=None):
    """Elements [lo, hi) of the seeded Gaussian vector of length n (float64, zero-padded to `length`): block b
    of RANDOM_BLOCK elements comes from its own generator (seed, b), so that a shard draws its slice alone
    and one process and several draw the same vector."""
    out = torch.zeros(hi - lo if length is None else length, dtype=torch.float64)
    for b in range(lo // RANDOM_BLOCK, -(-hi // RANDOM_BLOCK)):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        blk = torch.randn(min(RANDOM_BLOCK, n - b * RANDOM_BLOCK), generator=gen, dtype=torch.float64)
        s, e = max(lo, b * RANDOM_BLOCK), min(hi, (b + 1) * RANDOM_BLOCK)
        out[s - lo:e - lo] = blk[s - b * RANDOM_BLOCK:e - b * RANDOM_BLOCK]
    return out


def _start_vector(params, seed, dtype=None):
    """The seeded Gaussian vector (_random_flat) in the parameters' shapes (dtype: theirs unless given)."""
    n = sum(p.numel() for p in params)
    flat = _random_flat(n, 0, n, seed)
    return [t.view(p.shape).to(device=p.device, dtype=dtype or p.dtype)
            for t, p in zip(flat.split([p.numel() for p in params]), params)]


def _mixed_start_vector(op, seed, r=None):
    """g/||g|| + r/||r||: the loss gradient (a by-product of the graph build; it leans towards the top of the
    spectrum) plus a seeded Gaussian r of the same weight, which keeps every eigenvector in the Krylov space
    almost surely. Falls back to r alone where no gradient is available or it is zero / not finite.
    op: a HessianOperator or ShardedOperator; r: the random vector when the caller already drew it."""
    r = op.random(seed) if r is None else r
    g = op.gradient() if hasattr(op, "gradient") else None
    if g is None:
        return r, "random"
    gn, rn = _norm(g, op.dot), _norm(r, op.dot)
    if not (gn > 0 and math.isfinite(gn)):
        return r, "random"
    return [(a.double() / gn + b.double() / rn).to(b.dtype).contiguous() for a, b in zip(g, r)], "gradient+random"


WARM_STEPS = 4        # Lanczos steps on the subsample (4: the tiny ARC checkpoint needs 2 full HVPs, 4 with 3)
WARM_SHARE = 0.1     # of the samples in the warm-start subsample (at least 2)
WARM_RANDOM = 0.05    # weight of the seeded random part added to the warm-start vector
WARM_VECTORS = 6      # parameter-sized vectors the warm start holds at once (basis + work + first gradient)


def _dot(a, b):
    """<a, b> over lists of tensors, accumulated in float64."""
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)))


def _norm(v, dot=_dot):
    return math.sqrt(max(dot(v, v), 0.0))


def _subsample_start_vector(op, seed, steps=WARM_STEPS):
    """Warm start from a subsample: `steps` Lanczos steps (stored basis, full reorthogonalisation) on H_1, the
    Hessian of the k samples HessianOperator(keep_first=k) split off (k = ceil(N/10), at least 2: an H_1 v
    costs about k/N of an H v), and its Ritz vector y of the end of largest magnitude, plus
    WARM_RANDOM * r/||r|| (r the seeded Gaussian, so every eigenvector stays in the Krylov space). y is
    close to H's dominant eigenvector as far as k samples represent all N (squared overlap 0.91-0.96 with 5
    of 50 samples on the tiny ARC checkpoint), which saves the full solve about two HVPs to rho within 1e-3.
    The full solve is unchanged: same operator, same stop rule. op: HessianOperator or ShardedOperator."""
    dot = op.dot
    r = op.random(seed)
    q0, _ = _mixed_start_vector(op, seed, r)  # the subsample's graph sits inside g: the same lean
    basis, alphas, betas = [_normalize(q0, dot)], [], []
    for j in range(steps):
        w = op.hvp_first(basis[-1])
        alphas.append(dot(w, basis[-1]))
        for _ in range(2):  # twice is enough (Kahan)
            for q in basis:
                c = dot(w, q)
                w = [a - c * b for a, b in zip(w, q)]
        b = _norm(w, dot)
        betas.append(b)
        if j == steps - 1 or not b > 1e-12 * max(abs(a) for a in alphas):
            break
        basis.append([t / b for t in w])
    k = len(alphas)
    tridiag = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
    theta, eigvecs = np.linalg.eigh(tridiag)
    col = eigvecs[:, -1] if abs(theta[-1]) >= abs(theta[0]) else eigvecs[:, 0]
    y = [sum(float(col[i]) * basis[i][n] for i in range(k)) for n in range(len(basis[0]))]
    y = _normalize(y, dot)
    v0 = [a + (WARM_RANDOM / _norm(r, dot)) * b for a, b in zip(y, r)]
    return v0, {"steps": k, "samples": None, "answer_tokens": None,
                "subsample_ritz": [float(theta[0]), float(theta[-1])]}


def _check_start(start, checkpointing, start_name="start", ckpt_name="gradient_checkpointing"):
    if start == "subsample" and checkpointing == "on":
        raise CurvatureError(f"{start_name} subsample needs the subsample's retained graph, and {ckpt_name} on "
                             f"retains none: use {start_name} gradient+random or random, or {ckpt_name} auto")


def _warm_start_fits(params, budget, world=1):
    size = 8 if params[0].dtype == torch.float64 else 4  # the solver's vectors: float32 unless the model is float64
    nbytes = sum(p.numel() * size for p in params) / world
    return WARM_VECTORS * nbytes <= 0.25 * budget


def _normalize(v, dot=_dot):
    nrm = _norm(v, dot)
    if nrm == 0:
        raise CurvatureError("start vector is zero")
    return [(t.double() / nrm).to(t.dtype).contiguous() for t in v]


def _lanczos_python(op, v0, max_iter, rtol, step, stop="dominant", margin=DOMINANT_MARGIN, times=None,
                    progress=None):
    """The three-term recurrence without a stored basis (three parameter-sized vectors). Without
    reorthogonalisation converged Ritz values come back as "ghost" copies, which leaves the extreme Ritz
    values, all this reads, where they are. step: hessian::lanczos_step or a function like it
    (lanczos_step_torch; ShardedOperator.lanczos_step for sharded vectors)."""
    t0 = time.perf_counter()
    dot = getattr(op, "dot", _dot)
    v = _normalize(v0, dot)
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
        code = _lanczos_stop(alphas, betas, rtol, stop, margin)
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
    v = _normalize(v0, getattr(op, "dot", _dot))
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


def hessian_spectrum(model, batches, method="lanczos", rtol=DEFAULT_RTOL, max_iter=100, seed=0, *, backend="auto",
                     stop="dominant", start=None, cross_entropy="auto", graph_memory_budget=None,
                     v0=None, return_operator=False, progress=None, tol=None, gradient_checkpointing="auto",
                     last_layer_rows=True, block_attention=True):
    """Extreme eigenvalues of the Hessian of the answer-token loss over `batches` (see HessianOperator).

    rtol: the tolerance on the eigenvalue itself (lanczos): stop once the certified bound (ritz_bounds: the
        residual bound, or residual^2/gap where the gap is known) on the end giving rho is <= rtol * rho; the
        result reports the bound (`error_bound`). power: eigenthings' relative-change rule with tol = rtol.
        tol: the same, the earlier name.
    backend: "auto" (extension if it loads, else plain PyTorch), "extension" (required), "torch" (plain).
    stop (lanczos): "dominant" (default: the end giving rho certified and the other end bounded below rho) or
        "both" (both ends certified).
    start: the start vector: "subsample" (lanczos default where its vectors fit: a few Lanczos steps on the
        Hessian of the first ceil(N/10) samples give a Ritz vector near the dominant eigenvector, see
        _subsample_start_vector), "gradient+random" (g/||g|| + r/||r||, see _mixed_start_vector; the lanczos
        default otherwise: fewer than 8 samples, or WARM_VECTORS float32 vectors over a quarter of the
        memory budget) or "random" (seeded Gaussian r; the default for power, like eigenthings); v0 overrides it.
    cross_entropy (extension backend): "auto" (linear_xent where the LM head is verified to be a plain linear
        layer, else softmax_xent), "linear_xent", "softmax_xent", or "torch" (autograd's).
    Under an initialised torch.distributed process group every rank passes the same `batches` (all N
        samples) and the model; each rank takes its share of the samples (split_rows) and the vectors are
        sharded (ShardedOperator); every rank returns the same result.
    gradient_checkpointing: "auto" (the micro-batches whose graphs fit nowhere in the budget go layer-wise),
        "on" (all do: no graph retained, no subsample warm start) or "off"; see HessianOperator.
    last_layer_rows: the decoder's last layer at the answer rows only where verified (HessianOperator); the
        result's backend.last_layer says which ran.
    block_attention: on CPU, the SDPA attention of the graphs in causal blocks with the softmax's double backward
        fused, where verified (HessianOperator, attention_hvp.py); the result's backend.attention says which ran.
    progress: called as progress(iteration, running rho) after every iteration of the Python solver loops
        (the C++ loop runs the whole solve in one call and reports nothing until it returns).
    Returns the result dict; with return_operator=True, (dict, operator).
    """
    if tol is not None:
        rtol = tol
    if method not in ("lanczos", "power"):
        raise CurvatureError(f"method must be 'lanczos' or 'power', got {method!r}")
    if not (rtol > 0):
        raise CurvatureError(f"rtol must be > 0, got {rtol}")
    if int(max_iter) < 1:
        raise CurvatureError(f"max_iter must be >= 1, got {max_iter}")
    if backend not in ("auto", "extension", "torch"):
        raise CurvatureError(f"backend must be auto, extension or torch, got {backend!r}")
    if stop not in STOP_RULES:
        raise CurvatureError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    if cross_entropy != "auto":
        _ce_mode(cross_entropy)
    if gradient_checkpointing not in CHECKPOINTING:
        raise CurvatureError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {gradient_checkpointing!r}")
    for name, flag in (("last_layer_rows", last_layer_rows), ("block_attention", block_attention)):
        if not isinstance(flag, bool):
            raise CurvatureError(f"{name} must be True or False, got {flag!r}")
    if not batches:
        raise CurvatureError("no batches given: the Hessian needs at least one sample")
    auto_start = start is None
    if start is None:
        start = "subsample" if method == "lanczos" else "random"
    if start not in START_VECTORS:
        raise CurvatureError(f"start must be one of {', '.join(START_VECTORS)}, got {start!r}")
    _check_start(None if auto_start else start, gradient_checkpointing)
    ext = load_extension("none" if backend == "torch" else None)
    if backend == "extension" and not ext["ok"]:
        raise CurvatureError(f"the C++ extension is not available ({ext['detail']}); build it with "
                             "`python setup.py build_ext --inplace` or use backend='torch'")
    use_ext = ext["ok"] and backend != "torch"
    if cross_entropy != "auto" and cross_entropy != "torch" and not use_ext:
        raise CurvatureError(f"cross_entropy={cross_entropy!r} needs the C++ extension (backend='torch' or "
                             f"extension unavailable: {ext['detail']})")
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _prepare_model(model)
    t0 = time.perf_counter()
    ce = ("auto" if use_ext else "torch") if cross_entropy == "auto" else cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    budget = graph_memory_budget if graph_memory_budget is not None else _default_budget(device)
    n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    if n_samples < world:
        raise CurvatureError(f"{n_samples} samples for {world} processes: every process needs one; use fewer "
                             "processes or more --samples")
    total_tokens = sum(_count_answer_tokens(b) for b in batches)
    if total_tokens == 0:
        raise CurvatureError("the batches contain no answer tokens (every label is -100)")
    warm_rows = min(int(batches[0]["input_ids"].shape[0]), max(2, math.ceil(n_samples * WARM_SHARE)))
    want_warm = v0 is None and start == "subsample" and 0 < warm_rows < n_samples
    if want_warm and auto_start and not (warm_rows <= n_samples / 4 and _warm_start_fits(params, budget, world)
                                         and gradient_checkpointing != "on"):
        want_warm = False  # too few samples for a cheap subsample, (7B) the basis does not fit, or no graph kept
    if dist:
        first, mine = split_rows(batches, rank, world, warm_rows if want_warm else 0)
        local = HessianOperator(model, mine, fused_ce=ce, graph_memory_budget=graph_memory_budget,
                                first_batch=first, subsample=want_warm, total_tokens=total_tokens,
                                gradient_checkpointing=gradient_checkpointing, last_layer_rows=last_layer_rows,
                                block_attention=block_attention)
        op = ShardedOperator(local)
        # the subsample's graph must be retained on every rank that holds some of it, else no rank uses it
        warm_ok = op.reduce_sum(0.0 if (first is not None and local.first_out is None) else 1.0) == world
    else:
        local = op = HessianOperator(model, batches, fused_ce=ce, graph_memory_budget=graph_memory_budget,
                                     keep_first=warm_rows if want_warm else 0,
                                     gradient_checkpointing=gradient_checkpointing, last_layer_rows=last_layer_rows,
                                     block_attention=block_attention)
        warm_ok = op.first_out is not None
    t_setup = time.perf_counter() - t0
    warm = None
    if v0 is not None:
        start_used = "given"
        if dist:
            v0 = op.local(v0)
        else:
            v0 = [t.to(op.vec_dtype) for t in v0]
    elif start == "random":
        v0, start_used = op.random(seed), "random"
    elif want_warm and warm_ok:
        tw = time.perf_counter()
        v0, warm = _subsample_start_vector(op, seed)
        warm.update({"seconds": time.perf_counter() - tw, "samples": warm_rows,
                     "answer_tokens": int(op.reduce_sum(local.first_tokens))})
        start_used = "subsample"
        local.first_out = None  # the full solve needs the summed graph only
    else:
        v0, start_used = _mixed_start_vector(op, seed)
    cpp_loop = (use_ext and not dist and not local.recompute and not local.layerwise and bool(local.g_out)
                and all(p.dtype == local.vec_dtype for p in local.params))
    times = []
    t_solve = time.perf_counter()
    if method == "lanczos":
        if cpp_loop:
            a, b, code, tt = torch.ops.hessian.lanczos_solve(local.g_out, local.g_index, local.params, list(v0),
                                                             int(max_iter), float(rtol), STOP_RULES[stop],
                                                             DOMINANT_MARGIN)
            alphas, betas, times = a.tolist(), b.tolist(), tt.tolist()
            local.hvp_count += len(alphas)
        else:
            step = (op.lanczos_step(use_ext) if dist else
                    torch.ops.hessian.lanczos_step if use_ext else lanczos_step_torch)
            alphas, betas, code = _lanczos_python(op, v0, int(max_iter), float(rtol), step, stop, DOMINANT_MARGIN,
                                                  times, progress)
    else:
        if cpp_loop:
            h, code, tt = torch.ops.hessian.power_solve(local.g_out, local.g_index, local.params, list(v0),
                                                        int(max_iter), float(rtol))
            hist, times = [tuple(r) for r in h.tolist()], tt.tolist()
            local.hvp_count += len(hist)
        else:
            step = (op.power_step(use_ext) if dist else
                    torch.ops.hessian.power_step if use_ext else power_step_torch)
            hist, code = _power_python(op, v0, int(max_iter), float(rtol), step, times, progress)
    wall = time.perf_counter() - t0
    offset = t_solve - t0  # iteration times counted from the start of this call (graph build included)
    times = [offset + t for t in times]
    if method == "lanczos":
        lmin, lmax, rmin, rmax, bmin, bmax = ritz_bounds(alphas, betas)
        max_dom = abs(lmax) >= abs(lmin)
        rho = abs(lmax) if max_dom else abs(lmin)
        bound, r_dom = (bmax, rmax) if max_dom else (bmin, rmin)
        if code == 2:
            bound = bmin = bmax = 0.0
        hist = [list(ritz_extremes(alphas[:k], betas[:k])[:2]) for k in range(1, len(alphas) + 1)]
        res = {"method": "lanczos", "lambda_max": lmax, "lambda_min": lmin, "rho": rho,
               "iterations": len(alphas), "residual": r_dom, "residual_max": rmax,
               "residual_min": rmin, "converged": code in (1, 2, 3), "stop_reason": STOP_REASONS[int(code)],
               "error_bound": bound, "rel_error_bound": bound / rho if rho > 0 else None,
               "error_bound_kind": ("exact" if code == 2 else "residual^2/gap" if bound < r_dom else "residual"),
               "error_bound_max": bmax, "error_bound_min": bmin,
               "converged_ends": {"max": bool(bmax <= rtol * rho), "min": bool(bmin <= rtol * rho)},
               "ritz_history": hist, "rho_history": [max(abs(x), abs(y)) for x, y in hist]}
    else:
        rq, nrm = hist[-1]
        resid = math.sqrt(max(nrm * nrm - rq * rq, 0.0))
        res = {"method": "power", "lambda_max": rq if rq >= 0 else None, "lambda_min": rq if rq < 0 else None,
               "rho": abs(rq), "iterations": len(hist), "residual": resid,
               "residual_max": None, "residual_min": None, "converged": code == 1,
               "stop_reason": "relative_change" if code == 1 else "max_iter",
               "error_bound": resid, "rel_error_bound": resid / abs(rq) if rq else None,
               "error_bound_kind": "residual", "ritz_history": [h[0] for h in hist],
               "rho_history": [abs(h[0]) for h in hist]}
    if not res["converged"]:
        res["warning"] = (f"{method} did not converge in {res['iterations']} iterations (rtol={rtol}); "
                          f"rho={res['rho']:.6g} is an estimate with residual {res['residual']:.3g}")
        warnings.warn(res["warning"], RuntimeWarning, stacklevel=2)
    graphs = {"micro_batches": len(local.batches), "retained": local.retained_count,
              "recomputed": len(local.recompute), "layerwise": len(local.layerwise),
              "saved_bytes_per_graph": local.graph_bytes}
    res.update({
        "hvp_count": op.hvp_count, "sub_hvp_count": op.sub_hvp_count, "warm_start": warm, "wall_time_s": wall,
        "setup_time_s": t_setup, "iteration_times_s": times,
        "peak_memory": _peak_memory(device),
        "settings": {"method": method, "rtol": rtol, "tol": rtol, "max_iter": int(max_iter), "seed": seed,
                     "stop_rule": stop if method == "lanczos" else "relative_change", "start_vector": start_used,
                     "dominant_margin": DOMINANT_MARGIN if method == "lanczos" and stop == "dominant" else None,
                     "graph_memory_budget": local.budget, "dtype": str(local.params[0].dtype).replace("torch.", ""),
                     "vector_dtype": str(local.vec_dtype).replace("torch.", ""),
                     "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
                     "sdpa_backend": "math",
                     "gradient_checkpointing": gradient_checkpointing},
        "backend": {"extension": ext["name"] if use_ext else "none",
                    "extension_detail": ext["detail"] if use_ext or backend != "torch" else "not requested",
                    "solver_loop": "cpp" if cpp_loop else "python", "step": "fused_op" if use_ext else "torch",
                    "cross_entropy": {"torch": "torch_log_softmax_nll", "softmax_xent": "fused_softmax_xent",
                                      "linear_xent": "fused_linear_xent"}[local.ce],
                    "last_layer": "answer_rows" if local.last_rows is not None else "full",
                    "attention": local.attention},
        "graphs": graphs,
        "distributed": ({"world_size": world, "backend": dist.get_backend(), "shard_elements": op.S,
                         "samples_per_rank": [int(x) for x in _gather_ints(op, sum(int(b["input_ids"].shape[0])
                                                                                  for b in local.batches))],
                         "answer_tokens_per_rank": [int(x) for x in _gather_ints(op, sum(
                             _count_answer_tokens(b) for b in local.batches))]} if dist else None),
        "n_params": int(sum(p.numel() for p in local.params)), "n_samples": n_samples,
        "n_answer_tokens": total_tokens, "loss": op.reduce_sum(local.loss_value),
    })
    order = ["method", "lambda_max", "lambda_min", "rho", "iterations", "hvp_count", "residual", "converged"]
    res = {**{k: res[k] for k in order}, **{k: v for k, v in res.items() if k not in order}}
    return (res, op) if return_operator else res


def _checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _gather_ints(op, x):
    """x from every rank, in rank order (float64 all-reduce of a one-hot row)."""
    t = torch.zeros(op.world, dtype=torch.float64)
    t[op.rank] = float(x)
    return op.allreduce(t).tolist()
