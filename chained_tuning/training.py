"""One supervised fine-tuning stage: a causal LM tuned on one task's answers, the paper's recipe by default.
A chain is --model pointing at the previous stage's output.

    python finetune.py --model tiny --task toxigen --out runs/demo/toxigen --eval_tasks toxigen     # theta_A
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/toxigen-arc            # theta_AB
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/mix \\
        --replay_task toxigen --replay_fraction 0.05
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/ewc --ewc 100 --ewc_task toxigen
    torchrun --nproc_per_node=8 finetune.py --model /models/Llama-2-7b-hf --task arc --out runs/arc --bf16 \\
        --data_dir DIR --eval_tasks arc          # FSDP2, bf16 compute, bf16 checkpoint, evaluated on all 8 GPUs

Needs common.py, distributed.py, tasks.py and synthetic.py beside it (tiny_base.py for --model tiny, evaluate.py for
--eval_tasks). The recipe, the options beyond it and what --out holds: README.md.
"""
import argparse
import dataclasses
import fractions
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from . import distributed
from .loss import encode_example, collate, answer_logits, answer_loss_sum, answer_tokens  # noqa: F401
from .common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, UserError, atomic_dir, check_args, check_device,
                     check_out, die_on_user_error, ids_sha256, in_range, progress, read_json, run_metadata,
                     seed_everything, seeded_rng, seeded_samples, setup_process_group, torchrun_rank_world,
                     under_torchrun, write_json_atomic, write_jsonl_atomic)
from .checkpoint import check_tokenizer_matches, load_model, load_tokenizer, read_meta, resolve_model_path, write_meta
from .data.tasks import (DATA_DEFAULTS, GENERATIVE_TASKS, PAPER_TRAIN_SIZE, TASKS, TaskData, add_data_options,
                         data_options, encode_pair, load_task, parse_tasks)

PAPER_LR = 1e-5

# -----------------------------------------------------------------------------
# One stage


def default_config():
    return dict(model="tiny", task=None, out=None, data_dir=None, train_size=PAPER_TRAIN_SIZE, lr=None,
                steps=100, batch_size=16, micro_batch_size=None, max_length=2048, weight_decay=0.1,
                beta1=0.9, beta2=0.95, eps=1e-8, max_grad_norm=1.0, seed=0, bf16=False,
                gradient_checkpointing="auto", save_dtype="auto", dist_timeout_min=distributed.DEFAULT_TIMEOUT_MIN,
                device=None, overwrite=False, **OPTION_DEFAULTS, **EVAL_DEFAULTS)


# Options added after the recipe: they enter the run_id only when they change the result (see config_for_id).
OPTION_DEFAULTS = dict(train_fraction=None, replay_task=None, replay_fraction=0.0, l2_to_init=0.0, ewc=0.0,
                       ewc_task=None, ewc_samples=200, **DATA_DEFAULTS)


# Evaluation after training (--eval_tasks ...): evaluate.py's work on the saved folder, in this process.
EVAL_DEFAULTS = dict(eval_tasks=None, eval_limit=None, eval_val_tasks=None, eval_val_limit=None, classifier=None,
                     max_new_tokens=64)


def config_for_id(cfg):
    """The settings the run_id hashes: everything that can change the result. Where and how it is computed
    stays out, and so does every added option while it is off (runs that do not use them keep their ids)."""
    skip = {"out", "out_name", "overwrite", "device", "micro_batch_size", "gradient_checkpointing", "save_dtype",
            "dist_timeout_min", *EVAL_DEFAULTS}
    active = {"train_fraction": cfg.get("train_fraction") is not None,
              "replay_task": bool(cfg.get("replay_fraction")), "replay_fraction": bool(cfg.get("replay_fraction")),
              "l2_to_init": bool(cfg.get("l2_to_init")), "ewc": bool(cfg.get("ewc")),
              "ewc_task": bool(cfg.get("ewc")), "ewc_samples": bool(cfg.get("ewc")),
              **{k: cfg.get(k, v) != v for k, v in DATA_DEFAULTS.items()}}
    skip |= {k for k, on in active.items() if not on}
    return {k: v for k, v in cfg.items() if k not in skip}


