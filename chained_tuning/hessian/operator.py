"""HessianOperator: H v for the answer-token loss of a list of micro-batches at the model's parameters, by double
backward through first-order graphs retained within a memory budget (rebuilt, or one decoder layer at a time,
beyond it)."""
from __future__ import annotations

import contextlib

import torch

from . import shared_prefix
from .answer_loss import (_answer_positions, _block_attention, _ce_mode, _count_answer_tokens, _every_shortcut,
                          _last_layer_rows, _math_sdpa, _shared_prefix, batch_answer_loss_sum, verify_linear_head)
from .errors import CurvatureError
from .layerwise import LayerwiseHVP, unsupported
from .ops import load_extension
from .solvers import _dot, _start_vector

CHECKPOINTING = ("auto", "on", "off")  # HessianOperator's gradient_checkpointing


def memory_budget(device) -> int:
    """Bytes a new allocation on `device` may take now: 70% of a GPU's free memory, half of the host's available
    memory (8 GiB where /proc/meminfo cannot be read)."""
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
    time (layerwise.py: each layer's input kept, the layer rebuilt, ~1.2x a rebuilt graph's time);
    "on" takes every micro-batch layer-wise (no graph retained: the least memory), "off" never does (the
    rebuilt graph may then exceed the budget). Vectors in and out are in vec_dtype
    (float64 for a float64 model, else float32: a bfloat16 model's HVP is computed in bfloat16, the solver's
    vectors stay float32)."""

    def __init__(self, model, batches, fused_ce=False, graph_memory_budget: int | None = None,
                 answer_logits_only: bool = True, keep_first: int = 0, first_batch=None, subsample=False,
                 total_tokens: int | None = None, gradient_checkpointing: str = "auto", last_layer_rows: bool = True,
                 block_attention: bool = True, share_prefix: bool = True):
        """fused_ce: False/"torch" (autograd cross-entropy), "softmax_xent" (fused op on the logits),
        "linear_xent" (fused LM head + cross-entropy, required), True/"auto" (linear_xent where
        verify_linear_head() holds on the first batch, else softmax_xent). Needs the extension unless "torch".
        keep_first=k: the first k samples of batches[0] become a micro-batch of their own, whose Hessian
        hvp_first() applies (the subsample warm start); first_batch: that micro-batch given directly, ahead of
        batches; subsample=True with first_batch None: this process holds none of the subsample's rows
        (hvp_first gives zeros). total_tokens: the loss's denominator where batches are one process's share.
        gradient_checkpointing: "auto", "on" or "off" (above); "on" needs a model layerwise.py supports.
        last_layer_rows (linear_xent): run the decoder's last layer at the answer rows only (answer_rows.py:
        its other positions feed no answer token), where that equals the decoder's forward on the first batch.
        block_attention (CPU): the graphs' SDPA attention in causal blocks with the softmax's double backward
        fused (attention.py), where the model's forward is the same with it on the first batch; `attention`
        says which ran ("blocks_fused", "blocks" without the extension, or "model"); a model loaded with eager
        attention runs SDPA inside them. With the extension the same context fuses RMSNorm, the SwiGLU gate, the
        bias-free linear layers and the rotary embedding's double backward where that holds on the probe too
        (fused_layers.py); `fused_layers` counts the modules swapped.
        share_prefix: the tokens every row of a micro-batch begins with (the task's instruction) run once for all
        its rows (shared_prefix.py), and once for all the retained micro-batches that begin with them (_build),
        where that equals the whole rows' forward on the first batch;
        `prefix_tokens_saved` counts the positions the retained and rebuilt graphs do not hold."""
        self.answer_logits_only = answer_logits_only
        self.model = model
        self._take_params(model)
        first_batch = self._take_batches(batches, keep_first, first_batch, subsample)
        self._count_tokens(total_tokens)
        probe = next((b for b in self.batches if _count_answer_tokens(b) > 0), None)
        if not self._take_every_shortcut(fused_ce, probe, last_layer_rows, block_attention, share_prefix):
            self._choose_cross_entropy(fused_ce, probe)
            self._choose_forwards(probe, last_layer_rows, block_attention, share_prefix)
        dev = self.params[0].device
        self.budget = int(graph_memory_budget) if graph_memory_budget is not None else memory_budget(dev)
        self._choose_checkpointing(gradient_checkpointing)
        self._zero_counts(first_batch)
        self._build_graphs(first_batch)

    # --------------------------------------------------------------------------- the steps of __init__
    def _take_params(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise CurvatureError("the model has no trainable parameters")
        self.vec_dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32

    def _take_batches(self, batches, keep_first, first_batch, subsample):
        """self.batches, the subsample's micro-batch first where there is one; returns that micro-batch."""
        self.batches = [b for b in batches if b is not None]
        k = int(keep_first or 0)
        if k and self.batches and first_batch is None and 0 < k < int(self.batches[0]["input_ids"].shape[0]):
            b0 = self.batches[0]
            first_batch = {key: (v[:k] if torch.is_tensor(v) else v) for key, v in b0.items()}
            self.batches[0] = {key: (v[k:] if torch.is_tensor(v) else v) for key, v in b0.items()}
        self.subsample = first_batch is not None or bool(subsample)
        if first_batch is not None:
            self.batches.insert(0, first_batch)
        return first_batch

    def _count_tokens(self, total_tokens):
        if not self.batches and total_tokens is None:
            raise CurvatureError("no batches given: the Hessian needs at least one sample")
        own_tokens = sum(_count_answer_tokens(b) for b in self.batches)
        self.total_tokens = own_tokens if total_tokens is None else int(total_tokens)
        if self.total_tokens == 0:
            raise CurvatureError("the batches contain no answer tokens (every label is -100)")

    def _take_every_shortcut(self, fused_ce, probe, last_layer_rows, block_attention, share_prefix) -> bool:
        """linear_xent and every shortcut asked for, where they hold together on the probe (answer_loss.
        _every_shortcut: one check); False leaves each to be chosen and checked alone."""
        if fused_ce not in (True, "auto", "linear_xent") or probe is None or not load_extension()["ok"]:
            return False
        found = _every_shortcut(self.model, probe, True, last_layer_rows, block_attention, share_prefix)
        if found is None:
            return False
        self.ce, self.fused = "linear_xent", True
        self.last_rows, self.attention, self._attn, self.share_prefix, self.fused_layers = found
        return True

    def _choose_cross_entropy(self, fused_ce, probe):
        """self.ce: "torch", "softmax_xent" or "linear_xent" (the last only where verified on the probe)."""
        if fused_ce not in (False, None, "torch") and not load_extension()["ok"]:
            if fused_ce not in (True, "auto"):
                raise CurvatureError(f"cross-entropy {fused_ce!r} needs the C++ extension: "
                                     f"{load_extension()['detail']}")
            fused_ce = "torch"  # auto without the extension: autograd's cross-entropy
        if fused_ce is True or fused_ce == "auto":
            self.ce = "linear_xent" if probe is not None and verify_linear_head(self.model, probe) else "softmax_xent"
        else:
            self.ce = _ce_mode(fused_ce)
            if self.ce == "linear_xent" and probe is not None and not verify_linear_head(self.model, probe):
                raise CurvatureError("cross-entropy linear_xent: the model's logits are not "
                                     "lm_head(decoder hidden states) (or it has no plain linear LM head)")
        self.fused = self.ce != "torch"

    def _choose_forwards(self, probe, last_layer_rows, block_attention, share_prefix):
        """The last layer at the answer rows only, attention in causal blocks and the shared prefix run once,
        each where verified."""
        self.last_rows = None
        if self.ce == "linear_xent" and last_layer_rows and probe is not None:
            self.last_rows = _last_layer_rows(self.model, probe)
        self.attention, self._attn, self.fused_layers = "model", contextlib.nullcontext, 0
        if block_attention and probe is not None and self.params[0].device.type == "cpu":
            self.attention, self._attn, self.fused_layers = _block_attention(self.model, probe, fused=self.fused)
        self.share_prefix = bool(share_prefix and probe is not None and
                                 _shared_prefix(self.model, probe, self.ce, self.last_rows, self._attn))

    def _choose_checkpointing(self, gradient_checkpointing):
        if gradient_checkpointing not in CHECKPOINTING:
            raise CurvatureError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                                 f"got {gradient_checkpointing!r}")
        self.checkpointing = gradient_checkpointing
        self.layerwise, self._lw = [], None
        why = unsupported(self.model) if gradient_checkpointing == "on" else None
        if why:
            raise CurvatureError(f"gradient checkpointing of the HVP: {why}; use --gradient_checkpointing auto "
                                 "or off (in Python gradient_checkpointing='auto' or 'off'): the graphs are then "
                                 "retained or rebuilt whole")

    def _zero_counts(self, first_batch):
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
        self._prefix_of = {}  # id(micro-batch) -> (rows, the prefix's tokens) where a retained graph shares one
        self.g_index, self.g_out = [], []

    def _build_graphs(self, first_batch):
        """The first-order graphs (retained, rebuilt or layer-wise; see the class docstring) and the loss."""
        if self.batches and self.checkpointing == "on":
            if first_batch is not None:
                raise CurvatureError("the subsample warm start needs a retained graph: with gradient_checkpointing "
                                     "'on' use start 'gradient+random' or 'random'")
            self.layerwise = list(self.batches)
            self.loss_value = float(sum(float(self._loss_only(b)) for b in self.batches))
        elif self.batches:
            self._build(has_first=first_batch is not None)
        if self.layerwise:
            self._lw = LayerwiseHVP(self.model, self.params, self.total_tokens, _answer_positions, _math_sdpa)

    # ------------------------------------------------------------------------------------------ the graphs
    def _first_order(self, batch, create_graph=True, prefixes=None):
        return self._grads_of(self._loss(batch, prefixes), create_graph)

    def _grads_of(self, loss, create_graph=True):
        self.loss_value += float(loss.detach())
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        self.grads_count += 1
        return grads

    def _measured_first_order(self, batch, prefixes=None):
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
            grads = self._first_order(batch, prefixes=prefixes)
        return grads, int(sum(seen.values()))

    def _build(self, has_first=False):
        """The retained graphs share each prompt prefix's forward (one store for all of them, shared_prefix.py).
        The largest micro-batch is built alone (its graph is the measurement) and so is the subsample's (the warm
        start needs its gradient); the other retained ones take one backward over their summed losses, so the
        prefix's backward, and its part of every HVP, runs once for all of them instead of once per micro-batch."""
        sizes = [int(b["input_ids"].numel()) for b in self.batches]
        largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
        order = [largest] + ([0] if has_first and largest != 0 else [])
        order += [i for i in range(len(sizes)) if i not in order]
        prefixes = {} if self.share_prefix else None
        used, summed = 0, None
        for i in order:
            b = self.batches[i]
            if i == largest:
                grads, self.graph_bytes = self._measured_first_order(b, prefixes)
                need = self.graph_bytes
            else:
                need = self.graph_bytes * sizes[i] // max(sizes[largest], 1)
            if used + need > self.budget:
                if i == largest:
                    del grads
                    self._prefix_of.pop(id(b), None)  # rebuilt at every HVP, with a prefix of its own
                self.recompute.append(b)
                if i != largest:
                    self.loss_value += float(self._loss_only(b))
                continue
            used += need
            self.retained += 1
            if i == 0 and has_first:
                if i != largest:
                    grads = self._first_order(b, prefixes=prefixes)
                fi = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
                self.first_index, self.first_out = fi, [grads[j] for j in fi]
            elif i != largest:
                loss = self._loss(b, prefixes)
                summed = loss if summed is None else summed + loss
                continue
            self._add_gradient(grads)
            del grads
        if summed is not None:
            self._add_gradient(self._grads_of(summed))
        if self._g_sum is not None:
            self.g_index = [i for i, g in enumerate(self._g_sum) if g is not None and g.requires_grad]
            self.g_out = [self._g_sum[i] for i in self.g_index]
        self._split_recompute(used, sizes[largest])

    def _add_gradient(self, grads):
        if self._g_sum is None:
            self._g_sum = list(grads)
        else:
            self._g_sum = [a if g is None else (g if a is None else a + g) for a, g in zip(self._g_sum, grads)]

    def _split_recompute(self, used, largest_size):
        """Rebuild the recomputed graphs where the largest fits beside the retained ones, else go layer-wise."""
        if not self.recompute or self.checkpointing == "off":
            return
        if unsupported(self.model):
            return
        need = [self.graph_bytes * int(b["input_ids"].numel()) // max(largest_size, 1) for b in self.recompute]
        if used + max(need) <= self.budget:
            return
        room = self.budget - used
        self.layerwise = [b for b, n in zip(self.recompute, need) if n > room]
        self.recompute = [b for b, n in zip(self.recompute, need) if n <= room]

    def _loss(self, b, prefixes=None):
        """b's share of the loss; prefixes: the store of the prompt prefixes the retained graphs share (never for
        a graph rebuilt at every HVP, whose backward frees what it ran through)."""
        if prefixes is not None:  # the prefix batch_answer_loss_sum will take, for prefix_tokens_saved
            ids, am, keep, _ = _answer_positions(b, self.params[0].device)
            P = shared_prefix.prefix_length(ids, am, keep, prefixes)
            if P:
                self._prefix_of[id(b)] = (int(ids.shape[0]), tuple(ids[0, :P].tolist()))
        with self._attn():
            loss = batch_answer_loss_sum(self.model, b, self.ce, self.answer_logits_only, self.last_rows,
                                         self.share_prefix, prefixes)
        return loss / self.total_tokens

    @property
    def prefix_tokens_saved(self) -> int:
        """Positions the shared prefixes spare each HVP: every row's prefix, less each prefix the retained graphs
        share run once and a rebuilt micro-batch's run at every HVP (the micro-batches taken layer-wise keep whole
        rows)."""
        if not self.share_prefix:
            return 0
        whole = {id(b) for b in self.layerwise}
        saved = 0
        for b in self.batches:
            if id(b) not in whole and id(b) not in self._prefix_of:  # rebuilt: its own prefix at every HVP
                ids, am, keep, _ = _answer_positions(b, self.params[0].device)
                saved += (ids.shape[0] - 1) * shared_prefix.shared_prefix_length(ids, am, keep)
        saved += sum(rows * len(head) for rows, head in self._prefix_of.values())
        return saved - sum(len(head) for head in {head for _, head in self._prefix_of.values()})  # each run once

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
        """The retained graphs' share of the loss gradient (a by-product of the graph build: all of it where every
        graph is retained; the start vector needs no more), or None where no graph is retained."""
        if self._g_sum is None:
            return None
        return [torch.zeros_like(p, dtype=self.vec_dtype) if t is None else t.detach().to(self.vec_dtype)
                for t, p in zip(self._g_sum, self.params)]

    def reduce_sum(self, x: float) -> float:
        return float(x)
