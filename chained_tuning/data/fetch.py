"""The six datasets of the study from their original releases into DIR, in the layout tasks.py's loaders read with
--data_dir, each file checked against the table in sources.py before it gets a name a loader reads.

    python tasks.py --fetch DIR [--tasks arc,csqa,...] [--mirror URL_OR_DIR] [--offline] [--bbq_intersectional]
    python tasks.py --check DIR         # per task: present/missing, rows per split, sha256, what the study would use
    FETCH=1 PROFILE=real-tiny DATA_DIR=DIR bash run_all.sh

Downloads land in DIR/.fetch/ (an interrupted one is resumed with an HTTP Range request) and are renamed into place
once complete and checked: the sha256 pinned here or, where no one has hashed the file yet, the release's row count
(its sha256 is then recorded in DIR/FETCHED.json at first fetch and reported as unverified). A file that fails is
kept aside as <name>.bad. --mirror (or CHAINED_TUNING_MIRROR) stands in for the official hosts: a folder or base URL
holding the same files under <host>/<path>. Where that first source fails, ARC, CommonsenseQA, CSQA 2.0 and BBQ are
rebuilt from the Hugging Face Hub (the optional `datasets` package) as the release's records, checked the same way.
ToxiGen v2 has no Hub copy (the Hub's toxigen-data is another, 9,900-row set) and is never substituted.
"""
import argparse
import csv
import gzip
import hashlib
import http.client
import json
import os
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from datetime import datetime, timezone

from ..common import UserError, die_on_user_error, write_json_atomic
from .sources import (
    BACKOFF_S, CHUNK, DATASETS, MIRROR_ENV, RECORD, RETRIES, STAGE, SourceError, TASK_NAMES, TIMEOUT_S,
    parse_task_names, task_files)


# --------------------------------------------------------------------------------------------
# Checks.

def sha256_of(path, opener=open):
    h = hashlib.sha256()
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def count_rows(path, name):
    """Rows as the loaders count them (lines that are not blank, a JSON array's items, a CSV's records), the kind
    taken from `name`, the file's name in DIR; None where it does not parse."""
    try:
        if name.endswith((".jsonl", ".txt", ".json.gz")):
            with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        with open(path, encoding="utf-8", newline="") as f:
            return len(json.load(f)) if name.endswith(".json") else max(sum(1 for _ in csv.reader(f)) - 1, 0)
    except (OSError, EOFError, ValueError, TypeError, csv.Error):
        return None


def verify(f, path, recorded=None, vouched=False):
    """(status, sha256, rows, why): "verified" (the pinned sha256, a .gz's pinned content, or a member of an archive
    whose pinned sha256 checked: `vouched`, now or as recorded), "unverified" (no pin; the release's rows, the sha256
    recorded at first fetch) or "mismatch" (why: expected vs got)."""
    sha, recorded = sha256_of(path), recorded or {}
    rows = count_rows(path, f.dest) if not f.optional else None
    if f.sha256:
        if sha == f.sha256 or (f.content_sha256 and _gz_sha(path) == f.content_sha256):
            return "verified", sha, rows, ""
        return "mismatch", sha, rows, f"sha256 mismatch: expected {f.sha256}, got {sha}"
    if recorded.get("sha256") not in (None, sha):
        return "mismatch", sha, rows, f"sha256 changed since the first fetch: recorded {recorded['sha256']}, got {sha}"
    if vouched or recorded.get("verified"):
        return "verified", sha, rows, ""
    if f.rows is not None and rows != f.rows:
        return "mismatch", sha, rows, f"row count mismatch: expected {f.rows} rows, got {rows}"
    return "unverified", sha, rows, ""


def _gz_sha(path):
    try:
        return sha256_of(path, gzip.open)
    except (OSError, EOFError):
        return None


def read_record(d):
    try:
        with open(os.path.join(d, RECORD), encoding="utf-8") as fh:
            return {"files": {}, "archives": {}, **json.load(fh)}
    except (OSError, ValueError):
        return {"files": {}, "archives": {}}


