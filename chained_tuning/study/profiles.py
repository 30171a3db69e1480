"""The study's settings: each profile's defaults in one table (PROFILES), overridden by the environment
variables run_all.sh has always taken, all of them read here (settings()).

A profile is a row: the default of every variable it sets (the others default to COMMON's, or to
nothing), the note study.json gives on its learning rates, and what it cannot do without. A new
profile is a new row; nothing else needs to know about it.
"""
import shutil
import subprocess
import sys
from dataclasses import dataclass

from ..common import UserError
from ..hessian.errors import CurvatureError
from ..hessian.measure_names import parse_measure_args, parse_measures


class Settings(dict):
    """The study's variables by lower-case name (cfg.steps, cfg.lrs ...)."""
    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def _words(s):
    return s.split()


def _int(env, name, default):
    raw = env.get(name) or default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a whole number") from None


# Every profile variable: (NAME, attribute, how it is read). text: ${NAME:-default}; words: the same, split
# on spaces; list: ${NAME-default} split (set but empty means none: the chain lists); int: a whole number.
VARIABLES = (
    ("MODEL", "model", "text"), ("DATA_DIR", "data_dir", "text"), ("SEEDS", "seeds", "words"),
    ("LRS", "lrs", "words"), ("MAIN_LR", "main_lr", "text"), ("STEPS", "steps", "text"),
    ("EVAL_LIMIT", "eval_limit", "text"), ("VAL_LIMIT", "val_limit", "text"),
    ("CURV_SAMPLES", "curv_samples", "text"), ("FIRST_LR_CHAINS", "first_lr_chains", "list"),
    ("SECOND_LR_CHAINS", "second_lr_chains", "list"), ("EXTRA", "extra", "words"),
    ("JOBS", "jobs", "int"), ("GPUS_PER_STAGE", "gpus_per_stage", "int"),
    ("REPLAY_CHAINS", "replay_chains", "list"), ("MITIGATION_CHAINS", "mitigation_chains", "list"),
    ("CHAINS", "chains", "list"), ("KEEP_WEIGHTS", "keep_weights", "text"), ("REPLAY_BATCH", "replay_batch", "text"),
    ("REPLAY_FRACTIONS", "replay_fractions", "text"), ("REPLAY_STEPS", "replay_steps", "text"),
    ("MITIGATIONS", "mitigations", "list"), ("CAP", "cap", "words"), ("SAFE", "safe", "words"),
    ("RUNS", "runs", "text"), ("REDO", "redo", "text"), ("CURVATURE", "curvature", "text"),
    ("TEST_SET", "test_set", "text"), ("FIRST_STAGE", "first_stage", "text"), ("EXECUTOR", "executor", "text"),
    ("CURV_MEASURES", "curv_measures", "text"), ("METHOD", "method", "text"), ("LORA_R", "lora_r", "text"),
    ("LORA_ALPHA", "lora_alpha", "text"), ("LORA_TARGETS", "lora_targets", "text"), ("LORA_LRS", "lora_lrs", "words"),
    ("LORA_MAIN_LR", "lora_main_lr", "text"), ("CURV_MEASURE_ARGS", "curv_measure_args", "words"),
)
METHODS = ("full", "lora", "both")


@dataclass(frozen=True)
class Profile:
    defaults: dict                 # NAME -> its default; a callable (env, settings so far) -> the default
    lr_note: str                   # study.json's note on the learning rates ({eval_limit}: the one in force)
    required: tuple = ()           # variables it cannot do without ...
    required_hint: str = ""        # ... and the line that asks for them
    jobs_from_gpus: bool = False   # JOBS unset: as many stages side by side as the GPUs hold
    plan_gpus: int = 8             # the local pool a --dry_run plans for when no GPU is visible


# What every profile shares unless its row says otherwise
COMMON = {"JOBS": 1, "REPLAY_FRACTIONS": "0,0.01,0.05,0.1,0.2,0.4,0.6,0.8,1", "REPLAY_STEPS": "0,5,10,20,40,60,80,100",
          "MITIGATIONS": "mix0.05 l2_0.01 ewc_100", "CAP": "arc csqa csqa2", "SAFE": "toxigen bbq saferdialogues",
          "RUNS": lambda env, c: f"runs/{c.profile}", "CURVATURE": "best", "TEST_SET": "fraction",
          "FIRST_STAGE": "best", "EXECUTOR": "local", "CURV_MEASURES": "rho", "METHOD": "full", "LORA_R": "8"}

