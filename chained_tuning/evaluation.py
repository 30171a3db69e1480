"""Evaluation in the restricted output space: the prediction is the option whose answer sentence has the highest
log-likelihood given the prompt (the scorer: scorer.py, a copy unit, re-exported here); a generative task
(SaFeRDialogues) is generated and judged instead (generation.py, classifier.py). evaluate.py's library.

    from chained_tuning.evaluation import evaluate_checkpoint
    report = evaluate_checkpoint("runs/demo/toxigen", "toxigen,arc", "runs/demo/toxigen/eval.json", limit=300)

Writes the results JSON (accuracies as fractions, overall and per group) and <out stem>_samples.jsonl beside it
(every prompt and option scored). The formats: docs/evaluate.md.
"""
import contextlib
import os
import time

import torch

from . import lora
from .checkpoint import check_tokenizer_matches, read_meta
from .classifier import default_classifier, load_classifier
from .common import (AT_LEAST_1, NON_NEGATIVE, UserError, check_args, check_device, check_out, progress,
                     setup_process_group, under_torchrun, write_json_atomic, write_jsonl_atomic)
from .data.tasks import GENERATIVE_TASKS, SPLITS, data_options, encode_pair, load_task, parse_tasks, stratified_sample
from .distributed import gather_merge, is_sharded, load_replicated, pad_forwards
from .distributed import world as dist_world
from .generation import evaluate_generative as generate_and_judge
from .scorer import SCORERS, ScorerError, my_batches, request, summarize
from .scorer import acc_block, score_kv, score_naive, score_packed, split_shared  # noqa: F401  (re-exported)

# The evaluation's defaults, in one place: evaluate_checkpoint's, this CLI's, and those of the scripts that
# evaluate through it (replay.py's --eval_* options).
DEFAULTS = {"split": "test", "limit": None, "batch_size": 16, "scorer": "fast", "seed": 0, "classifier": None,
            "max_new_tokens": 64}



def build_requests(tok, examples, max_length):
    """Per example, per option: (token ids of prompt + continuation, index where the continuation starts), the
    pair split as training splits it (tasks.encode_pair)."""
    out = []
    for ex in examples:
        if len(ex.options) < 2:
            raise UserError(f"example {ex.id} of {ex.task} has {len(ex.options)} option(s); the restricted output "
                            f"space needs at least 2")
        out.append([request(*encode_pair(tok, ex.prompt, ex.continuation(i)), max_length)
                    for i in range(len(ex.options))])
    return out


def evaluate(model, tok, task_names, data_dir=None, split=DEFAULTS["split"], limit=DEFAULTS["limit"],
             batch_size=DEFAULTS["batch_size"], scorer=DEFAULTS["scorer"], device="cpu", seed=DEFAULTS["seed"],
             data_opts=None, classifier=None, max_new_tokens=DEFAULTS["max_new_tokens"]):
    """Score every task (data_opts: load_task's options, tasks.DATA_DEFAULTS where unset); returns ({task:
    results}, [per-example records]). Under a process group every process scores its share of the batches and
    every process returns the whole result. A generative task (SaFeRDialogues) is generated and judged by
    `classifier` (a classifier.py name or folder, loaded once here) instead of scored."""
    check_args({"limit": limit, "batch_size": batch_size, "seed": seed}, NUMERIC_RULES)
    rank, world = dist_world()
    results, samples, judge = {}, [], None
    for task in task_names:
        data = load_task(task, split, data_dir, seed=seed, **data_options(data_opts or {}))
        examples = data.examples
        if limit is not None and limit < len(examples):  # a stratified subset keeps every group
            examples = sorted(stratified_sample(examples, limit, seed, f"{task}-eval-limit"), key=lambda x: x.id)
        if task in GENERATIVE_TASKS:
            if judge is None:
                judge = load_classifier(classifier, device)
            results[task], records = evaluate_generative(
                model, tok, task, examples, data.source, split, classifier=judge, max_new_tokens=max_new_tokens,
                batch_size=batch_size, device=device, rank=rank, world=world)
        else:
            results[task], records = score_task(model, tok, task, examples, data.source, split, batch_size, scorer,
                                                device, rank, world)
        results[task]["data_info"] = {k: v for k, v in data.info.items() if k != "files"}
        samples.extend(records)
    return results, samples


