"""Where each dataset of the study comes from: the official release files, what lands where in DIR, the sha256 (or
row count) every file is checked against, its licence, and its copy on the Hugging Face Hub with the conversion of
the Hub's rows back into the release's records (pure functions: rows in, records out). fetch.py uses this table."""
import gzip
import json
from dataclasses import dataclass

from ..common import UserError


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

