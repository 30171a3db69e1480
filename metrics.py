"""Forgetting, biased forgetting, and the paper's tables and figures, from a folder of runs.

    python metrics.py --runs runs/tiny --out runs/tiny/results      # tables, figures, results/report.md
    python metrics.py --runs runs --out results --lr 1e-5 --k 3 --n_boot 2000
    python metrics.py --runs runs --out results --n_boot 0          # no bootstrap (fastest)
    python metrics.py --methods full=runs/tiny/full,lora=runs/tiny/lora --out runs/tiny/results  # LoRA vs full

    import metrics                                   # the equations: fractions in, fractions out
    metrics.forgetting(0.80, 0.70)                   # Acc_A(theta_A) - Acc_A(theta_AB) = 0.10
    metrics.biased_forgetting({"a": 0.5, "b": 0.1}, 0.2)                # max_g F_A,g - F_A = 0.3
    metrics.paired_bootstrap_ci([1, 1, 0, 1], [0, 1, 0, 1], ["a", "a", "b", "b"], n_resamples=200)

Files needed: metrics.py and the chained_tuning/ folder beside it (numpy, scipy, pandas, matplotlib; no torch).
The equations and the bootstrap alone are one file, chained_tuning/forgetting.py (numpy and scipy).

It writes report.md (opening with the Findings, the paper's claims checked against the runs, and the generated
"Where this run differs from the paper"), Tables 1 and 2, the group tables, Kendall's tau, Figures 2-14, the
heatmaps, accuracy paths and loss curves, the curvature and Taylor check, the task order, replay, mitigations
and long chains: chained_tuning/report/, one module per part. The runs are read by chained_tuning/runs.py,
whose choose_first_stage is the one first-stage choice rule of the study and of Table 1.
The manual (the definitions, every output and its columns): docs/metrics.md.
"""
import argparse
import contextlib
import os
import shutil
import sys
import tempfile

from chained_tuning.common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, UserError, check_args,
                                   die_on_user_error, in_range)
# Re-exported: `import metrics` and `from metrics import ...` keep reading these names here.
from chained_tuning.forgetting import (CHANCE_SE, NA, TIE_TOL, align_samples, biased_forgetting,
                                       biased_forgetting_vector, chance_flag, forgetting, group_acc, group_forgetting,
                                       k_worst_groups, kendall_tau_b, mean_std, paired_bootstrap_ci,
                                       relative_forgetting, tie_classes, worst_group_forgetting, worst_groups_label)
from chained_tuning.statistics import CORRECTIONS
from chained_tuning.runs import (COMPARED, CURV_FIX, EVAL_FIX, MITIGATION_OPTIONS, REPLAY_FIX, RUN_FIX, TAYLOR_FIX,
                                 Evaluation, LongChain, Pair, Run, check_eval_json, choose_first_stage, copy_preference,
                                 evaluation, example_digests, find_json_files, find_runs, first_stage_problem,
                                 incomparable, is_measured_chain, is_replay_point, load_samples, long_chain_lineages,
                                 lr_distance, measured_forgetting, mitigation_of, number, pair_metrics, pair_runs,
                                 read_json, read_samples, refusal, resolve_parent, runs_by_id, samples_file,
                                 shared_depth, stage_of, walk_folders, walk_json)
from chained_tuning.report.study import CAPABILITY_TASKS, SAFETY_TASKS, Study, build_study, nothing_to_report
from chained_tuning.report.format import (FAILED, INCOMPARABLE, MISSING, PERCENT_COLUMNS, SHORT, TASK_NAMES, Section,
                                          cells, csv_text, exact, markdown_table, rounded, short, significant,
                                          unit_header, write_file)
from chained_tuning.report.plot import MARKERS, chain_colours, figure_files
from chained_tuning.report.tables import (CHANCE_COLUMNS, PAPER_TABLE2, TABLE1_COLUMNS, TABLE2_COLUMNS, bootstrap_chain,
                                          chain_bootstrap, group_rows, section_chance, section_first_task_acc,
                                          section_groups, section_table1, section_table2, train_info)
