"""One supervised fine-tuning stage: a causal LM tuned on one task's answers, the paper's recipe by default.
A chain is --model pointing at the previous stage's output.

    python finetune.py --model tiny --task toxigen --out runs/demo/toxigen --eval_tasks toxigen     # theta_A
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/toxigen-arc            # theta_AB
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/mix \\
        --replay_task toxigen --replay_fraction 0.05
    python finetune.py --model runs/demo/toxigen --task arc --out runs/demo/ewc --ewc 100 --ewc_task toxigen
    python finetune.py --model tiny --task toxigen --out runs/lora/toxigen --lora_r 8          # a LoRA adapter
    python finetune.py --model runs/lora/toxigen --task arc --out runs/lora/toxigen-arc --lora_r 8 --lora_chain merge
    torchrun --nproc_per_node=8 finetune.py --model /models/Llama-2-7b-hf --task arc --out runs/arc --bf16 \\
        --data_dir DIR --eval_tasks arc          # FSDP2, bf16 compute, bf16 checkpoint, evaluated on all 8 GPUs

Needs this file and the package folder chained_tuning/ beside it. The recipe, the options beyond it and what
--out holds: docs/finetune.md. The stage itself: chained_tuning/training.py (train_stage takes a dict of these
flags, chained_tuning/stage_config.py's keys).
"""
import argparse

from chained_tuning.common import HelpFormatter, die_on_user_error
from chained_tuning.data.tasks import TASKS, add_data_options
from chained_tuning.lora import CHAIN_MODES as LORA_CHAIN_MODES
from chained_tuning.stage_config import CHECKPOINTING, EVAL_DEFAULTS, PAPER_LR, SAVE_DTYPE_NAMES, default_config
from chained_tuning.training import train_stage

# Re-exported: what users and tests import from finetune.
from chained_tuning.common import exact  # noqa: F401
from chained_tuning.loss import answer_logits, answer_loss_sum, collate, encode_example  # noqa: F401
from chained_tuning.mitigations import (AnchorPenalty, estimate_fisher, mixed_batch_order,  # noqa: F401
                                        replay_counts)
from chained_tuning.stage_config import NUMERIC_RULES, config_for_id, resolve_lr  # noqa: F401
from chained_tuning.train_loop import batch_order, make_optimizer, optimisation_step  # noqa: F401
from chained_tuning.training import check_options, fraction_subset, resolve_save_dtype  # noqa: F401


