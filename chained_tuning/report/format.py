"""How the report writes what it computes: a section's result (Section), the task names tables and figures show,
cells (percent, rounded, "n/a" and markers instead of blanks), column headers with their unit, CSV and markdown
tables, and files written through a temporary name.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..common import write_text_atomic
from ..forgetting import NA, mean_std

# Markers a table shows instead of a number (NA, "n/a": not applicable, comes with the equations).
MISSING, FAILED, INCOMPARABLE = "missing", "failed", "incomparable"
# Names in tables and figures: spelled out (an abbreviation such as "TQA" reads as TruthfulQA to most readers).
SHORT = {"arc": "ARC-Easy", "csqa": "CSQA", "csqa2": "CSQA2", "toxigen": "ToxiGen", "bbq": "BBQ",
         "saferdialogues": "SaFeRDialogues"}
TASK_NAMES = {"arc": "ARC-Easy (AI2 Reasoning Challenge, easy set)", "csqa": "CommonsenseQA",
              "csqa2": "CommonsenseQA 2.0",
              "toxigen": "ToxiGen v2 posed as a question (the paper's ToxiGenQA, TQA)",
              "bbq": "BBQ (Bias Benchmark for QA)", "saferdialogues": "SaFeRDialogues (generative, scored for safety)"}


def short(task):
    return SHORT.get(task, task)


@dataclass
class Section:
    """A report section's result: its part of report.md, the files it adds to --out (name -> CSV or markdown
    text, or PNG bytes) and its lines for report.md's lists of problems and of refused pairs."""
    text: str
    files: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    refused: list = field(default_factory=list)


def write_file(path, content):
    """Text or bytes to path, through a temporary name (readable by all, as the report is shared)."""
    write_text_atomic(path, content, mode=0o644)


# Columns written in percent (percentage points), with their _std / _ci_low / _ci_high: their headers say "(%)".
PERCENT_COLUMNS = {"cs_acc_cap", "cs_acc_safety", "cs_forgetting_cap", "sc_acc_cap", "sc_acc_safety",
                   "sc_forgetting_safety", "acc_first", "acc_chained", "forgetting", "task_forgetting",
                   "biased_forgetting", "wg_forgetting", "biased_forgetting_max", "rel_forgetting_cap",
                   "rel_forgetting_safety", "acc", "val_acc", "chance", "fraction", "fractions", "acc_a", "acc_b",
                   "forgetting_a", "change_b", "capability_forgetting", "forgetting_at_0", "recovery_fraction",
                   "forgetting_at_recovery", "acc_tuned", "acc_after", "forgetting_xy", "forgetting_yx",
                   "group_range"}


def unit_header(col):
    """A column's header in CSVs and report tables: "forgetting (%)" for a column in percent, else the name."""
    base = re.sub(r"_(std|ci_low|ci_high)$", "", str(col))
    return f"{col} (%)" if base in PERCENT_COLUMNS or base.startswith("biased_forgetting_top") else str(col)


def csv_text(df):
    """A table as its CSV file holds it: headers with their unit (unit_header), no index."""
    return df.rename(columns=unit_header).to_csv(index=False)


def rounded(x, digits=4):
    """A number rounded for a CSV; nan becomes "n/a" (nothing is left blank)."""
    if isinstance(x, (int, float, np.floating)):
        return NA if math.isnan(x) else round(float(x), digits)
    return x


def exact(x):
    """A value for a CSV at full precision (curvatures and losses span many orders of magnitude): nan is
    "n/a", booleans and strings pass through."""
    if isinstance(x, (float, np.floating)) and not isinstance(x, bool):
        return NA if math.isnan(x) else float(x)
    return x


def cells(values, scale=100.0, marker=MISSING):
    """(mean, std) for a table over seeds: mean*scale, std*scale; marker when no value, "n/a" std for one seed."""
    m, s, n = mean_std([v * scale for v in values])
    if n == 0:
        return marker, marker
    return rounded(m), (rounded(s) if n > 1 else NA)


def markdown_table(df, digits=2):
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return NA if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(map(unit_header, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def significant(df):
    """df with its float cells as 4 significant digits (for report.md tables of values of any scale)."""
    return df.apply(lambda col: col.map(lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) and
                                        not math.isnan(v) else v))


def as_floats(values):
    """Cells as a float array: numbers as they are, markers ("missing", "n/a", ...) nan."""
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=float)
