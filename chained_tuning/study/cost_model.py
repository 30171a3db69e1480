"""Cost figures of the paper profile at Llama-2-7B on one node of 8 x 80 GB GPUs: GPU-seconds per stage
kind, memory per GPU under FSDP2, checkpoint bytes; the one place bench/bench_scale.py and
`study.py --dry_run` take them from.

    python -m chained_tuning.study.cost_model   # the assumptions, the 7B shape and its parameter count
    python bench/bench_scale.py                 # measures the per-token constants below and prints the profile

Importing this module does not import torch (the dry run must be fast with only a config.json).
Every figure is an estimate from stated assumptions (ASSUMPTIONS); the measured constants come from
bench/bench_scale.py runs on a CPU and are written here with the command and the date.
"""
import json
import math
import os

GB = 1e9

# Llama-2-7b-hf's config.json (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, vocab_size, tie_word_embeddings=false, torch_dtype bfloat16).
LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000,
             "tied": False, "dtype": "bfloat16"}

# Meta-Llama-3-8B's config.json: grouped-query attention (8 key/value heads), a 128,256-token vocabulary.
LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256,
             "tied": False, "dtype": "bfloat16"}

# The one-GPU profile's LoRA: rank 16, alpha 32, on every attention and MLP projection of a Llama-layout
# block (what bench_scale.py's LoRA modes measure and `study.py --dry_run` plans).
LORA_ONE_GPU = {"r": 16, "alpha": 32, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")}

# GPUs of an 8 x 80 GB node: dense bf16 tensor-core peak (no sparsity), HBM bandwidth, NVLink bus bandwidth
# per GPU as NCCL's all-gather / reduce-scatter reach it (vendor data sheets; bus figure: about 70% of the
# NVLink line rate, what nccl-tests report on such nodes).
GPUS = {
    "A100-80GB": {"bf16_tflops": 312.0, "hbm_tb_s": 2.039, "nvlink_bus_gb_s": 200.0, "memory_gb": 80.0},
    "H100-80GB": {"bf16_tflops": 989.0, "hbm_tb_s": 3.35, "nvlink_bus_gb_s": 360.0, "memory_gb": 80.0},
    # a 24 GB card of a researcher's desk (RTX 4090: dense bf16 with fp32 accumulate; no NVLink, so the
    # "bus" figure is NCCL over PCIe 4.0 x16, about 20 GB/s)
    "RTX4090-24GB": {"bf16_tflops": 165.0, "hbm_tb_s": 1.008, "nvlink_bus_gb_s": 20.0, "memory_gb": 24.0},
}
DEFAULT_GPU = "A100-80GB"   # the slower of the two: the estimate holds on either
MFU = 0.40                  # model-FLOPs utilisation of a 7B bf16 step (typical of FSDP trainers at 7B)
HBM_EFFICIENCY = 0.70       # fraction of HBM bandwidth a memory-bound decode step reaches
HVP_FACTOR = 4.0            # one Hessian-vector product = 4 x (forward + backward) FLOPs, see hvp_flops()
CURVATURE_MAX_HVPS = 100    # curvature.py's --max_iter default: the most HVPs one solve takes (one each)
# Characters a Llama-2 token covers on the five tasks' training text (prompt + answer), counted with Llama-2's
# vocabulary and merges: CommonsenseQA 3.46, ARC-Easy 3.65, ToxiGen 3.69, CSQA 2.0 3.82, BBQ 3.83. The
# estimate below takes 3.5, so that it errs towards more tokens (4 under-counted them by 4-15%).
CHARS_PER_TOKEN = 3.5       # token estimate without a tokenizer: characters / 3.5
MEMORY_HEADROOM = 0.85      # a stage "fits" when its estimate is under 85% of the GPU's memory
CUDA_CONTEXT_BYTES = 2.5 * GB   # CUDA context, NCCL buffers, cuBLAS workspaces per GPU
FRAGMENTATION = 1.10        # caching-allocator fragmentation on top of the tensors themselves
DISK_WRITE_BYTES_S = 1.0 * GB   # shared-filesystem write rate assumed for a checkpoint save (one writer)
DISK_READ_BYTES_S = 2.0 * GB    # checkpoint load (rank 0 reads, broadcasts shards)
STAGE_STARTUP_S = 60.0      # torchrun start, imports, process group, data loading, FSDP wrap per stage

# Measured on this project's CPU box (2 shared cores, AMX bf16) with a Llama of 7B width (hidden 4096,
# intermediate 11008, 32 heads, vocab 32000, random init), 1 and 2 decoder layers, 2 x 256 tokens, by
#   OMP_NUM_THREADS=1 python bench/bench_scale.py --no_data        (2026-12-02, 7 min; bench/results/scale.json)
# Activations: bytes autograd saves for backward per token per decoder layer at the end of the forward pass
# (storages deduplicated, parameters excluded), from the 1 -> 2 layer difference; SDPA attention (no
# seq x seq tensor is kept: the same figure at 128 and 512 tokens). "bf16" is a model in bf16 weights, which is
# what FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes with. The peak-RSS difference less the layer's
# gradient agrees within 5% (194,640 B for bf16).
ACT_BYTES_PER_TOKEN_LAYER = 186_504          # bf16, no gradient checkpointing
ACT_BYTES_PER_TOKEN_LAYER_CKPT = 8_192       # bf16, gradient checkpointing: the layer input (one bf16 hidden)
ACT_BYTES_PER_TOKEN_LAYER_FP32 = 340_104     # fp32 weights, for reference
# LoRA (LORA_ONE_GPU: r 16 on the 7 projections, peft 0.21.2, fp32 adapters on the bf16 base), same box, by
#   OMP_NUM_THREADS=1 python bench/bench_scale.py --no_data \
#       --modes train_bf16,train_bf16_ckpt,train_bf16_lora,train_bf16_lora_ckpt
# (2026-12-06, 2 min; train_bf16 gave 186,504 B again). LoRA saves more than full fine-tuning: peft casts each
# projection's input to the adapters' fp32 (an fp32 copy of the input per target). Its peak-RSS difference less
# the adapters' gradients is 520,808 B, twice what autograd saved (the backward's fp32 transients): the LoRA
# memory below takes the peak, the larger of the two.
ACT_BYTES_PER_TOKEN_LAYER_LORA_SAVED = 274_504
ACT_BYTES_PER_TOKEN_LAYER_LORA = 520_808     # bf16 base + fp32 adapters, no gradient checkpointing (peak)
ACT_BYTES_PER_TOKEN_LAYER_LORA_CKPT = 8_192  # with gradient checkpointing: the layer input
# QLoRA's base: NF4 weights with double-quantised scales, 4.127 bits a parameter (Dettmers et al. 2023), on the
# decoder layers' linear weights only (bitsandbytes leaves the embedding, the head and the norms in bf16)
QLORA_BITS_PER_PARAM = 4.127
# CPU seconds per token of the 2-layer model (embedding and head included), one thread on a shared box: noisy,
# for sizing CPU runs only (the GPU hours use the FLOP model above, not these).
CPU_TRAIN_S_PER_TOKEN_2LAYERS = 0.0321       # forward + backward, bf16 weights (fp32: 0.0749, autocast: 0.0179)
CPU_EVAL_S_PER_TOKEN_2LAYERS = 0.0028        # no-grad forward, bf16 weights
CPU_SAVE_BYTES_S = 189e6                     # safetensors save_file + fsync of 0.87 GiB on the box's disk
MEASURED = "OMP_NUM_THREADS=1 python bench/bench_scale.py --no_data, 2026-12-02, 2-core shared box"
# The first-order graph an HVP by double backward keeps, per token per decoder layer at 7B width in bf16
# (bench/bench_curvature_scale.py, HessianOperator.graph_bytes from 1 -> 2 layers: ~0.55 MiB).
CURV_GRAPH_BYTES_PER_TOKEN_LAYER = 580_000
# Logits and loss per token (HF Llama: bf16 logits, their fp32 upcast for the loss, its fp32 gradient).
LOGIT_BYTES_PER_VOCAB = 2 + 4 + 4


def shape_from_config(path):
    """The shape dict (as LLAMA2_7B) of a Hugging Face config.json (a folder or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "heads": heads, "kv_heads": c.get("num_key_value_heads") or heads, "vocab": c["vocab_size"],
            "tied": bool(c.get("tie_word_embeddings", False)), "dtype": c.get("torch_dtype") or "float32"}


def params_per_layer(shape=LLAMA2_7B):
    """q, k, v, o (k, v narrower under grouped-query attention), gate/up/down, two RMSNorm weights."""
    h, kv = shape["hidden"], shape["hidden"] * shape["kv_heads"] // shape["heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate"] + 2 * h


def root_params(shape=LLAMA2_7B):
    """Parameters outside the decoder layers: embedding, final norm, LM head (unless tied)."""
    emb = shape["vocab"] * shape["hidden"]
    return emb + shape["hidden"] + (0 if shape["tied"] else emb)


def n_params(shape=LLAMA2_7B):
    return shape["layers"] * params_per_layer(shape) + root_params(shape)


def n_params_meta(shape=LLAMA2_7B):
    """The parameter count of the same shape built by transformers on the meta device (imports torch)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      tie_word_embeddings=shape["tied"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def checkpoint_bytes(n_params, dtype):
    """Bytes of a safetensors checkpoint of n_params weights in dtype (headers and config files ignored)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    return n_params * DTYPE_BYTES[dtype]


# ----------------------------------------------------------------------------------------------- FLOPs
def attention_flops_per_token(seq_len, shape=LLAMA2_7B):
    """QK^T and attention x V, forward, causal (half the square): 2 * 2 * layers * hidden * seq / 2."""
    return 2 * shape["layers"] * shape["hidden"] * seq_len


def train_flops(tokens, n_params, seq_len=512, shape=LLAMA2_7B):
    """6 N per token (forward 2N, backward 4N) plus attention, forward and backward (x3)."""
    return tokens * (6 * n_params + 3 * attention_flops_per_token(seq_len, shape))


def forward_flops(tokens, n_params, seq_len=512, shape=LLAMA2_7B):
    return tokens * (2 * n_params + attention_flops_per_token(seq_len, shape))


def hvp_flops(tokens, n_params, seq_len=512, shape=LLAMA2_7B):
    """One HVP by double backward (curvature.py: the gradient graph kept with create_graph=True, then one
    backward through it per product): the backward of a backward replays the first-order forward and backward
    and differentiates both, about twice a gradient's work; HVP_FACTOR = 4 x (forward + backward) adds a factor
    2 for math-kernel attention (double backward has no fused SDPA) and the un-fused recomputations."""
    return HVP_FACTOR * train_flops(tokens, n_params, seq_len, shape)


STAGE_KINDS = ("train", "eval_forward", "generate", "hvp")


def stage_gpu_seconds(kind, tokens, n_params, n_gpus, seq_len=512, batch=16, gpu=DEFAULT_GPU, shape=LLAMA2_7B,
                      n_lora=0):
    """GPU-seconds (summed over the n_gpus GPUs) of `tokens` tokens of one stage kind on `gpu`.

    train / eval_forward / hvp: compute-bound at MFU of the bf16 peak, per-token FLOPs as above; train also
    pays the FSDP2 traffic of each optimiser step (bf16 all-gather twice, fp32 reduce-scatter once) at the
    NVLink bus rate where it exceeds the compute (steps = tokens / (batch * seq_len)). generate: `tokens` new
    tokens decoded `batch` sequences at a time, each step reading all bf16 weights once (memory-bound).
    Wall-clock seconds are this divided by n_gpus. n_lora > 0: a LoRA stage (lora_train_flops; under FSDP2 the
    frozen weights' two bf16 all-gathers move, the adapters' gradients are negligible); its HVPs are over the
    adapters, HVP_FACTOR x its training FLOPs.
    """
    g = GPUS[gpu]
    peak = g["bf16_tflops"] * 1e12 * MFU * n_gpus
    flops = (lambda t: lora_train_flops(t, n_params, n_lora, seq_len, shape)) if n_lora else (
        lambda t: train_flops(t, n_params, seq_len, shape))
    if kind == "train":
        compute = flops(tokens) / peak
        steps = tokens / float(batch * seq_len)
        moved = fsdp_step_bytes(n_params, n_gpus) * (0.5 if n_lora else 1.0)  # LoRA: bf16 gathers, no fp32 reduce
        comm = steps * moved / (g["nvlink_bus_gb_s"] * GB) if n_gpus > 1 else 0.0
        wall = max(compute, comm)   # FSDP2 overlaps the collectives with compute
    elif kind == "eval_forward":
        wall = forward_flops(tokens, n_params, seq_len, shape) / peak
    elif kind == "hvp":
        wall = HVP_FACTOR * flops(tokens) / peak
    elif kind == "generate":
        steps = tokens / float(batch)
        # tensor-parallel decode would split the weight reads; the study decodes data-parallel, so each
        # GPU reads all weights per step and handles 1/n_gpus of the steps
        per_step = checkpoint_bytes(n_params, "bf16") / (g["hbm_tb_s"] * 1e12 * HBM_EFFICIENCY)
        wall = steps * per_step / n_gpus
    else:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(STAGE_KINDS)}")
    return wall * n_gpus


def fsdp_step_bytes(n_params, n_gpus):
    """Bytes each GPU moves per optimiser step under FSDP2 with reshard_after_forward: a bf16 all-gather in the
    forward and again in the backward, an fp32 reduce-scatter of the gradients; ring cost (n-1)/n each."""
    ring = (n_gpus - 1) / n_gpus
    return ring * n_params * (2 + 2 + 4)


def io_seconds(n_params, dtype="bf16", write=True):
    """Wall seconds to write (or read) one checkpoint at the assumed shared-filesystem rate."""
    return checkpoint_bytes(n_params, dtype) / (DISK_WRITE_BYTES_S if write else DISK_READ_BYTES_S)


# ---------------------------------------------------------------------------------------------- memory
def train_memory_breakdown(n_params, n_gpus, tokens_per_micro_batch, layers, hidden, bytes_per_token_per_layer,
                           checkpointing, vocab=LLAMA2_7B["vocab"], layer_params=None, gathered_layers=2,
                           bytes_per_token_per_layer_ckpt=None):
    """Bytes per GPU of an FSDP2 bf16 mixed-precision training step (fully sharded), by part.

    sharded: fp32 master weights (4) + fp32 gradients (4) + AdamW's two fp32 states (8) = 16 bytes per
    parameter over n_gpus. gathered: `gathered_layers` layers' bf16 parameters all-gathered (the running
    one and the prefetched next) plus their unsharded bf16 gradients and fp32 copies before the
    reduce-scatter, and the root module (embedding, head) gathered for the whole step. activations:
    tokens * layers * bytes_per_token_per_layer, or with checkpointing the layer inputs of every layer plus
    one layer's full activations while it is recomputed. logits: bf16 logits, fp32 upcast and fp32 gradient.
    """
    if layer_params is None:  # what is not embedding, head and final norm, spread over the layers
        layer_params = (n_params - 2 * vocab * hidden - hidden) / layers
    root = n_params - layers * layer_params
    sharded = 16.0 * n_params / n_gpus
    gathered = gathered_layers * layer_params * (2 + 2 + 4) + root * 2
    return _step_memory({"sharded_states": sharded, "gathered_params_grads": gathered}, tokens_per_micro_batch,
                        layers, hidden, bytes_per_token_per_layer, checkpointing, vocab,
                        bytes_per_token_per_layer_ckpt)


def _step_memory(states, tokens, layers, hidden, bytes_per_token_per_layer, checkpointing, vocab,
                 bytes_per_token_per_layer_ckpt=None):
    """A training step's bytes by part: `states` (weights, gradients, optimiser) plus the activations (with
    checkpointing: every layer's input and one layer's full activations while it is recomputed) and the logits,
    then the allocator's fragmentation and the CUDA context."""
    if checkpointing:
        ckpt = bytes_per_token_per_layer_ckpt or 2 * hidden
        acts = tokens * (layers * ckpt + bytes_per_token_per_layer)
    else:
        acts = tokens * layers * bytes_per_token_per_layer
    logits = tokens * vocab * LOGIT_BYTES_PER_VOCAB
    tensors = sum(states.values()) + acts + logits
    return {**states, "activations": acts, "logits": logits,
            "overhead": tensors * (FRAGMENTATION - 1) + CUDA_CONTEXT_BYTES,
            "total": tensors * FRAGMENTATION + CUDA_CONTEXT_BYTES}


