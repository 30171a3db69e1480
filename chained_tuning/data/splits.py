"""Seeded splits for releases without one, and the stratified training sample: the rules every task shares.
A stratum is (group, label) unless a loader's info["strata"] names others (BBQ adds its context condition).
Docs: docs/data.md."""
import collections

from ..common import UserError
from .synthetic import seeded_rng

TEST_SETS = ("fraction", "rest")  # tasks without official splits: a seeded 30% test set, or all the rest
CELL_RULES = ("equal", "fill")  # stratified training sample: the same count per cell, or topped up to the size

# Seeded splits for datasets released without one: fractions of the whole file.
UNSPLIT_FRACTIONS = {"validation": 0.1, "test": 0.3}  # the rest is the training pool
HOLDOUT_FRACTION = 0.1  # validation carved from the training file where the release has no labelled test
DEFAULT_STRATA = ["group", "label"]  # a stratum unless a loader's info["strata"] names others


def unsplit_method(strata=None):
    return (f"seeded split stratified by ({', '.join(strata or DEFAULT_STRATA)}): validation "
            f"{UNSPLIT_FRACTIONS['validation']:.0%}, test {UNSPLIT_FRACTIONS['test']:.0%}, the rest is the training pool")


def stratum_of(ex, strata=None):
    """The stratum of an example: (group, label) by default; a loader's info["strata"] may add BBQ's
    context condition ("category" is BBQ's name for the group)."""
    label = ex.label if len(ex.options) > 1 else 0
    if not strata or list(strata) == DEFAULT_STRATA:
        return (ex.group or "", label)
    return tuple(label if s == "label" else (ex.group or "") if s in ("group", "category") else
                 str(ex.extra.get(s, "")) for s in strata)


def by_stratum(examples, strata=None):
    cells = collections.defaultdict(list)
    for ex in examples:
        cells[stratum_of(ex, strata)].append(ex)
    return dict(sorted(cells.items()))


def human_validated(ex):
    return bool(ex.extra.get("human_validated"))


def stratified_split(examples, fractions, seed, tag, strata=None):
    """Split into named parts (fractions of every stratum's cell); the rest goes to 'train'. Human-validated
    examples (BBQ) are put last in their cell, so they stay in the training pool."""
    parts = {k: [] for k in [*fractions, "train"]}
    for key, cell in by_stratum(examples, strata).items():
        cell = list(cell)
        seeded_rng(tag, seed, *key).shuffle(cell)
        cell.sort(key=human_validated)  # stable: a no-op without validated examples
        start = 0
        for name, frac in fractions.items():
            k = int(round(frac * len(cell)))
            parts[name].extend(cell[start:start + k])
            start += k
        parts["train"].extend(cell[start:])
    return parts


def stratified_sample(examples, n, seed, tag, strata=None, rule="fill"):
    """n examples with the same number per stratum cell where the cells allow it.

    rule "fill": a cell smaller than its share gives all it has and the others fill the gap round robin, so the
    sample has n examples and stays as balanced as the data permits. rule "equal": every cell gives the same
    count, floor(n / cells) or the smallest cell's size, and nothing tops it up (the paper's sizes: 2236 = 26 x 86
    for ToxiGen's 13 groups x 2 labels, 2241 = 27 x 83 for BBQ's 9 categories x 3 labels). Human-validated
    examples come first in their cell. Order is shuffled (seeded)."""
    if n < 1:  # a negative quota would slice cells from the end
        raise UserError(f"a stratified sample needs a size of at least 1, got {n!r} ({tag})")
    if rule not in CELL_RULES:
        raise UserError(f"--cells {rule!r} is not one of {', '.join(CELL_RULES)}")
    if n >= len(examples) and rule == "fill":
        out = list(examples)
        seeded_rng(tag, seed, "order").shuffle(out)
        return out
    cells = by_stratum(examples, strata)
    for key, cell in cells.items():
        seeded_rng(tag, seed, *key).shuffle(cell)
        cell.sort(key=lambda ex: not human_validated(ex))
    quota = n // len(cells)
    if rule == "equal":
        quota = min([quota] + [len(c) for c in cells.values()])
    taken = {k: min(quota, len(c)) for k, c in cells.items()}
    left = n - sum(taken.values()) if rule == "fill" else 0
    while left > 0:  # round robin over cells that still have examples
        for k, c in cells.items():
            if left and taken[k] < len(c):
                taken[k] += 1
                left -= 1
    out = [ex for k, c in cells.items() for ex in c[:taken[k]]]
    seeded_rng(tag, seed, "order").shuffle(out)
    return out


def check_groups_survive(pool, sample, task, n, where):
    lost = sorted({g for g in (ex.group for ex in pool) if g is not None} - {ex.group for ex in sample})
    if lost:
        raise UserError(f"{where}: after subsampling {task} to {n} examples, group(s) {lost} are empty; "
                        f"raise --train_size (at least one example per group and label is needed)")


def default_cells(source, examples):
    """The cell rule when none is asked: "equal" for a real task with groups (where Table 2's sizes show the
    paper's rule), "fill" elsewhere (the synthetic tasks keep the examples they always had; the paper's
    capability sizes, 2242, are no multiple of their label counts)."""
    return "equal" if source != "synthetic" and any(ex.group for ex in examples) else "fill"


def sample_train(name, pool, train_size, seed, strata, cells, where):
    # train_size None: the whole pool (shuffled), whatever the cell rule
    sample = stratified_sample(pool, train_size or len(pool), seed, f"{name}-sample", strata,
                               cells if train_size else "fill")
    check_groups_survive(pool, sample, name, train_size, where)
    return sample


def stratum_counts(examples, strata=None):
    """{"a|b|c": count} per stratum cell of a set of examples (tasks.py --counts)."""
    return {"|".join(map(str, k)): len(v) for k, v in by_stratum(examples, strata).items()}
