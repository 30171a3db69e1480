"""shared_prefix.py (the prompt prefix every row of a micro-batch shares, run once) against the whole rows: its
length by hand, the answer-row outputs, and the operator's loss, gradient and H v with and without it, in every
forward the operator combines it with (the last layer at the answer rows, the logits path, attention in blocks,
an eager model routed through SDPA); a cache that does not continue the rows exactly is refused by the check.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_shared_prefix.py
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curvature as C  # noqa: E402
from chained_tuning.hessian import answer_loss, attention, shared_prefix  # noqa: E402
from test_answer_rows import VOCAB, decoder_lm  # noqa: E402
from test_curvature import needs_ext  # noqa: E402

PREFIX = 9


def prefixed_batch(seed=3, rows=5, T=18, prompt=None):
    """Rows that begin with the same PREFIX tokens (an instruction; prompt: the seed of those tokens, the same
    for every batch given it), then differ; right padding of different lengths and answers of 1-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, T), generator=g)
    head = g if prompt is None else torch.Generator().manual_seed(prompt)
    ids[:, :PREFIX] = torch.randint(4, VOCAB, (PREFIX,), generator=head)
    am = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    for r in range(rows):
        end = T - (r % 3) * 2
        am[r, end:] = 0
        labels[r, end - 1 - r % 3:end] = ids[r, end - 1 - r % 3:end]
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def test_the_length_by_hand():
    """Shared tokens, attended, before the first position that predicts an answer token; capped at T - 1; 0 for
    one row or too little saved."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 2], [5, 6, 7, 8, 3]])
    am = torch.ones_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    assert shared_prefix.shared_prefix_length(ids, am, keep, min_saved=1) == 3
    keep[1, 1] = True  # position 1 predicts an answer token: its output is read
    assert shared_prefix.shared_prefix_length(ids, am, keep, min_saved=1) == 1
    keep[:] = False
    am[2, 2:] = 0  # padding inside the common tokens
    assert shared_prefix.shared_prefix_length(ids, am, keep, min_saved=1) == 2
    same = torch.tensor([[5, 6, 7]] * 2)
    assert shared_prefix.shared_prefix_length(same, torch.ones_like(same), torch.zeros_like(same, dtype=torch.bool),
                                              min_saved=1) == 2
    assert shared_prefix.shared_prefix_length(ids[:1], am[:1], keep[:1], min_saved=1) == 0
    assert shared_prefix.shared_prefix_length(ids, torch.ones_like(ids), keep, min_saved=7) == 0  # 2 * 3 saved
    assert shared_prefix.shared_prefix_length(ids, torch.ones_like(ids), keep, min_saved=6) == 3


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa")])
def test_the_answer_rows_equal_the_whole_rows(kind, attn):
    """The decoder's hidden states and the model's logits at the answer rows, with the prefix run once, against
    the whole rows (float64; eager attention takes its softmax in float32), with and without the last layer at
    the answer rows."""
    model = decoder_lm(kind, attn=attn)
    tol = 1e-6 if attn == "eager" else 1e-12
    ids, am, keep, _ = C._answer_positions(prefixed_batch(), "cpu")
    P = shared_prefix.shared_prefix_length(ids, am, keep)
    assert P == PREFIX
    dec = model.get_decoder()
    rows = answer_loss.AnswerRows.build(dec)
    with torch.no_grad():
        for last in (None, rows):
            ref = answer_loss._answer_hidden(dec, ids, am, keep, last)
            got = answer_loss._answer_hidden(dec, ids, am, keep, last, prefix=P)
            assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())
        ref = answer_loss._answer_logits(model, ids, am, keep)
        got = answer_loss._answer_logits(model, ids, am, keep, prefix=P)
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@needs_ext
@pytest.mark.parametrize("ce,attn", [("linear_xent", "sdpa"), ("linear_xent", "eager"), ("softmax_xent", "sdpa"),
                                     ("torch", "sdpa")])
def test_the_operator_is_the_same(ce, attn):
    """Loss, gradient and H v of the operator with the prefix shared against the same operator without it; the
    saved positions counted; a float32 eager model's attention routed into the blocks (float32 rounding). The
    float64 forward is bit-equal; the
    backward sums the rows' share of the prefix before the prefix's own backward (the whole rows after it): in
    float64 they agree to ~1e-8 relative here (one row alone: 1e-17), below float32's rounding of 6e-8."""
    model = decoder_lm("llama", layers=3, attn=attn)
    bs = [prefixed_batch(3), prefixed_batch(4, rows=6, T=17)]
    if attn == "eager":  # a float64 model keeps eager attention (test_attention_hvp): so float32 here
        model = model.float()
    shared, whole = (C.HessianOperator(model, bs, fused_ce=ce, share_prefix=flag) for flag in (True, False))
    assert shared.share_prefix and not whole.share_prefix
    assert shared.prefix_tokens_saved == 4 * PREFIX + 5 * PREFIX and whole.prefix_tokens_saved == 0
    assert shared.attention == whole.attention
    if ce != "torch":
        assert shared.attention == "blocks_fused"  # eager too: its attention runs as SDPA inside the blocks
    assert model.config._attn_implementation == attn  # and is given back
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in shared.params]
    tol = 1e-5 if attn == "eager" else 1e-7
    assert abs(shared.loss_value - whole.loss_value) <= tol * abs(whole.loss_value)
    for a, b in ((flat(shared.gradient()), flat(whole.gradient())), (flat(shared.hvp(v)), flat(whole.hvp(v)))):
        assert float((a - b).norm() / b.norm()) <= tol


