"""The loss the Hessian is of, and the forwards it runs: the answer-token NLL of a batch (the sum over the tokens
whose label is not -100, each predicted by the position before it; the caller divides by the answer-token count),
the model's logits projected at the answer rows only, with three exact shortcuts taken only where a probe forward
on two rows equals the model's own: the fused LM head + cross-entropy (linear_xent, ops.py), the decoder's last
layer at the answer rows only (answer_rows.py) and, on CPU, attention in causal blocks (attention.py).

The batches are handed in: {"input_ids", "attention_mask", "labels"} tensors, labels -100 outside the answer
(chained_tuning.loss.encode_example and collate build them; tests/test_curvature.py checks the two losses agree).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from . import attention as attention_hvp
from . import fused_layers, ops, shared_prefix
from .answer_rows import AnswerRows
from .errors import CurvatureError

IGNORE_INDEX = -100
CE_MODES = ("torch", "softmax_xent", "linear_xent")


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


def _answer_logits(model, ids, am, keep, answer_logits_only=True, prefix=0, prefixes=None):
    """The model's logits at keep's rows (prefix: the first `prefix` positions run once for all rows,
    shared_prefix.py; prefixes: its store, to share them across micro-batches)."""
    with _math_sdpa():
        past = shared_prefix.prefix_cache(model, ids, prefix, prefixes) if prefix else None
        ids, keep = shared_prefix.suffix(ids, keep, prefix)
        try:
            if not answer_logits_only:
                raise TypeError
            out = model(input_ids=ids, attention_mask=am, logits_to_keep=keep, past_key_values=past,
                        use_cache=past is not None)
        except TypeError:  # a model without logits_to_keep (or without a cache: then no prefix is shared)
            out = model(input_ids=ids, attention_mask=am, **({} if past is None else {"past_key_values": past}))
    logits = out.logits if hasattr(out, "logits") else out[0]
    del out
    if logits.dim() == 3:
        logits = logits[keep] if logits.shape[1] == keep.shape[1] else None
    return logits


def _answer_hidden(dec, ids, am, keep, last_rows=None, prefix=0, prefixes=None):
    """dec's last hidden state at keep's rows; last_rows: an answer_rows.AnswerRows that runs dec's last layer
    at those rows only (verified by _last_layer_rows); prefix: the first `prefix` positions run once for all rows
    (shared_prefix.py; verified by _shared_prefix), prefixes: its store."""
    with _math_sdpa():
        past = shared_prefix.prefix_cache(dec, ids, prefix, prefixes) if prefix else None
        ids, keep = shared_prefix.suffix(ids, keep, prefix)
        if last_rows is not None and bool(keep.any()):
            return last_rows(dec, ids, am, keep, past)
        out = dec(input_ids=ids, attention_mask=am, past_key_values=past, use_cache=past is not None)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[keep]


def _last_layer_rows(model, batch):
    """An answer_rows.AnswerRows for model's decoder where it equals the decoder's own forward on two rows of
    `batch` (_probe, _same_forward), else None (the full forward, as before)."""
    parts = linear_head(model)
    rows = AnswerRows.build(parts[0]) if parts is not None else None
    if rows is None:
        return None
    ids, am, keep = _probe(model, batch)
    if not bool(keep.any()):
        return None
    ok = _same_forward(lambda: _answer_hidden(parts[0], ids, am, keep),
                       lambda: _answer_hidden(parts[0], ids, am, keep, rows))
    return rows if ok else None


def batch_answer_loss_sum(model, batch, fused=False, answer_logits_only: bool = True, last_rows=None,
                          share_prefix: bool = False, prefixes: dict | None = None):
    """Sum of answer-token NLL of one batch; logits are only projected at positions that predict an answer
    token (HF `logits_to_keep` boolean mask), falling back to full logits for models without it.

    fused: the cross-entropy (see _ce_mode): False/"torch", True/"softmax_xent", "linear_xent" (the decoder's
    answer-row hidden states through hessian::linear_xent with the LM head's weight; only for models where
    linear_head() holds -- HessianOperator verifies it). answer_logits_only=False projects every position
    (finetune.answer_loss_sum's way; benchmarks only). last_rows (linear_xent): the decoder's last layer run at
    the answer rows only (_last_layer_rows; HessianOperator verifies it). share_prefix: the tokens every row
    begins with run once (shared_prefix.py; HessianOperator verifies it with _shared_prefix); prefixes: a dict
    that keeps each prefix run, for later micro-batches that begin with it (shared_prefix.prefix_cache's store)."""
    mode = _ce_mode(fused)
    dev = next(model.parameters()).device
    ids, am, keep, targets = _answer_positions(batch, dev)
    prefix = shared_prefix.prefix_length(ids, am, keep, prefixes) if share_prefix else 0
    if mode == "linear_xent":
        parts = linear_head(model)
        if parts is None:
            raise CurvatureError("linear_xent needs an HF causal LM with an nn.Linear LM head without bias")
        rows = _answer_hidden(parts[0], ids, am, keep, last_rows, prefix, prefixes)
        losses, _ = ops.linear_xent(rows, parts[1].weight, targets, IGNORE_INDEX)
        return losses.sum()
    logits = _answer_logits(model, ids, am, keep, answer_logits_only, prefix, prefixes)
    if logits is None or logits.shape[0] != targets.shape[0]:
        raise RuntimeError("model output does not line up with the labels (expected [batch, seq, vocab] logits)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # finetune.answer_loss_sum's precision (only answer rows are projected)
    if mode == "softmax_xent":
        losses, _ = ops.softmax_xent(logits, targets, IGNORE_INDEX)
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


def _shared_prefix(model, batch, ce, last_rows, attention) -> bool:
    """True where running the first two rows' shared prefix once (shared_prefix.py) gives the answer-row
    outputs the loss reads (ce "linear_xent": the decoder's hidden states, through last_rows where set; else the
    logits) as the whole rows do, under `attention` (the operator's attention context); False where the probe
    rows share no prefix or the model's cache does not continue them exactly."""
    ids, am, keep = _probe(model, batch)
    P = shared_prefix.shared_prefix_length(ids, am, keep, min_saved=1)
    if not P or not bool(keep.any()):
        return False

    def forward(prefix):
        with attention():
            if ce == "linear_xent":
                return _answer_hidden(linear_head(model)[0], ids, am, keep, last_rows, prefix, {})
            return _answer_logits(model, ids, am, keep, prefix=prefix, prefixes={})
    return _same_forward(lambda: forward(0), lambda: forward(P))


def _eager_as_sdpa(model) -> bool:
    """Whether the operator runs a model loaded with eager attention through SDPA: HF's eager attention is SDPA's
    function with its softmax in float32, so the same arithmetic except in a float64 model (kept as it is)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "_attn_implementation", None) == "eager" and hasattr(model, "set_attn_implementation")
            and next(model.parameters()).dtype != torch.float64)


@contextlib.contextmanager
def _routed_attention(model, fused, eager_as_sdpa=False, min_block=None, layers=False):
    """attention_hvp.block_attention and, where `layers`, fused_layers.fused_layers (the norms, MLP gates, linear
    layers and rotary embedding with their double backward fused); eager_as_sdpa: the model's eager attention
    switched to SDPA inside (only SDPA calls can be routed to the blocks) and back after. Yields the block
    attention's mode, with `layers` set to the number of modules fused_layers swapped."""
    if eager_as_sdpa:
        model.set_attn_implementation("sdpa")
    try:
        with attention_hvp.block_attention(min_block=min_block, fused=fused) as mode, \
                (fused_layers.fused_layers(model) if layers else contextlib.nullcontext(0)) as swapped:
            mode.layers = swapped
            yield mode
    finally:
        if eager_as_sdpa:
            model.set_attn_implementation("eager")


def _routed_probe(model, fused, forward, layers):
    """forward() under the block attention as the operator would run it (blocks of 4 rows, so that short probes
    use them too; eager attention as SDPA where _eager_as_sdpa; the fused layers where `layers`) -> (that
    forward, the list each of its runs appends (routed attention calls, modules swapped) to, the operator's
    attention context)."""
    switch, runs = _eager_as_sdpa(model), []

    def mine():
        with _routed_attention(model, fused, switch, min_block=4, layers=layers) as mode:
            out = forward()
        runs.append((mode.routed, mode.layers))
        return out
    return mine, runs, functools.partial(_routed_attention, model, fused, switch, layers=layers)


def _first_routed(model, fused, forward, reference):
    """(modules fused, the attention context) of the first of the fused layers on and off (on only where
    `fused`) under which forward() equals reference() and the block attention took over the model's attention;
    None where neither does."""
    for layers in ((True, False) if fused and fused_layers.fused_layers_available() else (False,)):
        mine, runs, context = _routed_probe(model, fused, forward, layers)
        if _same_forward(reference, mine) and any(r for r, _ in runs):
            return runs[-1][1], context
    return None


def _block_attention(model, batch, fused):
    """("blocks_fused" | "blocks", context, modules fused) where attention_hvp.block_attention (fused: its softmax
    double backward from the extension, and fused_layers where that holds too) gives the model's answer-row
    logits on two rows of `batch` as the model does and took over the model's attention (_first_routed); else
    ("model", nullcontext, 0): the model's own attention and layers, as before."""
    ids, am, keep = _probe(model, batch)
    if not bool(keep.any()):
        return "model", contextlib.nullcontext, 0
    fused = bool(fused) and attention_hvp.fused_softmax_available()
    logits = lambda: _answer_logits(model, ids, am, keep)  # noqa: E731
    found = _first_routed(model, fused, logits, logits)
    if found is None:
        return "model", contextlib.nullcontext, 0
    return ("blocks_fused" if fused else "blocks"), found[1], found[0]


def _every_shortcut(model, batch, fused, last_layer_rows, block_attention, share_prefix):
    """The usual case checked once: the fused LM head + cross-entropy with, as asked, the last layer at the answer
    rows, attention in blocks and the fused layers (CPU) and the shared prefix, all at once against the model's
    own answer-row logits on two rows of `batch` (one pair of forwards instead of one per shortcut; a second
    without the fused layers where they alone differ). -> (last_rows, attention name, attention context,
    share_prefix, modules fused) where the whole path holds, else None: the caller checks each alone."""
    parts = linear_head(model)
    if parts is None:
        return None
    rows = AnswerRows.build(parts[0]) if last_layer_rows else None
    ids, am, keep = _probe(model, batch)
    P = shared_prefix.shared_prefix_length(ids, am, keep, min_saved=1) if share_prefix else 0
    if (last_layer_rows and rows is None) or (share_prefix and not P) or not bool(keep.any()):
        return None
    fused = bool(fused) and attention_hvp.fused_softmax_available()

    def head():  # the prefix through a store, as the operator runs it
        return parts[1](_answer_hidden(parts[0], ids, am, keep, rows, P, {}))
    reference = lambda: _answer_logits(model, ids, am, keep)  # noqa: E731
    if not (block_attention and next(model.parameters()).device.type == "cpu"):
        return (rows, "model", contextlib.nullcontext, bool(P), 0) if _same_forward(reference, head) else None
    found = _first_routed(model, fused, head, reference)
    if found is None:
        return None
    return rows, "blocks_fused" if fused else "blocks", found[1], bool(P), found[0]


def _checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)
