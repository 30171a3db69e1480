"""chained_tuning/data/fetch.py (python tasks.py --fetch/--check): the datasets from a loopback server standing in for their hosts
(tests/loopback_mirror.py, serving ../shared/data at the official paths); no network."""
import filecmp
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import DATA, ROOT, needs_data, run_script

pytestmark = needs_data

from chained_tuning.data import fetch as fetch_data, sources  # noqa: E402
import tasks  # noqa: E402
from loopback_mirror import LoopbackMirror, write_saferdialogues_fixture  # noqa: E402

CLEAN = ["arc", "csqa", "csqa2", "toxigen"]  # every file of these is in ../shared/data
TOXIGEN_URL = sources.SAFENLP_GH + "data/toxiGen.json"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    with LoopbackMirror(DATA, str(tmp_path_factory.mktemp("mirror"))) as m:
        yield m


@pytest.fixture
def faults(mirror):
    yield mirror.faults
    mirror.faults.clear()


@pytest.fixture(scope="module")
def fetched(mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("fetched") / "data"
    r = fetch_cli(out, mirror, "--tasks", ",".join(CLEAN))
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out), r


def fetch_cli(out, mirror, *args, env=None):
    return run_script("tasks.py", "--fetch", out, "--mirror", mirror if isinstance(mirror, str) else mirror.url,
                      "--no_hub", *args, env=env, timeout=120)


def held_files(task_names):
    """(file entry, its path in ../shared/data) for every table file we hold."""
    out = []
    for t in task_names:
        for _, files in sources.task_files(t):
            for f in files:
                for name in (f.dest, *f.aliases):
                    if os.path.isfile(os.path.join(DATA, name)):
                        out.append((f, os.path.join(DATA, name)))
                        break
    return out


def examples(task, d):
    """Every example the loader reads (all splits, before sampling), and the ids hash of load_task's training set."""
    raw, _ = tasks.LOADERS[task](d)
    rows = {k: [(ex.id, ex.prompt, tuple(ex.options), ex.label, ex.group) for ex in v] for k, v in raw.items()}
    return rows, tasks.load_task(task, "train", d).info["ids_sha256"]


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stdout[-2000:] + r.stderr
    return lines[0]


def loose_parts(d):
    """Partial, bad or temporary files anywhere except DIR/.fetch (the stage)."""
    found = []
    for root, _, names in os.walk(d):
        if os.path.relpath(root, d).split(os.sep)[0] != sources.STAGE:
            found += [n for n in names if n.endswith((".part", ".tmp")) or n.startswith(".tmp")]
    return found


# --------------------------------------------------------------------------------------------
# The whole fetch.

def test_fetched_folder_is_byte_identical_to_shared_data(fetched):
    out, _ = fetched
    held = held_files(CLEAN)
    for f, src in held:
        assert filecmp.cmp(src, os.path.join(out, f.dest), shallow=False), f.dest
    ours = {os.path.relpath(src, DATA) for _, src in held}
    theirs = {os.path.join(sub, n) for sub in ("arc_easy", "commonsenseqa", "csqa2", "toxigen_v2")
              for n in os.listdir(os.path.join(DATA, sub)) if n != "SOURCE.md"}
    assert ours == theirs  # every file we hold is in the table
    assert not loose_parts(out) and not os.path.exists(os.path.join(out, sources.STAGE))


@pytest.mark.parametrize("task", CLEAN)
def test_load_task_gives_the_same_examples_on_the_fetched_folder(fetched, task):
    assert examples(task, fetched[0]) == examples(task, DATA)


def test_fetched_json_records_source_and_sha256(fetched, mirror):
    rec = json.load(open(os.path.join(fetched[0], sources.RECORD)))["files"]
    for f, _ in held_files(CLEAN):
        assert rec[f.dest]["from"].startswith(mirror.url + "/"), rec[f.dest]
        assert rec[f.dest]["sha256"] == f.sha256 and rec[f.dest]["verified"] is True
    assert "licence: CC BY-SA 4.0" in fetched[1].stdout


