"""The mitigations of forgetting a stage can train with, each one object with the hooks the training loop calls:
replay mixing (--replay_task, --replay_fraction: part of every batch drawn from an earlier task's training set) and
the anchor penalty (--l2_to_init, L2 to the stage's starting weights; --ewc, EWC with a diagonal Fisher of
--ewc_task). The loop knows only the hooks of Mitigation; MITIGATIONS lists the classes, in the order their
records enter run.json.

    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/mix \\
        --replay_task toxigen --replay_fraction 0.05
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/ewc --ewc 100 --ewc_task toxigen

Adding one: a Mitigation subclass with `on(cfg)` and the hooks it needs, its options in stage_config.py (defaults,
rules, when they enter the run_id) and finetune.py's parser, and its class in MITIGATIONS (docs/finetune.md).
"""
import math
import time

import numpy as np
import torch

from . import distributed
from .common import UserError, exact, ids_sha256, round_half_up, seeded_rng, seeded_samples
from .data.tasks import TASKS, data_options, load_task
from .loss import answer_logits, answer_loss_sum, collate, encode_example


class Mitigation:
    """One mitigation as the training loop sees it; every hook does nothing here. The loop calls, in order:
    load (before the model loads: extra training items), start (after the optimiser is made), batch_order (once),
    penalty (every step, after the backward passes, before clipping), step_log (every step's log line), id_fields
    and record (run.json)."""

    last_penalty = None  # the value of this step's penalty; None: the mitigation adds none

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def on(cfg):
        """Whether cfg asks for this mitigation."""
        return False

    @staticmethod
    def check(cfg):
        """Refuse settings this mitigation cannot use (a UserError), before anything is loaded."""

    def load(self, tok, first):
        """-> training items to add to the stage's own; `first` is the index the first of them will have."""
        return []

    def start(self, model, tok, device):
        """The model as the stage starts (its optimiser made): set up what the mitigation needs of it."""

    def batch_order(self, n_main):
        """Every global batch as indices into the training items (None: the stage's own order)."""
        return None

    def penalty(self):
        """Add the penalty's gradient to every parameter's .grad and keep its value in .last_penalty."""

    def step_log(self, batch):
        """-> fields of one step's train_log.jsonl line (after the loss, lr, tokens, norm and penalty)."""
        return {}

    def id_fields(self):
        """-> what the run_id hashes besides the settings (e.g. the hash of the data it reads)."""
        return {}

    def record(self, log):
        """-> run.json's entries for this mitigation."""
        return {}


# -----------------------------------------------------------------------------
# Replay mixing


def _epoch_stream(n, need, rng):
    """`need` indices: seeded epochs of shuffled range(n), concatenated (batch_order's stream)."""
    if need <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]


def replay_counts(steps, batch_size, fraction):
    """Replayed examples in each global batch: the cumulative count after s batches is
    floor(F * batch_size * s + 1/2), so each batch has floor or ceil of F * batch_size."""
    f = exact(fraction) * batch_size
    return [round_half_up(f * (s + 1)) - round_half_up(f * s) for s in range(steps)]


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


class ReplayMixing(Mitigation):
    """--replay_fraction of every global batch drawn from --replay_task's training set, loaded as the stage's own
    (data_dir, train_size, seed)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.data, self.encoded, self.first = None, [], None  # (load fills them in)

    @staticmethod
    def on(cfg):
        return bool(cfg["replay_fraction"])

    @staticmethod
    def check(cfg):
        if cfg["replay_fraction"] and cfg["replay_task"] not in TASKS:
            raise UserError(f"--replay_fraction needs --replay_task (one of {', '.join(TASKS)}), got "
                            f"{cfg['replay_task']!r}")

    def load(self, tok, first):
        cfg = self.cfg
        self.first = first
        self.data = load_task(cfg["replay_task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"],
                              **data_options(cfg))
        self.encoded = [encode_example(tok, ex, cfg["max_length"]) for ex in self.data.examples]
        return self.encoded

    def batch_order(self, n_main):
        cfg = self.cfg
        return mixed_batch_order(n_main, len(self.encoded), cfg["steps"], cfg["batch_size"], cfg["replay_fraction"],
                                 cfg["seed"])

    def step_log(self, batch):
        return {"replayed": sum(i >= self.first for i in batch)}

    def id_fields(self):
        return {"replay_data": self.data.info["ids_sha256"]}

    def record(self, log):
        cfg = self.cfg
        return {"replay": {"task": cfg["replay_task"], "fraction": cfg["replay_fraction"],
                           "n_pool": len(self.encoded), "train_info": self.data.info,
                           "examples_replayed": sum(entry["replayed"] for entry in log),
                           "examples_total": cfg["steps"] * cfg["batch_size"]}}


# -----------------------------------------------------------------------------
# L2 to the starting weights and EWC


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


class Regularisation(Mitigation):
    """--l2_to_init and --ewc: one AnchorPenalty at the stage's starting weights (the two weights summed per
    parameter), the Fisher estimated there on --ewc_samples training examples of --ewc_task."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.anchor, self.fisher_info = None, None  # (start fills them in)

    @staticmethod
    def on(cfg):
        return bool(cfg["l2_to_init"] or cfg["ewc"])

    @staticmethod
    def check(cfg):
        if cfg["ewc"] and cfg["ewc_task"] not in TASKS:
            raise UserError(f"--ewc needs --ewc_task (one of {', '.join(TASKS)}), got {cfg['ewc_task']!r}")

    def start(self, model, tok, device):
        cfg = self.cfg
        fisher = None
        if cfg["ewc"]:
            started = time.time()
            pool = load_task(cfg["ewc_task"], "train", cfg["data_dir"], cfg["train_size"], cfg["seed"],
                             **data_options(cfg))
            samples = seeded_samples(pool.examples, cfg["ewc_samples"], cfg["seed"], "ewc")
            fisher = estimate_fisher(model, tok, samples, cfg["max_length"], device, cfg["bf16"])
            self.fisher_info = {
                "task": cfg["ewc_task"], "n_samples": len(samples), "source": pool.source,
                "sample_ids_sha256": ids_sha256(ex.id for ex in samples),
                "fisher_sum": distributed.all_reduce_sum(sum(float(f.double().sum()) for f in fisher)),
                "fisher_max": distributed.all_reduce_max(max(float(f.max()) for f in fisher)),
                "seconds": round(time.time() - started, 2)}  # (sums and maxima over every process's shards)
        self.anchor = AnchorPenalty(model, cfg["l2_to_init"], cfg["ewc"], fisher)

    def penalty(self):
        self.last_penalty = self.anchor()

    def record(self, log):
        cfg = self.cfg
        return {"regularisation": {"l2_to_init": cfg["l2_to_init"], "ewc": cfg["ewc"], "fisher": self.fisher_info,
                                   "final_penalty": self.anchor.last}}


# The order of their records in run.json (and of their checks).
MITIGATIONS = (ReplayMixing, Regularisation)


def check_mitigations(cfg):
    for kind in MITIGATIONS:
        kind.check(cfg)


def build_mitigations(cfg):
    """The mitigations cfg asks for, in MITIGATIONS' order."""
    return [kind(cfg) for kind in MITIGATIONS if kind.on(cfg)]


def start_mitigations(mitigations, model, tok, device):
    """Every mitigation's start hook, on the model as the stage starts."""
    for mitigation in mitigations:
        mitigation.start(model, tok, device)
