"""ARC-Easy (Clark et al. 2018): grade-school science questions with 3 to 5 candidate answers; no groups.

Files: DIR/arc_easy/ARC-Easy-{Train,Dev,Test}.jsonl, the official splits (docs/data.md). Prompt: the paper's
multiple-choice template (synthetic.mc_prompt: "Given the following question and four candidate answers ...",
the choices as "A. text."), options "The best answer is A." ... (synthetic.mc_options). The stand-in:
synthetic.synthetic_task("arc"), questions about the synthetic world's categories.
"""
import os

from ..common import UserError
from .readers import mc_from_choices, need, read_jsonl
from .synthetic import arc_example, synthetic_task

NAME = "arc"
KIND = "capability"
GENERATIVE = False
ARC_CHOICES = ("4", "all")      # ARC-Easy: the paper's 4-choice questions (Table 2: 2241 / 2365), or every one


def load_arc(d, choices="4"):
    """ARC-Easy's official splits; choices="4" keeps the 4-choice questions only (the paper's Table 2 sizes,
    2241 train / 2365 test: its template says "four candidate answers"), "all" keeps the 3- and 5-choice ones."""
    if choices not in ARC_CHOICES:
        raise UserError(f"--arc_choices {choices!r} is not one of {', '.join(ARC_CHOICES)}")
    base = os.path.join(d, "arc_easy")
    out, dropped = {}, {}
    for split, name in [("train", "Train"), ("validation", "Dev"), ("test", "Test")]:
        p = need(os.path.join(base, f"ARC-Easy-{name}.jsonl"), f"ARC-Easy {split} split")
        exs = [arc_example(*mc_from_choices(r, p, n)) for n, r in read_jsonl(p)]
        out[split] = [ex for ex in exs if choices == "all" or len(ex.options) == 4]
        dropped[split] = len(exs) - len(out[split])
    return out, {"files": [os.path.join(base, f"ARC-Easy-{s}.jsonl") for s in ("Train", "Dev", "Test")],
                 "split_method": "official train/dev/test", "arc_choices": choices,
                 "dropped_not_4_choices": dropped}


def load(d, arc_choices="4", **_options):
    return load_arc(d, arc_choices)


def synthetic():
    return synthetic_task(NAME)
