"""answer_rows.py (the last decoder layer at the answer rows only) against the decoder's own forward, and the HVP
it gives against the full forward's.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_answer_rows.py
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curvature as C  # noqa: E402
from chained_tuning.hessian.answer_rows import AnswerRows  # noqa: E402
from test_curvature import batches, needs_ext, rel  # noqa: E402

VOCAB = 48


def decoder_lm(kind="llama", layers=2, heads=4, kv=2, seed=0, attn="sdpa", **extra):
    import transformers as T

    torch.manual_seed(seed)
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
           "mistral": (T.MistralConfig, T.MistralForCausalLM), "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
           "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM)}[kind]
    cfg = cls[0](vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv, head_dim=16 // heads,
                 max_position_embeddings=64, attn_implementation=attn, **extra)
    return cls[1](cfg).to(torch.float64).eval()


def ragged_batch(seed=4):
    """Right padding of different lengths, answers of 1-3 tokens, one inside the text, one row with none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 11), generator=g)
    am = torch.ones_like(ids)
    am[1, 8:] = 0
    am[2, 5:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 8:] = ids[0, 8:]      # the last three tokens
    labels[1, 7] = ids[1, 7]        # one token, the last real one
    labels[2, 2:4] = ids[2, 2:4]    # two tokens in the middle of the text
    return {"input_ids": ids, "attention_mask": am, "labels": labels}  # row 3: no answer token


def full_rows(dec, ids, am, keep):
    with torch.no_grad(), C._math_sdpa():
        return dec(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state[keep]


@pytest.mark.parametrize("kind,heads,kv", [("llama", 4, 2), ("llama", 2, 2), ("qwen2", 4, 1), ("mistral", 4, 2)])
def test_equals_the_decoder_at_the_answer_rows(kind, heads, kv):
    """Grouped keys/values, biased projections (Qwen2), ragged answers and padding: the rows the loss reads, to
    float64 rounding, in the order of h[keep]."""
    model = decoder_lm(kind, heads=heads, kv=kv)
    dec = model.get_decoder()
    rows = AnswerRows.build(dec)
    assert rows is not None
    ids, am, keep, _ = C._answer_positions(ragged_batch(), "cpu")
    ref = full_rows(dec, ids, am, keep)
    with torch.no_grad(), C._math_sdpa():
        got = rows(dec, ids, am, keep)
    assert got.shape == ref.shape == (int(keep.sum()), 16)
    assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    assert C._last_layer_rows(model, ragged_batch()) is not None  # the operator's check accepts it


@needs_ext
def test_the_hvp_equals_the_full_forwards():
    """The operator with the last layer at the answer rows (the default with linear_xent) against the same
    operator with the full forward: the same loss, gradient and H v to float64 rounding."""
    model = decoder_lm("llama", layers=2)
    bs = batches() + [ragged_batch()]
    ops = [C.HessianOperator(model, bs, fused_ce="linear_xent", last_layer_rows=flag) for flag in (True, False)]
    assert ops[0].last_rows is not None and ops[1].last_rows is None
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ops[0].params]
    hv = [torch.cat([t.reshape(-1) for t in op.hvp(v)]) for op in ops]
    grads = [torch.cat([t.reshape(-1) for t in op.gradient()]) for op in ops]
    assert rel(ops[0].loss_value, ops[1].loss_value) <= 1e-13
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) <= 1e-12
    assert float((hv[0] - hv[1]).norm() / hv[1].norm()) <= 1e-12
    r = C.hessian_spectrum(model, bs, backend="extension", rtol=1e-8, max_iter=300)
    assert r["backend"]["last_layer"] == "answer_rows"
    off = C.hessian_spectrum(model, bs, backend="extension", rtol=1e-8, max_iter=300, last_layer_rows=False)
    assert off["backend"]["last_layer"] == "full"
    assert rel(r["rho"], off["rho"]) <= 1e-6
    with pytest.raises(C.CurvatureError, match="last_layer_rows must be True or False"):
        C.hessian_spectrum(model, bs, last_layer_rows="yes")


def test_refused_where_the_model_differs():
    """Gemma 2 has the names of a Llama layer but normalises the attention output and soft-caps the logits: the
    structural check passes, the numerical one refuses it, and the full forward runs. Gemma (its embedding
    scale inside the embedding module) is equal and taken. A sliding window shorter than the batch is refused."""
    gemma2 = decoder_lm("gemma2", heads=2, kv=2, attn="eager")
    assert AnswerRows.build(gemma2.get_decoder()) is not None
    assert C._last_layer_rows(gemma2, ragged_batch()) is None
    assert C._last_layer_rows(decoder_lm("gemma", heads=2, kv=2), ragged_batch()) is not None
    short = decoder_lm("mistral", sliding_window=4)
    assert C._last_layer_rows(short, ragged_batch()) is None  # 11 tokens, a window of 4
    wide = decoder_lm("mistral", sliding_window=32)
    assert C._last_layer_rows(wide, ragged_batch()) is not None
    assert AnswerRows.build(torch.nn.Module()) is None