def build_parser():
    d = default_config()
    p = argparse.ArgumentParser(description="One supervised fine-tuning stage (the paper's recipe by default). "
                                "The manual: docs/finetune.md.", formatter_class=HelpFormatter)
    p.add_argument("--model", default=d["model"], help="checkpoint folder, hub id (org/name), or 'tiny' (the embedded "
                   "base)")
    p.add_argument("--task", required=True, choices=TASKS, help="the task to tune on")
    p.add_argument("--out", required=True, help="output folder; refused if it exists, unless --overwrite")
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: the synthetic tasks)")
    add_data_options(p)
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
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute: under torchrun FSDP2's mixed precision "
                   "(bf16 weights in the forward, fp32 master weights, optimiser state and gradient reduction); in "
                   "one process autocast (off: float32)")
    p.add_argument("--gradient_checkpointing", nargs="?", const="on", default=d["gradient_checkpointing"],
                   choices=CHECKPOINTING, help="recompute activations in the backward pass (less memory, slower); "
                   "auto: on when the longest micro-batch would not fit in the GPU's free memory, off on the CPU")
    p.add_argument("--save_dtype", default=d["save_dtype"], choices=["auto", *SAVE_DTYPE_NAMES],
                   help="dtype of the saved weights; auto: --model's own (config.json: bfloat16 for Llama-2-7b-hf, "
                        "float32 for the tiny base)")
    p.add_argument("--dist_timeout_min", type=float, default=d["dist_timeout_min"],
                   help="under torchrun: minutes a process waits for the others (process 0 writing a 13 GB "
                        "checkpoint) before the process group gives up (> 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (unset: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_mitigation_options(p.add_argument_group("beyond the paper's recipe (off by default; see docs/finetune.md)"), d)
    add_lora_options(p.add_argument_group("LoRA through PEFT (off by default: full fine-tuning; see docs/finetune.md)"),
                     d)
    add_eval_options(p.add_argument_group("evaluation of the saved model, as evaluate.py would do it (saves a "
                                          "process start)"))
    return p


def add_mitigation_options(g, d):
    """--train_fraction and the mitigations' options (mitigations.py)."""
    g.add_argument("--train_fraction", type=float, default=None,
                   help="train on a seeded random fraction of the loaded training set, in (0, 1] (unset: all of it)")
    g.add_argument("--replay_task", default=None, choices=TASKS,
                   help="task whose training data is replayed (with --replay_fraction)")
    g.add_argument("--replay_fraction", type=float, default=d["replay_fraction"],
                   help="fraction of every global batch drawn from --replay_task's training set, in [0, 1]")
    g.add_argument("--l2_to_init", type=float, default=d["l2_to_init"], metavar="LAMBDA",
                   help="add LAMBDA/2 ||theta - theta_start||^2 to the loss (>= 0; 0: off)")
    g.add_argument("--ewc", type=float, default=d["ewc"], metavar="LAMBDA",
                   help="add LAMBDA/2 sum F_i (theta_i - theta_start,i)^2, F the diagonal Fisher of --ewc_task "
                        "(>= 0; 0: off)")
    g.add_argument("--ewc_task", default=None, choices=TASKS,
                   help="task whose samples estimate the Fisher (with --ewc)")
    g.add_argument("--ewc_samples", type=int, default=d["ewc_samples"],
                   help="training examples of --ewc_task for the Fisher estimate (>= 1)")


def add_lora_options(g, d):
    """--lora_r ...: a LoRA stage (chained_tuning/lora.py), and how a stage starts from a LoRA stage before it."""
    g.add_argument("--lora_r", type=int, default=d["lora_r"],
                   help="train a fresh LoRA adapter of this rank (>= 1) on frozen weights; --out then holds the "
                        "adapter (unset: full fine-tuning)")
    g.add_argument("--lora_alpha", type=float, default=d["lora_alpha"],
                   help="LoRA scaling alpha (> 0; the update is alpha/r * BA; unset: PEFT's default, 8)")
    g.add_argument("--lora_dropout", type=float, default=d["lora_dropout"],
                   help="dropout on the adapter's input, in [0, 1)")
    g.add_argument("--lora_targets", default=d["lora_targets"],
                   help="comma-separated linear modules to adapt, e.g. q_proj,v_proj (unset: every linear layer "
                        "but the output head: the attention and MLP projections)")
    g.add_argument("--lora_chain", default=d["lora_chain"], choices=LORA_CHAIN_MODES,
                   help="--model is a LoRA stage's adapter folder: merge it into the weights and train a fresh "
                        "adapter (merge), or train the same adapter on (continue)")
    g.add_argument("--lora_base_4bit", action="store_true", default=d["lora_base_4bit"],
                   help="QLoRA: the frozen base quantised to 4-bit NF4 (double quantisation, bf16 compute) by "
                        "bitsandbytes; one process on a CUDA GPU, bitsandbytes installed")


def add_eval_options(e):
    """--eval_tasks ...: evaluate.py's work on the saved checkpoint, in this process."""
    e.add_argument("--eval_tasks", default=None,
                   help="comma-separated tasks: write <out>/eval.json on the test split (unset: no evaluation)")
    e.add_argument("--eval_limit", type=int, default=None,
                   help="score a stratified test subset of this many examples a task, >= 1 (evaluate.py --limit; "
                        "unset: the whole split)")
    e.add_argument("--eval_val_tasks", default=None, help="comma-separated tasks: write <out>/eval_val.json on the "
                   "validation split (unset: none)")
    e.add_argument("--eval_val_limit", type=int, default=None,
                   help="stratified validation subset, examples a task, >= 1 (unset: the whole split)")
    e.add_argument("--classifier", default=None, help="evaluate.py --classifier: the judge of SaFeRDialogues replies "
                   "(unset: the tiny judge for the synthetic tasks, else tomh/toxigen_roberta)")
    e.add_argument("--max_new_tokens", type=int, default=EVAL_DEFAULTS["max_new_tokens"],
                   help="evaluate.py --max_new_tokens: longest SaFeRDialogues reply (>= 1)")


if __name__ == "__main__":
    args = build_parser().parse_args()
    die_on_user_error(lambda: train_stage(vars(args)))