@needs_ext
@pytest.mark.parametrize("rebuilt", [False, True])
def test_micro_batches_of_one_prompt_share_its_run(rebuilt):
    """Micro-batches that begin with the same prompt share one run of it: the retained graphs its forward, and
    all but the largest's and the subsample's its backward too (one backward over their summed losses). Loss,
    gradient, H v (twice: the rebuilt graph's backward must free nothing the retained ones share) and the
    subsample's H_1 v equal the whole rows' (float64); the 2-, 4- and 1-row micro-batches, too short to share a
    prefix of their own, take the stored one; the positions spared by hand. rebuilt: a budget under which the
    4-row micro-batch is rebuilt at every HVP, with no prefix (3 * PREFIX spares less than MIN_SAVED_TOKENS)."""
    model = decoder_lm("llama", layers=2)
    bs = [prefixed_batch(s, rows=r, T=t, prompt=11) for s, r, t in ((3, 6, 18), (4, 5, 17), (5, 1, 20))]
    kw = {"fused_ce": "linear_xent", "keep_first": 2, "gradient_checkpointing": "off"}
    budget = int(1.8 * C.HessianOperator(model, bs, **kw).graph_bytes) if rebuilt else None
    shared = C.HessianOperator(model, bs, graph_memory_budget=budget, **kw)
    whole = C.HessianOperator(model, bs, share_prefix=False, **kw)  # every graph retained
    assert shared.share_prefix and shared.first_out is not None
    assert [int(b["input_ids"].shape[0]) for b in shared.recompute] == ([4] if rebuilt else [])
    rows = 2 + 5 + 1 + (0 if rebuilt else 4)  # the retained graphs' rows; the prompt run once for all of them
    assert shared.prefix_tokens_saved == (rows - 1) * PREFIX
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in shared.params]
    assert abs(shared.loss_value - whole.loss_value) <= 1e-7 * abs(whole.loss_value)
    pairs = [(shared.hvp(v), whole.hvp(v)), (shared.hvp(v), whole.hvp(v)), (shared.hvp_first(v), whole.hvp_first(v))]
    if not rebuilt:  # gradient(): the retained graphs' share of it
        pairs.append((shared.gradient(), whole.gradient()))
    for a, b in pairs:
        assert float((flat(a) - flat(b)).norm() / flat(b).norm()) <= 1e-7


@needs_ext
def test_one_prompt_runs_once_for_every_retained_graph():
    """The decoder runs the prompt (one row of PREFIX tokens) as often for three micro-batches that begin with it
    as for one of them alone: once, besides the probes."""
    model = decoder_lm("llama", layers=2)
    bs = [prefixed_batch(s, prompt=11) for s in (3, 4, 5)]
    runs = []
    model.get_decoder().register_forward_pre_hook(
        lambda m, args, kw: runs.append(tuple(kw["input_ids"].shape) == (1, PREFIX)), with_kwargs=True)
    counts = []
    for batches in (bs[:1], bs):
        runs.clear()
        C.HessianOperator(model, batches, fused_ce="linear_xent")
        counts.append(sum(runs))
    assert counts[0] == counts[1] > 0


@needs_ext
def test_the_spectrum_is_the_same():
    model = decoder_lm("llama", layers=2)
    bs = [prefixed_batch(5), prefixed_batch(6)]
    kw = {"backend": "extension", "rtol": 1e-8, "max_iter": 300, "start": "gradient+random"}  # no rows split off
    r = C.hessian_spectrum(model, bs, **kw)
    assert r["backend"]["shared_prefix"]["on"] and r["backend"]["shared_prefix"]["positions_saved"] == 8 * PREFIX
    off = C.hessian_spectrum(model, bs, share_prefix=False, **kw)
    assert not off["backend"]["shared_prefix"]["on"]
    assert abs(r["rho"] - off["rho"]) <= 1e-7 * off["rho"]
    with pytest.raises(C.CurvatureError, match="share_prefix must be True or False"):
        C.hessian_spectrum(model, bs, share_prefix="yes")


def test_a_cache_that_does_not_continue_the_rows_is_refused(monkeypatch):
    """A cache whose keys sit at the wrong positions (the prefix's last token dropped) changes the outputs: the
    operator's check finds it and keeps the whole rows."""
    model = decoder_lm("llama", attn="sdpa")
    batch = prefixed_batch()
    assert answer_loss._shared_prefix(model, batch, "torch", None, lambda: torch.no_grad())
    real = shared_prefix.prefix_cache
    monkeypatch.setattr(shared_prefix, "prefix_cache",
                        lambda module, ids, P, store=None: real(module, ids, P - 1, store))
    assert not answer_loss._shared_prefix(model, batch, "torch", None, lambda: torch.no_grad())
    op = C.HessianOperator(model, [batch], fused_ce="torch")
    assert not op.share_prefix and op.prefix_tokens_saved == 0


def test_blocks_after_a_prefix():
    """Causal blocks of queries that continue S - L prefix keys: the block edges found on the mask and the
    attention equal to the whole attention."""
    g = torch.Generator().manual_seed(0)
    L, S = 70, 100
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (L, S, S))
    allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    mask = torch.zeros(L, S, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    assert attention.causal_edges(mask, L, S) == [0, 35, 70]
    got = attention.block_sdpa(q, k, v, allowed, fused=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert float((got - ref).abs().max()) <= 1e-12
    leaky = allowed.clone()
    leaky[3, S - L + 40] = True  # a query of the first block sees a key past its block: whole attention
    assert attention.causal_edges(torch.zeros(L, S).masked_fill(~leaky, float("-inf")), L, S) is None
