"""Benchmarks of curvature.py on this machine (CPU), rerunnable; prints the figures and writes JSON + CSV.

    OMP_NUM_THREADS=1 python bench/bench_curvature.py [--task arc] [--samples 50] [--out bench/results]

1. Time to rho within 1e-3 (relative) of a converged reference (Lanczos, tol 1e-9): ours (Lanczos, default
   tol 1e-4, retained graph, extension if it loads) side by side with an eigenthings-2021-style power iteration
   (fresh forward + first gradient for every HVP, flattened float32 vectors, torch.rand start, stop on relative
   change < 1e-4, at most 100 steps). Both errors are reported.
2. Cost of one HVP on the retained graph over the cost of one gradient (forward + backward), per CE backend.
3. Peak memory of one HVP through the fused cross-entropy vs autograd's log_softmax + nll at vocabulary 32000,
   each case in a fresh subprocess (peak of the current RSS, sampled every 0.2 ms from /proc/self/statm by a
   thread, minus the RSS just before the HVP work; large tensors are mmapped, so RSS follows live tensors):
   op level (the loss over [rows, 32000] logits) and model level (a random tiny Llama with a 32000 vocabulary).
"""
import argparse
import csv
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvature as C  # noqa: E402


def load_tiny_batches(task, samples, seed, micro_batch_size):
    import common
    import tasks

    model, tok = common.load_model_and_tokenizer("tiny")
    data = tasks.load_task(task, split="train", seed=seed)
    import random

    exs = list(data.examples)
    idx = sorted(random.Random(seed).sample(range(len(exs)), min(samples, len(exs))))
    batches = C.build_batches(tok, [exs[i] for i in idx], micro_batch_size)
    return model, batches


# ------------------------------------------------------------------------------- eigenthings-2021 baseline
def eigenthings_power(model, batches, steps=100, tol=1e-4, seed=0):
    """pytorch-hessian-eigenthings (2021) power_iteration + HVPOperator(full_dataset=True): every HVP re-runs
    the forward pass and the first gradient of every batch; vectors are flat float32 (torch.cat)."""
    import finetune

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
    prev, trace, t0 = 0.0, [], time.perf_counter()
    lam = 0.0
    for i in range(steps):
        prev_vec = vec / (torch.norm(vec) + 1e-6)
        new_vec = hvp(prev_vec)
        lam = vec.dot(new_vec).item()
        trace.append((time.perf_counter() - t0, lam))
        diff = lam - prev
        vec = new_vec.detach() / torch.norm(new_vec)
        err = 1.0 if lam == 0.0 else abs(diff / lam)
        if err < tol:
            break
        prev = lam
    return {"rho": abs(lam), "iterations": len(trace), "wall_time_s": time.perf_counter() - t0, "trace": trace,
            "converged": len(trace) < steps or err < tol}


def first_time_within(trace, ref, rel=1e-3):
    """Earliest time after which every later estimate stays within rel of ref (None if never)."""
    t_ok = None
    for t, lam in trace:
        if abs(abs(lam) - ref) <= rel * ref:
            t_ok = t if t_ok is None else t_ok
        else:
            t_ok = None
    return t_ok


# ------------------------------------------------------------------------------------------ HVP / grad
def time_grad_and_hvp(model, batches, backend, reps=5):
    C._prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = backend == "extension"
    total = sum(C._count_answer_tokens(b) for b in batches)

    def one_grad():
        for b in batches:
            loss = C.batch_answer_loss_sum(model, b, fused) / total
            torch.autograd.grad(loss, params)

    one_grad()
    tg = []
    for _ in range(reps):
        t = time.perf_counter()
        one_grad()
        tg.append(time.perf_counter() - t)
    t = time.perf_counter()
    op = C.HessianOperator(model, batches, fused_ce=fused)
    t_build = time.perf_counter() - t
    v = C._normalize(C._start_vector(op.params, 0))
    op.hvp(v)
    th = []
    for _ in range(reps):
        t = time.perf_counter()
        op.hvp(v)
        th.append(time.perf_counter() - t)
    g, h = min(tg), min(th)
    return {"backend": backend, "grad_s": g, "hvp_s": h, "hvp_over_grad": h / g, "graph_build_s": t_build,
            "graph_build_over_grad": t_build / g}


