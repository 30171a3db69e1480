"""Evaluate a checkpoint on tasks in the restricted output space: the prediction is the option whose answer
sentence has the highest log-likelihood given the prompt.

    python evaluate.py --model runs/demo/toxigen --tasks toxigen,arc --out runs/demo/toxigen/eval.json
    python evaluate.py --model tiny --tasks arc --data_dir ../shared/data --out /tmp/eval.json --limit 500
    python evaluate.py --model runs/demo/toxigen --tasks toxigen --out /tmp/naive.json --scorer naive
    torchrun --nproc_per_node=8 evaluate.py --model runs/arc --tasks arc,bbq --data_dir DIR --out runs/arc/eval.json

Writes --out (accuracies as fractions, overall and per group) and <out stem>_samples.jsonl beside it (every
prompt and option scored). Needs this file and the package folder chained_tuning/ beside it (the scorer alone,
a copy unit: chained_tuning/scorer.py). The formats and the scorers: docs/evaluate.md.
"""
import argparse

import torch.distributed as dist

from chained_tuning.common import HelpFormatter, die_on_user_error, end_process_group
from chained_tuning.data.tasks import SPLITS, TASKS, add_data_options, data_options
from chained_tuning.evaluation import DEFAULTS, DTYPES, SCORERS, evaluate_checkpoint

# Re-exported: what users and tests import from evaluate.
from chained_tuning.evaluation import (NUMERIC_RULES, build_requests, evaluate, evaluate_model,  # noqa: F401
                                       samples_path)
from chained_tuning.scorer import score_kv, score_naive, score_packed, split_shared, summarize  # noqa: F401


def run(args):
    """evaluate.py's work for its parsed command line."""
    finished = False
    try:
        out = evaluate_checkpoint(args.model, args.tasks, args.out, data_dir=args.data_dir, split=args.split,
                                  limit=args.limit, batch_size=args.batch_size, scorer=args.scorer, seed=args.seed,
                                  dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                                  data_opts=data_options(args), classifier=args.classifier,
                                  max_new_tokens=args.max_new_tokens)
        finished = True
        return out
    finally:
        end_process_group(dist.is_initialized(), finished)  # the group evaluate_checkpoint set up under torchrun


def build_parser():
    p = argparse.ArgumentParser(description="Restricted-output-space evaluation with per-group accuracy. The "
                                "manual: docs/evaluate.md.", formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, a LoRA stage's adapter folder (evaluated "
                   "merged into its base), hub id (org/name), or 'tiny'")
    p.add_argument("--tasks", required=True, help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--out", required=True, help="results JSON (accuracies as fractions); the samples JSONL goes "
                   "beside it; refused if it exists, unless --overwrite")
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: the synthetic tasks)")
    p.add_argument("--split", default=DEFAULTS["split"], choices=SPLITS, help="the split scored")
    add_data_options(p)
    p.add_argument("--limit", type=int, default=DEFAULTS["limit"],
                   help="score a stratified subset of this many examples a task, >= 1 (unset: the whole split)")
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="examples a forward pass (>= 1)")
    p.add_argument("--scorer", default=DEFAULTS["scorer"], choices=list(SCORERS),
                   help="fast: shared prefix once, option tails under a tree mask; kv: the prefix's KV cache; "
                        "naive: one forward per option (all give the same predictions)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of --limit's subset (>= 0)")
    g = p.add_argument_group("generative tasks (SaFeRDialogues): a reply generated, then judged")
    g.add_argument("--classifier", default=DEFAULTS["classifier"],
                   help="the toxicity classifier that judges the replies: a folder (classifier.py's) or a hub id "
                        "(unset: the cached tiny judge for the synthetic tasks, else tomh/toxigen_roberta, the paper's)")
    g.add_argument("--max_new_tokens", type=int, default=DEFAULTS["max_new_tokens"],
                   help="longest reply in tokens (>= 1); greedy, stops at EOS or the end of the turn")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and forward: auto is bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (unset: cuda when available, else cpu; "
                   "under torchrun each process takes cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its samples file")
    return p


if __name__ == "__main__":
    die_on_user_error(lambda: run(build_parser().parse_args()))
