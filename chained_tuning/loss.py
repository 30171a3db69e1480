"""The training loss, one definition: the answer tokens' NLL (the correct continuation and EOS), which
finetune.py minimises and curvature.py differentiates."""
import torch

from .data.tasks import encode_pair
from .common import UserError

def encode_example(tokenizer, example, max_length):
    """input_ids and labels (-100 except on the answer: the correct continuation and EOS).

    An over-long prompt loses tokens from its start (after BOS); the answer is never cut."""
    ctx, cont = encode_pair(tokenizer, example.prompt, example.continuation(example.label))
    answer = cont + [tokenizer.eos_token_id]
    if len(answer) + 2 > max_length:
        raise UserError(f"example {example.id} of {example.task}: its answer alone has {len(answer)} tokens, "
                        f"more than --max_length {max_length}; raise --max_length")
    truncated = len(ctx) + len(answer) > max_length
    if truncated:
        keep = max_length - len(answer)
        bos = ctx[:1] if ctx[:1] == [tokenizer.bos_token_id] else []
        ctx = bos + ctx[len(ctx) - (keep - len(bos)):]
    return {"input_ids": ctx + answer, "labels": [-100] * len(ctx) + answer, "truncated": truncated}


def collate(encoded, pad_id, side="right"):
    """Padded LongTensors input_ids, attention_mask, labels (and position_ids when padded on the
    left, so every row keeps the positions it has unpadded)."""
    n = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        cols = slice(n - k, n) if side == "left" else slice(0, k)
        ids[i, cols] = torch.tensor(e["input_ids"])
        labels[i, cols] = torch.tensor(e["labels"])
        mask[i, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if side == "left":
        out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return out


def answer_logits(model, batch):
    """Logits of the positions that predict answer tokens only: with left padding every answer ends
    the row, so the last K positions hold them all and the vocabulary projection runs on B*K rows
    instead of B*T. Returns (logits, the labels they predict, shifted as in answer_loss_sum)."""
    lab = batch["labels"]
    is_answer = (lab != -100).any(0).nonzero()
    k = lab.shape[1] - int(is_answer[0]) + 1 if len(is_answer) else 1
    k = min(k, lab.shape[1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch.get("position_ids"), logits_to_keep=k).logits
    return logits, lab[:, -k:]


def answer_loss_sum(logits, labels):
    """(sum of token NLL over answer tokens, number of answer tokens); logits[t] predicts labels[t+1]."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def answer_tokens(item):
    return sum(1 for t in item["labels"] if t != -100)
