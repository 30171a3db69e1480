"""Attention for Hessian-vector products: causal blocks, and the softmax's double backward in one pass.

    from chained_tuning.hessian.attention import block_attention
    with block_attention():        # F.scaled_dot_product_attention on CPU runs block_sdpa() in here
        loss = model(...)          # the first-order graph built here makes every HVP through it cheaper

An HVP on a retained graph runs attention's backward backwards: the [T, T] score matmuls and the softmax's
double backward (autograd's softmax_double_backward: seven elementwise passes over [B, H, T, T]). On the tiny
Llama that is about a third of an HVP. Two savings, both exact:
- causal blocks: the queries of block [a, b) see keys < b only (the rest of their row is masked, exactly 0
  after the softmax), so BLOCKS blocks do (BLOCKS + 1) / (2 BLOCKS) of the [T, T] work, 62.5% with 4;
- hessian::softmax_backward_backward (csrc/, where the extension is loaded): the double backward in one pass
  per row.
Inside the context the KV cache's torch.cat (a shared prefix's keys and values ahead of the row's) and the blocks'
leading key and value slices are one autograd node each (_Cat, _Prefixes), whose backward is one node too: autograd
slices the gradient there, and under create_graph each slice's backward fills an input-sized tensor with zeros.
The forward is the math SDPA kernel's: q and k scaled by sqrt(scale), a boolean mask as -inf, a fully masked
row 0, half-precision inputs computed in float32. Blocks are used only where the mask masks every key past the
block (checked on the mask itself), so a mask that is not causal runs whole. CPU only: on a GPU at 7B
attention's [T, T] work is about 1% of an HVP and the model's own SDPA runs. HessianOperator (operator.py) uses this
only after finding the model's forward equal with and without it (see its `attention` setting). Imports ops.py alone
(the fused op's wrapper).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import ops

BLOCKS = 4        # query blocks of a causal attention
MIN_BLOCK = 32    # rows a block has at least: below it the extra ops cost more than the masked work they save


def fused_softmax_available() -> bool:
    """Whether hessian::softmax_backward_backward is registered (ops.load_extension() loaded the library)."""
    try:
        return hasattr(torch.ops.hessian, "softmax_backward_backward")
    except (AttributeError, RuntimeError):
        return False


class _SoftmaxBackward(torch.autograd.Function):
    """dx = y (g - <g, y>) along the last dim, whose backward is hessian::softmax_backward_backward."""

    @staticmethod
    def forward(ctx, g, y):
        ctx.save_for_backward(g, y)
        return torch._softmax_backward_data(g, y, -1, y.dtype)

    @staticmethod
    def backward(ctx, gg):
        g, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative asked for: the same formula in differentiable ops
            s = (gg * y).sum(-1, keepdim=True)
            return y * (gg - s), gg * (g - (g * y).sum(-1, keepdim=True)) - g * s
        return tuple(ops.softmax_backward_backward(gg, g, y))


class _Softmax(torch.autograd.Function):
    """The math SDPA kernel's softmax (a fully masked row gives 0), its backward differentiable through
    _SoftmaxBackward."""

    @staticmethod
    def forward(ctx, x):
        y = torch._safe_softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _SoftmaxBackward.apply(g, y)


class _Prefixes(torch.autograd.Function):
    """x's leading slices x[..., :e] along `dim` for each end e, views. Autograd's slice backward would build a
    zero-filled x-sized gradient for each and add them up; here one buffer takes every slice's gradient."""

    @staticmethod
    def forward(ctx, x, ends, dim):
        ctx.shape, ctx.ends, ctx.dim = x.shape, ends, dim
        return tuple(x.narrow(dim, 0, e) for e in ends)

    @staticmethod
    def backward(ctx, *grads):
        return _PrefixSum.apply(ctx.shape, ctx.ends, ctx.dim, *grads), None, None


class _PrefixSum(torch.autograd.Function):
    """The backward of _Prefixes: the slices' gradients added into one x-sized buffer (linear, so its backward
    is _Prefixes again)."""

    @staticmethod
    def forward(ctx, shape, ends, dim, *grads):
        ctx.ends, ctx.dim = ends, dim
        ref = next(g for g in grads if g is not None)
        out = ref.new_zeros(shape)
        for g, e in zip(grads, ends):
            if g is not None:
                out.narrow(dim, 0, e).add_(g)
        return out

    @staticmethod
    def backward(ctx, gg):
        return (None, None, None, *_Prefixes.apply(gg, ctx.ends, ctx.dim))


class _Cat(torch.autograd.Function):
    """torch.cat whose backward is one node (_Split: views of the gradient) with a backward of one cat.
    Autograd's cat backward slices the gradient, and under create_graph each slice is a node whose backward
    builds a zero-filled gradient of the whole; the KV cache's cat of the shared prefix's keys and values with
    the row's costs that in every HVP."""

    @staticmethod
    def forward(ctx, dim, *tensors):
        ctx.dim, ctx.sizes = dim, [t.shape[dim] for t in tensors]
        return torch.cat(tensors, dim)

    @staticmethod
    def backward(ctx, g):
        return (None, *_Split.apply(g, ctx.dim, ctx.sizes))


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, dim, sizes):
        ctx.dim = dim
        return tuple(g.split(sizes, dim))

    @staticmethod
    def backward(ctx, *gg):
        return _Cat.apply(ctx.dim, *gg), None, None


