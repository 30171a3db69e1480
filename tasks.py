"""Look at the six tasks of the study: sizes, example prompts, counts per stratum, on the synthetic stand-ins or the
original release files.

    python tasks.py                                   # sizes and one prompt of every synthetic task
    python tasks.py --task bbq --show 2               # two prompts of one task
    python tasks.py --data_dir ../shared/data --task toxigen --split test --show 2
    python tasks.py --data_dir ../shared/data --task bbq --split train --counts   # counts per stratum (JSON)
    python tasks.py --fetch data [--tasks arc,csqa] [--mirror URL_OR_DIR]   # the datasets, from their releases
    python tasks.py --check data                      # per task: present/missing, rows, sha256, what the study uses

    from tasks import load_task
    data = load_task("arc", split="train")             # synthetic ARC stand-in, 2261 examples
    data = load_task("toxigen", "test", "../shared/data", test_set="rest")   # the paper's reading

Needs the package chained_tuning/ (chained_tuning/data/: a module per task, registered in registry.py, and
tasks.py, the library this script re-exports; chained_tuning/common.py) and, for --data_dir, a folder laid out like
../shared/data. Docs: docs/data.md (the layout, the splits, the options); docs/adding.md (a new task).
"""
import argparse
import collections
import json
import sys

from chained_tuning.common import die_on_user_error
from chained_tuning.data import fetch
# Every name `from tasks import ...` has given: the library's names (chained_tuning.data.tasks.__all__).
from chained_tuning.data.tasks import (  # noqa: F401
    ARC_CHOICES, BBQ_VALIDATION_GLOB, BBQ_VALIDATION_RULE, CAPABILITY_TASKS, CELL_RULES, CSQA2_INSTRUCTION,
    CSQA2_OPTIONS, DATA_DEFAULTS, DEFAULT_STRATA, GENERATIVE_TASKS, HOLDOUT_FRACTION, LETTERS, LOADERS, NUMBER_WORDS,
    PAPER_TRAIN_SIZE, SAFETY_TASKS, SD_FILES, SD_INSTRUCTION, SPLITS, TASK_MODULES, TASKS, TEST_SETS,
    TOXIGEN_INSTRUCTION, TOXIGEN_OPTIONS, UNSPLIT_FRACTIONS, Example, TaskData, UserError, add_data_options,
    arc_example, bbq_example, bbq_human_validated, csqa2_example, csqa_example, data_options, default_cells,
    encode_pair, ids_sha256, load_arc, load_bbq, load_csqa, load_csqa2, load_saferdialogues, load_task, load_toxigen,
    mc_instruction, mc_options, mc_prompt, parse_tasks, plain_prompt, register, sd_example, seeded_rng,
    stratified_sample, stratified_split, stratum_counts, synthetic_task, toxigen_example)


def main(args):
    counts = {}
    for t in [args.task] if args.task else TASKS:
        d = load_task(t, args.split, args.data_dir, args.train_size, args.seed, arc_choices=args.arc_choices,
                      test_set=args.test_set, cells=args.cells)
        if args.counts:
            counts[t] = {"split": args.split, "n": len(d.examples),
                         "strata": d.info.get("strata", DEFAULT_STRATA),
                         "counts": stratum_counts(d.examples, d.info.get("strata")),
                         "info": {k: v for k, v in d.info.items() if k != "files"}}
            continue
        groups = collections.Counter(ex.group for ex in d.examples)
        print(f"== {t} [{d.source}] {args.split}: {len(d.examples)} examples, "
              f"{len(d.examples[0].options)} options, {len([g for g in groups if g])} groups")
        for ex in d.examples[:args.show]:
            print(ex.prompt + ex.continuation(ex.label) + f"   [group={ex.group}]\n")
    if args.counts:
        print(json.dumps(counts[args.task] if args.task else counts, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Show the tasks: sizes, sources, example prompts; fetch and check the "
                                "datasets.", epilog="The manual: docs/data.md (adding a task: docs/adding.md).")
    p.add_argument("--task", default=None, help=f"one of {TASKS} (default: all)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (default: synthetic)")
    p.add_argument("--train_size", type=int, default=PAPER_TRAIN_SIZE)
    p.add_argument("--seed", type=int, default=0)
    add_data_options(p)
    p.add_argument("--show", type=int, default=1, help="examples to print per task")
    p.add_argument("--counts", action="store_true", help="print the split's size and counts per stratum as JSON")
    fetch.add_fetch_options(p)  # --fetch/--check: the datasets from their original releases, verified
    args = p.parse_args()
    if any(getattr(args, k) for k in ("fetch", "check", "tasks", "mirror", "offline", "bbq_intersectional", "no_hub")):
        sys.exit(die_on_user_error(lambda: fetch.run(args, loaders=LOADERS)))
    die_on_user_error(lambda: main(args))
