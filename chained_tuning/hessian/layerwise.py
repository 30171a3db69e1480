"""H v one decoder layer at a time: gradient checkpointing for the Hessian-vector product.

    from chained_tuning.hessian.layerwise import LayerwiseHVP
    hv = LayerwiseHVP(model, params, n, answer_loss._answer_positions, answer_loss._math_sdpa)
    out = hv.hvp(batch, v)      # params: the trainable ones in the solver's order; out shaped like them

HessianOperator (operator.py) builds it (gradient_checkpointing) and hands it answer_loss.py's two rules that it
shares, the answer positions of a batch and the attention kernel with a double backward, so that this file
imports nothing else of the folder's.

A double-backward graph (retained, or rebuilt for every product) holds every activation of the forward pass and
of the first backward: 16.8 MiB per token at Llama-2-7B width (bench/bench_curvature_scale.py). Checkpointing
the forward does not help there: the first backward, run with create_graph=True, keeps what it recomputes. So
here one product keeps only each decoder layer's input x_l and its directional derivative dx_l (2 x hidden
values per token per layer) and rebuilds one layer at a time, with torch.func (forward-over-reverse):

    forward   (x_{l+1}, dx_{l+1}) = jvp(layer_l)  at (x_l, theta_l)  along (dx_l, v_l);  x_0 = E[ids], dx_0 = V_E[ids]
    head      (g_L, dg_L), head's share of H v = jvp(grad(answer-token loss))  at (x_L, theta_head)
    backward  (g_l, dg_l), layer l's share = jvp(vjp(layer_l))  at (x_l, theta_l, g_{l+1})  along (dx_l, v_l, dg_{l+1})
    embedding its share = vjp(embedding)(dg_0), the embedding module's own (dx_0 through its forward too)

The loss is answer_loss.batch_answer_loss_sum's with autograd's cross-entropy (answer rows only), over the
same total_tokens. A product costs about 12 forward passes' matmuls against 9 for a rebuilt graph (each
layer's forward runs twice); its memory is one layer's working set plus the stored inputs. For HF decoder
stacks laid out like Llama (Llama, Mistral, Qwen2, Gemma, Phi-3, OLMo-2: model.model.{embed_tokens, layers, norm,
rotary_emb} and a bias-free linear model.lm_head; tests/test_families.py); unsupported(model) names what another
model lacks (GPT-2, GPT-NeoX, OPT), and its family.
"""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call, grad, jvp, vjp

class _SiLU(torch.nn.Module):
    """x * sigmoid(x): aten::silu_backward has no forward-mode formula, sigmoid's backward has."""

    def forward(self, x):
        return x * torch.sigmoid(x)


@contextlib.contextmanager
def _forward_ad_activations(layers):
    """Swap SiLU activations for _SiLU while a product runs (the same function, the same parameters), whatever
    the family calls the attribute (Llama's act_fn, Phi-3's activation_fn)."""
    swapped = []
    for layer in layers:
        for m in list(layer.modules()):
            for name, act in list(m.named_children()):
                if isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"):
                    swapped.append((m, name, act))
                    setattr(m, name, _SiLU())
    try:
        yield
    finally:
        for m, name, act in swapped:
            setattr(m, name, act)


def unsupported(model) -> str | None:
    """Why `model` cannot take the layer-wise product (None when it can), naming its family (config.model_type):
    GPT-2, GPT-NeoX and OPT keep their blocks elsewhere (transformer.h, gpt_neox.layers, model.decoder.layers)
    and add positions or biases this file does not rebuild; the caller keeps whole graphs for them."""
    name = f"the {getattr(getattr(model, 'config', None), 'model_type', None) or '?'} family ({type(model).__name__})"
    inner = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, n)]
    if inner is None or missing:
        lacks = ", ".join(missing) or "all"
        return f"{name} is not laid out like an HF Llama (model.model lacks {lacks})"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return f"{name} has no bias-free nn.Linear lm_head"
    if not isinstance(inner.embed_tokens, torch.nn.Embedding):
        return f"{name}: its embed_tokens is not an nn.Embedding"
    try:
        from transformers.masking_utils import create_causal_mask  # noqa: F401
    except ImportError:
        return "this transformers version has no masking_utils.create_causal_mask"
    return None


