"""Fast scorer vs naive per-option scorer (one full forward per option, lm-evaluation-harness
style): whole evaluation runs on the same checkpoint and the same real test sets; checks that the
predictions are identical and reports the speed ratio.

    python bench/bench_evaluate.py --data_dir ../shared/data                      # tiny base, ToxiGen + ARC
    python bench/bench_evaluate.py --data_dir ../shared/data --model runs/tiny/stage1/arc/lr1e-3/seed0

Writes bench/results/evaluate_speed.{json,csv}.
"""
import argparse
import csv
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chained_tuning.checkpoint import load_model_and_tokenizer  # noqa: E402
from chained_tuning.common import die_on_user_error, write_json_atomic  # noqa: E402
from chained_tuning.evaluation import evaluate  # noqa: E402


def main(args):
    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    rows = []
    for task in args.tasks.split(","):
        timings, preds, logliks = {}, {}, {}
        for scorer in ("fast", "naive"):
            t0 = time.perf_counter()
            _, samples = evaluate(model, tok, [task], args.data_dir, "test", args.limit, args.batch_size, scorer)
            timings[scorer] = time.perf_counter() - t0
            preds[scorer] = [s["pred"] for s in samples]
            logliks[scorer] = [s["logliks"] for s in samples]
        same = preds["fast"] == preds["naive"]
        diff = max(abs(a - b) for fa, na in zip(logliks["fast"], logliks["naive"]) for a, b in zip(fa, na))
        rows.append({"task": task, "n": len(preds["fast"]), "options": len(logliks["fast"][0]),
                     "fast_s": round(timings["fast"], 2), "naive_s": round(timings["naive"], 2),
                     "speedup": round(timings["naive"] / timings["fast"], 2), "identical_predictions": same,
                     "max_abs_loglik_diff": diff})
        print(f"{task}: n={rows[-1]['n']} fast {timings['fast']:.1f}s naive {timings['naive']:.1f}s "
              f"speedup {rows[-1]['speedup']:.2f}x identical predictions: {same} (max |loglik diff| {diff:.2e})",
              flush=True)
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    meta = {"model": args.model, "data_dir": args.data_dir, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    write_json_atomic(os.path.join(out, "evaluate_speed.json"), {"settings": meta, "results": rows})
    with open(os.path.join(out, "evaluate_speed.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if not all(r["identical_predictions"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    p.add_argument("--tasks", default="toxigen,arc")
    p.add_argument("--limit", type=int, default=None, help="stratified subset per task (default: whole test set)")
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    die_on_user_error(lambda: main(args))