# --------------------------------------------------------------------------------------------- memory
MEM_CHILD = r"""
import gc, json, os, resource, sys, threading, time, torch
sys.path.insert(0, {root!r})
import curvature as C
case, level = {case!r}, {level!r}
torch.manual_seed(0)
V = 32000
PAGE = os.sysconf("SC_PAGE_SIZE")
def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
class Sampler:  # peak of the current RSS, sampled every 0.2 ms (torch ops release the GIL)
    def __init__(self):
        self.peak, self.run = 0, True
        self.t = threading.Thread(target=self.loop, daemon=True); self.t.start()
    def loop(self):
        while self.run:
            self.peak = max(self.peak, current_rss()); time.sleep(0.0002)
    def stop(self):
        self.run = False; self.t.join(); self.peak = max(self.peak, current_rss()); return self.peak
def rss():
    return current_rss()
if case == "fused":
    assert C.load_extension()["ok"]
if level == "op":
    rows = 400
    x = (2 * torch.randn(rows, V)).requires_grad_()
    y = torch.randint(0, V, (rows,))
    d = torch.randn(rows, V)
    gc.collect(); base = rss(); S = Sampler()
    if case == "fused":
        loss = torch.ops.hessian.softmax_xent(x, y, -100)[0].sum()
    else:
        loss = torch.nn.functional.cross_entropy(x, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    del loss
    (h,) = torch.autograd.grad(g, x, d)
    peak = S.stop()
    logits_bytes = rows * V * 4
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(5):
        ids = torch.randint(0, V, (10, 96), generator=g)
        lab = torch.full_like(ids, -100); lab[:, -8:] = ids[:, -8:]
        batches.append({{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}})
    model.eval()
    gc.collect(); base = rss(); S = Sampler()
    op = C.HessianOperator(model, batches, fused_ce=(case == "fused"), answer_logits_only=(case != "autograd_full"))
    v = C._normalize(C._start_vector(op.params, 0))
    hv = op.hvp(v)
    peak = S.stop()
    logits_bytes = 50 * 8 * V * 4
print(json.dumps({{"case": case, "level": level, "base_bytes": base, "peak_bytes": peak,
                  "delta_bytes": peak - base, "logits_bytes": logits_bytes}}))
"""


