"""Generation throughput: generation.generate_batched (length-sorted batches, left padding, KV cache, finished
rows dropped) against one `model.generate` call per example, on the SaFeRDialogues test prompts; the greedy
replies must be identical (token for token), and the speed ratio is reported.

    python bench/bench_generate.py                                   # tiny base, the synthetic SD test set (500)
    python bench/bench_generate.py --sd_steps 60                     # also after 60 steps of SD tuning (longer replies)
    python bench/bench_generate.py --model runs/tiny/stage1/saferdialogues/lr0.001/seed0 --limit 200

Writes bench/results/generate_speed.{json,csv}; exits 1 if any reply differs.
"""
import argparse
import csv
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chained_tuning.checkpoint import load_model_and_tokenizer  # noqa: E402
from chained_tuning.common import AT_LEAST_1, NON_NEGATIVE, check_args, die_on_user_error, write_json_atomic  # noqa: E402
from chained_tuning.data.tasks import load_task  # noqa: E402
from chained_tuning.generation import encode_prompts, generate_batched, generate_reference, turn_stop_ids  # noqa: E402
from chained_tuning.training import train_stage  # noqa: E402


def best_time(fn, repeats):
    """(result of the last call, fastest wall time, fastest CPU time of this process, of `repeats` calls): minima,
    since the machine is shared; the CPU time is what other processes on a busy machine disturb least."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return out, wall, cpu


def bench_model(label, model_path, prompts, args):
    model, tok = load_model_and_tokenizer(model_path)
    model.eval()
    stop = turn_stop_ids(tok)
    warm = prompts[:args.batch_size]
    generate_batched(model, tok, warm, args.max_new_tokens, args.batch_size, "cpu", stop)  # warm-up
    fast, t_fast, c_fast = best_time(lambda: generate_batched(model, tok, prompts, args.max_new_tokens,
                                                              args.batch_size, "cpu", stop), args.repeats)
    ref, t_ref, c_ref = best_time(lambda: generate_reference(model, tok, prompts, args.max_new_tokens, "cpu", stop),
                                  args.repeats)
    n_diff = sum(a != b for a, b in zip(fast, ref))
    n_tok = sum(len(r) for r in ref)
    row = {"model": label, "n": len(prompts), "mean_reply_tokens": round(n_tok / len(prompts), 1),
           "batched_s": round(t_fast, 3), "per_example_generate_s": round(t_ref, 3),
           "speedup": round(t_ref / t_fast, 2), "batched_cpu_s": round(c_fast, 3),
           "per_example_generate_cpu_s": round(c_ref, 3), "cpu_speedup": round(c_ref / c_fast, 2),
           "batched_tokens_per_s": round(n_tok / t_fast, 1),
           "generate_tokens_per_s": round(n_tok / t_ref, 1), "identical_replies": n_diff == 0, "n_differ": n_diff}
    print(f"{label}: n={row['n']} replies of {row['mean_reply_tokens']} tokens; batched {t_fast:.2f}s "
          f"({row['batched_tokens_per_s']} tok/s), model.generate per example {t_ref:.2f}s "
          f"({row['generate_tokens_per_s']} tok/s): speedup {row['speedup']:.2f}x (CPU time {c_fast:.2f}s vs "
          f"{c_ref:.2f}s: {row['cpu_speedup']:.2f}x); identical replies: {n_diff == 0}"
          + (f" ({n_diff} differ)" if n_diff else ""), flush=True)
    return row


def main(args):
    check_args(vars(args), {"limit": AT_LEAST_1, "max_new_tokens": AT_LEAST_1, "batch_size": AT_LEAST_1,
                            "repeats": AT_LEAST_1, "sd_steps": NON_NEGATIVE})
    data = load_task("saferdialogues", "test", args.data_dir)
    examples = data.examples[:args.limit]
    _, tok = load_model_and_tokenizer(args.model)
    prompts = [ctx for ctx, _ in encode_prompts(tok, examples, args.max_new_tokens, 2048)]
    rows = [bench_model(args.model, args.model, prompts, args)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.sd_steps:
            tuned = os.path.join(tmp, "sd")
            train_stage({"model": args.model, "task": "saferdialogues", "out": tuned, "steps": args.sd_steps,
                         "data_dir": args.data_dir})
            rows.append(bench_model(f"{args.model} + {args.sd_steps} SD steps", tuned, prompts, args))
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    meta = {"data": data.source, "split": "test", "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__}
    write_json_atomic(os.path.join(out, "generate_speed.json"), {"settings": meta, "results": rows})
    with open(os.path.join(out, "generate_speed.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if not all(r["identical_replies"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (unset: synthetic SD)")
    p.add_argument("--limit", type=int, default=None, help="the first N test examples (unset: all)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each path (the fastest counts)")
    p.add_argument("--sd_steps", type=int, default=0, help="also bench the model after this many SD tuning steps")
    die_on_user_error(lambda: main(p.parse_args()))
