"""Benchmarks of curvature.py on this machine (CPU), rerunnable; prints the figures and writes JSON + CSV.

    OMP_NUM_THREADS=1 python bench/bench_curvature.py [--task arc] [--samples 50] [--repeats 2]
                                                      [--skip speed,cost,memory] [--out bench/results]

1. speed -- time to rho within 1e-3 (relative) of a converged reference, on a tiny checkpoint and 50 samples
   (default theta_A: the tiny base tuned on --task by finetune.py; --model tiny for the untuned base).
   Reference: Lanczos, both ends converged to 1e-6 (another, random start vector). For EVERY method the running rho
   estimate is recorded after each HVP with a timestamp (Lanczos: max |extreme Ritz value|; power: |Rayleigh
   quotient|); reported: when it FIRST comes within 1e-3, from when it STAYS within 1e-3, its own stop time,
   HVPs, and the final error. Methods: ours (curvature.hessian_spectrum defaults: Lanczos, dominant-end stop,
   tol 1e-4, subsample warm start, retained graph, extension if it loads; clock started before the graph
   build), ours with the gradient+random start instead (the default before the warm start), ours with the
   both-ends stop, and an eigenthings-2021-style power iteration (every HVP re-runs the forward pass and the
   first gradient of every micro-batch with full logits, flat float32 vectors, torch.rand start, stop on
   relative change < 1e-4, at most 100 steps). Each method runs --repeats times (interleaved); the medians
   are reported (the machine is shared).
2. cost -- one HVP on the retained graph over one gradient (forward + backward, no create_graph) of the
   same loss with the same cross-entropy, per backend: plain PyTorch (autograd CE) and the extension
   (fused linear+CE, and the logits-level fused op). Interleaved repetitions, minimum of each.
3. memory -- peak memory of one HVP cycle (forward with graph + first gradient with create_graph + one
   HVP), fused vs autograd, at vocabulary 32000, each case in a fresh subprocess. Measured: the kernel's
   peak RSS (VmHWM, reset through /proc/self/clear_refs just before the forward) minus the RSS at that
   moment; glibc is told to mmap every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave
   the RSS at once. Also the RSS still held after the first gradient (what the retained graph keeps).
   - head: the CE-dominated workload -- X [N, 64] @ A [64, 64] -> hidden, lm_head W [32000, 64], CE over N
     rows (N = 512: one logits buffer is 62.5 MiB); A and W are the parameters.
   - model: a random LlamaForCausalLM (vocab 32000, 1 layer, hidden 64) through curvature.HessianOperator,
     50 samples x 64 tokens with 32 answer tokens each (1600 answer rows, one logits buffer 195 MiB).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvature as C  # noqa: E402

REL = 1e-3


def load_tiny_batches(task, samples, seed, micro_batch_size, model_path="tiny"):
    """The batches curvature.py's command line builds for --task, --samples and --seed."""
    import common
    import tasks

    model, tok = common.load_model_and_tokenizer(model_path)
    pool = list(tasks.load_task(task, split="train", seed=seed).examples)
    chosen = common.sample_indices(len(pool), samples, seed)
    batches = C.build_batches(tok, [pool[i] for i in chosen], micro_batch_size)
    return model, batches


# ------------------------------------------------------------------------------- eigenthings-2021 baseline
def eigenthings_power(model, batches, steps=100, tol=1e-4, seed=0):
    """pytorch-hessian-eigenthings (2021) power_iteration + HVPOperator(full_dataset=True): every HVP re-runs
    the forward pass and the first gradient of every batch; vectors are flat float32 (torch.cat)."""
    import finetune

    C._prepare_model(model)
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(C._count_answer_tokens(b) for b in batches)
    size = sum(p.numel() for p in params)

    def hvp(vec):
        hv = torch.zeros(size)
        for b in batches:
            with C._math_sdpa():
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            loss = finetune.answer_loss_sum(out.logits, b["labels"])[0] / total
            grads = torch.autograd.grad(loss, params, create_graph=True)
            gvec = torch.cat([g.reshape(-1) for g in grads])
            hg = torch.autograd.grad(gvec, params, grad_outputs=vec)
            hv += torch.cat([h.reshape(-1) for h in hg])
        return hv

    torch.manual_seed(seed)
    vec = torch.rand(size)
    vec = vec / torch.norm(vec)
    prev, trace, lam, err = 0.0, [], 0.0, 1.0
    for _ in range(steps):
        prev_vec = vec / (torch.norm(vec) + 1e-6)
        new_vec = hvp(prev_vec)
        lam = vec.dot(new_vec).item()
        trace.append((time.perf_counter() - t0, abs(lam)))
        vec = new_vec.detach() / torch.norm(new_vec)
        err = 1.0 if lam == 0.0 else abs((lam - prev) / lam)
        if err < tol:
            break
        prev = lam
    return {"rho": abs(lam), "hvp_count": len(trace), "wall_time_s": time.perf_counter() - t0, "trace": trace,
            "converged": err < tol}


