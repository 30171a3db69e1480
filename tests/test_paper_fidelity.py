"""The paper's data rules (Table 2, section 3 and appendix 8.1) on the real files in ../shared/data (skipped
without them), and BBQ's human-validation items on a small file laid out like the official release."""
import collections
import csv
import json
import os

import pytest

import tasks
from conftest import DATA, needs_data, run_script

from test_tasks import bbq_row, write_jsonl


@needs_data
def test_arc_default_is_the_papers_4_choice_sizes():
    train, test = (tasks.load_task("arc", s, DATA) for s in ("train", "test"))
    assert (len(train.examples), len(test.examples)) == (2241, 2365)  # Table 2
    assert {len(e.options) for e in train.examples + test.examples} == {4}
    assert all("four candidate answers" in e.prompt for e in test.examples)
    assert len(tasks.load_task("arc", "test", DATA, arc_choices="all").examples) == 2376


@needs_data
def test_toxigen_equal_cells_give_the_papers_2236_with_the_rest_as_test():
    train = tasks.load_task("toxigen", "train", DATA, test_set="rest")
    cells = collections.Counter((e.group, e.label) for e in train.examples)
    assert len(train.examples) == 2236 and len(cells) == 26 and set(cells.values()) == {86}  # 26 x 86
    assert train.info["sample_seed"] == 0 == tasks.load_task("toxigen", "train", DATA, seed=2,
                                                             test_set="rest").info["sample_seed"]
    val, test = (tasks.load_task("toxigen", s, DATA, test_set="rest") for s in ("validation", "test"))
    ids = [{e.id for e in d.examples} for d in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 6514  # every row is used: the test set is all that is left
    assert len(tasks.load_task("toxigen", "test", DATA).examples) < len(ids[2])  # "fraction": 30% only


@needs_data
def test_bbq_strata_balanced_and_counts_cli():
    d = tasks.load_task("bbq", "train", DATA)
    cells = collections.Counter((e.group, e.extra["context_condition"], e.label) for e in d.examples)
    assert len(cells) == 4 * 2 * 3 and len(set(cells.values())) == 1  # category x condition x label, no top-up
    assert len(d.examples) == 24 * (2261 // 24) and d.info["human_validation"]["used"] is False
    r = run_script("tasks.py", "--task", "bbq", "--data_dir", DATA, "--split", "train", "--counts")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == len(d.examples) and out["strata"] == ["category", "context_condition", "label"]
    assert out["counts"]["Age|ambig|0"] == out["counts"]["Physical_appearance|disambig|2"] == 2261 // 24


def write_validation(base, items):
    """An MTurk input file as the official release lays it out: five items a row (q1..q5)."""
    path = os.path.join(base, "supplemental", "MTurk_validation", "for_upload", "finalval",
                        "donotupload_full_data_for_mturk_full_finalval.csv")
    os.makedirs(os.path.dirname(path))
    cols = [f"q{i}_{k}" for i in range(1, 6) for k in ("input", "question", "cat", "ex_id")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for k in range(0, len(items), 5):
            w.writerow({f"q{i + 1}_{key}": v for i, it in enumerate(items[k:k + 5]) for key, v in it.items()})


def test_bbq_human_validated_items_go_to_training_first(tmp_path):
    rows = {cat: [bbq_row(i, cat, "ambig" if i % 2 else "disambig", i % 3) for i in range(60)] for cat in ("Age", "SES")}
    for cat, rs in rows.items():
        write_jsonl(str(tmp_path / "bbq" / "data" / f"{cat}.jsonl"), rs)
    chosen = [(cat, i) for cat in rows for i in (0, 7, 14, 21)]
    items = [{"input": f"Context {i}.", "question": "Who?", "cat": cat, "ex_id": str(i)} for cat, i in chosen]
    items += [{"input": "Context 3.", "question": "Who else?", "cat": "Age", "ex_id": "3"},  # draft text: not it
              {"input": "A filler.", "question": "Who?", "cat": "Age", "ex_id": "NA"}]
    write_validation(str(tmp_path / "bbq"), items)
    train = tasks.load_task("bbq", "train", str(tmp_path), train_size=12)
    info = train.info["human_validation"]
    assert info["used"] and info["n_items"] == 8 and len(info["files"]) == 1
    assert len(train.examples) == 12 and train.info["human_validated_in_split"] == 8  # all 8 taken first
    assert {e.id for e in train.examples if e.extra.get("human_validated")} == {f"{c}-{i}" for c, i in chosen}
    for split in ("validation", "test"):
        assert not any(e.extra.get("human_validated") for e in tasks.load_task("bbq", split, str(tmp_path)).examples)


def test_bad_option_values_name_the_flag(tmp_path):
    for kw, flag in (({"arc_choices": "3"}, "--arc_choices"), ({"test_set": "all"}, "--test_set"),
                     ({"cells": "even"}, "--cells")):
        with pytest.raises(tasks.UserError, match=flag):
            tasks.load_task("arc", "train", **kw)
