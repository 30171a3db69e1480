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
import glob
import gzip
import json
import os
import sys
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
ARC_CHOICES = ("4", "all")      # ARC-Easy: the paper's 4-choice questions (Table 2: 2241 / 2365), or every one
TEST_SETS = ("fraction", "rest")  # tasks without official splits: a seeded 30% test set, or all the rest
CELL_RULES = ("equal", "fill")  # stratified training sample: the same count per cell, or topped up to the size

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


def load_arc(d, choices="4"):
    """ARC-Easy's official splits; choices="4" keeps the 4-choice questions only (the paper's Table 2 sizes,
    2241 train / 2365 test: its template says "four candidate answers"), "all" keeps the 3- and 5-choice ones."""
    if choices not in ARC_CHOICES:
        raise UserError(f"--arc_choices {choices!r} is not one of {', '.join(ARC_CHOICES)}")
    base = os.path.join(d, "arc_easy")
    out, dropped = {}, {}
    for split, name in [("train", "Train"), ("validation", "Dev"), ("test", "Test")]:
        p = _need(os.path.join(base, f"ARC-Easy-{name}.jsonl"), f"ARC-Easy {split} split")
        exs = [arc_example(*_mc_from_choices(r, p, n)) for n, r in _read_jsonl(p)]
        out[split] = [ex for ex in exs if choices == "all" or len(ex.options) == 4]
        dropped[split] = len(exs) - len(out[split])
    return out, {"files": [os.path.join(base, f"ARC-Easy-{s}.jsonl") for s in ("Train", "Dev", "Test")],
                 "split_method": "official train/dev/test", "arc_choices": choices,
                 "dropped_not_4_choices": dropped}


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
    validated, val_files = bbq_human_validated(base, exs)
    for ex in exs:
        if ex.id in validated:
            ex.extra["human_validated"] = True
    strata = ["category", "context_condition", "label"]
    return {"all": exs}, {"files": files, "split_method": _unsplit_method(strata), "strata": strata,
                          "human_validation": {"files": val_files, "n_items": len(validated),
                                               "used": bool(validated), "rule": BBQ_VALIDATION_RULE}}


# The official BBQ repository (github.com/nyu-mll/BBQ) keeps the items its crowdworkers validated in
# supplemental/MTurk_validation/for_upload/<round>/donotupload_full_data_for_mturk_full*.csv: one HIT a row,
# five items q1..q5 with q<i>_cat (category), q<i>_ex_id (example_id in data/<category>.jsonl; NA for the
# filler items), q<i>_input (context) and q<i>_question. Early rounds validated template drafts whose text
# changed before the release, so an item counts only where its text is the released row's.
BBQ_VALIDATION_GLOB = os.path.join("supplemental", "MTurk_validation", "for_upload", "*",
                                   "donotupload_full_data_for_mturk_full*.csv")
BBQ_VALIDATION_RULE = ("items of the official MTurk validation files (supplemental/MTurk_validation/for_upload/*/"
                       "donotupload_full_data_for_mturk_full*.csv) whose category, example_id, context and question "
                       "are those of a released row; they go to the training pool and are taken first in each cell")


def bbq_human_validated(base, examples):
    """{example id} of the released BBQ rows that BBQ's human validation covered, and the files read ([] when
    DIR/bbq/supplemental is absent: the training set is then templated examples only)."""
    import csv
    files = sorted(glob.glob(os.path.join(base, BBQ_VALIDATION_GLOB)))
    by_key = {(ex.group, ex.id.split("-", 1)[1]): ex for ex in examples}
    found = set()
    for path in files:
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                for i in range(1, 6):
                    ex = by_key.get((row.get(f"q{i}_cat"), (row.get(f"q{i}_ex_id") or "NA").strip()))
                    if ex is not None and _bbq_text_matches(ex, row.get(f"q{i}_input"), row.get(f"q{i}_question")):
                        found.add(ex.id)
    return found, files