def score_task(model, tok, task, examples, source, split, batch_size, scorer, device, rank, world):
    """One multiple-choice task scored by SCORERS[scorer], every process's share merged: (results, records)."""
    reqs = build_requests(tok, examples, getattr(model.config, "max_position_embeddings", 2048))
    t0 = time.time()
    try:
        scores = SCORERS[scorer](model, reqs, batch_size, tok.pad_token_id, device, desc=f"{task} [{scorer}]",
                                 rank=rank, world=world, progress=progress)
    except ScorerError as e:
        raise UserError(str(e)) from None
    if world > 1 and is_sharded(model):
        n = sum(map(len, reqs)) if scorer == "naive" else len(reqs)  # the naive scorer batches the options
        missing = len(my_batches(n, batch_size, 0, world)) - len(my_batches(n, batch_size, rank, world))
        pad_forwards(model, missing, tok.pad_token_id, device)
    if world > 1:
        mine = gather_merge({e: sc for e, sc in enumerate(scores) if sc[0] is not None})
        scores = [mine[e] for e in range(len(reqs))]
    if rank == 0:
        print(f"evaluate: {task} [{source}] {split}: {len(examples)} examples scored in "
              f"{time.time() - t0:.1f}s ({world} process(es))", flush=True)
    records = []
    for ex, opts, sc in zip(examples, reqs, scores):
        pred = max(range(len(sc)), key=lambda i: sc[i])
        rec = {"id": ex.id, "task": task, "group": ex.group, "prompt": ex.prompt,
               "options": [ex.continuation(i) for i in range(len(ex.options))], "logliks": sc,
               "n_tokens": [len(ids) - start for ids, start in opts], "pred": pred, "label": ex.label,
               "correct": pred == ex.label}
        if "context_condition" in ex.extra:
            rec["context_condition"] = ex.extra["context_condition"]
        records.append(rec)
    return summarize(task, records, source, split), records


def evaluate_generative(*args, **kwargs):
    """generation.evaluate_generative, refused on an FSDP-sharded model."""
    if kwargs.get("world", 1) > 1 and is_sharded(args[0]):  # each row stops when it stops: no known forward count
        raise UserError("a generative task cannot be evaluated on an FSDP-sharded model; evaluate the saved "
                        "checkpoint (evaluate.py under torchrun holds a whole copy per process)")
    return generate_and_judge(*args, **kwargs)


def judge_for(tasks, classifier, tiny, data_dir):
    """The classifier a run's generative tasks are judged by (None without one): --classifier, else the tiny
    judge for the embedded synthetic profile, else the paper's ToxiGen RoBERTa."""
    if not any(t in GENERATIVE_TASKS for t in tasks):
        return None
    if classifier:
        return classifier
    return default_classifier(tiny and data_dir is None)


def samples_path(out):
    stem = out[:-5] if out.endswith(".json") else out
    return stem + "_samples.jsonl"


