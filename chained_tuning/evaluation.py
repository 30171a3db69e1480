"""Evaluate a checkpoint on tasks in the restricted output space: the prediction is the option whose answer
sentence has the highest log-likelihood given the prompt.

    python evaluate.py --model runs/demo/toxigen --tasks toxigen,arc --out runs/demo/toxigen/eval.json
    python evaluate.py --model tiny --tasks arc --data_dir ../shared/data --out /tmp/eval.json --limit 500
    python evaluate.py --model runs/demo/toxigen --tasks toxigen --out /tmp/naive.json --scorer naive
    torchrun --nproc_per_node=8 evaluate.py --model runs/arc --tasks arc,bbq --data_dir DIR --out runs/arc/eval.json

Writes --out (accuracies as fractions, overall and per group) and <out stem>_samples.jsonl beside it (every
prompt and option scored). Needs common.py, distributed.py, tasks.py and synthetic.py beside it (tiny_base.py for --model
tiny). The formats: README.md.
"""
import argparse
import collections
import contextlib
import os
import time

import torch
import torch.distributed as dist

from .common import (AT_LEAST_1, NON_NEGATIVE, HelpFormatter, UserError, acc_block, check_args, check_device, check_out,
                     die_on_user_error, progress, setup_process_group, under_torchrun, write_json_atomic,
                     write_jsonl_atomic)
from .checkpoint import check_tokenizer_matches, load_model_and_tokenizer, load_tokenizer, read_meta, resolve_model_path
from .distributed import gather_merge, is_sharded, load_replicated, pad_forwards
from .distributed import world as dist_world
from .data.tasks import (GENERATIVE_TASKS, SPLITS, TASKS, add_data_options, data_options, encode_pair, load_task,
                         parse_tasks, stratified_sample)

# The evaluation's defaults, in one place: evaluate_checkpoint's, this CLI's, and those of the scripts that
# evaluate through it (replay.py's --eval_* options).
DEFAULTS = {"split": "test", "limit": None, "batch_size": 16, "scorer": "fast", "seed": 0, "classifier": None,
            "max_new_tokens": 64}

# -----------------------------------------------------------------------------
# Requests: token ids of every (example, option)


def build_requests(tok, examples, max_length):
    """Per example, per option: (token ids of prompt + continuation, index where the continuation starts)."""
    out = []
    for ex in examples:
        if len(ex.options) < 2:
            raise UserError(f"example {ex.id} of {ex.task} has {len(ex.options)} option(s); the restricted output "
                            f"space needs at least 2")
        reqs = []
        for i in range(len(ex.options)):
            ctx, cont = encode_pair(tok, ex.prompt, ex.continuation(i))
            if len(ctx) + len(cont) > max_length:  # cut the prompt's start, as lm-evaluation-harness does
                ctx = ctx[len(ctx) + len(cont) - max_length:]
            reqs.append((ctx + cont, len(ctx)))
        out.append(reqs)
    return out


def my_batches(n_items, batch_size, rank, world):
    """Start indices of this process's batches of the length-sorted items: every world-th batch, so each
    process gets long and short ones alike, and every batch is the one a single process would score."""
    return range(rank * batch_size, n_items, world * batch_size)


def _log_probs_at(logits_row, positions, targets):
    """log p(target | prefix) for each (position of the predicting logits, target id)."""
    lp = torch.log_softmax(logits_row[positions].float(), dim=-1)
    return lp.gather(1, targets.unsqueeze(1)).squeeze(1)


# -----------------------------------------------------------------------------
# The naive scorer: one full forward per option