def resolve_lr(cfg, meta):
    if cfg["lr"] is not None:
        return cfg["lr"], "given with --lr"
    if meta.get("tiny"):
        from .data.tiny_base import TINY_LR
        return TINY_LR, (f"tiny-model default {TINY_LR:g} (the paper's {PAPER_LR:g} is for a pretrained 7B model; "
                         f"pass --lr to override)")
    return PAPER_LR, f"paper default {PAPER_LR:g}"


def batch_order(n_examples, steps, batch_size, seed):
    """Indices of every global batch: seeded epochs of shuffled examples, concatenated."""
    rng = seeded_rng(seed, "batch_order")
    need = steps * batch_size
    idx = np.concatenate([rng.permutation(n_examples) for _ in range(math.ceil(need / n_examples))])
    return idx[:need].reshape(steps, batch_size).tolist()


def exact(x):
    """A float read as the decimal it prints as (0.05 -> 1/20), so proportions round exactly."""
    return fractions.Fraction(str(x))


def _round_half_up(q):
    return math.floor(q + fractions.Fraction(1, 2))


def _epoch_stream(n, need, rng):
    """`need` indices: seeded epochs of shuffled range(n), concatenated (batch_order's stream)."""
    if need <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]


def replay_counts(steps, batch_size, fraction):
    """Replayed examples in each global batch: the cumulative count after s batches is
    floor(F * batch_size * s + 1/2), so each batch has floor or ceil of F * batch_size."""
    f = exact(fraction) * batch_size
    return [_round_half_up(f * (s + 1)) - _round_half_up(f * s) for s in range(steps)]


def mixed_batch_order(n_main, n_replay, steps, batch_size, fraction, seed):
    """Global batches mixing the stage's examples (indices < n_main) with replayed ones (indices
    n_main + j, j < n_replay) in the proportions of replay_counts. Each source is read as seeded epochs of
    shuffled examples (the stage's own with batch_order's stream), and each batch's positions are shuffled."""
    counts = replay_counts(steps, batch_size, fraction)
    main_stream = _epoch_stream(n_main, steps * batch_size - sum(counts), seeded_rng(seed, "batch_order")).tolist()
    replay_stream = (_epoch_stream(n_replay, sum(counts), seeded_rng(seed, "replay")) + n_main).tolist()
    positions = seeded_rng(seed, "mix_positions")
    batches, next_main, next_replay = [], 0, 0
    for n_replayed in counts:
        batch = (main_stream[next_main:next_main + batch_size - n_replayed]
                 + replay_stream[next_replay:next_replay + n_replayed])
        next_main, next_replay = next_main + batch_size - n_replayed, next_replay + n_replayed
        batches.append([batch[i] for i in positions.permutation(batch_size)])
    return batches


def fraction_subset(data, fraction, seed):
    """A seeded random subset of round(fraction * n) examples (at least 1) of a loaded TaskData, in their
    original order; the subsets of one seed are nested (the 1% subset lies inside the 5% one)."""
    n = len(data.examples)
    k = min(n, max(1, _round_half_up(exact(fraction) * n)))
    examples = seeded_samples(data.examples, k, seed, "train_fraction")
    info = {**data.info, "train_fraction": fraction, "fraction_of": n, "n": k,
            "ids_sha256": ids_sha256(ex.id for ex in examples)}
    return TaskData(data.task, data.split, examples, data.source, info)


