"""LoRA stages through PEFT (peft, pinned in requirements.txt): wrapping a model with a fresh adapter, the
default targets, the adapter folder a LoRA stage saves (PEFT's adapter_model.safetensors + adapter_config.json,
the tokenizer, the lineage file) and loading it back with its base verified, the merge of a chain, and the
trainable/total parameter counts. No LoRA layer is written here: PEFT's are used as they are.

    from chained_tuning.lora import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("runs/lora/arc")              # merged: a plain causal LM
    peft_model, tok = load_model_and_tokenizer("runs/lora/arc", merge=False, trainable=True)   # adapter on top

How an adapter's base is recorded and found. adapter_config.json's base_model_name_or_path names the folder the
adapter was trained on, as an absolute path: a checkpoint folder (the base, or a fully tuned stage), or, for a
stage chained with --lora_chain merge, the previous stage's adapter folder, whose own base is found the same way
and which is merged into the weights on load (PEFT's merge_and_unload) before this adapter is applied: no merged
copy of the weights is ever written. The lineage file (chained_tuning.json) records the base as it was at
training time, {"path", "given", "kind", "run_id", "sha256"}; sha256 hashes the base's safetensors files, so a
base that was retrained, replaced or edited in place is refused by name on load, as a missing one is. A base
given as a hub id (no local files) is checked by its id alone. The tiny base is found again through "tiny" when
its cache folder moved (its sha256 still has to match).
"""
import contextlib
import glob
import hashlib
import os
import warnings

from .checkpoint import check_tokenizer_matches, load_model, load_tokenizer, read_meta, resolve_model_path
from .common import UserError, read_json, write_json_atomic
from .data.tiny_base import tiny_base_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHAIN_MODES = ("merge", "continue")
# PEFT's shorthand for every linear layer but the output head: the attention and MLP projections of any family.
# (PEFT's per-family table, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, names attention only, q_proj and
# v_proj for Llama; pass --lora_targets q_proj,v_proj for that.)
ALL_LINEAR = "all-linear"
HASH_CHUNK = 1 << 24
NF4 = "nf4"   # a base_dtype: QLoRA's 4-bit base (bitsandbytes)


@contextlib.contextmanager
def quiet_peft():
    """PEFT asks transformers' deprecated is_gradient_checkpointing: a FutureWarning on every wrap, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_adapter_dir(path):
    """Whether `path` is a PEFT adapter folder (its adapter_config.json), not a model checkpoint."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def resolve(path, flag="--model"):
    """checkpoint.resolve_model_path, which an adapter folder passes too (its base checked: verified_base)."""
    local = os.path.expanduser(path)
    if is_adapter_dir(local):
        verified_base(local, flag)
        return local
    return resolve_model_path(path, flag)


_HASHED = {}  # {(file, size, mtime) of every file: sha256}: a 13 GB base is read once a process, not per check


def weights_sha256(folder):
    """sha256 over a folder's safetensors files (name and bytes, in name order): the identity of its weights."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        return None
    key = tuple((os.path.abspath(fn), os.stat(fn).st_size, os.stat(fn).st_mtime_ns) for fn in files)
    if key not in _HASHED:
        _HASHED[key] = _sha256_files(files)
    return _HASHED[key]


def _sha256_files(files):
    h = hashlib.sha256()
    for fn in files:
        h.update(os.path.basename(fn).encode() + b"\0")
        with open(fn, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def base_record(given, resolved):
    """What an adapter's lineage records of the folder (or hub id) it was trained on; see the module docstring."""
    local = os.path.isdir(resolved)
    meta = read_meta(resolved) if local else {}
    return {"path": os.path.abspath(resolved) if local else resolved, "given": given,
            "kind": ("adapter" if is_adapter_dir(resolved) else "checkpoint") if local else "hub",
            "run_id": meta.get("run_id"), "sha256": weights_sha256(resolved) if local else None}


def verified_base(adapter_dir, flag="--model"):
    """The base of an adapter folder (adapter_config.json's base_model_name_or_path), checked against the lineage's
    record of it: missing, or other weights than the adapter was trained on, is a UserError naming both."""
    config = read_json(os.path.join(adapter_dir, ADAPTER_CONFIG))
    named = config.get("base_model_name_or_path")
    recorded = read_meta(adapter_dir).get("lora_base") or {}
    if not named:
        raise UserError(f"{flag} {adapter_dir}: its {ADAPTER_CONFIG} names no base_model_name_or_path; pass an "
                        f"adapter folder saved by finetune.py --lora_r or PEFT's save_pretrained")
    path = named
    if (not os.path.isdir(path) and recorded.get("given") == "tiny"
            and os.path.basename(path) == os.path.basename(tiny_base_path())):  # the same tiny base, cached elsewhere
        path = resolve_model_path("tiny")
    if not os.path.isdir(path):
        if os.path.isabs(path) or path.startswith("."):
            raise UserError(f"{flag} {adapter_dir}: its base {named} ({ADAPTER_CONFIG} base_model_name_or_path) is "
                            f"missing; put that folder back, or pass a checkpoint of its own")
        return resolve_model_path(path, f"{flag} {adapter_dir}: its base")  # a hub id: checked by its id alone
    want = recorded.get("sha256")
    if want is not None:
        got = weights_sha256(path)
        if got != want:
            raise UserError(f"{flag} {adapter_dir}: its base {path} differs from the one it was trained on (weights "
                            f"sha256 {str(got)[:12]}, recorded {want[:12]}, run {recorded.get('run_id')}); put the "
                            f"original base back at {path}, or retrain the adapter on this one")
    return path


