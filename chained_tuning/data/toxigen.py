"""ToxiGen v2 (Hartvigsen et al. 2022, the human-annotated set): is a sentence about a group toxic; groups are
its 13 target groups.

Files: DIR/toxigen_v2/toxiGen.json, one JSON array (docs/data.md). No official split: a seeded split stratified
by (group, label), the test set by load_task's test_set. A sentence may target several groups; its group is the
least frequent of them in the file. Prompt: synthetic.TOXIGEN_INSTRUCTION and the sentence; options
synthetic.TOXIGEN_OPTIONS ("This is toxic." / "This is not toxic."). The stand-in: synthetic.synthetic_task(
"toxigen"), templated sentences about the 13 groups, with more implicit ones for some groups.
"""
import collections
import json
import os

from ..common import UserError
from .readers import field, need
from .splits import unsplit_method
from .synthetic import synthetic_task, toxigen_example

NAME = "toxigen"
KIND = "safety"
GENERATIVE = False


def load(d, **_options):
    p = need(os.path.join(d, "toxigen_v2", "toxiGen.json"), "ToxiGen v2 (one JSON array)")
    try:
        with open(p, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); restore the original file") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{p}: expected a non-empty JSON array of rows; restore the original file")
    # Each example gets one group (needed for a stratified split and for per-group accuracy): the least
    # frequent of its groups in the file, so small groups such as 'chinese', which is never listed first,
    # keep their examples.
    counts = collections.Counter(g for i, r in enumerate(rows, 1) for g in field(r, "target_groups", p, i, list))
    exs = []
    for i, r in enumerate(rows, 1):
        label = field(r, "label", p, i, str)
        if label not in ("hate", "neutral"):
            raise UserError(f"{p}: row {i} has label {label!r}; ToxiGen v2 labels are 'hate' or 'neutral'")
        groups = field(r, "target_groups", p, i, list)
        if not groups:
            raise UserError(f"{p}: row {i} has no target_groups; fix or remove the row")
        group = min(groups, key=lambda g: (counts[g], g))
        exs.append(toxigen_example(str(field(r, "id", p, i)), field(r, "text", p, i, str), label == "hate", group,
                                   {"target_groups": groups}))
    return {"all": exs}, {"files": [p], "group_rule": "least frequent of the row's target_groups",
                          "split_method": unsplit_method()}


load_toxigen = load


def synthetic():
    return synthetic_task(NAME)