def estimate_fisher(model, tok, examples, max_length, device="cpu", bf16=False):
    """Diagonal empirical Fisher at the model's current weights: the mean over examples of the squared
    gradient of the example's answer NLL (summed over its answer tokens: -log p(answer | prompt)), one
    example per backward, in eval mode. Returns float32 tensors in model.parameters() order: each process's
    own shard under FSDP2. There every process runs the same example: FSDP averages the processes'
    gradients, and only identical ones average to the example's own gradient (the cost: each process runs
    every example, ~a minute for 200 examples at 7B)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(distributed.local(p), dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    device = torch.device(device)
    for ex in examples:
        b = {k: v.to(device) for k, v in collate([encode_example(tok, ex, max_length)], tok.pad_token_id,
                                                 "left").items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not distributed.is_sharded(model)):
            logits, labels = answer_logits(model, b)
        s, _ = answer_loss_sum(logits, labels)
        s.backward()
        for f, p in zip(fisher, params):
            f.add_(distributed.local(p.grad).float().square())
            p.grad = None
    for f in fisher:
        f.div_(len(examples))
    model.train(was_training)
    return fisher


class AnchorPenalty:
    """l2/2 * ||theta - theta_0||^2 + ewc/2 * sum_i F_i (theta_i - theta_0,i)^2, theta_0 the weights when
    it is built. Calling it adds the penalty's gradient, (l2 + ewc * F) * (theta - theta_0), to every
    parameter's .grad and returns (and keeps in .last) the penalty's value. Under FSDP2 each process keeps
    the anchor and the Fisher of its own shards, adds the gradient to its own shards, and the value is
    summed over processes."""

    def __init__(self, model, l2=0.0, ewc=0.0, fisher=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [distributed.local(p).detach().clone() for p in self.params]
        if ewc:
            if fisher is None or len(fisher) != len(self.params):
                raise ValueError("ewc needs one Fisher tensor per trainable parameter")
            self.weight = [l2 + ewc * f.to(p.dtype) for p, f in zip(self.params, fisher)]
        else:
            self.weight = [float(l2)] * len(self.params)
        self.last = None

    @torch.no_grad()
    def value(self):
        return distributed.all_reduce_sum(sum(float(0.5 * (w * (distributed.local(p).detach() - a).square()).double()
                                                    .sum()) for p, a, w in zip(self.params, self.anchor, self.weight)))

    @torch.no_grad()
    def __call__(self):
        total = 0.0
        for p, a, w in zip(self.params, self.anchor, self.weight):
            d = distributed.local(p).detach() - a
            g = w * d
            total += 0.5 * float((g * d).double().sum())
            if p.grad is None:
                p.grad = g.to(p.dtype)  # (FSDP2 always has .grad after a backward pass)
            else:
                distributed.local(p.grad).add_(g)
        self.last = distributed.all_reduce_sum(total)
        return self.last


def optimisation_step(model, opt, sched, encoded, gbatch, pad_id, cfg, rank=0, world=1, micro=None, device="cpu",
                      penalty=None):
    """One optimisation step on the global batch `gbatch` (indices into `encoded`); this process
    takes its slice. Returns (global loss, answer tokens in the global batch, gradient norm).
    The loss is the answer tokens' NLL summed over the whole global batch over their number, so neither
    gradient accumulation nor the number of processes changes it.
    `penalty` (optional, e.g. AnchorPenalty): called once after the backward passes, before clipping (so
    clipping sees the gradient of loss + penalty); it adds its gradient to .grad (its value is not part of
    the returned data loss)."""
    per_rank = len(gbatch) // world
    micro = micro or per_rank
    n_tok = sum(answer_tokens(encoded[i]) for i in gbatch)  # every rank knows the global count
    mine = gbatch[rank * per_rank:(rank + 1) * per_rank]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for m in range(0, per_rank, micro):
        b = {k: v.to(device) for k, v in collate([encoded[i] for i in mine[m:m + micro]], pad_id, "left").items()}
        # Under FSDP2 the mixed-precision policy casts the weights; autocast is the one-process path.
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg["bf16"] and world == 1):
            logits, labels = answer_logits(model, b)
        s, _ = answer_loss_sum(logits, labels)
        # FSDP averages gradients over ranks; scaling by world makes the result sum / n_tok.
        (s * world / n_tok).backward()
        loss_sum += s.detach().double()
    if penalty is not None:
        penalty()
    gnorm = None
    if cfg["max_grad_norm"] and cfg["max_grad_norm"] > 0:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # a DTensor under FSDP2
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(loss_sum)
    return float(loss_sum) / n_tok, n_tok, gnorm


def make_optimizer(model, lr, cfg):
    """AdamW with the recipe's betas and weight decay (not on norm weights), linear decay to zero."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg["steps"])
    return opt, sched


