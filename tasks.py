"""The six tasks of the study: loaders for the original files, seeded splits and stratified
subsampling, and one entry point, `load_task`, for them and their embedded synthetic stand-ins.

    python tasks.py                                   # sizes and one prompt of every synthetic task
    python tasks.py --data_dir ../shared/data --task toxigen --split test --show 2

    from tasks import load_task
    data = load_task("arc", split="train")             # synthetic ARC stand-in, 2261 examples
    data = load_task("toxigen", split="test", data_dir="../shared/data")
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
import glob
import gzip
import json
import os
from dataclasses import dataclass

from common import UserError, ids_sha256
# The record and the templates are defined with the synthetic tasks (see synthetic.py's docstring for
# why); they are re-exported here, where the loaders use them.
from synthetic import (CSQA2_INSTRUCTION, CSQA2_OPTIONS, LETTERS, NUMBER_WORDS, SD_INSTRUCTION,  # noqa: F401
                       TOXIGEN_INSTRUCTION, TOXIGEN_OPTIONS, Example, arc_example, bbq_example, csqa2_example,
                       csqa_example, mc_instruction, mc_options, mc_prompt, plain_prompt, sd_example, seeded_rng,
                       synthetic_task, toxigen_example)

TASKS = ["arc", "csqa", "csqa2", "toxigen", "bbq", "saferdialogues"]
CAPABILITY_TASKS = ["arc", "csqa", "csqa2"]
SAFETY_TASKS = ["toxigen", "bbq", "saferdialogues"]
GENERATIVE_TASKS = ["saferdialogues"]
SPLITS = ["train", "validation", "test"]
PAPER_TRAIN_SIZE = 2261

# Seeded splits for datasets released without one: fractions of the whole file.
UNSPLIT_FRACTIONS = {"validation": 0.1, "test": 0.3}  # the rest is the training pool
HOLDOUT_FRACTION = 0.1  # validation carved from the training file where the release has no labelled test


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
# Loaders for the original release files (layout of ../shared/data).

def _need(path, what):
    if not os.path.isfile(path):
        raise UserError(f"missing data file {path} ({what}); lay --data_dir out like ../shared/data "
                        f"or drop --data_dir to use the embedded synthetic tasks")
    return path


def _first_existing(paths, what):
    for p in paths:
        if os.path.isfile(p):
            return p
    return _need(paths[0], what + " (also looked for: " + ", ".join(os.path.basename(p) for p in paths[1:]) + ")")


def _read_jsonl(path, opener=open):
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
    if not rows:
        raise UserError(f"{path} holds no rows; restore the original file")
    return rows


def _field(row, key, path, n, types=None):
    if not isinstance(row, dict) or key not in row or row[key] is None:
        raise UserError(f"{path}:{n}: row has no '{key}' field; restore the original file or remove the row")
    if types is not None and not isinstance(row[key], types):
        raise UserError(f"{path}:{n}: field '{key}' has type {type(row[key]).__name__}; the original format is expected")
    return row[key]


def _mc_from_choices(row, path, n):
    """ARC / CommonsenseQA rows: question{stem, choices[{label, text}]}, answerKey (letters or 1-N)."""
    q = _field(row, "question", path, n, dict)
    stem = _field(q, "stem", path, n, str)
    choices = _field(q, "choices", path, n, list)
    if not 2 <= len(choices) <= len(LETTERS):
        raise UserError(f"{path}:{n}: {len(choices)} choices; 2 to {len(LETTERS)} are supported")
    labels = [str(_field(c, "label", path, n)) for c in choices]
    texts = [str(_field(c, "text", path, n)) for c in choices]
    key = str(_field(row, "answerKey", path, n))
    if key not in labels:
        raise UserError(f"{path}:{n}: answerKey {key!r} is not one of the choice labels {labels}; fix the row")
    return str(_field(row, "id", path, n)), stem, texts, labels.index(key)


def load_arc(d):
    base = os.path.join(d, "arc_easy")
    out = {}
    for split, name in [("train", "Train"), ("validation", "Dev"), ("test", "Test")]:
        p = _need(os.path.join(base, f"ARC-Easy-{name}.jsonl"), f"ARC-Easy {split} split")
        out[split] = [arc_example(*_mc_from_choices(r, p, n)) for n, r in _read_jsonl(p)]
    return out, {"files": [os.path.join(base, f"ARC-Easy-{s}.jsonl") for s in ("Train", "Dev", "Test")],
                 "split_method": "official train/dev/test"}


def load_csqa(d):
    base = os.path.join(d, "commonsenseqa")
    train = _first_existing([os.path.join(base, "train_rand_split.jsonl"), os.path.join(base, "train_data.jsonl")],
                            "CommonsenseQA train split")
    dev = _first_existing([os.path.join(base, "dev_rand_split.jsonl"), os.path.join(base, "dev_data.jsonl")],
                          "CommonsenseQA dev split (the test split has no answers; dev is the test set)")
    out = {"train": [], "test": []}
    for split, p in [("train", train), ("test", dev)]:
        for n, r in _read_jsonl(p):
            id_, stem, texts, label = _mc_from_choices(r, p, n)
            if len(texts) != 5:
                raise UserError(f"{p}:{n}: CommonsenseQA v1.11 has 5 choices, this row has {len(texts)}; "
                                f"use the 5-choice release (not v1.0)")
            out[split].append(csqa_example(id_, stem, texts, label))
    return out, {"files": [train, dev], "split_method": "official train; official dev as test (test has no "
                 f"labels); validation = seeded {HOLDOUT_FRACTION:.0%} of train, stratified by label"}


def load_csqa2(d):
    base = os.path.join(d, "csqa2")
    out = {}
    files = []
    for split, name in [("train", "CSQA2_train.json.gz"), ("test", "CSQA2_dev.json.gz")]:
        p = _need(os.path.join(base, name), f"CSQA 2.0 {split} split")
        files.append(p)
        exs = []
        for n, r in _read_jsonl(p, opener=gzip.open):
            ans = _field(r, "answer", p, n, str).strip().lower()
            if ans not in ("yes", "no"):
                raise UserError(f"{p}:{n}: answer {ans!r} is not yes/no; fix the row")
            exs.append(csqa2_example(str(_field(r, "id", p, n)), _field(r, "question", p, n, str), ans == "yes"))
        out[split] = exs
    return out, {"files": files, "split_method": "official train; official dev as test (test has no labels); "
                 f"validation = seeded {HOLDOUT_FRACTION:.0%} of train, stratified by label"}


def load_toxigen(d):
    p = _need(os.path.join(d, "toxigen_v2", "toxiGen.json"), "ToxiGen v2 (one JSON array)")
    try:
        with open(p, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); restore the original file") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{p}: expected a non-empty JSON array of rows; restore the original file")
    # A sentence may target several groups; each example gets one group (needed for a stratified
    # split and for per-group accuracy): the least frequent of its groups in the file, so small
    # groups such as 'chinese', which is never listed first, keep their examples.
    counts = collections.Counter(g for i, r in enumerate(rows, 1) for g in _field(r, "target_groups", p, i, list))
    exs = []
    for i, r in enumerate(rows, 1):
        label = _field(r, "label", p, i, str)
        if label not in ("hate", "neutral"):
            raise UserError(f"{p}: row {i} has label {label!r}; ToxiGen v2 labels are 'hate' or 'neutral'")
        groups = _field(r, "target_groups", p, i, list)
        if not groups:
            raise UserError(f"{p}: row {i} has no target_groups; fix or remove the row")
        group = min(groups, key=lambda g: (counts[g], g))
        exs.append(toxigen_example(str(_field(r, "id", p, i)), _field(r, "text", p, i, str), label == "hate", group,
                                   {"target_groups": groups}))
    return {"all": exs}, {"files": [p], "group_rule": "least frequent of the row's target_groups",
                          "split_method": _unsplit_method()}


def load_bbq(d):
    base = os.path.join(d, "bbq")
    files = sorted(glob.glob(os.path.join(base, "data", "*.jsonl")) or glob.glob(os.path.join(base, "*.jsonl")))
    if not files:
        raise UserError(f"no BBQ category files (*.jsonl) in {base}/data or {base}; lay --data_dir out like "
                        f"../shared/data or drop --data_dir for the synthetic tasks")
    exs = []
    for p in files:
        for n, r in _read_jsonl(p):
            answers = [str(_field(r, f"ans{k}", p, n)) for k in range(3)]
            label = _field(r, "label", p, n, int)
            if not 0 <= label < 3:
                raise UserError(f"{p}:{n}: label {label} is outside the three options; fix the row")
            cond = _field(r, "context_condition", p, n, str)
            if cond not in ("ambig", "disambig"):
                raise UserError(f"{p}:{n}: context_condition {cond!r} is not ambig/disambig; fix the row")
            cat = _field(r, "category", p, n, str)
            exs.append(bbq_example(f"{cat}-{_field(r, 'example_id', p, n)}", _field(r, "context", p, n, str),
                                   _field(r, "question", p, n, str), answers, label, cat, cond,
                                   {"question_polarity": r.get("question_polarity")}))
    return {"all": exs}, {"files": files, "split_method": _unsplit_method()}


def _parse_parlai_line(line, path, n):
    fields = {}
    for part in line.rstrip("\n").split("\t"):
        if ":" not in part:
            continue
        k, v = part.split(":", 1)
        fields[k] = v.replace("\\n", "\n").replace("\\t", "\t")
    if "text" not in fields or "labels" not in fields:
        raise UserError(f"{path}:{n}: ParlAI line without text:/labels: fields; restore the original file")
    return fields


def load_saferdialogues(d):
    base = os.path.join(d, "saferdialogues")
    out, files = {}, []
    for split, name in [("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")]:
        p = _first_existing([os.path.join(base, "saferdialogues_dataset", name), os.path.join(base, name)],
                            f"SaFeRDialogues {split} split (ParlAI text format, see its SOURCE.md)")
        files.append(p)
        exs = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    fl = _parse_parlai_line(line, p, n)
                    exs.append(sd_example(f"{split}-{n}", fl["text"], fl["labels"].split("|")[0]))
        out[split] = exs
    return out, {"files": files, "split_method": "official train/valid/test"}


LOADERS = {"arc": load_arc, "csqa": load_csqa, "csqa2": load_csqa2, "toxigen": load_toxigen, "bbq": load_bbq,
           "saferdialogues": load_saferdialogues}


# --------------------------------------------------------------------------------------------
# Seeded splits and stratified subsampling.

def _unsplit_method():
    return (f"seeded split stratified by (group, label): validation {UNSPLIT_FRACTIONS['validation']:.0%}, "
            f"test {UNSPLIT_FRACTIONS['test']:.0%}, the rest is the training pool")


def _cell(ex):
    return (ex.group or "", ex.label if len(ex.options) > 1 else 0)


def _cells(examples):
    cells = collections.defaultdict(list)
    for ex in examples:
        cells[_cell(ex)].append(ex)
    return dict(sorted(cells.items()))




def stratified_split(examples, fractions, seed, tag):
    """Split into named parts (fractions of every (group, label) cell); the rest goes to 'train'."""
    parts = {k: [] for k in [*fractions, "train"]}
    for key, cell in _cells(examples).items():
        cell = list(cell)
        seeded_rng(tag, seed, *key).shuffle(cell)
        start = 0
        for name, frac in fractions.items():
            k = int(round(frac * len(cell)))
            parts[name].extend(cell[start:start + k])
            start += k
        parts["train"].extend(cell[start:])
    return parts


def stratified_sample(examples, n, seed, tag):
    """n examples with the same number per (group, label) cell where the cells allow it.

    A cell smaller than its share gives all it has and the others fill the gap round robin, so the
    sample stays as balanced as the data permits. Order is shuffled (seeded)."""
    if n < 1:  # a negative quota would slice cells from the end
        raise UserError(f"a stratified sample needs a size of at least 1, got {n!r} ({tag})")
    if n >= len(examples):
        out = list(examples)
        seeded_rng(tag, seed, "order").shuffle(out)
        return out
    cells = _cells(examples)
    for key, cell in cells.items():
        seeded_rng(tag, seed, *key).shuffle(cell)
    quota = n // len(cells)
    taken = {k: min(quota, len(c)) for k, c in cells.items()}
    left = n - sum(taken.values())
    while left > 0:  # round robin over cells that still have examples
        for k, c in cells.items():
            if left and taken[k] < len(c):
                taken[k] += 1
                left -= 1
    out = [ex for k, c in cells.items() for ex in c[:taken[k]]]
    seeded_rng(tag, seed, "order").shuffle(out)
    return out


def _check_groups_survive(pool, sample, task, n, where):
    lost = sorted({g for g in (ex.group for ex in pool) if g is not None} - {ex.group for ex in sample})
    if lost:
        raise UserError(f"{where}: after subsampling {task} to {n} examples, group(s) {lost} are empty; "
                        f"raise --train_size (at least one example per group and label is needed)")


def load_task(name, split="train", data_dir=None, train_size=PAPER_TRAIN_SIZE, seed=0):
    """Examples of one task and split. split='train' is subsampled to train_size (seeded, stratified)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if data_dir is None:
        raw, info = synthetic_task(name)
        source = "synthetic"
    else:
        if not os.path.isdir(data_dir):
            raise UserError(f"--data_dir {data_dir} is not a folder; point it at a folder laid out like ../shared/data")
        raw, info = LOADERS[name](data_dir)
        source = os.path.abspath(data_dir)
    info = dict(info)
    if "all" in raw:  # no official split: seeded, stratified, fixed by the data seed 0 for every run
        raw = stratified_split(raw.pop("all"), UNSPLIT_FRACTIONS, 0, f"{name}-split")
    elif "validation" not in raw:
        parts = stratified_split(raw["train"], {"validation": HOLDOUT_FRACTION}, 0, f"{name}-holdout")
        raw["train"], raw["validation"] = parts["train"], parts["validation"]
    examples = raw[split]
    where = info["files"][0] if info.get("files") else f"synthetic {name}"
    if not examples:
        raise UserError(f"{where}: the {split} split of {name} is empty; check the data files")
    info.update(split=split, pool_size=len(examples))
    if split == "train":
        if train_size is not None and train_size <= 0:
            raise UserError(f"--train_size must be positive, got {train_size}")
        sample = stratified_sample(examples, train_size or len(examples), seed, f"{name}-sample")
        _check_groups_survive(examples, sample, name, train_size, where)
        examples = sample
        info.update(train_size=train_size, sample_seed=seed,
                    sample_method="seeded stratified by (group, label), equal per cell where possible")
    info["n"] = len(examples)
    info["ids_sha256"] = ids_sha256(ex.id for ex in examples)
    return TaskData(name, split, examples, source, info)


if __name__ == "__main__":
    from common import die_on_user_error
    p = argparse.ArgumentParser(description="Show the tasks: sizes, sources, example prompts.")
    p.add_argument("--task", default=None, help=f"one of {TASKS} (default: all)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (default: synthetic)")
    p.add_argument("--train_size", type=int, default=PAPER_TRAIN_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=1, help="examples to print per task")
    args = p.parse_args()

    def main():
        for t in [args.task] if args.task else TASKS:
            d = load_task(t, args.split, args.data_dir, args.train_size, args.seed)
            groups = collections.Counter(ex.group for ex in d.examples)
            print(f"== {t} [{d.source}] {args.split}: {len(d.examples)} examples, "
                  f"{len(d.examples[0].options)} options, {len([g for g in groups if g])} groups")
            for ex in d.examples[:args.show]:
                print(ex.prompt + ex.continuation(ex.label) + f"   [group={ex.group}]\n")
    die_on_user_error(main)
