"""The report's mitigation section: mitigated second stages (mixing A's data into B's batches, an L2 pull to
theta_A, EWC) against third-stage replay at matched cost in A's data (mitigation.csv/.png). Its inputs are
finetune.py's run.json configs and replay.py's replay_summary.json.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import math
from collections import defaultdict

import numpy as np
import pandas as pd

from ..forgetting import NA, forgetting, mean_std
from ..runs import evaluation, incomparable, is_replay_point, mitigation_of, number, refusal, resolve_parent, stage_of
from .format import INCOMPARABLE, MISSING, Section, cells, csv_text, exact, markdown_table, rounded, short
from .plot import figure_files, plt
from .replay import int_if_whole, percent, replay_rows, sweep_x

MITIGATION_COLUMNS = ["first_task", "second_task", "method", "setting", "n_seeds", "seeds", "forgetting_a",
                      "forgetting_a_std", "acc_b", "acc_b_std", "extra_steps", "a_examples_seen",
                      "a_examples_presented", "fisher_samples", "n_eval_a", "runs"]


def method_of(meta, A, B):
    """(method, setting, sort key) of a mitigated second stage from its run.json config."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    on = mitigation_of(meta)
    names, sets, key = [], [], []
    if "replay_fraction" in on:
        t = cfg.get("replay_task")
        names.append("mix" if t == A else f"mix({t})")
        sets.append(f"{100 * on['replay_fraction']:g}% of each batch from {t}")
        key.append((1, on["replay_fraction"]))
    if "l2_to_init" in on:
        names.append("l2")
        sets.append(f"lambda {on['l2_to_init']:g}")
        key.append((2, on["l2_to_init"]))
    if "ewc" in on:
        t = cfg.get("ewc_task")
        names.append("ewc" if t == A else f"ewc({t})")
        sets.append(f"lambda {on['ewc']:g}, Fisher on {t}")
        key.append((3, on["ewc"]))
    if "train_fraction" in on:
        names.append("train_fraction")
        sets.append(f"{100 * float(on['train_fraction']):g}% of {B}")
        key.append((4, float(on["train_fraction"])))
    return "+".join(names), "; ".join(sets), tuple(key)


def a_data_cost(meta, cfg, steps, bs):
    """(A-examples presented, A-examples seen, Fisher samples) of a mitigated second stage, as mitigation_rows
    counts them."""
    presented = seen = fisher = 0
    on = mitigation_of(meta)
    if "replay_fraction" in on:
        rep = meta.get("replay") if isinstance(meta.get("replay"), dict) else {}
        presented = rep.get("examples_replayed")
        if not isinstance(presented, int):
            presented = (math.floor(on["replay_fraction"] * bs * steps + 0.5)
                         if isinstance(bs, int) and isinstance(steps, int) else float("nan"))
        pool = rep.get("n_pool")
        seen = min(presented, pool) if isinstance(pool, int) else presented
    if "ewc" in on:
        reg = meta.get("regularisation") if isinstance(meta.get("regularisation"), dict) else {}
        fi = reg.get("fisher") if isinstance(reg.get("fisher"), dict) else {}
        fisher = fi.get("n_samples", cfg.get("ewc_samples", float("nan")))
        seen = seen + fisher
    return presented, seen, fisher


def mitigated_run_row(study, r, plain, problems):
    """A mitigated second stage's row (forgetting of A from its own theta_A), or None, with a problem, when its
    theta_A has no usable evaluation of A. plain: {(A, B, seed): Table 1's Pair}, the cost's reference."""
    A, B = r.chain
    parent = resolve_parent(r, study.copies)
    if parent is None or parent.problem or not parent.eval or A not in parent.eval["tasks"]:
        problems.append(f"{r.name}: its first-stage run (parent_run_id {r.parent_run_id}) "
                        + ("has no run.json under the runs folder" if parent is None else
                           f"{parent.name} has no usable eval.json holding {A}") + "; left out of mitigation.csv")
        return None
    if A not in r.eval["tasks"] or B not in r.eval["tasks"]:
        problems.append(f"{r.name}/eval.json has no result for {A if A not in r.eval['tasks'] else B}; re-run "
                        f"evaluate.py --tasks {A},{B}")
    why = incomparable(A, evaluation(parent), evaluation(r)) if A in r.eval["tasks"] else None
    method, setting, key = method_of(r.meta, A, B)
    cfg = r.meta.get("config") or {}
    steps, bs = r.meta.get("steps"), cfg.get("batch_size")
    p = plain.get((A, B, r.seed))
    extra = (steps - p.chained.meta.get("steps")) if p is not None and isinstance(steps, int) \
        and isinstance(p.chained.meta.get("steps"), int) else float("nan")
    presented, seen, fisher = a_data_cost(r.meta, cfg, steps, bs)
    note = "" if p is None or p.first.run_id == parent.run_id else \
        f"theta_A {parent.name} is not Table 1's ({p.first.name})"
    if note:
        problems.append(f"{r.name}: {note}; forgetting measured from its own theta_A")
    return {"first_task": A, "second_task": B, "seed": r.seed, "method": method, "setting": setting,
            "key": (1,) + key, "refused": why,
            "forgetting_a": float("nan") if why else forgetting(parent.acc(A), r.acc(A)), "acc_b": r.acc(B),
            "extra_steps": extra, "a_examples_seen": seen, "a_examples_presented": presented,
            "fisher_samples": fisher, "n_eval_a": r.eval["tasks"].get(A, {}).get("n", NA), "run": r.name}


