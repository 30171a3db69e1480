"""The measures curvature.py --measures names, and the check of such a list: torch-free, so that the study checks
its CURV_MEASURES before any work without importing torch (measures.py computes them)."""
from .errors import CurvatureError

MEASURES = ("rho", "trace", "density", "topk", "blocks")
# The measures' default settings (measures.MeasureOptions takes them from here; the study's plan counts with them)
DEFAULTS = {"trace_products": 30, "slq_probes": 4, "slq_steps": 30, "topk": 5, "max_steps": 100}


def worst_case_hvps(names, n_blocks, d=DEFAULTS):
    """HVPs the measures other than rho take at most at the default settings: Hutch++'s products, SLQ's probes x
    steps, topk's and each of n_blocks blocks' Lanczos capped at max_steps (rho's own solve is counted apart)."""
    per = {"rho": 0, "trace": d["trace_products"], "density": d["slq_probes"] * d["slq_steps"],
           "topk": d["max_steps"], "blocks": n_blocks * d["max_steps"]}
    return sum(per[n] for n in names)


def parse_measures(text, name="--measures", sep=" "):
    """'rho,trace,...' -> the measures in MEASURES order (rho always: the solve every record has); a bad list
    raises CurvatureError naming where it came from (`name` `sep` the list) and the names allowed."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in MEASURES]
    if bad or not names:
        raise CurvatureError(f"{name}{sep}{text!r}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; give a "
                             f"comma-separated list of {', '.join(MEASURES)}")
    return tuple(m for m in MEASURES if m in names or m == "rho")