def root_base(path):
    """The checkpoint folder (or hub id) at the bottom of a chain of adapters: where config.json is."""
    while is_adapter_dir(path):
        path = verified_base(path)
    return path


def check_4bit(world):
    """--lora_base_4bit's needs, refused by name before anything is loaded: one process, a CUDA GPU, bitsandbytes."""
    import importlib.util
    import torch
    if world > 1:
        raise UserError("--lora_base_4bit runs in one process: FSDP2 does not shard bitsandbytes' 4-bit weights; "
                        "drop it under torchrun, or run the stage with python on one GPU")
    if not torch.cuda.is_available():
        raise UserError("--lora_base_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); drop it on this machine "
                        "(--bf16 keeps the base in bfloat16 instead)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--lora_base_4bit needs bitsandbytes: python -m pip install bitsandbytes (optional, not in "
                        "requirements.txt)")


def load_base(path, dtype=None):
    """The (root) base of a stage: checkpoint.load_model in `dtype`, or (NF4) quantised to 4 bits on the GPU with
    bf16 compute, prepared for training by PEFT (its norms and head in float32)."""
    if dtype != NF4:
        return load_model(path, dtype)
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 use_safetensors=True, device_map={"": torch.cuda.current_device()})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def load_adapter_model(adapter_dir, dtype=None, trainable=False, merge=False, flag="--model"):
    """The model of an adapter folder: its base (itself an adapter merged on load, for a merge chain), then
    this adapter through PeftModel.from_pretrained; merge: PEFT's merge_and_unload, a plain causal LM."""
    from peft import PeftModel
    base = verified_base(adapter_dir, flag)
    model = (load_adapter_model(base, dtype, merge=True, flag=flag) if is_adapter_dir(base)
             else load_base(base, dtype))
    with quiet_peft():
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    return model.merge_and_unload() if merge else model


def load_tokenizer_of(resolved):
    """The tokenizer of a resolved checkpoint or adapter folder: an adapter's is the one saved beside it (a
    foreign adapter's: its base's)."""
    if is_adapter_dir(resolved) and not os.path.isfile(os.path.join(resolved, "tokenizer_config.json")):
        return load_tokenizer(root_base(resolved))
    return load_tokenizer(resolved)


def load_model_and_tokenizer(path, dtype=None, trainable=False, merge=True, flag="--model"):
    """checkpoint.load_model_and_tokenizer for a checkpoint or an adapter folder; the tokenizer is checked
    against the (base's) embedding as a checkpoint's is. merge=False keeps the top adapter a PeftModel's."""
    resolved = resolve(path, flag)
    tok = load_tokenizer_of(resolved)
    model = (load_adapter_model(resolved, dtype, trainable, merge, flag) if is_adapter_dir(resolved)
             else load_model(resolved, dtype))
    check_tokenizer_matches(model, tok, resolved)
    return model, tok


# -----------------------------------------------------------------------------
# A stage's adapter


def linear_module_names(model):
    """The last name part of every torch.nn.Linear but the output head (what --lora_targets may name)."""
    import torch
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def check_targets(targets, model_path):
    """--lora_targets against the model's modules, on the meta device (nothing loaded): each must be a linear
    layer of the model. -> the list (None: the default, every linear layer but the head)."""
    if targets is None:
        return None
    from . import distributed
    import torch
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    have = linear_module_names(distributed.build_on_meta(root_base(model_path), torch.float32))
    missing = [t for t in names if t not in have]
    if not names or missing:
        raise UserError(f"--lora_targets {targets}: {', '.join(missing) or 'empty'} is not a linear module of the "
                        f"model; choose from {','.join(have)}")
    return names


def wrap(model, r, alpha, dropout, targets, seed):
    """A fresh PEFT LoRA adapter on `model` (base weights frozen), its initialisation seeded."""
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)  # lora_A's Kaiming draw: the same adapter for the same seed
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=targets or ALL_LINEAR)
    with quiet_peft():
        return get_peft_model(model, config)


def adapter_settings(model):
    """The active adapter's settings as run.json and the run_id record them."""
    c = model.peft_config[model.active_adapter]
    return {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "targets": sorted(c.target_modules)}