TINY = {"MODEL": "tiny", "EVAL_LIMIT": "200", "SEEDS": "0", "LRS": "1e-3 2e-3", "MAIN_LR": "1e-3", "STEPS": "100",
        "VAL_LIMIT": "100", "CURV_SAMPLES": "50", "FIRST_LR_CHAINS": "toxigen-arc",
        "SECOND_LR_CHAINS": "toxigen-arc arc-toxigen", "REPLAY_FRACTIONS": "0,0.01,0.05,1", "REPLAY_STEPS": "0,5,100",
        "JOBS": 2, "GPUS_PER_STAGE": 0, "REPLAY_CHAINS": "toxigen-arc", "MITIGATION_CHAINS": "toxigen-arc",
        "CHAINS": "toxigen-arc-csqa2", "KEEP_WEIGHTS": "all", "CURV_MEASURES": "rho,trace,density,topk,blocks",
        # every measure at a third of its default products: 4.5 minutes a first-stage minimum at the defaults
        "CURV_MEASURE_ARGS": "--trace_products 12 --slq_probes 2 --slq_steps 16 --topk 3"}

PAPER_CHAINS = "toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa bbq-csqa2"
PAPER_REPLAY_CHAINS = PAPER_CHAINS + " saferdialogues-arc saferdialogues-csqa saferdialogues-csqa2"
# The paper's study at 7B-8B (real data, 3 seeds, every chain), each of its rows for one kind of machine
PAPER = {"SEEDS": "0 1 2", "LRS": "1e-6 5e-6 1e-5 1.5e-5 2e-5", "MAIN_LR": "1e-5", "STEPS": "100", "CURV_SAMPLES": "50",
         "FIRST_LR_CHAINS": PAPER_CHAINS + " arc-toxigen",  # arc-toxigen: Figure 8a
         "SECOND_LR_CHAINS": PAPER_CHAINS + " arc-toxigen", "EXTRA": "--bf16",
         "REPLAY_CHAINS": PAPER_REPLAY_CHAINS, "MITIGATION_CHAINS": lambda env, c: " ".join(c.replay_chains),
         "CHAINS": "toxigen-arc-csqa2 arc-toxigen-csqa", "KEEP_WEIGHTS": "needed",
         # "batch size of 16, global batch size of 128" (section 3.3): REPLAY_BATCH=16 for a batch of 16
         "REPLAY_BATCH": "128",
         # tasks without official splits (ToxiGen, BBQ): the paper's test set is every example not used for
         # training or validation (tasks.py --test_set rest); the small profiles keep the seeded 30% split
         "TEST_SET": "rest"}

PROFILES = {
    "tiny": Profile(  # the synthetic tasks, the tiny Llama
        TINY, lr_note="learning rates scaled for the tiny model (the paper sweeps 1e-6..2e-5 around 1e-5 for "
                      "Llama-2-7B)"),
    "real-tiny": Profile(  # the real datasets, the tiny Llama
        dict(TINY, DATA_DIR="../shared/data", EVAL_LIMIT="300"),
        lr_note="learning rates scaled for the tiny model on the real datasets (paper: 1e-6..2e-5 for "
                "Llama-2-7B); evaluation on stratified subsets of {eval_limit} test examples per task"),
    "paper": Profile(  # Llama-2-7B on the real datasets, as the paper ran it
        dict(PAPER, GPUS_PER_STAGE=lambda env, c: _int(env, "NPROC", 8)),  # NPROC: what run_all.sh once took
        lr_note="the paper's learning rates",
        required=("MODEL", "DATA_DIR"), jobs_from_gpus=True,
        required_hint="PROFILE=paper: set MODEL to a Llama-2-7B checkpoint folder and DATA_DIR to the datasets "
                      "folder (e.g. MODEL=/models/Llama-2-7b-hf DATA_DIR=/data)"),
    "one-gpu": Profile(  # the paper's study with LoRA on one GPU: adapters on a bf16 base, one stage at a time
        dict(PAPER, METHOD="lora", LORA_R="16", LORA_ALPHA="32", LORA_LRS="5e-5 1e-4 2e-4 3e-4 5e-4",
             LORA_MAIN_LR="2e-4", GPUS_PER_STAGE="1", JOBS="1"),
        lr_note="LoRA learning rates around 2e-4 (the paper's 1e-6..2e-5 are for full fine-tuning); METHOD=both "
                "also runs full fine-tuning, which needs GPUS_PER_STAGE=4 or more at 7B",
        required=("MODEL", "DATA_DIR"), jobs_from_gpus=True, plan_gpus=1,
        required_hint="PROFILE=one-gpu: set MODEL to a 7B-8B checkpoint folder (Llama-2-7B, Llama-3-8B, ...) and "
                      "DATA_DIR to the datasets folder (e.g. MODEL=/models/Meta-Llama-3-8B DATA_DIR=/data)"),
}


