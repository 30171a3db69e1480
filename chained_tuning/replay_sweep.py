"""replay.py's library: the points of a replay sweep (a third stage tuned from theta_AB on the first task A, by
fraction of A's training set or by steps), each a train_stage call and an evaluation of A and B; resuming what an
earlier invocation made with the same settings; the reference of forgetting_a (theta_A's evaluation); and
replay_summary.json. What --out holds: docs/replay.md.
"""
import os
import shutil
import time

import torch
import torch.distributed as dist

from . import lora
from .checkpoint import read_meta
from .common import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UserError, check_args, read_json, write_json_atomic
from .data.tasks import DATA_DEFAULTS, GENERATIVE_TASKS, TASKS, data_options
from .evaluation import DEFAULTS as EVAL_DEFAULTS
from .evaluation import SCORERS, evaluate_checkpoint
from .stage_config import resolve_lr
from .training import train_stage

SUMMARY = "replay_summary.json"
POINT = "point.json"
FIRST_EVAL = "first_stage_eval.json"
# point settings that must match for an existing point to be reused
SETTING_KEYS = ("model", "model_run_id", "task", "lr", "seed", "batch_size", "data_dir", "train_size", "max_length",
                "bf16", "eval_limit", "eval_seed", "eval_batch_size", "scorer", "fraction_unit")
# a point's "fraction" is a fraction of A's training set; points made before (percent) lack this setting
FRACTION_UNIT = "fraction of A's training set, in [0, 1]"
# Every numeric option and what it allows (checked before anything is loaded; None: unset, allowed).
NUMERIC_RULES = {"steps": (AT_LEAST_1[0], "at least 1 (a fraction 0 point trains nothing)"), "lr": POSITIVE,
                 "seed": NON_NEGATIVE, "batch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_1,
                 "train_size": AT_LEAST_1, "max_length": AT_LEAST_1, "eval_limit": AT_LEAST_1,
                 "eval_seed": NON_NEGATIVE, "eval_batch_size": AT_LEAST_1, "max_new_tokens": AT_LEAST_1}
STAGE_FILES = ("run.json", "train_log.jsonl")