# Every numeric option and what it allows (checked before anything is loaded; None: unset, allowed). A
# --limit below 1 must never reach tasks.stratified_sample: its per-cell quota goes negative, and a
# negative slice keeps all but the last examples of some cells and none of others.
NUMERIC_RULES = {"limit": AT_LEAST_1, "batch_size": AT_LEAST_1, "seed": NON_NEGATIVE, "max_new_tokens": AT_LEAST_1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name, device):
    """--dtype: auto is bfloat16 on CUDA (half the memory and traffic of float32), float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: choose from auto, {', '.join(DTYPES)}")
    return name


def check_request(tasks, out, split, limit, batch_size, scorer, seed, overwrite, max_new_tokens):
    """Every check evaluate_checkpoint makes before loading anything; returns the task list."""
    tasks = parse_tasks(tasks)
    check_args({"limit": limit, "batch_size": batch_size, "seed": seed, "max_new_tokens": max_new_tokens},
               NUMERIC_RULES)
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose from {', '.join(SPLITS)}")
    if scorer not in SCORERS:
        raise UserError(f"--scorer {scorer!r}: choose from {', '.join(SCORERS)}")
    check_out(out, overwrite)
    spath = samples_path(out)
    if os.path.isdir(spath):
        raise UserError(f"--out {out}: its samples file {spath} is a folder; choose another --out")
    return tasks


def evaluate_checkpoint(model_path, tasks, out, data_dir=None, split=DEFAULTS["split"], limit=DEFAULTS["limit"],
                        batch_size=DEFAULTS["batch_size"], scorer=DEFAULTS["scorer"], seed=DEFAULTS["seed"],
                        dtype="auto", device=None, model_name=None, overwrite=False, out_name=None, data_opts=None,
                        classifier=DEFAULTS["classifier"], max_new_tokens=DEFAULTS["max_new_tokens"]):
    """Load a checkpoint, score `tasks` (names, or a comma-separated string) and write `out` (results JSON)
    with its samples JSONL beside it; returns the report. The one entry every caller uses. An existing `out` is
    refused unless overwrite. model_name / out_name: what the report and the printed lines call the model and
    `out` (default model_path, out), so a caller that evaluates a folder before moving it into place names the
    final ones. Under a process group (torchrun): process 0 reads the weights (an adapter folder: merged into its
    base), every process holds the whole model and scores its share of the batches, process 0 writes exactly the
    files one process writes."""
    tasks = check_request(tasks, out, split, limit, batch_size, scorer, seed, overwrite, max_new_tokens)
    device = check_device(device)
    if under_torchrun() and dist_world()[1] == 1:
        device, _ = setup_process_group(device)
    dtype = resolve_dtype(dtype, device)
    model_name = model_path if model_name is None else model_name
    model_path = lora.resolve(model_path)
    meta = read_meta(model_path)
    if dist_world()[1] > 1:  # an adapter folder: process 0 merges it (below), the others receive the merged model
        tok = lora.load_tokenizer_of(model_path)
        adapter = lora.is_adapter_dir(model_path)
        merged = (lambda: lora.load_adapter_model(model_path, DTYPES[dtype], merge=True)) if adapter else None
        model = load_replicated(lora.root_base(model_path), device, DTYPES[dtype], load=merged)
        check_tokenizer_matches(model, tok, model_path)
    else:
        # an adapter folder: its adapter merged into its base (PEFT's merge_and_unload), a plain causal LM
        model, tok = lora.load_model_and_tokenizer(model_path, dtype=DTYPES[dtype])
        model.to(device)
    model.eval()
    return evaluate_model(model, tok, meta, tasks, out, data_dir=data_dir, split=split, limit=limit,
                          batch_size=batch_size, scorer=scorer, seed=seed, dtype=dtype, device=device,
                          model_name=model_name, out_name=out_name, data_opts=data_opts, classifier=classifier,
                          max_new_tokens=max_new_tokens)


def evaluate_model(model, tok, meta, tasks, out, data_dir=None, split=DEFAULTS["split"], limit=DEFAULTS["limit"],
                   batch_size=DEFAULTS["batch_size"], scorer=DEFAULTS["scorer"], seed=DEFAULTS["seed"],
                   dtype="float32", device="cpu", model_name=None, out_name=None, data_opts=None,
                   classifier=DEFAULTS["classifier"], max_new_tokens=DEFAULTS["max_new_tokens"]):
    """evaluate_checkpoint's work on a model already in memory (finetune.py under torchrun evaluates the sharded
    model it trained); `meta` is its lineage, `dtype` the name of the dtype its forward runs in."""
    rank, _ = dist_world()
    out_name = out if out_name is None else out_name
    if rank == 0:
        print(f"evaluate: {model_name} on {','.join(tasks)} ({split}, {scorer} scorer, {dtype}) -> {out_name}",
              flush=True)
    data_opts = data_options(data_opts or {})
    judge = judge_for(tasks, classifier, bool(meta.get("tiny")), data_dir)
    results, samples = evaluate(model, tok, tasks, data_dir, split, limit, batch_size, scorer, device, seed, data_opts,
                                judge, max_new_tokens)
    spath = samples_path(out)
    report = {"model": model_name, "run_id": meta.get("run_id"), "chain": meta.get("chain"),
              "config": {"tasks": list(tasks), "split": split, "data_dir": data_dir, "limit": limit,
                         "scorer": scorer, "batch_size": batch_size, "dtype": dtype, "seed": seed,
                         "tiny": bool(meta.get("tiny")), **data_opts},
              "tasks": results, "samples": os.path.basename(spath)}
    if judge is not None:  # which classifier judged the generative tasks, and how long a reply could be
        report["config"].update(classifier=judge, max_new_tokens=max_new_tokens)
    if rank != 0:
        return report
    # The samples first, the results JSON last (its presence means complete); a failure leaves neither.
    existed = os.path.exists(out)
    write_jsonl_atomic(spath, samples)
    try:
        write_json_atomic(out, report)
    except BaseException:
        if not existed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(spath)
        raise
    for t, r in results.items():
        print(f"  {t:15s} acc {100 * r['acc']:.2f}% +- {100 * r['acc_stderr']:.2f}%  n {r['n']}  "
              f"loss {r['loss']:.4f}  [{r['source']}]")
    return report
