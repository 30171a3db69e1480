"""The prompt prefix that every row of a micro-batch shares, run once for all of them.

    from chained_tuning.hessian.shared_prefix import shared_prefix_length, prefix_cache
    P = shared_prefix_length(ids, attention_mask, keep)     # 0: nothing worth sharing
    past = prefix_cache(decoder, ids, P)                     # the prefix's keys and values, one copy per row
    h = decoder(input_ids=ids[:, P:], attention_mask=attention_mask, past_key_values=past).last_hidden_state

A task's rows begin with the same instruction (ToxiGen 45 of ~95 tokens; the prefix is 24-44% of the tiny
study's tokens over ARC, CommonsenseQA, CSQA 2.0, ToxiGen and BBQ). Under causal attention those positions see
only each other, so their hidden states, keys and values are the same in every row: computing them for one row
and handing every row that row's keys and values (the model's own KV cache, repeated along the batch) gives the
same outputs at every later position, and autograd sums each row's share of the gradient into the one prefix.
Every graph retained for Hessian-vector products shrinks by the shared tokens, and so does every product. With a
store (prefix_cache's `store`, prefix_length), micro-batches that begin with the same prompt share one run of it.

The prefix stops before the first position that predicts an answer token (those outputs are read) and before
any padding. HessianOperator (operator.py) shares a prefix only after finding the forward with it equal to the
forward without it on a probe batch (answer_loss._shared_prefix), so a model whose cache does not work this way
(a sliding window, positions not counted from the cache) keeps the whole rows. Imports nothing of the project's.
"""
from __future__ import annotations

import copy

MIN_SAVED_TOKENS = 32  # below it the prefix's own forward call costs about what the shared tokens save


def shared_prefix_length(ids, am, keep, min_saved=MIN_SAVED_TOKENS) -> int:
    """P: the number of leading positions where every row has the same token, attended (no padding) and not
    predicting an answer token, capped at T - 1 (a row keeps one position of its own); 0 where one row or the
    (B - 1) * P tokens it saves are fewer than min_saved."""
    B, T = ids.shape
    if B < 2 or T < 2:
        return 0
    same = (ids == ids[:1]).all(0) & am.bool().all(0) & ~keep.any(0)
    bad = (~same).nonzero()
    P = min(int(bad[0]) if bad.numel() else T, T - 1)
    return P if P > 0 and (B - 1) * P >= min_saved else 0


def prefix_length(ids, am, keep, store=None) -> int:
    """P for ids: shared_prefix_length's, or the longest prefix `store` holds (prefix_cache's) that every row
    begins with, attended and predicting no answer token, where that is longer: a stored prefix spares every
    row's P positions at no cost of its own, so one row or a short batch takes it too."""
    P, T = shared_prefix_length(ids, am, keep), ids.shape[1]
    for Q, head in store or ():
        if P < Q < T and bool((ids[:, :Q] == ids.new_tensor(head)).all() and am[:, :Q].bool().all()
                               and not keep[:, :Q].any()):
            P = Q
    return P


def prefix_cache(module, ids, P, store=None):
    """The keys and values of ids[0, :P] in `module` (a decoder or a causal LM), repeated for every row of ids:
    the past_key_values under which ids[:, P:] continues each row. store: a dict that keeps each prefix's one-row
    cache, run once and handed to every later micro-batch that begins with the same tokens (each gets its own
    repeated copy): their graphs then share the prefix's forward, and a backward over their summed losses runs
    the prefix's backward once."""
    head = ids[:1, :P]
    key = (P, tuple(head[0].tolist())) if store is not None else None
    one = store.get(key) if store is not None else None
    if one is None:
        try:  # a causal LM projects only the last position (its logits are not read)
            out = module(input_ids=head, use_cache=True, logits_to_keep=1)
        except TypeError:
            out = module(input_ids=head, use_cache=True)
        one = out.past_key_values if hasattr(out, "past_key_values") else out[1]
        if store is not None:
            store[key] = one
    past = _own_copy(one) if store is not None else one
    past.batch_repeat_interleave(int(ids.shape[0]))
    return past


def _own_copy(cache):
    """A cache object of its own over the same tensors: batch_repeat_interleave and the suffix's updates then
    rebind its layers' tensors, never the stored one's."""
    own = copy.copy(cache)
    own.layers = [copy.copy(layer) for layer in cache.layers]
    return own


def past_length(past) -> int:
    return 0 if past is None else int(past.get_seq_length())


def suffix(ids, keep, P):
    """(ids, keep) of the positions after the prefix (the attention mask keeps its full length)."""
    return (ids, keep) if not P else (ids[:, P:], keep[:, P:])
