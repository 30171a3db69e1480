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
Every graph retained for Hessian-vector products shrinks by the shared tokens, and so does every product.

The prefix stops before the first position that predicts an answer token (those outputs are read) and before
any padding. HessianOperator (operator.py) shares a prefix only after finding the forward with it equal to the
forward without it on a probe batch (answer_loss._shared_prefix), so a model whose cache does not work this way
(a sliding window, positions not counted from the cache) keeps the whole rows. Imports nothing of the project's.
"""
from __future__ import annotations

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


def prefix_cache(module, ids, P):
    """The keys and values of ids[0, :P] in `module` (a decoder or a causal LM), repeated for every row of ids:
    the past_key_values under which ids[:, P:] continues each row."""
    head = ids[:1, :P]
    try:  # a causal LM projects only the last position (its logits are not read)
        out = module(input_ids=head, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = module(input_ids=head, use_cache=True)
    past = out.past_key_values if hasattr(out, "past_key_values") else out[1]
    past.batch_repeat_interleave(int(ids.shape[0]))
    return past


def past_length(past) -> int:
    return 0 if past is None else int(past.get_seq_length())


def suffix(ids, keep, P):
    """(ids, keep) of the positions after the prefix (the attention mask keeps its full length)."""
    return (ids, keep) if not P else (ids[:, P:], keep[:, P:])
