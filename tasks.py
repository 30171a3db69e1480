"""The six tasks of the study: loaders for the original files, seeded splits and stratified
subsampling, and one entry point, `load_task`, for them and their embedded synthetic stand-ins.

    python tasks.py                                   # sizes and one prompt of every synthetic task
    python tasks.py --data_dir ../shared/data --task toxigen --split test --show 2
    python tasks.py --data_dir ../shared/data --task bbq --split train --counts   # counts per stratum (JSON)

    from tasks import load_task
    data = load_task("arc", split="train")             # synthetic ARC stand-in, 2261 examples
    data = load_task("toxigen", split="test", data_dir="../shared/data")
    data = load_task("toxigen", "test", "../shared/data", test_set="rest")   # the paper's reading (README)
    ex = data.examples[0]; ex.prompt, ex.options, ex.label, ex.group

Needs common.py and synthetic.py beside it. Every prompt ends with "Answer:"; the options are the
answer sentences ("The best answer is A.") and `Example.continuation(i)` puts the boundary space on
the continuation, as lm-evaluation-harness does. The record type and the paper's templates are in
synthetic.py (re-exported here: tasks.Example, tasks.arc_example, ...). Without a data_dir the tasks
are synthetic (generated deterministically from the word lists in synthetic.py); with one, they are
read from the original release files laid out like ../shared/data.
"""
import argparse
import collections
import json

from chained_tuning.data.tasks import *  # noqa: F401,F403  (today's names stay importable from tasks)


if __name__ == "__main__":
    from chained_tuning.common import die_on_user_error
    p = argparse.ArgumentParser(description="Show the tasks: sizes, sources, example prompts.")
    p.add_argument("--task", default=None, help=f"one of {TASKS} (default: all)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (default: synthetic)")
    p.add_argument("--train_size", type=int, default=PAPER_TRAIN_SIZE)
    p.add_argument("--seed", type=int, default=0)
    add_data_options(p)
    p.add_argument("--show", type=int, default=1, help="examples to print per task")
    p.add_argument("--counts", action="store_true", help="print the split's size and counts per stratum as JSON")
    args = p.parse_args()

    def main():
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
    die_on_user_error(main)