def test_a_mirror_folder_or_file_url_serves_the_same_files(tmp_path):
    mirror = tmp_path / "mirror"
    for dl in sources.DATASETS["toxigen"].downloads:
        src = fetch_data.source_of(dl.url, str(mirror))
        os.makedirs(os.path.dirname(src), exist_ok=True)
        shutil.copy(os.path.join(DATA, dl.files[0].dest), src)
    assert os.path.isfile(mirror / "raw.githubusercontent.com" / "microsoft" / "SafeNLP" / "main" / "data" / "TOXIGEN LICENSE")
    for i, where in enumerate([str(mirror), "file://" + str(mirror)]):
        out = str(tmp_path / f"d{i}")
        r = run_script("tasks.py", "--fetch", out, "--tasks", "toxigen", env={sources.MIRROR_ENV: where})
        assert r.returncode == 0, r.stderr
        for f, src in held_files(["toxigen"]):
            assert filecmp.cmp(src, os.path.join(out, f.dest), shallow=False)
        rec = json.load(open(os.path.join(out, sources.RECORD)))["files"]["toxigen_v2/toxiGen.json"]
        assert rec["from"] == os.path.join(str(mirror), "raw.githubusercontent.com", "microsoft", "SafeNLP", "main",
                                           "data", "toxiGen.json")


def test_a_rerun_downloads_nothing(fetched, mirror):
    before = len(mirror.requests)
    r = fetch_cli(fetched[0], mirror, "--tasks", ",".join(CLEAN))
    assert r.returncode == 0, r.stderr
    assert len(mirror.requests) == before  # not one request, files or otherwise
    assert "nothing downloaded" in r.stdout


def test_check_reports_each_task(fetched):
    r = run_script("tasks.py", "--check", fetched[0], "--tasks", ",".join(CLEAN))
    assert r.returncode == 0, r.stderr
    for task in CLEAN:
        row = next(line for line in r.stdout.splitlines() if line.startswith(task + " "))
        assert "complete" in row and "verified" in row and "real data" in row and "mismatch" not in row, row
    assert "train 2251, validation 570, test 2376" in r.stdout  # ARC's rows per split
    r = run_script("tasks.py", "--check", DATA)
    csqa = next(line for line in r.stdout.splitlines() if line.startswith("csqa "))
    assert "complete" in csqa and "train 9741, test 1221" in csqa  # ../shared/data's names for the same files
    sd = next(line for line in r.stdout.splitlines() if line.startswith("saferdialogues"))
    assert "missing" in sd and "synthetic" in sd
    assert "partial" in next(line for line in r.stdout.splitlines() if line.startswith("bbq "))
    assert "saferdialogues" in one_error_line(r) and "--fetch" in r.stderr


# --------------------------------------------------------------------------------------------
# What we do not hold: BBQ's other categories (404 here), SaFeRDialogues (a fixture archive).

def test_bbq_fetches_what_exists_and_names_what_does_not(mirror, tmp_path):
    out = str(tmp_path / "d")
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "bbq"))
    for cat in ("Gender_identity", "Race_ethnicity", "SES", "Religion", "Sexual_orientation"):
        assert f"bbq/data/{cat}.jsonl" in err
    assert "MTurk_validation" in err and "HTTP 404" in err and "Race_x_SES" not in err
    for f, src in held_files(["bbq"]):
        assert filecmp.cmp(src, os.path.join(out, f.dest), shallow=False)
    assert examples("bbq", out) == examples("bbq", DATA)
    assert not loose_parts(out) and sorted(os.listdir(os.path.join(out, "bbq", "data"))) == sorted(
        os.listdir(os.path.join(DATA, "bbq", "data")))


