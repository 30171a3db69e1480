"""One supervised fine-tuning stage (finetune.py's library): a causal LM tuned on one task's answers, the paper's
recipe by default; a chain is --model pointing at the previous stage's output. train_stage checks the settings
(stage_config.py), loads the model and data, runs the loop (train_loop.py) with the mitigations asked for
(mitigations.py), saves the checkpoint with its lineage and run.json, and evaluates the saved model when asked.

    from chained_tuning.training import train_stage
    record = train_stage({"model": "tiny", "task": "arc", "out": "runs/demo/arc", "steps": 10})   # run.json's record

What --out holds: docs/finetune.md.
"""
import dataclasses
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

from . import distributed, lora
from .checkpoint import check_tokenizer_matches, read_meta, write_meta
from .common import (UserError, atomic_dir, check_args, check_device, check_out, end_process_group, exact, ids_sha256,
                     read_json, round_half_up, run_metadata, seed_everything, seeded_samples, setup_process_group,
                     torchrun_rank_world, under_torchrun, write_json_atomic, write_jsonl_atomic)
from .data.tasks import GENERATIVE_TASKS, TASKS, TaskData, data_options, load_task, parse_tasks
from .evaluation import evaluate_checkpoint, evaluate_model
from .loss import answer_tokens, encode_example
from .mitigations import build_mitigations, check_mitigations, start_mitigations
from .stage_config import (CHECKPOINTING, EVAL_DEFAULTS, NUMERIC_RULES, SAVE_DTYPE_NAMES, config_for_id,
                           default_config, resolve_lr)
from .study import cost_model
from .train_loop import make_optimizer, stage_batch_order, train_loop

# Re-exported: the names finetune.py and its users have imported from here.
from .loss import answer_logits, answer_loss_sum, collate  # noqa: F401
from .mitigations import (AnchorPenalty, Mitigation, ReplayMixing, Regularisation, estimate_fisher,  # noqa: F401
                          mixed_batch_order, replay_counts)
from .stage_config import OPTION_DEFAULTS, PAPER_LR  # noqa: F401
from .train_loop import batch_order, optimisation_step  # noqa: F401

SAVE_DTYPES = {name: getattr(torch, name) for name in SAVE_DTYPE_NAMES}
MAX_SHARD_SIZE = "5GB"  # a 7B model in bf16: three files, as the hub's Llama-2 checkpoints are split

# -----------------------------------------------------------------------------
# Checks, made before anything is loaded


def check_options(cfg, world):
    """The settings' own checks: the numeric rules, the mitigations', the choices, the evaluation's pairs. (world,
    the number of processes: every option runs under torchrun as in one process, LoRA's too; callers pass it.)"""
    check_args(cfg, NUMERIC_RULES)
    check_mitigations(cfg)
    if cfg["save_dtype"] != "auto" and cfg["save_dtype"] not in SAVE_DTYPES:
        raise UserError(f"--save_dtype {cfg['save_dtype']!r}: choose from auto, {', '.join(SAVE_DTYPES)}")
    if cfg["gradient_checkpointing"] in (True, False):  # a caller's dict from before the choice existed
        cfg["gradient_checkpointing"] = "on" if cfg["gradient_checkpointing"] else "off"
    if cfg["gradient_checkpointing"] not in CHECKPOINTING:
        raise UserError(f"--gradient_checkpointing {cfg['gradient_checkpointing']!r}: choose from "
                        f"{', '.join(CHECKPOINTING)}")
    check_lora(cfg, world)
    for tasks_key, limit_key in (("eval_tasks", "eval_limit"), ("eval_val_tasks", "eval_val_limit")):
        evaluated = parse_tasks(cfg[tasks_key], f"--{tasks_key}")  # checked before training, not after it
        if cfg[limit_key] is not None and not evaluated:
            raise UserError(f"--{limit_key} {cfg[limit_key]} needs --{tasks_key}")


