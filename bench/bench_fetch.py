"""Figures of `python tasks.py --fetch` on this machine, from a loopback server standing in for the datasets' hosts
(tests/loopback_mirror.py: ../shared/data's files at their official paths, ARC as a zip built from them,
SaFeRDialogues as a tar.gz of a ParlAI-format fixture); no network. Prints markdown: the fetch of every task
(files, bytes, time), a rerun's requests, each failure case with its exact message.

    python bench/bench_fetch.py [--data ../shared/data] [--keep]
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
from chained_tuning.data import fetch as fetch_data, sources  # noqa: E402
from loopback_mirror import LoopbackMirror  # noqa: E402

TOXIGEN = sources.SAFENLP_GH + "data/toxiGen.json"


def cli(*args, env=None):
    """tasks.py run as a user runs it: (exit code, stdout, stderr, wall seconds)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "tasks.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1", **(env or {})}, timeout=600)
    return r.returncode, r.stdout, r.stderr.strip(), time.monotonic() - t0


def fetch_time(stdout):
    m = re.search(r"fetched into .* in ([0-9.]+)s", stdout)
    return float(m.group(1)) if m else 0.0


def fetch_every_task(m, out):
    """One fetch per task (the time of each, as one would see it), then all six at once on the filled folder."""
    rows = []
    for task in sources.TASK_NAMES:
        n0 = len(m.file_requests())
        code, stdout, err, wall = cli("--fetch", out, "--mirror", m.url, "--no_hub", "--tasks", task)
        rec = json.load(open(os.path.join(out, sources.RECORD))) if os.path.exists(
            os.path.join(out, sources.RECORD)) else {"files": {}}
        mine = [v for v in rec["files"].values() if v["task"] == task]
        total = sum(len(files) for _, files in sources.task_files(task))
        rows.append((task, code, f"{len(mine)}/{total}", sum(v["bytes"] for v in mine),
                     sum(v["verified"] for v in mine), len(m.file_requests()) - n0, fetch_time(stdout), wall,
                     err.replace("error: ", "")[:160] + ("..." if len(err) > 166 else "")))
    return rows


def saferdialogues_pinned(m, out):
    """The fixture archive with its own hash pinned (in process): that the unpacking lands where the loader reads."""
    ds = sources.DATASETS["saferdialogues"]
    served = hashlib.sha256(m.body(m.path_of(sources.SD_TAR))).hexdigest()
    sources.DATASETS["saferdialogues"] = replace(ds, downloads=(replace(ds.downloads[0], sha256=served),))
    try:
        t0 = time.monotonic()
        with contextlib.redirect_stdout(io.StringIO()) as said:
            code = fetch_data.main(["--fetch", out, "--mirror", m.url, "--no_hub", "--tasks", "saferdialogues"])
        return code, time.monotonic() - t0, said.getvalue().strip().splitlines()[-1]
    finally:
        sources.DATASETS["saferdialogues"] = ds


def failure_cases(m, work):
    """(case, exit code, the exact error line, what was left where the loaders look)."""
    cases = []

    def case(name, fault_url, fault, *args, env=None, prepare=None):
        d = os.path.join(work, re.sub(r"\W+", "_", name))
        if prepare:
            prepare(d)
        if fault_url:
            m.faults[m.path_of(fault_url)] = fault
        code, stdout, err, _ = cli("--fetch", d, *args, env=env)
        m.faults.clear()
        cases.append((name, code, err, loader_view(d)))
        return d

    common = ("--mirror", m.url, "--no_hub")
    case("corrupted file (one byte changed)", TOXIGEN, "corrupt", *common, "--tasks", "toxigen")
    case("truncated file (sent whole, half its size)", sources.CSQA2_GH + "dataset/CSQA2_dev.json.gz", "truncate",
         *common, "--tasks", "csqa2")
    case("404", sources.ARC_ZIP, "404", *common, "--tasks", "arc")
    d = case("server stops mid-file (every try of the run)", TOXIGEN, ("stop", 0.4, 1 + sources.RETRIES), *common,
             "--tasks", "toxigen")
    n0 = len(m.requests)
    code, _, err, _ = cli("--fetch", d, *common, "--tasks", "toxigen")
    resumed = [r for r in m.requests[n0:] if r[0] == m.path_of(TOXIGEN)]
    cases.append(("... its rerun", code, f"(exit {code}) requests: {resumed}", loader_view(d)))
    case("BBQ: the categories ../shared/data lacks", None, None, *common, "--tasks", "bbq")
    case("SaFeRDialogues: an archive that is not ParlAI's", None, None, *common, "--tasks", "saferdialogues")
    case("--offline, nothing there", None, None, "--offline", "--tasks", "toxigen,arc")
    case("host unreachable", None, None, "--mirror", "http://127.0.0.1:9", "--no_hub", "--tasks", "toxigen")
    case("--tasks nope", None, None, "--tasks", "nope")
    case("--mirror /nonexistent", None, None, "--mirror", "/nonexistent")
    return cases


