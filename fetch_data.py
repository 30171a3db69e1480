"""The six datasets of the study from their original releases into DIR, in the layout tasks.py's loaders read with
--data_dir, each file checked against the table below before it gets a name a loader reads.

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
from dataclasses import dataclass
from datetime import datetime, timezone

from common import UserError, die_on_user_error, write_json_atomic

TASK_NAMES = ("arc", "csqa", "csqa2", "toxigen", "bbq", "saferdialogues")  # tasks.TASKS
MIRROR_ENV = "CHAINED_TUNING_MIRROR"
RECORD, STAGE = "FETCHED.json", ".fetch"
TIMEOUT_S, RETRIES, BACKOFF_S = 60, 2, 0.5  # a dropped transfer is resumed RETRIES times before the run gives up
CHUNK = 1 << 16


@dataclass(frozen=True)
class File:
    dest: str                   # under DIR, where the loaders read it
    sha256: str = None          # None: recorded at first fetch, reported as unverified
    rows: int = None            # the release's count (the papers, ../shared/data/*/SOURCE.md)
    member: str = None          # its path inside the download's archive
    split: str = None           # what --check counts its rows under; None: no loader reads it (a failure warns)
    hub: tuple = None           # (repo, config, split) of its copy on the Hugging Face Hub
    content_sha256: str = None  # .gz: of the text inside, what a file rebuilt from the Hub is checked against
    aliases: tuple = ()         # other names the loader reads (../shared/data's)
    intersectional: bool = False

    @property
    def optional(self):
        return self.split is None and self.rows is None


@dataclass(frozen=True)
class Download:
    url: str
    files: tuple
    archive: str = None         # "zip" or "tar.gz"
    sha256: str = None          # of the archive, which vouches for its members


@dataclass(frozen=True)
class Dataset:
    title: str
    licence: str
    downloads: tuple
    hub: tuple = None           # (Hub rows -> release records, records -> the file's bytes)


class SourceError(Exception):
    """One source failed. network: no host was reached; resumable: the transfer broke off, its part is kept."""

    def __init__(self, msg, network=False, resumable=False):
        super().__init__(msg)
        self.network, self.resumable = network, resumable


# --------------------------------------------------------------------------------------------
# The Hub's schemas back to the release's records, pure (rows in, records out). The releases hold no nulls, so a
# null is a column the Hub's table added; keys take the release's order, and the dumpers reproduce its bytes.

def _choices(c):
    return list(zip(c["label"], c["text"])) if isinstance(c, dict) else [(x["label"], x["text"]) for x in c]


def arc_from_hub(rows):
    """allenai/ai2_arc (ARC-Easy) -> ARC-Easy-*.jsonl: choices.text/choices.label zipped back into question.choices."""
    return [{"id": r["id"], "question": {"stem": r["question"], "choices": [{"text": t, "label": lb}
                                                                         for lb, t in _choices(r["choices"])]},
             "answerKey": r["answerKey"]} for r in rows]


def csqa_from_hub(rows):
    """tau/commonsense_qa -> *_rand_split.jsonl; the Hub's test answerKey "" is the release's absent key."""
    return [{**({"answerKey": r["answerKey"]} if r.get("answerKey") else {}), "id": r["id"],
             "question": {"question_concept": r["question_concept"],
                          "choices": [{"label": lb, "text": t} for lb, t in _choices(r["choices"])],
                          "stem": r["question"]}} for r in rows]


CSQA2_KEYS = ("id", "question", "answer", "confidence", "date", "relational_prompt", "topic_prompt",
              "relational_prompt_used", "topic_prompt_used", "validations")
BBQ_KEYS = ("example_id", "question_index", "question_polarity", "context_condition", "category", "answer_info",
            "additional_metadata", "context", "question", "ans0", "ans1", "ans2", "label")
BBQ_NESTED = {"answer_info": ("ans0", "ans1", "ans2"),
              "additional_metadata": ("subcategory", "stereotyped_groups", "version", "source")}


def _ordered(row, keys, nested=None):
    return {k: _ordered(row[k], nested[k]) if nested and k in nested else row[k]
            for k in keys if row.get(k) is not None}


def csqa2_from_hub(rows):
    """tasksource/commonsense_qa_2.0 -> CSQA2_*.json.gz records (the test split has no answer, no validations)."""
    return [_ordered(r, CSQA2_KEYS) for r in rows]


def bbq_from_hub(rows):
    """oskarvanderwal/bbq (one config per category) -> data/<Category>.jsonl records."""
    return [_ordered(r, BBQ_KEYS, BBQ_NESTED) for r in rows]


def dump_jsonl(records, compact=False):
    """ARC's files are compact with UTF-8 kept; CommonsenseQA's, CSQA 2.0's and BBQ's use json's defaults."""
    if compact:
        return "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records).encode()
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def dump_jsonl_gz(records):
    return gzip.compress(dump_jsonl(records), mtime=0)  # gzip's header is not the release's: content_sha256 checks