def check_mitigations(specs):
    for m in specs:
        if m.startswith("mix"):
            try:
                f = float(m[3:])
            except ValueError:
                f = None
            if f is None or not 0 < f <= 1 or not all(c in "0123456789." for c in m[3:]):
                raise UserError(f"MITIGATIONS: '{m}' is not mix<F> with F a fraction in (0, 1] (a 5% share is mix0.05)")
        elif not (m.startswith("l2_") or m.startswith("ewc_")):
            raise UserError(f"MITIGATIONS: unknown '{m}'; use mix<F> (F in (0, 1]), l2_<LAMBDA> or ewc_<LAMBDA>")


def read_variables(env, c, profile):
    """Each of VARIABLES into c: the environment's value, else the profile's default, else COMMON's."""
    for name, attr, how in VARIABLES:
        default = profile.defaults.get(name, COMMON.get(name, ""))
        if callable(default):
            default = default(env, c)
        if how == "int":
            c[attr] = _int(env, name, default)
        elif how == "list":
            c[attr] = _words(env[name] if name in env else default)
        else:
            value = env.get(name) or default
            c[attr] = _words(value) if how == "words" else value


def check_choices(c):
    """The variables that take one of a few words, and the first stage's lr among the swept ones."""
    if c.redo not in ("", "changed"):
        raise UserError(f"REDO='{c.redo}' is not allowed; use REDO=changed (make again the stages whose output was "
                        "made with other settings) or leave it unset")
    if c.test_set not in ("fraction", "rest"):
        raise UserError(f"TEST_SET='{c.test_set}' is not allowed; use rest (every example not used for training or "
                        "validation: the paper's sizes) or fraction (a seeded 30% test set)")
    if c.first_stage not in ("best", "main"):
        raise UserError(f"FIRST_STAGE='{c.first_stage}' is not allowed; use best (each chain starts from the best "
                        "first-stage model on validation, section 3.1) or main (the one at MAIN_LR, Table 1's caption)")
    if c.first_stage == "main" and c.main_lr not in c.lrs:
        raise UserError(f"FIRST_STAGE=main needs MAIN_LR={c.main_lr} among LRS ({' '.join(c.lrs)})")
    if c.keep_weights not in ("all", "needed"):
        raise UserError(f"KEEP_WEIGHTS='{c.keep_weights}' is not allowed; use all or needed (drop the weights no "
                        "later stage reads, once evaluated)")
    if c.executor not in ("local", "slurm"):
        raise UserError(f"EXECUTOR='{c.executor}' is not allowed; use local (a pool on this machine) or slurm")
    try:  # curvature.py --measures, checked here so that a bad name fails before the first stage
        c.curv_measures = ",".join(parse_measures(c.curv_measures, "CURV_MEASURES", "="))
        parse_measure_args(c.curv_measure_args)
    except CurvatureError as e:
        raise UserError(str(e)) from None
    check_lora(c)
    for name in ("jobs",):
        if c[name] < 1:
            raise UserError(f"JOBS must be at least 1, got {c[name]}")
    if c.gpus_per_stage < 0:
        raise UserError(f"GPUS_PER_STAGE must be >= 0, got {c.gpus_per_stage}")


def _positive(value):
    try:
        return float(value) > 0
    except ValueError:
        return False


def check_lora(c):
    """METHOD and the LoRA variables: checked here, before the first stage, as finetune.py would check them."""
    if c.method not in METHODS:
        raise UserError(f"METHOD='{c.method}' is not allowed; use full (full fine-tuning), lora (LoRA stages through "
                        "PEFT) or both (the study twice, $RUNS/full and $RUNS/lora, and their comparison)")
    if not (c.lora_r.isdigit() and int(c.lora_r) >= 1):
        raise UserError(f"LORA_R={c.lora_r!r} is not a whole number >= 1 (the LoRA rank, e.g. LORA_R=16)")
    if c.lora_alpha and not _positive(c.lora_alpha):
        raise UserError(f"LORA_ALPHA={c.lora_alpha!r} is not a number > 0 (unset: twice LORA_R)")
    for v in c.lora_lrs + ([c.lora_main_lr] if c.lora_main_lr else []):
        if not _positive(v):
            raise UserError(f"LORA_LRS / LORA_MAIN_LR: {v!r} is not a learning rate > 0")
    if c.lora_lrs and not c.lora_main_lr:
        raise UserError("LORA_LRS is set but LORA_MAIN_LR is not: give the LoRA chains' learning rate too")
    if c.lora_main_lr and c.first_stage == "main" and c.lora_main_lr not in (c.lora_lrs or c.lrs):
        raise UserError(f"FIRST_STAGE=main needs LORA_MAIN_LR={c.lora_main_lr} among LORA_LRS "
                        f"({' '.join(c.lora_lrs or c.lrs)})")