def train_memory_per_gpu(n_params, n_gpus, tokens_per_micro_batch, layers, hidden, bytes_per_token_per_layer,
                         checkpointing, **kw):
    """Total bytes per GPU of train_memory_breakdown (same arguments)."""
    return train_memory_breakdown(n_params, n_gpus, tokens_per_micro_batch, layers, hidden,
                                  bytes_per_token_per_layer, checkpointing, **kw)["total"]


def eval_memory_per_gpu(n_params, tokens_per_batch, layers, hidden, vocab=LLAMA2_7B["vocab"], dtype="bf16",
                        kv_cache=True, intermediate=LLAMA2_7B["intermediate"]):
    """Bytes per GPU of distributed evaluation: every rank holds the whole model in `dtype` (evaluation is
    data-parallel, no sharding), the KV cache of the batch (k and v per layer, when the scorer keeps one),
    two hidden-sized and two intermediate-sized transients per token and the fp32 logits of the batch."""
    weights = checkpoint_bytes(n_params, dtype)
    per = DTYPE_BYTES[dtype]
    kv = tokens_per_batch * layers * 2 * hidden * per if kv_cache else 0
    transient = tokens_per_batch * (2 * hidden + 2 * intermediate) * per
    logits = tokens_per_batch * vocab * 4
    return (weights + kv + transient + logits) * FRAGMENTATION + CUDA_CONTEXT_BYTES