def test_saferdialogues_archive_refused_unless_it_is_parlais(mirror, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "d")
    served = hashlib.sha256(mirror.body(mirror.path_of(sources.SD_TAR))).hexdigest()
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "saferdialogues"))
    assert "saferdialogues_v0.4.tar.gz: sha256 mismatch" in err and sources.DATASETS[
        "saferdialogues"].downloads[0].sha256 in err and served in err
    assert os.path.isfile(os.path.join(out, sources.STAGE, "saferdialogues_v0.4.tar.gz.bad"))
    assert not os.path.exists(os.path.join(out, "saferdialogues"))
    # With the fixture's hash pinned, the same archive lands where the loader reads it.
    ds = sources.DATASETS["saferdialogues"]
    monkeypatch.setitem(sources.DATASETS, "saferdialogues", replace(ds, downloads=(replace(ds.downloads[0], sha256=served),)))
    assert fetch_data.main(["--fetch", out, "--mirror", mirror.url, "--tasks", "saferdialogues", "--no_hub"]) == 0
    assert "NON-COMMERCIAL" in capsys.readouterr().out
    fixture = write_saferdialogues_fixture(str(tmp_path / "fixture"))
    for f in ds.downloads[0].files:
        assert filecmp.cmp(os.path.join(fixture, f.dest), os.path.join(out, f.dest), shallow=False)
    assert examples("saferdialogues", out) == examples("saferdialogues", fixture)
    assert not os.path.exists(os.path.join(out, sources.STAGE, "saferdialogues_v0.4.tar.gz"))  # unpacked: gone


# --------------------------------------------------------------------------------------------
# Failures: refused by name, nothing half-written where the loaders look; an interruption resumes.

def test_a_corrupted_file_is_refused_by_name_and_kept_aside(mirror, faults, tmp_path):
    out = str(tmp_path / "d")
    path = mirror.path_of(TOXIGEN_URL)
    faults[path] = "corrupt"
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "toxigen"))
    dest = os.path.join(out, "toxigen_v2", "toxiGen.json")
    got = hashlib.sha256(open(dest + ".bad", "rb").read()).hexdigest()
    assert f"toxigen_v2/toxiGen.json: sha256 mismatch: expected {sources.DATASETS['toxigen'].downloads[0].files[0].sha256}, " \
           f"got {got}; kept aside as {dest}.bad" in err
    assert not os.path.exists(dest) and not loose_parts(out)
    del faults[path]
    assert fetch_cli(out, mirror, "--tasks", "toxigen").returncode == 0
    assert filecmp.cmp(os.path.join(DATA, "toxigen_v2", "toxiGen.json"), dest, shallow=False)


def test_a_truncated_file_is_refused(mirror, faults, tmp_path):
    out = str(tmp_path / "d")
    faults[mirror.path_of(sources.CSQA2_GH + "dataset/CSQA2_dev.json.gz")] = "truncate"
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "csqa2"))
    assert "csqa2/CSQA2_dev.json.gz: sha256 mismatch: expected 2804671317521bb7" in err
    assert not os.path.exists(os.path.join(out, "csqa2", "CSQA2_dev.json.gz")) and not loose_parts(out)
    assert os.path.isfile(os.path.join(out, "csqa2", "CSQA2_train.json.gz"))  # the others are in place


def test_a_corrupted_archive_is_kept_aside_and_downloaded_again(mirror, faults, tmp_path):
    out = str(tmp_path / "d")
    path = mirror.path_of(sources.ARC_ZIP)
    faults[path] = "corrupt"
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "arc"))
    assert "arc_easy/ARC-Easy-" in err and "ARC-V1-Feb2018.zip" in err
    assert os.path.isfile(os.path.join(out, sources.STAGE, "ARC-V1-Feb2018.zip.bad")) and not loose_parts(out)
    for f, src in held_files(["arc"]):  # what is in place is the release's
        dest = os.path.join(out, f.dest)
        assert not os.path.exists(dest) or filecmp.cmp(src, dest, shallow=False)
    del faults[path]
    n = len(mirror.requests)
    assert fetch_cli(out, mirror, "--tasks", "arc").returncode == 0
    assert [r[0] for r in mirror.requests[n:]] == [path]
    for f, src in held_files(["arc"]):
        assert filecmp.cmp(src, os.path.join(out, f.dest), shallow=False)


def test_a_404_is_named_and_leaves_nothing(mirror, faults, tmp_path):
    out = str(tmp_path / "d")
    faults[mirror.path_of(sources.ARC_ZIP)] = "404"
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "arc"))
    assert "arc_easy/ARC-Easy-Train.jsonl" in err and "HTTP 404" in err
    assert not os.path.exists(os.path.join(out, "arc_easy"))