def state_of(d, f, record):
    """(status, path, rows, why) of a file as it is in DIR: "missing" or verify()'s status."""
    for name in (f.dest, *f.aliases):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            status, _, rows, why = verify(f, p, record["files"].get(name))
            return status, p, rows, why
    return "missing", os.path.join(d, f.dest), None, ""


# --------------------------------------------------------------------------------------------
# Transfers: from a mirror folder, or HTTP resumed with Range.

class Progress:
    """Bytes of one file: a tqdm bar on a terminal, a line per 10% elsewhere (a log). TQDM_DISABLE=1: neither."""

    def __init__(self, label, total, done=0, file=None):
        self.file, self.label, self.total, self.done = file or sys.stderr, label, total, done
        self.quiet = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
        self.bar, self.tenth = None, self._tenth()
        # A bar on a terminal; in a log a bar is one long line of carriage returns, so whole lines there.
        if not self.quiet and getattr(self.file, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                            file=self.file, leave=False)

    def _tenth(self):
        return 10 * self.done // self.total if self.total else 0

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and self._tenth() > self.tenth:
            self.tenth = self._tenth()
            print(f"fetch: {self.label} {10 * self.tenth}% ({self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB)",
                  file=self.file, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def is_url(s):
    return urllib.parse.urlsplit(s).scheme in ("http", "https")


def source_of(url, mirror):
    """The official URL, or its <host>/<path> under the mirror (a base URL, or a folder)."""
    if not mirror:
        return url
    u = urllib.parse.urlsplit(url)
    if is_url(mirror):
        return mirror.rstrip("/") + "/" + u.netloc + u.path
    return os.path.join(mirror, u.netloc, *urllib.parse.unquote(u.path).lstrip("/").split("/"))


def transfer(src, part, label, offline=False):
    """src to `part`, whole, appended to what an interrupted transfer left there; one that breaks off is retried."""
    if offline:
        raise SourceError("--offline", network=True)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    for attempt in range(RETRIES + 1):
        try:
            return (_http_get if is_url(src) else _copy_local)(src, part, label)
        except SourceError as e:
            if not e.resumable or attempt == RETRIES:
                raise
            time.sleep(BACKOFF_S * (attempt + 1))


def _copy_local(src, part, label):
    if not os.path.isfile(src):
        raise SourceError(f"not in the mirror: {src}")
    with open(src, "rb") as i, open(part, "wb") as o:  # a local copy is not worth resuming
        _stream(i, o, Progress(label, os.path.getsize(src)))


def _http_get(url, part, label):
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "chained-tuning-fetch/1", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return  # the part was whole already: the check decides
        raise SourceError(f"HTTP {e.code} ({e.reason})", resumable=e.code >= 500) from None
    except (urllib.error.URLError, OSError) as e:
        raise SourceError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({getattr(e, 'reason', e)})",
                          network=True) from None
    with resp:
        if resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            have = 0  # the server ignored the range (or answered another): start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if have else "wb") as o:
            try:
                got = _stream(resp, o, Progress(label, total, have))
            except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise SourceError(f"the transfer of {url} broke off ({type(e).__name__}); {part} keeps the bytes "
                                  f"received: rerun to resume", resumable=True) from None
    if total is not None and have + got < total:
        raise SourceError(f"the connection closed after {have + got} of {total} bytes of {url}; {part} keeps them: "
                          f"rerun to resume", resumable=True)


def _stream(i, o, bar):
    got = 0
    try:
        for block in iter(lambda: i.read(CHUNK), b""):
            o.write(block)
            got += len(block)
            bar.update(len(block))
    finally:
        bar.close()
    return got


# --------------------------------------------------------------------------------------------
# Fetching: the first source (the official host or the mirror), then the Hub.

def _staged(d, name):
    return os.path.join(d, STAGE, *name.split("/"))


