"""Bad input to every script, run as a user would (a subprocess): one `error:` line that names the flag and
the value, exit code 2, no traceback, nothing written, and before any model is loaded (the --model of these
runs is a folder whose config.json cannot be read: loading it would end in another error). Also: the one
overwrite rule, model paths that are not there, --device, --help texts, replay's fractions, curvature's
warning on a task outside the model's chain, and printed paths that are never temporary ones."""
import argparse
import json
import os
import time

import pytest

from chained_tuning import checkpoint, common
import curvature
import evaluate
import finetune
import replay
import tasks
from conftest import run_script

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # no test may reach the network


@pytest.fixture
def bomb(tmp_path):
    """A 'checkpoint' whose loading fails: an error from it means the check came too late."""
    d = tmp_path / "bomb"
    d.mkdir()
    (d / "config.json").write_text("{ not json")
    (d / "chained_tuning.json").write_text(json.dumps({"chain": ["toxigen", "arc"], "run_id": "x"}))
    return d


def refused(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def written(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("bomb", "hf"))


FINETUNE = ["finetune.py", "--task", "arc"]
EVALUATE = ["evaluate.py", "--tasks", "arc"]
REPLAY = ["replay.py", "--task", "toxigen", "--fractions", "0"]
CURVATURE = ["curvature.py", "--task", "arc"]

BAD_NUMBERS = [
    (FINETUNE, "--lr", "-1", "> 0"), (FINETUNE, "--lr", "0", "> 0"), (FINETUNE, "--lr", "nan", "> 0"),
    (FINETUNE, "--batch_size", "0", "at least 1"), (FINETUNE, "--steps", "-2", "at least 1"),
    (FINETUNE, "--micro_batch_size", "0", "at least 1"), (FINETUNE, "--train_size", "0", "at least 1"),
    (FINETUNE, "--max_length", "0", "at least 1"), (FINETUNE, "--beta2", "1", "[0, 1)"),
    (FINETUNE, "--eps", "0", "> 0"), (FINETUNE, "--max_grad_norm", "-1", ">= 0"), (FINETUNE, "--seed", "-1", ">= 0"),
    (FINETUNE, "--train_fraction", "0", "(0, 1]"), (FINETUNE, "--replay_fraction", "5", "[0, 1]"),
    (FINETUNE, "--ewc", "-1", ">= 0"), (FINETUNE, "--ewc_samples", "0", "at least 1"),
    (FINETUNE + ["--eval_tasks", "arc"], "--eval_limit", "0", "at least 1"),
    (EVALUATE, "--limit", "-3", "at least 1"), (EVALUATE, "--limit", "0", "at least 1"),
    (EVALUATE, "--batch_size", "0", "at least 1"), (EVALUATE, "--seed", "-1", ">= 0"),
    (REPLAY, "--steps", "0", "at least 1"), (REPLAY, "--lr", "-1", "> 0"), (REPLAY, "--eval_limit", "0", "at least 1"),
    (REPLAY, "--eval_batch_size", "0", "at least 1"), (REPLAY, "--train_size", "0", "at least 1"),
    (CURVATURE, "--samples", "0", "at least 1"), (CURVATURE, "--tol", "0", "> 0"),
    (CURVATURE, "--max_iter", "0", "at least 1"), (CURVATURE, "--graph_memory_budget_gb", "-1", "> 0"),
]
# the cases the issue names, and one a script, also as a user runs them (the rest in this process: faster)
AS_USER = {("finetune.py", "--lr", "-1"), ("finetune.py", "--lr", "0"), ("finetune.py", "--batch_size", "0"),
           ("evaluate.py", "--batch_size", "0"), ("evaluate.py", "--limit", "-3"), ("evaluate.py", "--limit", "0"),
           ("replay.py", "--steps", "0"), ("curvature.py", "--samples", "0")}


def in_process(argv):
    """A script's work on argv (script name first) in this process, as its __main__ does it."""
    script, rest = argv[0], [str(a) for a in argv[1:]]
    if script == "finetune.py":
        return finetune.train_stage(vars(finetune.build_parser().parse_args(rest)))
    if script == "evaluate.py":
        return evaluate.run(evaluate.build_parser().parse_args(rest))
    if script == "replay.py":
        return replay.main(replay.build_parser().parse_args(rest))
    return curvature.run_cli(curvature.build_parser().parse_args(rest))


def refused_in_process(monkeypatch, argv, *needles):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.UserError) as e:
        in_process(argv)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    return str(e.value)


