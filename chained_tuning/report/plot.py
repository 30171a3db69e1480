"""pyplot for the report's figures, on the Agg backend, and what every figure shares: its PNG with the CSV of
the data behind it, a fixed colour and marker per chain.

The backend is chosen here, once, before pyplot loads: the report renders files only, on machines without a
display (a login node, a batch job) as on a laptop. Every report module that draws imports plt from here.
Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .format import csv_text  # noqa: E402

MARKERS = "osD^vPX<>"


def figure_files(fig, df, stem):
    """Figure `stem`.png (rendered here, the figure closed) and the data behind it, `stem`.csv."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return {stem + ".csv": csv_text(df), stem + ".png": png.getvalue()}


def chain_colours(chains):
    """A fixed colour per chain (the same in every figure), from a 20-colour map."""
    cmap = plt.get_cmap("tab20" if len(chains) > 10 else "tab10")
    return {c: cmap(i % cmap.N) for i, c in enumerate(sorted(chains))}
