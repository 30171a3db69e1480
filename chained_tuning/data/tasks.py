"""The tasks of the study through one entry point, `load_task`: a task's examples and split, from its original
release files or its synthetic stand-in, with the seeded splits and the stratified training sample applied.

    from chained_tuning.data.tasks import load_task      # or, at the root: from tasks import load_task
    data = load_task("arc", split="train")             # synthetic ARC stand-in, 2261 examples
    data = load_task("toxigen", split="test", data_dir="../shared/data")
    data = load_task("toxigen", "test", "../shared/data", test_set="rest")   # the paper's reading (docs/data.md)
    ex = data.examples[0]; ex.prompt, ex.options, ex.label, ex.group

Needs the rest of chained_tuning/data/ (a module per task, registered in registry.py; readers.py and splits.py,
the rules they share; synthetic.py) and chained_tuning/common.py. Docs: docs/data.md, docs/adding.md (a new task).
Every prompt ends with "Answer:"; the options are the answer sentences ("The best answer is A.") and
`Example.continuation(i)` puts the boundary space on the continuation, as lm-evaluation-harness does. The record
type and the paper's templates are in synthetic.py (re-exported here: Example, arc_example, ...). Without a
data_dir the tasks are synthetic (generated deterministically from the word lists in synthetic.py); with one, they
are read from the original release files laid out like ../shared/data. Every name this module has had stays
importable from it (the loaders, the split rules and the registry's lists are re-exported).
"""
import os
from dataclasses import dataclass

from ..common import UserError, ids_sha256
from . import bbq, readers, saferdialogues, splits
from .arc import ARC_CHOICES, load_arc
from .bbq import BBQ_VALIDATION_GLOB, BBQ_VALIDATION_RULE, bbq_human_validated, load_bbq
from .csqa import load_csqa
from .csqa2 import load_csqa2
from .registry import CAPABILITY_TASKS, GENERATIVE_TASKS, LOADERS, SAFETY_TASKS, TASK_MODULES, TASKS, register
from .saferdialogues import SD_FILES, load_saferdialogues
from .splits import (CELL_RULES, DEFAULT_STRATA, HOLDOUT_FRACTION, TEST_SETS, UNSPLIT_FRACTIONS, default_cells,
                     human_validated, sample_train, stratified_sample, stratified_split, stratum_counts)
# The record and the templates are defined with the synthetic tasks (see synthetic.py's docstring for
# why); they are re-exported here, where the loaders have always been found.
from .synthetic import (CSQA2_INSTRUCTION, CSQA2_OPTIONS, LETTERS, NUMBER_WORDS, SD_INSTRUCTION, TOXIGEN_INSTRUCTION,
                        TOXIGEN_OPTIONS, Example, arc_example, bbq_example, csqa2_example, csqa_example, mc_instruction,
                        mc_options, mc_prompt, plain_prompt, sd_example, seeded_rng, synthetic_task, toxigen_example)
from .toxigen import load_toxigen

__all__ = [
    "ARC_CHOICES", "BBQ_VALIDATION_GLOB", "BBQ_VALIDATION_RULE", "CAPABILITY_TASKS", "CELL_RULES", "CSQA2_INSTRUCTION",
    "CSQA2_OPTIONS", "DATA_DEFAULTS", "DEFAULT_STRATA", "Example", "GENERATIVE_TASKS", "HOLDOUT_FRACTION", "LETTERS",
    "LOADERS", "NUMBER_WORDS", "PAPER_TRAIN_SIZE", "SAFETY_TASKS", "SD_FILES", "SD_INSTRUCTION", "SPLITS",
    "TASK_MODULES", "TASKS", "TEST_SETS", "TOXIGEN_INSTRUCTION", "TOXIGEN_OPTIONS", "TaskData", "UNSPLIT_FRACTIONS",
    "UserError", "add_data_options", "arc_example", "bbq_example", "bbq_human_validated", "csqa2_example",
    "csqa_example", "data_options", "default_cells", "encode_pair", "ids_sha256", "load_arc", "load_bbq",
    "load_csqa", "load_csqa2", "load_saferdialogues", "load_task", "load_toxigen", "mc_instruction", "mc_options",
    "mc_prompt", "parse_tasks", "plain_prompt", "register", "sd_example", "seeded_rng", "stratified_sample",
    "stratified_split", "stratum_counts", "synthetic_task", "toxigen_example"]