def test_a_server_that_stops_mid_file_is_resumed_on_the_rerun(mirror, faults, tmp_path):
    out = str(tmp_path / "d")
    path = mirror.path_of(TOXIGEN_URL)
    size = len(mirror.body(path))
    faults[path] = ("stop", 0.4, 1 + sources.RETRIES)  # every try of the first run
    err = one_error_line(fetch_cli(out, mirror, "--tasks", "toxigen"))
    assert f"of {size} bytes" in err and "rerun to resume" in err and "toxigen_v2/toxiGen.json" in err
    part = os.path.join(out, sources.STAGE, "toxigen_v2", "toxiGen.json.part")
    have = os.path.getsize(part)
    assert have == int(size * 0.4) and not os.path.exists(os.path.join(out, "toxigen_v2", "toxiGen.json"))
    n = len(mirror.requests)
    assert fetch_cli(out, mirror, "--tasks", "toxigen").returncode == 0
    resumed = [r for r in mirror.requests[n:] if r[0] == path]
    assert resumed == [(path, f"bytes={have}-", 206, size - have)]
    assert filecmp.cmp(os.path.join(DATA, "toxigen_v2", "toxiGen.json"), os.path.join(out, "toxigen_v2", "toxiGen.json"),
                       shallow=False)
    assert not os.path.exists(part)


def test_a_dropped_connection_is_resumed_within_the_run(mirror, faults, tmp_path):
    out = str(tmp_path / "d")
    path = mirror.path_of(TOXIGEN_URL)
    faults[path] = ("stop", 0.5, 1)
    assert fetch_cli(out, mirror, "--tasks", "toxigen").returncode == 0
    assert [r[1] is not None for r in mirror.requests if r[0] == path][-2:] == [False, True]


def test_a_file_without_a_pinned_hash_is_unverified_and_its_rows_checked(mirror, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "d")
    ds = sources.DATASETS["toxigen"]
    dl = ds.downloads[0]

    def pin(**kw):
        monkeypatch.setitem(sources.DATASETS, "toxigen", replace(ds, downloads=(
            replace(dl, files=(replace(dl.files[0], **kw),)),)))
    pin(sha256=None, rows=6000)
    args = ["--fetch", out, "--mirror", mirror.url, "--tasks", "toxigen", "--no_hub"]
    with pytest.raises(SystemExit):
        fetch_data.main(args)
    assert "row count mismatch: expected 6000 rows, got 6514" in capsys.readouterr().err
    pin(sha256=None, rows=6514)
    assert fetch_data.main(args) == 0
    assert "sha256 UNVERIFIED" in capsys.readouterr().out
    rec = json.load(open(os.path.join(out, sources.RECORD)))["files"]["toxigen_v2/toxiGen.json"]
    assert rec["verified"] is False and rec["sha256"] == dl.files[0].sha256
    assert fetch_data.main(["--check", out, "--tasks", "toxigen"]) == 0
    assert "1 unverified" in capsys.readouterr().out
    with open(os.path.join(out, "toxigen_v2", "toxiGen.json"), "a") as f:
        f.write("\n")  # the same rows, other bytes than at first fetch
    with pytest.raises(SystemExit):
        fetch_data.main(["--check", out, "--tasks", "toxigen"])
    assert "sha256 changed since the first fetch" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The Hub as the second source: rows in the Hub's schemas, built from the release's rows.

def release_rows(path, n=None):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    return lines[:n] if n else lines


def hub_arc(r):
    c = r["question"]["choices"]
    return {"id": r["id"], "question": r["question"]["stem"], "choices": {"text": [x["text"] for x in c],
                                                                        "label": [x["label"] for x in c]},
            "answerKey": r["answerKey"]}


def hub_csqa(r):
    q = r["question"]
    return {"id": r["id"], "question": q["stem"], "question_concept": q["question_concept"],
            "choices": {"label": [x["label"] for x in q["choices"]], "text": [x["text"] for x in q["choices"]]},
            "answerKey": r.get("answerKey", "")}