# --------------------------------------------------------------------------------------------
# The table. sha256: the files of ../shared/data (the official bytes, each SOURCE.md says from where), BBQ's
# Religion, Sexual_orientation and MTurk files as in github.com/nyu-mll/BBQ at bea11bd, and the SaFeRDialogues
# archive as ParlAI's build.py pins it. rows: the papers' and SOURCE.md's counts, checked where no sha256 is pinned.

GH = "https://raw.githubusercontent.com/"
ARC_ZIP = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
ARC_IN = "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-"
CSQA_S3 = "https://s3.amazonaws.com/commensenseqa/"
CSQA2_GH, SAFENLP_GH, BBQ_GH = GH + "allenai/csqa2/master/", GH + "microsoft/SafeNLP/main/", GH + "nyu-mll/BBQ/main/"
SD_TAR = "http://parl.ai/downloads/saferdialogues/saferdialogues_v0.4.tar.gz"
MTURK = "supplemental/MTurk_validation/for_upload/"
ARC = {"Train": ("train", "c62e5482d8c01f2d5a7f24239ac9db3b12f9e47267c4e3f088c6ffe41d5545ef", 2251,
                 "6e3b7ab5de9e07718c987fb90319343b0b6a74332f562841029510a53518bea4"),
       "Dev": ("validation", "f4364b808a68df6bf500ce1070fb0105d40cacd2391c210deb00ff83ba75d1f4", 570,
               "3feca4e9933d73fd911754882a7415af38143449640f9a3f70f53171a2d72d67"),
       "Test": ("test", "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be", 2376,
                "a34b48662c4bf713ee6fb7af7786a17880bb7e7e448a1c72c952b4150edee0d7")}
CSQA = {"train_rand_split": ("train_data", "train", "train", 9741,
                             "58ffa3c8472410e24b8c43f423d89c8a003d8284698a6ed7874355dedd09a2fb"),
        "dev_rand_split": ("dev_data", "test", "validation", 1221,
                           "3210497fdaae614ac085d9eb873dd7f4d49b6f965a93adadc803e1229fd8a02a"),
        "test_rand_split_no_answers": ("test_data", None, "test", None,  # no labels: no loader reads it
                                       "b426896d71a9cd064cf01cfaf6e920817c51701ef66028883ac1af2e73ad5f29")}
CSQA2 = {"train": ("train", "train", 9264, "cdaccded500ea4093ee88ee28d9f61f2b210ee09c6b996d1242d66aeac0b3b32",
                   "5fdff27d115c4d03d8e420ebf1fc8b53815f16160848dfc3e10f17328f6ddfd1"),
         "dev": ("test", "validation", 2541, "2804671317521bb79784037482b7e84e891c707f6ac369607209059b3df3b884",
                 "1a0b18dfb4a8ec73e0ba5872df2126e53d004e69b9e78999777990b9a4892688"),
         "test_no_answers": (None, "test", None, "0c5b41de67ac538b246cf9b6afbed01f60d2bbd07323ff3ed8740c8ce38d31f4",
                             "6be1c1db16d8480f9982394ed5b81379ec323456bbfcb6ec3074f161024418f0")}
