"""Reading the original release files for the task modules: every missing file, bad line and missing field is a
UserError that names the file, the line and the fix. Docs: docs/data.md (the layout of DIR)."""
import json
import os

from ..common import UserError
from .synthetic import LETTERS


def need(path, what):
    if not os.path.isfile(path):
        raise UserError(f"missing data file {path} ({what}); lay --data_dir out like ../shared/data "
                        f"or drop --data_dir to use the embedded synthetic tasks")
    return path


def first_existing(paths, what):
    for p in paths:
        if os.path.isfile(p):
            return p
    return need(paths[0], what + " (also looked for: " + ", ".join(os.path.basename(p) for p in paths[1:]) + ")")


def read_jsonl(path, opener=open):
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
    if not rows:
        raise UserError(f"{path} holds no rows; restore the original file")
    return rows


def field(row, key, path, n, types=None):
    if not isinstance(row, dict) or key not in row or row[key] is None:
        raise UserError(f"{path}:{n}: row has no '{key}' field; restore the original file or remove the row")
    if types is not None and not isinstance(row[key], types):
        raise UserError(f"{path}:{n}: field '{key}' has type {type(row[key]).__name__}; the original format is expected")
    return row[key]


def mc_from_choices(row, path, n):
    """ARC / CommonsenseQA rows: question{stem, choices[{label, text}]}, answerKey (letters or 1-N)."""
    q = field(row, "question", path, n, dict)
    stem = field(q, "stem", path, n, str)
    choices = field(q, "choices", path, n, list)
    if not 2 <= len(choices) <= len(LETTERS):
        raise UserError(f"{path}:{n}: {len(choices)} choices; 2 to {len(LETTERS)} are supported")
    labels = [str(field(c, "label", path, n)) for c in choices]
    texts = [str(field(c, "text", path, n)) for c in choices]
    key = str(field(row, "answerKey", path, n))
    if key not in labels:
        raise UserError(f"{path}:{n}: answerKey {key!r} is not one of the choice labels {labels}; fix the row")
    return str(field(row, "id", path, n)), stem, texts, labels.index(key)
