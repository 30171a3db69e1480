"""Scale of the paper profile at Llama-2-7B: measures, on a Llama of 7B width (hidden 4096, intermediate
11008, 32 heads, vocabulary 32000, random init) with 1 and 2 decoder layers, the peak memory and time per
token of a training step (fp32, bf16 autocast, bf16 weights with and without gradient checkpointing), an
evaluation forward and a safetensors save; takes the activation bytes per token per layer from the 1 -> 2
layer difference (which removes embedding and head), and extrapolates with cost_model.py to 32 layers on
8 x 80 GB: memory per GPU and hours per stage kind of the paper profile, the total, and the disk.

    python bench/bench_scale.py                                # CPU, 2 x 256 tokens, ~10 min on 2 cores
    python bench/bench_scale.py --quick                        # 1 x 128 tokens, fewer modes (~3 min)
    python bench/bench_scale.py --no_measure                   # the profile from cost_model's constants only
    python bench/bench_scale.py --device cuda --layers 1,2 --big_train_layers 12 --big_eval_layers 32

Each measurement runs in its own subprocess (peak RSS by resource.getrusage on CPU, max_memory_allocated on
CUDA). Token counts per task come from --data_dir's real files, counted with --tokenizer (a folder with a
tokenizer.json, e.g. Llama-2's) or estimated as characters / cost_model.CHARS_PER_TOKEN. Writes
bench/results/scale.json.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chained_tuning.study import cost_model as cm  # noqa: E402
from chained_tuning.common import (AT_LEAST_1, NON_NEGATIVE, HelpFormatter, UserError, check_args, die_on_user_error,
                                   write_json_atomic)
from chained_tuning.checkpoint import tokenizer_dir
from chained_tuning.data.tasks import load_task

GiB = 2 ** 30
TRAIN_MODES = ("train_fp32", "train_autocast", "train_bf16", "train_bf16_ckpt")
# LoRA (peft) on a frozen bf16 base: cost_model.LORA_ONE_GPU's rank and target projections
LORA_MODES = ("train_bf16_lora", "train_bf16_lora_ckpt")
EVAL_MODES = ("eval_bf16",)
QUICK_MODES = ("train_bf16", "train_bf16_ckpt", "eval_bf16")
ALL_MODES = TRAIN_MODES + LORA_MODES + EVAL_MODES
PAPER_COUNTS = {"first_stages": 75, "chains": 192, "replay_trainings": 252, "mitigations": 54, "long_chains": 6,
                "curvature_solves": 15, "taylor_checks": 36}
PAPER_TASKS = ("arc", "csqa", "csqa2", "toxigen", "bbq")
CAP, SAFE = ("arc", "csqa", "csqa2"), ("toxigen", "bbq")
COUNT_OF = {"first_stage": "first_stages", "chain": "chains", "replay_training": "replay_trainings",
            "mitigation": "mitigations", "long_chain": "long_chains", "curvature_solve": "curvature_solves",
            "taylor_check": "taylor_checks"}
REPLAY_CHAINS = (("toxigen", "arc"), ("toxigen", "csqa"), ("toxigen", "csqa2"), ("bbq", "arc"), ("bbq", "csqa"),
                 ("bbq", "csqa2"))
LONG_CHAINS = (("toxigen", "arc", "csqa2"), ("arc", "toxigen", "csqa"))


# ---------------------------------------------------------------------------------------- measurement
def build_model(layers, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = cm.LLAMA2_7B
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=layers,
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      vocab_size=shape["vocab"], max_position_embeddings=4096, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy raises the peak before the measurement
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Start the peak-RSS count afresh (Linux: clear_refs 5 resets VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """VmHWM of this process (the peak since reset_peak_rss), else getrusage's lifetime maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (deduplicated by storage, parameters excluded): the
    activation memory held at the end of the forward pass."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self):
        return sum(self.storages.values())


def run_step(model, mode, ids, optimizer):
    """One step of `mode`; returns the saved-activation bytes of its forward (0 for evaluation)."""
    import torch

    if mode.startswith("eval"):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        return 0
    model.train()
    saved = SavedBytes(model)
    autocast = (torch.autocast(ids.device.type, dtype=torch.bfloat16) if mode == "train_autocast"
                else torch.autocast(ids.device.type, enabled=False))
    with autocast, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    held = saved.total  # before backward: the recompute of checkpointed layers adds its own later
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return held


