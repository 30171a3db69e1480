"""The training loop of a stage: the batch order, AdamW with linear decay, one optimisation step (gradient
accumulation over micro-batches, the processes' slices under torchrun, clipping), and the loop over the steps that
writes train_log.jsonl's lines. Mitigations (mitigations.py) enter only through their hooks.

    from chained_tuning.train_loop import batch_order, make_optimizer, optimisation_step
    opt, sched = make_optimizer(model, 1e-3, cfg)
    loss, answer_tokens, grad_norm = optimisation_step(model, opt, sched, encoded, [0, 1, 2, 3], pad_id, cfg)
"""
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from .common import UserError, progress, seeded_rng
from .loss import answer_logits, answer_loss_sum, answer_tokens, collate


def batch_order(n_examples, steps, batch_size, seed):
    """Indices of every global batch: seeded epochs of shuffled examples, concatenated."""
    rng = seeded_rng(seed, "batch_order")
    need = steps * batch_size
    idx = np.concatenate([rng.permutation(n_examples) for _ in range(math.ceil(need / n_examples))])
    return idx[:need].reshape(steps, batch_size).tolist()


def stage_batch_order(n_main, mitigations, cfg):
    """Every global batch of the stage: a mitigation's order (replay mixing's), else batch_order's."""
    orders = [order for m in mitigations if (order := m.batch_order(n_main)) is not None]
    if len(orders) > 1:
        raise ValueError("two mitigations each ordered the batches; one order must decide")
    return orders[0] if orders else batch_order(n_main, cfg["steps"], cfg["batch_size"], cfg["seed"])


def make_optimizer(model, lr, cfg):
    """AdamW with the recipe's betas and weight decay (not on norm weights), linear decay to zero."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA stage: its adapter's alone
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg["steps"])
    return opt, sched


def optimisation_step(model, opt, sched, encoded, gbatch, pad_id, cfg, rank=0, world=1, micro=None, device="cpu",
                      mitigations=()):
    """One optimisation step on the global batch `gbatch` (indices into `encoded`); this process
    takes its slice. Returns (global loss, answer tokens in the global batch, gradient norm).
    The loss is the answer tokens' NLL summed over the whole global batch over their number, so neither
    gradient accumulation nor the number of processes changes it.
    Each mitigation's penalty hook runs once after the backward passes, before clipping (so clipping sees the
    gradient of loss + penalty); it adds its gradient to .grad (its value is not part of the returned loss)."""
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
    for mitigation in mitigations:
        mitigation.penalty()
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


def train_loop(model, opt, sched, order, inputs, cfg, rank, world, micro, device, mitigations):
    """Every optimisation step; returns (train_log.jsonl's lines, the losses)."""
    log, losses = [], []
    model.train()
    bar = progress(range(cfg["steps"]), f"finetune {cfg['task']}", disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        started = time.time()
        step_lr = sched.get_last_lr()[0]
        loss, n_tok, grad_norm = optimisation_step(model, opt, sched, inputs.items, order[step],
                                                   inputs.tok.pad_token_id, cfg, rank, world, micro, device,
                                                   mitigations)
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {step + 1} (lr {inputs.lr:g}); lower --lr"
                            + (" or train without --bf16" if cfg["bf16"] else ""))
        losses.append(loss)
        entry = {"step": step + 1, "loss": loss, "lr": step_lr, "answer_tokens": n_tok, "grad_norm": grad_norm,
                 "seconds": round(time.time() - started, 4)}
        penalties = [m.last_penalty for m in mitigations if m.last_penalty is not None]
        if penalties:  # the objective's second term: what the mitigations added to the loss
            entry["penalty"] = penalties[0] if len(penalties) == 1 else sum(penalties)
        for m in mitigations:
            entry.update(m.step_log(order[step]))
        log.append(entry)
        bar.set_postfix(loss=f"{loss:.4f}")
    return log, losses
