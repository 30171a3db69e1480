"""One supervised fine-tuning stage: a causal LM tuned on one task's answers, the paper's recipe by default.
A chain is --model pointing at the previous stage's output.

    python finetune.py --model tiny --task toxigen --out runs/demo/toxigen --eval_tasks toxigen     # theta_A
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/toxigen-arc            # theta_AB
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/mix \\
        --replay_task toxigen --replay_fraction 0.05
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/ewc --ewc 100 --ewc_task toxigen
    torchrun --nproc_per_node=8 finetune.py --model /models/Llama-2-7b-hf --task arc --out runs/arc --bf16 \\
        --data_dir DIR

Needs common.py, tasks.py and synthetic.py beside it (tiny_base.py for --model tiny, evaluate.py for
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

from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, UserError, atomic_dir, check_args, check_device,
                    check_out, die_on_user_error, ids_sha256, in_range, load_model_and_tokenizer, progress, read_meta,
                    resolve_model_path, run_metadata, seed_everything, seeded_rng, seeded_samples, setup_process_group,
                    torchrun_rank_world, under_torchrun, write_json_atomic, write_jsonl_atomic, write_meta)
from tasks import GENERATIVE_TASKS, PAPER_TRAIN_SIZE, TASKS, TaskData, encode_pair, load_task, parse_tasks

PAPER_LR = 1e-5

# -----------------------------------------------------------------------------
# The loss (curvature.py differentiates exactly this)


def encode_example(tokenizer, example, max_length):
    """input_ids and labels (-100 except on the answer: the correct continuation and EOS).

    An over-long prompt loses tokens from its start (after BOS); the answer is never cut."""
    ctx, cont = encode_pair(tokenizer, example.prompt, example.continuation(example.label))
    answer = cont + [tokenizer.eos_token_id]
    if len(answer) + 2 > max_length:
        raise UserError(f"example {example.id} of {example.task}: its answer alone has {len(answer)} tokens, "
                        f"more than --max_length {max_length}; raise --max_length")
    truncated = len(ctx) + len(answer) > max_length
    if truncated:
        keep = max_length - len(answer)
        bos = ctx[:1] if ctx[:1] == [tokenizer.bos_token_id] else []
        ctx = bos + ctx[len(ctx) - (keep - len(bos)):]
    return {"input_ids": ctx + answer, "labels": [-100] * len(ctx) + answer, "truncated": truncated}


def collate(encoded, pad_id, side="right"):
    """Padded LongTensors input_ids, attention_mask, labels (and position_ids when padded on the
    left, so every row keeps the positions it has unpadded)."""
    n = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        cols = slice(n - k, n) if side == "left" else slice(0, k)
        ids[i, cols] = torch.tensor(e["input_ids"])
        labels[i, cols] = torch.tensor(e["labels"])
        mask[i, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if side == "left":
        out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return out


def answer_logits(model, batch):
    """Logits of the positions that predict answer tokens only: with left padding every answer ends
    the row, so the last K positions hold them all and the vocabulary projection runs on B*K rows
    instead of B*T. Returns (logits, the labels they predict, shifted as in answer_loss_sum)."""
    lab = batch["labels"]
    is_answer = (lab != -100).any(0).nonzero()
    k = lab.shape[1] - int(is_answer[0]) + 1 if len(is_answer) else 1
    k = min(k, lab.shape[1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch.get("position_ids"), logits_to_keep=k).logits
    return logits, lab[:, -k:]


def answer_loss_sum(logits, labels):
    """(sum of token NLL over answer tokens, number of answer tokens); logits[t] predicts labels[t+1]."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def answer_tokens(item):
    return sum(1 for t in item["labels"] if t != -100)


# -----------------------------------------------------------------------------
# One stage


def default_config():
    return dict(model="tiny", task=None, out=None, data_dir=None, train_size=PAPER_TRAIN_SIZE, lr=None,
                steps=100, batch_size=16, micro_batch_size=None, max_length=2048, weight_decay=0.1,
                beta1=0.9, beta2=0.95, eps=1e-8, max_grad_norm=1.0, seed=0, bf16=False,
                gradient_checkpointing=False, device=None, overwrite=False, **OPTION_DEFAULTS, **EVAL_DEFAULTS)