def replay_point_rows(study, chains):
    """Every trained third-stage replay point as a row; their chains are added to `chains`."""
    rows = []
    for x in replay_rows(study).rows:
        if x["a_examples_seen"] == 0 and x["steps"] == 0:
            continue  # the untrained point is theta_AB
        chains.add((x["first_task"], x["second_task"]))
        sweep = x["sweep"]
        setting = (f"fraction {percent(x['fraction']):g}%, {x['steps']} steps" if sweep == "fraction"
                   else f"{x['steps']} steps, all data")
        rows.append({"first_task": x["first_task"], "second_task": x["second_task"], "seed": x["seed"],
                     "method": f"replay ({sweep} sweep)", "setting": setting,
                     "key": (2 if sweep == "fraction" else 3, sweep_x(x)), "forgetting_a": x["forgetting_a"],
                     "refused": x["forgetting_source"] == INCOMPARABLE or None,
                     "acc_b": x["acc_b"], "extra_steps": x["steps"], "a_examples_seen": x["a_examples_seen"],
                     "a_examples_presented": x["a_examples_presented"], "fisher_samples": 0,
                     "n_eval_a": x["n_eval_a"], "run": x["file"]})
    return rows


def mitigation_rows(study):
    """Per chain A->B and seed: the plain chain of Table 1, every mitigated second stage (run.json config:
    replay_fraction / l2_to_init / ewc > 0, train_fraction set) and every trained third-stage replay point,
    with forgetting of A and accuracy of B (fractions) and their cost -> (rows, problems).

    Forgetting of a mitigated run = acc_A(theta_A) - acc_A(run), theta_A its parent (parent_run_id), both
    from eval.json. Cost, counted against the plain chain A->B of the same seed (Table 1):
      extra_steps      optimisation steps beyond the plain chain's second stage: steps - plain steps for a
                       mitigated second stage (0 when it has the same --steps), the third stage's steps for
                       a replay point;
      a_examples_presented  examples of A in training batches: for mixing, run.json replay.examples_replayed
                       (else floor(F * batch_size * steps + 1/2), finetune.py's count); for a replay point,
                       steps * batch_size; 0 for L2 and EWC;
      a_examples_seen  distinct examples of A read: min(presented, pool) (mixing: replay.n_pool; replay point:
                       its n_examples), plus for EWC the N samples of its Fisher estimate (these need A's
                       data though no optimisation step sees them); 0 for L2 and the plain chain.
    Chains with neither a mitigated run nor a replay summary are not listed. A mitigated run whose evaluation of
    A cannot be compared with its theta_A's has no forgetting, and "refused" says why."""
    rows, problems = [], []
    plain = {(p.A, p.B, p.seed): p for ps in study.table1.values() for p in ps}
    for r in study.all_runs:
        if stage_of(r) != 2 or not mitigation_of(r.meta) or is_replay_point(r, study.replay_ids) or r.problem:
            continue
        row = mitigated_run_row(study, r, plain, problems)
        if row is not None:
            rows.append(row)
    chains = {(x["first_task"], x["second_task"]) for x in rows}
    rows += replay_point_rows(study, chains)
    for (A, B) in sorted(chains):
        for p in study.table1.get((A, B), []):
            rows.append({"first_task": A, "second_task": B, "seed": p.seed, "method": "plain",
                         "setting": "Table 1 chain", "key": (0,), "forgetting_a": p.stats["forgetting"],
                         "acc_b": p.stats["acc_chained_b"], "extra_steps": 0, "a_examples_seen": 0,
                         "a_examples_presented": 0, "fisher_samples": 0,
                         "n_eval_a": p.chained.eval["tasks"][A].get("n", NA), "run": p.chained.name})
    return rows, problems


