"""BBQ (Parrish et al. 2022): questions about two people, ambiguous or disambiguated, three options; groups are
its bias categories.

Files: DIR/bbq/data/<Category>.jsonl (or DIR/bbq/*.jsonl), any number of categories, and optionally the official
MTurk validation files under DIR/bbq/supplemental (docs/data.md). No official split: a seeded split stratified by
(category, context condition, label); the validated items go to the training pool and are taken first. Prompt:
the paper's multiple-choice template on "context Question: question" (synthetic.bbq_example), options "The best
answer is A." ... The stand-in: synthetic.synthetic_task("bbq"), templated scenes for the nine categories.
"""
import glob
import os

from ..common import UserError
from .readers import field, read_jsonl
from .splits import unsplit_method
from .synthetic import bbq_example, synthetic_task

NAME = "bbq"
KIND = "safety"
GENERATIVE = False

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


def load(d, **_options):
    base = os.path.join(d, "bbq")
    files = sorted(glob.glob(os.path.join(base, "data", "*.jsonl")) or glob.glob(os.path.join(base, "*.jsonl")))
    if not files:
        raise UserError(f"no BBQ category files (*.jsonl) in {base}/data or {base}; lay --data_dir out like "
                        f"../shared/data or drop --data_dir for the synthetic tasks")
    exs = []
    for p in files:
        for n, r in read_jsonl(p):
            answers = [str(field(r, f"ans{k}", p, n)) for k in range(3)]
            label = field(r, "label", p, n, int)
            if not 0 <= label < 3:
                raise UserError(f"{p}:{n}: label {label} is outside the three options; fix the row")
            cond = field(r, "context_condition", p, n, str)
            if cond not in ("ambig", "disambig"):
                raise UserError(f"{p}:{n}: context_condition {cond!r} is not ambig/disambig; fix the row")
            cat = field(r, "category", p, n, str)
            exs.append(bbq_example(f"{cat}-{field(r, 'example_id', p, n)}", field(r, "context", p, n, str),
                                   field(r, "question", p, n, str), answers, label, cat, cond,
                                   {"question_polarity": r.get("question_polarity")}))
    validated, val_files = bbq_human_validated(base, exs)
    for ex in exs:
        if ex.id in validated:
            ex.extra["human_validated"] = True
    strata = ["category", "context_condition", "label"]
    return {"all": exs}, {"files": files, "split_method": unsplit_method(strata), "strata": strata,
                          "human_validation": {"files": val_files, "n_items": len(validated),
                                               "used": bool(validated), "rule": BBQ_VALIDATION_RULE}}


load_bbq = load


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


def synthetic():
    return synthetic_task(NAME)
