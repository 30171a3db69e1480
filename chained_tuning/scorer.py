"""The scorer of the restricted output space (a copy unit): the log-likelihood of every option's answer tokens
given the prompt, on a Hugging Face causal LM, by three methods that give the same numbers: fast (the options'
shared prefix once and every option's tail in the same forward under a tree mask), kv (the prefix's KV cache
copied to every tail) and naive (one forward per option, as lm-evaluation-harness does); and the summary of
scored records (accuracy, its stderr, per group).

Copy set: this file alone (it needs torch, and a model with the transformers forward signature; nothing else of
the project). A request is (token ids of prompt + answer, index where the answer starts); request() cuts a
prompt too long for the model, as lm-evaluation-harness does.

    from scorer import SCORERS, request
    reqs = [[request(prompt_ids, option_ids, 2048) for option_ids in options] for prompt_ids, options in items]
    scores = SCORERS["fast"](model, reqs, 16, tok.pad_token_id, "cpu")   # per item, per option: log p(option)

Under a process group (rank, world) each process scores every world-th batch; the caller merges. progress:
a wrapper of the batches' loop, progress(iterable, desc, leave=, disable=) (default: none).
"""
import collections
import math

import torch


class ScorerError(ValueError):
    """Input the scorer cannot score (the project's evaluation reports it as a user error)."""


def _each(iterable, desc, **_):
    """The default `progress` of every scorer: no progress lines (the project passes its own)."""
    return iterable


def is_sharded(model):
    """Whether the model is FSDP2-sharded (each forward is then a collective every process must join)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def acc_block(correct):
    """{"acc", "acc_stderr", "n"} of a list of booleans: the share, with sqrt(p(1-p)/(n-1)) (lm-evaluation-harness's
    sample stderr)."""
    n = len(correct)
    acc = sum(correct) / n if n else float("nan")
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
    return {"acc": acc, "acc_stderr": stderr, "n": n}


# -----------------------------------------------------------------------------
# Requests: token ids of every (example, option)


def request(ctx, cont, max_length):
    """(token ids of prompt + continuation, index where the continuation starts); a pair longer than max_length
    loses the prompt's start, as lm-evaluation-harness cuts it."""
    if len(ctx) + len(cont) > max_length:
        ctx = ctx[len(ctx) + len(cont) - max_length:]
    return ctx + cont, len(ctx)


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
def score_naive(model, reqs, batch_size, pad_id, device, desc="naive", rank=0, world=1, progress=_each):
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
def score_kv(model, reqs, batch_size, pad_id, device, desc="kv", rank=0, world=1, progress=_each):
    """The shared prefix once with use_cache, its KV cache copied to every option's tail."""
    if world > 1 and is_sharded(model):  # one or two forwards a batch: the processes' counts are not known ahead
        raise ScorerError("the kv scorer cannot score an FSDP-sharded model (its processes would run different "
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
def score_packed(model, reqs, batch_size, pad_id, device, desc="fast", rank=0, world=1, progress=_each):
    """One forward per batch: each row holds an example's shared prefix followed by every option's
    tail, with a tree attention mask (a tail sees the prefix and itself, never another tail) and
    position ids that restart each tail right after the prefix. The prefix is computed once, and
    unlike a KV cache there is no second forward call, whose fixed cost is what a small model pays."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("sdpa", "eager"):  # flash kernels take no custom 4D mask
        return score_kv(model, reqs, batch_size, pad_id, device, desc, rank, world, progress)
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
    res["groups"] = {g: {k: v for k, v in acc_block(c).items() if k != "acc_stderr"}
                     for g, c in sorted(by_group.items())}
    if task == "bbq":
        cond = collections.defaultdict(list)
        cond_group = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in records:
            cond[r["context_condition"]].append(r["correct"])
            cond_group[r["context_condition"]][r["group"]].append(r["correct"])
        res["context_condition"] = {c: {"acc": acc_block(v)["acc"], "n": len(v)} for c, v in sorted(cond.items())}
        res["groups_by_context_condition"] = {c: {g: {"acc": acc_block(v)["acc"], "n": len(v)}
                                                  for g, v in sorted(gs.items())}
                                              for c, gs in sorted(cond_group.items())}
    return res