def check_lora(cfg, world=1):
    """The LoRA flags against --model (resolved, an adapter's base verified, the targets looked up on the meta
    device: nothing loaded). --lora_chain continue fills the adapter's own settings into cfg; giving others is
    refused. --model an adapter folder without LoRA flags: a full fine-tuning stage from its merged weights."""
    if cfg["lora_r"] is not None and (isinstance(cfg["lora_r"], bool) or not isinstance(cfg["lora_r"], int)):
        raise UserError(f"--lora_r must be a whole number, at least 1, got {cfg['lora_r']!r}")
    mode = cfg["lora_chain"]
    if mode is not None and mode not in lora.CHAIN_MODES:
        raise UserError(f"--lora_chain {mode!r}: choose from {', '.join(lora.CHAIN_MODES)}")
    given = [f"--{k}" for k in ("lora_alpha", "lora_targets") if cfg[k] is not None]
    if cfg["lora_r"] is None and mode is None:
        if given or cfg["lora_dropout"] or cfg.get("lora_base_4bit"):
            flag = given[0] if given else "--lora_dropout" if cfg["lora_dropout"] else "--lora_base_4bit"
            raise UserError(f"{flag} needs --lora_r (a LoRA stage)")
        return
    if cfg.get("lora_base_4bit"):
        lora.check_4bit(world)
    if cfg["save_dtype"] not in ("auto", "float32"):
        raise UserError(f"--save_dtype {cfg['save_dtype']}: a LoRA stage saves its adapter alone, in float32 (the "
                        f"base's weights are not written); drop --save_dtype")
    model_path = lora.resolve(cfg["model"])
    adapter = lora.is_adapter_dir(model_path)
    if mode is not None and not adapter:
        raise UserError(f"--lora_chain {mode}: --model {cfg['model']} is not a LoRA stage's adapter folder (no "
                        f"{lora.ADAPTER_CONFIG}); --lora_chain says how a stage starts from a LoRA model before it: "
                        f"drop it, or pass that stage's --out")
    if adapter and mode is None:
        raise UserError(f"--model {cfg['model']} is a LoRA adapter folder: say how this stage starts from it, "
                        f"--lora_chain merge (its adapter merged into the weights, a fresh one trained) or "
                        f"--lora_chain continue (the same adapter trained on)")
    if mode == "continue":
        own = lora.folder_settings(model_path)
        for key, flag in (("r", "lora_r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout"),
                          ("targets", "lora_targets")):
            value = cfg[flag]
            if flag == "lora_targets" and value is not None:
                value = sorted(lora.check_targets(value, model_path))
            if value is not None and value != own[key] and not (flag == "lora_dropout" and not value):
                raise UserError(f"--lora_chain continue trains {cfg['model']}'s own adapter ({key} {own[key]}); "
                                f"--{flag} {cfg[flag]} differs: drop it, or use --lora_chain merge for a new adapter")
        cfg.update(lora_r=own["r"], lora_alpha=own["alpha"], lora_dropout=own["dropout"],
                   lora_targets=",".join(own["targets"]))
        return
    if cfg["lora_r"] is None:
        raise UserError(f"--lora_chain {mode} starts a fresh adapter: give its rank, --lora_r R")
    lora.check_targets(cfg["lora_targets"], model_path)


def check_stage(cfg, world):
    """Every check made before anything is loaded; returns the micro-batch size."""
    if cfg["task"] not in TASKS:
        raise UserError(f"unknown task {cfg['task']!r}; choose from {', '.join(TASKS)}")
    check_options(cfg, world)
    check_out(cfg["out"], cfg["overwrite"], kind="dir")
    if cfg["batch_size"] % world:
        raise UserError(f"--batch_size {cfg['batch_size']} is not divisible by the {world} processes")
    per_rank = cfg["batch_size"] // world
    micro = cfg["micro_batch_size"] or per_rank
    if per_rank % micro:
        raise UserError(f"--micro_batch_size {micro} does not divide the per-process batch {per_rank}")
    return micro


# -----------------------------------------------------------------------------
# What a stage starts from