# ------------------------------------------------------------------------------------------------ LoRA
def projection_shapes(shape=LLAMA2_7B):
    """(in, out) features of each projection of a Llama-layout block (k, v narrower under grouped queries)."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h * shape["kv_heads"] // shape["heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def lora_params(shape=LLAMA2_7B, r=LORA_ONE_GPU["r"], targets=LORA_ONE_GPU["targets"]):
    """Adapter parameters: A (r x in) and B (out x r) on each target projection of every layer."""
    dims = projection_shapes(shape)
    unknown = sorted(set(targets) - set(dims))
    if unknown:
        raise ValueError(f"LoRA targets {', '.join(unknown)} are not projections of a Llama-layout block "
                         f"({', '.join(dims)})")
    return shape["layers"] * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def lora_train_flops(tokens, n_params, n_lora, seq_len=512, shape=LLAMA2_7B, checkpointing=False):
    """Per token: the forward (2 N + attention), the backward through the frozen weights for the inputs'
    gradients only (2 N + 2 x attention: no weight gradients), the adapters' 6 N_lora, and with gradient
    checkpointing the forward once more."""
    fwd = 2 * n_params + attention_flops_per_token(seq_len, shape)
    bwd = 2 * n_params + 2 * attention_flops_per_token(seq_len, shape)
    return tokens * ((2 if checkpointing else 1) * fwd + bwd + 6 * n_lora)


def base_weight_bytes(shape=LLAMA2_7B, quant="bf16"):
    """Bytes of the frozen base: bf16 throughout, or ("nf4") QLoRA's 4-bit decoder-layer weights with the root
    (embedding, head, final norm) and the layers' norm weights in bf16."""
    if quant == "bf16":
        return 2.0 * n_params(shape)
    if quant != "nf4":
        raise ValueError(f"quant {quant!r} is not bf16 or nf4")
    norms = 2 * shape["hidden"]
    linear = params_per_layer(shape) - norms
    return shape["layers"] * (linear * QLORA_BITS_PER_PARAM / 8 + 2.0 * norms) + 2.0 * root_params(shape)