# Options added after the recipe: they enter the run_id only when they change the result (see config_for_id).
OPTION_DEFAULTS = dict(train_fraction=None, replay_task=None, replay_fraction=0.0, l2_to_init=0.0, ewc=0.0,
                       ewc_task=None, ewc_samples=200)


# Evaluation after training (--eval_tasks ...): evaluate.py's work on the saved folder, in this process.
EVAL_DEFAULTS = dict(eval_tasks=None, eval_limit=None, eval_val_tasks=None, eval_val_limit=None)


def config_for_id(cfg):
    """The settings the run_id hashes: everything that can change the result. Where and how it is computed
    stays out, and so does every added option while it is off (runs that do not use them keep their ids)."""
    skip = {"out", "out_name", "overwrite", "device", "micro_batch_size", "gradient_checkpointing", *EVAL_DEFAULTS}
    active = {"train_fraction": cfg.get("train_fraction") is not None,
              "replay_task": bool(cfg.get("replay_fraction")), "replay_fraction": bool(cfg.get("replay_fraction")),
              "l2_to_init": bool(cfg.get("l2_to_init")), "ewc": bool(cfg.get("ewc")),
              "ewc_task": bool(cfg.get("ewc")), "ewc_samples": bool(cfg.get("ewc"))}
    skip |= {k for k, on in active.items() if not on}
    return {k: v for k, v in cfg.items() if k not in skip}