@dataclasses.dataclass
class StageInputs:
    """What a stage starts from, besides the model: its tokenizer and lineage, the lr, the encoded training set
    and the training items (the training set, then what the mitigations add: the replayed task's examples)."""
    tok: object
    meta: dict
    lr: float
    lr_note: str
    data: TaskData
    encoded: list
    items: list = None
    save_dtype: str = "float32"
    checkpointing: bool = False
    checkpointing_note: str = ""
    parameters: dict = None  # {"trainable", "total"}
    lora: dict = None  # a LoRA stage: its settings, how it chained and the base its adapter is applied to


def fraction_subset(data, fraction, seed):
    """A seeded random subset of round(fraction * n) examples (at least 1) of a loaded TaskData, in their
    original order; the subsets of one seed are nested (the 1% subset lies inside the 5% one)."""
    n = len(data.examples)
    k = min(n, max(1, round_half_up(exact(fraction) * n)))
    examples = seeded_samples(data.examples, k, seed, "train_fraction")
    info = {**data.info, "train_fraction": fraction, "fraction_of": n, "n": k,
            "ids_sha256": ids_sha256(ex.id for ex in examples)}
    return TaskData(data.task, data.split, examples, data.source, info)


def load_stage_inputs(cfg, device, micro, world, mitigations=()):
    """-> (the starting model on `device`, FSDP2-sharded under torchrun; StageInputs). The tokenizer and data
    come first: the choice of gradient checkpointing needs the longest micro-batch."""
    model_path = lora.resolve(cfg["model"])
    meta = read_meta(model_path)
    lr, lr_note = resolve_lr(cfg, meta)
    tok = lora.load_tokenizer_of(model_path)
    data = load_task(cfg["task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"], **data_options(cfg))
    if cfg["train_fraction"] is not None:
        data = fraction_subset(data, cfg["train_fraction"], cfg["seed"])
    inputs = StageInputs(tok, meta, lr, lr_note, data, [encode_example(tok, ex, cfg["max_length"])
                                                        for ex in data.examples])
    inputs.items = list(inputs.encoded)
    for mitigation in mitigations:
        inputs.items += mitigation.load(tok, len(inputs.items))
    inputs.save_dtype = "float32" if cfg["lora_r"] is not None else resolve_save_dtype(cfg, lora.root_base(model_path))
    inputs.checkpointing, inputs.checkpointing_note = choose_checkpointing(cfg, lora.root_base(model_path), inputs,
                                                                           micro, world, device)
    model = load_start_model(model_path, tok, cfg, inputs.checkpointing, world, device)
    inputs.parameters = lora.parameter_counts(model)
    if cfg["lora_r"] is not None:
        inputs.lora = {"chain": cfg["lora_chain"], **lora.adapter_settings(model),
                       "base": lora.stage_base(cfg["model"], model_path, cfg["lora_chain"]),
                       "base_dtype": lora.dtype_name(lora.base_dtype_of(cfg, world))}
    return model, inputs


def load_start_model(model_path, tok, cfg, checkpointing, world, device):
    """The stage's starting weights on `device`: FSDP2-sharded under torchrun, the whole model otherwise. Under
    torchrun process 0 builds lora.start_model (a fresh adapter drawn from --seed as in one process, a merged
    chain, or the adapter continued) and the others receive it into the same modules built on the meta device."""
    def prepare(model):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg["lora_r"] is not None and checkpointing:
            model.enable_input_require_grads()  # the frozen embedding's output must carry a grad through it

    if world > 1:
        model = distributed.load_sharded(lora.root_base(model_path), device, cfg["bf16"], prepare,
                                         build=lambda: lora.start_model_on_meta(model_path, cfg),
                                         load=lambda: lora.start_model(model_path, cfg))
        check_tokenizer_matches(model, tok, model_path)
    else:
        base_dtype = lora.base_dtype_of(cfg, world)
        model = lora.start_model(model_path, cfg, base_dtype)
        check_tokenizer_matches(model, tok, model_path)
        prepare(model)
        if base_dtype != lora.NF4:  # a 4-bit base was placed on the GPU as it loaded (bitsandbytes has no .to)
            model.to(device)
    return model