def lora_one_gpu_memory(shape, tokens_per_micro_batch, checkpointing, quant="bf16", lora=LORA_ONE_GPU):
    """lora_train_memory_breakdown of `shape` with the measured LoRA activations (bf16 or nf4 base)."""
    n_lora = lora_params(shape, lora["r"], lora["targets"])
    return lora_train_memory_breakdown(
        base_weight_bytes(shape, quant) / 2.0, n_lora, tokens_per_micro_batch, shape["layers"], shape["hidden"],
        ACT_BYTES_PER_TOKEN_LAYER_LORA * width_scale(shape), checkpointing, vocab=shape["vocab"],
        bytes_per_token_per_layer_ckpt=ACT_BYTES_PER_TOKEN_LAYER_LORA_CKPT * shape["hidden"] / LLAMA2_7B["hidden"])


def lora_fit(shape, seq_len, gpu, batch=16, quant="bf16", lora=LORA_ONE_GPU):
    """The largest micro-batch (sequences of seq_len, a divisor of batch) that fits `gpu`, without gradient
    checkpointing if that fits, else with it: (micro_batch, checkpointing, bytes), or None when a single
    sequence does not fit even with checkpointing."""
    micro = batch
    while micro >= 1:
        for ckpt in (False, True):
            total = lora_one_gpu_memory(shape, micro * seq_len, ckpt, quant, lora)["total"]
            if fits(total, gpu):
                return micro, ckpt, total
        micro //= 2
    return None


