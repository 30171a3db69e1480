"""CommonsenseQA 2.0 (Talmor et al. 2021): yes/no statements; no groups.

Files: DIR/csqa2/CSQA2_train.json.gz and CSQA2_dev.json.gz, gzipped JSON lines (docs/data.md). The official test
split has no answers, so dev is the test set and validation a seeded 10% of train. Prompt: synthetic.CSQA2_INSTRUCTION
and the statement; options synthetic.CSQA2_OPTIONS ("The answer is yes." / "... no."). The stand-in:
synthetic.synthetic_task("csqa2"), true and false statements about the synthetic world.
"""
import gzip
import os

from ..common import UserError
from .readers import field, need, read_jsonl
from .splits import HOLDOUT_FRACTION
from .synthetic import csqa2_example, synthetic_task

NAME = "csqa2"
KIND = "capability"
GENERATIVE = False


def load(d, **_options):
    base = os.path.join(d, "csqa2")
    out = {}
    files = []
    for split, name in [("train", "CSQA2_train.json.gz"), ("test", "CSQA2_dev.json.gz")]:
        p = need(os.path.join(base, name), f"CSQA 2.0 {split} split")
        files.append(p)
        exs = []
        for n, r in read_jsonl(p, opener=gzip.open):
            ans = field(r, "answer", p, n, str).strip().lower()
            if ans not in ("yes", "no"):
                raise UserError(f"{p}:{n}: answer {ans!r} is not yes/no; fix the row")
            exs.append(csqa2_example(str(field(r, "id", p, n)), field(r, "question", p, n, str), ans == "yes"))
        out[split] = exs
    return out, {"files": files, "split_method": "official train; official dev as test (test has no labels); "
                 f"validation = seeded {HOLDOUT_FRACTION:.0%} of train, stratified by label"}


load_csqa2 = load


def synthetic():
    return synthetic_task(NAME)