def _bbq_text_matches(ex, context, question):
    return bool(context and question) and ex.prompt.find(f"{context.strip()} Question: {question.strip()}") >= 0


def _parlai_unescape(value):
    """A ParlAI text-format value as written: its escaped tab, newline and pipe restored."""
    return value.replace("\\t", "\t").replace("\\n", "\n").replace("__PIPE__", "|")


def _parse_parlai_line(line, path, n):
    """One episode of a ParlAI text-format file: tab-separated key:value fields; `labels` split on "|"
    (several acceptable answers) after the split, so an escaped pipe stays in its label."""
    fields = {}
    for part in line.rstrip("\n").split("\t"):
        if ":" not in part:
            continue
        k, v = part.split(":", 1)
        fields[k] = [_parlai_unescape(x) for x in v.split("|")] if k == "labels" else _parlai_unescape(v)
    have = ", ".join(sorted(fields)) or "none"
    for key in ("text", "labels"):
        if key not in fields or not any(x.strip() for x in ([fields[key]] if key == "text" else fields[key])):
            raise UserError(f"{path}:{n}: ParlAI line without a {key}: field (fields found: {have}); "
                            f"SaFeRDialogues lines hold text:, labels: and episode_done:True; restore the original file")
    # One line per episode: a line that leaves its episode open would need the next line as its context.
    if fields.get("episode_done", "True") != "True":
        raise UserError(f"{path}:{n}: episode_done:{fields['episode_done']}, but every SaFeRDialogues line is a whole "
                        f"episode (episode_done:True); restore the original file")
    return fields


SD_FILES = [("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")]


def load_saferdialogues(d):
    """The official splits: one example per episode, the context turns (newline-separated, the last
    one the feedback) as the prompt's text and the first label (the recovery response) as the answer."""
    base = os.path.join(d, "saferdialogues")
    out, files = {}, []
    for split, name in SD_FILES:
        p = _first_existing([os.path.join(base, "saferdialogues_dataset", name), os.path.join(base, name)],
                            f"SaFeRDialogues {split} split (ParlAI text format, see its SOURCE.md)")
        files.append(p)
        exs = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    fl = _parse_parlai_line(line, p, n)
                    ex = sd_example(f"{split}-{n}", fl["text"], next(x for x in fl["labels"] if x.strip()))
                    if "original_metadata" in fl:
                        ex.extra = {"original_metadata": fl["original_metadata"]}
                    exs.append(ex)
        if not exs:
            raise UserError(f"{p}: the SaFeRDialogues {split} split holds no episodes; restore the original file "
                            f"(the release has train 6306, valid 788, test 788 lines)")
        out[split] = exs
    return out, {"files": files, "split_method": "official train/valid/test"}


LOADERS = {"arc": load_arc, "csqa": load_csqa, "csqa2": load_csqa2, "toxigen": load_toxigen, "bbq": load_bbq,
           "saferdialogues": load_saferdialogues}


# --------------------------------------------------------------------------------------------
# Seeded splits and stratified subsampling.

DEFAULT_STRATA = ["group", "label"]


def _unsplit_method(strata=None):
    return (f"seeded split stratified by ({', '.join(strata or DEFAULT_STRATA)}): validation "
            f"{UNSPLIT_FRACTIONS['validation']:.0%}, test {UNSPLIT_FRACTIONS['test']:.0%}, the rest is the training pool")


def _cell(ex, strata=None):
    """The stratum of an example: (group, label) by default; a loader's info["strata"] may add BBQ's
    context condition ("category" is BBQ's name for the group)."""
    label = ex.label if len(ex.options) > 1 else 0
    if not strata or list(strata) == DEFAULT_STRATA:
        return (ex.group or "", label)
    return tuple(label if s == "label" else (ex.group or "") if s in ("group", "category") else
                 str(ex.extra.get(s, "")) for s in strata)


def _cells(examples, strata=None):
    cells = collections.defaultdict(list)
    for ex in examples:
        cells[_cell(ex, strata)].append(ex)
    return dict(sorted(cells.items()))