class LayerwiseHVP:
    """The layer-wise product for `params` (model.parameters() that require grad, in that order)."""

    def __init__(self, model, params, total_tokens: int, answer_positions, attention):
        """answer_positions(batch, device) -> (ids, attention_mask, keep, targets); attention() -> a context
        manager that selects an attention kernel with a double backward (answer_loss.py's two)."""
        why = unsupported(model)
        if why:
            raise ValueError(f"layer-wise HVP: {why}")
        self.model, self.inner, self.total = model, model.model, int(total_tokens)
        self.answer_positions, self.attention = answer_positions, attention
        self.params = list(params)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.layers = [self._slots(layer) for layer in self.inner.layers[: model.config.num_hidden_layers]]
        self.norm, self.head = self._slots(self.inner.norm), self._slots(model.lm_head)
        self.emb = self.index.get(id(self.inner.embed_tokens.weight))
        self.padding_idx = self.inner.embed_tokens.padding_idx

    def _embed(self, ids, weight):
        """The embedding module's own forward with `weight` (linear in it): a family's scale comes with it
        (Gemma's sqrt(hidden)), which a bare F.embedding of the tangent would drop."""
        return functional_call(self.inner.embed_tokens, {"weight": weight}, (ids,))

    def _slots(self, module):
        """(module, local names, positions in params) of the module's trainable parameters."""
        names, pos = [], []
        for n, p in module.named_parameters():
            if id(p) in self.index:
                names.append(n)
                pos.append(self.index[id(p)])
        return module, names, pos

    def _inputs(self, batch):
        from transformers.masking_utils import create_causal_mask

        dev = self.params[0].device
        ids, am, keep, targets = self.answer_positions(batch, dev)
        rows = keep.reshape(-1).nonzero().squeeze(1)  # row-major, the order of logits[keep]
        x0 = self.inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=x0, attention_mask=am,
                                  past_key_values=None, position_ids=pos)
        kw = {"attention_mask": mask, "position_embeddings": self.inner.rotary_emb(x0, position_ids=pos),
              "position_ids": pos, "past_key_values": None, "use_cache": False}
        return ids, x0, rows, targets, kw

    @staticmethod
    def _layer_fn(module, names, kw):
        def f(x, p):
            out = functional_call(module, dict(zip(names, p)), (x,), kw)
            return out[0] if isinstance(out, tuple) else out
        return f

    def _head_loss(self, h, pn, ph, rows, targets):
        (nm, nn, _), (hm, hn, _) = self.norm, self.head
        hs = functional_call(nm, dict(zip(nn, pn)), (h,))
        sel = hs.reshape(-1, hs.shape[-1]).index_select(0, rows)
        logits = functional_call(hm, dict(zip(hn, ph)), (sel,))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / self.total  # answer rows only

    def hvp(self, batch, v):
        """H v of batch's share of the loss: a list shaped like params (None where a parameter has no part)."""
        p = [t.detach() for t in self.params]
        v = [t.to(q.dtype) for t, q in zip(v, p)]
        out = [None] * len(p)

        def add(i, t):
            out[i] = t if out[i] is None else out[i] + t

        def take(slots, src):
            return tuple(src[i] for i in slots[2])

        with torch.no_grad(), self.attention(), _forward_ad_activations(self.inner.layers):
            ids, x, rows, targets, kw = self._inputs(batch)
            if self.emb is not None:
                ve = v[self.emb]
                if self.padding_idx is not None:  # autograd's embedding backward skips that row: so does its tangent
                    ve = ve.clone()
                    ve[self.padding_idx] = 0
                dx = self._embed(ids, ve)
            else:
                dx = torch.zeros_like(x)
            saved = []
            for slots in self.layers:
                saved.append((x, dx))
                x, dx = jvp(self._layer_fn(slots[0], slots[1], kw), (x, take(slots, p)), (dx, take(slots, v)))

            def head_grads(h, pn, ph):
                return grad(self._head_loss, argnums=(0, 1, 2))(h, pn, ph, rows, targets)

            (g, _, _), (dg, hv_n, hv_h) = jvp(head_grads, (x, take(self.norm, p), take(self.head, p)),
                                            (dx, take(self.norm, v), take(self.head, v)))
            for i, t in zip(self.norm[2], hv_n):
                add(i, t)
            for i, t in zip(self.head[2], hv_h):
                add(i, t)
            del x, dx
            for slots in reversed(self.layers):
                x, dx = saved.pop()  # freed as the backward passes it
                f = self._layer_fn(slots[0], slots[1], kw)

                def back(x_, p_, g_, f=f):
                    return vjp(f, x_, p_)[1](g_)

                (g, _), (dg, hv) = jvp(back, (x, take(slots, p), g), (dx, take(slots, v), dg))
                for i, t in zip(slots[2], hv):
                    add(i, t)
            if self.emb is not None:
                # the embedding's own backward: its scale included, the padding row skipped
                add(self.emb, vjp(lambda w: self._embed(ids, w), p[self.emb])[1](dg.to(p[self.emb].dtype))[0])
        return out

    def loss(self, batch):
        """batch's share of the loss (no graph)."""
        with torch.no_grad(), self.attention():
            ids, x, rows, targets, kw = self._inputs(batch)
            for module, names, pos in self.layers:
                x = self._layer_fn(module, names, kw)(x, tuple(self.params[i].detach() for i in pos))
            return self._head_loss(x, tuple(self.params[i].detach() for i in self.norm[2]),
                                   tuple(self.params[i].detach() for i in self.head[2]), rows, targets)