def resolve_save_dtype(cfg, model_path):
    """--save_dtype auto: the dtype of --model's own files (config.json's dtype: bfloat16 for Llama-2-7b-hf,
    float32 for the tiny base), so a chain's checkpoints are the size of its base."""
    if cfg["save_dtype"] != "auto":
        return cfg["save_dtype"]
    from transformers import AutoConfig
    dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in SAVE_DTYPES else "float32"


def choose_checkpointing(cfg, model_path, inputs, micro, world, device):
    """--gradient_checkpointing auto: on when the longest micro-batch's activations would not fit beside the
    sharded weights, gradients and AdamW state in the GPU's free memory (15% kept for the allocator and the
    all-gathered blocks); off on the CPU. -> (on, why)."""
    mode = cfg["gradient_checkpointing"]
    if mode != "auto":
        return mode == "on", f"--gradient_checkpointing {mode}"
    if device.type != "cuda":
        return False, "auto: off on the CPU"
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path)
    tokens = micro * max(len(e["input_ids"]) for e in inputs.items)
    # the activation bytes measured by bench/bench_scale.py at Llama-2-7B's width (hidden 4096)
    per_layer = cost_model.ACT_BYTES_PER_TOKEN_LAYER if cfg["bf16"] else cost_model.ACT_BYTES_PER_TOKEN_LAYER_FP32
    activations = tokens * config.num_hidden_layers * per_layer * config.hidden_size / cost_model.LLAMA2_7B["hidden"]
    n_params = sum(p.numel() for p in distributed.build_on_meta(model_path, torch.float32).parameters())
    states = 16 * n_params / world  # fp32 weights, gradients and AdamW's two moments, sharded
    free = torch.cuda.mem_get_info(device)[0]
    on = states + activations > 0.85 * free
    gib = 2 ** 30
    return on, (f"auto: {'on' if on else 'off'} (activations of the longest micro-batch, {tokens} tokens: "
                f"{activations / gib:.1f} GiB; sharded states {states / gib:.1f} GiB; free {free / gib:.1f} GiB)")


# -----------------------------------------------------------------------------
# The record and the checkpoint


def run_record(cfg, inputs, log, losses, mitigations, world, started):
    """run.json: the run_id, lineage, settings, data and losses, and the mitigations' records."""
    meta, data = inputs.meta, inputs.data
    parent_id = meta.get("run_id") if meta.get("chain") else None  # None: tuned from a base model
    # Settings that do not change the result (where and how it is computed) stay out of the id.
    id_fields = {"config": config_for_id(cfg), "lr": inputs.lr, "parent": parent_id, "data": data.info["ids_sha256"]}
    for mitigation in mitigations:
        id_fields.update(mitigation.id_fields())
    if inputs.lora:  # the resolved settings (the default targets named) and the chain mode; the base is --model
        id_fields["lora"] = {k: v for k, v in inputs.lora.items() if k != "base"}  # and the parent, as for full runs
    if inputs.save_dtype != "float32":  # rounded weights are other weights (float32: every run before the option)
        id_fields["save_dtype"] = inputs.save_dtype
    run_id = hashlib.sha256(json.dumps(id_fields, sort_keys=True).encode()).hexdigest()[:16]
    chain = list(meta.get("chain", [])) + [cfg["task"]]
    record = {"run_id": run_id, "parent_run_id": parent_id, "chain": chain, "stage": len(chain), "task": cfg["task"],
              "lr": inputs.lr, "lr_note": inputs.lr_note, "seed": cfg["seed"], "steps": cfg["steps"], "config": cfg,
              "base_model": meta.get("base_model") or ("tiny" if meta.get("tiny") else cfg["model"]),
              "tiny": bool(meta.get("tiny")), "world_size": world, "save_dtype": inputs.save_dtype,
              "gradient_checkpointing": {"on": inputs.checkpointing, "why": inputs.checkpointing_note},
              "optimizer": {"name": "AdamW", "betas": [cfg["beta1"], cfg["beta2"]], "eps": cfg["eps"],
                            "weight_decay": cfg["weight_decay"],
                            "no_weight_decay": "parameters with fewer than 2 dimensions (the RMSNorm weights)",
                            "schedule": "linear decay from lr to 0 over the steps, no warm-up",
                            "max_grad_norm": cfg["max_grad_norm"]},
              "data": {"source": data.source, "n_train": len(inputs.encoded), "train_info": data.info,
                       "truncated_examples": sum(e["truncated"] for e in inputs.encoded),
                       "answer_tokens": sum(answer_tokens(e) for e in inputs.encoded)},
              "parameters": inputs.parameters, "final_loss": losses[-1] if losses else None, "losses": losses}
    if inputs.lora:
        record["lora"] = inputs.lora
    for mitigation in mitigations:
        record.update(mitigation.record(log))
    record["wall_time_s"] = round(time.time() - started, 2)
    record.update(run_metadata())
    return record