def loader_view(d):
    """Files under the loaders' names that did not check (none expected); '.bad' and staged parts listed apart."""
    if not os.path.isdir(d):
        return "DIR not created"
    bad, parts = [], []
    for root, _, names in os.walk(d):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), d)
            if n.endswith(".bad"):
                bad.append(rel)
            elif n.endswith(".part"):
                parts.append(rel)
    return f"kept aside: {', '.join(bad) or '-'}; staged: {', '.join(parts) or '-'}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = p.parse_args()
    if not os.path.isdir(args.data):
        sys.exit(f"error: --data {args.data} is not a folder; point it at ../shared/data")
    os.environ["TQDM_DISABLE"] = "1"  # the figures, not the progress lines
    work = tempfile.mkdtemp(prefix="bench_fetch_")
    try:
        with LoopbackMirror(args.data, work) as m:
            report(m, work)
    finally:
        if args.keep:
            print(f"\n(kept {work})")
        else:
            shutil.rmtree(work)


def report(m, work):
    out = os.path.join(work, "data")
    print(f"## Fetch of each task from the loopback server ({m.url}), python {sys.version.split()[0]}\n")
    print("| task | exit | files in place | bytes | sha256 verified | files served | fetch s | wall s (with start-up) | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = fetch_every_task(m, out)
    for r in rows:
        print("| " + " | ".join(str(x) if not isinstance(x, float) else f"{x:.2f}" for x in r) + " |")
    code, t, last = saferdialogues_pinned(m, os.path.join(work, "sd"))
    print(f"\nSaFeRDialogues with the fixture archive's own hash pinned (in process): exit {code}, {t:.2f}s, "
          f"`{last}` (the shipped pin is ParlAI's, so the fixture is refused above, as it must be).")
    print(f"\nTotal: {sum(r[3] for r in rows)} bytes in {sum(r[6] for r in rows):.2f}s of fetching, "
          f"{sum(r[7] for r in rows):.2f}s wall for {len(rows)} commands.\n")
    n0 = len(m.requests)
    code, stdout, _, wall = cli("--fetch", out, "--mirror", m.url, "--no_hub", "--tasks", "arc,csqa,csqa2,toxigen")
    print(f"## Rerun (arc,csqa,csqa2,toxigen in place)\n\nexit {code}, {len(m.requests) - n0} requests, {wall:.2f}s "
          f"wall: `{stdout.strip().splitlines()[-1]}`\n")
    n0 = len(m.requests)
    code, _, _, wall = cli("--fetch", out, "--mirror", m.url, "--no_hub")
    again = m.requests[n0:]
    rec = json.load(open(os.path.join(out, sources.RECORD)))["files"]
    placed = {m.path_of(dl.url) for t in sources.TASK_NAMES for dl, files in sources.task_files(t)
              if all(f.dest in rec for f in files)}
    print(f"All six again: exit {code}, {len(again)} requests in {wall:.2f}s wall ({sum(r[2] == 404 for r in again)} "
          f"answered 404, {sum(r[2] == 200 for r in again)} served), {len([r for r in again if r[0] in placed])} of "
          f"them for a download whose files are in place.\n")
    print("## Failure cases (exact lines)\n")
    for name, code, err, left in failure_cases(m, work):
        print(f"- **{name}** -> exit {code}; {left}\n\n  ```\n  {err}\n  ```")


if __name__ == "__main__":
    main()
