"""The family matrix: tiny random models of nine Hugging Face causal-LM families (tests/families.py: Llama,
Mistral, Qwen2, Gemma, Phi-3, OLMo-2, GPT-NeoX, GPT-2, OPT) through finetune (with L2, EWC and replay mixing),
evaluate (scored and generated tasks), curvature, and a 2-process FSDP2 finetune (all nine in one torchrun
launch) compared with the one-process weights; the curvature fast paths each family takes are read from its
curvature.json. Prints a markdown table (docs/scale.md's): each cell's outcome and seconds; the details (losses,
accuracies, rho, the tensors that differ) go to bench/results/families.json.

    OMP_NUM_THREADS=1 python bench/bench_families.py                  # about a minute on 2 cores
    OMP_NUM_THREADS=1 python bench/bench_families.py --families gpt2,opt --steps 5

Writes bench/results/families.{json,md}; exits 1 if any cell fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from families import BLOCKS, FAMILIES, build_family, weight_mismatches  # noqa: E402

import curvature  # noqa: E402
from chained_tuning.classifier import default_classifier  # noqa: E402
from chained_tuning.common import AT_LEAST_1, check_args, die_on_user_error, UserError  # noqa: E402
from chained_tuning.evaluation import evaluate_checkpoint  # noqa: E402
from chained_tuning.hessian.layerwise import unsupported  # noqa: E402
from chained_tuning.training import train_stage  # noqa: E402

STAGE = {"task": "toxigen", "lr": 1e-3, "batch_size": 8, "train_size": 64, "seed": 0, "l2_to_init": 1.0,
         "ewc": 5.0, "ewc_task": "arc", "ewc_samples": 4, "replay_task": "arc", "replay_fraction": 0.25}


def timed(fn):
    """(fn's result or its error as one line, seconds)."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a failing cell is reported in the table, the others still run
        traceback.print_exc()
        out = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return out, time.perf_counter() - t0


def one_family(name, folder, work, args):
    """The one-process cells of a family: {cell: (outcome, seconds)}."""
    out = os.path.join(work, "one", name)
    cells = {}
    cells["finetune"] = timed(lambda: "ok, loss %.3f" % train_stage({**STAGE, "steps": args.steps, "model": folder,
                                                                      "out": out})["final_loss"])
    judge = default_classifier(True)
    cells["evaluate"] = timed(lambda: "ok, acc " + " ".join(
        "%.2f" % r["acc"] for r in evaluate_checkpoint(out, "toxigen,arc,saferdialogues", out + "/eval.json",
                                                       limit=args.limit, classifier=judge,
                                                       max_new_tokens=16)["tasks"].values()))
    curv = os.path.join(out, "curvature.json")

    def curvature_cell():
        curvature.main(["--model", out, "--task", "toxigen", "--samples", "8", "--micro_batch_size", "4",
                        "--max_iter", "20", "--out", curv])
        r = json.load(open(curv))
        return "ok, rho %.3g" % r["rho"]
    cells["curvature"] = timed(curvature_cell)
    return cells


def fast_paths(name, folder, work):
    """[last layer, attention] as curvature.json recorded them, and whether layer-wise HVPs take the family."""
    curv = os.path.join(work, "one", name, "curvature.json")
    b = json.load(open(curv))["backend"] if os.path.isfile(curv) else {}
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return [b.get("last_layer", "-"), b.get("attention", "-"), "yes" if unsupported(model) is None else "no"]


def two_processes(names, folders, work, args):
    """All families' stages in one torchrun launch (2 gloo processes); -> {name: (outcome, seconds)}."""
    configs = [{**STAGE, "steps": args.steps, "model": folders[n], "out": os.path.join(work, "two", n)}
               for n in names]
    path = os.path.join(work, "stages.json")
    with open(path, "w") as f:
        json.dump(configs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "OPENS_LOG": os.path.join(work, "opens")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "torchrun_driver.py"), "--stages", path], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    launch = time.perf_counter() - t0
    out = {}
    for n in names:
        run = os.path.join(work, "two", n, "run.json")
        if not os.path.isfile(run):
            out[n] = ("FAIL " + (r.stderr.strip().splitlines() or ["no output"])[-1][:80], launch)
            continue
        one = os.path.join(work, "one", n)
        rb = json.load(open(run))
        if not os.path.isfile(os.path.join(one, "run.json")):
            out[n] = ("ran (no 1-process run to compare)", rb["wall_time_s"])
            continue
        ra = json.load(open(os.path.join(one, "run.json")))
        bad = weight_mismatches(n, one, os.path.join(work, "two", n), STAGE["lr"], args.steps)
        same_loss = all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ra["losses"], rb["losses"]))
        out[n] = ("yes" if not bad and same_loss else f"NO ({len(bad)} tensors, losses {same_loss})",
                  rb["wall_time_s"])
    return out, launch


def main(args):
    check_args({"steps": args.steps, "limit": args.limit}, {"steps": AT_LEAST_1, "limit": AT_LEAST_1})
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UserError(f"--families {args.families}: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(FAMILIES)}")
    torch.set_num_threads(1)
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as work:
        folders = {n: build_family(n, os.path.join(work, "models")) for n in names}
        cells = {n: one_family(n, folders[n], work, args) for n in names}
        dist, launch = two_processes(names, folders, work, args)
        for n in names:
            c = {**cells[n], "fsdp2 == 1 proc": dist[n]}
            failed |= any(str(v[0]).startswith(("FAIL", "NO")) for v in c.values())
            rows.append({"family": n, "blocks": BLOCKS[n], **{k: [v[0], round(v[1], 2)] for k, v in c.items()},
                         "fast paths": fast_paths(n, folders[n], work)})
    cols = ["finetune", "evaluate", "curvature", "fsdp2 == 1 proc"]
    lines = ["| family | FSDP2 block | finetune | evaluate | curvature | 2 proc = 1 | last layer | attention | "
             "layer-wise |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:  # the outcome's first word and its seconds (the details are in families.json)
        lines.append(f"| {r['family']} | {r['blocks']} | "
                     + " | ".join(f"{str(r[c][0]).split()[0].rstrip(',')} {r[c][1]:.1f} s" for c in cols)
                     + " | " + " | ".join(r["fast paths"]) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"(one torchrun launch of 2 processes for the {len(names)} FSDP2 stages: {launch:.1f} s; "
          f"{torch.__version__}, {os.cpu_count()} CPUs)")
    res = os.path.join(ROOT, "bench", "results")
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "families.json"), "w") as f:
        json.dump({"rows": rows, "torchrun_launch_s": launch, "steps": args.steps, "stage": STAGE}, f, indent=2)
    with open(os.path.join(res, "families.md"), "w") as f:
        f.write(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all nine)")
    p.add_argument("--steps", type=int, default=3, help="fine-tuning steps of each stage (>= 1)")
    p.add_argument("--limit", type=int, default=8, help="test examples per evaluated task (>= 1)")
    sys.exit(die_on_user_error(lambda: main(p.parse_args())))
