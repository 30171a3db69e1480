"""metrics.py's report, one module per part; every section reads the Study that study.build_study reads once and
returns a format.Section (its part of report.md, its files, its problems and refused pairs).

    study.py       the runs folder as the report reads it (build_study, the Table-1 selection)
    format.py      cells, tables, headers with units, files written through a temporary name
    plot.py        pyplot on the Agg backend (chosen there, once), a figure with the CSV behind it
    tables.py      Tables 1 and 2, the group tables and Kendall's tau, chance level, first-task accuracy
    figures.py     Figures 2, 3, 5, 6, 8, 9, 10, the heatmaps, accuracy paths and loss curves
    curvature.py   Figure 4 and the Taylor check          order.py        the curvature-guided task order
    replay.py      replay as a third stage (Figure 7, 11-14)  mitigation.py   mixing, L2, EWC against replay
    long_chains.py chains longer than two
    findings.py    the paper's claims checked             deviations.py   where this run differs from the paper
    write.py       report.md and summary.json: the sections in order

The manual: docs/metrics.md.
"""