def hub_table(r, keys):
    """A row as a Hub table holds it: its columns in another order, a null where the release has no key."""
    return {k: (dict(reversed(r[k].items())) if isinstance(r.get(k), dict) else r.get(k)) for k in reversed(keys)}


HUB_CASES = {  # release file: (to the Hub's schema, from it, dump)
    "arc_easy/ARC-Easy-Train.jsonl": (hub_arc, sources.arc_from_hub, lambda x: sources.dump_jsonl(x, True)),
    "arc_easy/ARC-Easy-Test.jsonl": (hub_arc, sources.arc_from_hub, lambda x: sources.dump_jsonl(x, True)),
    "commonsenseqa/train_data.jsonl": (hub_csqa, sources.csqa_from_hub, sources.dump_jsonl),
    "commonsenseqa/test_data.jsonl": (hub_csqa, sources.csqa_from_hub, sources.dump_jsonl),
    "csqa2/CSQA2_train.json.gz": (lambda r: hub_table(r, sources.CSQA2_KEYS), sources.csqa2_from_hub,
                                  sources.dump_jsonl),
    "csqa2/CSQA2_test_no_answers.json.gz": (lambda r: hub_table(r, sources.CSQA2_KEYS), sources.csqa2_from_hub,
                                            sources.dump_jsonl),
    "bbq/data/Age.jsonl": (lambda r: hub_table(r, sources.BBQ_KEYS), sources.bbq_from_hub, sources.dump_jsonl),
}


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_hub_conversion_gives_the_release_records(name):
    to_hub, convert, dump = HUB_CASES[name]
    lines = release_rows(os.path.join(DATA, name))
    records = [json.loads(line) for line in lines]
    back = convert([to_hub(r) for r in records])
    assert back == records
    assert dump(back) == "".join(lines).encode()  # byte for byte, so the pinned sha256 checks a rebuilt file


def test_hub_conversion_through_datasets_from_local_parquet_and_json(tmp_path):
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed: the conversions are checked on "
                                                       "plain rows only (test_hub_conversion_gives_the_release_records)")
    for name, fmt in [("arc_easy/ARC-Easy-Dev.jsonl", "parquet"), ("commonsenseqa/test_data.jsonl", "json"),
                      ("csqa2/CSQA2_test_no_answers.json.gz", "parquet"), ("bbq/data/Age.jsonl", "json")]:
        to_hub, convert, dump = HUB_CASES.get(name) or HUB_CASES[name.replace("Dev", "Train")]
        lines = release_rows(os.path.join(DATA, name), 300)
        records = [json.loads(line) for line in lines]
        src = str(tmp_path / f"{os.path.basename(name)}.{fmt}")
        table = datasets.Dataset.from_list([to_hub(r) for r in records])
        table.to_parquet(src) if fmt == "parquet" else table.to_json(src)
        rows = list(datasets.load_dataset(fmt, data_files=src, split="train", cache_dir=str(tmp_path / "cache")))
        assert convert(rows) == records, name
        assert dump(convert(rows)) == "".join(lines).encode(), name


def test_the_hub_is_the_second_source_for_arc_csqa_and_csqa2(mirror, faults, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "d")
    for t in ("arc", "csqa", "csqa2"):
        for dl in sources.DATASETS[t].downloads:
            faults[mirror.path_of(dl.url)] = "404"
    by_split = {}
    for t, (to_hub, _) in {"arc": (hub_arc, 0), "csqa": (hub_csqa, 0),
                           "csqa2": (lambda r: hub_table(r, sources.CSQA2_KEYS), 0)}.items():
        for f, src in held_files([t]):
            if f.hub:
                by_split[f.hub] = [to_hub(json.loads(line)) for line in release_rows(src)]
    monkeypatch.setattr(fetch_data, "hub_rows", lambda repo, config, split: by_split[(repo, config, split)])
    assert fetch_data.main(["--fetch", out, "--mirror", mirror.url, "--tasks", "arc,csqa,csqa2"]) == 0
    assert "trying the Hugging Face Hub" in capsys.readouterr().out
    rec = json.load(open(os.path.join(out, sources.RECORD)))["files"]
    for f, src in held_files(["arc", "csqa", "csqa2"]):
        if f.hub:
            assert rec[f.dest]["verified"] and rec[f.dest]["from"].startswith("hf://datasets/" + f.hub[0]), rec[f.dest]
            with (gzip.open if src.endswith(".gz") else open)(src, "rb") as a, \
                    (gzip.open if src.endswith(".gz") else open)(os.path.join(out, f.dest), "rb") as b:
                assert a.read() == b.read(), f.dest