def save_stage(folder, model, state, tok, record, log):
    """The checkpoint (sharded safetensors + tokenizer), its lineage file, train_log.jsonl and run.json."""
    lineage = {"run_id": record["run_id"], "chain": record["chain"], "base_model": record["base_model"],
               "tiny": record["tiny"], "task": record["task"], "data_source": record["data"]["source"]}
    if record.get("lora"):  # the adapter alone (PEFT's files), its base recorded for lora.verified_base
        lora.save_adapter(folder, model, record["lora"]["base"], state)
        lineage["lora_base"] = record["lora"]["base"]
    else:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        config_path = os.path.join(folder, "config.json")  # save_pretrained names the float32 master weights' dtype
        write_json_atomic(config_path, {**read_json(config_path), "dtype": record["save_dtype"]})
    tok.save_pretrained(folder)
    write_meta(folder, lineage)
    write_jsonl_atomic(os.path.join(folder, "train_log.jsonl"), log)
    write_json_atomic(os.path.join(folder, "run.json"), record)


# -----------------------------------------------------------------------------
# The stage


def train_stage(cfg):
    """Run one fine-tuning stage described by cfg (see default_config()); returns the run record. The
    checkpoint is in place (atomically) before its evaluation starts, and each evaluation file is added
    atomically: a stage killed while evaluating keeps its training (evaluate.py completes it)."""
    cfg = {**default_config(), **cfg}
    rank, world = torchrun_rank_world()
    micro = check_stage(cfg, world)
    shown_out = cfg.get("out_name") or cfg["out"]  # a caller that trains into a temporary folder names the final one
    device = check_device(cfg["device"])
    own_group, finished = False, False
    if under_torchrun():
        device, own_group = setup_process_group(device, timeout=distributed.timeout(cfg["dist_timeout_min"]))
    try:
        out = _train_stage(cfg, rank, world, micro, device, shown_out)
        finished = True
        return out
    finally:
        end_process_group(own_group, finished)


def _train_stage(cfg, rank, world, micro, device, shown_out):
    seed_everything(cfg["seed"])
    started = time.time()
    mitigations = build_mitigations(cfg)
    model, inputs = load_stage_inputs(cfg, device, micro, world, mitigations)
    if rank == 0:
        print(f"finetune: {cfg['task']} [{inputs.data.source}] {len(inputs.encoded)} examples, model {cfg['model']}, "
              f"lr {inputs.lr:g} ({inputs.lr_note}), {cfg['steps']} steps x batch {cfg['batch_size']}, {world} "
              f"process(es), gradient checkpointing {inputs.checkpointing_note} -> {shown_out}", flush=True)
    opt, sched = make_optimizer(model, inputs.lr, cfg)
    start_mitigations(mitigations, model, inputs.tok, device)
    order = stage_batch_order(len(inputs.encoded), mitigations, cfg)
    log, losses = train_loop(model, opt, sched, order, inputs, cfg, rank, world, micro, device, mitigations)
    record = run_record(cfg, inputs, log, losses, mitigations, world, started)
    del opt, mitigations  # the anchor's copy of the weights goes before the full state dict comes
    # every process takes part; a LoRA stage gathers and saves its adapter alone
    state = distributed.full_state_dict(model, SAVE_DTYPES[inputs.save_dtype],
                                        lora.trainable_names(model) if inputs.lora else None)
    if rank == 0:
        with atomic_dir(cfg["out"], overwrite=cfg["overwrite"]) as tmp:
            save_stage(tmp, model, state, inputs.tok, record, log)
        print(f"finetune: done in {record['wall_time_s']:.1f}s, final loss {record['final_loss']:.4f} "
              f"({inputs.save_dtype} weights) -> {shown_out}", flush=True)
    del state
    if world > 1:
        dist.barrier()  # the checkpoint is in place before any process evaluates
    if world > 1 and not inputs.lora:
        evaluate_held(model, inputs.tok, record, cfg, device)
    else:  # a LoRA stage as evaluate.py scores its folder: the adapter merged, a whole copy in each process
        del model
        evaluate_saved(cfg["out"], cfg)
    return record