def lora_train_memory_breakdown(n_params, n_lora, tokens_per_micro_batch, layers, hidden, bytes_per_token_per_layer,
                                checkpointing, vocab=LLAMA2_7B["vocab"], bytes_per_token_per_layer_ckpt=None):
    """Bytes on one GPU of a LoRA step on a frozen bf16 base (every GPU of a data-parallel run holds the same):
    base: the bf16 weights, no gradients or optimiser states. adapters: fp32 weights, gradients and AdamW's two
    states (16 bytes a parameter). activations (measured with the adapters in place: the frozen projections keep
    no weight-gradient inputs of their own, the adapters keep theirs) and logits as in train_memory_breakdown."""
    return _step_memory({"base_weights": 2.0 * n_params, "adapter_states": 16.0 * n_lora}, tokens_per_micro_batch,
                        layers, hidden, bytes_per_token_per_layer, checkpointing, vocab,
                        bytes_per_token_per_layer_ckpt)


def curvature_memory(weight_bytes, n_vector, tokens, layers, graph_bytes=CURV_GRAPH_BYTES_PER_TOKEN_LAYER,
                     gpu=DEFAULT_GPU):
    """Bytes on one GPU of a curvature solve: the weights, three fp32 Lanczos vectors of n_vector entries (the
    adapters for LoRA, this GPU's shard otherwise) and the first-order graphs of as many of the `tokens` as fit
    under the headroom (the operator recomputes the others at every product); returns (bytes, tokens whose
    graph is retained)."""
    fixed = (weight_bytes + 3 * 4.0 * n_vector) * FRAGMENTATION + CUDA_CONTEXT_BYTES
    room = MEMORY_HEADROOM * GPUS[gpu]["memory_gb"] * GB - fixed
    per_token = layers * graph_bytes * FRAGMENTATION
    retained = max(0, min(int(tokens), int(room // per_token)))
    return fixed + retained * per_token, retained


def width_scale(shape):
    """Per-token activations of another width, from the 7B-width measurements: in proportion to the projections'
    output widths (4 hidden + 3 intermediate), an approximation that is exact at Llama-2-7B's shape."""
    return (4 * shape["hidden"] + 3 * shape["intermediate"]) / (4 * LLAMA2_7B["hidden"] + 3 * LLAMA2_7B["intermediate"])


def fits(bytes_per_gpu, gpu=DEFAULT_GPU):
    return bytes_per_gpu <= MEMORY_HEADROOM * GPUS[gpu]["memory_gb"] * GB


def estimate_tokens(text):
    """Tokens of a text without a tokenizer: characters / CHARS_PER_TOKEN (at least 1)."""
    return max(1, int(math.ceil(len(text) / CHARS_PER_TOKEN)))


def token_counter(tokenizer_json=None):
    """(count, how): count(texts) -> tokens of each text, with the `tokenizers` file tokenizer_json (a
    tokenizer.json, e.g. Llama-2's) where given, else estimate_tokens; how says which, for a plan's printout.
    A file that does not load raises ValueError naming it."""
    if tokenizer_json is None:
        return (lambda texts: [estimate_tokens(t) for t in texts],
                f"estimated from the data's characters ({CHARS_PER_TOKEN:g} characters a token)")
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for a malformed file
        raise ValueError(f"{tokenizer_json} is not a tokenizers file ({e})") from None
    return (lambda texts: [len(e.ids) for e in tok.encode_batch(list(texts))]), f"counted with {tokenizer_json}"


def assumptions(gpu=DEFAULT_GPU):
    g = GPUS[gpu]
    return [
        f"GPU: {gpu}, bf16 dense peak {g['bf16_tflops']:g} TFLOP/s, HBM {g['hbm_tb_s']:g} TB/s, NVLink bus "
        f"{g['nvlink_bus_gb_s']:g} GB/s per GPU (assumed NCCL rate), {g['memory_gb']:g} GB",
        f"MFU {MFU:.0%} of that peak for training, evaluation forwards and HVPs (assumed, not measured)",
        "training FLOPs 6 N per token + attention (x3 of the forward's 2 * layers * hidden * seq); "
        "evaluation 2 N + attention",
        f"HVP = {HVP_FACTOR:g} x (forward + backward) FLOPs: double backward ~2x a gradient, x2 for math attention",
        f"generation memory-bound: bf16 weights read per decode step at {HBM_EFFICIENCY:.0%} of HBM bandwidth",
        "FSDP2 traffic per step: bf16 all-gather x2 + fp32 reduce-scatter, ring (n-1)/n, overlapped with compute",
        "memory: 16 B/param sharded (fp32 master, grad, AdamW m, v), 2 layers gathered (bf16 params, bf16+fp32 "
        f"grads), root bf16, activations measured on CPU, logits {LOGIT_BYTES_PER_VOCAB} B/vocab/token, "
        f"x{FRAGMENTATION:g} fragmentation + {CUDA_CONTEXT_BYTES / GB:g} GB context; fits below "
        f"{MEMORY_HEADROOM:.0%} of the GPU",
        f"activations per token per layer (bf16): {ACT_BYTES_PER_TOKEN_LAYER} B, with gradient checkpointing "
        f"{ACT_BYTES_PER_TOKEN_LAYER_CKPT} B ({MEASURED})",
        f"tokens estimated as characters / {CHARS_PER_TOKEN:g} where no tokenizer is given (Llama-2 on the five "
        "tasks: 3.46-3.83 characters a token)",
        f"LoRA: r {LORA_ONE_GPU['r']} on {', '.join(LORA_ONE_GPU['targets'])} (finetune.py's default, PEFT's "
        "all-linear); frozen bf16 base (2 B/param, or NF4 at "
        f"{QLORA_BITS_PER_PARAM} bits on the layers' linear weights), adapters 16 B/param (fp32 weights, gradient, "
        f"AdamW m, v); activations {ACT_BYTES_PER_TOKEN_LAYER_LORA} B per token per layer (measured peak, bf16 base "
        f"+ fp32 adapters), {ACT_BYTES_PER_TOKEN_LAYER_LORA_CKPT} B with checkpointing; FLOPs per token 4 N (+2 N "
        "with checkpointing) + attention + 6 N_lora",
        "other widths: per-token activations scaled by (4 hidden + 3 intermediate) relative to Llama-2-7B; a "
        f"curvature solve's graph {CURV_GRAPH_BYTES_PER_TOKEN_LAYER} B per token per layer at 7B width "
        "(bench_curvature_scale.py), the tokens beyond the memory recomputed per product",
        f"checkpoint I/O: write {DISK_WRITE_BYTES_S / GB:g} GB/s, read {DISK_READ_BYTES_S / GB:g} GB/s (assumed "
        f"shared filesystem), {STAGE_STARTUP_S:g} s start-up per stage",
    ]


ASSUMPTIONS = assumptions()


if __name__ == "__main__":
    for line in ASSUMPTIONS:
        print("assumption:", line)
    n = n_params()
    print(f"Llama-2-7B shape {LLAMA2_7B}: {n:,} parameters; checkpoint fp32 {checkpoint_bytes(n, 'fp32') / GB:.2f} GB, "
          f"bf16 {checkpoint_bytes(n, 'bf16') / GB:.2f} GB")