def _validated(ex):
    return bool(ex.extra.get("human_validated"))


def stratified_split(examples, fractions, seed, tag, strata=None):
    """Split into named parts (fractions of every stratum's cell); the rest goes to 'train'. Human-validated
    examples (BBQ) are put last in their cell, so they stay in the training pool."""
    parts = {k: [] for k in [*fractions, "train"]}
    for key, cell in _cells(examples, strata).items():
        cell = list(cell)
        seeded_rng(tag, seed, *key).shuffle(cell)
        cell.sort(key=_validated)  # stable: a no-op without validated examples
        start = 0
        for name, frac in fractions.items():
            k = int(round(frac * len(cell)))
            parts[name].extend(cell[start:start + k])
            start += k
        parts["train"].extend(cell[start:])
    return parts


def stratified_sample(examples, n, seed, tag, strata=None, rule="fill"):
    """n examples with the same number per stratum cell where the cells allow it.

    rule "fill": a cell smaller than its share gives all it has and the others fill the gap round robin, so the
    sample has n examples and stays as balanced as the data permits. rule "equal": every cell gives the same
    count, floor(n / cells) or the smallest cell's size, and nothing tops it up (the paper's sizes: 2236 = 26 x 86
    for ToxiGen's 13 groups x 2 labels, 2241 = 27 x 83 for BBQ's 9 categories x 3 labels). Human-validated
    examples come first in their cell. Order is shuffled (seeded)."""
    if n < 1:  # a negative quota would slice cells from the end
        raise UserError(f"a stratified sample needs a size of at least 1, got {n!r} ({tag})")
    if rule not in CELL_RULES:
        raise UserError(f"--cells {rule!r} is not one of {', '.join(CELL_RULES)}")
    if n >= len(examples) and rule == "fill":
        out = list(examples)
        seeded_rng(tag, seed, "order").shuffle(out)
        return out
    cells = _cells(examples, strata)
    for key, cell in cells.items():
        seeded_rng(tag, seed, *key).shuffle(cell)
        cell.sort(key=lambda ex: not _validated(ex))
    quota = n // len(cells)
    if rule == "equal":
        quota = min([quota] + [len(c) for c in cells.values()])
    taken = {k: min(quota, len(c)) for k, c in cells.items()}
    left = n - sum(taken.values()) if rule == "fill" else 0
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


def default_cells(source, examples):
    """The cell rule when none is asked: "equal" for a real task with groups (where Table 2's sizes show the
    paper's rule), "fill" elsewhere (the synthetic tasks keep the examples they always had; the paper's
    capability sizes, 2242, are no multiple of their label counts)."""
    return "equal" if source != "synthetic" and any(ex.group for ex in examples) else "fill"


def _sample_train(name, pool, train_size, seed, strata, cells, where):
    # train_size None: the whole pool (shuffled), whatever the cell rule
    sample = stratified_sample(pool, train_size or len(pool), seed, f"{name}-sample", strata,
                               cells if train_size else "fill")
    _check_groups_survive(pool, sample, name, train_size, where)
    return sample


