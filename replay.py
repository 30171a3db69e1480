"""Replay as a third stage (the paper's section 5, appendix 9.4): from theta_AB, tune again on the first task A
with a fraction of its training data (or for a number of steps), and evaluate A (does it recover?) and B (what
does it lose?) after every point; each point is a train_stage call and an evaluate_checkpoint
(chained_tuning/training.py, evaluation.py).

    python replay.py --model runs/demo/toxigen-arc --task toxigen --out runs/demo/replay \\
        --fractions 0,0.01,0.05,0.1,0.2,0.4,0.6,0.8,1 --steps 100 --first_stage runs/demo/toxigen --eval_limit 300
    python replay.py --model runs/demo/toxigen-arc --task toxigen --out runs/demo/replay --steps_sweep 0,5,10,20,40
    torchrun --nproc_per_node=8 replay.py --model runs/arc-toxigen --task arc --out runs/replay --fractions 0,0.05 \\
        --bf16 --batch_size 128 --micro_batch_size 16 --data_dir DIR     # FSDP2 training, evaluation on all GPUs

--fractions are fractions of A's training set in [0, 1] (0: --model itself, untrained); --out is resumed
(points made with the same settings are kept). Needs this file and the package folder chained_tuning/ beside it
(the sweep's parts: chained_tuning/replay_sweep.py). What --out holds: docs/replay.md.
"""
import argparse
import datetime
import os
import sys
import time

import torch.distributed as dist

from chained_tuning.common import (HelpFormatter, UserError, check_device, die_on_user_error, end_process_group,
                                   setup_process_group, torchrun_rank_world)
from chained_tuning.data.tasks import add_data_options
from chained_tuning.evaluation import DEFAULTS as EVAL_DEFAULTS
from chained_tuning.evaluation import SCORERS
from chained_tuning.replay_sweep import (barrier, check_inputs, check_sweep_args, load_first_stage, points_to_make,
                                         print_summary, read_model, run_point, sweep_settings, write_summary)
from chained_tuning.lora import CHAIN_MODES as LORA_CHAIN_MODES
from chained_tuning.stage_config import default_config

# Re-exported: what users and tests import from replay.
from chained_tuning.replay_sweep import FIRST_EVAL, NUMERIC_RULES, POINT, SUMMARY  # noqa: F401


def main(args):
    t0 = time.time()
    rank, world = torchrun_rank_world()
    finished = False
    try:
        out = sweep(args, t0, rank, world)
        finished = True
        return out
    finally:
        end_process_group(world > 1 and dist.is_initialized(), finished)


def sweep(args, t0, rank, world):
    """The sweep, top to bottom: checks, theta_AB and its chain, the shared settings, theta_A's reference, the
    points to make (process 0 writes each; under torchrun every process trains and evaluates), the summary."""
    master = rank == 0
    check_sweep_args(args)
    device = check_device(args.device)
    model_dir, meta, run = read_model(args.model)
    task_b = check_inputs(args, meta)
    task_a = args.task
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder")
    settings = sweep_settings(args, model_dir, meta, task_b)
    if world > 1:
        # one process group for the whole sweep (train_stage and the evaluations use it), with a long timeout
        # since the other processes wait while process 0 writes a checkpoint
        setup_process_group(device, timeout=datetime.timedelta(hours=4))
    ref = load_first_stage(args, meta, run, settings, args.out, master)
    os.makedirs(args.out, exist_ok=True)
    plan, done_keys, todo = points_to_make(args, settings, master)
    if master:
        print(f"replay: {' -> '.join(meta['chain'])} + {task_a}: {len(todo)} point(s) to make, "
              f"{len(plan) - len(todo)} done -> {args.out}", flush=True)
    for name, sweep_kind, frac, steps, key in todo:
        run_point(args, model_dir, settings, task_a, task_b, name, sweep_kind, frac, steps, key, done_keys, rank,
                  world)
        done_keys.setdefault(key, name)
        barrier()  # the other processes wait while process 0 writes the point
    if not master:
        return None
    summary = write_summary(args, model_dir, meta, task_a, task_b, settings, ref, time.time() - t0)
    print_summary(summary, task_a, task_b, args.out)
    return summary


