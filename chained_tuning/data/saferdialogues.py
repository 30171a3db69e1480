"""SaFeRDialogues (Ung et al. 2022): a conversation ending in feedback about something unsafe; the answer is a
graceful response, generated, not chosen (the one generative task); no groups.

Files: DIR/saferdialogues/saferdialogues_dataset/{train,valid,test}.txt (or directly in DIR/saferdialogues/), the
official splits in ParlAI's text format (docs/data.md). One example per episode: the context turns (newline-separated,
the last one the feedback) as the prompt's text, the first label (the recovery response) as the one option.
Prompt: synthetic.SD_INSTRUCTION and the conversation. The stand-in: synthetic.synthetic_task("saferdialogues").
"""
import os

from ..common import UserError
from .readers import first_existing
from .synthetic import sd_example, synthetic_task

NAME = "saferdialogues"
KIND = "safety"
GENERATIVE = True
SD_FILES = [("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")]


def load(d, **_options):
    """The official splits: one example per episode, the context turns (newline-separated, the last
    one the feedback) as the prompt's text and the first label (the recovery response) as the answer."""
    base = os.path.join(d, "saferdialogues")
    out, files = {}, []
    for split, name in SD_FILES:
        p = first_existing([os.path.join(base, "saferdialogues_dataset", name), os.path.join(base, name)],
                           f"SaFeRDialogues {split} split (ParlAI text format, see its SOURCE.md)")
        files.append(p)
        exs = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    fl = _parse_parlai_line(line, p, n)
                    ex = sd_example(f"{split}-{n}", fl["text"], next(x for x in fl["labels"] if x.strip()))
                    if "original_metadata" in fl:
                        ex.extra = {"original_metadata": fl["original_metadata"]}
                    exs.append(ex)
        if not exs:
            raise UserError(f"{p}: the SaFeRDialogues {split} split holds no episodes; restore the original file "
                            f"(the release has train 6306, valid 788, test 788 lines)")
        out[split] = exs
    return out, {"files": files, "split_method": "official train/valid/test"}


load_saferdialogues = load


def _parlai_unescape(value):
    """A ParlAI text-format value as written: its escaped tab, newline and pipe restored."""
    return value.replace("\\t", "\t").replace("\\n", "\n").replace("__PIPE__", "|")


def _parse_parlai_line(line, path, n):
    """One episode of a ParlAI text-format file: tab-separated key:value fields; `labels` split on "|"
    (several acceptable answers) after the split, so an escaped pipe stays in its label."""
    fields = {}
    for part in line.rstrip("\n").split("\t"):
        if ":" not in part:
            continue
        k, v = part.split(":", 1)
        fields[k] = [_parlai_unescape(x) for x in v.split("|")] if k == "labels" else _parlai_unescape(v)
    have = ", ".join(sorted(fields)) or "none"
    for key in ("text", "labels"):
        if key not in fields or not any(x.strip() for x in ([fields[key]] if key == "text" else fields[key])):
            raise UserError(f"{path}:{n}: ParlAI line without a {key}: field (fields found: {have}); "
                            f"SaFeRDialogues lines hold text:, labels: and episode_done:True; restore the original file")
    # One line per episode: a line that leaves its episode open would need the next line as its context.
    if fields.get("episode_done", "True") != "True":
        raise UserError(f"{path}:{n}: episode_done:{fields['episode_done']}, but every SaFeRDialogues line is a whole "
                        f"episode (episode_done:True); restore the original file")
    return fields


def synthetic():
    return synthetic_task(NAME)
