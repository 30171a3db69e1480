"""Any Hugging Face causal LM's decoder blocks, found the way accelerate and torchtitan find them: the modules
whose class the model names in `_no_split_modules` (LlamaDecoderLayer, GPT2Block, GPTNeoXLayer,
OPTDecoderLayer, ...), never by an attribute path (Llama keeps its blocks in model.layers, GPT-2 in
transformer.h, Pythia in gpt_neox.layers, OPT in model.decoder.layers).

    from chained_tuning.families import decoder_blocks
    for block in decoder_blocks(model, "FSDP2 sharding"):   # UserError naming the family where none is found
        fully_shard(block)
"""
from .common import UserError


def family(model):
    """The model's family as its config names it (llama, gpt2, gpt_neox, opt, ...), else its class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def block_class_names(model):
    """The class names in `_no_split_modules` of the model and of every pretrained model inside it (a
    multimodal or wrapped model keeps its language model's list on that inner model, as accelerate reads it)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def decoder_blocks(model, stage):
    """The decoder blocks of `model` in forward order (the outermost module of each block class: a block
    nested in another is part of it). UserError naming the family and `stage` where the model names no block
    class or none of its modules is one."""
    names = block_class_names(model)
    blocks, inside = [], set()
    for m in model.modules():  # pre-order: a block comes before anything inside it
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            blocks.append(m)
            inside.update(id(c) for c in m.modules())
    if not blocks:
        why = (f"its _no_split_modules names {', '.join(sorted(names))} but no module is one" if names
               else "it names no decoder-block class (_no_split_modules)")
        raise UserError(f"{stage} does not support the {family(model)} family ({type(model).__name__}): {why}; "
                        f"run it in one process")
    return blocks