def install(d, task, f, part, origin, record, out, vouched=False):
    """A complete staged file renamed to its name in DIR once it checks; one that does not goes to <name>.bad,
    which no loader reads."""
    status, sha, rows, why = verify(f, part, vouched=vouched)
    dest = os.path.join(d, f.dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if status == "mismatch":
        os.replace(part, dest + ".bad")
        raise SourceError(f"{why}; kept aside as {dest}.bad")
    os.replace(part, dest)
    record["files"][f.dest] = {"task": task, "from": origin, "sha256": sha, "bytes": os.path.getsize(dest),
                               "rows": rows, "verified": status == "verified",
                               "fetched_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write_json_atomic(os.path.join(d, RECORD), record)  # after each file: an interrupted run keeps what it checked
    note = "verified" if status == "verified" else "UNVERIFIED (no pinned hash; recorded in FETCHED.json)"
    print(f"fetch: {f.dest}: {os.path.getsize(dest)} bytes, {'-' if rows is None else rows} rows, sha256 {note}",
          file=out, flush=True)


def fetch_archive(d, dl, src, offline, record):
    """The archive, whole and checked, in DIR/.fetch/ (one put there by hand is taken too); its path."""
    name = os.path.basename(urllib.parse.urlsplit(dl.url).path)
    arc = _staged(d, name)
    if not os.path.isfile(arc):
        transfer(src, arc + ".part", name, offline)
        os.replace(arc + ".part", arc)
    sha = sha256_of(arc)
    if dl.sha256 and sha != dl.sha256:
        os.replace(arc, arc + ".bad")
        raise SourceError(f"{name}: sha256 mismatch: expected {dl.sha256}, got {sha}; kept aside as {arc}.bad")
    record["archives"][dl.url] = {"from": src, "sha256": sha, "verified": bool(dl.sha256)}
    return arc


def _open_archive(arc, kind):
    """(the open archive, {member path: opener})."""
    if kind == "zip":
        z = zipfile.ZipFile(arc)
        return z, {n.removeprefix("./"): (lambda n=n: z.open(n)) for n in z.namelist()}
    t = tarfile.open(arc, "r:gz")
    return t, {m.name.removeprefix("./"): (lambda m=m: t.extractfile(m)) for m in t.getmembers() if m.isfile()}


def unpack(d, task, dl, todo, arc, origin, record, out):
    """The members of a checked archive into place; [(file, error)] of those that failed. The archive goes once
    unpacked; one with a bad member is kept aside (.bad), so the next run downloads it again."""
    name, failed = os.path.basename(arc), []
    try:
        handle, members = _open_archive(arc, dl.archive)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        os.replace(arc, arc + ".bad")
        raise SourceError(f"{name} is no readable {dl.archive} ({e}); kept aside as {arc}.bad") from None
    with handle:
        for f in todo:
            if f.member not in members:
                failed.append((f, SourceError(f"{f.member} is not in {name}")))
                continue
            part = _staged(d, f.dest) + ".part"
            os.makedirs(os.path.dirname(part), exist_ok=True)
            try:
                with members[f.member]() as i, open(part, "wb") as o:
                    _stream(i, o, Progress(f.member, None))
                install(d, task, f, part, f"{origin}#{f.member}", record, out, vouched=bool(dl.sha256))
            except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as e:
                failed.append((f, SourceError(f"{f.member} in {name} is unreadable ({e})")))
            except SourceError as e:
                failed.append((f, e))
    if any(not f.optional for f, _ in failed):
        os.replace(arc, arc + ".bad")
    else:  # the optional members it lacks (or that failed) are not worth downloading the archive again
        os.remove(arc)
        record["archives"][dl.url]["unpacked"] = True
        write_json_atomic(os.path.join(d, RECORD), record)
    return failed


def fetch_first(d, task, dl, todo, opts, record, out):
    """The files of one download from the official host or the mirror; [(file, error)] of those that failed (the
    download failing as a whole raises)."""
    src = source_of(dl.url, opts.mirror)
    origin = src if is_url(src) else os.path.abspath(src)
    if dl.archive:
        return unpack(d, task, dl, todo, fetch_archive(d, dl, src, opts.offline, record), origin, record, out)
    part = _staged(d, todo[0].dest) + ".part"
    transfer(src, part, os.path.basename(todo[0].dest), opts.offline)
    install(d, task, todo[0], part, origin, record, out)
    return []


def hub_rows(repo, config, split):
    """The rows of one split of a Hub dataset, through `datasets` (an optional dependency)."""
    try:
        import datasets
    except ImportError:
        raise SourceError("the second source, the Hugging Face Hub, needs the `datasets` package: "
                          "pip install datasets") from None
    try:
        return list(datasets.load_dataset(repo, config, split=split))
    except Exception as e:  # noqa: BLE001 - the Hub client raises many kinds; each is this source failing
        raise SourceError(f"{repo} [{config or 'default'}/{split}] on the Hub: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}", network=isinstance(e, OSError)) from None


def fetch_hub(d, task, todo, record, out):
    """Files rebuilt from the Hub's copy as the release's records, then checked as any download; [(file, error)]."""
    convert, dump = DATASETS[task].hub
    failed = []
    for f in todo:
        repo, config, split = f.hub
        try:
            data = dump(convert(hub_rows(repo, config, split)))
            part = _staged(d, f.dest) + ".part"
            os.makedirs(os.path.dirname(part), exist_ok=True)
            with open(part, "wb") as o:
                o.write(data)
            install(d, task, f, part, f"hf://datasets/{repo}{'/' + config if config else ''} [{split}]", record, out)
        except SourceError as e:
            failed.append((f, e))
    return failed


def _fetch_download(d, task, dl, todo, opts, record, out):
    try:
        failed = fetch_first(d, task, dl, todo, opts, record, out)
    except SourceError as e:
        failed = [(f, e) for f in todo]
    retry = [f for f, _ in failed if f.hub]
    if retry and opts.hub and not opts.offline:
        print(f"fetch: {task}: the first source failed ({failed[0][1]}); trying the Hugging Face Hub", file=out)
        second = dict((f.dest, e) for f, e in fetch_hub(d, task, retry, record, out))
        failed = [(f, SourceError(f"{e}; the Hub: {second[f.dest]}", e.network and second[f.dest].network)
                   if f.dest in second else e) for f, e in failed if not f.hub or f.dest in second]
    return [(dl, f, e) for f, e in failed]


def _ready(d, f, record, opts, out):
    """Whether a file is in place and checks; one that does not is set aside (<name>.bad) to be fetched again."""
    status, path, _, why = state_of(d, f, record)
    if status == "mismatch" and not opts.offline:
        os.replace(path, path + ".bad")
        print(f"fetch: {path}: {why}; kept aside as {path}.bad, fetching it again", file=out)
    return status in ("verified", "unverified")


def fetch(d, names, mirror=None, offline=False, intersectional=False, hub=True, out=None):
    """Every file of the tasks `names` into DIR: 0 when all are in place, else a UserError naming what is not."""
    out, opts = out or sys.stdout, argparse.Namespace(mirror=mirror, offline=offline, hub=hub)
    if os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"--fetch {d} is a file; give the folder to fetch the datasets into")
    record, work, n = read_record(d), [], 0
    for task in names:
        print(f"fetch: {task}: {DATASETS[task].title}; licence: {DATASETS[task].licence}", file=out)
        for dl, files in task_files(task, intersectional):
            n += len(files)
            todo = [f for f in files if not _ready(d, f, record, opts, out)
                    and not (f.optional and record["archives"].get(dl.url, {}).get("unpacked"))]
            work += [(task, dl, todo)] if todo else []
    if not work:
        print(f"fetch: all {n} files of {','.join(names)} are in place in {d} and check; nothing downloaded", file=out)
        return 0
    if not offline:
        try:
            os.makedirs(d, exist_ok=True)
            if not os.access(d, os.W_OK):
                raise PermissionError("not writable")
        except OSError as e:
            raise UserError(f"--fetch {d}: cannot write there ({e}); choose a folder you can write to") from None
    t0, failed = time.monotonic(), []
    for task, dl, todo in work:
        failed += _fetch_download(d, task, dl, todo, opts, record, out)
    for root, _, _ in sorted(os.walk(os.path.join(d, STAGE)), key=lambda w: -len(w[0])):
        if not os.listdir(root):  # partial downloads (resumed next time) and .bad archives stay
            os.rmdir(root)
    return _report(d, failed, sum(len(t) for *_, t in work), time.monotonic() - t0, out)


def _report(d, failed, n_todo, seconds, out):
    hard = [(dl, f, e) for dl, f, e in failed if not f.optional]
    broken = {dl.url for dl, _, _ in hard}
    for dl, f, e in failed:  # an optional file is worth a line only where its download did not fail as a whole
        if f.optional and dl.url not in broken:
            print(f"fetch: warning: {f.dest} not fetched ({e}); no loader reads it", file=out)
    for dl, f, e in hard:
        print(f"fetch: FAILED {f.dest} (from {dl.url}): {e}", file=out)
    print(f"fetch: {n_todo - len(failed)} of {n_todo} files fetched into {d} in {seconds:.2f}s", file=out)
    if not hard:
        return 0
    if all(e.network for _, _, e in hard):
        raise UserError(_by_hand(d, hard))
    groups = {}
    for _, f, e in hard:
        groups.setdefault(str(e), []).append(f.dest)
    raise UserError(f"{len(hard)} file(s) not fetched into {d}: " + " | ".join(
        f"{', '.join(dests)}: {why}" for why, dests in groups.items()) + "; the files that checked are in place: "
        "fix the source (or --mirror) and rerun")


def _by_hand(d, hard):
    """One line for a fetch that reached no host: what is missing and where to put it by hand."""
    why = str(hard[0][2])
    where = ", ".join(dict.fromkeys(
        f"{dl.url} -> {_staged(d, os.path.basename(urllib.parse.urlsplit(dl.url).path))} (unpacked on the next run)"
        if dl.archive else f"{dl.url} -> {os.path.join(d, f.dest)}" for dl, f, _ in hard))
    fix = "then rerun" + ("" if why == "--offline" else f", or pass --mirror URL_OR_DIR (or set {MIRROR_ENV})")
    return f"{why}: {len(hard)} file(s) missing from {d}; put them there by hand: {where}; {fix}"


# --------------------------------------------------------------------------------------------
# --check: what is in DIR, and what the study would use.

def inspect(d, names, intersectional=False, loaders=None):
    """One dict per task: status, files present/total, rows per split, sha256, the source the study would use
    (with `loaders`, tasks.LOADERS, whether the loader reads the files)."""
    record, table = read_record(d), []
    for task in names:
        states = [(f, *state_of(d, f, record)) for _, files in task_files(task, intersectional) for f in files]
        need = [s for s in states if not s[0].optional]
        missing = [f.dest for f, st, *_ in need if st == "missing"]
        bad = [f"{f.dest} ({why})" for f, st, _, _, why in states if st == "mismatch"]
        splits = {}
        for f, st, _, rows, _ in need:
            if f.split and rows is not None and st != "missing":
                splits[f.split] = splits.get(f.split, 0) + rows
        status = ("MISMATCH" if bad else "complete" if not missing else
                  "missing" if len(missing) == len(need) else f"partial ({len(missing)} missing)")
        count = {k: sum(st == k for _, st, *_ in states) for k in ("verified", "unverified", "mismatch")}
        table.append({"task": task, "status": status, "missing": missing, "mismatch": bad,
                      "files": f"{sum(st != 'missing' for _, st, *_ in states)}/{len(states)}",
                      "rows": ", ".join(f"{k} {v}" for k, v in splits.items()) or "-",
                      "sha256": ", ".join(f"{v} {k}" for k, v in count.items() if v) or "-",
                      "uses": _study_source(task, d, status, len(missing), loaders)})
    return table


def _study_source(task, d, status, n_missing, loaders):
    if status == "missing":
        return "none: the study stops (synthetic stand-in only without DATA_DIR)"
    if status == "MISMATCH":
        return "none: a file is not the release's (fetch again)"
    if loaders is not None:
        try:
            loaders[task](d)
        except UserError as e:
            return f"none: the loader refuses: {e}"
    return "real data" + (f" ({n_missing} file(s) missing)" if n_missing else "")


def check(d, names, intersectional=False, loaders=None, out=None):
    """inspect()'s table printed; 0 when every task is complete, else a UserError naming the incomplete ones."""
    out = out or sys.stdout
    if not os.path.isdir(d):
        raise UserError(f"--check {d} is not a folder; fetch the datasets into it with: python tasks.py --fetch {d}")
    table = inspect(d, names, intersectional, loaders)
    cols = {"task": "task", "status": "status", "files": "files", "rows": "rows per split", "sha256": "sha256",
            "uses": "the study uses"}
    width = {k: max(len(h), *(len(r[k]) for r in table)) for k, h in cols.items()}
    for r in [cols] + table:
        print("  ".join(r[k].ljust(width[k]) for k in cols).rstrip(), file=out)
    for r in table:
        print("".join(f"check: {r['task']}: missing {m}\n" for m in r["missing"]) +
              "".join(f"check: {r['task']}: not the release's: {m}\n" for m in r["mismatch"]), end="", file=out)
    short = [r["task"] for r in table if r["status"] != "complete"]
    if short:
        raise UserError(f"{len(short)} of {len(table)} tasks incomplete in {d} ({', '.join(short)}); "
                        f"fetch them with: python tasks.py --fetch {d} --tasks {','.join(short)}")
    return 0


# --------------------------------------------------------------------------------------------
# The command line, tasks.py's too (add_fetch_options on its parser, then run).

def add_fetch_options(p):
    g = p.add_argument_group("datasets (chained_tuning/data/fetch.py)")
    g.add_argument("--fetch", metavar="DIR", help="download the original release files into DIR, verified")
    g.add_argument("--check", metavar="DIR", help="per task: present/missing, rows per split, sha256, what the study "
                                                  "would use")
    g.add_argument("--tasks", help=f"with --fetch/--check: comma-separated, of {','.join(TASK_NAMES)} (default: all)")
    g.add_argument("--mirror", metavar="URL_OR_DIR", help=f"a folder or base URL holding the files under <host>/<path> "
                                                          f"of their official URLs (default: ${MIRROR_ENV})")
    g.add_argument("--offline", action="store_true", help="download nothing; name what is missing and where it goes")
    g.add_argument("--bbq_intersectional", action="store_true",
                   help="also BBQ's Race_x_SES and Race_x_gender (to bbq/intersectional/, out of the nine categories)")
    g.add_argument("--no_hub", action="store_true", help="never take the Hugging Face Hub as the second source")
    return p


def resolve_mirror(value):
    """--mirror, else $CHAINED_TUNING_MIRROR: a base URL or an existing folder (file:// too); None without one."""
    flag = "--mirror" if value else MIRROR_ENV
    value = value or os.environ.get(MIRROR_ENV) or None
    if value is None or is_url(value):
        return value
    path = urllib.parse.unquote(urllib.parse.urlsplit(value).path) if value.startswith("file://") else value
    if "://" in path or not os.path.isdir(path):
        raise UserError(f"{flag} {value}: neither a folder nor an http(s) URL; give a folder (or base URL) holding the "
                        f"release files under <host>/<path>, e.g. MIRROR/raw.githubusercontent.com/nyu-mll/BBQ/...")
    return os.path.abspath(path)


def run(args, loaders=None, out=None):
    """--fetch, then --check, from add_fetch_options' options; the exit code."""
    if not (args.fetch or args.check):
        raise UserError("--tasks, --mirror, --offline, --bbq_intersectional and --no_hub go with --fetch DIR or "
                        "--check DIR")
    names = parse_task_names(args.tasks)
    code = 0
    if args.fetch:
        code = fetch(args.fetch, names, resolve_mirror(args.mirror), args.offline, args.bbq_intersectional,
                     not args.no_hub, out)
    if args.check:
        code = check(args.check, names, args.bbq_intersectional, loaders, out) or code
    return code


def main(argv=None, loaders=None):
    args = add_fetch_options(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    return die_on_user_error(lambda: run(args, loaders))


if __name__ == "__main__":
    sys.exit(main())