def mitigation_table(rows):
    """Mean (std) over seeds per chain, method and setting (percent; costs as mean counts)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["first_task"], r["second_task"], r["key"], r["method"], r["setting"])].append(r)
    out = []
    for (A, B, _, method, setting), rs in sorted(groups.items(), key=lambda kv: kv[0][:3]):
        f, fs = cells([r["forgetting_a"] for r in rs],
                      marker=INCOMPARABLE if all(r.get("refused") for r in rs) else MISSING)
        b, bsd = cells([r["acc_b"] for r in rs], marker=MISSING)
        cost = {k: int_if_whole(rounded(mean_std([number(r[k]) for r in rs])[0], 1))
                for k in ("extra_steps", "a_examples_seen", "a_examples_presented", "fisher_samples")}
        n_eval = sorted({str(r["n_eval_a"]) for r in rs})
        out.append({"first_task": A, "second_task": B, "method": method, "setting": setting, "n_seeds": len(rs),
                    "seeds": ";".join(str(r["seed"]) for r in sorted(rs, key=lambda r: str(r["seed"]))),
                    "forgetting_a": f, "forgetting_a_std": fs, "acc_b": b, "acc_b_std": bsd, **cost,
                    "n_eval_a": ";".join(n_eval), "runs": ";".join(r["run"] for r in rs)})
    return pd.DataFrame(out, columns=MITIGATION_COLUMNS)


def fmt2(v, unit=""):
    """A number with 2 decimals for report.md's sentences; anything else as it is."""
    return f"{v:.2f}{unit}" if isinstance(v, (int, float, np.floating)) and not math.isnan(v) else str(v)


def matched_cost(df):
    """Sentences comparing, per chain, each mitigation with the third-stage replay point (fraction sweep)
    whose A-examples seen are closest to it (ties: fewer extra steps, then the smaller fraction); L2 (no data
    of A) with the plain chain. df: mitigation_table."""
    lines = []
    for (A, B), g in df.groupby(["first_task", "second_task"], sort=True):
        plain = g[g.method == "plain"]
        rep = g[g.method == "replay (fraction sweep)"]
        rep = rep[rep.a_examples_seen.map(lambda v: isinstance(v, (int, float)) and not math.isnan(v))]
        others = g[~g.method.isin(["plain", "replay (fraction sweep)", "replay (steps sweep)"])]
        pl = (f"plain chain: forgetting of {A} {fmt2(plain.forgetting_a.iloc[0])}, {B} accuracy "
              f"{fmt2(plain.acc_b.iloc[0])}" if len(plain) else "plain chain: missing")
        head = f"- **{A} -> {B}** ({pl})."
        if others.empty:
            lines.append(head + " No mitigated second stage for this chain.")
            continue
        parts = []
        for m in others.itertuples():
            desc = (f"{m.method} ({m.setting}): forgetting {fmt2(m.forgetting_a)}, {B} {fmt2(m.acc_b)}, "
                    f"{fmt2(m.a_examples_seen)} A-examples seen, {fmt2(m.extra_steps)} extra steps")
            seen = m.a_examples_seen if isinstance(m.a_examples_seen, (int, float)) else float("nan")
            if m.method.startswith("l2") and seen == 0:
                ref = plain
                parts.append(desc + ("; against the plain chain (same cost in A-data): forgetting "
                                     f"{fmt2(ref.forgetting_a.iloc[0])}" if len(ref)
                                     else "; no plain chain to compare"))
                continue
            if rep.empty or math.isnan(seen):
                parts.append(desc + "; no third-stage replay point to match")
                continue
            d = rep.assign(_d=(rep.a_examples_seen.astype(float) - seen).abs(),
                           _e=pd.to_numeric(rep.extra_steps, errors="coerce"))
            best = d.sort_values(["_d", "_e"], kind="stable").iloc[0]
            better = (isinstance(m.forgetting_a, float) and isinstance(best.forgetting_a, float)
                      and not math.isnan(m.forgetting_a) and not math.isnan(best.forgetting_a))
            verdict = ("" if not better else "; the mitigation forgets less" if m.forgetting_a < best.forgetting_a
                       else "; replay forgets less" if m.forgetting_a > best.forgetting_a else "; equal forgetting")
            parts.append(desc + f"; replay at matched cost ({best.setting}: {fmt2(best.a_examples_seen)} A-examples "
                         f"seen, {fmt2(best.extra_steps)} extra steps): forgetting {fmt2(best.forgetting_a)}, {B} "
                         f"{fmt2(best.acc_b)}{verdict}")
        lines.append(head + "\n" + "\n".join(f"  - {x}." for x in parts))
    return "\n".join(lines) + "\n"


