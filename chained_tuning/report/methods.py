"""LoRA against full fine-tuning: one study run by both methods (run_all.sh METHOD=both writes $RUNS/full and
$RUNS/lora, each with its own results/), compared chain by chain from the two reports' biased_forgetting.csv:
does LoRA forget less, and less unevenly across groups? Each question is a paired sign-flip test over the chains
both methods ran, stated with the same rule line as the paper's claims in the Findings.

    python metrics.py --methods full=runs/tiny/full,lora=runs/tiny/lora --out runs/tiny/results

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import io
import os

import numpy as np
import pandas as pd

from ..common import UserError, read_json
from ..statistics import paired_sign_flip_test
from .findings import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, rule
from .format import as_floats, csv_text, markdown_table, short
from .plot import figure_files, plt

METHODS = ("full", "lora")
# study.json settings both halves must share for their chains to be compared; the learning rates and the LoRA
# settings may differ (each method has its own)
SHARED_SETTINGS = ("model", "data_dir", "seeds", "steps", "eval_limit", "capability_tasks", "safety_tasks",
                   "first_stage", "test_set")
CHAIN = ["first_task", "second_task"]
EXACT_UP_TO = 16   # chains up to which the sign-flip test enumerates every pattern (2^16)


def parse_methods(text):
    """--methods full=DIR,lora=DIR -> {"full": DIR, "lora": DIR}; anything else is refused by name."""
    out = {}
    for part in (text or "").split(","):
        name, sep, folder = part.partition("=")
        if not sep or name.strip() not in METHODS or not folder.strip() or name.strip() in out:
            raise UserError(f"--methods {text!r}: give full=RUNS_DIR,lora=RUNS_DIR (each a study's runs folder with "
                            "its results/ written by metrics.py)")
        out[name.strip()] = folder.strip()
    if set(out) != set(METHODS):
        raise UserError(f"--methods {text!r}: both full= and lora= are needed")
    return out


def read_half(method, runs_dir):
    """(study.json, biased_forgetting.csv) of one method's study; refused by name when missing or when its
    study.json says it ran another method."""
    study_json = os.path.join(runs_dir, "study.json")
    table = os.path.join(runs_dir, "results", "biased_forgetting.csv")
    for path in (study_json, table):
        if not os.path.isfile(path):
            raise UserError(f"--methods {method}={runs_dir}: {path} is missing; run the study (run_all.sh) and "
                            f"metrics.py --runs {runs_dir} --out {runs_dir}/results first")
    settings = read_json(study_json)
    ran = settings.get("method", "full")
    if ran != method:
        raise UserError(f"--methods {method}={runs_dir}: its study.json says METHOD={ran}; give each method its own "
                        "study's runs folder")
    df = pd.read_csv(table, keep_default_na=False).rename(columns=lambda c: c.replace(" (%)", ""))
    return settings, df


def check_shared(settings):
    """Refuse two halves whose chains do not compare: a setting of SHARED_SETTINGS that differs, by name."""
    full, lora = settings["full"], settings["lora"]
    differ = [k for k in SHARED_SETTINGS if full.get(k) != lora.get(k)]
    if differ:
        shown = "; ".join(f"{k}: full {full.get(k)!r}, lora {lora.get(k)!r}" for k in differ)
        raise UserError(f"--methods: the two studies differ in {shown}; their chains are not comparable (rerun "
                        "one of them with the other's settings)")


def chain_rows(tables):
    """One row per chain both methods ran: forgetting and the variance of per-group forgetting of each, and the
    differences LoRA - full (points; points^2)."""
    both = tables["full"].merge(tables["lora"], on=CHAIN, suffixes=("_full", "_lora"))
    col = lambda name: as_floats(both[name]) if name in both else np.full(len(both), np.nan)  # noqa: E731
    ff, fl = col("forgetting_full"), col("forgetting_lora")
    vf, vl = col("group_variance_pts2_full"), col("group_variance_pts2_lora")
    return pd.DataFrame({"first_task": both["first_task"], "second_task": both["second_task"],
                         "forgetting_full (%)": ff, "forgetting_lora (%)": fl, "forgetting_difference (%)": fl - ff,
                         "group_variance_full_pts2": vf, "group_variance_lora_pts2": vl,
                         "group_variance_difference_pts2": vl - vf})


def _verdict(claim, differences, what, unit, alpha, n_perm, seed):
    """The verdict of "LoRA's `what` is lower": a one-sided paired sign-flip test of the mean difference."""
    test = "paired sign-flip permutation test of the mean difference LoRA - full, one-sided (mean < 0)"
    threshold = f"p < {alpha:g}"
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    # exact over 2^n patterns: the smallest p it can give is 2^-n, so fewer chains can never reject
    if n < 2 or 0.5 ** n >= alpha:
        why = (f"{n} chain(s) with {what} under both methods: the smallest p an exact sign-flip test of {n} "
               f"differences can give, {0.5 ** max(n, 0):.3g}, is not below {alpha:g}" if n >= 1 else
               f"no chain with {what} under both methods")
        return claim, NOT_TESTABLE, rule(test, "none (one test)", n, threshold) + why + "."
    if n > EXACT_UP_TO and n_perm < 1:
        return claim, NOT_TESTABLE, rule(test, "none (one test)", n, threshold) + (
            f"{n} chains need sampled sign patterns and --n_perm is 0.")
    t = paired_sign_flip_test(d, n_permutations=n_perm, seed=seed, exact_up_to=EXACT_UP_TO)
    how = "exact over every sign pattern" if t["exact"] else f"{n_perm} seeded sign patterns, seed {seed}"
    verdict = REPRODUCED if t["p_value"] < alpha else NOT_REPRODUCED
    lower = int(np.sum(d < 0))
    return claim, verdict, (rule(test, "none (one test)", n, threshold) +
                            f"mean difference {t['mean']:+.3g} {unit} over {n} chains ({lower} lower with LoRA), "
                            f"p = {t['p_value']:.3g} ({how}).")


def compare(tables, alpha=0.05, n_perm=20000, seed=0):
    """(chain rows, findings rows): forgetting and its unevenness, LoRA against full fine-tuning."""
    rows = chain_rows(tables)
    findings = [
        _verdict("LoRA forgets the first task less than full fine-tuning", rows["forgetting_difference (%)"],
                 "forgetting", "points", alpha, n_perm, seed),
        _verdict("LoRA forgets less unevenly across demographic groups (variance of per-group forgetting)",
                 rows["group_variance_difference_pts2"], "a grouped first task", "points^2", alpha, n_perm, seed),
    ]
    return rows, pd.DataFrame(findings, columns=["claim", "verdict", "evidence"])


def figure(rows):
    """Forgetting of each chain by method (bars), the CSV behind it."""
    labels = [f"{short(a)} -> {short(b)}" for a, b in zip(rows.first_task, rows.second_task)]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2))
    ax.bar(x - 0.2, rows["forgetting_full (%)"], 0.4, label="full fine-tuning")
    ax.bar(x + 0.2, rows["forgetting_lora (%)"], 0.4, label="LoRA")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("forgetting of the first task (points)")
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(frameon=False)
    return figure_files(fig, rows, "figure_methods")


def write_comparison(folders, out_files_dir, alpha=0.05, n_perm=20000, seed=0):
    """Read both halves, refuse what does not compare, and write methods.csv, methods_findings.csv,
    figure_methods.png/.csv and methods.md into out_files_dir. Returns the findings."""
    settings, tables = {}, {}
    for m in METHODS:
        settings[m], tables[m] = read_half(m, folders[m])
    check_shared(settings)
    rows, findings = compare(tables, alpha, n_perm, seed)
    if rows.empty:
        raise UserError(f"--methods: no chain is in both {folders['full']}/results and {folders['lora']}/results")
    files = {"methods.csv": csv_text(rows), "methods_findings.csv": csv_text(findings), **figure(rows)}
    md = io.StringIO()
    md.write("# LoRA against full fine-tuning\n\n")
    md.write(f"Full fine-tuning: {folders['full']}/results/report.md; LoRA: {folders['lora']}/results/report.md "
             "(each with its Table 1, group tables and Findings). Chains both ran, compared here; forgetting in "
             "points, the variance of per-group forgetting in points^2.\n\n## Findings\n\n")
    for f in findings.itertuples(index=False):
        md.write(f"- **{f.claim}: {f.verdict}.** {f.evidence}\n")
    md.write("\n## Chains\n\n" + markdown_table(rows) + "\n\n![](figure_methods.png)\n")
    files["methods.md"] = md.getvalue()
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(os.path.join(out_files_dir, name), mode) as fh:
            fh.write(content)
    return findings