@pytest.mark.parametrize("script,flag,value,allowed", BAD_NUMBERS,
                         ids=[f"{s[0]}{f}={v}" for s, f, v, _ in BAD_NUMBERS])
def test_bad_number_refused_before_loading(tmp_path, bomb, monkeypatch, script, flag, value, allowed):
    out = tmp_path / ("o" if script[0] in ("finetune.py", "replay.py") else "o.json")
    argv = [*script, "--model", bomb, "--out", out, flag, value]
    if (script[0], flag, value) in AS_USER:
        t0 = time.time()
        line = refused(run_script(*argv, env=OFFLINE), flag, value, allowed)
        assert time.time() - t0 < 60  # a check, not a load (the imports alone take a few seconds on 2 cores)
    else:
        line = refused_in_process(monkeypatch, argv, flag, value, allowed)
    assert f"{flag} must be" in line and "could not load" not in line and written(tmp_path) == []


def test_every_numeric_option_has_a_rule():
    """No numeric option of finetune.py, replay.py or evaluate.py escapes its table of rules."""
    for parser, rules in ((finetune.build_parser(), finetune.NUMERIC_RULES),
                          (replay.build_parser(), replay.NUMERIC_RULES),
                          (evaluate.build_parser(), evaluate.NUMERIC_RULES)):
        assert {a.dest for a in parser._actions if a.type in (int, float)} <= set(rules)


@pytest.mark.parametrize("value", ["-3", "-1", "0"])
def test_limit_below_one_never_reaches_the_subset(value):
    """A negative --limit dropped every example whose answer is A: the subset's per-cell quota went negative
    (c[:-1] keeps all but one of a cell, and the round-robin fill raised the first cell, answer A, to c[:0]).
    The library refuses it too (before touching the model)."""
    with pytest.raises(common.UserError, match="--limit must be at least 1"):
        evaluate.evaluate(None, None, ["arc"], limit=int(value))


def test_every_positive_limit_is_a_proper_stratified_subset():
    ex = tasks.load_task("arc", "test").examples
    cells = {(e.group, e.label) for e in ex}
    for n in list(range(1, 12)) + [len(ex) - 1, len(ex), len(ex) + 5]:
        s = tasks.stratified_sample(ex, n, 0, "arc-eval-limit")
        assert len(s) == min(n, len(ex)) == len({e.id for e in s})
        if n >= len(cells):
            assert {(e.group, e.label) for e in s} == cells  # no answer letter dropped


def test_replay_fraction_is_a_fraction(tmp_path, bomb):
    r = run_script("replay.py", "--model", bomb, "--task", "toxigen", "--out", tmp_path / "o", "--fractions", "0,5",
                   env=OFFLINE)
    refused(r, "--fractions", "5", "outside [0, 1]", "not percent")
    assert written(tmp_path) == []


# ----------------------------------------------------------------------------- devices

def bad_devices():
    import torch
    out = ["gpu", "cuda:99", "cuda:x"]
    if not torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.mark.parametrize("device", bad_devices())
@pytest.mark.parametrize("script", [FINETUNE, EVALUATE, REPLAY])
def test_unusable_device_refused_before_loading(tmp_path, bomb, monkeypatch, script, device):
    argv = [*script, "--model", bomb, "--out", tmp_path / "o", "--device", device]
    if (script[0], device) in (("finetune.py", "cuda:99"), ("evaluate.py", "gpu")):
        line = refused(run_script(*argv, env=OFFLINE), "--device", device)
    else:
        line = refused_in_process(monkeypatch, argv, "--device", device)
    assert "could not load" not in line and written(tmp_path) == []


