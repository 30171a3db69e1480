"""LoRA against full fine-tuning on the tiny study: the study run by both methods (study.py METHOD=both, Table 1's
chains only), then per method the chains' forgetting and the variance of per-group forgetting (means over the
chains), the comparison's verdicts (metrics.py --methods), and the seconds of a training step, timed apart:
finetune.py runs of each method interleaved, so that both see the same load.

    OMP_NUM_THREADS=1 python bench/bench_lora.py                    # the study by both methods, then the timing
    python bench/bench_lora.py --runs runs/tiny-both --no_study     # an existing METHOD=both runs folder
    python bench/bench_lora.py --lora_r 16 --steps 50 --repeats 3

The study: PROFILE=tiny, METHOD=both, LORA_R --lora_r (alpha twice it, every projection), the tiny profile's
learning rates for both methods unless --lora_lr, CAP arc csqa csqa2, SAFE toxigen bbq (SaFeRDialogues' generated
evaluations left out for time), no sweeps, replay, mitigations, long chains or curvature. Writes
<runs>/results/bench_lora.json and bench_lora.csv.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chained_tuning.common import AT_LEAST_1, HelpFormatter, UserError, check_args, die_on_user_error  # noqa: E402


def run_study(args):
    env = {**os.environ, "PROFILE": "tiny", "METHOD": "both", "RUNS": args.runs, "LORA_R": str(args.lora_r),
           "CAP": "arc csqa csqa2", "SAFE": "toxigen bbq", "LRS": args.lr, "MAIN_LR": args.lr,
           "FIRST_LR_CHAINS": "", "SECOND_LR_CHAINS": "", "REPLAY_CHAINS": "", "MITIGATION_CHAINS": "",
           "CHAINS": "", "CURVATURE": "none", "TQDM_DISABLE": "1"}
    if args.lora_lr:
        env.update(LORA_LRS=args.lora_lr, LORA_MAIN_LR=args.lora_lr)
    print(f"study: METHOD=both -> {args.runs} (Table 1's chains, lr {args.lr}, LoRA r {args.lora_r})", flush=True)
    r = subprocess.run([sys.executable, "study.py"], cwd=ROOT, env=env)
    if r.returncode:
        raise UserError(f"the study failed (exit {r.returncode}); its logs: {args.runs}/full/logs, "
                        f"{args.runs}/lora/logs")


def study_rows(runs):
    """Per method: mean forgetting and mean group variance over the chains, from each half's results."""
    out = {}
    for method in ("full", "lora"):
        bf = pd.read_csv(os.path.join(runs, method, "results", "biased_forgetting.csv"), keep_default_na=False)
        f = pd.to_numeric(bf["forgetting (%)"], errors="coerce")
        v = pd.to_numeric(bf["group_variance_pts2"], errors="coerce")
        out[method] = {"chains": int(f.notna().sum()), "mean_forgetting_pts": float(f.mean()),
                       "grouped_chains": int(v.notna().sum()), "mean_group_variance_pts2": float(v.mean())}
    findings = pd.read_csv(os.path.join(runs, "results", "methods_findings.csv"))
    return out, list(zip(findings.claim, findings.verdict, findings.evidence))


def step_seconds(method, args, tmp, rep):
    """Median seconds of a training step of one finetune.py run (train_log.jsonl), the first step left out."""
    out = os.path.join(tmp, f"{method}-{rep}")
    cmd = [sys.executable, "finetune.py", "--model", "tiny", "--task", "arc", "--out", out, "--steps",
           str(args.steps), "--seed", str(rep)]
    if method == "lora":
        cmd += ["--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode:
        raise UserError(f"finetune.py ({method}) failed: {r.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out, "train_log.jsonl")) as f:
        secs = [json.loads(line)["seconds"] for line in f][1:]
    with open(os.path.join(out, "run.json")) as f:
        params = json.load(f).get("parameters", {})
    return statistics.median(secs), params


def timing(args):
    times, params = {"full": [], "lora": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for method in ("full", "lora"):  # interleaved: both methods see the same load
                s, params[method] = step_seconds(method, args, tmp, rep)
                times[method].append(s)
                print(f"timing: {method} run {rep + 1}: {s * 1e3:.1f} ms a step", flush=True)
    return {m: {"median_step_s": statistics.median(t), "runs": t, **params[m]} for m, t in times.items()}


def main(args):
    if not args.no_study:
        run_study(args)
    elif not os.path.isfile(os.path.join(args.runs, "results", "methods_findings.csv")):
        raise UserError(f"--runs {args.runs}: no results/methods_findings.csv (a METHOD=both study's); drop "
                        "--no_study to run one")
    rows, findings = study_rows(args.runs)
    steps = timing(args)
    print(f"\nLoRA (r {args.lora_r}) against full fine-tuning, tiny study ({args.runs}):")
    print(f"  {'method':6s} {'chains':>6s} {'forgetting':>11s} {'grouped':>8s} {'group var':>10s} "
          f"{'ms/step':>8s} {'trainable':>10s} {'total':>10s}")
    table = []
    for m in ("full", "lora"):
        r, t = rows[m], steps[m]
        print(f"  {m:6s} {r['chains']:6d} {r['mean_forgetting_pts']:9.2f} pt {r['grouped_chains']:8d} "
              f"{r['mean_group_variance_pts2']:10.1f} {t['median_step_s'] * 1e3:8.1f} "
              f"{t.get('trainable', 0):10,d} {t.get('total', 0):10,d}")
        table.append({"method": m, **r, **{k: v for k, v in t.items() if k != "runs"}})
    print(f"  a LoRA step takes {steps['lora']['median_step_s'] / steps['full']['median_step_s']:.2f} x a full one "
          f"(median of {args.repeats} interleaved runs of {args.steps} steps, the first step left out)")
    for claim, verdict, evidence in findings:
        print(f"  {claim}: {verdict}. {evidence}")
    os.makedirs(os.path.join(args.runs, "results"), exist_ok=True)
    pd.DataFrame(table).to_csv(os.path.join(args.runs, "results", "bench_lora.csv"), index=False)
    with open(os.path.join(args.runs, "results", "bench_lora.json"), "w") as f:
        json.dump({"config": vars(args), "methods": table, "steps": steps,
                   "findings": [dict(zip(("claim", "verdict", "evidence"), x)) for x in findings]}, f, indent=1)
    print(f"wrote {args.runs}/results/bench_lora.json and bench_lora.csv")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "tiny-both"), help="the METHOD=both runs folder")
    ap.add_argument("--no_study", action="store_true", help="read --runs as it is, run no study")
    ap.add_argument("--lora_r", type=int, default=8, help="the adapters' rank (>= 1)")
    ap.add_argument("--lr", default="1e-3", help="both methods' learning rate (the tiny profile's main one)")
    ap.add_argument("--lora_lr", default=None, help="LoRA's own learning rate (unset: --lr)")
    ap.add_argument("--steps", type=int, default=30, help="steps of each timed finetune.py run (>= 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each method (>= 1)")
    args = ap.parse_args(argv)
    check_args(vars(args), {"lora_r": AT_LEAST_1, "repeats": AT_LEAST_1, "steps": AT_LEAST_1})
    if args.steps < 2:
        raise UserError("--steps must be at least 2 (the first step is left out of the timing)")
    for flag in ("lr", "lora_lr"):
        v = getattr(args, flag)
        try:
            ok = v is None or float(v) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"--{flag} {v!r} is not a learning rate > 0")
    return args


if __name__ == "__main__":
    die_on_user_error(lambda: main(parse_args()))