def measure_memory(case, level):
    code = MEM_CHILD.format(root=ROOT, case=case, level=level)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arc")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro_batch_size", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed,cost,memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    ext = C.load_extension()
    backend = "extension" if ext["ok"] else "torch"
    res = {"machine": {"threads": args.threads, "torch": torch.__version__, "extension": ext},
           "task": args.task, "samples": args.samples}
    rows = []

    if "speed" not in skip or "cost" not in skip:
        model, batches = load_tiny_batches(args.task, args.samples, args.seed, args.micro_batch_size)
        n_params = sum(p.numel() for p in model.parameters())
        res["model"] = {"name": "tiny", "n_params": n_params, "micro_batches": len(batches),
                        "n_answer_tokens": sum(C._count_answer_tokens(b) for b in batches),
                        "max_len": max(b["input_ids"].shape[1] for b in batches)}
        print(f"tiny model: {n_params} params, {len(batches)} micro-batches, {args.samples} samples")

    if "speed" not in skip:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = C.hessian_spectrum(model, batches, tol=1e-9, max_iter=400, backend=backend)
        rho_ref = ref["rho"]
        print(f"reference: rho={rho_ref:.8g} (lanczos tol 1e-9, {ref['iterations']} it, converged={ref['converged']})")
        ours = C.hessian_spectrum(model, batches, backend=backend)  # defaults: lanczos, tol 1e-4
        ours_err = abs(ours["rho"] - rho_ref) / rho_ref
        pw = C.hessian_spectrum(model, batches, method="power", backend=backend)
        pw_err = abs(pw["rho"] - rho_ref) / rho_ref
        base = eigenthings_power(model, batches, steps=100, tol=1e-4, seed=args.seed)
        base_err = abs(base["rho"] - rho_ref) / rho_ref
        base_t3 = first_time_within(base["trace"], rho_ref, 1e-3)
        res["speed"] = {
            "rho_reference": rho_ref, "reference_iterations": ref["iterations"],
            "ours_lanczos": {k: ours[k] for k in ("rho", "lambda_max", "lambda_min", "iterations", "hvp_count",
                                                   "wall_time_s", "setup_time_s", "converged", "backend")},
            "ours_lanczos_rel_error": ours_err,
            "ours_power_retained": {k: pw[k] for k in ("rho", "iterations", "wall_time_s", "converged")},
            "ours_power_rel_error": pw_err,
            "eigenthings_power": {k: base[k] for k in ("rho", "iterations", "wall_time_s", "converged")},
            "eigenthings_rel_error": base_err,
            "eigenthings_time_to_within_1e-3_s": base_t3,
            "speedup_total": base["wall_time_s"] / ours["wall_time_s"],
            "speedup_to_1e-3": (base_t3 / ours["wall_time_s"]) if base_t3 else None,
        }
        s = res["speed"]
        print(f"ours (lanczos tol 1e-4): {ours['wall_time_s']:.2f} s, {ours['hvp_count']} HVPs, rel err {ours_err:.2e}")
        print(f"ours (power, retained graph): {pw['wall_time_s']:.2f} s, {pw['iterations']} HVPs, rel err {pw_err:.2e}")
        print(f"eigenthings-2021 power: {base['wall_time_s']:.2f} s, {base['iterations']} HVPs, rel err {base_err:.2e}"
              f", within 1e-3 from {base_t3 if base_t3 is None else round(base_t3, 2)} s")
        print(f"speed-up (time to stop): {s['speedup_total']:.1f}x; to 1e-3: {s['speedup_to_1e-3']}")
        rows += [{"part": "speed", "name": "ours_lanczos", "seconds": ours["wall_time_s"], "hvps": ours["hvp_count"],
                  "rel_error": ours_err},
                 {"part": "speed", "name": "ours_power", "seconds": pw["wall_time_s"], "hvps": pw["iterations"],
                  "rel_error": pw_err},
                 {"part": "speed", "name": "eigenthings_power", "seconds": base["wall_time_s"],
                  "hvps": base["iterations"], "rel_error": base_err}]

    if "cost" not in skip:
        res["cost"] = []
        for be in (["torch", "extension"] if ext["ok"] else ["torch"]):
            r = time_grad_and_hvp(model, batches, be)
            res["cost"].append(r)
            print(f"[{be}] grad {r['grad_s'] * 1e3:.1f} ms, HVP {r['hvp_s'] * 1e3:.1f} ms -> HVP/grad "
                  f"{r['hvp_over_grad']:.2f} (graph build {r['graph_build_over_grad']:.2f} grads)")
            rows.append({"part": "cost", "name": f"hvp_over_grad_{be}", "seconds": r["hvp_s"],
                         "ratio": r["hvp_over_grad"]})

    if "memory" not in skip and ext["ok"]:
        res["memory"] = {}
        for level in ("op", "model"):
            a = measure_memory("autograd", level)
            f = measure_memory("fused", level)
            ratio = f["delta_bytes"] / a["delta_bytes"]
            res["memory"][level] = {"autograd": a, "fused": f, "fused_over_autograd": ratio}
            print(f"memory [{level}, V=32000]: autograd {a['delta_bytes'] / 2**20:.0f} MiB, fused "
                  f"{f['delta_bytes'] / 2**20:.0f} MiB (one logits buffer {a['logits_bytes'] / 2**20:.0f} MiB)"
                  f" -> ratio {ratio:.2f}")
            rows.append({"part": "memory", "name": f"{level}_fused_over_autograd", "ratio": ratio,
                         "bytes": f["delta_bytes"]})
        full = measure_memory("autograd_full", "model")
        res["memory"]["model"]["autograd_full_logits"] = full
        res["memory"]["model"]["fused_over_autograd_full_logits"] = f["delta_bytes"] / full["delta_bytes"]
        print(f"memory [model, V=32000]: autograd over full [B,T,V] logits (finetune.answer_loss_sum's way) "
              f"{full['delta_bytes'] / 2**20:.0f} MiB -> fused+answer-rows/full "
              f"{f['delta_bytes'] / full['delta_bytes']:.2f}")
        rows.append({"part": "memory", "name": "model_fused_over_autograd_full_logits",
                     "ratio": f["delta_bytes"] / full["delta_bytes"], "bytes": full["delta_bytes"]})

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