# Every numeric option and what it allows (checked before anything is loaded; None: unset, allowed).
NUMERIC_RULES = {
    "lr": POSITIVE, "steps": (AT_LEAST_1[0], "at least 1 (replay.py evaluates 0 steps without training)"),
    "batch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_1, "train_size": AT_LEAST_1, "max_length": AT_LEAST_1,
    "weight_decay": NON_NEGATIVE, "beta1": in_range(0, 1, open_hi=True), "beta2": in_range(0, 1, open_hi=True),
    "eps": POSITIVE, "max_grad_norm": NON_NEGATIVE, "seed": NON_NEGATIVE,
    "train_fraction": in_range(0, 1, open_lo=True), "replay_fraction": in_range(0, 1), "l2_to_init": NON_NEGATIVE,
    "ewc": NON_NEGATIVE, "ewc_samples": AT_LEAST_1, "eval_limit": AT_LEAST_1, "eval_val_limit": AT_LEAST_1,
    "dist_timeout_min": POSITIVE, "max_new_tokens": AT_LEAST_1}
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINTING = ("auto", "on", "off")


def check_options(cfg, world):
    check_args(cfg, NUMERIC_RULES)
    if cfg["replay_fraction"] and cfg["replay_task"] not in TASKS:
        raise UserError(f"--replay_fraction needs --replay_task (one of {', '.join(TASKS)}), got "
                        f"{cfg['replay_task']!r}")
    if cfg["ewc"] and cfg["ewc_task"] not in TASKS:
        raise UserError(f"--ewc needs --ewc_task (one of {', '.join(TASKS)}), got {cfg['ewc_task']!r}")
    if cfg["save_dtype"] != "auto" and cfg["save_dtype"] not in SAVE_DTYPES:
        raise UserError(f"--save_dtype {cfg['save_dtype']!r}: choose from auto, {', '.join(SAVE_DTYPES)}")
    if cfg["gradient_checkpointing"] in (True, False):  # a caller's dict from before the choice existed
        cfg["gradient_checkpointing"] = "on" if cfg["gradient_checkpointing"] else "off"
    if cfg["gradient_checkpointing"] not in CHECKPOINTING:
        raise UserError(f"--gradient_checkpointing {cfg['gradient_checkpointing']!r}: choose from "
                        f"{', '.join(CHECKPOINTING)}")
    for tasks_key, limit_key in (("eval_tasks", "eval_limit"), ("eval_val_tasks", "eval_val_limit")):
        evaluated = parse_tasks(cfg[tasks_key], f"--{tasks_key}")  # checked before training, not after it
        if cfg[limit_key] is not None and not evaluated:
            raise UserError(f"--{limit_key} {cfg[limit_key]} needs --{tasks_key}")
        if evaluated:
            evaluator(f"--{tasks_key}")  # a finetune.py copied without evaluate.py learns it before training


@dataclasses.dataclass
class StageInputs:
    """What a stage starts from, besides the model: its tokenizer and lineage, the lr, and the encoded
    training set (and, with --replay_fraction, the replayed task's)."""
    tok: object
    meta: dict
    lr: float
    lr_note: str
    data: TaskData
    encoded: list
    replay_data: TaskData | None = None
    replay_encoded: list | None = None
    save_dtype: str = "float32"
    checkpointing: bool = False
    checkpointing_note: str = ""


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


