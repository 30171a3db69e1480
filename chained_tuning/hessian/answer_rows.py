"""The decoder's hidden states at the answer rows, with its last layer run at those rows only.

    from chained_tuning.hessian.answer_rows import AnswerRows
    rows = AnswerRows.build(decoder)            # None where the decoder is not laid out like an HF Llama
    h = rows(decoder, ids, attention_mask, keep)    # == decoder(...).last_hidden_state[keep]

The answer-token loss reads the last layer's output at the rows that predict an answer token only. Below the
last layer every position is needed (as keys and values of the layers above), but in the last layer a position
that predicts no answer token feeds nothing: its query, attention output, o_proj and MLP are dead work, which a
full forward does anyway, and the graph built on it costs every Hessian-vector product again. Here the last
layer computes keys and values at every position and everything else at the answer rows alone. The saving is
about one layer's worth less its k/v projections: a fifth of the tiny 4-layer Llama's HVP on bbq (4.3 s ->
3.5 s), about 1/32 of Llama-2-7B's.

For HF decoders laid out like Llama (Llama, Mistral, Qwen2, Gemma: embed_tokens, layers, norm, rotary_emb; each
layer input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp). build() gives None for the
others, which keep the full forward (tests/test_families.py): Phi-3 (one fused qkv_proj), OLMo-2 (q/k norms),
GPT-2, GPT-NeoX and OPT (their blocks elsewhere, learned or partial-rotary positions). HessianOperator
(operator.py) uses it only after finding it equal to the decoder's own forward on a probe batch
(answer_loss._last_layer_rows), so that a model that differs in a way this file does not know (soft-capping, a
sliding window shorter than the batch) keeps the full forward too. Imports nothing of the project's.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")


class AnswerRows:
    """The pruned forward for one decoder (see the module docstring)."""

    def __init__(self, modeling):
        self.modeling = modeling  # the attention's modeling module: its apply_rotary_pos_emb, looked up per call

    @property
    def rope(self):
        """The model's own apply_rotary_pos_emb (its convention for the halves of a head), as it stands now (so
        that fused_layers' form applies inside its context)."""
        return self.modeling.apply_rotary_pos_emb

    @classmethod
    def build(cls, dec):
        """An AnswerRows for `dec` (the decoder stack, model.get_decoder()), or None where its layout differs."""
        if not all(hasattr(dec, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb", "config")):
            return None
        layers = dec.layers[: dec.config.num_hidden_layers]
        if len(layers) == 0:
            return None
        last = layers[-1]
        attn = getattr(last, "self_attn", None)
        if not all(hasattr(last, n) for n in LAYER_PARTS) or not all(hasattr(attn, n) for n in ATTN_PARTS):
            return None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return None
        modeling = sys.modules.get(type(attn).__module__)
        return cls(modeling) if callable(getattr(modeling, "apply_rotary_pos_emb", None)) else None

    def __call__(self, dec, ids, am, keep, past=None):
        """dec's last hidden state (after the final norm) at keep's rows, row-major: decoder(...)[keep]. past: the
        keys and values of a prefix that ids continue (shared_prefix.prefix_cache; am then covers both)."""
        from transformers.masking_utils import create_causal_mask

        B, T = ids.shape
        P = 0 if past is None else int(past.get_seq_length())
        window = getattr(dec.config, "sliding_window", None)
        if window is not None and getattr(dec.config, "use_sliding_window", True) and P + T > int(window):
            raise ValueError(f"a sliding window of {window} tokens is shorter than the batch ({P + T})")
        x = dec.embed_tokens(ids)
        pos = torch.arange(P, P + T, device=ids.device).unsqueeze(0)
        mask = create_causal_mask(config=dec.config, inputs_embeds=x, attention_mask=am, past_key_values=past,
                                  position_ids=pos)
        pe = dec.rotary_emb(x, position_ids=pos)
        layers = dec.layers[: dec.config.num_hidden_layers]
        for layer in layers[:-1]:
            out = layer(x, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=past is not None,
                        position_embeddings=pe)
            x = out[0] if isinstance(out, tuple) else out
        return dec.norm(self._last_layer(layers[-1], x, am, keep, pe, past))

    def _last_layer(self, layer, x, am, keep, pe, past=None):
        B, T, _ = x.shape
        b_idx, t_idx = keep.nonzero(as_tuple=True)  # row-major, the order of h[keep]
        counts = keep.sum(1)
        k = max(int(counts.max()), 1) if counts.numel() else 1
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(b_idx.numel(), device=x.device) - starts[b_idx]
        qpos = torch.zeros(B, k, dtype=torch.long, device=x.device)
        qpos[b_idx, slot] = t_idx
        valid = torch.zeros(B, k, dtype=torch.bool, device=x.device)
        valid[b_idx, slot] = True
        rows = torch.arange(B, device=x.device).unsqueeze(1)
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        hq = h[rows, qpos]
        q = attn.q_proj(hq).view(B, k, -1, attn.head_dim).transpose(1, 2)
        kv = attn.k_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)
        vv = attn.v_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)
        cos, sin = pe
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        q = self.rope(q, q, cos[rows, qpos], sin[rows, qpos])[0]
        kv = self.rope(kv, kv, cos, sin)[0]
        if past is not None:  # the prefix's keys and values ahead of these
            kv, vv = past.update(kv, vv, attn.layer_idx)
        P = kv.shape[2] - T
        groups = q.shape[1] // kv.shape[1]
        if groups > 1:
            kv, vv = kv.repeat_interleave(groups, dim=1), vv.repeat_interleave(groups, dim=1)
        key = torch.arange(P + T, device=x.device)
        allowed = (key.view(1, 1, P + T) <= (qpos + P).unsqueeze(2)) & am.bool().unsqueeze(1)
        allowed |= (~valid).unsqueeze(2) & (key == 0).view(1, 1, P + T)  # a filler slot: any one key, dropped after
        if getattr(attn.config, "_attn_implementation", None) == "eager":  # its softmax rounds in float32: so here
            scores = (q @ kv.transpose(2, 3)) * attn.scaling
            scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(scores.dtype).min)
            o = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ vv
        else:
            o = F.scaled_dot_product_attention(q, kv, vv, attn_mask=allowed.unsqueeze(1), scale=attn.scaling)
        xq = x[rows, qpos] + attn.o_proj(o.transpose(1, 2).reshape(B, k, -1))
        xq = xq + layer.mlp(layer.post_attention_layernorm(xq))
        return xq[b_idx, slot]
