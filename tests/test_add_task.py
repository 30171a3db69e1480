"""A new task is one module registered in one place: a module kept in a fixture folder (tests/fixtures/added_task/
reviews.py), added through registry.register without touching any other file, loads through load_task, parse_tasks
and the tasks.py CLI like the six built-in tasks, which stay as they were."""
import collections
import importlib.util
import json
import os
import sys

import pytest

import tasks
from chained_tuning.data import registry
from conftest import ROOT, run_script

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "added_task", "reviews.py")
BUILTIN = ["arc", "csqa", "csqa2", "toxigen", "bbq", "saferdialogues"]
# Registers the fixture task, then runs tasks.py as `python tasks.py ARGS` would.
CLI = ("import importlib.util, runpy, sys\n"
       "from chained_tuning.data import registry\n"
       f"spec = importlib.util.spec_from_file_location('reviews', {FIXTURE!r})\n"
       "module = importlib.util.module_from_spec(spec)\n"
       "spec.loader.exec_module(module)\n"
       "registry.register(module)\n"
       "sys.argv[0] = 'tasks.py'\n"
       "runpy.run_path('tasks.py', run_name='__main__')\n")


def import_fixture():
    spec = importlib.util.spec_from_file_location("reviews", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reviews():
    """The fixture task, registered for one test; the registry is put back as it was after it."""
    saved = {k: getattr(registry, k).copy() for k in ("TASK_MODULES", "TASKS", "CAPABILITY_TASKS", "SAFETY_TASKS",
                                                      "GENERATIVE_TASKS", "LOADERS")}
    try:
        yield registry.register(import_fixture())
    finally:
        for k, v in saved.items():  # in place: the importers hold these very objects
            target = getattr(registry, k)
            target.clear()
            if isinstance(target, list):
                target.extend(v)
            else:
                target.update(v)


def write_reviews(d, rows=None):
    path = os.path.join(d, "reviews", "reviews.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = rows or [{"id": f"r{i}", "text": f"review {i}", "positive": i % 2 == 0,
                     "kind": ["book", "phone", "shoe"][i % 3]} for i in range(120)]
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(d)


def test_the_six_tasks_are_registered_in_their_order():
    assert registry.TASKS == tasks.TASKS == BUILTIN and list(registry.TASK_MODULES) == BUILTIN
    assert tasks.CAPABILITY_TASKS == ["arc", "csqa", "csqa2"]
    assert tasks.SAFETY_TASKS == ["toxigen", "bbq", "saferdialogues"]
    assert tasks.GENERATIVE_TASKS == ["saferdialogues"] and list(tasks.LOADERS) == BUILTIN


def test_an_added_task_loads_like_the_others(reviews, tmp_path):
    assert tasks.TASKS == BUILTIN + ["reviews"] and "reviews" in tasks.CAPABILITY_TASKS  # the lists every script holds
    assert tasks.parse_tasks("arc,reviews") == ["arc", "reviews"]
    syn = tasks.load_task("reviews", "train", train_size=100)
    assert syn.source == "synthetic" and len(syn.examples) == 100 and syn.info["cells"] == "fill"
    assert syn.examples[0].prompt.startswith(reviews.INSTRUCTION) and syn.examples[0].prompt.endswith("\n\nAnswer:")
    data_dir = write_reviews(tmp_path)
    parts = {s: tasks.load_task("reviews", s, data_dir, train_size=None).examples for s in tasks.SPLITS}
    ids = [{e.id for e in parts[s]} for s in tasks.SPLITS]
    assert sum(map(len, ids)) == 120 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert collections.Counter((e.group, e.label) for e in parts["test"]) == {(k, lab): 6 for k in reviews.KINDS
                                                                              for lab in (0, 1)}  # 30% of each cell
    train = tasks.load_task("reviews", "train", data_dir, train_size=30)
    assert train.info["cells"] == "equal" and train.info["n_groups"] == 3 and len(train.examples) == 30
    assert train.info["split_method"] == reviews.unsplit_method() and train.info["files"][0].endswith("reviews.jsonl")
    assert train.examples[0].continuation(train.examples[0].label) in (" This is positive.", " This is negative.")


def test_an_added_task_names_its_bad_input(reviews, tmp_path):
    with pytest.raises(tasks.UserError, match="missing data file .*reviews.jsonl"):
        tasks.load_task("reviews", "test", str(tmp_path))
    write_reviews(tmp_path, [{"id": "x", "text": "t", "positive": True, "kind": "car"}])
    with pytest.raises(tasks.UserError, match="reviews.jsonl:1: kind 'car' is not one of book, phone, shoe"):
        tasks.load_task("reviews", "test", str(tmp_path))
    with pytest.raises(ValueError, match="registered already"):
        registry.register(reviews)


def test_the_cli_shows_an_added_task(tmp_path):
    r = run_script("-c", CLI, "--task", "reviews", "--show", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("== reviews [synthetic] train: 250 examples, 2 options, 3 groups\nInstructions: Given "
                               "the following review")
    data_dir = write_reviews(tmp_path)
    r = run_script("-c", CLI, "--task", "reviews", "--data_dir", data_dir, "--split", "train", "--counts")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 72 and out["strata"] == ["group", "label"] and set(out["counts"].values()) == {12}  # 60% of 120
    r = run_script("-c", CLI, "--task", "reviews", "--data_dir", str(tmp_path / "none"))
    assert r.returncode == 2 and r.stderr.startswith("error: --data_dir") and len(r.stderr.splitlines()) == 1
    r = run_script("tasks.py", "--task", "reviews")  # registered only where the hook ran
    assert r.returncode == 2 and "unknown task 'reviews'" in r.stderr


def test_the_registry_refuses_a_module_without_a_kind():
    module = type(sys)("broken")
    module.NAME, module.KIND, module.GENERATIVE = "broken", "fun", False
    with pytest.raises(ValueError, match="KIND 'fun' is not 'capability' or 'safety'"):
        registry.register(module)
    assert "broken" not in tasks.TASKS