def build_parser():
    d = default_config()
    p = argparse.ArgumentParser(description="Replay the first task as a third stage: data-fraction and steps sweeps. "
                                "The manual: docs/replay.md.", formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="theta_AB: the chained checkpoint (or LoRA adapter) folder "
                   "(finetune.py output)")
    p.add_argument("--task", required=True, help="the earlier task to replay (A)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per point + replay_summary.json); an "
                   "existing one is resumed: points made with the same settings are kept")
    p.add_argument("--overwrite", action="store_true", help="remake every point asked for (and theta_A's evaluation) "
                   "even where --out holds it, made with the same or other settings")
    p.add_argument("--fractions", default="", help="fractions of A's training set, in [0, 1], comma-separated, e.g. "
                   "0,0.01,0.05,0.1,0.2,0.4,0.6,0.8,1 (0: no training; unset: no fraction sweep)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimisation steps of every fraction-sweep point "
                   "(>= 1)")
    p.add_argument("--steps_sweep", default="", help="step counts (>= 0) on all of A's training set, comma-separated, "
                   "e.g. 0,5,10,20,40,60,80,100 (unset: no steps sweep)")
    p.add_argument("--first_stage", default=None, help="theta_A's folder, the reference of forgetting_a (its "
                   "eval.json when it scored A with these settings, else an evaluation made here; unset: no "
                   "forgetting)")
    p.add_argument("--first_stage_eval", default=None, help="theta_A's eval.json (instead of --first_stage)")
    p.add_argument("--save_checkpoints", action="store_true", help="keep every point's checkpoint (off: results only)")
    g = p.add_argument_group("passed to finetune.py")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, > 0 (unset: finetune.py's default "
                   "for --model)")
    g.add_argument("--seed", type=int, default=d["seed"], help="finetune.py --seed (>= 0)")
    g.add_argument("--batch_size", type=int, default=d["batch_size"], help="global batch (examples, >= 1)")
    g.add_argument("--micro_batch_size", type=int, default=None,
                   help="examples per forward/backward on each process (unset: the whole per-process batch)")
    g.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: the synthetic tasks)")
    add_data_options(g)
    g.add_argument("--train_size", type=int, default=d["train_size"],
                   help="A's training set: a seeded stratified subsample of its training split (examples, >= 1)")
    g.add_argument("--max_length", type=int, default=d["max_length"], help="tokens per example (>= 1)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 (off: float32)")
    g.add_argument("--lora_chain", default=None, choices=LORA_CHAIN_MODES,
                   help="--model is a LoRA stage's adapter folder: every point trains a fresh adapter of its rank, "
                        "alpha, dropout and targets on its merged weights (merge), or its adapter on (continue) "
                        "(unset: merge for an adapter folder)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (unset: cuda when available, else cpu)")
    g = p.add_argument_group("passed to evaluate.py")
    g.add_argument("--eval_limit", type=int, default=EVAL_DEFAULTS["limit"], help="evaluate.py --limit: a "
                   "stratified test subset of this many examples a task, >= 1 (unset: the whole split)")
    g.add_argument("--eval_seed", type=int, default=EVAL_DEFAULTS["seed"],
                   help="evaluate.py --seed: the --eval_limit subset (>= 0)")
    g.add_argument("--eval_batch_size", type=int, default=EVAL_DEFAULTS["batch_size"],
                   help="evaluate.py --batch_size (examples, >= 1)")
    g.add_argument("--scorer", default=EVAL_DEFAULTS["scorer"], choices=list(SCORERS),
                   help="evaluate.py --scorer")
    g.add_argument("--classifier", default=EVAL_DEFAULTS["classifier"], help="evaluate.py --classifier (the judge "
                   "of SaFeRDialogues replies)")
    g.add_argument("--max_new_tokens", type=int, default=EVAL_DEFAULTS["max_new_tokens"],
                   help="evaluate.py --max_new_tokens (>= 1)")
    return p


if __name__ == "__main__":
    die_on_user_error(lambda: main(build_parser().parse_args()))
    sys.exit(0)
