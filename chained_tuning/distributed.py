"""One model over several processes (torchrun), the way large-model trainers do it: process 0 reads the
checkpoint, the others build the model on the meta device and receive it; FSDP2 sharding per decoder block with
a mixed-precision policy; full tensors gathered one at a time for saving; an evaluation's batches shared out.

    torchrun --nproc_per_node=8 finetune.py --model /models/Llama-2-7b-hf --task arc --out runs/arc --bf16

Used by the stage (training.py), the evaluation (evaluation.py) and the replay sweep (replay_sweep.py).
"""
import datetime

import torch
import torch.distributed as dist

from .checkpoint import load_model  # process 0's host copy: the only process that opens the weight files
from .common import DEFAULT_TIMEOUT_MIN  # noqa: F401  (finetune.py --dist_timeout_min's default)
from .families import decoder_blocks
from .scorer import is_sharded  # noqa: F401  (one definition: the scorer's, a copy unit, needs it alone)


def world():
    """(rank, number of processes) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def timeout(minutes):
    return datetime.timedelta(minutes=minutes)


def build_on_meta(path, dtype):
    """The model's modules with no storage (shapes, dtypes and parameter names only)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _copy_buffers(model, source):
    """Buffers (rotary frequencies: not in any state dict) from process 0's loaded model, then to everyone."""
    own = dict(model.named_buffers())
    src = dict(source.named_buffers()) if source is not None else {}
    for name, buf in own.items():
        if source is not None:
            buf.copy_(src[name].to(buf.device, buf.dtype))
        dist.broadcast(buf, src=0)


def _keep_weight_names(model, source):
    """Process 0's model saves its weights under the names of the files it read, as a loaded one does:
    transformers renames some on load (Pythia's embed_out -> lm_head) and reverts them on save_pretrained only for
    a model that from_pretrained built (its _weight_conversions), not for one built on the meta device."""
    if source is not None and hasattr(source, "_weight_conversions"):
        model._weight_conversions = source._weight_conversions


def load_replicated(path, device, dtype, load=None):
    """Every process gets the whole model on `device` (evaluation): process 0 reads it (load(): its own loader,
    an adapter folder merged into its base; default path's checkpoint), the others build path's model on the meta
    device and receive each tensor by broadcast, name by name. Host memory: one copy, on process 0."""
    rank, _ = world()
    if rank == 0:
        model = (load() if load is not None else load_model(path, dtype)).to(device)
    else:
        model = build_on_meta(path, dtype).to_empty(device=device)
    # by name, in name order: a merged model's modules need not be in the order from_config builds them
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(tensors):
        dist.broadcast(tensors[name].data, src=0)
    return model


def mixed_precision(bf16):
    """FSDP2's policy under --bf16: bf16 compute copies of fp32 sharded master weights, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model, bf16):
    """fully_shard each decoder block (the classes the model names in _no_split_modules: families.py), then the
    root (embeddings, final norm, head). A model with no block class is refused, naming its family."""
    from torch.distributed.fsdp import fully_shard
    policy = mixed_precision(bf16)
    for layer in decoder_blocks(model, "FSDP2 sharding (torchrun with more than one process)"):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def load_sharded(path, device, bf16, prepare=None, build=None, load=None):
    """The FSDP2 training model: built on the meta device on every process, sharded, given storage on `device`,
    then filled from process 0's host copy (each process receives its own shards only). Master weights fp32.
    prepare(model): called before sharding (gradient checkpointing, use_cache). build() / load(): the model on
    the meta device / process 0's host copy, with the same parameter names (a LoRA stage: the base wrapped by
    PEFT, lora.py); default path's checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    rank, _ = world()
    model = build() if build is not None else build_on_meta(path, torch.float32)
    if prepare is not None:
        prepare(model)
    shard(model, bf16)
    model.to_empty(device=device)
    source = None
    if rank == 0:
        source = load() if load is not None else load_model(path, torch.float32)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        _copy_buffers(model, source)
    _keep_weight_names(model, source)
    del full, source
    return model


def local(t):
    """A parameter's (or its gradient's) own shard under FSDP2; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model, dtype, names=None):
    """The model's full state dict in `dtype` on process 0's host, gathered one tensor at a time (no GPU holds a
    second full copy); None on the other processes. Without a process group: the model's own tensors, cast.
    names: only these entries (a LoRA stage's adapter: the frozen base is never gathered)."""
    rank, _ = world()
    state = {}
    for name, t in model.state_dict().items():
        if names is not None and name not in names:
            continue
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            state[name] = full.detach().to("cpu", dtype)
        del full
    return state if rank == 0 else None


def _all_reduce(x, op):
    _, n = world()
    if n == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return float(t)


def all_reduce_sum(x):
    """float64 sum over processes of a Python number (or itself without a process group)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x):
    return _all_reduce(x, dist.ReduceOp.MAX)


def gather_merge(items):
    """Every process's dict merged (keys do not overlap), on every process."""
    _, n = world()
    if n == 1:
        return dict(items)
    parts = [None] * n
    dist.all_gather_object(parts, dict(items))
    merged = {}
    for p in parts:
        merged.update(p)
    return merged


def pad_forwards(model, missing, pad_id, device):
    """Under FSDP2 every forward is a collective: a process that had fewer batches than process 0 runs the
    forwards it lacks on a one-token input, in step with the others (their count is known in advance: each
    process scores every world-th batch)."""
    with torch.no_grad():
        for _ in range(missing):
            model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device))
