"""The embedded default base model: a tiny Llama (transformers.LlamaForCausalLM, 1.2M parameters)
with a byte-level BPE tokenizer trained on the synthetic task text, given a short language-model
pretraining on unlabelled text so it is not pure noise when it is tuned. Built once, then cached.

    python -m chained_tuning.data.tiny_base            # build (about a minute on 2 cores) or show the cached one
    python -m chained_tuning.data.tiny_base --rebuild

Needs synthetic.py beside it (docs/testing.md, docs/data.md). Anything that takes a model path takes "tiny"
for this base. The cache folder is $CHAINED_TUNING_CACHE (default ~/.cache/chained_tuning)/tiny-base-<key>; the
key hashes this file's recipe (TINY_CONFIG, PRETRAIN, TOKENIZER), VERSION and the tiny-base seed, not the text it
is built from, so a change to the recipe builds a new base. $CHAINED_TUNING_TINY_SEED (default 0) pretrains the
base from another initialisation and batch order on the same text and tokenizer: the test suite run under seeds
1 and 2 shows which tests hang on what one pretraining happens to have learned (docs/testing.md). Bump VERSION
when the build code or the text changes on purpose (synthetic.py's word lists, generators, templates,
pretraining corpus): tests/test_tasks.py pins the text's hash to VERSION and fails until you do.
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

from ..data import synthetic

TINY_CONFIG = dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False)
PRETRAIN = dict(seed=0, sentences=20000, steps=250, batch_size=16, seq_len=128, lr=3e-3, weight_decay=0.1)
# The paper's 1e-5 is for a pretrained 7B model; the tiny base learns its tasks in 100 steps at this rate.
TINY_LR = 1e-3
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
TOKENIZER = dict(special_tokens=SPECIAL, min_frequency=2, add_prefix_space=False, single="<s> $A",
                 pair="<s> $A $B")  # byte-level BPE; its vocab_size is TINY_CONFIG's
VERSION = 1  # bump when the text the base is built from, or the build code, changes on purpose


def tiny_seed():
    """$CHAINED_TUNING_TINY_SEED as a whole number >= 0 (default 0, the base every result so far was made with)."""
    raw = os.environ.get("CHAINED_TUNING_TINY_SEED", "0").strip() or "0"
    if not raw.isdigit():
        # A setting of the environment, read wherever the base is needed: the process stops as a bad flag does
        # (one `error:` line, exit 2; the tiny base imports nothing of the project that holds UserError).
        print(f"error: CHAINED_TUNING_TINY_SEED={raw!r}: must be a whole number >= 0 (unset it for the default 0)",
              file=sys.stderr)
        raise SystemExit(2)
    return int(raw)


def settings_hash():
    """The cache key: a hash of the recipe, VERSION and the tiny-base seed (not of the text, see the module
    docstring). Seed 0 leaves the key as it was before the seed existed, so cached bases stay valid."""
    recipe = {"config": TINY_CONFIG, "pretrain": PRETRAIN, "tokenizer": TOKENIZER, "version": VERSION}
    if tiny_seed():
        recipe["tiny_seed"] = tiny_seed()
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def cache_root():
    return os.environ.get("CHAINED_TUNING_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "chained_tuning"))


def tiny_base_path():
    return os.path.join(cache_root(), f"tiny-base-{settings_hash()}")


def train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte level: any text (the real datasets too) encodes without unknown tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=TOKENIZER["add_prefix_space"])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_CONFIG["vocab_size"], special_tokens=TOKENIZER["special_tokens"],
                                  min_frequency=TOKENIZER["min_frequency"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=TOKENIZER["single"], pair=TOKENIZER["pair"],
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=TINY_CONFIG["max_position_embeddings"])


def tokenizer_texts():
    """Every synthetic prompt and answer, plus the pretraining text, in a fixed order."""
    texts = []
    for t in synthetic.SYNTHETIC_TASKS:
        splits, _ = synthetic.synthetic_task(t)
        for split in ("train", "validation", "test"):
            for ex in splits[split]:
                texts.append(ex.prompt + " " + " ".join(ex.options))
    return texts + synthetic.pretraining_corpus(PRETRAIN["sentences"], PRETRAIN["seed"])


def pretrain(model, tok, log):
    """Short causal-LM pretraining on packed unlabelled text (no task instructions, no QA)."""
    import torch
    p = PRETRAIN
    ids = []
    for line in synthetic.pretraining_corpus(p["sentences"], p["seed"]):
        ids.extend(tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    n_seq = len(ids) // p["seq_len"]
    data = torch.tensor(ids[:n_seq * p["seq_len"]]).view(n_seq, p["seq_len"])
    g = torch.Generator().manual_seed(p["seed"] + tiny_seed())
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=p["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / p["steps"]))
    model.train()
    for step in range(p["steps"]):
        batch = data[torch.randint(0, n_seq, (p["batch_size"],), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append({"step": step, "loss": loss.item()})
        if step % 50 == 0 or step == p["steps"] - 1:
            print(f"  tiny base pretraining step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()


def build_tiny_base(out_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    t0 = time.time()
    torch.manual_seed(PRETRAIN["seed"] + tiny_seed())  # the tokenizer and text stay; init and batch order move
    tok = train_tokenizer(tokenizer_texts())
    # The BPE trainer stops merging before vocab_size on this small corpus: size the embedding to it.
    cfg = LlamaConfig(**{**TINY_CONFIG, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"building the tiny base: {n_params / 1e6:.2f}M parameters, vocabulary {len(tok)} -> {out_dir}", flush=True)
    log = []
    pretrain(model, tok, log)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    meta = {"base": "tiny", "tiny": True, "chain": [], "run_id": f"tiny-base-{settings_hash()}",
            "n_params": n_params, "config": TINY_CONFIG, "pretrain": PRETRAIN,
            "pretrain_final_loss": log[-1]["loss"], "build_seconds": round(time.time() - t0, 1),
            "finetune_lr_default": TINY_LR}
    if tiny_seed():
        meta["tiny_seed"] = tiny_seed()
    with open(os.path.join(out_dir, "chained_tuning.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(out_dir, "pretrain_log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    print(f"tiny base built in {time.time() - t0:.0f}s (final pretraining loss {log[-1]['loss']:.3f})", flush=True)


def ensure_tiny_base(rebuild=False):
    """Path of the cached tiny base, building it first if needed (one builder at a time)."""
    path = tiny_base_path()
    os.makedirs(cache_root(), exist_ok=True)
    with open(os.path.join(cache_root(), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild and os.path.isdir(path):
            shutil.rmtree(path)
        if not os.path.isfile(os.path.join(path, "chained_tuning.json")):
            tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".tmp-tiny-")
            try:
                build_tiny_base(tmp)
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(path)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rebuild", action="store_true", help="build again even if cached")
    args = p.parse_args()
    path = ensure_tiny_base(args.rebuild)
    with open(os.path.join(path, "chained_tuning.json")) as f:
        meta = json.load(f)
    print(f"tiny base: {path}\n  {meta['n_params'] / 1e6:.2f}M parameters, pretraining loss "
          f"{meta['pretrain_final_loss']:.3f}, built in {meta['build_seconds']}s")
