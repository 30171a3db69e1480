"""The measures curvature.py --measures names, and the check of such a list: torch-free, so that the study checks
its CURV_MEASURES before any work without importing torch (measures.py computes them)."""
from .errors import CurvatureError

MEASURES = ("rho", "trace", "density", "topk", "blocks")
# The measures' default settings (measures.MeasureOptions takes them from here; the study's plan counts with them)
DEFAULTS = {"trace_products": 30, "slq_probes": 4, "slq_steps": 30, "topk": 5, "max_steps": 100}


# the Lanczos of density, topk and blocks: "full" reorthogonalisation (a stored basis: steps + 1 vectors), "none"
# (three vectors: the 7B path), "auto" (full where the basis fits the memory free when the measure starts)
REORTH = ("auto", "full", "none")
MOMENTS = 4  # the density's moments recorded (1/n tr H^p, p = 1..MOMENTS); SLQ is exact per probe to 2 steps - 1
# the rule each measure setting must meet (a predicate and the words an error gives)
RULES = {"trace_products": (lambda v: v >= 6 and v % 3 == 0, "a multiple of 3, at least 6 (sketch, its range and "
                                                              "residual probes, two of each at least)"),
         "slq_probes": (lambda v: v >= 2, "at least 2 (the standard error needs two probes)"),
         "slq_steps": (lambda v: v >= 3, f"at least 3 (moments up to {MOMENTS} exact per probe)"),
         "topk": (lambda v: v >= 1, "at least 1"), "max_steps": (lambda v: v >= 1, "at least 1")}


def parse_measure_args(words, name="CURV_MEASURE_ARGS"):
    """curvature.py's measure settings as words ('--trace_products 12 --slq_probes 2 ...') -> {setting: int},
    each checked by RULES; CurvatureError naming `name` otherwise."""
    out, words = {}, list(words)
    flags = [k for k in RULES if k != "max_steps"]
    while words:
        flag = words.pop(0)
        key = flag[2:] if flag.startswith("--") else None
        if key not in flags or not words:
            raise CurvatureError(f"{name}: {flag!r} is not one of --{', --'.join(flags)} followed by its value")
        raw = words.pop(0)
        try:
            value = int(raw)
        except ValueError:
            raise CurvatureError(f"{name}: {flag} {raw!r} is not a whole number") from None
        ok, need = RULES[key]
        if not ok(value):
            raise CurvatureError(f"{name}: {flag} must be {need}, got {value}")
        out[key] = value
    return out


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