def test_without_datasets_the_second_source_is_refused_by_name(mirror, faults, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "d")
    faults[mirror.path_of(sources.ARC_ZIP)] = "404"
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(SystemExit) as e:
        fetch_data.main(["--fetch", out, "--mirror", mirror.url, "--tasks", "arc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "HTTP 404" in err[0]
    assert "needs the `datasets` package: pip install datasets" in err[0]
    assert not os.path.exists(os.path.join(out, "arc_easy"))


def test_toxigen_is_never_taken_from_the_hub(mirror, faults, tmp_path, monkeypatch, capsys):
    faults[mirror.path_of(TOXIGEN_URL)] = "404"
    monkeypatch.setattr(fetch_data, "hub_rows", lambda *a: pytest.fail("ToxiGen v2 has no Hub substitute"))
    with pytest.raises(SystemExit):
        fetch_data.main(["--fetch", str(tmp_path / "d"), "--mirror", mirror.url, "--tasks", "toxigen"])
    assert "toxigen_v2/toxiGen.json: HTTP 404" in capsys.readouterr().err
    assert sources.DATASETS["toxigen"].hub is None


# --------------------------------------------------------------------------------------------
# The command line.

@pytest.mark.parametrize("args, env, words", [
    (["--tasks", "nope"], {}, ["--tasks", "'nope'", "arc,csqa"]),
    (["--mirror", "/nonexistent"], {}, ["--mirror /nonexistent", "neither a folder nor"]),
    (["--offline", "--tasks", "toxigen,arc"], {}, ["--offline: ", "toxiGen.json ->", "put them there by hand",
                                                   "ARC-V1-Feb2018.zip (unpacked on the next run)"]),
    (["--tasks", "toxigen"], {sources.MIRROR_ENV: "/nonexistent"}, [sources.MIRROR_ENV + " /nonexistent"]),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, args, env, words):
    out = tmp_path / "d"
    r = run_script("tasks.py", "--fetch", out, *args, env=env)
    line = one_error_line(r)
    assert all(w in line for w in words), line
    assert "Traceback" not in r.stderr and not out.exists()


def test_an_unreachable_host_names_what_to_put_where(tmp_path):
    out = str(tmp_path / "d")
    line = one_error_line(fetch_cli(out, "http://127.0.0.1:9", "--tasks", "toxigen"))
    assert "cannot reach 127.0.0.1:9" in line and f"{TOXIGEN_URL} -> {os.path.join(out, 'toxigen_v2', 'toxiGen.json')}" \
        in line and "--mirror" in line
    assert not loose_parts(out) and not os.path.exists(os.path.join(out, sources.STAGE))


def test_progress_is_a_line_per_tenth_off_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    buf = io.StringIO()
    bar = fetch_data.Progress("x.bin", 1000, file=buf)
    for _ in range(40):
        bar.update(25)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[0] == "fetch: x.bin 10% (0.0 of 0.0 MB)" and "100%" in lines[-1]


def test_run_all_fetch_needs_data_dir_and_stops_on_a_failed_fetch(tmp_path):
    env = {**os.environ, "FETCH": "1", "SKIP_SETUP": "1", "PY": sys.executable, "RUNS": str(tmp_path / "runs")}
    env.pop("DATA_DIR", None)
    r = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "FETCH=1 needs DATA_DIR" in r.stderr
    r = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**env, "DATA_DIR": str(tmp_path / "d"), sources.MIRROR_ENV: "/nonexistent"})
    assert r.returncode == 2 and sources.MIRROR_ENV in r.stderr and not (tmp_path / "runs").exists()
