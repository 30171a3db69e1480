"""The measures curvature.py --measures names, and the check of such a list: torch-free, so that the study checks
its CURV_MEASURES before any work without importing torch (measures.py computes them)."""
from .errors import CurvatureError

MEASURES = ("rho", "trace", "density", "topk", "blocks")


def parse_measures(text, name="--measures", sep=" "):
    """'rho,trace,...' -> the measures in MEASURES order (rho always: the solve every record has); a bad list
    raises CurvatureError naming where it came from (`name` `sep` the list) and the names allowed."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in MEASURES]
    if bad or not names:
        raise CurvatureError(f"{name}{sep}{text!r}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; give a "
                             f"comma-separated list of {', '.join(MEASURES)}")
    return tuple(m for m in MEASURES if m in names or m == "rho")