MARKERS = {"plain": ("o", "black"), "mix": ("s", "tab:blue"), "l2": ("^", "tab:green"), "ewc": ("v", "tab:red")}


def section_mitigation(study, opts):
    """mitigation.csv/.png (mean per chain and method), mitigation_runs.csv (per seed) and a matched-cost
    comparison. Nothing is written without a mitigated run or a replay summary."""
    head = "## Mitigations compared: mixing, L2, EWC and third-stage replay\n\n"
    rows, problems = mitigation_rows(study)
    if not any(r["method"] != "plain" for r in rows):
        return Section(head + ("No mitigation results: no second stage with replay mixing, L2 or EWC (finetune.py "
                               "--replay_task/--replay_fraction, --l2_to_init, --ewc) and no replay summary under "
                               "the runs folder.\n"), problems=problems)
    refused = [refusal(r["first_task"], r["second_task"], r["refused"]) + " (mitigation)" for r in rows
               if r["key"][0] == 1 and r["refused"]]
    per_seed = pd.DataFrame([{k: (INCOMPARABLE if k == "forgetting_a" and r.get("refused") else
                                  rounded(100 * v) if k in ("forgetting_a", "acc_b") else exact(v))
                              for k, v in r.items() if k not in ("key", "refused")} for r in rows],
                            columns=["first_task", "second_task", "seed", "method", "setting", "forgetting_a", "acc_b",
                                     "extra_steps", "a_examples_seen", "a_examples_presented", "fisher_samples",
                                     "n_eval_a", "run"])
    files = {"mitigation_runs.csv": csv_text(per_seed)}
    df = mitigation_table(rows)
    chains = list(df.groupby(["first_task", "second_task"], sort=True))
    fig, axes = plt.subplots(1, len(chains), figsize=(5.2 * len(chains), 4), squeeze=False)
    for ax, ((A, B), g) in zip(axes[0], chains):
        num = lambda s: pd.to_numeric(s, errors="coerce")
        for sweep, style in (("replay (fraction sweep)", "x--"), ("replay (steps sweep)", "+:")):
            d = g[g.method == sweep].sort_values("a_examples_seen", key=num)
            if len(d):
                ax.plot(num(d.a_examples_seen), num(d.forgetting_a), style, color="tab:purple", label=sweep)
        for m in g[~g.method.str.startswith("replay")].itertuples():
            mk, colour = MARKERS.get(m.method.split("(")[0].split("+")[0], ("D", "tab:gray"))
            ax.errorbar(number(m.a_examples_seen), number(m.forgetting_a),
                        yerr=number(m.forgetting_a_std) if isinstance(m.forgetting_a_std, float) else None,
                        fmt=mk, color=colour, capsize=3, label=f"{m.method} ({m.setting})")
        ax.set_xscale("symlog", linthresh=10)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("examples of A seen (distinct)")
        ax.set_ylabel(f"forgetting of {short(A)} (%)")
        ax.set_title(f"{short(A)} -> {short(B)}")
        ax.legend(fontsize=6)
    fig.suptitle("Forgetting of the first task against the data of it each mitigation uses")
    fig.tight_layout()
    files.update(figure_files(fig, df, "mitigation"))
    text = (head + "Per chain A -> B: the plain chain of Table 1, second stages with a mitigation (from the same "
            "theta_A, found by run.json config: mixing A's data into B's batches, L2 pull to theta_A, EWC) and the "
            "trained third-stage replay points. Forgetting of A and accuracy of B in percent, mean (std) over "
            "seeds. Cost: extra optimisation steps beyond the plain chain; A-examples seen = distinct examples of A "
            "read (mixing: those replayed, at most A's training set; replay point: min(steps x batch size, its "
            "subset); EWC: the Fisher samples; L2: none); presented = A-examples in training batches, repeats "
            "counted. Replay points are evaluated with replay.py's settings (n_eval_a). "
            "([mitigation.csv](mitigation.csv), per seed: [mitigation_runs.csv](mitigation_runs.csv))\n\n"
            + markdown_table(df.drop(columns=["seeds", "runs"])) + "\n![mitigation](mitigation.png)\n\n"
            "### At matched cost\n\n" + matched_cost(df))
    return Section(text, files, problems, refused)