# The names these helpers had here before they moved beside their users.
_need, _first_existing, _read_jsonl, _field = readers.need, readers.first_existing, readers.read_jsonl, readers.field
_mc_from_choices, _unsplit_method = readers.mc_from_choices, splits.unsplit_method
_cell, _cells, _validated = splits.stratum_of, splits.by_stratum, splits.human_validated
_check_groups_survive, _sample_train = splits.check_groups_survive, splits.sample_train
_bbq_text_matches, _parlai_unescape, _parse_parlai_line = (bbq._bbq_text_matches, saferdialogues._parlai_unescape,
                                                           saferdialogues._parse_parlai_line)

SPLITS = ["train", "validation", "test"]
PAPER_TRAIN_SIZE = 2261


@dataclass
class TaskData:
    task: str
    split: str
    examples: list
    source: str          # "synthetic" or the data folder
    info: dict           # files, split method, seeds, sizes: recorded in every run


# --------------------------------------------------------------------------------------------
# Task names, and a prompt and answer as the model reads them.

def parse_tasks(spec, flag="--tasks"):
    """Task names from a comma-separated string or a list (None or "" gives []); an unknown name is a
    UserError naming `flag`."""
    parts = (spec or "").split(",") if spec is None or isinstance(spec, str) else spec
    names = [t.strip() for t in parts if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise UserError(f"unknown task{'s' if len(bad) > 1 else ''} {', '.join(repr(t) for t in bad)} in {flag}; "
                        f"choose from {', '.join(TASKS)}")
    return names


def encode_pair(tokenizer, context, continuation):
    """Token ids of context and continuation, split as lm-evaluation-harness does: encode the whole
    string, then cut it where the context's own encoding ends, so the continuation's tokens are the
    ones the model sees after the context (training and scoring both use this)."""
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    # A merge across the boundary: fall back to encoding the continuation on its own.
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# One task and split: read (release files or stand-in), split, sample, describe.

def _check_options(name, split, train_size, arc_choices, test_set, cells):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if test_set not in TEST_SETS:
        raise UserError(f"--test_set {test_set!r} is not one of {', '.join(TEST_SETS)}")
    if cells is not None and cells not in CELL_RULES:
        raise UserError(f"--cells {cells!r} is not one of {', '.join(CELL_RULES)}")
    if arc_choices not in ARC_CHOICES:
        raise UserError(f"--arc_choices {arc_choices!r} is not one of {', '.join(ARC_CHOICES)}")
    if train_size is not None and train_size <= 0:
        raise UserError(f"--train_size must be positive, got {train_size}")


def _read(name, data_dir, **data_options):
    """The task's parts ({"train", "validation", "test"}, {"train", "test"} or {"all"}), its info and its source."""
    module = TASK_MODULES[name]
    if data_dir is None:
        raw, info = module.synthetic()
        return raw, dict(info), "synthetic"
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} is not a folder; point it at a folder laid out like ../shared/data")
    raw, info = module.load(data_dir, **data_options)
    return raw, dict(info), os.path.abspath(data_dir)


def _split(name, raw, info, train_size, test_set, rule, where):
    """The three splits of a task: a release without a split gets a seeded one, fixed by the data seed 0 for every
    run (test_set "rest": its training sample too); one without a validation split holds one out of train.
    Returns the splits and the fixed training sample (None unless test_set "rest" fixed it)."""
    strata = info.get("strata")
    fixed_train = None
    if "all" in raw:  # no official split: seeded, stratified, fixed by the data seed 0 for every run
        fractions = UNSPLIT_FRACTIONS if test_set == "fraction" else {"validation": UNSPLIT_FRACTIONS["validation"]}
        raw = stratified_split(raw.pop("all"), fractions, 0, f"{name}-split", strata)
        if test_set == "rest":
            fixed_train = sample_train(name, raw["train"], train_size, 0, strata, rule, where)
            taken = {ex.id for ex in fixed_train}
            raw["test"] = [ex for ex in raw["train"] if ex.id not in taken]
            info["split_method"] = (f"seeded split stratified by ({', '.join(strata or DEFAULT_STRATA)}): validation "
                                    f"{UNSPLIT_FRACTIONS['validation']:.0%}; the training set one sample of the rest "
                                    f"(data seed 0); every other example is the test set")
        info["test_set"] = test_set
    elif "validation" not in raw:
        parts = stratified_split(raw["train"], {"validation": HOLDOUT_FRACTION}, 0, f"{name}-holdout", strata)
        raw["train"], raw["validation"] = parts["train"], parts["validation"]
    return raw, fixed_train


