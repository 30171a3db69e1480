"""A fine-tuning stage's settings, in one place: every key of the `cfg` dict train_stage takes (and run.json
records as "config"), its default, the rule each numeric one must meet, which of them name the run (the run_id)
and the learning rate a stage takes when --lr is unset. finetune.py's flags are these keys; replay.py and the
study pass dicts of them.

    from chained_tuning.stage_config import default_config, config_for_id
    cfg = {**default_config(), "task": "arc", "out": "runs/arc"}      # what train_stage fills in
"""
from .common import AT_LEAST_1, NON_NEGATIVE, POSITIVE, DEFAULT_TIMEOUT_MIN, in_range
from .data.tasks import DATA_DEFAULTS, PAPER_TRAIN_SIZE
from .data.tiny_base import TINY_LR

PAPER_LR = 1e-5

# The paper's recipe, and where and how it runs. The key order is run.json's "config" order: never reorder.
RECIPE_DEFAULTS = dict(model="tiny", task=None, out=None, data_dir=None, train_size=PAPER_TRAIN_SIZE, lr=None,
                       steps=100, batch_size=16, micro_batch_size=None, max_length=2048, weight_decay=0.1,
                       beta1=0.9, beta2=0.95, eps=1e-8, max_grad_norm=1.0, seed=0, bf16=False,
                       gradient_checkpointing="auto", save_dtype="auto", dist_timeout_min=DEFAULT_TIMEOUT_MIN,
                       device=None, overwrite=False)

# LoRA (lora.py): unset lora_r is a full fine-tuning stage. lora_alpha unset: PEFT's LoraConfig default (8);
# lora_targets unset: every linear layer but the output head (lora.ALL_LINEAR); lora_chain: how a stage starts
# from a LoRA stage's adapter folder (merge or continue, lora.CHAIN_MODES); lora_base_4bit: the frozen base
# quantised to NF4 by bitsandbytes (QLoRA; one CUDA GPU).
LORA_DEFAULTS = dict(lora_r=None, lora_alpha=None, lora_dropout=0.0, lora_targets=None, lora_chain=None,
                     lora_base_4bit=False)

# Options added after the recipe: they enter the run_id only when they change the result (see config_for_id).
OPTION_DEFAULTS = dict(train_fraction=None, replay_task=None, replay_fraction=0.0, l2_to_init=0.0, ewc=0.0,
                       ewc_task=None, ewc_samples=200, **DATA_DEFAULTS, **LORA_DEFAULTS)

# Evaluation after training (--eval_tasks ...): evaluate.py's work on the saved folder, in this process.
EVAL_DEFAULTS = dict(eval_tasks=None, eval_limit=None, eval_val_tasks=None, eval_val_limit=None, classifier=None,
                     max_new_tokens=64)


def default_config():
    return {**RECIPE_DEFAULTS, **OPTION_DEFAULTS, **EVAL_DEFAULTS}


# Every numeric option and what it allows (checked before anything is loaded; None: unset, allowed). The order
# is the order of the checks: the first value that breaks its rule is the one refused.
NUMERIC_RULES = {
    "lr": POSITIVE, "steps": (AT_LEAST_1[0], "at least 1 (replay.py evaluates 0 steps without training)"),
    "batch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_1, "train_size": AT_LEAST_1, "max_length": AT_LEAST_1,
    "weight_decay": NON_NEGATIVE, "beta1": in_range(0, 1, open_hi=True), "beta2": in_range(0, 1, open_hi=True),
    "eps": POSITIVE, "max_grad_norm": NON_NEGATIVE, "seed": NON_NEGATIVE,
    "train_fraction": in_range(0, 1, open_lo=True), "replay_fraction": in_range(0, 1), "l2_to_init": NON_NEGATIVE,
    "ewc": NON_NEGATIVE, "ewc_samples": AT_LEAST_1, "eval_limit": AT_LEAST_1, "eval_val_limit": AT_LEAST_1,
    "dist_timeout_min": POSITIVE, "max_new_tokens": AT_LEAST_1, "lora_r": AT_LEAST_1, "lora_alpha": POSITIVE,
    "lora_dropout": in_range(0, 1, open_hi=True)}
SAVE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
CHECKPOINTING = ("auto", "on", "off")

# Settings that do not change the result (where and how it is computed): never part of the run_id.
NOT_IN_ID = ("out", "out_name", "overwrite", "device", "micro_batch_size", "gradient_checkpointing", "save_dtype",
             "dist_timeout_min", *EVAL_DEFAULTS)


def active_options(cfg):
    """{added option: whether it is on}: an option that is off stays out of the run_id, so runs that do not use
    it keep the ids they had before it existed."""
    return {"train_fraction": cfg.get("train_fraction") is not None,
            "replay_task": bool(cfg.get("replay_fraction")), "replay_fraction": bool(cfg.get("replay_fraction")),
            "l2_to_init": bool(cfg.get("l2_to_init")), "ewc": bool(cfg.get("ewc")),
            "ewc_task": bool(cfg.get("ewc")), "ewc_samples": bool(cfg.get("ewc")),
            **{k: cfg.get(k, v) != v for k, v in DATA_DEFAULTS.items()},
            **{k: cfg.get("lora_r") is not None for k in LORA_DEFAULTS}}


def config_for_id(cfg):
    """The settings the run_id hashes: everything that can change the result. Where and how it is computed
    stays out, and so does every added option while it is off (runs that do not use them keep their ids)."""
    skip = set(NOT_IN_ID) | {k for k, on in active_options(cfg).items() if not on}
    return {k: v for k, v in cfg.items() if k not in skip}


def resolve_lr(cfg, meta):
    """(the stage's peak learning rate, why it is that one): --lr, else the tiny base's own, else the paper's."""
    if cfg["lr"] is not None:
        return cfg["lr"], "given with --lr"
    if meta.get("tiny"):
        return TINY_LR, (f"tiny-model default {TINY_LR:g} (the paper's {PAPER_LR:g} is for a pretrained 7B model; "
                         f"pass --lr to override)")
    return PAPER_LR, f"paper default {PAPER_LR:g}"