def measure(device, layers, mode, batch, seq, repeats, optimizer):
    """Peak bytes above the built model, saved activation bytes and median seconds of one step."""
    import torch

    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dtype = torch.float32 if mode in ("train_fp32", "train_autocast") else torch.bfloat16
    model = build_model(layers, dtype, device)
    if mode.endswith("_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode in LORA_MODES:
        from peft import LoraConfig, get_peft_model

        lora = cm.LORA_ONE_GPU
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=list(lora["targets"])))
    elif device == "cpu" and not mode.startswith("eval"):
        # embedding and head frozen: keeps their 1 GiB of fp32 gradients out of RAM; they cancel in the
        # 1 -> 2 layer difference anyway
        model.model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    opt = None
    if optimizer and not mode.startswith("eval"):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=device == "cuda")
    ids = torch.randint(0, cm.LLAMA2_7B["vocab"], (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    times, held = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        held = run_step(model, mode, ids, opt)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"device": device, "trainable_params": trainable, "layers": layers, "mode": mode, "batch": batch,
            "seq": seq, "tokens": batch * seq,
            "optimizer": opt is not None, "n_params": n_params, "peak_bytes_above_model": peak,
            "saved_activation_bytes": held, "seconds": statistics.median(times), "all_seconds": times,
            "s_per_token": statistics.median(times) / (batch * seq)}


def measure_save(device, layers):
    """safetensors save_file of a bf16 model of `layers` layers: bytes and bytes per second."""
    import torch
    from safetensors.torch import save_file

    model = build_model(layers, torch.bfloat16, device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = os.path.join(tmp, "model.safetensors")
        t0 = time.perf_counter()
        save_file(state, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # the write reached the disk, not just the page cache
        dt = time.perf_counter() - t0
        size = os.path.getsize(path)
    return {"mode": "save", "layers": layers, "bytes": size, "seconds": dt, "bytes_per_s": size / dt}


def child(spec):
    """Run one measurement in a fresh process (its own peak RSS) and return its JSON record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_measurements(args):
    modes = args.modes or (QUICK_MODES if args.quick else ALL_MODES)
    records = []
    for mode in modes:
        for layers in args.layers:
            rec = child({"device": args.device, "layers": layers, "mode": mode, "batch": args.batch,
                         "seq": args.seq, "repeats": args.repeats, "optimizer": args.optimizer})
            print(f"measured: {mode:16s} layers {layers}: peak +{rec['peak_bytes_above_model'] / GiB:6.2f} GiB, "
                  f"saved activations {rec['saved_activation_bytes'] / GiB:6.3f} GiB, "
                  f"{rec['s_per_token'] * 1e3:8.3f} ms/token ({rec['seconds']:.1f} s/step)", flush=True)
            records.append(rec)
    for spec in big_specs(args):
        rec = child(spec)
        print(f"measured: {spec['mode']:16s} layers {spec['layers']}: peak +{rec['peak_bytes_above_model'] / GiB:6.2f} "
              f"GiB, {rec['tokens'] / rec['seconds']:,.0f} tokens/s", flush=True)
        rec["big"] = True
        records.append(rec)
    save = child({"mode": "save", "device": args.device, "layers": min(args.layers)})
    print(f"measured: safetensors save of {save['bytes'] / GiB:.2f} GiB in {save['seconds']:.1f} s = "
          f"{save['bytes_per_s'] / 1e6:,.0f} MB/s", flush=True)
    records.append(save)
    return records


def big_specs(args):
    """Measurements on as many layers as fit (CUDA): a training step with AdamW and an evaluation forward."""
    out = []
    if args.big_train_layers:
        # fp32 weights, AdamW and bf16 autocast: per parameter what an FSDP2 mixed-precision rank holds unsharded
        out.append({"device": args.device, "layers": args.big_train_layers, "mode": "train_autocast",
                    "batch": args.batch,
                    "seq": args.seq, "repeats": args.repeats, "optimizer": True})
    if args.big_eval_layers:
        out.append({"device": args.device, "layers": args.big_eval_layers, "mode": "eval_bf16",
                    "batch": args.eval_batch, "seq": args.seq, "repeats": args.repeats, "optimizer": False})
    return out


def per_layer_constants(records):
    """Per token per layer: saved activation bytes, peak bytes, seconds; from the 1 -> 2 layer difference."""
    by = {(r["mode"], r["layers"]): r for r in records if r.get("mode") != "save" and not r.get("big")}
    out = {}
    for mode in {m for m, _ in by}:
        ls = sorted(l for m, l in by if m == mode)
        if len(ls) < 2:
            continue
        lo, hi = by[(mode, ls[0])], by[(mode, ls[-1])]
        dl, tok = ls[-1] - ls[0], lo["tokens"]
        grad_key = "trainable_params" if mode in LORA_MODES else "n_params"  # LoRA: the adapters' fp32 gradients
        grad_bytes = 0 if mode.startswith("eval") else (hi[grad_key] - lo[grad_key]) / dl * (
            4 if mode in ("train_fp32", "train_autocast") + LORA_MODES else 2)
        diff = lambda key: (hi[key] - lo[key]) / dl  # noqa: E731  (per layer)
        out[mode] = {"saved_bytes_per_token_layer": diff("saved_activation_bytes") / tok,
                     "peak_bytes_per_token_layer": diff("peak_bytes_above_model") / tok,
                     "peak_minus_grad_bytes_per_token_layer": (diff("peak_bytes_above_model") - grad_bytes) / tok,
                     "s_per_token_layer": diff("seconds") / tok}
    return out


# ---------------------------------------------------------------------------------------- the profile
BBQ_RELEASE_EXAMPLES = 58_492  # BBQ's 11 categories; a data folder may hold fewer


def task_tokens(data_dir, batch=16, draws=2000, seed=0, bbq_examples=BBQ_RELEASE_EXAMPLES, count=None):
    """Per task, tokens (count(texts), default cost_model's estimate): mean training sequence, mean longest of
    `batch` (the padded length of a batch), test and validation tokens of an evaluation (prompt + every option)
    and their sizes. BBQ's evaluation sets are scaled to `bbq_examples` examples when the folder holds fewer
    categories (0: as found)."""
    count = count or cm.token_counter()[0]
    rng = random.Random(seed)
    out = {}
    for t in PAPER_TASKS:
        train = load_task(t, "train", data_dir).examples
        lens = count([e.prompt + e.continuation(e.label) for e in train])
        row = {"train_n": len(train), "train_mean": statistics.mean(lens),
               "train_batch_max": statistics.mean(max(rng.sample(lens, batch)) for _ in range(draws))}
        for split in ("test", "validation"):
            exs = load_task(t, split, data_dir).examples
            row[f"{split}_n"] = len(exs)
            row[f"{split}_tokens"] = sum(count([e.prompt for e in exs]))
            row[f"{split}_tokens"] += sum(count([e.continuation(i) for e in exs for i in range(len(e.options))]))
            row[f"{split}_mean_len"] = statistics.mean(count([e.prompt + e.continuation(0) for e in exs]))
        if t == "bbq" and bbq_examples:
            found = row["test_n"] / 0.3  # the seeded split's test share (tasks.UNSPLIT_FRACTIONS)
            scale = bbq_examples / found
            if scale > 1.05:
                row["scaled_from_examples"] = round(found)
                for split in ("test", "validation"):
                    row[f"{split}_n"] = round(row[f"{split}_n"] * scale)
                    row[f"{split}_tokens"] = round(row[f"{split}_tokens"] * scale)
        out[t] = row
    return out


def memory_table(tok, act, act_ckpt, gpu):
    """Training memory per GPU at 7B by GPUs per stage and tokens per GPU, without / with checkpointing."""
    n, sh = cm.n_params(), cm.LLAMA2_7B
    longest = max(r["train_batch_max"] for r in tok.values())
    print(f"\ntraining memory per GPU at 7B (GB; FSDP2 bf16 mixed precision, AdamW; fits: under "
          f"{cm.MEMORY_HEADROOM:.0%} of {cm.GPUS[gpu]['memory_gb']:g} GB):")
    print(f"  {'GPUs':>4s} {'tokens/GPU':>22s} {'no ckpt':>8s} {'ckpt':>8s}  needs")
    rows = []
    for g in (8, 4, 2, 1):
        for label, tokens in ((f"16/{g} x {longest:.0f} (paper)", 16 // g * longest),
                              (f"16/{g} x 2048 (max)", 16 // g * 2048)):
            kw = dict(n_params=n, n_gpus=g, tokens_per_micro_batch=tokens, layers=sh["layers"], hidden=sh["hidden"],
                      bytes_per_token_per_layer=act)
            a = cm.train_memory_per_gpu(checkpointing=False, **kw)
            b = cm.train_memory_per_gpu(checkpointing=True, bytes_per_token_per_layer_ckpt=act_ckpt, **kw)
            need = "fits" if cm.fits(a, gpu) else ("checkpointing" if cm.fits(b, gpu) else "does not fit")
            print(f"  {g:4d} {label:>22s} {a / cm.GB:8.1f} {b / cm.GB:8.1f}  {need}")
            rows.append({"gpus": g, "tokens_per_gpu": tokens, "no_ckpt": a, "ckpt": b, "needs": need})
    return rows


def lora_table(tok, act_lora=None):
    """LoRA on one GPU (cost_model.LORA_ONE_GPU) at Llama-2-7B and Llama-3-8B shapes, bf16 and 4-bit (nf4) bases:
    the largest micro-batch of the batch of 16 that fits each GPU, with or without gradient checkpointing."""
    longest = max(r["train_batch_max"] for r in tok.values())
    lora = cm.LORA_ONE_GPU
    if act_lora:
        print(f"\n(LoRA activations measured in this run: {act_lora:,.0f} B per token per layer saved; the table takes "
              f"cost_model's peak figure {cm.ACT_BYTES_PER_TOKEN_LAYER_LORA:,} B)")
    print(f"\nLoRA on one GPU (r {lora['r']}, alpha {lora['alpha']}, {', '.join(lora['targets'])}; batch 16 of "
          f"{longest:.0f} tokens, the longest task's padded batch; micro-batches accumulate to 16):")
    print(f"  {'model':12s} {'base':5s} {'adapters':>10s} {'GPU':14s} {'micro x seq':>12s} {'ckpt':>5s} {'GB':>6s}")
    rows = []
    for name, shape in (("Llama-2-7B", cm.LLAMA2_7B), ("Llama-3-8B", cm.LLAMA3_8B)):
        n_lora = cm.lora_params(shape, lora["r"], lora["targets"])
        for quant in ("bf16", "nf4"):
            for gpu in sorted(cm.GPUS, key=lambda g: -cm.GPUS[g]["memory_gb"]):
                fit = cm.lora_fit(shape, longest, gpu, quant=quant)
                micro, ckpt, total = fit if fit else (0, True, None)
                mb = f"{micro} x {longest:.0f}" if fit else "-"
                gb = f"{total / cm.GB:.1f}" if fit else "none"
                print(f"  {name:12s} {quant:5s} {n_lora:10,d} {gpu:14s} {mb:>12s} {('yes' if ckpt else 'no'):>5s} {gb:>6s}")
                rows.append({"model": name, "base": quant, "gpu": gpu, "adapter_params": n_lora, "micro_batch": micro,
                             "checkpointing": ckpt, "bytes": total})
    return rows


def stage_costs(tok, steps=100, batch=16, n_gpus=8, gpu=cm.DEFAULT_GPU, act=None, act_ckpt=None, replay_fractions=9,
                replay_step_points=(0, 5, 10, 20, 40, 60, 80, 100), ewc_samples=200, curv_samples=50, curv_hvps=cm.CURVATURE_MAX_HVPS,
                overheads=True):
    """Per stage kind: GPU-hours of one stage (mean over the stages of that kind), memory per GPU of its
    training step with and without gradient checkpointing, and how it was counted. overheads=False: compute only
    (no start-up, no checkpoint reads or writes)."""
    n = cm.n_params()
    sh = cm.LLAMA2_7B
    act = act or cm.ACT_BYTES_PER_TOKEN_LAYER
    act_ckpt = act_ckpt or cm.ACT_BYTES_PER_TOKEN_LAYER_CKPT

    def train_s(task, n_steps):
        seq = tok[task]["train_batch_max"]
        return cm.stage_gpu_seconds("train", n_steps * batch * seq, n, n_gpus, seq_len=seq, batch=batch, gpu=gpu)

    def eval_s(task, split="test"):
        return cm.stage_gpu_seconds("eval_forward", tok[task][f"{split}_tokens"], n, n_gpus,
                                    seq_len=tok[task][f"{split}_mean_len"], gpu=gpu)

    on = 1.0 if overheads else 0.0
    read1 = on * n_gpus * cm.io_seconds(n, "bf16", write=False)
    fixed = on * n_gpus * cm.STAGE_STARTUP_S + read1
    save = on * n_gpus * cm.io_seconds(n, "bf16", write=True)

    def mem(task):
        micro = batch // n_gpus * tok[task]["train_batch_max"]  # sequences per GPU x padded length
        kw = dict(n_params=n, n_gpus=n_gpus, tokens_per_micro_batch=micro, layers=sh["layers"], hidden=sh["hidden"],
                  bytes_per_token_per_layer=act)
        return (cm.train_memory_per_gpu(checkpointing=False, **kw),
                cm.train_memory_per_gpu(checkpointing=True, bytes_per_token_per_layer_ckpt=act_ckpt, **kw))

    def eval_mem(tasks):  # evaluate.py's batch of 16 examples, prompt + options each
        return max(cm.eval_memory_per_gpu(n, 16 * tok[t]["test_tokens"] / tok[t]["test_n"], sh["layers"], sh["hidden"])
                   for t in tasks)

    pairs = [(a, b) for c in CAP for f in SAFE for a, b in ((c, f), (f, c))]
    kinds = {}

    def add(kind, seconds, mems, how, evals=PAPER_TASKS):
        seconds = list(seconds)
        kinds[kind] = {"gpu_hours": statistics.mean(seconds) / 3600,
                       "mem_no_ckpt": max(m[0] for m in mems) if mems else None,
                       "mem_ckpt": max(m[1] for m in mems) if mems else None,
                       "mem_eval": eval_mem(evals) if evals else None, "how": how}

    add("first_stage", [fixed + train_s(t, steps) + eval_s(t) + eval_s(t, "validation") + save for t in PAPER_TASKS],
        [mem(t) for t in PAPER_TASKS], f"{steps} steps x {batch} on A, test + validation of A, save")
    add("chain", [fixed + train_s(b, steps) + eval_s(a) + eval_s(b) + save for a, b in pairs],
        [mem(b) for _, b in pairs], f"{steps} steps x {batch} on B, test of A and B, save (mean of the 12 pairs)")
    # one replay (chain, seed): fraction points train `steps` steps each (F > 0), steps points S steps each
    # (S not 0 or `steps`: those are the fraction sweep's 0 and 1 points); every distinct point evaluates A, B
    step_list = [steps] * (replay_fractions - 1) + [s for s in replay_step_points if s not in (0, steps)]
    n_points = replay_fractions + len(step_list) - (replay_fractions - 1)
    rep = []
    for a, b in REPLAY_CHAINS:  # two replay.py runs (the two sweeps); every trained point reads theta_AB again
        total = (2 * fixed + sum(read1 + train_s(a, s) for s in step_list) + n_points * (eval_s(a) + eval_s(b)))
        rep.append(total / len(step_list))
    add("replay_training", rep, [mem(a) for a, _ in REPLAY_CHAINS],
        f"per training of a replay sweep: {len(step_list)} trainings ({sum(step_list)} steps) and {n_points} "
        "evaluations of A and B per chain and seed, no save")
    fisher = [cm.stage_gpu_seconds("train", ewc_samples * tok[a]["train_mean"], n, n_gpus, batch=1, gpu=gpu) / 3
              for a, _ in REPLAY_CHAINS]  # EWC's Fisher: one forward + backward per sample (2/3 of a step)
    add("mitigation", [fixed + train_s(b, steps) + eval_s(a) + eval_s(b) + save + f
                       for (a, b), f in zip(REPLAY_CHAINS, fisher)], [mem(b) for _, b in REPLAY_CHAINS],
        f"as a chain, + the EWC Fisher ({ewc_samples} samples) counted for every one")
    add("long_chain", [fixed + train_s(c[-1], steps) + sum(eval_s(t) for t in c) + save for c in LONG_CHAINS],
        [mem(c[-1]) for c in LONG_CHAINS], f"{steps} steps on the third task, test of all three, save")
    curv = [fixed + curv_hvps * cm.stage_gpu_seconds("hvp", curv_samples * tok[t]["train_mean"], n, n_gpus,
                                                      seq_len=tok[t]["train_mean"], gpu=gpu) for t in PAPER_TASKS]
    add("curvature_solve", curv, [], evals=(),
        how=f"memory: bench/bench_curvature_scale.py; {curv_hvps} HVPs (--max_iter, the worst case) on "
            f"{curv_samples} samples, HVP = {cm.HVP_FACTOR:g} x fwd+bwd")
    tay = [fixed + read1 + 3 * cm.stage_gpu_seconds("hvp", curv_samples * tok[a]["train_mean"], n, n_gpus, gpu=gpu)
           for a, _ in pairs]
    add("taylor_check", tay, [], evals=(), how="a second model read, one HVP + losses (counted as 3 HVPs)")
    kinds["checkpoint_save"] = {"gpu_hours": n_gpus * cm.io_seconds(n, "bf16", write=True) / 3600,
                                "mem_no_ckpt": None, "mem_ckpt": None, "mem_eval": None,
                                "how": f"{cm.checkpoint_bytes(n, 'bf16') / cm.GB:.1f} GB bf16 at "
                                       f"{cm.DISK_WRITE_BYTES_S / cm.GB:g} GB/s, GPUs waiting (inside the rows above)"}
    return kinds


def disk(counts, kept_main_chains=36, n=None, mitigations_before=18):
    """Checkpoint bytes before (every checkpointing stage saved in fp32; of the mitigations only the 18 replay-mix
    ones ran, L2 and EWC were refused under torchrun: 291 in all) and after this issue (bf16, weights kept only
    for stages a later stage reads)."""
    n = n or cm.n_params()
    before_stages = counts["first_stages"] + counts["chains"] + counts["long_chains"] + mitigations_before
    kept = counts["first_stages"] + kept_main_chains
    return {"before_checkpoints": before_stages, "before_bytes": before_stages * cm.checkpoint_bytes(n, "fp32"),
            "after_checkpoints": kept, "after_bytes": kept * cm.checkpoint_bytes(n, "bf16")}


def profile_hours(kinds, counts):
    return sum(r["gpu_hours"] * counts.get(COUNT_OF.get(k, ""), 0) for k, r in kinds.items())


def print_profile(kinds, counts, gpu, n_gpus):
    print(f"\nper stage kind at Llama-2-7B on {n_gpus} x {gpu} (FSDP2, bf16 mixed precision, batch 16 = "
          f"{16 // n_gpus} sequences per GPU):")
    print(f"  {'kind':18s} {'count':>6s} {'train GB':>9s} {'ckpt GB':>8s} {'eval GB':>8s} {'fits':>5s} "
          f"{'GPU-h each':>11s} {'wall h each':>11s} {'GPU-h all':>10s}")
    total = 0.0
    gb = lambda v: "-" if v is None else f"{v / cm.GB:.1f}"  # noqa: E731
    for kind, row in kinds.items():
        c = counts.get(COUNT_OF.get(kind, ""), 0)
        all_h = row["gpu_hours"] * c
        total += all_h
        fit = "-"
        if row["mem_no_ckpt"] is not None:
            ok_eval = row["mem_eval"] is None or cm.fits(row["mem_eval"], gpu)
            fit = ("yes" if cm.fits(row["mem_no_ckpt"], gpu) else "ckpt" if cm.fits(row["mem_ckpt"], gpu) else "NO")
            fit = fit if ok_eval else "NO"
        print(f"  {kind:18s} {c if c else '-':>6} {gb(row['mem_no_ckpt']):>9s} {gb(row['mem_ckpt']):>8s} "
              f"{gb(row['mem_eval']):>8s} {fit:>5s} {row['gpu_hours']:11.3f} {row['gpu_hours'] / n_gpus:11.4f} "
              f"{all_h:10.1f}   {row['how']}")
    print(f"  total: {total:.0f} GPU-hours = {total / n_gpus:.1f} h wall on one {n_gpus}-GPU node "
          f"({total / n_gpus / 24:.2f} days)")
    return total


def main(args):
    records = run_measurements(args) if not args.no_measure else []
    consts = per_layer_constants(records)
    for mode, c in sorted(consts.items()):
        print(f"per token per layer, {mode:16s}: saved activations {c['saved_bytes_per_token_layer']:10,.0f} B, "
              f"peak {c['peak_bytes_per_token_layer']:10,.0f} B (less the layer's gradient: "
              f"{c['peak_minus_grad_bytes_per_token_layer']:10,.0f} B), {c['s_per_token_layer'] * 1e3:.3f} ms")
    act = consts.get("train_bf16", {}).get("saved_bytes_per_token_layer")
    act_ckpt = consts.get("train_bf16_ckpt", {}).get("saved_bytes_per_token_layer")
    if args.device == "cuda" or args.no_data:
        result = {"measurements": records, "per_token_layer": consts}
    else:
        count, how = cm.token_counter(args.tokenizer and os.path.join(args.tokenizer, "tokenizer.json"))
        print(f"tokens {how}")
        tok = task_tokens(args.data_dir, bbq_examples=args.bbq_examples, count=count)
        for t, r in tok.items():
            scaled = (f" (scaled from the {r['scaled_from_examples']} examples found to {args.bbq_examples})"
                      if "scaled_from_examples" in r else "")
            print(f"tokens {t:8s}: train {r['train_n']} x {r['train_mean']:.0f} (batch of 16 padded to "
                  f"{r['train_batch_max']:.0f}), test {r['test_n']} examples = {r['test_tokens']:,} tokens, "
                  f"validation {r['validation_n']} = {r['validation_tokens']:,}{scaled}")
        mem = memory_table(tok, act or cm.ACT_BYTES_PER_TOKEN_LAYER, act_ckpt or cm.ACT_BYTES_PER_TOKEN_LAYER_CKPT,
                           args.gpu)
        lora_mem = lora_table(tok, consts.get("train_bf16_lora", {}).get("saved_bytes_per_token_layer"))
        kinds = stage_costs(tok, n_gpus=args.n_gpus, gpu=args.gpu, act=act, act_ckpt=act_ckpt)
        counts = {k: getattr(args, k) for k in PAPER_COUNTS}
        print("stage counts:", ", ".join(f"{k} {v}" for k, v in counts.items()))
        total = print_profile(kinds, counts, args.gpu, args.n_gpus)
        other = {g: profile_hours(stage_costs(tok, n_gpus=args.n_gpus, gpu=g, act=act, act_ckpt=act_ckpt), counts)
                 for g in sorted(cm.GPUS) if g != args.gpu and cm.GPUS[g]["memory_gb"] >= 80}
        compute = profile_hours(stage_costs(tok, n_gpus=args.n_gpus, gpu=args.gpu, act=act, act_ckpt=act_ckpt,
                                            overheads=False), counts)
        print(f"  of which compute {compute:.0f} GPU-hours; start-up ({cm.STAGE_STARTUP_S:g} s a stage) and "
              f"checkpoint reads and writes {total - compute:.0f}")
        for g, h in other.items():
            print(f"  on {args.n_gpus} x {g} instead: {h:.0f} GPU-hours = {h / args.n_gpus:.1f} h wall")
        d = disk(counts, args.kept_main_chains)
        print(f"disk before: {d['before_checkpoints']} fp32 checkpoints x "
              f"{cm.checkpoint_bytes(cm.n_params(), 'fp32') / cm.GB:.1f} GB = {d['before_bytes'] / 1e12:.2f} TB; "
              f"after: "
              f"{d['after_checkpoints']} bf16 checkpoints kept ({args.first_stages} first stages + "
              f"{args.kept_main_chains} main chains read by replay, long chains and Taylor checks) x "
              f"{cm.checkpoint_bytes(cm.n_params(), 'bf16') / cm.GB:.1f} GB = {d['after_bytes'] / 1e12:.2f} TB "
              "(+ one checkpoint per running stage until its evaluation ends)")
        result = {"measurements": records, "per_token_layer": consts, "tokens": tok, "stage_kinds": kinds,
                  "memory_table": mem, "lora_one_gpu": lora_mem, "total_gpu_hours_other_gpus": other, "compute_gpu_hours": compute,
                  "counts": counts, "total_gpu_hours": total, "disk": d}
    print("\nassumptions:")
    for line in cm.assumptions(args.gpu):
        print("  " + line)
    if act is None:
        print("  (activation constants from cost_model.py, not measured in this run)")
    if args.out:
        write_json_atomic(args.out, dict(result, config=vars(args), assumptions=cm.assumptions(args.gpu)))
        print(f"wrote {args.out}")
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", default="1,2", help="decoder layers of the measured models (comma list, >= 2 "
                    "values for the per-layer difference)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per measured step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--eval_batch", type=int, default=16, help="sequences per forward of --big_eval_layers")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per measurement (median)")
    ap.add_argument("--optimizer", action="store_true", help="include an AdamW step (default on CUDA)")
    ap.add_argument("--big_train_layers", type=int, default=0, help="also a training step (AdamW) at this many layers")
    ap.add_argument("--big_eval_layers", type=int, default=0, help="also an evaluation forward at this many layers")
    ap.add_argument("--quick", action="store_true", help="bf16 modes only, 1 x 128 tokens")
    ap.add_argument("--modes", default=None, help=f"comma list of the modes to measure (default: all of "
                    f"{','.join(ALL_MODES)})")
    ap.add_argument("--no_measure", action="store_true", help="the profile from cost_model's constants only")
    ap.add_argument("--no_data", action="store_true", help="measure only, no profile")
    ap.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    ap.add_argument("--tokenizer", default=None, help="a folder with the tokenizer.json to count the tasks' tokens "
                    "with (e.g. a Llama-2-7b-hf checkpoint); default: characters / cost_model.CHARS_PER_TOKEN")
    ap.add_argument("--bbq_examples", type=int, default=BBQ_RELEASE_EXAMPLES,
                    help="BBQ's size for the profile (its evaluation sets scaled to it; 0: the examples found)")
    ap.add_argument("--gpu", choices=sorted(cm.GPUS), default=cm.DEFAULT_GPU)
    ap.add_argument("--n_gpus", type=int, default=8)
    for k, v in PAPER_COUNTS.items():
        ap.add_argument(f"--{k}", type=int, default=v, help="stages of this kind in the paper profile")
    ap.add_argument("--kept_main_chains", type=int, default=36, help="main chains whose weights later stages read")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scale.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return args
    try:
        args.layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--layers {args.layers!r} is not a comma list of integers, e.g. 1,2")
    if not args.layers or args.layers[0] < 1:
        raise UserError("--layers: every value must be at least 1, e.g. 1,2")
    if args.modes is not None:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in args.modes if m not in ALL_MODES]
        if bad or not args.modes:
            raise UserError(f"--modes {','.join(bad) or '(empty)'}: not a measurement; choose from {','.join(ALL_MODES)}")
    if args.quick:
        args.batch, args.seq = 1, 128
    if args.device == "cuda":
        args.optimizer = True
    check_args(vars(args), {k: AT_LEAST_1 for k in ("batch", "seq", "eval_batch", "repeats", "n_gpus",
                                                  *PAPER_COUNTS, "kept_main_chains")})
    check_args(vars(args), {"bbq_examples": NON_NEGATIVE})
    if not args.no_measure and args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.tokenizer is not None:
        tokenizer_dir(args.tokenizer)
    if not (args.no_measure or args.no_data or args.device == "cuda") and not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir} is not a folder; point it at the datasets or pass --no_data")
    return args


if __name__ == "__main__":
    if "--_child" in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index("--_child") + 1])
        if spec["mode"] == "save":
            print(json.dumps(measure_save(spec["device"], spec["layers"])))
        else:
            print(json.dumps(measure(spec["device"], spec["layers"], spec["mode"], spec["batch"], spec["seq"],
                                     spec["repeats"], spec["optimizer"])))
        sys.exit(0)
    die_on_user_error(lambda: main(parse_args()))
