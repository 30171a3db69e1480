"""CommonsenseQA v1.11 (Talmor et al. 2019): 5-choice common-sense questions; no groups.

Files: DIR/commonsenseqa/train_rand_split.jsonl and dev_rand_split.jsonl (or the hub names train_data.jsonl,
dev_data.jsonl; docs/data.md). The official test split has no answers, so dev is the test set and validation a
seeded 10% of train. Prompt: the paper's CommonsenseQA template (synthetic.csqa_example: no option count, options
listed without periods), options "The best answer is A." ... The stand-in: synthetic.synthetic_task("csqa"),
where-would-you-find questions about the synthetic world's places.
"""
import os

from ..common import UserError
from .readers import first_existing, mc_from_choices, read_jsonl
from .splits import HOLDOUT_FRACTION
from .synthetic import csqa_example, synthetic_task

NAME = "csqa"
KIND = "capability"
GENERATIVE = False


def load(d, **_options):
    base = os.path.join(d, "commonsenseqa")
    train = first_existing([os.path.join(base, "train_rand_split.jsonl"), os.path.join(base, "train_data.jsonl")],
                           "CommonsenseQA train split")
    dev = first_existing([os.path.join(base, "dev_rand_split.jsonl"), os.path.join(base, "dev_data.jsonl")],
                         "CommonsenseQA dev split (the test split has no answers; dev is the test set)")
    out = {"train": [], "test": []}
    for split, p in [("train", train), ("test", dev)]:
        for n, r in read_jsonl(p):
            id_, stem, texts, label = mc_from_choices(r, p, n)
            if len(texts) != 5:
                raise UserError(f"{p}:{n}: CommonsenseQA v1.11 has 5 choices, this row has {len(texts)}; "
                                f"use the 5-choice release (not v1.0)")
            out[split].append(csqa_example(id_, stem, texts, label))
    return out, {"files": [train, dev], "split_method": "official train; official dev as test (test has no "
                 f"labels); validation = seeded {HOLDOUT_FRACTION:.0%} of train, stratified by label"}


load_csqa = load


def synthetic():
    return synthetic_task(NAME)