def ours(model, batches, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = C.hessian_spectrum(model, batches, backend=backend, **kw)
    r["trace"] = list(zip(r["iteration_times_s"], r["rho_history"]))
    return r


def crossing(trace, ref, rel=REL):
    """(first time within rel of ref, time from which every later estimate stays within, HVPs to first)."""
    first = first_k = stay = None
    for k, (t, rho) in enumerate(trace, 1):
        ok = abs(rho - ref) <= rel * ref
        if ok and first is None:
            first, first_k = t, k
        if ok and stay is None:
            stay = t
        if not ok:
            stay = None
    return first, stay, first_k


def summarize(name, runs, ref):
    rows = []
    for r in runs:
        first, stay, k = crossing(r["trace"], ref)
        rows.append({"first_within_s": first, "stays_within_s": stay, "hvps_to_first": k,
                     "stop_s": r["wall_time_s"], "hvps_to_stop": r["hvp_count"],
                     "final_rel_error": abs(r["rho"] - ref) / ref, "converged": r["converged"]})
    med = lambda key: (statistics.median([x[key] for x in rows]) if all(x[key] is not None for x in rows)  # noqa
                       else None)
    return {"name": name, "runs": rows, **{k: med(k) for k in ("first_within_s", "stays_within_s", "hvps_to_first",
                                                                "stop_s", "hvps_to_stop", "final_rel_error")}}


# ------------------------------------------------------------------------------------------ HVP / grad
def time_grad_and_hvp(model, batches, backend, ce, reps=7):
    C._prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(C._count_answer_tokens(b) for b in batches)
    t = time.perf_counter()
    op = C.HessianOperator(model, batches, fused_ce=ce)
    t_build = time.perf_counter() - t

    def one_grad():
        for b in batches:
            loss = C.batch_answer_loss_sum(model, b, op.ce) / total
            torch.autograd.grad(loss, params)

    v = C._normalize(C._start_vector(op.params, 0))
    one_grad()
    op.hvp(v)
    tg, th = [], []
    for _ in range(reps):  # interleaved, so a slow spell on the shared machine hits both
        t = time.perf_counter()
        one_grad()
        tg.append(time.perf_counter() - t)
        t = time.perf_counter()
        op.hvp(v)
        th.append(time.perf_counter() - t)
    g, h = min(tg), min(th)
    return {"backend": backend, "cross_entropy": op.ce, "grad_s": g, "hvp_s": h, "hvp_over_grad": h / g,
            "hvp_over_grad_median": statistics.median(th) / statistics.median(tg),
            "graph_build_s": t_build, "graph_build_over_grad": t_build / g}


# --------------------------------------------------------------------------------------------- memory
MEM_CHILD = r"""
import json, os, re, sys, torch
sys.path.insert(0, {root!r})
import curvature as C
case, level = {case!r}, {level!r}
torch.manual_seed(0)
V = 32000
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
if case != "torch":
    assert C.load_extension()["ok"]
if level == "head":
    N, d = 512, 64
    X = torch.randn(N, d)
    A = (torch.randn(d, d) / d ** 0.5).requires_grad_()
    W = (torch.randn(V, d) / d ** 0.5).requires_grad_()
    y = torch.randint(0, V, (N,))
    v = [torch.randn_like(A), torch.randn_like(W)]
    rows = N
    reset_peak(); base = status("VmRSS")
    h = X @ A
    if case == "linear_xent":
        loss = torch.ops.hessian.linear_xent(h, W, y, -100)[0].sum() / N
    elif case == "softmax_xent":
        loss = torch.ops.hessian.softmax_xent(h @ W.T, y, -100)[0].sum() / N
    else:
        loss = torch.nn.functional.cross_entropy(h @ W.T, y, reduction="sum") / N
    grads = torch.autograd.grad(loss, [A, W], create_graph=True)
    del loss, h
    retained = status("VmRSS") - base
    hv = torch.autograd.grad(grads, [A, W], v, retain_graph=True)
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(5):
        ids = torch.randint(0, V, (10, 64), generator=g)
        lab = torch.full_like(ids, -100); lab[:, -32:] = ids[:, -32:]
        batches.append({{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}})
    rows = 5 * 10 * 31
    v = C._normalize(C._start_vector([p for p in model.parameters()], 0))
    reset_peak(); base = status("VmRSS")
    op = C.HessianOperator(model, batches, fused_ce=case)
    assert op.ce == case, op.ce
    retained = status("VmRSS") - base
    hv = op.hvp(v)
peak = status("VmHWM")
print(json.dumps({{"case": case, "level": level, "base_bytes": base, "peak_bytes": peak, "delta_bytes": peak - base,
                  "retained_after_grad_bytes": retained, "logits_bytes": rows * V * 4}}))
"""


def measure_memory(case, level):
    code = MEM_CHILD.format(root=ROOT, case=case, level=level)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="theta_A",
                    help="checkpoint dir, 'tiny' (the untuned base), or 'theta_A' (default: the tiny base tuned on "
                         "--task by finetune.py with its defaults, 100 steps, seed 0; built once into --out)")
    ap.add_argument("--task", default="arc")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro_batch_size", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed,cost,memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    ext = C.load_extension()
    backend = "extension" if ext["ok"] else "torch"
    res = {"machine": {"threads": args.threads, "torch": torch.__version__, "extension": ext,
                       "load_avg_start": os.getloadavg()}, "task": args.task, "samples": args.samples}
    rows = []

    if args.model == "theta_A" and ("speed" not in skip or "cost" not in skip):
        args.model = os.path.join(args.out, f"theta_A_{args.task}")
        if not os.path.exists(os.path.join(args.out, f"theta_A_{args.task}", "config.json")):
            print(f"fine-tuning the tiny base on {args.task} into {args.model} (finetune.py, once)", flush=True)
            p = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--model", "tiny", "--task",
                                args.task, "--out", args.model, "--overwrite"], capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if p.returncode != 0:
                sys.exit(f"finetune.py failed:\n{p.stderr[-3000:]}")
            print((p.stdout.strip().splitlines() or [""])[-1], flush=True)
    if "speed" not in skip or "cost" not in skip:
        model, batches = load_tiny_batches(args.task, args.samples, args.seed, args.micro_batch_size, args.model)
        n_params = sum(p.numel() for p in model.parameters())
        res["model"] = {"name": args.model, "n_params": n_params, "micro_batches": len(batches),
                        "n_answer_tokens": sum(C._count_answer_tokens(b) for b in batches),
                        "max_len": max(b["input_ids"].shape[1] for b in batches)}
        print(f"model {args.model}: {n_params} params, {len(batches)} micro-batches, {args.samples} samples", flush=True)

    if "speed" not in skip:
        ref = ours(model, batches, backend, tol=1e-6, max_iter=300, stop="both", seed=12345, start="random")
        rho_ref = ref["rho"]
        print(f"reference: rho={rho_ref:.8g} (lanczos, both ends to 1e-6, {ref['iterations']} it, "
              f"converged={ref['converged']})", flush=True)
        runs = {"ours_lanczos_default": [], "ours_lanczos_gradient_start": [], "ours_lanczos_both_ends": [],
                "eigenthings_power": []}
        for rep in range(args.repeats):
            runs["ours_lanczos_default"].append(ours(model, batches, backend, seed=args.seed + rep))
            runs["ours_lanczos_gradient_start"].append(ours(model, batches, backend, seed=args.seed + rep,
                                                            start="gradient+random"))
            runs["ours_lanczos_both_ends"].append(ours(model, batches, backend, stop="both", seed=args.seed + rep))
            runs["eigenthings_power"].append(eigenthings_power(model, batches, seed=args.seed + rep))
        sm = {k: summarize(k, v, rho_ref) for k, v in runs.items()}
        base, mine = sm["eigenthings_power"], sm["ours_lanczos_default"]
        speed = {"rho_reference": rho_ref, "reference_iterations": ref["iterations"],
                 "reference_lambda_min": ref["lambda_min"], "reference_lambda_max": ref["lambda_max"],
                 "methods": sm, "backend": runs["ours_lanczos_default"][0]["backend"],
                 "traces": {k: [r["trace"] for r in v] for k, v in runs.items()}}
        if base["first_within_s"] and mine["first_within_s"]:
            speed["speedup_first_within_1e-3"] = base["first_within_s"] / mine["first_within_s"]
        if base["stays_within_s"] and mine["stays_within_s"]:
            speed["speedup_stays_within_1e-3"] = base["stays_within_s"] / mine["stays_within_s"]
        speed["speedup_to_stop"] = base["stop_s"] / mine["stop_s"]
        res["speed"] = speed
        print(f"{'method':26s} {'first<=1e-3 s':>13s} {'HVPs':>5s} {'stays s':>8s} {'stop s':>7s} {'HVPs':>5s} "
              f"{'final rel err':>13s}")
        for k, m in sm.items():
            print(f"{k:26s} {fmt(m['first_within_s']):>13s} {fmt(m['hvps_to_first'], 0):>5s} "
                  f"{fmt(m['stays_within_s']):>8s} {fmt(m['stop_s']):>7s} {fmt(m['hvps_to_stop'], 0):>5s} "
                  f"{m['final_rel_error']:13.2e}")
            rows.append({"part": "speed", "name": k, "seconds": m["first_within_s"], "stop_s": m["stop_s"],
                         "hvps": m["hvps_to_stop"], "rel_error": m["final_rel_error"]})
        print(f"speed-up, first within 1e-3: {fmt(speed.get('speedup_first_within_1e-3'))}x; stays within: "
              f"{fmt(speed.get('speedup_stays_within_1e-3'))}x; to stop: {speed['speedup_to_stop']:.2f}x", flush=True)

    if "cost" not in skip:
        res["cost"] = []
        cases = [("torch", "torch")] + ([("extension", "linear_xent"), ("extension", "softmax_xent")]
                                        if ext["ok"] else [])
        for be, ce in cases:
            r = time_grad_and_hvp(model, batches, be, ce)
            res["cost"].append(r)
            print(f"[{be}/{ce}] grad {r['grad_s'] * 1e3:.0f} ms, HVP {r['hvp_s'] * 1e3:.0f} ms -> HVP/grad "
                  f"{r['hvp_over_grad']:.2f} (medians {r['hvp_over_grad_median']:.2f}; graph build "
                  f"{r['graph_build_over_grad']:.2f} grads)", flush=True)
            rows.append({"part": "cost", "name": f"hvp_over_grad_{be}_{ce}", "seconds": r["hvp_s"],
                         "ratio": r["hvp_over_grad"]})

    if "memory" not in skip and ext["ok"]:
        res["memory"] = {}
        for level in ("head", "model"):
            m = {case: measure_memory(case, level) for case in ("torch", "softmax_xent", "linear_xent")}
            a = m["torch"]["delta_bytes"]
            out = {"cases": m}
            for case in ("softmax_xent", "linear_xent"):
                out[f"{case}_over_torch_peak"] = m[case]["delta_bytes"] / a
                out[f"{case}_over_torch_retained"] = (m[case]["retained_after_grad_bytes"]
                                                      / m["torch"]["retained_after_grad_bytes"])
            res["memory"][level] = out
            lb = m["torch"]["logits_bytes"]
            print(f"memory [{level}, V=32000, one logits buffer {lb / 2**20:.0f} MiB] peak of one HVP cycle "
                  f"(retained after grad):", flush=True)
            for case in ("torch", "softmax_xent", "linear_xent"):
                d, r = m[case]["delta_bytes"], m[case]["retained_after_grad_bytes"]
                print(f"   {case:13s} {d / 2**20:7.0f} MiB = {d / lb:4.1f} buffers  ({r / 2**20:6.0f} MiB)"
                      + ("" if case == "torch" else f"  -> {d / a:.2f} of autograd's peak"))
                rows.append({"part": "memory", "name": f"{level}_{case}", "bytes": d,
                             "ratio": d / a, "retained_bytes": r})

    res["machine"]["load_avg_end"] = os.getloadavg()
    with open(os.path.join(args.out, "bench_curvature.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=str)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "bench_curvature.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}/bench_curvature.json and .csv")


if __name__ == "__main__":
    main()
