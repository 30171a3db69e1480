"""The study's plan and status, nothing run: every stage of the graph with its state, tokens and GPU-hours
(from cost_model.py's figures, whose assumptions the plan prints), the disk the checkpoints take and the
wall hours of a greedy schedule on the local pool and on Slurm (study.py --dry_run writes it to
$RUNS/plan.json); and the graph's state as the runs folder has it (study.py --status).

plan.json lists every node its stages wait for: the stages, the choices of the first-stage model
("kind": "choice", decided once their inputs are done) and the summaries (order, metrics).
"""
import glob
import heapq
import json
import os
import random
import shlex

from ..common import UserError
from ..data import tiny_base
from ..data import fetch
from ..data.tasks import LOADERS, load_task
from . import cost_model, stage_check
from .cost_model import CURVATURE_MAX_HVPS
from ..hessian.measure_names import worst_case_hvps
from .graph import TRAINING, Builder
from .profiles import PROFILES

def model_shape(c):
    """(cost_model shape dict, n_params, where from) from the model's config.json; no weights are read."""
    if c.model == "tiny":
        t = tiny_base.TINY_CONFIG
        shape = {"hidden": t["hidden_size"], "intermediate": t["intermediate_size"], "layers": t["num_hidden_layers"],
                 "heads": t["num_attention_heads"], "kv_heads": t["num_key_value_heads"], "vocab": t["vocab_size"],
                 "tied": t["tie_word_embeddings"], "dtype": "float32"}
        src = "the tiny base's recipe"
    else:
        path = os.path.join(c.model, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"MODEL={c.model}: no config.json there; the plan needs the model's shape (a folder with "
                            "config.json is enough)")
        shape, src = cost_model.shape_from_config(path), path
    return shape, cost_model.n_params(shape), src