def parse_list(text, kind, what, lo, hi, hint=""):
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = kind(part)
        except ValueError:
            raise UserError(f"{what}: {part!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not lo <= v <= hi:
            raise UserError(f"{what}: {part} is outside [{lo}, {hi}]{hint}")
        if v not in out:
            out.append(v)
    return out


def fmt(v):
    return f"{v:g}"


def point_name(sweep, value):
    return f"{sweep}{fmt(value)}"


# -----------------------------------------------------------------------------
# Inputs


def read_model(path):
    """-> (resolved path, lineage meta, run.json or {})."""
    resolved = lora.resolve(path)
    if not os.path.isdir(resolved):
        raise UserError(f"--model {path} must be a chained checkpoint folder written by finetune.py")
    meta = read_meta(resolved)
    run_path = os.path.join(resolved, "run.json")
    run = read_json(run_path) if os.path.isfile(run_path) else {}
    if not meta.get("chain") and run.get("chain"):
        meta = {**meta, "chain": run["chain"], "run_id": run.get("run_id")}
    return resolved, meta, run


def check_inputs(args, meta):
    chain = meta.get("chain") or []
    if len(chain) < 2:
        raise UserError(f"--model {args.model} is not a chained model (its chain is {chain or 'empty'}: no "
                        f"chained_tuning.json/run.json with two or more tasks); pass theta_AB, the output of the "
                        f"second finetune.py stage")
    if args.task not in chain[:-1]:
        raise UserError(f"--task {args.task} is not an earlier task of --model's chain {' -> '.join(chain)}; "
                        f"replay one of {', '.join(dict.fromkeys(chain[:-1]))}")
    task_b = chain[-1]
    return task_b


def given_first_stage(args, chain, run):
    """--first_stage_eval: theta_A's eval.json, taken as is (checked to be of --model's first stage)."""
    task_a = args.task
    if not os.path.isfile(args.first_stage_eval):
        raise UserError(f"--first_stage_eval {args.first_stage_eval} does not exist; pass theta_A's eval.json")
    given = read_json(args.first_stage_eval)
    if task_a not in given.get("tasks", {}):
        raise UserError(f"--first_stage_eval {args.first_stage_eval} has no results for {task_a}")
    if (len(chain) == 2 and given.get("run_id") and run.get("parent_run_id")
            and given["run_id"] != run["parent_run_id"]):
        raise UserError(f"--first_stage_eval {args.first_stage_eval} is the evaluation of run {given['run_id']}, "
                        f"not of --model's first stage {run['parent_run_id']}")
    note = None
    given_limit = (given.get("config") or {}).get("limit")
    if given_limit != args.eval_limit:
        note = f"theta_A's evaluation used limit {given_limit}, the replay points {args.eval_limit}"
    return {"acc_a": given["tasks"][task_a]["acc"], "source": os.path.abspath(args.first_stage_eval),
            "run_id": given.get("run_id"), "note": note}


def load_first_stage(args, meta, run, settings, out, master):
    """The reference of forgetting_a: {"acc_a", "source", "run_id", "note"}, or None. From --first_stage_eval
    (taken as is), or --first_stage: its own eval.json when it scored A as the replay points are, else an
    evaluation made here with the replay settings (--out/first_stage_eval.json, reused by a rerun)."""
    task_a = args.task
    chain = meta["chain"]
    if args.first_stage_eval:
        return given_first_stage(args, chain, run)
    if not args.first_stage:
        return None
    first_dir = lora.resolve(args.first_stage, "--first_stage")
    first_meta = read_meta(first_dir)
    first_run_path = os.path.join(first_dir, "run.json")
    first_run = read_json(first_run_path) if os.path.isfile(first_run_path) else {}
    first_chain = first_meta.get("chain") or first_run.get("chain") or []
    first_id = first_meta.get("run_id") or first_run.get("run_id")
    if not first_chain or first_chain[-1] != task_a or chain[:len(first_chain)] != first_chain:
        raise UserError(f"--first_stage {args.first_stage} (chain {first_chain or 'none'}) is not the {task_a} stage "
                        f"of --model's chain {' -> '.join(chain)}")
    if len(chain) == len(first_chain) + 1 and run.get("parent_run_id") and first_id != run["parent_run_id"]:
        raise UserError(f"--first_stage {args.first_stage} is run {first_id}, but --model's parent_run_id is "
                        f"{run['parent_run_id']}; pass the checkpoint --model was tuned from")
    own_eval_path = os.path.join(first_dir, "eval.json")
    if os.path.isfile(own_eval_path):
        own_eval = read_json(own_eval_path)
        if same_evaluation(own_eval, task_a, args, settings):
            return {"acc_a": own_eval["tasks"][task_a]["acc"], "source": os.path.abspath(own_eval_path),
                    "run_id": first_id, "note": None}
    return first_stage_evaluated_here(args, first_dir, first_id, settings, out, master)


def first_stage_evaluated_here(args, first_dir, first_id, settings, out, master):
    """theta_A evaluated with the replay settings into --out/first_stage_eval.json (an earlier invocation's
    evaluation is reused only if it is of this theta_A with these settings)."""
    task_a = args.task
    made_path = os.path.join(out, FIRST_EVAL)
    redo = args.overwrite
    if os.path.isfile(made_path) and not redo:
        made = read_json(made_path)
        if not (same_evaluation(made, task_a, args, settings) and made.get("run_id") == first_id):
            raise UserError(f"{made_path} is an evaluation of another first stage or with other settings; pass "
                            f"--overwrite to remake it (and every point asked for), or choose another --out")
    if redo or not os.path.isfile(made_path):  # decided on every process before any of them writes
        tmp = os.path.join(out, ".tmp-first-stage")
        if master:
            print(f"replay: evaluating the first stage {args.first_stage} on {task_a} (its eval.json does not match "
                  f"the replay settings)", flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        evaluate_point(args, first_dir, [task_a], os.path.join(tmp, "eval.json"), model_name=first_dir,
                       out_name=made_path)
        if master:
            write_json_atomic(made_path, read_json(os.path.join(tmp, "eval.json")))
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
    return {"acc_a": read_json(made_path)["tasks"][task_a]["acc"], "source": os.path.abspath(made_path),
            "run_id": first_id, "note": "evaluated by replay.py with the replay settings"}


def same_evaluation(evaluation, task, args, settings):
    """Whether an eval.json holds `task` scored as the replay points are (limit, seed, split, data, scorer, dtype;
    a setting an older file lacks had evaluate.py's default)."""
    cfg = evaluation.get("config") or {}
    return (task in evaluation.get("tasks", {}) and cfg.get("limit") == args.eval_limit
            and cfg.get("seed", EVAL_DEFAULTS["seed"]) == args.eval_seed
            and cfg.get("split", EVAL_DEFAULTS["split"]) == settings["split"] and cfg.get("data_dir") == args.data_dir
            and cfg.get("scorer", EVAL_DEFAULTS["scorer"]) == args.scorer
            and cfg.get("dtype", "float32") == settings["dtype"]
            and all(cfg.get(k, v) == data_options(args)[k] for k, v in DATA_DEFAULTS.items())
            and (task not in GENERATIVE_TASKS or (cfg.get("max_new_tokens") == args.max_new_tokens
                                                  and args.classifier in (None, cfg.get("classifier")))))


def evaluate_point(args, model_dir, tasks, out, model_name=None, out_name=None):
    """evaluate.py's work on model_dir with the replay's --eval_* settings (its split: evaluate.py's default);
    out is a fresh temporary file, out_name (and model_name) the names printed and recorded. Under torchrun
    every process takes part (process 0 reads the weights and writes the files)."""
    return evaluate_checkpoint(model_dir, tasks, out, data_dir=args.data_dir, data_opts=data_options(args),
                               limit=args.eval_limit, classifier=args.classifier, max_new_tokens=args.max_new_tokens,
                               batch_size=args.eval_batch_size, scorer=args.scorer, seed=args.eval_seed,
                               dtype="bfloat16" if args.bf16 else "float32", device=args.device,
                               model_name=model_name, out_name=out_name)


# -----------------------------------------------------------------------------
# Points


def plan_points(args):
    """[(name, sweep, fraction, steps, key)]: key identifies the training run ((fraction, steps); 0 for no training)."""
    pts = []
    for f in args.fractions:
        key = 0 if f == 0 else (f, args.steps)
        pts.append((point_name("fraction", f), "fraction", f, args.steps, key))
    for s in args.steps_sweep:
        key = 0 if s == 0 else (1.0, s)
        pts.append((point_name("steps", s), "steps", 1.0, s, key))
    return pts


def check_existing(path, settings):
    rec = read_json(os.path.join(path, POINT))
    old = rec.get("settings", {})
    diff = [k for k in SETTING_KEYS if old.get(k) != settings.get(k)]
    if diff:
        changed = ", ".join(f"{k}: {old.get(k)!r} vs {settings.get(k)!r}" for k in diff)
        raise UserError(f"{path} exists with other settings ({changed}); pass --overwrite to remake it, or choose "
                        f"another --out")
    return rec


def finish_point(tmp, final, rec):
    write_json_atomic(os.path.join(tmp, POINT), rec)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def eval_fields(evaluation, task_a, task_b):
    res_a, res_b = evaluation["tasks"][task_a], evaluation["tasks"][task_b]
    return {"acc_a": res_a["acc"], "acc_b": res_b["acc"], "acc_a_stderr": res_a["acc_stderr"],
            "acc_b_stderr": res_b["acc_stderr"], "n_eval_a": res_a["n"], "n_eval_b": res_b["n"],
            "eval_loss_a": res_a["loss"], "eval_loss_b": res_b["loss"]}


def copy_point(args, source, name, base, tmp, final, t0):
    """A point whose training run is the one point `source` made: its evaluation copied, its record pointing there."""
    src = os.path.join(args.out, source)
    srec = read_json(os.path.join(src, POINT))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fn in ("eval.json", "eval_samples.jsonl"):
        shutil.copy2(os.path.join(src, fn), os.path.join(tmp, fn))
    rec = {**base, **{k: srec[k] for k in ("n_examples", "trained", "loss", "run_id", "train_time_s", "eval_time_s",
                                            "acc_a", "acc_b", "acc_a_stderr", "acc_b_stderr", "n_eval_a",
                                            "n_eval_b", "eval_loss_a", "eval_loss_b")},
           "same_run_as": source, "checkpoint": False, "wall_time_s": round(time.time() - t0, 2),
           "source_wall_time_s": srec["wall_time_s"]}
    finish_point(tmp, final, rec)
    print(f"replay: {name}: same run as {source} (copied its evaluation)", flush=True)
    return rec


def train_point(args, model_dir, task_a, tmp, final, frac, steps, lora_settings=None):
    """The point's stage, trained into tmp/stage (named `final` in what it prints): (its record, seconds). A
    LoRA --model: a LoRA stage from it, with the settings lora_settings_of chose."""
    cfg = {"model": model_dir, "task": task_a, "out": os.path.join(tmp, "stage"), "steps": steps,
           "train_fraction": None if frac >= 1 else frac, "lr": args.lr, "seed": args.seed,
           "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size, "data_dir": args.data_dir,
           "train_size": args.train_size, "max_length": args.max_length, "bf16": args.bf16,
           "device": args.device, "overwrite": True, "out_name": final, **data_options(args)}
    if lora_settings:
        cfg.update(lora_chain=lora_settings["chain"])
        if lora_settings["chain"] == "merge":  # a fresh adapter like --model's (continue: --model's own)
            cfg.update(lora_r=lora_settings["r"], lora_alpha=lora_settings["alpha"],
                       lora_dropout=lora_settings["dropout"], lora_targets=",".join(lora_settings["targets"]))
    train_started = time.time()
    record = train_stage(cfg)
    train_time = time.time() - train_started
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record, train_time


def keep_stage_files(tmp, keep_ckpt):
    """Into the point's folder: the whole checkpoint (--save_checkpoints) or run.json and train_log.jsonl."""
    stage = os.path.join(tmp, "stage")
    if keep_ckpt:
        for fn in os.listdir(stage):
            shutil.move(os.path.join(stage, fn), os.path.join(tmp, fn))
    else:
        for fn in STAGE_FILES:
            shutil.move(os.path.join(stage, fn), os.path.join(tmp, fn))
    shutil.rmtree(stage)


def run_point(args, model_dir, settings, task_a, task_b, name, sweep, frac, steps, key, done_keys, rank, world):
    """Make one point (process 0 writes; under torchrun every process trains). Returns its record or None."""
    master = rank == 0
    final = os.path.join(args.out, name)
    tmp = os.path.join(args.out, f".partial-{name}")
    base = {"name": name, "sweep": sweep, "fraction": frac, "steps": 0 if key == 0 else steps,
            "settings": settings}
    t0 = time.time()
    if key in done_keys:  # the same run already made under another name: copy its evaluation
        return copy_point(args, done_keys[key], name, base, tmp, final, t0) if master else None
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    record, train_time = None, 0.0
    eval_model = model_dir
    if key != 0:
        record, train_time = train_point(args, model_dir, task_a, tmp, final, frac, steps, settings.get("lora"))
        eval_model = os.path.join(tmp, "stage")
    eval_started = time.time()
    if master:
        print(f"replay: {name}: evaluating {task_a},{task_b}", flush=True)
    keep_ckpt = record is not None and args.save_checkpoints
    desc = None if record is None else (
        os.path.abspath(final) if keep_ckpt
        else f"replay stage ({name}, checkpoint not saved) from {os.path.abspath(model_dir)}")
    evaluate_point(args, eval_model, [task_a] if task_a == task_b else [task_a, task_b],
                   os.path.join(tmp, "eval.json"), model_name=desc, out_name=os.path.join(final, "eval.json"))
    eval_time = time.time() - eval_started
    if not master:
        return None
    if record is not None:
        keep_stage_files(tmp, keep_ckpt)
    evaluation = read_json(os.path.join(tmp, "eval.json"))
    rec = {**base, "n_examples": record["data"]["n_train"] if record else 0, "trained": record is not None,
           "loss": record["final_loss"] if record else None, "run_id": record["run_id"] if record else None,
           "train_time_s": round(train_time, 2), "eval_time_s": round(eval_time, 2),
           **eval_fields(evaluation, task_a, task_b),
           "same_run_as": None, "checkpoint": keep_ckpt, "wall_time_s": round(time.time() - t0, 2)}
    finish_point(tmp, final, rec)
    print(f"replay: {name}: acc {task_a} {100 * rec['acc_a']:.2f}%, acc {task_b} {100 * rec['acc_b']:.2f}% "
          f"({rec['wall_time_s']:.1f}s) -> {final}", flush=True)
    return rec


# -----------------------------------------------------------------------------
# Summary


def collect_points(out):
    pts = []
    for name in sorted(os.listdir(out)):
        p = os.path.join(out, name, POINT)
        if not name.startswith(".") and os.path.isfile(p):
            pts.append(read_json(p))
    order = {"fraction": 0, "steps": 1}
    pts.sort(key=lambda r: (order.get(r["sweep"], 2), r["fraction"] if r["sweep"] == "fraction" else r["steps"]))
    return pts


def write_summary(args, model_dir, meta, task_a, task_b, settings, ref, wall):
    pts = collect_points(args.out)
    zero_b = next((p["acc_b"] for p in pts if not p["trained"] and p["settings"] == settings), None)
    ref_acc = ref["acc_a"] if ref else None
    rows = []
    for p in pts:
        same = p["settings"] == settings
        rows.append({k: p.get(k) for k in ("name", "sweep", "fraction", "steps", "n_examples", "trained", "acc_a",
                                           "acc_b", "acc_a_stderr", "acc_b_stderr", "n_eval_a", "n_eval_b",
                                           "eval_loss_a", "eval_loss_b", "loss", "run_id", "same_run_as",
                                           "checkpoint", "wall_time_s", "train_time_s", "eval_time_s")}
                    | {"forgetting_a": (ref_acc - p["acc_a"]) if (ref_acc is not None and same) else None,
                       "change_b": (p["acc_b"] - zero_b) if (zero_b is not None and same) else None,
                       "settings_match": same})
    sweeps = {}
    for r in rows:
        s = sweeps.setdefault(r["sweep"], {"values": [], "wall_time_s": 0.0})
        s["values"].append(r["fraction"] if r["sweep"] == "fraction" else r["steps"])
        s["wall_time_s"] = round(s["wall_time_s"] + (r["wall_time_s"] or 0.0), 2)
    summary = {"model": os.path.abspath(model_dir), "model_run_id": meta.get("run_id"), "chain": meta["chain"],
               "task_a": task_a, "task_b": task_b, "first_stage": ref, "settings": settings,
               "units": "accuracies, forgetting_a and change_b are fractions; fraction is the fraction of A's "
                        "training set in [0, 1]",
               "definitions": {"forgetting_a": "acc_A(theta_A) - acc_A(point)",
                               "change_b": "acc_B(point) - acc_B(theta_AB) (the untrained point)"},
               "points": rows, "sweeps": sweeps, "last_invocation_wall_time_s": round(wall, 2)}
    write_json_atomic(os.path.join(args.out, SUMMARY), summary)
    return summary


def barrier():
    """Under torchrun: wait for the other processes (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# The sweep's steps (replay.py runs them in order)


def check_sweep_args(args):
    """Every check of the command line made before anything is read; parses --fractions and --steps_sweep."""
    args.fractions = parse_list(args.fractions, float, "--fractions", 0, 1,
                                " (fractions of A's training set, not percent: 5% is 0.05)")
    args.steps_sweep = parse_list(args.steps_sweep, int, "--steps_sweep", 0, 10 ** 7)
    if not args.fractions and not args.steps_sweep:
        raise UserError("nothing to do: pass --fractions (e.g. 0,0.01,0.05,0.1,0.2,0.4,0.6,0.8,1) and/or --steps_sweep "
                        "(e.g. 0,5,10,20,40,60,80,100)")
    check_args(vars(args), NUMERIC_RULES)
    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    if args.scorer not in SCORERS:
        raise UserError(f"--scorer {args.scorer!r}: choose from {', '.join(SCORERS)}")


def lora_settings_of(args, model_dir):
    """A LoRA --model (an adapter folder): how every point's stage starts from it (--lora_chain, merge unless
    given) and its adapter's settings, which a merge point's fresh adapter takes too. None for a checkpoint."""
    if not lora.is_adapter_dir(model_dir):
        if args.lora_chain:
            raise UserError(f"--lora_chain {args.lora_chain}: --model {args.model} is not a LoRA stage's adapter "
                            f"folder (no {lora.ADAPTER_CONFIG}); drop --lora_chain")
        return None
    return {"chain": args.lora_chain or "merge", **lora.folder_settings(model_dir)}


def sweep_settings(args, model_dir, meta, task_b):
    """The settings every point of the sweep shares; a point made with others is not reused."""
    lr, _ = resolve_lr({"lr": args.lr}, meta)
    settings = {"model": os.path.abspath(model_dir), "model_run_id": meta.get("run_id"), "task": args.task,
                "task_b": task_b,
                "lr": lr, "seed": args.seed, "batch_size": args.batch_size, "data_dir": args.data_dir,
                "train_size": args.train_size, "max_length": args.max_length, "bf16": args.bf16,
                "dtype": "bfloat16" if args.bf16 else "float32", "eval_limit": args.eval_limit,
                "eval_seed": args.eval_seed, "eval_batch_size": args.eval_batch_size, "scorer": args.scorer,
                "split": EVAL_DEFAULTS["split"], "fraction_unit": FRACTION_UNIT,
                **{k: v for k, v in data_options(args).items() if v != DATA_DEFAULTS[k]}}
    lora_settings = lora_settings_of(args, model_dir)
    if lora_settings:  # (a full fine-tuning sweep's settings stay as they were)
        settings["lora"] = lora_settings
    if args.task in GENERATIVE_TASKS or task_b in GENERATIVE_TASKS:  # the judge and the reply length make the score
        settings.update(classifier=args.classifier, max_new_tokens=args.max_new_tokens)
    return settings


def points_to_make(args, settings, master):
    """Decide every point up front (the same on every process): skip, copy, or make. -> (the plan, {training run
    key: the point that made it}, the points to make)."""
    plan = plan_points(args)
    done_keys, todo = {}, []
    earlier = collect_points(args.out) if os.path.isdir(args.out) and not args.overwrite else []
    for rec in earlier:  # earlier invocations' points too (--overwrite: none, every point is remade)
        if rec.get("same_run_as") is None and rec.get("settings") == settings:
            done_keys.setdefault(0 if not rec["trained"] else (float(rec["fraction"]), rec["steps"]), rec["name"])
    for name, sweep, frac, steps, key in plan:
        path = os.path.join(args.out, name)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, POINT)) and not args.overwrite:
            check_existing(path, settings)
            if master:
                print(f"replay: {name}: done already ({path})", flush=True)
            continue
        todo.append((name, sweep, frac, steps, key))
    return plan, done_keys, todo


def print_summary(summary, task_a, task_b, out):
    print(f"replay: summary of {len(summary['points'])} point(s) -> {os.path.join(out, SUMMARY)}")
    for r in summary["points"]:
        forgot = "" if r["forgetting_a"] is None else f"  forgetting {task_a} {100 * r['forgetting_a']:+.2f}%"
        print(f"  {r['name']:14s} n {r['n_examples']:5d}  acc {task_a} {100 * r['acc_a']:.2f}%  "
              f"acc {task_b} {100 * r['acc_b']:.2f}%{forgot}")