# -----------------------------------------------------------------------------
# Evaluation of the saved model (--eval_tasks, --eval_val_tasks)


def eval_jobs(cfg):
    """[(tasks, split, limit, file name)] of --eval_tasks / --eval_val_tasks."""
    jobs = [(parse_tasks(cfg["eval_tasks"], "--eval_tasks"), "test", cfg["eval_limit"], "eval.json"),
            (parse_tasks(cfg["eval_val_tasks"], "--eval_val_tasks"), "validation", cfg["eval_val_limit"],
             "eval_val.json")]
    return [j for j in jobs if j[0]]


def evaluate_saved(folder, cfg):
    """--eval_tasks / --eval_val_tasks in one process (and a LoRA stage's under torchrun, each process holding the
    whole merged model): write eval.json / eval_val.json (and their samples) into the saved checkpoint folder,
    exactly as `evaluate.py --model <out> --tasks ... --out <out>/eval.json [--split validation] [--limit N]` would
    (same loading, scorer defaults and subset seed 0); saves that process's start-up."""
    shown = cfg.get("out_name") or cfg["out"]
    for tasks, split, limit, name in eval_jobs(cfg):
        evaluate_checkpoint(folder, tasks, os.path.join(folder, name), data_dir=cfg["data_dir"], split=split,
                            limit=limit, device=cfg["device"], data_opts=data_options(cfg),
                            classifier=cfg["classifier"], max_new_tokens=cfg["max_new_tokens"], model_name=shown,
                            out_name=os.path.join(shown, name))


def evaluate_held(model, tok, record, cfg, device):
    """--eval_tasks / --eval_val_tasks under torchrun: the sharded model this process trained scores its share
    of the batches (no process reads the checkpoint again); process 0 writes what evaluate.py would. Its forward
    runs in the training's compute dtype: bfloat16 under --bf16 (the saved bf16 weights' values). A job with a
    generative task is evaluated from the saved checkpoint instead (a whole copy per process): generation stops
    row by row, so the forwards of an FSDP model cannot be kept in step."""
    jobs = eval_jobs(cfg)
    if not jobs:
        return
    meta = {"run_id": record["run_id"], "chain": record["chain"], "tiny": record["tiny"]}
    model.eval()
    shown = cfg.get("out_name") or cfg["out"]
    for tasks, split, limit, name in jobs:
        if any(t in GENERATIVE_TASKS for t in tasks):
            evaluate_saved(cfg["out"], {**cfg, **{k: None for k in EVAL_DEFAULTS if k.startswith("eval")},
                                        "eval_tasks" if split == "test" else "eval_val_tasks": ",".join(tasks),
                                        "eval_limit" if split == "test" else "eval_val_limit": limit})
            continue
        evaluate_model(model, tok, meta, tasks, os.path.join(cfg["out"], name), data_dir=cfg["data_dir"],
                       split=split, limit=limit, data_opts=data_options(cfg),
                       dtype="bfloat16" if cfg["bf16"] else "float32", device=device,
                       model_name=shown, out_name=os.path.join(shown, name))