BBQ = {  # the nine single-axis categories (BBQ paper, Table 1: 31,372 rows), then the two intersectional ones
    "Age": (3680, "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60"),
    "Disability_status": (1556, "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f"),
    "Gender_identity": (5672, None), "Race_ethnicity": (6880, None), "SES": (6864, None),
    "Nationality": (3080, "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090"),
    "Physical_appearance": (1576, "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb"),
    "Religion": (1200, "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616"),
    "Sexual_orientation": (864, "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd"),
    "Race_x_SES": (11160, None), "Race_x_gender": (15960, None)}
BBQ_MTURK = {  # the validation rounds tasks.bbq_human_validated reads: rows, sha256
    "finalval/donotupload_full_data_for_mturk_full_finalval.csv":
        (70, "dc1e9d5bc1761291dca138227ed98b427dec675b39de7028c60e0a01f8663de7"),
    "round1/donotupload_full_data_for_mturk_full.csv":
        (127, "dcd48c7575ff99eea7f8a59173c4b5ab8ae637da2a29c363470afc3e853f25ef"),
    "round2/donotupload_full_data_for_mturk_full_round2.csv":
        (94, "2bab9159dbb534c7d8dfaecefb955654b07d459b29cdb08f9c738bac4e39dc0e"),
    "round3/donotupload_full_data_for_mturk_full_round3.csv":
        (70, "e90db0cd3356ef07d1ba645164e081f1549467eb7f2150a037fa4f0757373d1a"),
    "round4/donotupload_full_data_for_mturk_full_round4.csv":
        (6, "cda55c6f5908d83af093a3305e753283f6598c326e86bc55f25a56027ddab6cf"),
    "round5/donotupload_full_data_for_mturk_full_round5.csv":
        (58, "49b4c2f1d698e1dec51c23b550629d00f85db4de249b26cc529adc3cdbf816e0"),
    "round6/donotupload_full_data_for_mturk_full_round6.csv":
        (13, "79624a1f4f31c8b24c758798779a4d2e53fa36c7189d1db1b0ee3e3ecb477f74")}
SD = {"train": ("train", 6306), "valid": ("validation", 788), "test": ("test", 788), "valid_bad": (None, None),
      "test_bad": (None, None)}


def _one(url, dest, sha256, **kw):
    return Download(url, (File(dest, sha256, **kw),))


def _bbq():
    # The intersectional files go to bbq/intersectional/: load_bbq reads every bbq/data/*.jsonl as one category.
    return tuple(_one(f"{BBQ_GH}data/{c}.jsonl", f"bbq/{'intersectional' if '_x_' in c else 'data'}/{c}.jsonl", sha,
                      rows=rows, split="all", hub=("oskarvanderwal/bbq", c, "test"), intersectional="_x_" in c)
                 for c, (rows, sha) in BBQ.items()) + tuple(
        _one(BBQ_GH + MTURK + p, f"bbq/{MTURK}{p}", sha, rows=rows) for p, (rows, sha) in BBQ_MTURK.items()) + (
        _one(BBQ_GH + "LICENSE", "bbq/LICENSE", "95df2e9564862e51d69683a899b6dcc8218d577057bdf67322880769ff85f29e"),)