class TokenCounter:
    """Mean tokens per example of each task and split: from the model's tokenizer.json when it has one, else
    estimated from the data's characters (cost_model.token_counter), and the plan says which."""

    def __init__(self, c, max_length=2048):
        self.c, self.max_length, self.cache = c, max_length, {}
        path = None
        if c.model == "tiny":
            path = os.path.join(tiny_base.tiny_base_path(), "tokenizer.json")
        elif os.path.isdir(c.model):
            path = os.path.join(c.model, "tokenizer.json")
        found = path if path and os.path.isfile(path) else None
        try:
            self._count, self.how = cost_model.token_counter(found)
        except ValueError as e:
            raise UserError(f"MODEL {c.model}: {e}; its tokenizer.json must be the one saved with the model") from None
        if found is None:
            self.how += "; MODEL has no tokenizer.json"

    def count(self, texts):
        return [min(self.max_length, n) for n in self._count(texts)]

    def stats(self, task, split):
        """(examples, mean training tokens, scored tokens per example) of a split."""
        key = (task, split)
        if key not in self.cache:
            try:
                data = load_task(task, split, self.c.data_dir or None)
            except UserError as e:
                self.cache[key] = (0, 0.0, 0.0, str(e))
                return self.cache[key]
            exs = data.examples
            limit = {"test": self.c.eval_limit, "validation": self.c.val_limit}.get(split)
            n = min(len(exs), int(limit)) if limit else len(exs)
            sample = exs[:: max(1, len(exs) // 400)]  # a few hundred examples give the mean
            train = self.count([e.prompt + e.options[e.label] if e.options else e.prompt for e in sample])
            scored = self.count([e.prompt + "".join(e.options) if e.options else e.prompt for e in sample])
            self.cache[key] = (n, sum(train) / len(train), sum(scored) / len(scored), None)
        return self.cache[key]


    def padded(self, task, batch=16):
        """Mean length of the longest of `batch` training examples (a padded batch), over 200 seeded draws."""
        key = (task, "padded", batch)
        if key not in self.cache:
            try:
                exs = load_task(task, "train", self.c.data_dir or None).examples
            except UserError:
                self.cache[key] = 0.0
                return 0.0
            sample = exs[:: max(1, len(exs) // 400)]
            lens = self.count([e.prompt + e.options[e.label] if e.options else e.prompt for e in sample])
            rng = random.Random(0)
            self.cache[key] = sum(max(rng.choices(lens, k=batch)) for _ in range(200)) / 200
        return self.cache[key]


GENERATED_TOKENS = 64  # new tokens a SaFeRDialogues response gets (evaluate.py --max_new_tokens), for the plan


def stage_tokens(st, tc, batch=16):
    """(training tokens, scored tokens, generated tokens) of a stage."""
    cost, train, scored, generated = st.cost, 0.0, 0.0, 0.0
    if "train" in cost:
        _, per, _, _ = tc.stats(cost["train"], "train")
        train = cost.get("steps", 0) * cost.get("batch", batch) * per
    for key, split in (("eval", "test"), ("val", "validation")):
        for t in cost.get(key, []):
            n, _, per, _ = tc.stats(t, split)
            scored += n * per * cost.get("points", 1)
            if t == "saferdialogues":  # generative: the prompt's forward, then decoding
                generated += n * GENERATED_TOKENS * cost.get("points", 1)
    if "samples" in cost:
        _, per, _, _ = tc.stats(cost["task"], "train")
        scored += cost["samples"] * per
    return train, scored, generated


# HVPs of one curvature solve for the plan: cost_model's worst case (curvature.py's --max_iter), as bench_scale.py
# counts it; bench/bench_curvature.py measures 2-4 full products at --rtol 1e-3 on the tiny checkpoints
CURVATURE_PRODUCTS = CURVATURE_MAX_HVPS


def stage_gpu_seconds(st, train_tokens, scored_tokens, generated_tokens, n_params, shape, dtype, n_lora=0):
    """GPU-seconds of one stage from cost_model.py (its ASSUMPTIONS are printed with the plan): start-up,
    the checkpoint read, training, the new checkpoint written, the scored tokens; a curvature solve as
    CURVATURE_PRODUCTS HVPs over its samples plus one per Taylor check, a Taylor check alone as one."""
    gpus = max(1, st.gpus)
    secs = (cost_model.STAGE_STARTUP_S + cost_model.io_seconds(n_params, dtype, write=False)) * gpus
    if st.kind in ("curvature", "taylor"):
        products = (0 if st.cost.get("hvp_only") else CURVATURE_PRODUCTS) + st.cost.get("refs", 0) + \
            worst_case_hvps(st.cost.get("measures", ()), shape["layers"] + 2)  # blocks: layers, embeddings, head
        return secs + cost_model.stage_gpu_seconds("hvp", scored_tokens * max(1, products), n_params, gpus, shape=shape,
                                                   n_lora=n_lora)
    if train_tokens:
        secs += cost_model.stage_gpu_seconds("train", train_tokens, n_params, gpus, shape=shape, n_lora=n_lora)
        if st.kind != "replay":  # replay points keep no checkpoint
            secs += cost_model.io_seconds(n_params, dtype, write=True) * gpus
    if scored_tokens:
        secs += cost_model.stage_gpu_seconds("eval_forward", scored_tokens, n_params, gpus, shape=shape)
    if generated_tokens:
        secs += cost_model.stage_gpu_seconds("generate", generated_tokens, n_params, gpus, shape=shape)
    return secs


def memory_plan(c, shape, n_params, tc, methods=("full",), gpus=(cost_model.DEFAULT_GPU,), batch=16):
    """Bytes per GPU of the study's largest steps on each of `gpus`: a training step (full fine-tuning under FSDP2
    over GPUS_PER_STAGE GPUs; LoRA on one GPU, the largest micro-batch that fits), an evaluation batch and a
    curvature solve (over the adapters for LoRA); each row says whether it fits under cost_model's headroom."""
    tasks = c.cap + c.safe
    seq = max([tc.padded(t, batch) for t in tasks] + [1.0])
    scored = max([tc.stats(t, "test")[2] for t in tasks] + [1.0])
    curv_tokens = int(c.curv_samples) * max([tc.stats(t, "train")[1] for t in tasks] + [1.0])
    g = max(1, c.gpus_per_stage)
    act = cost_model.ACT_BYTES_PER_TOKEN_LAYER * cost_model.width_scale(shape)
    act_ckpt = cost_model.ACT_BYTES_PER_TOKEN_LAYER_CKPT * shape["hidden"] / cost_model.LLAMA2_7B["hidden"]
    graph = cost_model.CURV_GRAPH_BYTES_PER_TOKEN_LAYER * cost_model.width_scale(shape)
    rows = []
    for gpu in gpus:
        for method in methods:
            if method == "full":
                kw = dict(n_params=n_params, n_gpus=g, tokens_per_micro_batch=batch // g * seq, layers=shape["layers"],
                          hidden=shape["hidden"], bytes_per_token_per_layer=act, vocab=shape["vocab"])
                plain = cost_model.train_memory_per_gpu(checkpointing=False, **kw)
                ckpt = cost_model.train_memory_per_gpu(checkpointing=True, bytes_per_token_per_layer_ckpt=act_ckpt,
                                                       **kw)
                fit = ("fits" if cost_model.fits(plain, gpu) else "fits with --gradient_checkpointing"
                       if cost_model.fits(ckpt, gpu) else "does not fit")
                where = f"training, FSDP2 over {g} GPUs" if g > 1 else "training on one GPU"
                rows.append({"gpu": gpu, "method": method, "what": f"{where}, {batch // g} x {seq:.0f} tokens a GPU",
                             "bytes": plain if fit == "fits" else ckpt, "fits": fit})
                vec = n_params / g
            else:
                lora = lora_of(c, shape) or cost_model.LORA_ONE_GPU
                best = cost_model.lora_fit(shape, seq, gpu, batch, lora=lora)
                fit = ("does not fit" if best is None else
                       f"fits, micro-batch {best[0]}" + (" with --gradient_checkpointing" if best[1] else ""))
                rows.append({"gpu": gpu, "method": method, "what": f"training, LoRA on one GPU, batch {batch} x "
                             f"{seq:.0f} tokens", "bytes": best[2] if best else None, "fits": fit})
                vec = cost_model.lora_params(shape, lora["r"], lora["targets"])
            ev = cost_model.eval_memory_per_gpu(n_params, batch * scored, shape["layers"], shape["hidden"],
                                                vocab=shape["vocab"], intermediate=shape["intermediate"])
            rows.append({"gpu": gpu, "method": method, "what": f"evaluation, {batch} examples of {scored:.0f} tokens",
                         "bytes": ev, "fits": "fits" if cost_model.fits(ev, gpu) else "does not fit"})
            cb, kept = cost_model.curvature_memory(2.0 * n_params, vec, curv_tokens, shape["layers"], graph, gpu)
            fit = ("does not fit" if kept == 0 else "fits" if kept >= int(curv_tokens) else
                   f"fits, {kept:,} of {curv_tokens:,.0f} tokens' graphs kept (the rest recomputed per product)")
            rows.append({"gpu": gpu, "method": method, "what": "curvature solve over " + (
                "all weights" if method == "full" else "the adapters") + f", {c.curv_samples} samples",
                "bytes": cb, "fits": fit})
    return rows


def lora_of(c, shape):
    """The study's LoRA as cost_model counts it ({"r", "targets"}; None for full fine-tuning): LORA_TARGETS, else
    every projection (finetune.py's default); names cost_model does not know (another family's) count as all."""
    if not c.get("lora_args"):
        return None
    targets = tuple(c.lora_targets.split(",")) if c.get("lora_targets") else cost_model.LORA_ONE_GPU["targets"]
    if set(targets) - set(cost_model.projection_shapes(shape)):
        targets = cost_model.LORA_ONE_GPU["targets"]
    return {"r": int(c.lora_r), "targets": targets}


def lora_params_of(c, shape):
    """Adapter parameters of the study's LoRA stages, 0 for full fine-tuning."""
    lora = lora_of(c, shape)
    return cost_model.lora_params(shape, lora["r"], lora["targets"]) if lora else 0


def checkpoint_bytes(n_params, dtype):
    return cost_model.checkpoint_bytes(n_params, dtype)


def makespan(stages, hours, capacity, choices):
    """Wall hours of a greedy list schedule on `capacity` GPUs: stages in graph order, each once its inputs
    (through the choices they wait for) have ended and its GPUs are free."""
    def inputs(st):
        return [b for a in st.after for b in choices.get(a, [a]) if b in hours]
    end, busy, used, t = {}, [], 0, 0.0  # busy: heap of (end time, GPUs)
    pending = list(stages)
    while pending:
        progressed = False
        for st in list(pending):
            need = min(capacity, max(1, st.gpus))
            if all(a in end and end[a] <= t for a in inputs(st)) and used + need <= capacity:
                end[st.name] = t + hours[st.name]
                heapq.heappush(busy, (end[st.name], need))
                used += need
                pending.remove(st)
                progressed = True
        if not progressed:
            if not busy:
                break
            t, need = heapq.heappop(busy)
            used -= need
    return max(end.values(), default=0.0)


def state_of(c, st, finished=None):
    if st.cmd is None:
        return "choice" if st.kind == "choice" else "skipped"
    if os.path.exists(st.out):
        problems, _ = stage_check.check(c.runs, st.name, st.out, st.cmd)
        return "mismatch" if problems else "done"
    return "todo"


class Costs:
    """What the plan adds up over the stages it lists: tokens, checkpoint disk, stages (and those done) per
    kind, each stage's wall hours still to run on its GPUs."""

    def __init__(self):
        self.per_kind, self.hours, self.tokens, self.disk = {}, {}, 0.0, 0


def stage_rows(c, stages, tc, model, costs):
    """Each stage's plan.json row (model: (shape, n_params, dtype, checkpoint bytes)), its costs into costs."""
    shape, n_params, dtype, ckpt = model
    rows = []
    read = {d for st in stages for d in st.reads}
    for st in stages:
        state = state_of(c, st)
        k = costs.per_kind.setdefault(st.kind, {"stages": 0, "done": 0})
        k["stages"] += 1
        k["done"] += state == "done"
        train, scored, generated = stage_tokens(st, tc)
        secs = stage_gpu_seconds(st, train, scored, generated, n_params, shape, dtype, lora_params_of(c, shape))
        costs.hours[st.name] = 0.0 if state == "done" else secs / 3600 / max(1, st.gpus)  # wall hours on its GPUs
        costs.tokens += train + scored + generated
        if st.kind in TRAINING and st.kind != "replay" and (c.keep_weights == "all" or st.out in read):
            costs.disk += ckpt
        rows.append({"name": st.name, "kind": st.kind, "gpus": st.gpus, "after": st.after, "done": state == "done",
                     "state": state, "out": st.out, "cmd": shlex.join(st.cmd),
                     "tokens": round(train + scored + generated),
                     "gpu_hours": round(secs / 3600, 4),
                     "pending_choice": st.pending_choice})
    return rows


def with_choices(planned, rows):
    """The stage rows with a row for each choice node among them (graph order: its inputs before it), so that
    every `after` of plan.json names a node plan.json lists; a choice is decided once its inputs are done."""
    by_name = {r["name"]: r for r in rows}
    listed = []
    for st in planned:
        if st.kind != "choice":
            listed.append(by_name[st.name])
            continue
        decided = all(by_name[a]["done"] for a in st.after)
        listed.append({"name": st.name, "kind": "choice", "gpus": 0, "after": st.after, "done": decided,
                       "state": "decided" if decided else "waiting"})
    return listed


def plan(c):
    """The graph with every choice the runs folder cannot decide yet planned at the main lr."""
    g = Builder(c, {}, plan=True).build()
    planned = [st for st in g.stages.values() if st.skip is None]
    stages = [st for st in planned if st.kind != "choice"]
    shape, n_params, src = model_shape(c)
    tc = TokenCounter(c)
    costs = Costs()
    dtype = "bfloat16" if "--bf16" in c.extra else "float32"
    n_lora = lora_params_of(c, shape)
    ckpt = checkpoint_bytes(n_lora, "float32") if n_lora else checkpoint_bytes(n_params, dtype)  # LoRA: the adapter
    rows = stage_rows(c, stages, tc, (shape, n_params, dtype, ckpt), costs)
    disk = costs.disk + ckpt * c.jobs  # checkpoints of the stages running at once, before their weights are dropped
    gpu_hours = sum(costs.hours[st.name] * max(1, st.gpus) for st in stages)  # still to run
    n_local = len(c.gpus) or PROFILES[c.profile].plan_gpus
    choices = {st.name: st.after for st in g.stages.values() if st.kind == "choice"}
    local_wall = makespan(stages, costs.hours, n_local, choices)
    slurm_wall = makespan(stages, costs.hours, c.slurm.nodes * c.slurm.gpus_per_node, choices)
    return {"profile": c.profile, "runs": c.runs, "model": c.model, "n_params": n_params, "model_config": src,
            "tokens": round(costs.tokens), "tokens_how": tc.how, "cost_assumptions": list(cost_model.ASSUMPTIONS) + [
                f"a curvature solve: {CURVATURE_PRODUCTS} HVPs over its samples (+1 a Taylor check)",
            f"a SaFeRDialogues evaluation: {GENERATED_TOKENS} new tokens a test example (decoding, memory-bound)"],
            "method": c.get("method", "full"), "lora": " ".join(c.get("lora_args") or []) or None,
            "memory": memory_plan(c, shape, n_params, tc, methods=(c.get("method", "full"),),
                                  gpus=(cost_model.DEFAULT_GPU,) + (("RTX4090-24GB",) if c.get("lora_args") else ())),
            "checkpoint_bytes": ckpt, "keep_weights": c.keep_weights,
            "data_dir": c.data_dir or None, "data": data_check(c),
            "stages": with_choices(planned, rows) + [
                {"name": n, "kind": "summary", "gpus": 0, "after": [r["name"] for r in rows], "done": False,
                 "state": "always run"} for n in ("order", "metrics")],
            "choices": [{"name": st.name, "after": st.after} for st in g.stages.values() if st.kind == "choice"],
            "totals": {"gpu_hours": round(gpu_hours, 2), "disk_bytes": int(disk),
                       "stages": {k: v["stages"] for k, v in costs.per_kind.items()},
                       "done": {k: v["done"] for k, v in costs.per_kind.items()},
                       "wall_hours": {f"local pool, {n_local} GPUs": round(local_wall, 2),
                                      f"slurm, {c.slurm.nodes} nodes x {c.slurm.gpus_per_node} GPUs":
                                          round(slurm_wall, 2)},
                       "gpus_per_stage": c.gpus_per_stage}}


def data_check(c):
    """tasks.py --check's table of DATA_DIR for the study's tasks (None on the synthetic stand-ins)."""
    if not c.data_dir:
        return None
    return fetch.inspect(c.data_dir, c.cap + c.safe, loaders=LOADERS)


def print_plan(p):
    t = p["totals"]
    print(f"plan of profile {p['profile']} -> {p['runs']}/plan.json")
    print(f"  model {p['model']}: {p['n_params'] or 0:,} parameters ({p['model_config']}); tokens {p['tokens_how']}")
    print(f"  method: {p['method']}" + (f" ({p['lora']}; every stage a LoRA adapter, chains merge the one before)"
                                          if p["lora"] else " fine-tuning"))
    for k, n in t["stages"].items():
        print(f"  {k:12s} {n:5d} stages, {t['done'][k]:5d} done")
    print(f"  tokens: {p['tokens']:,}")
    print(f"  GPU-hours still to run: {t['gpu_hours']:,} ({t['gpus_per_stage']} GPUs a training stage)")
    for where, h in t["wall_hours"].items():
        print(f"  wall hours on {where}: {h:,}")
    print(f"  disk: {t['disk_bytes'] / 1e9:,.1f} GB (checkpoints of {p['checkpoint_bytes'] / 1e9:.2f} GB; "
          f"KEEP_WEIGHTS={p['keep_weights']})")
    print("  memory per GPU (cost_model.py; fits: under "
          f"{cost_model.MEMORY_HEADROOM:.0%} of the GPU's memory):")
    for r in p["memory"]:
        gb = "-" if r["bytes"] is None else f"{r['bytes'] / 1e9:.1f} GB"
        print(f"    {r['gpu']:13s} {r['method']:4s} {r['what']}: {gb}, {r['fits']}")
    if p.get("data"):
        print(f"  data (python tasks.py --check {p['data_dir']}; python tasks.py --fetch {p['data_dir']} fetches "
              f"what is missing):")
        for r in p["data"]:
            print(f"    {r['task']:15s} {r['status']}; rows {r['rows']}; sha256 {r['sha256']}; the study uses {r['uses']}")
    print("  cost model (cost_model.py):")
    for a in p["cost_assumptions"]:
        print(f"    - {a}")


def status(c):
    """The graph (as far as the runs folder decides it) and each stage's state; runs nothing."""
    g = Builder(c, {}, plan=True).build()
    jobs = {}
    if os.path.isfile(f"{c.runs}/slurm/jobs.json"):
        with open(f"{c.runs}/slurm/jobs.json") as f:
            jobs = json.load(f)
    failed = set()
    if os.path.isfile(f"{c.runs}/logs/failed.txt"):
        with open(f"{c.runs}/logs/failed.txt") as f:
            failed = set(f.read().split())
    states, counts = {}, {}
    for st in g.stages.values():  # in graph order: a stage's inputs come before it
        inputs_done = all(states.get(a) in ("done", "decided") for a in st.after)
        state = state_of(c, st)
        if st.kind == "choice":
            state = "decided" if inputs_done else "waiting"
        elif state == "todo":
            tmp = glob.glob(os.path.join(glob.escape(os.path.dirname(st.out)),
                                         f".tmp-{glob.escape(os.path.basename(st.out))}-*"))
            if st.name in jobs:
                state = "submitted"
            elif tmp:
                state = "interrupted"  # a killed stage's temporary folder: removed when it is redone
            elif st.name in failed:
                state = "failed"
            else:
                state = "ready" if inputs_done else "waiting"
        states[st.name] = state
        counts[state] = counts.get(state, 0) + 1
        job = f"; Slurm job {jobs[st.name]['job_id']}" if st.name in jobs else ""
        after = f"; after {', '.join(st.after)}" if st.after else ""
        print(f"{state:11s} {st.name} [{st.kind}, {st.gpus} GPUs{job}{after}]")
    print("states: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


# --- the study --------------------------------------------------------------------------------------------
