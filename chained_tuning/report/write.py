"""report.md and summary.json: every section of the report in order, each on the study as build_study read
it, then the opening (provenance, the Findings, the differences from the paper, refused pairs, missing runs).

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import io
import json
import os

import pandas as pd

from .curvature import section_curvature
from .deviations import deviations, deviations_section
from .figures import (section_accuracy_path, section_figure2, section_figure3, section_figures_9_10,
                      section_forgetting_heatmap, section_group_heatmap, section_loss_curves, section_lr_figures)
from .findings import findings_section
from .format import TASK_NAMES, short, write_file
from .long_chains import section_continual, section_long_chains
from .mitigation import section_mitigation
from .order import section_order
from .replay import section_replay
from .study import CAPABILITY_TASKS, SAFETY_TASKS
from .tables import section_chance, section_first_task_acc, section_groups, section_table1, section_table2

# report.md's sections in order; each is section(study, opts) -> Section
SECTIONS = [section_table1, section_forgetting_heatmap, section_table2, section_groups, section_group_heatmap,
            section_chance, section_figure2, section_figure3, section_figures_9_10, section_accuracy_path,
            section_loss_curves, section_lr_figures, section_first_task_acc, section_curvature, section_replay,
            section_mitigation, section_long_chains, section_continual, section_order]


def run_sections(study, opts):
    """Every section of report.md, in order, each on the study as build_study read it -> [Section]."""
    return [section(study, opts) for section in SECTIONS]


def base_models(study):
    """The base models the two-stage study's runs were tuned from (run.json base_model)."""
    return sorted({str(r.meta.get("base_model")) for r in study.runs if r.meta.get("base_model")})


def data_sources(study):
    """The data sources of the two-stage study: run.json's data.source and eval.json's task sources."""
    return sorted({str(r.meta.get("data", {}).get("source")) for r in study.runs
                   if isinstance(r.meta.get("data"), dict) and r.meta["data"].get("source")}
                  | {str(t.get("source")) for r in study.runs if r.eval
                     for t in r.eval["tasks"].values() if t.get("source")})


def report_head(study, opts, base, sources):
    """report.md's opening lines: model, data, profile, runs, main lr, units and the task names."""
    n1 = sum(r.stage == 1 for r in study.runs)
    n2 = sum(r.stage == 2 for r in study.runs)
    n_other = len(study.all_runs) - len(study.runs)
    head = ["# Chained tuning: forgetting and biased forgetting\n",
            f"- model (run.json base_model): {', '.join(base) or 'unknown'}",
            f"- data (source): {', '.join(sources) or 'unknown'}",
            f"- profile: {opts.profile}",
            f"- runs: {os.path.abspath(study.runs_dir)} ({n1} first-stage, {n2} chained run.json; "
            f"{len(study.pairs)} usable pairs; seeds {', '.join(map(str, study.seeds))})"
            + (f"; {n_other} other run.json (replay points, mitigated stages, long chains and their copies) "
               "outside Table 1" if n_other else ""),
            f"- main learning rate (second stage of Table 1): {study.main_lr:g} ({study.main_lr_from})"
            if study.main_lr else "- main learning rate: none (no chained run)",
            "- values in percent; mean and std (ddof=1) over seeds; n/a = a std over one seed, or not "
            "applicable (no groups, no bootstrap)\n"]
    head.append("Task names: " + "; ".join(f"{short(t)} = {TASK_NAMES[t]} (`{t}`)" for t in CAPABILITY_TASKS +
                                           SAFETY_TASKS if t in study.capability + study.safety) + ".\n")
    return head


def refused_and_missing(refused, probs):
    """report.md's lists of the refused pairs and of the missing or failed runs."""
    return [f"## Refused: evaluations that cannot be compared ({len(refused)})\n\n"
            + ("Forgetting needs both evaluations of a task made on the same data source, split and examples; "
               "these pairs were not computed (their cells say incomparable):\n\n"
               + "\n".join(f"- {p}" for p in refused) if refused else "None: every pair compares evaluations of "
               "the same examples.") + "\n",
            f"## Missing or failed runs ({len(probs)})\n\n"
            + ("\n".join(f"- {p}" for p in probs) if probs else "None: every expected run is present.") + "\n"]


def write_report(study, out, opts):
    """Run every section, then write its files, report.md (provenance, problems, the sections) and summary.json
    into out -> (problems, refused): the study's and every section's, in section order."""
    os.makedirs(out, exist_ok=True)
    sections = run_sections(study, opts)
    probs = study.problems + [p for s in sections for p in s.problems]
    refused = study.refused + [p for s in sections for p in s.refused]
    every_file = {name: content for s in sections for name, content in s.files.items()}
    findings_text, more = findings_section(study, opts, every_file)
    deviations_text, dev_files = deviations_section(study)
    every_file.update(more, **dev_files)
    for fname, content in every_file.items():
        write_file(os.path.join(out, fname), content)
    base, sources = base_models(study), data_sources(study)
    head = report_head(study, opts, base, sources) + [findings_text, deviations_text]
    if study.study_json:
        head.append("study.json:\n\n```json\n" + json.dumps(study.study_json, indent=2) + "\n```\n")
    head += refused_and_missing(refused, probs)
    write_file(os.path.join(out, "report.md"), "\n".join(head) + "\n" + "\n".join(s.text for s in sections))
    findings = pd.read_csv(io.StringIO(every_file["findings.csv"]))[["claim", "verdict"]].to_dict("records")
    summary = {"runs": os.path.abspath(study.runs_dir), "profile": opts.profile, "base_model": base,
               "data_source": sources, "main_lr": study.main_lr, "seeds": study.seeds,
               "n_pairs": len(study.pairs), "refused": refused, "problems": probs,
               "findings": findings,
               "differences_from_paper": [d for d, _ in deviations(study)]}
    write_file(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return probs, refused