from chained_tuning.report.figures import (GROUP_BAR_COLUMNS, GROUP_FIGURE_NOTE, base_evaluations, group_bar_rows,
                                           lr_series, read_train_log, section_accuracy_path, section_figure2,
                                           section_figure3, section_figures_9_10, section_forgetting_heatmap,
                                           section_group_heatmap, section_loss_curves, section_lr_figures)
from chained_tuning.report.findings import (NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, finding_curvature, finding_groups,
                                            finding_kendall, finding_lr, finding_order, finding_replay,
                                            findings_section, is_smoke_test)
from chained_tuning.report.deviations import deviations, deviations_section
from chained_tuning.report.write import SECTIONS, run_sections, write_report
from chained_tuning.report import methods

# every public name metrics.py had before its split into the package: what `from metrics import *` gives
__all__ = ["CHANCE_SE", "NA", "TIE_TOL", "align_samples", "biased_forgetting", "biased_forgetting_vector",
           "chance_flag", "forgetting", "group_acc", "group_forgetting", "k_worst_groups", "kendall_tau_b", "mean_std",
           "paired_bootstrap_ci", "relative_forgetting", "tie_classes", "worst_group_forgetting", "worst_groups_label",
           "COMPARED", "CURV_FIX", "EVAL_FIX", "MITIGATION_OPTIONS", "REPLAY_FIX", "RUN_FIX", "TAYLOR_FIX",
           "Evaluation", "LongChain", "Pair", "Run", "check_eval_json", "choose_first_stage", "copy_preference",
           "evaluation", "example_digests", "find_json_files", "find_runs", "first_stage_problem", "incomparable",
           "is_measured_chain", "is_replay_point", "load_samples", "long_chain_lineages", "lr_distance",
           "measured_forgetting", "mitigation_of", "number", "pair_metrics", "pair_runs", "read_json", "read_samples",
           "refusal", "resolve_parent", "runs_by_id", "samples_file", "shared_depth", "stage_of", "walk_folders",
           "walk_json", "CAPABILITY_TASKS", "SAFETY_TASKS", "Study", "build_study", "nothing_to_report", "FAILED",
           "INCOMPARABLE", "MISSING", "PERCENT_COLUMNS", "SHORT", "TASK_NAMES", "Section", "cells", "csv_text", "exact",
           "markdown_table", "rounded", "short", "significant", "unit_header", "write_file", "MARKERS", "chain_colours",
           "figure_files", "CHANCE_COLUMNS", "PAPER_TABLE2", "TABLE1_COLUMNS", "TABLE2_COLUMNS", "bootstrap_chain",
           "chain_bootstrap", "group_rows", "section_chance", "section_first_task_acc", "section_groups",
           "section_table1", "section_table2", "train_info", "GROUP_BAR_COLUMNS", "GROUP_FIGURE_NOTE",
           "base_evaluations", "group_bar_rows", "lr_series", "read_train_log", "section_accuracy_path",
           "section_figure2", "section_figure3", "section_figures_9_10", "section_forgetting_heatmap",
           "section_group_heatmap", "section_loss_curves", "section_lr_figures", "NOT_REPRODUCED", "NOT_TESTABLE",
           "REPRODUCED", "finding_curvature", "finding_groups", "finding_kendall", "finding_lr", "finding_order",
           "finding_replay", "findings_section", "is_smoke_test", "deviations", "deviations_section", "SECTIONS",
           "run_sections", "write_report", "NUMERIC_RULES", "build_parser", "run", "main"]


