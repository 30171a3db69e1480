"""Is an existing stage output of run_all.sh what the study asks for now? (No torch import: it runs
before every stage, so it must start fast.)

    python -m chained_tuning.study.stage_check record RUNS NAME OUT -- CMD...   # after the stage succeeded
    python -m chained_tuning.study.stage_check check  RUNS NAME OUT -- CMD...   # before a stage whose OUT exists

A stage is defined by its command line: the script (the first argument ending in .py; the launcher in
front, python or torchrun, does not count) and its options, minus those that do not change the result
(NOT_SETTINGS: where it is written, the device, micro-batching, memory budgets, and curvature.py's
--reference/--taylor_out, which add files elsewhere). `record` writes RUNS/logs/NAME.settings.json with
those settings and a fingerprint of every input under RUNS the command names (the run.json of a model
folder, the content of a file), so a stage built on a model that was made again since is not taken as done.
Paths under RUNS are stored relative to it (a moved runs folder still matches).

`check` exits 0 when the output matches (stdout: an optional note), 3 when it does not (stdout: one line
per difference, naming the stage, the setting and both values). An output without a record (made before
stages recorded their settings) is compared with what the output itself says: finetune.py with run.json's
config, evaluate.py and curvature.py with their JSON's "config", replay.py with replay_summary.json's
settings (and the steps of its trained fraction points); only the options that file holds are compared,
and the note says so.
"""
import hashlib
import json
import os
import sys

from ..common import write_json_atomic  # no torch: common imports it only inside functions

NOT_SETTINGS = {"out", "overwrite", "device", "micro_batch_size", "gradient_checkpointing", "reference",
                "taylor_out", "graph_memory_budget_gb", "backend"}
MISMATCH = 3
RUNS_TAG = "$RUNS"


def parse_command(argv):
    """(script, {option: value}) of a command line: a flag alone is True, several values a list."""
    start = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    if start is None:
        raise ValueError(f"no python script in the stage's command: {' '.join(argv)}")
    opts, key = {}, None
    for a in argv[start + 1:]:
        if a.startswith("--"):
            key, _, val = a[2:].partition("=")
            key = key.replace("-", "_")
            opts[key] = val if val else True
            if val:
                key = None
        elif key is not None:
            old = opts[key]
            opts[key] = a if old is True else (old + [a] if isinstance(old, list) else [old, a])
    return os.path.basename(argv[start]), opts


def rel_to_runs(value, runs):
    """A path under RUNS as "$RUNS/..." (anything else unchanged)."""
    if not isinstance(value, str) or not ("/" in value or os.path.exists(value)):
        return value
    p, r = os.path.realpath(value), os.path.realpath(runs)
    if p == r or p.startswith(r + os.sep):
        return RUNS_TAG + p[len(r):]
    return value


def canonical(value, runs):
    """Comparable form: numbers as floats (1e-3 == 0.001), comma lists and lists as tuples, paths resolved."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return (float(value),)
    parts = value if isinstance(value, list) else str(value).split(",")
    out = []
    for x in parts:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))
            continue
        x = str(x)
        try:
            out.append(float(x))
        except ValueError:
            x = rel_to_runs(x, runs) if not x.startswith(RUNS_TAG) else x
            if not x.startswith(RUNS_TAG) and ("/" in x or os.path.exists(x)):
                x = os.path.realpath(x)
            out.append(x)
    return tuple(out)


def fingerprint(path):
    """What an input is: the run.json of a model folder (made again -> another wall time and log), else
    the file's bytes."""
    if os.path.isdir(path):
        for name in ("run.json", "chained_tuning.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                path = f
                break
        else:
            return "folder"
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def describe(argv, runs, out):
    script, opts = parse_command(argv)
    settings = {k: ([rel_to_runs(x, runs) for x in v] if isinstance(v, list) else rel_to_runs(v, runs))
                for k, v in opts.items() if k not in NOT_SETTINGS}
    inputs = {}
    out_real = os.path.realpath(out)
    for k, v in opts.items():
        if k in NOT_SETTINGS:  # --reference: the chains a Taylor check adds files to, not what it computes from
            continue
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, str) and rel_to_runs(x, runs) != x and os.path.realpath(x) != out_real \
                    and os.path.exists(x):
                inputs[rel_to_runs(x, runs)] = fingerprint(x)
    return {"script": script, "settings": settings, "inputs": inputs}