@torch.no_grad()
def score_naive(model, reqs, batch_size, pad_id, device, desc="naive", rank=0, world=1):
    flat = [(e, i, ids, start) for e, opts in enumerate(reqs) for i, (ids, start) in enumerate(opts)]
    flat.sort(key=lambda r: -len(r[2]))
    scores = [[None] * len(opts) for opts in reqs]
    for b in progress(my_batches(len(flat), batch_size, rank, world), desc, leave=False, disable=rank != 0):
        chunk = flat[b:b + batch_size]
        n = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for k, (_, _, seq, _) in enumerate(chunk):
            ids[k, :len(seq)] = torch.tensor(seq)
            mask[k, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for k, (e, i, seq, start) in enumerate(chunk):
            pos = torch.arange(start - 1, len(seq) - 1, device=device)
            tgt = torch.tensor(seq[start:], device=device)
            scores[e][i] = float(_log_probs_at(logits[k], pos, tgt).double().sum())
    return scores


# -----------------------------------------------------------------------------
# The fast scorer: the shared prefix once, then only the option tails


def split_shared(opts):
    """Length of the longest common token prefix of an example's options (each keeps >= 1 own token)."""
    seqs = [ids for ids, _ in opts]
    longest = min(len(s) for s in seqs) - 1
    for j in range(longest):
        if any(s[j] != seqs[0][j] for s in seqs[1:]):
            return j
    return longest


@torch.no_grad()
def score_kv(model, reqs, batch_size, pad_id, device, desc="kv", rank=0, world=1):
    """The shared prefix once with use_cache, its KV cache copied to every option's tail."""
    if world > 1 and is_sharded(model):  # one or two forwards a batch: the processes' counts are not known ahead
        raise UserError("the kv scorer cannot score an FSDP-sharded model (its processes would run different "
                        "numbers of forwards); use the fast or naive scorer, or an attention kernel that takes a "
                        "custom mask (sdpa, eager)")
    order = sorted(range(len(reqs)), key=lambda e: -len(reqs[e][0][0]))
    scores = [[None] * len(opts) for opts in reqs]
    for b in progress(my_batches(len(order), batch_size, rank, world), desc, leave=False, disable=rank != 0):
        exs = order[b:b + batch_size]
        prefix_lens = [split_shared(reqs[e]) for e in exs]
        longest_prefix = max(prefix_lens)
        ids = torch.full((len(exs), longest_prefix), pad_id, dtype=torch.long)
        pmask = torch.zeros((len(exs), longest_prefix), dtype=torch.long)
        for k, e in enumerate(exs):
            ids[k, :prefix_lens[k]] = torch.tensor(reqs[e][0][0][:prefix_lens[k]])
            pmask[k, :prefix_lens[k]] = 1
        single = all(len(opt_ids) - plen == 1 for e, plen in zip(exs, prefix_lens) for opt_ids, _ in reqs[e])
        out = model(input_ids=ids.to(device), attention_mask=pmask.to(device), use_cache=not single)
        plogits = out.logits
        # Rows of the option tails: (example slot k, option i); the cache is copied to each row.
        rows = [(k, i) for k, e in enumerate(exs) for i in range(len(reqs[e]))]
        tail_logits = None
        if not single:
            longest_tail = max(1, max(len(reqs[exs[k]][i][0]) - prefix_lens[k] - 1 for k, i in rows))
            tids = torch.full((len(rows), longest_tail), pad_id, dtype=torch.long)
            tmask = torch.zeros((len(rows), longest_tail), dtype=torch.long)
            pos = torch.zeros((len(rows), longest_tail), dtype=torch.long)
            for r, (k, i) in enumerate(rows):
                tail = reqs[exs[k]][i][0][prefix_lens[k]:-1]  # the last token is only predicted, never fed
                tids[r, :len(tail)] = torch.tensor(tail, dtype=torch.long)
                tmask[r, :len(tail)] = 1
                pos[r] = prefix_lens[k] + torch.arange(longest_tail)  # right after the row's own prefix, not padding
            cache = out.past_key_values
            cache.reorder_cache(torch.tensor([k for k, _ in rows], device=device))
            full_mask = torch.cat([pmask[[k for k, _ in rows]], tmask], dim=1)
            tail_logits = model(input_ids=tids.to(device), attention_mask=full_mask.to(device),
                                position_ids=pos.to(device), past_key_values=cache, use_cache=True).logits
        for r, (k, i) in enumerate(rows):
            e, plen = exs[k], prefix_lens[k]
            seq, start = reqs[e][i]
            total = 0.0
            # Continuation tokens inside the shared prefix, and the first own token: prefix logits.
            p_pos = list(range(start - 1, plen))
            if p_pos:
                total += float(_log_probs_at(plogits[k], torch.tensor(p_pos, device=device),
                                             torch.tensor(seq[start:plen + 1], device=device)).double().sum())
            # The rest of the tail: logits of the tail forward (tail position j predicts seq[plen + 1 + j]).
            t_first = max(start, plen + 1)
            if t_first < len(seq):
                t_pos = torch.arange(t_first - plen - 1, len(seq) - plen - 1, device=device)
                total += float(_log_probs_at(tail_logits[r], t_pos, torch.tensor(seq[t_first:], device=device))
                               .double().sum())
            scores[e][i] = total
    return scores


def _tail_targets(seq, start, plen):
    """For one option and the length plen of the shared prefix: (positions in the prefix whose logits score
    it, their targets) and the tail targets seq[t] for t > plen (scored by the logits of the fed tail token
    seq[t-1])."""
    return list(range(start - 1, plen)), seq[start:plen + 1], list(range(max(start, plen + 1), len(seq)))


@torch.no_grad()
def score_packed(model, reqs, batch_size, pad_id, device, desc="fast", rank=0, world=1):
    """One forward per batch: each row holds an example's shared prefix followed by every option's
    tail, with a tree attention mask (a tail sees the prefix and itself, never another tail) and
    position ids that restart each tail right after the prefix. The prefix is computed once, and
    unlike a KV cache there is no second forward call, whose fixed cost is what a small model pays."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("sdpa", "eager"):  # flash kernels take no custom 4D mask
        return score_kv(model, reqs, batch_size, pad_id, device, desc, rank, world)
    order = sorted(range(len(reqs)), key=lambda e: -len(reqs[e][0][0]))
    scores = [[None] * len(opts) for opts in reqs]
    for b in progress(my_batches(len(order), batch_size, rank, world), desc, leave=False, disable=rank != 0):
        exs = order[b:b + batch_size]
        rows = []  # per example: (tokens, positions, segment of each token: -1 prefix / i tail, prefix length,
        #             tail offsets)
        for e in exs:
            plen = split_shared(reqs[e])
            toks, pos, seg, offs = list(reqs[e][0][0][:plen]), list(range(plen)), [-1] * plen, []
            for i, (seq, _) in enumerate(reqs[e]):
                tail = seq[plen:-1]  # the last token is only predicted, never fed
                offs.append(len(toks))
                toks += tail
                pos += range(plen, plen + len(tail))
                seg += [i] * len(tail)
            rows.append((toks, pos, seg, plen, offs))
        n = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), n), dtype=torch.long)
        segs = torch.full((len(rows), n), -2, dtype=torch.long)  # -2: padding
        for k, (t, p, sg, _, _) in enumerate(rows):
            ids[k, :len(t)], pos[k, :len(t)], segs[k, :len(t)] = torch.tensor(t), torch.tensor(p), torch.tensor(sg)
        query_seg, key_seg = segs.unsqueeze(2), segs.unsqueeze(1)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        # key visible to query: causal, key not padding, and key in the prefix or in the query's own tail
        allow = causal & (key_seg != -2) & ((key_seg == -1) | (key_seg == query_seg))
        allow |= torch.eye(n, dtype=torch.bool)  # padding queries see themselves: no NaN rows
        mask = allow.unsqueeze(1)
        if impl == "eager":
            mask = torch.zeros(mask.shape, dtype=model.dtype).masked_fill(~mask, torch.finfo(model.dtype).min)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
        for k, e in enumerate(exs):
            _, _, _, plen, offs = rows[k]
            for i, (seq, start) in enumerate(reqs[e]):
                p_pos, p_tgt, t_idx = _tail_targets(seq, start, plen)
                total = 0.0
                if p_pos:
                    total += float(_log_probs_at(logits[k], torch.tensor(p_pos, device=device),
                                                 torch.tensor(p_tgt, device=device)).double().sum())
                if t_idx:  # seq[t] is predicted by fed tail token seq[t-1], at offs[i] + (t - 1 - plen)
                    at = torch.tensor([offs[i] + t - 1 - plen for t in t_idx], device=device)
                    total += float(_log_probs_at(logits[k], at, torch.tensor([seq[t] for t in t_idx], device=device))
                                   .double().sum())
                scores[e][i] = total
    return scores


# fast (the default): the prefix the options share (prompt + "The best answer is") once, the option tails in
# the same forward under a tree mask; kv: the same with the prefix's KV cache copied to each option (two calls a
# batch: the path for attention kernels that take no custom mask); naive: one full forward per option, as
# lm-evaluation-harness does. All three give the same predictions (tests/test_evaluate.py).
SCORERS = {"fast": score_packed, "kv": score_kv, "naive": score_naive}

# -----------------------------------------------------------------------------
# Metrics


def summarize(task, records, source, split):
    correct = [r["correct"] for r in records]
    tokens = sum(r["n_tokens"][r["label"]] for r in records)
    res = {**acc_block(correct), "loss": -sum(r["logliks"][r["label"]] for r in records) / tokens,
           "source": source, "split": split, "groups": {}}
    by_group = collections.defaultdict(list)
    for r in records:
        if r["group"] is not None:
            by_group[r["group"]].append(r["correct"])
    res["groups"] = {g: {k: v for k, v in acc_block(c).items() if k != "acc_stderr"} for g, c in sorted(by_group.items())}
    if task == "bbq":
        cond = collections.defaultdict(list)
        cond_group = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in records:
            cond[r["context_condition"]].append(r["correct"])
            cond_group[r["context_condition"]][r["group"]].append(r["correct"])
        res["context_condition"] = {c: {"acc": acc_block(v)["acc"], "n": len(v)} for c, v in sorted(cond.items())}
        res["groups_by_context_condition"] = {c: {g: {"acc": acc_block(v)["acc"], "n": len(v)} for g, v in sorted(gs.items())}
                                              for c, gs in sorted(cond_group.items())}
    return res


# -----------------------------------------------------------------------------


def evaluate(model, tok, task_names, data_dir=None, split=DEFAULTS["split"], limit=DEFAULTS["limit"],
             batch_size=DEFAULTS["batch_size"], scorer=DEFAULTS["scorer"], device="cpu", seed=DEFAULTS["seed"],
             data_opts=None, classifier=None, max_new_tokens=DEFAULTS["max_new_tokens"]):
    """Score every task (data_opts: load_task's options, tasks.DATA_DEFAULTS where unset); returns ({task:
    results}, [per-example records]). Under a process group every process scores its share of the batches and
    every process returns the whole result. A generative task (SaFeRDialogues) is generated and judged by
    `classifier` (a classifier.py name or folder, loaded once here) instead of scored."""
    check_args({"limit": limit, "batch_size": batch_size, "seed": seed}, NUMERIC_RULES)
    rank, world = dist_world()
    max_length = getattr(model.config, "max_position_embeddings", 2048)
    results, samples, judge = {}, [], None
    for task in task_names:
        data = load_task(task, split, data_dir, seed=seed, **data_options(data_opts or {}))
        examples = data.examples
        if limit is not None and limit < len(examples):  # a stratified subset keeps every group
            examples = sorted(stratified_sample(examples, limit, seed, f"{task}-eval-limit"), key=lambda x: x.id)
        if task in GENERATIVE_TASKS:
            if judge is None:
                judge = load_judge(classifier, device)
            results[task], records = evaluate_generative(
                model, tok, task, examples, data.source, split, classifier=judge, max_new_tokens=max_new_tokens,
                batch_size=batch_size, device=device, rank=rank, world=world)
            results[task]["data_info"] = {k: v for k, v in data.info.items() if k != "files"}
            samples.extend(records)
            continue
        reqs = build_requests(tok, examples, max_length)
        t0 = time.time()
        scores = SCORERS[scorer](model, reqs, batch_size, tok.pad_token_id, device, desc=f"{task} [{scorer}]",
                                 rank=rank, world=world)
        if world > 1 and is_sharded(model):
            n = sum(map(len, reqs)) if scorer == "naive" else len(reqs)  # the naive scorer batches the options
            missing = len(my_batches(n, batch_size, 0, world)) - len(my_batches(n, batch_size, rank, world))
            pad_forwards(model, missing, tok.pad_token_id, device)
        if world > 1:
            mine = gather_merge({e: sc for e, sc in enumerate(scores) if sc[0] is not None})
            scores = [mine[e] for e in range(len(reqs))]
        if rank == 0:
            print(f"evaluate: {task} [{data.source}] {split}: {len(examples)} examples scored in "
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
        results[task] = summarize(task, records, data.source, split)
        results[task]["data_info"] = {k: v for k, v in data.info.items() if k != "files"}
        samples.extend(records)
    return results, samples


def load_judge(name, device):
    """The toxicity classifier of a generative task (classifier.py: needed beside this file for SaFeRDialogues)."""
    try:
        from .classifier import load_classifier
    except ImportError as e:
        raise UserError(f"SaFeRDialogues needs classifier.py and generation.py beside evaluate.py ({e}); copy them "
                        f"there") from None
    return load_classifier(name, device)


def evaluate_generative(*args, **kwargs):
    if kwargs.get("world", 1) > 1 and is_sharded(args[0]):  # each row stops when it stops: no known forward count
        raise UserError("a generative task cannot be evaluated on an FSDP-sharded model; evaluate the saved "
                        "checkpoint (evaluate.py under torchrun holds a whole copy per process)")
    try:
        from .generation import evaluate_generative as generate_and_judge
    except ImportError as e:
        raise UserError(f"SaFeRDialogues needs generation.py and classifier.py beside evaluate.py ({e}); copy them "
                        f"there") from None
    return generate_and_judge(*args, **kwargs)


def judge_for(tasks, classifier, tiny, data_dir):
    """The classifier a run's generative tasks are judged by (None without one): --classifier, else the tiny
    judge for the embedded synthetic profile, else the paper's ToxiGen RoBERTa."""
    if not any(t in GENERATIVE_TASKS for t in tasks):
        return None
    if classifier:
        return classifier
    try:
        from .classifier import default_classifier
    except ImportError as e:
        raise UserError(f"SaFeRDialogues needs classifier.py beside evaluate.py ({e}); copy it there") from None
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
    final ones. Under a process group (torchrun): process 0 reads the weights, every process holds the model and
    scores its share of the batches, process 0 writes exactly the files one process writes."""
    tasks = check_request(tasks, out, split, limit, batch_size, scorer, seed, overwrite, max_new_tokens)
    device = check_device(device)
    if under_torchrun() and dist_world()[1] == 1:
        device, _ = setup_process_group(device)
    dtype = resolve_dtype(dtype, device)
    model_name = model_path if model_name is None else model_name
    model_path = resolve_model_path(model_path)
    meta = read_meta(model_path)
    if dist_world()[1] > 1:
        tok = load_tokenizer(model_path)
        model = load_replicated(model_path, device, DTYPES[dtype])
        check_tokenizer_matches(model, tok, model_path)
    else:
        model, tok = load_model_and_tokenizer(model_path, dtype=DTYPES[dtype])
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