def load_stage_inputs(cfg, device, micro, world):
    """-> (the starting model on `device`, FSDP2-sharded under torchrun; StageInputs). The tokenizer and data
    come first: the choice of gradient checkpointing needs the longest micro-batch."""
    model_path = resolve_model_path(cfg["model"])
    meta = read_meta(model_path)
    lr, lr_note = resolve_lr(cfg, meta)
    tok = load_tokenizer(model_path)
    data = load_task(cfg["task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"], **data_options(cfg))
    if cfg["train_fraction"] is not None:
        data = fraction_subset(data, cfg["train_fraction"], cfg["seed"])
    inputs = StageInputs(tok, meta, lr, lr_note, data, [encode_example(tok, ex, cfg["max_length"])
                                                        for ex in data.examples])
    if cfg["replay_fraction"]:  # A's training set is loaded like the main one (data_dir, train_size, seed)
        inputs.replay_data = load_task(cfg["replay_task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"],
                                       **data_options(cfg))
        inputs.replay_encoded = [encode_example(tok, ex, cfg["max_length"]) for ex in inputs.replay_data.examples]
    inputs.save_dtype = resolve_save_dtype(cfg, model_path)
    inputs.checkpointing, inputs.checkpointing_note = choose_checkpointing(cfg, model_path, inputs, micro, world,
                                                                           device)

    def prepare(model):
        if inputs.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    if world > 1:
        model = distributed.load_sharded(model_path, device, cfg["bf16"], prepare)
        check_tokenizer_matches(model, tok, model_path)
    else:
        model = load_model(model_path)
        check_tokenizer_matches(model, tok, model_path)
        prepare(model)
        model.to(device)
    return model, inputs


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
    try:  # the activation bytes measured by bench/bench_scale.py at Llama-2-7B's width (hidden 4096)
        from .study import cost_model
    except ImportError:
        raise UserError("--gradient_checkpointing auto needs cost_model.py beside finetune.py (its measured "
                        "activation sizes); copy it there, or pass --gradient_checkpointing on or off") from None
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path)
    items = inputs.encoded + (inputs.replay_encoded or [])
    tokens = micro * max(len(e["input_ids"]) for e in items)
    per_layer = cost_model.ACT_BYTES_PER_TOKEN_LAYER if cfg["bf16"] else cost_model.ACT_BYTES_PER_TOKEN_LAYER_FP32
    activations = tokens * config.num_hidden_layers * per_layer * config.hidden_size / cost_model.LLAMA2_7B["hidden"]
    n_params = sum(p.numel() for p in distributed.build_on_meta(model_path, torch.float32).parameters())
    states = 16 * n_params / world  # fp32 weights, gradients and AdamW's two moments, sharded
    free = torch.cuda.mem_get_info(device)[0]
    on = states + activations > 0.85 * free
    gib = 2 ** 30
    return on, (f"auto: {'on' if on else 'off'} (activations of the longest micro-batch, {tokens} tokens: "
                f"{activations / gib:.1f} GiB; sharded states {states / gib:.1f} GiB; free {free / gib:.1f} GiB)")


def build_penalty(model, tok, cfg, device):
    """--l2_to_init / --ewc: (the AnchorPenalty at the starting weights, the Fisher's record for run.json);
    (None, None) when both are off, a None record without --ewc."""
    if not (cfg["l2_to_init"] or cfg["ewc"]):
        return None, None
    fisher, fisher_info = None, None
    if cfg["ewc"]:
        started = time.time()
        pool = load_task(cfg["ewc_task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"], **data_options(cfg))
        samples = seeded_samples(pool.examples, cfg["ewc_samples"], cfg["seed"], "ewc")
        fisher = estimate_fisher(model, tok, samples, cfg["max_length"], device, cfg["bf16"])
        fisher_info = {"task": cfg["ewc_task"], "n_samples": len(samples), "source": pool.source,
                       "sample_ids_sha256": ids_sha256(ex.id for ex in samples),
                       "fisher_sum": distributed.all_reduce_sum(sum(float(f.double().sum()) for f in fisher)),
                       "fisher_max": distributed.all_reduce_max(max(float(f.max()) for f in fisher)),
                       "seconds": round(time.time() - started, 2)}  # (sums and maxima over every process's shards)
    return AnchorPenalty(model, cfg["l2_to_init"], cfg["ewc"], fisher), fisher_info


def make_batch_order(inputs, cfg):
    """-> (every global batch as indices into the training items, the items: the stage's examples, then the
    replayed ones)."""
    if inputs.replay_data is None:
        return batch_order(len(inputs.encoded), cfg["steps"], cfg["batch_size"], cfg["seed"]), inputs.encoded
    order = mixed_batch_order(len(inputs.encoded), len(inputs.replay_encoded), cfg["steps"], cfg["batch_size"],
                              cfg["replay_fraction"], cfg["seed"])
    return order, inputs.encoded + inputs.replay_encoded