def load_task(name, split="train", data_dir=None, train_size=PAPER_TRAIN_SIZE, seed=0, arc_choices="4",
              test_set="fraction", cells=None):
    """Examples of one task and split. split='train' is subsampled to train_size (seeded, stratified).

    arc_choices: "4" (the paper's 4-choice ARC questions) or "all". test_set (tasks without official splits,
    ToxiGen and BBQ): "fraction" (validation 10%, test 30%, training pool 60%) or "rest" (validation 10%, the
    training set one stratified sample of the other 90% drawn with data seed 0 whatever `seed` is, and every
    other example is the test set: the paper's reading, so finetune.py and evaluate.py must pass the same value).
    cells: "equal" | "fill" | None (default_cells): how the training sample fills its strata."""
    _check_options(name, split, train_size, arc_choices, test_set, cells)
    raw, info, source = _read(name, data_dir, arc_choices=arc_choices, test_set=test_set, cells=cells)
    strata = info.get("strata")
    where = info["files"][0] if info.get("files") else f"synthetic {name}"
    rule = cells or default_cells(source, next(iter(raw.values())))
    raw, fixed_train = _split(name, raw, info, train_size, test_set, rule, where)
    examples = raw[split]
    if not examples:
        raise UserError(f"{where}: the {split} split of {name} is empty; check the data files")
    info.update(split=split, pool_size=len(examples))
    if split == "train":
        examples = fixed_train or sample_train(name, examples, train_size, seed, strata, rule, where)
        info.update(train_size=train_size, sample_seed=0 if fixed_train else seed, cells=rule,
                    sample_method=f"seeded stratified by ({', '.join(strata or DEFAULT_STRATA)}), "
                    + ("the same count per cell, no top-up" if rule == "equal" else "equal per cell where possible, "
                       "topped up round robin to the size"))
        if fixed_train:
            info["pool_size"] = len(fixed_train) + len(raw["test"])
    info["n"] = len(examples)
    info["n_groups"] = len({ex.group for ex in examples if ex.group})
    info["n_labels"] = max(len(ex.options) for ex in examples)
    if any(human_validated(ex) for ex in examples):
        info["human_validated_in_split"] = sum(map(human_validated, examples))
    info["ids_sha256"] = ids_sha256(ex.id for ex in examples)
    return TaskData(name, split, examples, source, info)


# The options that choose a task's examples (load_task's), shared by every script that loads tasks: the same
# values must reach finetune.py, evaluate.py, replay.py and curvature.py (test_set=rest's test set is what the
# training sample leaves). At these defaults they stay out of finetune.py's run_id.
DATA_DEFAULTS = {"arc_choices": "4", "test_set": "fraction", "cells": None}


def add_data_options(parser):
    """--arc_choices, --test_set, --cells (load_task's options) on an argparse parser or group."""
    parser.add_argument("--arc_choices", default=DATA_DEFAULTS["arc_choices"], choices=ARC_CHOICES,
                        help="ARC-Easy questions kept: 4 = the paper's 4-choice ones, all = also the 3- and 5-choice "
                             "ones")
    parser.add_argument("--test_set", default=DATA_DEFAULTS["test_set"], choices=TEST_SETS,
                        help="ToxiGen and BBQ: fraction = a seeded 30%% test set, rest = every example not used for "
                             "training or validation (the paper's reading)")
    parser.add_argument("--cells", default=DATA_DEFAULTS["cells"], choices=CELL_RULES,
                        help="training sample: equal = the same count per cell, fill = topped up to --train_size "
                             "(unset: equal for real tasks with groups, else fill)")


def data_options(values):
    """load_task's keyword options from a config dict or argparse namespace (defaults where absent)."""
    values = values if isinstance(values, dict) else vars(values)
    return {k: values.get(k, v) for k, v in DATA_DEFAULTS.items()}