def resolve_lr(cfg, meta):
    if cfg["lr"] is not None:
        return cfg["lr"], "given with --lr"
    if meta.get("tiny"):
        from tiny_base import TINY_LR
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
    example per backward, in eval mode. Returns float32 tensors in model.parameters() order."""
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    device = torch.device(device)
    for ex in examples:
        b = {k: v.to(device) for k, v in collate([encode_example(tok, ex, max_length)], tok.pad_token_id,
                                                 "left").items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, labels = answer_logits(model, b)
        s, _ = answer_loss_sum(logits, labels)
        for f, g in zip(fisher, torch.autograd.grad(s, params)):
            f.add_(g.float().square())
    for f in fisher:
        f.div_(len(examples))
    model.train(was_training)
    return fisher


class AnchorPenalty:
    """l2/2 * ||theta - theta_0||^2 + ewc/2 * sum_i F_i (theta_i - theta_0,i)^2, theta_0 the weights when
    it is built. Calling it adds the penalty's gradient, (l2 + ewc * F) * (theta - theta_0), to every
    parameter's .grad and returns (and keeps in .last) the penalty's value."""

    def __init__(self, model, l2=0.0, ewc=0.0, fisher=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        if ewc:
            if fisher is None or len(fisher) != len(self.params):
                raise ValueError("ewc needs one Fisher tensor per trainable parameter")
            self.weight = [l2 + ewc * f.to(p.dtype) for p, f in zip(self.params, fisher)]
        else:
            self.weight = [float(l2)] * len(self.params)
        self.last = None

    @torch.no_grad()
    def value(self):
        return float(sum(0.5 * (w * (p.detach() - a).square()).double().sum()
                         for p, a, w in zip(self.params, self.anchor, self.weight)))

    @torch.no_grad()
    def __call__(self):
        total = torch.zeros((), dtype=torch.float64)
        for p, a, w in zip(self.params, self.anchor, self.weight):
            d = p.detach() - a
            g = w * d
            total += 0.5 * float((g * d).double().sum())
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g)
        self.last = float(total)
        return self.last


def shard_model(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def full_state_dict(model, sharded):
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg["bf16"]):
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
    "ewc": NON_NEGATIVE, "ewc_samples": AT_LEAST_1, "eval_limit": AT_LEAST_1, "eval_val_limit": AT_LEAST_1}


def check_options(cfg, world):
    check_args(cfg, NUMERIC_RULES)
    if cfg["replay_fraction"] and cfg["replay_task"] not in TASKS:
        raise UserError(f"--replay_fraction needs --replay_task (one of {', '.join(TASKS)}), got "
                        f"{cfg['replay_task']!r}")
    if cfg["ewc"] and cfg["ewc_task"] not in TASKS:
        raise UserError(f"--ewc needs --ewc_task (one of {', '.join(TASKS)}), got {cfg['ewc_task']!r}")
    if world > 1 and (cfg["l2_to_init"] or cfg["ewc"]):
        raise UserError("--l2_to_init and --ewc run in one process only (the anchored penalty is not implemented "
                        "for FSDP-sharded weights); run finetune.py without torchrun, or use --replay_task")
    for tasks_key, limit_key in (("eval_tasks", "eval_limit"), ("eval_val_tasks", "eval_val_limit")):
        evaluated = parse_tasks(cfg[tasks_key], f"--{tasks_key}")  # checked before training, not after it
        if cfg[limit_key] is not None and not evaluated:
            raise UserError(f"--{limit_key} {cfg[limit_key]} needs --{tasks_key}")
        bad = [t for t in evaluated if t in GENERATIVE_TASKS]
        if bad:
            raise UserError(f"--{tasks_key}: {', '.join(bad)} is generative; its evaluation is not implemented yet")
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


def load_stage_inputs(cfg):
    """-> (the starting model, StageInputs)."""
    model_path = resolve_model_path(cfg["model"])
    meta = read_meta(model_path)
    lr, lr_note = resolve_lr(cfg, meta)
    model, tok = load_model_and_tokenizer(model_path)
    data = load_task(cfg["task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"])
    if cfg["train_fraction"] is not None:
        data = fraction_subset(data, cfg["train_fraction"], cfg["seed"])
    inputs = StageInputs(tok, meta, lr, lr_note, data, [encode_example(tok, ex, cfg["max_length"])
                                                        for ex in data.examples])
    if cfg["replay_fraction"]:  # A's training set is loaded like the main one (data_dir, train_size, seed)
        inputs.replay_data = load_task(cfg["replay_task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"])
        inputs.replay_encoded = [encode_example(tok, ex, cfg["max_length"]) for ex in inputs.replay_data.examples]
    return model, inputs


def prepare_model(model, cfg, device, sharded):
    model.to(device)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if sharded:
        shard_model(model)


def build_penalty(model, tok, cfg, device):
    """--l2_to_init / --ewc: (the AnchorPenalty at the starting weights, the Fisher's record for run.json);
    (None, None) when both are off, a None record without --ewc."""
    if not (cfg["l2_to_init"] or cfg["ewc"]):
        return None, None
    fisher, fisher_info = None, None
    if cfg["ewc"]:
        started = time.time()
        pool = load_task(cfg["ewc_task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"])
        samples = seeded_samples(pool.examples, cfg["ewc_samples"], cfg["seed"], "ewc")
        fisher = estimate_fisher(model, tok, samples, cfg["max_length"], device, cfg["bf16"])
        fisher_info = {"task": cfg["ewc_task"], "n_samples": len(samples), "source": pool.source,
                       "sample_ids_sha256": ids_sha256(ex.id for ex in samples),
                       "fisher_sum": float(sum(f.double().sum() for f in fisher)),
                       "fisher_max": float(max(f.max() for f in fisher)), "seconds": round(time.time() - started, 2)}
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
    run_id = hashlib.sha256(json.dumps(id_fields, sort_keys=True).encode()).hexdigest()[:16]
    chain = list(meta.get("chain", [])) + [cfg["task"]]
    record = {"run_id": run_id, "parent_run_id": parent_id, "chain": chain, "stage": len(chain), "task": cfg["task"],
              "lr": inputs.lr, "lr_note": inputs.lr_note, "seed": cfg["seed"], "steps": cfg["steps"], "config": cfg,
              "base_model": meta.get("base_model") or ("tiny" if meta.get("tiny") else cfg["model"]),
              "tiny": bool(meta.get("tiny")), "world_size": world,
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


def save_stage(folder, model, state, tok, record, log):
    """The checkpoint (safetensors + tokenizer), its lineage file, train_log.jsonl and run.json."""
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tok.save_pretrained(folder)
    write_meta(folder, {"run_id": record["run_id"], "chain": record["chain"], "base_model": record["base_model"],
                        "tiny": record["tiny"], "task": record["task"], "data_source": record["data"]["source"]})
    write_jsonl_atomic(os.path.join(folder, "train_log.jsonl"), log)
    write_json_atomic(os.path.join(folder, "run.json"), record)


def leave_process_group(own_group):
    """Under torchrun the other processes wait for process 0's checkpoint only, never for its evaluation."""
    dist.barrier()
    if own_group:
        dist.destroy_process_group()


def train_stage(cfg):
    """Run one fine-tuning stage described by cfg (see default_config()); returns the run record."""
    cfg = {**default_config(), **cfg}
    rank, world = torchrun_rank_world()
    sharded = under_torchrun()
    micro = check_stage(cfg, world)
    shown_out = cfg.get("out_name") or cfg["out"]  # a caller that trains into a temporary folder names the final one
    device = check_device(cfg["device"])
    own_group = False
    if sharded:
        device, own_group = setup_process_group(device)
    seed_everything(cfg["seed"])
    started = time.time()

    model, inputs = load_stage_inputs(cfg)
    if rank == 0:
        print(f"finetune: {cfg['task']} [{inputs.data.source}] {len(inputs.encoded)} examples, model {cfg['model']}, "
              f"lr {inputs.lr:g} ({inputs.lr_note}), {cfg['steps']} steps x batch {cfg['batch_size']}, {world} "
              f"process(es) -> {shown_out}", flush=True)
    prepare_model(model, cfg, device, sharded)
    opt, sched = make_optimizer(model, inputs.lr, cfg)
    penalty, fisher_info = build_penalty(model, inputs.tok, cfg, device)
    order, items = make_batch_order(inputs, cfg)
    log, losses = train_loop(model, opt, sched, items, order, inputs, cfg, rank, world, micro, device, penalty)
    state = full_state_dict(model, sharded)
    record = run_record(cfg, inputs, log, losses, penalty, fisher_info, world, started)

    if rank != 0:
        leave_process_group(own_group)
        return record
    with atomic_dir(cfg["out"], overwrite=cfg["overwrite"]) as tmp:
        save_stage(tmp, model, state, inputs.tok, record, log)
        print(f"finetune: done in {record['wall_time_s']:.1f}s, final loss {record['final_loss']:.4f} -> {shown_out}",
              flush=True)
        if sharded:
            leave_process_group(own_group)
        del model, state, opt, penalty
        evaluate_saved(tmp, cfg)  # inside the temporary folder: --out appears with its evaluation or not at all
    return record


def evaluator(flag):
    """evaluate.evaluate_checkpoint, or a UserError naming the missing evaluate.py."""
    try:
        from evaluate import evaluate_checkpoint
    except ImportError as e:
        raise UserError(f"{flag} needs evaluate.py beside finetune.py ({e}); copy it there, or run evaluate.py "
                        f"separately") from None
    return evaluate_checkpoint


def evaluate_saved(folder, cfg):
    """--eval_tasks / --eval_val_tasks: write eval.json / eval_val.json (and their samples) into the saved
    checkpoint folder, exactly as `evaluate.py --model <out> --tasks ... --out <out>/eval.json [--split
    validation] [--limit N]` would (same loading, scorer defaults and subset seed 0); saves that process's
    start-up. Needs evaluate.py beside this file."""
    jobs = [(parse_tasks(cfg["eval_tasks"], "--eval_tasks"), "test", cfg["eval_limit"], "eval.json"),
            (parse_tasks(cfg["eval_val_tasks"], "--eval_val_tasks"), "validation", cfg["eval_val_limit"],
             "eval_val.json")]
    jobs = [j for j in jobs if j[0]]
    if not jobs:
        return
    evaluate_checkpoint = evaluator("--eval_tasks")
    for tasks, split, limit, name in jobs:
        evaluate_checkpoint(folder, tasks, os.path.join(folder, name), data_dir=cfg["data_dir"], split=split,
                            limit=limit, device=cfg["device"], model_name=cfg["out"],
                            out_name=os.path.join(cfg["out"], name))


# -----------------------------------------------------------------------------

def build_parser():
    d = default_config()
    p = argparse.ArgumentParser(description="One supervised fine-tuning stage (the paper's recipe by default).",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=d["model"], help="checkpoint folder, hub id (org/name), or 'tiny' (the embedded "
                   "base)")
    p.add_argument("--task", required=True, choices=TASKS, help="the task to tune on")
    p.add_argument("--out", required=True, help="output folder; refused if it exists, unless --overwrite")
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: the synthetic tasks)")
    p.add_argument("--train_size", type=int, default=d["train_size"],
                   help="training examples: a seeded stratified subsample of the training split (examples, >= 1)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate, > 0 (unset: {PAPER_LR:g}, the paper's; "
                   f"the tiny base: its own, tiny_base.TINY_LR)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimisation steps (>= 1)")
    p.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="global batch over all processes (examples, >= 1)")
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="examples per forward/backward on each process, for gradient accumulation (unset: the "
                        "whole per-process batch)")
    p.add_argument("--max_length", type=int, default=d["max_length"],
                   help="tokens per example (prompt + answer); a longer prompt loses its start")
    p.add_argument("--weight_decay", type=float, default=d["weight_decay"],
                   help="AdamW weight decay (>= 0; norm weights are exempt)")
    p.add_argument("--beta1", type=float, default=d["beta1"], help="AdamW beta1, in [0, 1)")
    p.add_argument("--beta2", type=float, default=d["beta2"], help="AdamW beta2, in [0, 1)")
    p.add_argument("--eps", type=float, default=d["eps"], help="AdamW epsilon (> 0)")
    p.add_argument("--max_grad_norm", type=float, default=d["max_grad_norm"],
                   help="clip the global gradient L2 norm to this (>= 0; 0 turns clipping off)")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the training subsample, the batch order and the examples --train_fraction, "
                        "--replay_task and --ewc_task draw (>= 0)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (off: float32)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, slower")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (unset: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("beyond the paper's recipe (off by default; see README.md)")
    g.add_argument("--train_fraction", type=float, default=None,
                   help="train on a seeded random fraction of the loaded training set, in (0, 1] (unset: all of it)")
    g.add_argument("--replay_task", default=None, choices=TASKS,
                   help="task whose training data is replayed (with --replay_fraction)")
    g.add_argument("--replay_fraction", type=float, default=0.0,
                   help="fraction of every global batch drawn from --replay_task's training set, in [0, 1]")
    g.add_argument("--l2_to_init", type=float, default=0.0, metavar="LAMBDA",
                   help="add LAMBDA/2 ||theta - theta_start||^2 to the loss (>= 0; 0: off)")
    g.add_argument("--ewc", type=float, default=0.0, metavar="LAMBDA",
                   help="add LAMBDA/2 sum F_i (theta_i - theta_start,i)^2, F the diagonal Fisher of --ewc_task "
                        "(>= 0; 0: off)")
    g.add_argument("--ewc_task", default=None, choices=TASKS,
                   help="task whose samples estimate the Fisher (with --ewc)")
    g.add_argument("--ewc_samples", type=int, default=d["ewc_samples"],
                   help="training examples of --ewc_task for the Fisher estimate (>= 1)")
    e = p.add_argument_group("evaluation of the saved model, as evaluate.py would do it (saves a process start)")
    e.add_argument("--eval_tasks", default=None,
                   help="comma-separated tasks: write <out>/eval.json on the test split (unset: no evaluation)")
    e.add_argument("--eval_limit", type=int, default=None,
                   help="score a stratified test subset of this many examples a task, >= 1 (evaluate.py --limit; "
                        "unset: the whole split)")
    e.add_argument("--eval_val_tasks", default=None, help="comma-separated tasks: write <out>/eval_val.json on the "
                   "validation split (unset: none)")
    e.add_argument("--eval_val_limit", type=int, default=None,
                   help="stratified validation subset, examples a task, >= 1 (unset: the whole split)")
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    if args.task in GENERATIVE_TASKS:
        print(f"note: {args.task} is generative; it trains here, its evaluation comes with the full study")
    die_on_user_error(lambda: train_stage(vars(args)))