def train_loop(model, opt, sched, items, order, inputs, cfg, rank, world, micro, device, penalty):
    """Every optimisation step; returns (train_log.jsonl's lines, the losses)."""
    log, losses = [], []
    model.train()
    bar = progress(range(cfg["steps"]), f"finetune {cfg['task']}", disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        started = time.time()
        step_lr = sched.get_last_lr()[0]
        loss, n_tok, grad_norm = optimisation_step(model, opt, sched, items, order[step], inputs.tok.pad_token_id,
                                                   cfg, rank, world, micro, device, penalty)
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {step + 1} (lr {inputs.lr:g}); lower --lr"
                            + (" or train without --bf16" if cfg["bf16"] else ""))
        losses.append(loss)
        entry = {"step": step + 1, "loss": loss, "lr": step_lr, "answer_tokens": n_tok, "grad_norm": grad_norm,
                 "seconds": round(time.time() - started, 4)}
        if penalty is not None:
            entry["penalty"] = penalty.last
        if inputs.replay_data is not None:
            entry["replayed"] = sum(i >= len(inputs.encoded) for i in order[step])
        log.append(entry)
        bar.set_postfix(loss=f"{loss:.4f}")
    return log, losses


def run_record(cfg, inputs, log, losses, penalty, fisher_info, world, started):
    """run.json: the run_id, lineage, settings, data and losses, and the replay and penalty records when on."""
    meta, data = inputs.meta, inputs.data
    parent_id = meta.get("run_id") if meta.get("chain") else None  # None: tuned from a base model
    # Settings that do not change the result (where and how it is computed) stay out of the id.
    id_fields = {"config": config_for_id(cfg), "lr": inputs.lr, "parent": parent_id, "data": data.info["ids_sha256"]}
    if inputs.replay_data is not None:
        id_fields["replay_data"] = inputs.replay_data.info["ids_sha256"]
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
              "final_loss": losses[-1] if losses else None, "losses": losses}
    if inputs.replay_data is not None:
        record["replay"] = {"task": cfg["replay_task"], "fraction": cfg["replay_fraction"],
                            "n_pool": len(inputs.replay_encoded), "train_info": inputs.replay_data.info,
                            "examples_replayed": sum(entry["replayed"] for entry in log),
                            "examples_total": cfg["steps"] * cfg["batch_size"]}
    if penalty is not None:
        record["regularisation"] = {"l2_to_init": cfg["l2_to_init"], "ewc": cfg["ewc"], "fisher": fisher_info,
                                    "final_penalty": penalty.last}
    record["wall_time_s"] = round(time.time() - started, 2)
    record.update(run_metadata())
    return record


MAX_SHARD_SIZE = "5GB"  # a 7B model in bf16: three files, as the hub's Llama-2 checkpoints are split