def parameter_counts(model):
    """{"trainable", "total"}: parameters that require grad, and all of them (the base's frozen ones too)."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def save_adapter(folder, model, base, state=None):
    """PEFT's adapter files into `folder` (an atomic_dir being written), base_model_name_or_path set to the base
    recorded (base_record), so that the folder loads with PEFT alone too. state: the adapter's full tensors by
    state-dict name (under FSDP2 the model holds shards: distributed.full_state_dict gathers them)."""
    model.peft_config[model.active_adapter].base_model_name_or_path = base["path"]
    # save_embedding_layers=False: no embedding is ever adapted (and "auto" looks for a config.json the base
    # of a merge chain, an adapter folder, does not have)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True, save_embedding_layers=False)
    readme = os.path.join(folder, "README.md")  # PEFT's model-card stub: nothing of ours is in it
    if os.path.isfile(readme):
        os.remove(readme)
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    config = {**read_json(config_path), "base_model_name_or_path": base["path"]}
    if isinstance(config.get("target_modules"), list):  # PEFT writes its set in hash order: one order per run
        config["target_modules"] = sorted(config["target_modules"])
    write_json_atomic(config_path, config)


def folder_settings(adapter_dir):
    """An adapter folder's settings as adapter_settings gives them, from its adapter_config.json."""
    c = read_json(os.path.join(adapter_dir, ADAPTER_CONFIG))
    targets = c.get("target_modules")
    return {"r": c.get("r"), "alpha": c.get("lora_alpha"), "dropout": c.get("lora_dropout"),
            "targets": sorted([targets] if isinstance(targets, str) else targets or [])}


def stage_base(given, resolved, chain):
    """The base a stage's adapter is applied to (base_record): --model itself for a fresh adapter (on a
    checkpoint, or on a previous adapter merged: --lora_chain merge); for --lora_chain continue the continued
    adapter's own base, as its lineage recorded it."""
    if chain != "continue":
        return base_record(given, resolved)
    recorded = read_meta(resolved).get("lora_base")
    if recorded:
        return recorded
    base = verified_base(resolved)
    return base_record(base, base)


def base_dtype_of(cfg, world):
    """The dtype a stage loads its frozen base in: NF4 under --lora_base_4bit; bfloat16 for a LoRA stage under
    --bf16 in one process (half the memory; the adapters stay float32); else None, float32 (a full stage keeps
    float32 master weights, and under torchrun FSDP2's policy casts)."""
    import torch
    if cfg.get("lora_base_4bit"):
        return NF4
    return torch.bfloat16 if cfg.get("bf16") and cfg.get("lora_r") is not None and world == 1 else None


def dtype_name(dtype):
    """base_dtype_of's answer as run.json records it."""
    return "float32" if dtype is None else dtype if dtype == NF4 else str(dtype).replace("torch.", "")


def start_model(resolved, cfg, base_dtype=None):
    """A stage's starting model from a resolved --model (checked by training.check_lora): a checkpoint, or an
    adapter folder merged, for a full fine-tuning stage; with --lora_r a fresh adapter on that (seeded by
    --seed); with --lora_chain continue the adapter itself, trainable. base_dtype: the dtype the (merged) base
    is loaded in (PEFT keeps the adapters in float32 on a bf16 base)."""
    if cfg.get("lora_chain") == "continue":
        return load_adapter_model(resolved, dtype=base_dtype, trainable=True)
    model = (load_adapter_model(resolved, dtype=base_dtype, merge=True) if is_adapter_dir(resolved)
             else load_base(resolved, base_dtype))
    return _stage_adapter(model, resolved, cfg)


def start_model_on_meta(resolved, cfg):
    """start_model's modules, parameter names and requires_grad on the meta device, nothing read but configs:
    what the processes other than 0 build under torchrun before receiving process 0's start_model."""
    import torch
    from . import distributed
    model = distributed.build_on_meta(root_base(resolved), torch.float32)
    if cfg.get("lora_chain") != "continue":
        return _stage_adapter(model, resolved, cfg)
    from peft import LoraConfig, get_peft_model
    config = LoraConfig.from_pretrained(resolved)  # the adapter's own settings, as PeftModel.from_pretrained uses
    config.inference_mode = False
    with quiet_peft():
        return get_peft_model(model, config)


def _stage_adapter(model, resolved, cfg):
    """A fresh stage's model on its (merged) base: every weight trainable for a full stage, else a fresh adapter."""
    if cfg.get("lora_r") is None:
        for p in model.parameters():  # PEFT froze the base it merged into: a full stage trains every weight
            p.requires_grad_(True)
        return model
    alpha = cfg["lora_alpha"]
    if alpha is None:
        from peft import LoraConfig
        alpha = LoraConfig.__dataclass_fields__["lora_alpha"].default  # PEFT's own default
    return wrap(model, cfg["lora_r"], alpha, cfg["lora_dropout"], check_targets(cfg["lora_targets"], resolved),
                cfg["seed"])


def trainable_names(model):
    """The state-dict names of the parameters a stage trains (a LoRA stage's: its adapter's, all PEFT saves)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def applied_to_same_base(a, b):
    """Whether two adapter folders are applied to the same base (same recorded path and weights): the second a
    --lora_chain continue stage of the first, so their adapters' weights are comparable one for one."""
    ra, rb = (read_meta(x).get("lora_base") or {} for x in (a, b))
    return is_adapter_dir(a) and is_adapter_dir(b) and bool(ra) and (ra.get("path"), ra.get("sha256")) == (
        rb.get("path"), rb.get("sha256"))