NUMERIC_RULES = {"lr": POSITIVE, "k": AT_LEAST_1, "n_boot": NON_NEGATIVE, "boot_seed": NON_NEGATIVE,
                 "n_perm": NON_NEGATIVE, "ci": in_range(0, 1, open_lo=True, open_hi=True)}


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                 epilog="The manual: docs/metrics.md")
    ap.add_argument("--runs", default=None, help="folder written by run_all.sh (searched for run.json files)")
    ap.add_argument("--methods", default=None, metavar="full=DIR,lora=DIR",
                    help="instead of --runs: compare the studies METHOD=both wrote (each DIR a runs folder with its "
                         "results/): does LoRA forget less, and less unevenly (methods.md)")
    ap.add_argument("--out", required=True, help="folder for the tables, figures and report.md (percent)")
    ap.add_argument("--profile", default=None, help='profile named in report.md; unset: study.json "profile", '
                                                    'else "unknown"')
    ap.add_argument("--lr", type=float, default=None, help='learning rate (> 0) of the second stage of Table 1\'s '
                                                          'chains; unset: study.json "lr", else the most common '
                                                          'second-stage lr')
    ap.add_argument("--k", type=int, default=3, help="number of worst groups (>= 1) for top-k biased forgetting")
    ap.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples (>= 0; 0: no CIs)")
    ap.add_argument("--boot_seed", type=int, default=0, help="seed (>= 0) of the bootstrap and the permutations")
    ap.add_argument("--ci", type=float, default=0.95, help="confidence level of the bootstrap CIs, a fraction in "
                                                          "(0, 1); 1 - ci: the tests' threshold")
    ap.add_argument("--n_perm", type=int, default=2000, help="permutations (>= 0; 0: no tests) of the test of uneven "
                                                            "forgetting across groups (seeded by --boot_seed)")
    ap.add_argument("--correction", default="holm", choices=CORRECTIONS,
                    help="multiple-comparison correction of the per-group tests within a pair: holm (family-wise) "
                         "or bh (Benjamini-Hochberg, false discovery rate)")
    return ap


@contextlib.contextmanager
def output_folder(out_dir):
    """A temporary folder beside out_dir whose files move into out_dir when the block ends without an error, so a
    user error at any point leaves out_dir as it was."""
    out = os.path.abspath(out_dir)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".tmp-{os.path.basename(out)}-")
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir} ({e}); pass a writable folder") from None
    try:
        yield tmp
        os.makedirs(out, exist_ok=True)
        for f in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, f), os.path.join(out, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(opts):
    """metrics.py's work for parsed arguments: every output made in a temporary folder beside --out, then moved
    into it, so a user error at any point leaves --out as it was. Returns the exit code (0)."""
    check_args(vars(opts), NUMERIC_RULES)
    if (opts.runs is None) == (opts.methods is None):
        raise UserError("give --runs RUNS_DIR (a study's report) or --methods full=DIR,lora=DIR (the comparison)")
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise UserError(f"--out {opts.out} is a file; give a folder")
    if opts.methods is not None:
        folders = methods.parse_methods(opts.methods)
        with output_folder(opts.out) as tmp:
            findings = methods.write_comparison(folders, tmp, alpha=1 - opts.ci, n_perm=opts.n_perm,
                                                seed=opts.boot_seed)
        for f in findings.itertuples(index=False):
            print(f"metrics: {f.claim}: {f.verdict}")
        print(f"metrics: LoRA against full fine-tuning -> {opts.out}/methods.md")
        return 0
    study = build_study(opts.runs, opts.lr, exclude=opts.out)
    empty = nothing_to_report(study)
    if empty:
        raise UserError(empty)
    if opts.profile is None:
        opts.profile = str(study.study_json.get("profile", "unknown"))
    with output_folder(opts.out) as tmp:
        probs, refused = write_report(study, tmp, opts)
    print(f"metrics: {len(study.pairs)} chained pairs from {opts.runs} -> {opts.out}/report.md (percent)")
    if refused:
        print(f"metrics: {len(refused)} refused, their evaluations cannot be compared (also in report.md):")
        for p in refused:
            print(f"  - {p}")
    if probs:
        print(f"metrics: {len(probs)} missing or failed runs (also in report.md):")
        for p in probs:
            print(f"  - {p}")
    return 0


def main(argv=None):
    """The CLI: returns 0; a user error exits 2 with one `error:` line (die_on_user_error)."""
    return die_on_user_error(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