DATASETS = {
    "arc": Dataset("ARC-Easy (Clark et al. 2018)", "CC BY-SA 4.0 (AI2)", (Download(ARC_ZIP, tuple(
        File(f"arc_easy/ARC-Easy-{n}.jsonl", sha, rows, ARC_IN + n + ".jsonl", split,
             ("allenai/ai2_arc", "ARC-Easy", split)) for n, (split, sha, rows, _) in ARC.items()) + tuple(
        File(f"arc_easy/ARC-Easy-{n}.csv", sha, member=ARC_IN + n + ".csv") for n, (*_, sha) in ARC.items()),
        archive="zip"),), (arc_from_hub, lambda recs: dump_jsonl(recs, compact=True))),
    "csqa": Dataset("CommonsenseQA v1.11 (Talmor et al. 2019)", "MIT per the card of tau/commonsense_qa on the Hub "
                    "(the release names none)", tuple(
        _one(f"{CSQA_S3}{n}.jsonl", f"commonsenseqa/{n}.jsonl", sha, rows=rows, split=split,
             hub=("tau/commonsense_qa", None, hub), aliases=(f"commonsenseqa/{alias}.jsonl",))
        for n, (alias, split, hub, rows, sha) in CSQA.items()), (csqa_from_hub, dump_jsonl)),
    "csqa2": Dataset("CommonsenseQA 2.0 (Talmor et al. 2021)", "CC BY 4.0", tuple(
        _one(f"{CSQA2_GH}dataset/CSQA2_{n}.json.gz", f"csqa2/CSQA2_{n}.json.gz", sha, rows=rows, split=split,
             content_sha256=inner, hub=("tasksource/commonsense_qa_2.0", None, hub))
        for n, (split, hub, rows, sha, inner) in CSQA2.items()) + (
        _one(CSQA2_GH + "LICENSE", "csqa2/LICENSE",
             "b0795076b6787cb92063ffd73df82a6930705dca321b249e10a9ad5175428fff"),),
        (csqa2_from_hub, dump_jsonl_gz)),
    "toxigen": Dataset("ToxiGen v2 (Hosseini et al. 2023, the revised ToxiGen)", "MIT (SafeNLP, and ToxiGen's own)", (
        _one(SAFENLP_GH + "data/toxiGen.json", "toxigen_v2/toxiGen.json",
             "42863b997f545833b8c9bfe7fc950aeaccc274d49f7386384db147face745fc3", rows=6514, split="all"),
        _one(SAFENLP_GH + "LICENSE", "toxigen_v2/SafeNLP_LICENSE.txt",
             "386e3ac8535699d89fc33c6f2caa5b18ef5f6ea8d11a9885beaed181290da544"),
        _one(SAFENLP_GH + "data/TOXIGEN%20LICENSE", "toxigen_v2/TOXIGEN_LICENSE.txt",
             "56f1dd6be56e0afd33c2c070fa73448fb0eddcbcd60a55a53a8a26a0f6b4c205"))),
    "bbq": Dataset("BBQ (Parrish et al. 2022)", "CC BY 4.0", _bbq(), (bbq_from_hub, dump_jsonl)),
    "saferdialogues": Dataset("SaFeRDialogues (Ung, Xu & Boureau 2022)", "CC BY-NC 4.0: NON-COMMERCIAL use only", (
        Download(SD_TAR, tuple(File(f"saferdialogues/saferdialogues_dataset/{n}.txt", None, rows,
                                    f"saferdialogues_dataset/{n}.txt", split) for n, (split, rows) in SD.items()),
                 "tar.gz", "ef6a5f85fdab1fdea4c8d50ba38644f41c7bad5d04611777b79bcd85d750c4c6"),)),
}


def task_files(task, intersectional=False):
    """(download, [files]) of a task; BBQ's intersectional files only when asked."""
    for dl in DATASETS[task].downloads:
        files = [f for f in dl.files if intersectional or not f.intersectional]
        if files:
            yield dl, files


def parse_task_names(spec, flag="--tasks"):
    names = [t.strip() for t in (spec or ",".join(TASK_NAMES)).split(",") if t.strip()]
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise UserError(f"{flag} {spec!r}: unknown task(s) {', '.join(map(repr, bad))}; "
                        f"choose from {','.join(TASK_NAMES)}")
    return list(dict.fromkeys(names))


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
    g = p.add_argument_group("datasets (fetch_data.py)")
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