def load_task(name, split="train", data_dir=None, train_size=PAPER_TRAIN_SIZE, seed=0, arc_choices="4",
              test_set="fraction", cells=None):
    """Examples of one task and split. split='train' is subsampled to train_size (seeded, stratified).

    arc_choices: "4" (the paper's 4-choice ARC questions) or "all". test_set (tasks without official splits,
    ToxiGen and BBQ): "fraction" (validation 10%, test 30%, training pool 60%) or "rest" (validation 10%, the
    training set one stratified sample of the other 90% drawn with data seed 0 whatever `seed` is, and every
    other example is the test set: the paper's reading, so finetune.py and evaluate.py must pass the same value).
    cells: "equal" | "fill" | None (default_cells): how the training sample fills its strata."""
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
    if data_dir is None:
        raw, info = synthetic_task(name)
        source = "synthetic"
    else:
        if not os.path.isdir(data_dir):
            raise UserError(f"--data_dir {data_dir} is not a folder; point it at a folder laid out like ../shared/data")
        raw, info = LOADERS[name](data_dir, arc_choices) if name == "arc" else LOADERS[name](data_dir)
        source = os.path.abspath(data_dir)
    info = dict(info)
    strata = info.get("strata")
    where = info["files"][0] if info.get("files") else f"synthetic {name}"
    rule = cells or default_cells(source, next(iter(raw.values())))
    fixed_train = None
    if "all" in raw:  # no official split: seeded, stratified, fixed by the data seed 0 for every run
        fractions = UNSPLIT_FRACTIONS if test_set == "fraction" else {"validation": UNSPLIT_FRACTIONS["validation"]}
        raw = stratified_split(raw.pop("all"), fractions, 0, f"{name}-split", strata)
        if test_set == "rest":
            fixed_train = _sample_train(name, raw["train"], train_size, 0, strata, rule, where)
            taken = {ex.id for ex in fixed_train}
            raw["test"] = [ex for ex in raw["train"] if ex.id not in taken]
            info["split_method"] = (f"seeded split stratified by ({', '.join(strata or DEFAULT_STRATA)}): validation "
                                    f"{UNSPLIT_FRACTIONS['validation']:.0%}; the training set one sample of the rest "
                                    f"(data seed 0); every other example is the test set")
        info["test_set"] = test_set
    elif "validation" not in raw:
        parts = stratified_split(raw["train"], {"validation": HOLDOUT_FRACTION}, 0, f"{name}-holdout", strata)
        raw["train"], raw["validation"] = parts["train"], parts["validation"]
    examples = raw[split]
    if not examples:
        raise UserError(f"{where}: the {split} split of {name} is empty; check the data files")
    info.update(split=split, pool_size=len(examples))
    if split == "train":
        examples = fixed_train or _sample_train(name, examples, train_size, seed, strata, rule, where)
        info.update(train_size=train_size, sample_seed=0 if fixed_train else seed, cells=rule,
                    sample_method=f"seeded stratified by ({', '.join(strata or DEFAULT_STRATA)}), "
                    + ("the same count per cell, no top-up" if rule == "equal" else "equal per cell where possible, "
                       "topped up round robin to the size"))
        if fixed_train:
            info["pool_size"] = len(fixed_train) + len(raw["test"])
    info["n"] = len(examples)
    info["n_groups"] = len({ex.group for ex in examples if ex.group})
    info["n_labels"] = max(len(ex.options) for ex in examples)
    if any(_validated(ex) for ex in examples):
        info["human_validated_in_split"] = sum(map(_validated, examples))
    info["ids_sha256"] = ids_sha256(ex.id for ex in examples)
    return TaskData(name, split, examples, source, info)


def stratum_counts(examples, strata=None):
    """{"a|b|c": count} per stratum cell of a set of examples (tasks.py --counts)."""
    return {"|".join(map(str, k)): len(v) for k, v in _cells(examples, strata).items()}


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


if __name__ == "__main__":
    from common import die_on_user_error
    p = argparse.ArgumentParser(description="Show the tasks: sizes, sources, example prompts.")
    p.add_argument("--task", default=None, help=f"one of {TASKS} (default: all)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (default: synthetic)")
    p.add_argument("--train_size", type=int, default=PAPER_TRAIN_SIZE)
    p.add_argument("--seed", type=int, default=0)
    add_data_options(p)
    p.add_argument("--show", type=int, default=1, help="examples to print per task")
    p.add_argument("--counts", action="store_true", help="print the split's size and counts per stratum as JSON")
    import fetch_data  # --fetch/--check: the datasets from their original releases, verified (fetch_data.py)
    fetch_data.add_fetch_options(p)
    args = p.parse_args()
    if any(getattr(args, k) for k in ("fetch", "check", "tasks", "mirror", "offline", "bbq_intersectional", "no_hub")):
        sys.exit(die_on_user_error(lambda: fetch_data.run(args, loaders=LOADERS)))

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