def _cat_args(args, kwargs):
    """(dim, tensors) of a torch.cat call that _Cat takes (two or more CPU tensors of one dtype and rank, one
    needing a gradient), else None."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if (set(kwargs) - {"tensors", "dim"} or not isinstance(tensors, (list, tuple)) or len(tensors) < 2
            or not isinstance(dim, int) or not all(isinstance(t, torch.Tensor) for t in tensors)):
        return None
    first = tensors[0]
    if not (first.device.type == "cpu" and any(t.requires_grad for t in tensors) and first.dim() > 0
            and all(t.dtype == first.dtype and t.dim() == first.dim() and t.device == first.device for t in tensors)):
        return None
    return dim % first.dim(), tensors


def causal_edges(mask, L, S, blocks=None, min_block=None):
    """Row edges [0, e_1, ..., L] of the query blocks (at most `blocks`, of at least `min_block` rows; default
    BLOCKS, MIN_BLOCK) where `mask` (additive, -inf masked; [..., L, S]) masks every key at or past each block's
    end, else None (the attention runs whole). With S > L the queries continue S - L keys of a shared prefix
    (shared_prefix.py): block [a, b) then sees keys < S - L + b."""
    blocks = BLOCKS if blocks is None else blocks
    min_block = MIN_BLOCK if min_block is None else min_block
    if mask is None or L > S or mask.dim() < 2 or mask.shape[-2] != L or mask.shape[-1] != S:
        return None
    n = min(int(blocks), L // max(int(min_block), 1))
    if n < 2:
        return None
    off = S - L
    edges = [round(L * i / n) for i in range(n + 1)]
    for a, b in zip(edges[:-1], edges[1:-1]):
        if not bool(torch.isneginf(mask[..., a:b, off + b:]).all()):
            return None
    return edges


def _bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def block_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
               blocks=None, min_block=None, fused=None):
    """F.scaled_dot_product_attention's math kernel (no dropout), in causal blocks where the mask allows and with
    the fused softmax double backward where `fused` (default: on CPU, where the extension's op is registered)."""
    if dropout_p:
        raise ValueError("block_sdpa has no dropout (the HVP is taken in eval mode)")
    low = query.dtype in (torch.float16, torch.bfloat16)
    if low and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():  # the math kernel's float32
        mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
        return block_sdpa(query.float(), key.float(), value.float(), mask, 0.0, is_causal, scale, enable_gqa,
                          blocks, min_block, fused).to(query.dtype)
    L, S = query.shape[-2], key.shape[-2]
    sf = math.sqrt(1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            attn_mask.logical_not(), float("-inf"))
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if fused is None:  # the op has a CPU kernel only
        fused = query.device.type == "cpu" and fused_softmax_available()
    softmax = _Softmax.apply if fused else lambda x: torch._safe_softmax(x, -1)
    q, kt = query * sf, key.transpose(-2, -1) * sf
    edges = causal_edges(attn_mask, L, S, blocks, min_block)
    if edges is None:
        scores = q @ kt
        return softmax(scores if attn_mask is None else scores + attn_mask) @ value
    off = S - L
    ends = [off + b for b in edges[1:]]
    qs = q.split([b - a for a, b in zip(edges[:-1], edges[1:])], dim=-2)
    ks, vs = _Prefixes.apply(kt, ends, -1), _Prefixes.apply(value, ends, -2)
    out = [softmax(qb @ kb + attn_mask[..., a:b, :e]) @ vb
           for qb, kb, vb, a, b, e in zip(qs, ks, vs, edges[:-1], edges[1:], ends)]
    return torch.cat(out, dim=-2)


class _BlockAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention on CPU tensors without dropout or a negative scale to block_sdpa, and
    torch.cat of CPU tensors that need a gradient (the KV cache's) to _Cat."""

    def __init__(self, blocks, min_block, fused):
        super().__init__()
        self.kw = {"blocks": blocks, "min_block": min_block, "fused": fused}
        self.routed = 0  # calls that ran block_sdpa (none: the model's attention is not SDPA, e.g. eager)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, p, causal, scale, gqa = _bind(*args, **kwargs)
            if q.device.type == "cpu" and not p and (scale is None or scale > 0) and not (causal and mask is not None):
                self.routed += 1
                return block_sdpa(q, k, v, mask, 0.0, causal, scale, gqa, **self.kw)
        elif func is torch.cat and torch.is_grad_enabled():
            found = _cat_args(args, kwargs)
            if found is not None:
                return _Cat.apply(found[0], *found[1])
        return func(*args, **kwargs)


def block_attention(blocks=None, min_block=None, fused=None):
    """A context: inside it every F.scaled_dot_product_attention call on CPU runs block_sdpa (see the module
    docstring); `with block_attention() as mode` gives the mode, whose `routed` counts those calls."""
    return _BlockAttention(blocks, min_block, fused)
