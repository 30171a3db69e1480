"""One finetune.py optimisation step vs the same step through transformers.Trainer: the same tiny
model, data, batch (16), order, optimiser (AdamW, same groups), schedule and clipping. Reports the
median seconds per step of each and their ratio, and checks both produce the same losses.

    python bench/bench_finetune_step.py                 # 30 measured steps on synthetic ARC
    python bench/bench_finetune_step.py --task toxigen --steps 50

Needs accelerate (requirements.txt). Writes bench/results/finetune_step.{json,csv}.
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chained_tuning.checkpoint import load_model_and_tokenizer  # noqa: E402
from chained_tuning.common import seed_everything, write_json_atomic  # noqa: E402
from chained_tuning.data.tasks import load_task  # noqa: E402
from chained_tuning.loss import collate, encode_example  # noqa: E402
from chained_tuning.stage_config import default_config  # noqa: E402
from chained_tuning.train_loop import batch_order, make_optimizer, optimisation_step  # noqa: E402

WARMUP = 3


def ours(model, tok, encoded, order, cfg):
    opt, sched = make_optimizer(model, cfg["lr"], cfg)
    model.train()
    times, losses = [], []
    for gbatch in order:
        t0 = time.perf_counter()
        loss, _, _ = optimisation_step(model, opt, sched, encoded, gbatch, tok.pad_token_id, cfg)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return times, losses


def trainer(model, tok, encoded, order, cfg):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    class InOrder(Trainer):  # the same batches as finetune.py, in the same order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    data = [{"input_ids": encoded[i]["input_ids"], "labels": encoded[i]["labels"]} for b in order for i in b]
    timer = Timer()
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    opt, sched = make_optimizer(model, cfg["lr"], cfg)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=len(order), per_device_train_batch_size=cfg["batch_size"],
                                  max_grad_norm=cfg["max_grad_norm"], logging_steps=1, save_strategy="no",
                                  report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                                  seed=cfg["seed"])
        t = InOrder(model=model, args=targs, train_dataset=data, optimizers=(opt, sched),
                    data_collator=lambda items: collate(items, tok.pad_token_id), callbacks=[timer, Losses()])
        t.train()
    return timer.times, losses


def main(args):
    cfg = {**default_config(), "lr": args.lr, "steps": args.steps + WARMUP, "seed": 0}
    seed_everything(0)
    _, tok = load_model_and_tokenizer("tiny")
    data = load_task(args.task, "train")
    encoded = [encode_example(tok, ex, cfg["max_length"]) for ex in data.examples]
    order = batch_order(len(encoded), cfg["steps"], cfg["batch_size"], cfg["seed"])
    res = {}
    for name, fn in (("finetune.py", ours), ("transformers.Trainer", trainer)):
        model, _ = load_model_and_tokenizer("tiny")
        times, losses = fn(model, tok, encoded, order, cfg)
        res[name] = {"median_step_s": statistics.median(times[WARMUP:]), "mean_step_s": statistics.mean(times[WARMUP:]),
                     "losses": losses}
        print(f"{name:22s} median {res[name]['median_step_s'] * 1000:.1f} ms/step "
              f"(mean {res[name]['mean_step_s'] * 1000:.1f}) over {len(times) - WARMUP} steps", flush=True)
    a, b = res["finetune.py"], res["transformers.Trainer"]
    ratio = a["median_step_s"] / b["median_step_s"]
    loss_diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    print(f"time ratio finetune.py / Trainer: {ratio:.3f} (goal <= 1); max |loss diff| over steps {loss_diff:.2e}")
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "finetune_step.json"),
                      {"task": args.task, "batch_size": cfg["batch_size"], "steps": args.steps, "ratio": ratio,
                       "max_loss_diff": loss_diff, "threads": torch.get_num_threads(), "results": res})
    with open(os.path.join(out, "finetune_step.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["runner", "median_step_s", "mean_step_s"])
        for k, v in res.items():
            w.writerow([k, v["median_step_s"], v["mean_step_s"]])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arc")
    p.add_argument("--steps", type=int, default=30, help="measured steps (after 3 warm-up steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    main(p.parse_args())
