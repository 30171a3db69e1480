"""Tiny random causal LMs of nine Hugging Face families, written by save_pretrained beside the tiny base's
tokenizer (as a new user's checkpoint folder would be): tests/test_families.py and bench/bench_families.py.

    from families import FAMILIES, build_family
    folder = build_family("gpt2", "/tmp/models")     # /tmp/models/gpt2: config.json, model.safetensors, tokenizer

Each config has the tiny base's vocabulary (4096 byte-level BPE tokens, <s>=1 </s>=2 <pad>=3), hidden 32, two
layers and four heads; the family quirks are set where they bite: Gemma's head_dim (256 by default), GPT-2's and
OPT's bos/eos/pad ids (50256 and 2/1 by default) and position tables (long enough for every task's longest
example), GPT-NeoX's rotary_pct (a quarter of a head), Phi-3's pad id (32000 by default, past the vocabulary).
Dropout is off (GPT-2's and OPT's configs default to 0.1; the other seven have none): its draws depend on how
the batch is split over processes, so with it two processes cannot give one process's weights. Built on the CPU
from a seeded initialisation: the same folder every time. Needs no network.
"""
import os
import shutil

import torch

VOCAB, BOS, EOS, PAD = 4096, 1, 2, 3
HIDDEN, INTER, LAYERS, HEADS = 32, 64, 2, 4
POSITIONS = 2048  # the training's default max_length: no family's position table is shorter than an example
IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "vocab_size": VOCAB, "tie_word_embeddings": False}
LLAMA_LIKE = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS}

# family -> (transformers config class, its settings); the model class is AutoModelForCausalLM's for the config
FAMILIES = {
    "llama": ("LlamaConfig", {**LLAMA_LIKE}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**LLAMA_LIKE, "use_sliding_window": False}),
    "gemma": ("GemmaConfig", {**LLAMA_LIKE, "head_dim": HIDDEN // HEADS}),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "original_max_position_embeddings": POSITIONS, "rope_scaling": None}),
    "olmo2": ("Olmo2Config", {**LLAMA_LIKE}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
                                   "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS,
                                   "rotary_pct": 0.25}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_inner": INTER, "n_layer": LAYERS, "n_head": HEADS,
                            "n_positions": POSITIONS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "opt": ("OPTConfig", {"hidden_size": HIDDEN, "ffn_dim": INTER, "num_hidden_layers": LAYERS,
                          "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS,
                          "word_embed_proj_dim": HIDDEN, "dropout": 0.0}),
}
# the decoder-block class each family's _no_split_modules names (what FSDP2 wraps)
BLOCKS = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer",
          "gemma": "GemmaDecoderLayer", "phi3": "Phi3DecoderLayer", "olmo2": "Olmo2DecoderLayer",
          "gpt_neox": "GPTNeoXLayer", "gpt2": "GPT2Block", "opt": "OPTDecoderLayer"}


def family_config(name, **overrides):
    import transformers
    cls, kw = FAMILIES[name]
    return getattr(transformers, cls)(**{**IDS, **kw, **overrides})


def family_model(name, seed=0, dtype=torch.float32, **overrides):
    """A seeded random model of the family (in memory)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(name, **overrides)).to(dtype)


def build_family(name, root, tokenizer_dir=None, seed=0):
    """root/name: the family's tiny model (save_pretrained, safetensors) beside a copy of the tiny base's
    tokenizer; built once (an existing folder is kept)."""
    out = os.path.join(root, name)
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    if tokenizer_dir is None:
        from chained_tuning.data.tiny_base import ensure_tiny_base
        tokenizer_dir = ensure_tiny_base()
    from transformers import AutoTokenizer
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    family_model(name, seed).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def key_bias(name, key, t):
    """The elements of tensor `key` that are key-projection biases: a key bias adds q . b_k to every score of a
    query's row, which the softmax cancels, so their gradient is zero in exact arithmetic. Adam turns the
    rounding noise left there into steps of about lr whose signs follow the summation order (one process or
    two), so those elements are held to Adam's bound instead (GPT-2 and Pythia fuse q, k, v in one bias)."""
    mask = torch.zeros(t.shape, dtype=torch.bool)
    if key.endswith("k_proj.bias"):
        mask[:] = True
    elif name == "gpt2" and key.endswith("attn.c_attn.bias"):
        mask[HIDDEN:2 * HIDDEN] = True
    elif name == "gpt_neox" and key.endswith("attention.query_key_value.bias"):
        mask.view(HEADS, 3, -1)[:, 1] = True  # per head [q | k | v]
    return mask


def weight_mismatches(name, a, b, lr, steps, rel=1e-5):
    """The tensors of checkpoint folders a and b (the same family's) that differ: beyond rel of a's in norm
    (tests/test_distributed.py's rule), or, for key-bias elements (key_bias), beyond Adam's bound of 2 lr a step.
    A differing set of names is one mismatch, named "names"."""
    from safetensors.torch import load_file
    wa, wb = ({k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
               for k, v in load_file(os.path.join(d, f)).items()} for d in (a, b))
    if wa.keys() != wb.keys() or not wa:
        return ["names"]
    bad = []
    for k in wa:
        m = key_bias(name, k, wa[k])
        d = wa[k] - wb[k]
        noise = float(d[m].abs().max()) if m.any() else 0.0
        if float(d[~m].norm()) > rel * float(wa[k][~m].norm()) or noise > 2 * lr * steps:
            bad.append(k)
    return bad