def save_stage(folder, model, state, tok, record, log):
    """The checkpoint (sharded safetensors + tokenizer), its lineage file, train_log.jsonl and run.json."""
    model.save_pretrained(folder, state_dict=state, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    config_path = os.path.join(folder, "config.json")  # save_pretrained names the float32 master weights' dtype
    write_json_atomic(config_path, {**read_json(config_path), "dtype": record["save_dtype"]})
    tok.save_pretrained(folder)
    write_meta(folder, {"run_id": record["run_id"], "chain": record["chain"], "base_model": record["base_model"],
                        "tiny": record["tiny"], "task": record["task"], "data_source": record["data"]["source"]})
    write_jsonl_atomic(os.path.join(folder, "train_log.jsonl"), log)
    write_json_atomic(os.path.join(folder, "run.json"), record)


def train_stage(cfg):
    """Run one fine-tuning stage described by cfg (see default_config()); returns the run record. The
    checkpoint is in place (atomically) before its evaluation starts, and each evaluation file is added
    atomically: a stage killed while evaluating keeps its training (evaluate.py completes it)."""
    cfg = {**default_config(), **cfg}
    rank, world = torchrun_rank_world()
    micro = check_stage(cfg, world)
    shown_out = cfg.get("out_name") or cfg["out"]  # a caller that trains into a temporary folder names the final one
    device = check_device(cfg["device"])
    own_group = False
    if under_torchrun():
        device, own_group = setup_process_group(device, timeout=distributed.timeout(cfg["dist_timeout_min"]))
    try:
        return _train_stage(cfg, rank, world, micro, device, shown_out)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train_stage(cfg, rank, world, micro, device, shown_out):
    seed_everything(cfg["seed"])
    started = time.time()
    model, inputs = load_stage_inputs(cfg, device, micro, world)
    if rank == 0:
        print(f"finetune: {cfg['task']} [{inputs.data.source}] {len(inputs.encoded)} examples, model {cfg['model']}, "
              f"lr {inputs.lr:g} ({inputs.lr_note}), {cfg['steps']} steps x batch {cfg['batch_size']}, {world} "
              f"process(es), gradient checkpointing {inputs.checkpointing_note} -> {shown_out}", flush=True)
    opt, sched = make_optimizer(model, inputs.lr, cfg)
    penalty, fisher_info = build_penalty(model, inputs.tok, cfg, device)
    order, items = make_batch_order(inputs, cfg)
    log, losses = train_loop(model, opt, sched, items, order, inputs, cfg, rank, world, micro, device, penalty)
    record = run_record(cfg, inputs, log, losses, penalty, fisher_info, world, started)
    del opt, penalty
    state = distributed.full_state_dict(model, SAVE_DTYPES[inputs.save_dtype])  # every process takes part
    if rank == 0:
        with atomic_dir(cfg["out"], overwrite=cfg["overwrite"]) as tmp:
            save_stage(tmp, model, state, inputs.tok, record, log)
        print(f"finetune: done in {record['wall_time_s']:.1f}s, final loss {record['final_loss']:.4f} "
              f"({inputs.save_dtype} weights) -> {shown_out}", flush=True)
    del state
    if world > 1:
        dist.barrier()  # the checkpoint is in place before any process evaluates
        evaluate_held(model, inputs.tok, record, cfg, device)
    else:
        del model
        evaluate_saved(cfg["out"], cfg)
    return record


def evaluator(flag):
    """evaluate.evaluate_checkpoint, or a UserError naming the missing evaluate.py."""
    try:
        from .evaluation import evaluate_checkpoint
    except ImportError as e:
        raise UserError(f"{flag} needs evaluate.py beside finetune.py ({e}); copy it there, or run evaluate.py "
                        f"separately") from None
    return evaluate_checkpoint


def eval_jobs(cfg):
    """[(tasks, split, limit, file name)] of --eval_tasks / --eval_val_tasks."""
    jobs = [(parse_tasks(cfg["eval_tasks"], "--eval_tasks"), "test", cfg["eval_limit"], "eval.json"),
            (parse_tasks(cfg["eval_val_tasks"], "--eval_val_tasks"), "validation", cfg["eval_val_limit"],
             "eval_val.json")]
    return [j for j in jobs if j[0]]


def evaluate_saved(folder, cfg):
    """--eval_tasks / --eval_val_tasks in one process: write eval.json / eval_val.json (and their samples) into
    the saved checkpoint folder, exactly as `evaluate.py --model <out> --tasks ... --out <out>/eval.json [--split
    validation] [--limit N]` would (same loading, scorer defaults and subset seed 0); saves that process's
    start-up. Needs evaluate.py beside this file."""
    jobs = eval_jobs(cfg)
    if not jobs:
        return
    evaluate_checkpoint = evaluator("--eval_tasks")
    for tasks, split, limit, name in jobs:
        evaluate_checkpoint(folder, tasks, os.path.join(folder, name), data_dir=cfg["data_dir"], split=split,
                            limit=limit, device=cfg["device"], data_opts=data_options(cfg),
                            classifier=cfg["classifier"], max_new_tokens=cfg["max_new_tokens"], model_name=cfg.get("out_name") or cfg["out"],
                            out_name=os.path.join(cfg.get("out_name") or cfg["out"], name))


def evaluate_held(model, tok, record, cfg, device):
    """--eval_tasks / --eval_val_tasks under torchrun: the sharded model this process trained scores its share
    of the batches (no process reads the checkpoint again); process 0 writes what evaluate.py would. Its forward
    runs in the training's compute dtype: bfloat16 under --bf16 (the saved bf16 weights' values). A job with a
    generative task is evaluated from the saved checkpoint instead (a whole copy per process): generation stops
    row by row, so the forwards of an FSDP model cannot be kept in step."""
    jobs = eval_jobs(cfg)
    if not jobs:
        return
    evaluator("--eval_tasks")
    from .evaluation import evaluate_model
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


# -----------------------------------------------------------------------------