def method_settings(c):
    """[(method, its settings)]: METHOD=full or lora, the study itself in $RUNS; both, the two studies in
    $RUNS/full and $RUNS/lora. A LoRA study trains every stage as a LoRA adapter (finetune.py --lora_r ...; a stage
    after another merges it first, --lora_chain merge) at LORA_LRS / LORA_MAIN_LR (default LRS / MAIN_LR)."""
    out = []
    for m in (("full", "lora") if c.method == "both" else (c.method,)):
        cm = Settings(c)
        cm.method, cm.lora_args = m, []
        if c.method == "both":
            cm.runs = f"{c.runs}/{m}"
        if m == "lora":
            cm.lrs, cm.main_lr = c.lora_lrs or c.lrs, c.lora_main_lr or c.main_lr
            cm.lora_args = ["--lora_r", c.lora_r, "--lora_alpha", c.lora_alpha or str(2 * int(c.lora_r))] + (
                ["--lora_targets", c.lora_targets] if c.lora_targets else [])
        out.append((m, cm))
    return out


def read_devices(env, c, profile):
    """The GPUs of the local pool (GPUS, else CUDA_VISIBLE_DEVICES, else nvidia-smi's) and the stages side by
    side on them."""
    c.eval_gpus = _int(env, "EVAL_GPUS", c.gpus_per_stage)
    c.gpus = [x for x in (env.get("GPUS") or env.get("CUDA_VISIBLE_DEVICES", "")).replace(",", " ").split() if x]
    if not c.gpus and c.gpus_per_stage and c.executor == "local" and "GPUS" not in env:
        c.gpus = visible_gpus()
    if c.gpus and len(c.gpus) == 1 and c.gpus[0].isdigit() and "GPUS" in env and "," not in env["GPUS"]:
        c.gpus = [str(i) for i in range(int(c.gpus[0]))]  # GPUS=8: the devices 0..7
    if profile.jobs_from_gpus and not env.get("JOBS") and c.gpus and c.gpus_per_stage:
        c.jobs = max(1, len(c.gpus) // c.gpus_per_stage)  # 8 GPUs, 4 a stage: two stages side by side


def read_slurm(env):
    g = lambda name, default="": env.get(name) or default  # noqa: E731  ${NAME:-default}
    return Settings(partition=g("SLURM_PARTITION"), account=g("SLURM_ACCOUNT"),
                    time_min=_int(env, "SLURM_TIME", 240),
                    gpus_per_node=_int(env, "SLURM_GPUS_PER_NODE", 8), cpus=_int(env, "SLURM_CPUS_PER_STAGE", 10),
                    extra=g("SLURM_EXTRA"), cluster=g("SLURM_CLUSTER", "slurm"),
                    nodes=_int(env, "SLURM_NODES", 4), poll_s=float(g("SLURM_POLL_S", "30")))


def settings(env, profile=None):
    """The profile's defaults overridden by the environment, exactly as run_all.sh always read them
    (NAME unset or empty -> default, except the chain lists, where an empty value means none)."""
    name = env.get("PROFILE") or profile or "tiny"
    if name not in PROFILES:
        raise UserError(f"unknown PROFILE '{name}'; use {', '.join(PROFILES)}")
    row = PROFILES[name]
    if any(not env.get(v) for v in row.required):
        raise UserError(row.required_hint)
    c = Settings(profile=name)
    read_variables(env, c, row)
    c.lr_note = row.lr_note.format(eval_limit=c.eval_limit)
    check_mitigations(c.mitigations)
    check_choices(c)
    read_devices(env, c, row)
    c.py = env.get("PY") or sys.executable
    c.slurm = read_slurm(env)
    c.sd_args = _words(env.get("SD_EVAL_ARGS") or "")  # e.g. "--classifier PATH --max_new_tokens 64" for evaluate.py
    c.lora_args = []
    if c.method != "both":  # one method: the study itself (METHOD=both: study.py runs method_settings' two)
        c.update(method_settings(c)[0][1])
    return c


def visible_gpus():
    """This machine's GPU indices (nvidia-smi), [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []
