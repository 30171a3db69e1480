"""curvature.py at Llama-2-7B scale: the HVP graph per token per layer and the fused cross-entropy's workspace,
measured on 1-2 randomly initialised layers of 7B width, extrapolated to 32 layers as a per-GPU memory plan
(8 x 80 GB, 50 samples of the real tasks' lengths) and minutes per solve at a stated GPU throughput; and for each
of curvature.py's --measures its HVP count, minutes and Lanczos basis per GPU (measures_plan).

    OMP_NUM_THREADS=1 python bench/bench_curvature_scale.py --data_dir ../shared/data     # CPU, < 5 GiB
    python bench/bench_curvature_scale.py --device cuda --quick --data_dir ../shared/data  # one GPU: one HVP
        # and one solve on a random 7B-shaped model with as many layers as fit (bench/gpu_check.sh runs this)

Measured (CPU: bfloat16 layers, embeddings and LM head frozen so that it fits; sequences of 2 x 32 and
2 x 64 tokens with 8 answer tokens each): the saved-tensor bytes of the first-order graph
(HessianOperator.graph_bytes) with 1 and 2 layers, so per layer per token = the difference over the tokens,
with the model's own attention as on a GPU (block_attention=False: attention_hvp.py runs on CPU only);
the linear_xent HVP's workspace from its row chunk (csrc/hessian.cpp chunk_size) on the GPU, where the
allocator's peak is read (torch.cuda.max_memory_allocated). The sample lengths come from --data_dir's tasks,
tokenized by --tokenizer (a folder with Llama-2's tokenizer, e.g. the Llama-2-7b-hf checkpoint) or, without it,
by the tiny tokenizer (a stand-in that gives ARC and BBQ about 30% more tokens than Llama-2's, ToxiGen 8% more;
printed as such). Writes bench/results/bench_curvature_scale.json.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvature as C  # noqa: E402

LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096)
N_LAYERS_7B = 32
PARAMS_PER_LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two RMSNorms
PARAMS_7B = N_LAYERS_7B * PARAMS_PER_LAYER + 2 * 32000 * 4096 + 4096
GiB = 1 << 30


def seven_b_shaped(layers, dtype, device, freeze_ends, width=1):
    """Llama-2-7B's shapes (width < 1: hidden, intermediate and heads scaled down, vocabulary kept)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(LLAMA7B)
    if width != 1:
        shape.update(hidden_size=int(4096 * width), intermediate_size=int(11008 * width),
                     num_attention_heads=int(32 * width), num_key_value_heads=int(32 * width))
    cfg = LlamaConfig(**shape, num_hidden_layers=layers, attn_implementation="eager", tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy first (the 5 GiB limit)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    if freeze_ends:
        model.model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    return model.eval()


def random_batch(n, T, n_answer, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA7B["vocab_size"], (n, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, T - n_answer:] = ids[:, T - n_answer:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def graph_bytes(model, batch, ce):
    op = C.HessianOperator(model, [batch], fused_ce=ce, graph_memory_budget=1 << 50, block_attention=False)
    out = op.graph_bytes
    del op
    return out


def measure_graph(dtype, device, ce, lengths=(32, 64), n=2, n_answer=8):
    """Saved-tensor bytes of the first-order graph: {layers: {T: bytes}} for 1 and 2 layers. The last layer runs
    at the answer rows only (answer_rows.py) in both, so the difference is one full layer and the rest is the
    head less what that pruning saves (negative at these lengths; the plan counts it as 0 and all 32 layers
    full: conservative by about 1/32)."""
    got = {}
    for layers in (1, 2):
        model = seven_b_shaped(layers, dtype, device, freeze_ends=True)
        got[layers] = {T: graph_bytes(model, random_batch(n, T, n_answer, device), ce) for T in lengths}
        del model
    t1, t2 = lengths
    per_layer_token = {T: (got[2][T] - got[1][T]) / (n * T) for T in lengths}
    return {"bytes": got, "per_layer_per_token": max(per_layer_token.values()),
            "per_layer_per_token_by_T": per_layer_token,
            "rest_per_token": (got[1][t2] - got[1][t1]) / (n * (t2 - t1)) - per_layer_token[t2],
            "samples": n, "answer_tokens_per_sample": n_answer}


CKPT_CHILD = r"""
import json, re, sys, warnings
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
warnings.simplefilter("ignore")
import torch
import curvature as C
from bench_curvature_scale import random_batch, seven_b_shaped
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024
model = seven_b_shaped({layers}, torch.float32, "cpu", freeze_ends=True, width={width})
batch = random_batch(2, {T}, 8, "cpu")
params = [p for p in model.parameters() if p.requires_grad]
v = C._normalize(C._start_vector(params, 0))
hv = [torch.empty_like(p) for p in params]  # the output's storage, allocated before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
op = C.HessianOperator(model, [batch], fused_ce="torch", graph_memory_budget=0, gradient_checkpointing={mode!r},
                       block_attention=False)
for a, b in zip(hv, op.hvp(v)):
    a.copy_(b)
print(json.dumps({{"peak_delta": status("VmHWM") - base}}))
"""


def checkpointing_peak(mode, layers, T, width):
    """Peak RSS over the loaded model of one recomputed HVP (2 x T tokens, float32 layers of `width` x 7B's),
    gradient_checkpointing `mode` ("off": the graph rebuilt; "on": layer-wise), in a fresh subprocess."""
    code = CKPT_CHILD.format(root=ROOT, bench=os.path.dirname(os.path.abspath(__file__)), layers=layers, T=T,
                             width=width, mode=mode)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_delta"]


def measure_checkpointing(width=0.25, lengths=(64, 192)):
    """Peak bytes per token of one recomputed HVP, rebuilt vs layer-wise: the slope of the peak over the tokens
    (2 sequences of each of `lengths`; parameter-sized buffers cancel), with 1 and 2 layers; the difference of
    the two slopes is a layer's share (layer-wise: its stored input and tangent), the rest is paid once (one
    layer's working set, the head). Float32 at a quarter of 7B's width (hidden 1024, 8 heads of 128), scaled to
    7B's bf16 by the width (activations and heads grow with it, the head size is fixed) and by 2/4 bytes."""
    t1, t2 = lengths
    out = {"width": width, "lengths": list(lengths), "sequences": 2, "dtype_measured": "float32"}
    scale = (1 / width) * 0.5 / (2 * (t2 - t1))  # per token, at 7B width, in bf16
    for mode in ("off", "on"):
        peaks = {n: {T: checkpointing_peak(mode, n, T, width) for T in lengths} for n in (1, 2)}
        slope = {n: (peaks[n][t2] - peaks[n][t1]) * scale for n in (1, 2)}
        out[mode] = {"peaks": peaks, "per_layer_per_token_7b_bf16": slope[2] - slope[1],
                     "once_per_token_7b_bf16": max(2 * slope[1] - slope[2], 0.0)}
    return out


def xent_workspace_bytes(n_answer_rows, hidden=4096, vocab=32000, elem=4):
    """Bytes of the [chunk, V] temporaries linear_xent_hvp holds at once (about four of them; chunk_size()'s
    rule: all rows up to 2^22 elements, else at most 2^22 elements and 1/8 of the rows) plus the kept probs."""
    chunk = n_answer_rows if n_answer_rows * vocab <= (1 << 22) else max(1, min((1 << 22) // vocab,
                                                                            (n_answer_rows + 7) // 8))
    return {"chunk_rows": chunk, "workspace": 4 * chunk * vocab * elem, "probs_kept": n_answer_rows * vocab * elem}


def task_lengths(data_dir, samples, seed, tokenizer=None):
    """Tokens and answer tokens of `samples` training samples per task, tokenized by the tokenizer folder
    `tokenizer` (None: the tiny base's, a stand-in)."""
    from chained_tuning import checkpoint, common
    from chained_tuning.data import tasks

    tok = checkpoint.load_tokenizer(tokenizer) if tokenizer else checkpoint.load_model_and_tokenizer("tiny")[1]
    out = {}
    for t in ("toxigen", "arc"):
        try:
            pool = tasks.load_task(t, split="train", seed=seed, data_dir=data_dir).examples
        except Exception as e:  # noqa: BLE001
            print(f"task {t}: no data ({e}); skipped")
            continue
        bs = C.build_batches(tok, [pool[i] for i in common.sample_indices(len(pool), samples, seed)], 10)
        out[t] = {"tokens": int(sum(int(b["attention_mask"].sum()) for b in bs)),
                  "answer_tokens": int(sum(C._count_answer_tokens(b) for b in bs)),
                  "max_len": int(max(b["input_ids"].shape[1] for b in bs))}
    return out


def plan(g, lengths, args):
    """Per-GPU bytes for `gpus` GPUs: bf16 model and HVP, float32 solver vectors sharded, the graphs retained
    up to what is left of the GPU (95%), the rest recomputed every HVP in micro-batches of 2 samples."""
    world, p = args.gpus, PARAMS_7B
    per_tok = g["per_layer_per_token"] * N_LAYERS_7B + max(g["rest_per_token"], 0)
    rows = {}
    for task, L in lengths.items():
        tok = math.ceil(L["tokens"] / world * 1.15)  # 15%: balance by answer tokens + padding (MAX_PADDING)
        ans = math.ceil(L["answer_tokens"] / world)
        xw = xent_workspace_bytes(ans)
        # at 7B the warm start's 6 vectors exceed a quarter of the budget: curvature.py's default is then the
        # gradient+random start and Lanczos holds 3 shards (v, v_prev, H v)
        fixed = {
            "parameters (bf16, replicated)": 2 * p,
            "first-order gradient kept in the graph (bf16)": 2 * p,
            "gather/reduce buffer (bf16, ShardedOperator)": 2 * p,
            "H v of this rank's samples (bf16, transient)": 2 * p,
            f"solver vectors: 3 fp32 shards of 1/{world}": 3 * 4 * math.ceil(p / world),
            "fused cross-entropy: probs kept + HVP workspace": xw["probs_kept"] + xw["workspace"],
        }
        left = 0.95 * args.gpu_gb * 1e9 - sum(fixed.values())
        micro = 2 * math.ceil(L["max_len"] * 0.7) * per_tok  # one recomputed micro-batch of 2 samples
        need = tok * per_tok
        retained = need if need <= left else max(left - micro, 0)
        parts = dict(fixed)
        parts[f"graphs retained: {int(retained / per_tok)} of {tok} tokens x {per_tok / 2**20:.2f} MiB"] = retained
        if retained < need:
            parts["one recomputed micro-batch (2 samples), transient"] = micro
        rows[task] = {"tokens_per_gpu": tok, "answer_tokens_per_gpu": ans, "parts": parts,
                      "retained_share": retained / need, "total": sum(parts.values())}
    return rows


def longest_micro_batch(g, ck, plans, args):
    """Tokens of the longest micro-batch one recomputed HVP can take on a GPU beside the fixed parts of the plan:
    its graph rebuilt (gradient_checkpointing off) or layer by layer (on: no graph and no first-order gradient kept)."""
    out = {}
    rebuilt = g["per_layer_per_token"] * N_LAYERS_7B + max(g["rest_per_token"], 0)
    stored = max(ck["on"]["per_layer_per_token_7b_bf16"], 2 * 4096 * 2)  # at least x_l and dx_l in bf16
    layerwise = stored * N_LAYERS_7B + ck["on"]["once_per_token_7b_bf16"]
    for task, row in plans.items():
        fixed = sum(b for k, b in row["parts"].items() if not k.startswith(("graphs retained", "one recomputed")))
        left = 0.95 * args.gpu_gb * 1e9 - fixed
        out[task] = {"rebuilt_tokens": int(left / rebuilt),
                     "layerwise_tokens": int((left + 2 * PARAMS_7B) / layerwise),  # no gradient kept in a graph
                     "rebuilt_bytes_per_token": rebuilt, "layerwise_bytes_per_token": layerwise}
    return out


def minutes_per_solve(lengths, ratios, plans, args):
    """Solve = graph build (ratios["build"] forwards for the retained share, a loss-only forward for the rest) +
    args.hvps full HVPs, each ratios["retained"] forwards on the retained share and ratios["rebuilt"] on the
    recomputed one (its graph rebuilt every product: the plan's default); a forward = 2 * params * tokens FLOPs
    per GPU at args.tflops; the collectives (an all-gather and a reduce-scatter of 2 bytes/parameter per HVP) at
    100 GB/s. layerwise_min: the same solve with every micro-batch layer by layer (--gradient_checkpointing on:
    no graph built, ratios["layerwise"] forwards per product)."""
    out = {}
    comm = 2 * 2 * PARAMS_7B / 100e9
    for task, L in lengths.items():
        tok = L["tokens"] / args.gpus * 1.15
        fwd = 2 * PARAMS_7B * tok / (args.tflops * 1e12)
        share = plans[task]["retained_share"]
        build = fwd * (ratios["build"] * share + (1 - share))
        hvp = fwd * (ratios["retained"] * share + ratios["rebuilt"] * (1 - share)) + comm
        lw = fwd * ratios["layerwise"] + comm
        out[task] = {"forward_s": fwd, "build_s": build, "hvp_s": hvp, "collectives_s": comm,
                     "solve_min": (build + args.hvps * hvp) / 60, "layerwise_hvp_s": lw,
                     "layerwise_min": (fwd + args.hvps * lw) / 60}
    return out


def measures_plan(minutes, plans, args):
    """curvature.py --measures at 7B per task: each measure's HVPs at its defaults (MeasureOptions; topk and
    blocks: at most max_steps Lanczos steps, each block capped at max_steps too), the minutes those HVPs take
    on the rho solve's operator (its graphs already built: minutes_per_solve's hvp_s each), and the fp32 vectors
    each rank holds: with a stored Lanczos basis (full reorthogonalisation: steps + 1 shards of 1/gpus of the
    vector; a block's basis is the block's size, the largest block a decoder layer) and without (three); the
    trace's Hutch++ basis Q (m/3 vectors) on the GPU or in host memory (four vectors on the GPU). Free memory:
    the GPU less the plan's total (the graphs retained) plus the solve's three vectors, let go when it returns;
    --reorth auto stores the Lanczos basis, and the trace keeps Q on the GPU, where it and two more vectors fit
    70% of that (measures.memory_budget), as measures._reorthogonalise and _basis_home decide."""
    from chained_tuning.hessian.measures import MeasureOptions
    d = MeasureOptions()
    shard = 4 * PARAMS_7B / args.gpus
    layer_shard = 4 * PARAMS_PER_LAYER / args.gpus
    blocks = N_LAYERS_7B + 2  # each decoder layer, the embeddings, the head
    # name: (HVPs, vectors on the GPU with the basis there, without it (None: no other path), size of one,
    # auto's two choices, note)
    lanczos = ("full", "none")
    rows = {"rho": (args.hvps, 3, None, shard, None, f"--hvps {args.hvps} (the assumed solve)"),
            "trace": (d.trace_products, d.trace_products // 3 + 3, 4, shard, ("device", "host"),
                      f"Hutch++ {d.trace_products} HVPs; its m/3 basis Q, {d.trace_products // 3 * shard / 1e9:.1f} "
                      f"GB per rank, in host memory where it is not on the GPU"),
            "density": (d.slq_probes * d.slq_steps, d.slq_steps + 1, 3, shard, lanczos,
                        f"SLQ {d.slq_probes} probes x {d.slq_steps} steps"),
            "topk": (d.max_steps, d.max_steps + 1, 3, shard, lanczos,
                     f"at most {d.max_steps} steps (top/bottom {d.topk})"),
            "blocks": (blocks * d.max_steps, d.max_steps + 1, 3, layer_shard, lanczos,
                       f"at most {d.max_steps} steps for each of {blocks} blocks")}
    out = {}
    for task, m in minutes.items():
        free = max(args.gpu_gb * 1e9 - plans[task]["total"] + 3 * 4 * math.ceil(PARAMS_7B / args.gpus), 0.0)
        out[task] = {}
        for name, (n, full, lean, size, choices, note) in rows.items():
            basis_fits = (full + 2) * size <= 0.7 * free
            held = full if (basis_fits or lean is None) else lean
            out[task][name] = {"hvp_count": n, "minutes": n * m["hvp_s"] / 60, "basis_gb_per_gpu": full * size / 1e9,
                               "lean_gb_per_gpu": None if lean is None else lean * size / 1e9,
                               "free_gb_per_gpu": free / 1e9, "auto": None if choices is None else
                               choices[0 if basis_fits else 1],
                               "fits": bool(name == "rho" or held * size <= free), "note": note}
    return out


def say_measures(rows):
    """measures_plan's rows of one task, a line each, beside the plan's parts: the vectors they hold."""
    for name, mm in rows.items():
        way = ("" if mm["auto"] is None else f"; auto: {mm['auto']} ({mm['lean_gb_per_gpu']:.1f} GB on the "
               f"GPU without the basis there)")
        print(f"    --measures {name:8s} {mm['hvp_count']:5d} HVPs {mm['minutes']:8.2f} min, with the basis "
              f"{mm['basis_gb_per_gpu']:6.1f} GB per GPU of {mm['free_gb_per_gpu']:.1f} free{way} -> "
              f"{'fits' if mm['fits'] else 'does NOT fit'} ({mm['note']})")


def _best_time(fn, sync, reps=3):
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def costs_in_forwards(dtype, device, width=1):
    """Measured, in forwards (no grad) of the same batch: the graph build (forward + first backward with
    create_graph), one HVP on the retained graph, one with the graph rebuilt (budget 1 byte, checkpointing off)
    and one layer by layer (on); 1 layer, 2 x 64 tokens, minimum of 3 each (FLOP ratios: on the CPU in float32 at
    a quarter of the width, bf16 matmuls on a CPU say nothing about a GPU's). The last layer at full rows, as
    the 31 of 32 layers that are not last at 7B."""
    model = seven_b_shaped(1, dtype, device, freeze_ends=True, width=width)
    b = random_batch(2, 64, 8, device)
    ce = "auto" if C.load_extension()["ok"] else "torch"
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)  # noqa: E731
    make = lambda budget, ck: C.HessianOperator(model, [b], fused_ce=ce, graph_memory_budget=budget,  # noqa: E731
                                                gradient_checkpointing=ck, last_layer_rows=False,
                                                block_attention=False)
    op = make(1 << 50, "off")
    v = op.random(0)
    op.hvp(v)  # warm-up

    def forward():
        with torch.no_grad():
            C.batch_answer_loss_sum(model, b, op.ce)
    # the build is the first-order graph alone, not the operator's one-off probes of the first rows
    t = {"forward": _best_time(forward, sync), "build": _best_time(lambda: op._first_order(b), sync),
         "retained": _best_time(lambda: op.hvp(v), sync)}
    for key, budget, ck in (("rebuilt", 1, "off"), ("layerwise", 1 << 50, "on")):
        other = make(budget, ck)
        if not (other.recompute if ck == "off" else other.layerwise):
            raise RuntimeError(f"the {key} HVP did not take its path (recompute {len(other.recompute)}, "
                               f"layer-wise {len(other.layerwise)})")
        other.hvp(v)
        t[key] = _best_time(lambda o=other: o.hvp(v), sync)
        del other
    return {k: t[k] / t["forward"] for k in ("build", "retained", "rebuilt", "layerwise")}, t


def quick(args):
    """One HVP and one solve on a 7B-shaped model with as many layers as fit on this GPU (bf16); on a CPU (a
    dry run of bench/gpu_check.sh) one float32 layer at 1/8 of the width."""
    if args.device == "cpu":
        return quick_run(1, torch.float32, "cpu", width=0.125)
    dev = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(dev)
    # bytes per parameter in one process: bf16 param, gradient in the graph, v cast to bf16, bf16 H v and its
    # fp32 copy, three fp32 Lanczos vectors (24); plus the graph of 640 tokens at ~0.55 MiB per token per layer
    per_layer = PARAMS_PER_LAYER * 24 + 640 * 580_000
    ends = 2 * 32000 * 4096 * 24
    layers = max(1, min(N_LAYERS_7B, int((0.6 * free - ends) // per_layer)))
    print(f"GPU {torch.cuda.get_device_name(dev)}: {free / GiB:.0f} of {total / GiB:.0f} GiB free -> {layers} "
          f"layers of 7B width", flush=True)
    return quick_run(layers, torch.bfloat16, "cuda")


def quick_run(layers, dtype, device, width=1):
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = seven_b_shaped(layers, dtype, device, freeze_ends=False, width=width)
    batches = [random_batch(5, 128, 16, device, seed=s) for s in range(2)]  # 10 samples of 128 tokens
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r, op = C.hessian_spectrum(model, batches, return_operator=True, max_iter=20)
    sync()
    solve = time.perf_counter() - t
    v = op.random(1)
    sync()
    t = time.perf_counter()
    op.hvp(v)
    sync()
    hvp = time.perf_counter() - t
    graph_bytes = op.graph_bytes
    del op
    lw = C.HessianOperator(model, batches, gradient_checkpointing="on")  # one decoder layer at a time
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    lw.hvp(v)
    sync()
    lw_hvp = time.perf_counter() - t
    lw_peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
    del lw
    n_params = sum(p.numel() for p in model.parameters())
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    out = {"layers": layers, "n_params": n_params, "tokens": tokens, "hvp_s": hvp, "solve_s": solve,
           "layerwise_hvp_s": lw_hvp, "layerwise_peak_allocated_gib": lw_peak,
           "solve_hvps": r["hvp_count"], "rho": r["rho"], "rel_error_bound": r["rel_error_bound"],
           "device": device, "dtype": str(dtype), "width": width,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
           "hvp_tflops": 6 * 2 * n_params * tokens / hvp / 1e12,
           "graph_bytes_per_token_per_layer": graph_bytes / (tokens / len(batches)) / layers}
    print(f"one HVP: {hvp:.2f} s ({out['hvp_tflops']:.0f} TFLOP/s at 6 forwards per HVP); one solve: {solve:.1f} s, "
          f"{r['hvp_count']} HVPs, rho {r['rho']:.6g} (rel. bound {r['rel_error_bound']:.1e}); peak "
          f"{out['peak_allocated_gib'] or 0:.1f} GiB; graph {out['graph_bytes_per_token_per_layer'] / 2**20:.2f} MiB per "
          f"token per layer", flush=True)
    print(f"one layer-wise HVP (--gradient_checkpointing on): {lw_hvp:.2f} s, peak {lw_peak or 0:.1f} GiB", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", help="cpu (the memory measurement) or cuda (also the --quick run)")
    ap.add_argument("--quick", action="store_true", help="one HVP and one solve on a 7B-shaped model with as many "
                    "layers as fit on the GPU (cpu: one layer at 1/8 width, a dry run); skips the measurement")
    ap.add_argument("--data_dir", default=None, help="folder laid out like ../shared/data (task lengths)")
    ap.add_argument("--tokenizer", default=None, help="a folder with Llama-2's tokenizer (tokenizer.json), e.g. the "
                    "Llama-2-7b-hf checkpoint, for the tasks' lengths; default: the tiny tokenizer, a stand-in")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu_gb", type=float, default=80.0)
    ap.add_argument("--tflops", type=float, default=200.0, help="assumed effective bf16 TFLOP/s per GPU")
    ap.add_argument("--hvps", type=int, default=3, help="assumed full HVPs per solve (2-4 on the tiny checkpoints)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    for flag in ("samples", "gpus", "gpu_gb", "tflops", "hvps"):
        if not getattr(args, flag) > 0:
            sys.exit(f"error: --{flag} must be > 0, got {getattr(args, flag)}")
    from chained_tuning import checkpoint, common
    lengths = {}
    try:  # before the measurement: a tokenizer folder that is wrong or does not load fails at once
        if args.tokenizer is not None:
            checkpoint.tokenizer_dir(args.tokenizer)
        if args.data_dir and not args.quick:
            lengths = task_lengths(args.data_dir, args.samples, 0, args.tokenizer)
    except common.UserError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    lengths_from = f"tokenizer {args.tokenizer}" if args.tokenizer else "tiny tokenizer (stand-in for Llama-2's)"
    res = {"assumptions": {"gpus": args.gpus, "gpu_gb": args.gpu_gb, "tflops_per_gpu": args.tflops,
                           "full_hvps_per_solve": args.hvps, "params_7b": PARAMS_7B, "dtype": "bfloat16 HVP, "
                           "float32 sharded solver vectors", "lengths": lengths_from}}
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"error: --device {args.device}: use cpu, or cuda with a visible GPU")
    if args.quick:
        res["quick"] = quick(args)
    else:
        ce = "auto" if C.load_extension()["ok"] else "torch"
        g = measure_graph(torch.bfloat16, args.device, ce)
        res["graph"] = g
        print(f"graph (bf16, {ce}): {g['per_layer_per_token'] / 2**20:.3f} MiB per token per layer "
              f"({g['per_layer_per_token'] / 4096:.0f} bytes per hidden unit); rest {g['rest_per_token'] / 2**20:.3f}"
              f" MiB per token (the head less the last layer's answer-rows saving; counted as >= 0)", flush=True)
        ratios, secs = costs_in_forwards(torch.float32, args.device, width=0.25)
        res["costs_in_forwards"] = {"ratios": ratios, "seconds": secs}
        print(f"in forwards (1 layer at 1/4 width, float32, 128 tokens, {args.device}): graph build "
              f"{ratios['build']:.1f}; one HVP on the retained graph {ratios['retained']:.1f}, graph rebuilt "
              f"{ratios['rebuilt']:.1f}, layer-wise {ratios['layerwise']:.1f}", flush=True)
        if not lengths:
            lengths = {"assumed (no --data_dir)": {"tokens": 50 * 200, "answer_tokens": 50 * 6, "max_len": 300}}
        res["lengths"] = lengths
        ck = measure_checkpointing()
        res["checkpointing"] = ck
        print(f"one recomputed HVP, peak per token at 7B width (bf16, from 1-2 float32 layers at 1/4 width, "
              f"2 x {ck['lengths']} tokens): rebuilt graph {ck['off']['per_layer_per_token_7b_bf16'] / 2**20:.3f} MiB per "
              f"layer; layer-wise {ck['on']['per_layer_per_token_7b_bf16'] / 2**20:.3f} MiB per layer + "
              f"{ck['on']['once_per_token_7b_bf16'] / 2**20:.2f} MiB once (one layer's working set, the head)", flush=True)
        res["plan"] = plan(g, lengths, args)
        res["longest_micro_batch"] = longest_micro_batch(g, ck, res["plan"], args)
        res["minutes"] = minutes_per_solve(lengths, ratios, res["plan"], args)
        res["measures"] = measures_plan(res["minutes"], res["plan"], args)
        print(f"\nper-GPU plan, Llama-2-7B ({PARAMS_7B / 1e9:.2f}B parameters), {args.samples} samples on {args.gpus}"
              f" x {args.gpu_gb:.0f} GB (assumptions: {json.dumps(res['assumptions'])})")
        for task, row in res["plan"].items():
            L = lengths[task]
            print(f"  {task}: {L['tokens']} tokens ({L['answer_tokens']} answer tokens) in all, "
                  f"{row['tokens_per_gpu']} per GPU")
            for k, b in row["parts"].items():
                print(f"    {k:62s} {b / 1e9:7.1f} GB")
            fits = row["total"] <= args.gpu_gb * 1e9
            m = res["minutes"][task]
            print(f"    {'total':62s} {row['total'] / 1e9:7.1f} GB -> {'fits' if fits else 'does NOT fit'}; "
                  f"{row['retained_share']:.0%} of the graphs retained; {m['solve_min']:.2f} min per solve (forward "
                  f"{m['forward_s']:.2f} s, build {m['build_s']:.2f} s, HVP {m['hvp_s']:.2f} s at {args.tflops:.0f} "
                  f"TFLOP/s); all layer-wise: {m['layerwise_min']:.2f} min (HVP {m['layerwise_hvp_s']:.2f} s)")
            lm = res["longest_micro_batch"][task]
            print(f"    longest micro-batch one HVP can recompute beside the rest: {lm['rebuilt_tokens']} tokens with the "
                  f"graph rebuilt ({lm['rebuilt_bytes_per_token'] / 2**20:.1f} MiB/token), {lm['layerwise_tokens']} "
                  f"layer-wise (--gradient_checkpointing on, {lm['layerwise_bytes_per_token'] / 2**20:.2f} MiB/token)")
            say_measures(res["measures"][task])
    with open(os.path.join(args.out, "bench_curvature_scale.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}/bench_curvature_scale.json")


if __name__ == "__main__":
    main()