def test_check_device_accepts_cpu_and_unset():
    assert common.check_device("cpu").type == "cpu" and common.check_device(None).type in ("cpu", "cuda")


# ----------------------------------------------------------------------------- model paths

@pytest.mark.parametrize("path", ["tests/no_such_model", "./nope", "../nope", "~/no_such_model_dir", "a/b/c", "nope/",
                                  "nope", "org/name"])
def test_missing_model_fails_at_once(tmp_path, monkeypatch, path):
    argv = [*EVALUATE, "--model", path, "--out", tmp_path / "o.json"]
    t0 = time.time()
    if path in ("tests/no_such_model", "./nope", "org/name"):
        line = refused(run_script(*argv, env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")}), path)
    else:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        line = refused_in_process(monkeypatch, argv, path)
    assert ("HF_HUB_OFFLINE" in line) == (path == "org/name")  # only an org/name can be a hub id
    assert ("tests/ exists here" in line) == (path == "tests/no_such_model")
    assert time.time() - t0 < 30 and written(tmp_path) == []


def test_hub_id_without_network_fails_fast_or_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint, "_hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(checkpoint, "_hub_cached", lambda repo: None)
    with pytest.raises(common.UserError, match="cannot be reached"):
        checkpoint.resolve_model_path("someorg/somemodel")
    monkeypatch.setattr(checkpoint, "_hub_cached", lambda repo: str(tmp_path))
    assert checkpoint.resolve_model_path("someorg/somemodel") == str(tmp_path)  # offline: the cached snapshot
    monkeypatch.setattr(checkpoint, "_hub_reachable", lambda timeout=0: True)
    assert checkpoint.resolve_model_path("someorg/somemodel") == "someorg/somemodel"


# ----------------------------------------------------------------------------- outputs

def test_evaluate_out_naming_a_folder_leaves_nothing(tmp_path, bomb):
    (tmp_path / "int").mkdir()
    r = run_script(*EVALUATE, "--model", bomb, "--out", tmp_path / "int", env=OFFLINE)
    refused(r, "--out", "is a folder")
    assert written(tmp_path) == ["int"] and os.listdir(tmp_path / "int") == []


@pytest.mark.parametrize("script,out", [(EVALUATE, "e.json"), (CURVATURE, "c.json"), (FINETUNE, "dir")])
def test_existing_out_refused_without_overwrite(tmp_path, bomb, script, out):
    p = tmp_path / out
    if out == "dir":
        p.mkdir()
    else:
        p.write_text("{}")
    r = run_script(*script, "--model", bomb, "--out", p, env=OFFLINE)
    refused(r, "already exists", "--overwrite")
    assert written(tmp_path) == [out] and (out == "dir" or p.read_text() == "{}")


def test_curvature_taylor_out_refused_without_overwrite(tmp_path):
    ref = tmp_path / "ab"
    ref.mkdir()
    (ref / "taylor.json").write_text("{}")
    r = run_script(*CURVATURE, "--model", "tiny", "--out", tmp_path / "c.json", "--reference", ref, "--taylor_out",
                   "taylor.json", env=OFFLINE)
    refused(r, "--taylor_out", "already exists")
    assert not (tmp_path / "c.json").exists() and (ref / "taylor.json").read_text() == "{}"


def test_evaluate_overwrite_replaces(tmp_path):
    out = tmp_path / "e.json"
    out.write_text("{}")
    r = run_script(*EVALUATE, "--model", "tiny", "--out", out, "--limit", "4", "--overwrite", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["tasks"]["arc"]["n"] == 4 and (tmp_path / "e_samples.jsonl").is_file()
    assert "%" in r.stdout  # accuracies printed in percent


# ----------------------------------------------------------------------------- help

@pytest.mark.parametrize("module", [finetune, evaluate, replay, curvature])
def test_help_has_every_default_and_a_text(module):
    parser = module.build_parser()
    text = parser.format_help()
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help, f"{a.option_strings} has no help text"
        if a.default is not None and not a.required:
            assert f"(default: {a.default})" in " ".join(text.split()), a.option_strings


# ----------------------------------------------------------------------------- runs that work

@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("cli")
    small = {"steps": 1, "train_size": 32, "batch_size": 4}  # toxigen: 13 groups
    finetune.train_stage({"model": "tiny", "task": "toxigen", "out": str(root / "A"), **small})
    finetune.train_stage({"model": str(root / "A"), "task": "arc", "out": str(root / "AB"), **small})
    return root


def test_finetune_eval_prints_the_final_folder(tmp_path, tiny_path):
    out = tmp_path / "m"
    r = run_script("finetune.py", "--model", "tiny", "--task", "arc", "--out", out, "--steps", "1", "--train_size",
                   "16", "--batch_size", "4", "--eval_tasks", "arc", "--eval_limit", "4", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert ".tmp" not in r.stdout + r.stderr and f"-> {os.path.join(out, 'eval.json')}" in r.stdout
    assert (out / "eval.json").is_file()


def test_nan_loss_names_a_real_fix(tmp_path, tiny_path):
    with pytest.raises(common.UserError) as e:
        finetune.train_stage({"model": "tiny", "task": "arc", "out": str(tmp_path / "m"), "steps": 4,
                              "train_size": 8, "batch_size": 2, "lr": 1e30})
    assert "lower --lr" in str(e.value) and "--bf16 off" not in str(e.value) and not (tmp_path / "m").exists()


def test_replay_fractions_folders_percent_lines_and_overwrite(chain):
    out = chain / "replay"
    args = ["replay.py", "--model", chain / "AB", "--task", "toxigen", "--out", out, "--fractions", "0,0.5",
            "--steps", "1", "--train_size", "32", "--batch_size", "4", "--eval_limit", "6", "--first_stage",
            chain / "A"]
    r = run_script(*args, env=OFFLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(out / "replay_summary.json"))
    assert [(p["name"], p["fraction"]) for p in s["points"]] == [("fraction0", 0), ("fraction0.5", 0.5)]
    assert "in [0, 1]" in s["units"] and s["points"][1]["n_examples"] == 16
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  fraction")]
    assert len(lines) == 2 and all("forgetting toxigen" in ln and ln.endswith("%") for ln in lines)
    assert ".partial" not in r.stdout and ".tmp" not in r.stdout
    refused(run_script(*args, "--lr", "1e-4", env=OFFLINE), "exists with other settings", "--overwrite")
    r = run_script(*args, "--lr", "1e-4", "--overwrite", env=OFFLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(out / "fraction0.5" / "point.json"))["settings"]["lr"] == 1e-4


def test_curvature_warns_on_a_task_outside_the_chain(chain, tmp_path):
    a = chain / "A"
    common_args = ["--samples", "4", "--max_iter", "3", "--micro_batch_size", "4", "--backend", "torch"]
    r = run_script("curvature.py", "--model", a, "--task", "arc", "--out", tmp_path / "c.json", *common_args,
                   env=OFFLINE)
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "not in --model's chain" in ln]
    assert len(warn) == 1 and "toxigen" in warn[0]
    res = json.load(open(tmp_path / "c.json"))
    assert res["task_in_chain"] is False and res["chain"] == ["toxigen"]
    for what in ("task arc", "4 samples", "backend", f"-> {tmp_path / 'c.json'}"):
        assert what in r.stdout, what
    r = run_script("curvature.py", "--model", a, "--task", "toxigen", "--out", tmp_path / "c.json", "--overwrite",
                   *common_args, env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert "not in --model's chain" not in r.stderr and json.load(open(tmp_path / "c.json"))["task_in_chain"] is True