def record_path(runs, name):
    return os.path.join(runs, "logs", f"{name}.settings.json")


def shown(value, runs):
    """A setting as a person reads it: "$RUNS" replaced by the runs folder, a flag as on/off."""
    if value is None:
        return "(not given)"
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, list):
        return " ".join(shown(x, runs) for x in value)
    s = str(value)
    return runs + s[len(RUNS_TAG):] if s.startswith(RUNS_TAG) else s


def differences(old, new, runs, keys=None):
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [(k, old.get(k), new.get(k)) for k in keys if canonical(old.get(k), runs) != canonical(new.get(k), runs)]


def legacy_settings(script, out):
    """What an output made without a settings record says about its settings, by option name; and the
    file it came from. (None, why) when it says nothing usable."""
    def load(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
    if script == "finetune.py":
        run = load(os.path.join(out, "run.json"))
        return (dict(run["config"]), "run.json") if run and isinstance(run.get("config"), dict) else (None, "run.json")
    if script in ("evaluate.py", "curvature.py"):
        res = load(out)
        if not res or not isinstance(res.get("config"), dict):
            return None, os.path.basename(out)
        cfg = dict(res["config"])
        if script == "evaluate.py":
            cfg["model"] = res.get("model")
            cfg["tasks"] = ",".join(cfg.get("tasks") or [])
        return cfg, os.path.basename(out)
    if script == "replay.py":
        folder = os.path.dirname(out) if os.path.basename(out).startswith(".") else out
        summ = load(os.path.join(folder, "replay_summary.json"))
        if not summ or not isinstance(summ.get("settings"), dict):
            return None, "replay_summary.json"
        cfg = dict(summ["settings"])
        steps = {p.get("steps") for p in summ.get("points", []) if p.get("sweep") == "fraction" and p.get("trained")}
        if len(steps) == 1:
            cfg["steps"] = steps.pop()
        return cfg, "replay_summary.json"
    return None, None


def check(runs, name, out, argv):
    """(problems, note): problems are the lines that stop the study."""
    now = describe(argv, runs, out)
    where = f"stage {name} ({out})"
    rec_file = record_path(runs, name)
    if os.path.isfile(rec_file):
        with open(rec_file) as f:
            rec = json.load(f)
        problems = [f"{where}: {'--' + k} was {shown(a, runs)} when it was made, this study asks for {shown(b, runs)}"
                    for k, a, b in differences(rec.get("settings", {}), now["settings"], runs)]
        if rec.get("script") != now["script"]:
            problems.append(f"{where}: made by {rec.get('script')}, this study asks for {now['script']}")
        for path, fp in rec.get("inputs", {}).items():
            cur = now["inputs"].get(path, fingerprint(runs + path[len(RUNS_TAG):]))
            if cur != fp:
                what = "no longer exists" if cur is None else "was made again after this stage"
                problems.append(f"{where}: its input {shown(path, runs)} {what}")
        return problems, ""
    old, source = legacy_settings(now["script"], out)
    if old is None:
        return [], "no settings record (an older study's output); not checked" + (
            f": its {source} is unreadable" if source else "")
    # only what the file holds can be compared; a flag it has on must be on now too
    keys = [k for k in now["settings"] if k in old]
    keys += [k for k, v in old.items() if v is True and k not in now["settings"] and k not in NOT_SETTINGS]
    problems = [f"{where}: {'--' + k} was {shown(a, runs)} when it was made (its {source}), this study asks "
                f"for {shown(b, runs)}" for k, a, b in differences(old, now["settings"], runs, keys)]
    return problems, f"no settings record (an older study's output); checked against its {source}"


def record(runs, name, out, argv):
    rec = {"stage": name, "output": rel_to_runs(out, runs), **describe(argv, runs, out)}
    write_json_atomic(record_path(runs, name), rec)


def main(argv):
    if len(argv) < 6 or argv[0] not in ("check", "record") or argv[4] != "--":
        print("usage: stage_check.py check|record RUNS NAME OUT -- CMD...", file=sys.stderr)
        return 2
    action, runs, name, out, cmd = argv[0], argv[1], argv[2], argv[3], argv[5:]
    if action == "record":
        record(runs, name, out, cmd)
        return 0
    problems, note = check(runs, name, out, cmd)
    print("\n".join(problems) if problems else note)
    return MISMATCH if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
