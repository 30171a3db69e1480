"""The chained-tuning study as a job graph: every stage (its command, the folders it reads, the output
that marks it complete, the GPUs it needs, the stages it waits for), run by a local pool or on Slurm.

    bash run_all.sh                                   # what this runs for you (prepares .venv first)
    python study.py                                   # profile tiny (PROFILE=... or the first argument)
    python study.py --dry_run                         # the plan -> $RUNS/plan.json; nothing trained or loaded
    python study.py --status                          # the graph and each stage's state
    PROFILE=paper MODEL=/models/Llama-2-7b-hf DATA_DIR=/data GPUS_PER_STAGE=4 python study.py
    PROFILE=paper MODEL=... DATA_DIR=... EXECUTOR=slurm SLURM_PARTITION=gpu SLURM_TIME=240 python study.py

Every setting is an environment variable, as run_all.sh has always taken them (README: "The study").
A stage whose output exists is done (outputs appear only once complete) when it was made with the
settings asked for now (stage_check.py); otherwise the study stops with exit code 2 naming the stage,
the setting and both values, unless REDO=changed. The first-stage model a chain starts from is a node
of the graph, decided once its sweep's validation results exist, by metrics.choose_first_stage.
"""
import argparse
import glob
import heapq
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from chained_tuning.study import stage_check
from chained_tuning.study.cost_model import CURVATURE_MAX_HVPS
from chained_tuning.common import UserError, die_on_user_error, write_json_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))
PROFILES = ("tiny", "real-tiny", "paper")
KINDS = ("first_stage", "evaluate", "choice", "chain", "replay", "mitigation", "longchain", "curvature", "taylor",
         "summary")
TRAINING = ("first_stage", "chain", "mitigation", "longchain", "replay")
STOP_HINT = ("choose one: another RUNS folder for these settings (RUNS=runs/<new> bash run_all.sh); the settings "
             "those outputs were made with; or REDO=changed to make those stages again in {runs} (the stages "
             "built on them follow). study.json and the results were left as they were.")


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- settings ---------------------------------------------------------------------------------------------

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


def settings(env, profile=None):
    """The profile's defaults overridden by the environment, exactly as run_all.sh always read them
    (NAME unset or empty -> default, except the chain lists, where an empty value means none)."""
    profile = env.get("PROFILE") or profile or "tiny"
    g = lambda name, default="": env.get(name) or default  # noqa: E731  ${NAME:-default}
    s = lambda name, default: env[name] if name in env else default  # noqa: E731  ${NAME-default}
    c = Settings(profile=profile)
    if profile in ("tiny", "real-tiny"):
        if profile == "tiny":
            c.data_dir, c.eval_limit = g("DATA_DIR"), g("EVAL_LIMIT", "200")
            c.lr_note = ("learning rates scaled for the tiny model (the paper sweeps 1e-6..2e-5 around 1e-5 for "
                         "Llama-2-7B)")
        else:
            c.data_dir, c.eval_limit = g("DATA_DIR", "../shared/data"), g("EVAL_LIMIT", "300")
            c.lr_note = ("learning rates scaled for the tiny model on the real datasets (paper: 1e-6..2e-5 for "
                         f"Llama-2-7B); evaluation on stratified subsets of {c.eval_limit} test examples per task")
        c.model, c.seeds = g("MODEL", "tiny"), _words(g("SEEDS", "0"))
        c.lrs, c.main_lr, c.steps = _words(g("LRS", "1e-3 2e-3")), g("MAIN_LR", "1e-3"), g("STEPS", "100")
        c.val_limit, c.curv_samples = g("VAL_LIMIT", "100"), g("CURV_SAMPLES", "50")
        c.first_lr_chains = _words(s("FIRST_LR_CHAINS", "toxigen-arc"))
        c.second_lr_chains = _words(s("SECOND_LR_CHAINS", "toxigen-arc arc-toxigen"))
        c.replay_fractions, c.replay_steps = g("REPLAY_FRACTIONS", "0,0.01,0.05,1"), g("REPLAY_STEPS", "0,5,100")
        c.extra, c.jobs, c.gpus_per_stage = _words(g("EXTRA")), _int(env, "JOBS", 2), _int(env, "GPUS_PER_STAGE", 0)
        c.replay_chains = _words(s("REPLAY_CHAINS", "toxigen-arc"))
        c.mitigation_chains = _words(s("MITIGATION_CHAINS", "toxigen-arc"))
        c.chains = _words(s("CHAINS", "toxigen-arc-csqa2"))
        c.keep_weights, c.replay_batch = g("KEEP_WEIGHTS", "all"), g("REPLAY_BATCH")
    elif profile == "paper":
        c.model, c.data_dir = g("MODEL"), g("DATA_DIR")
        if not c.model or not c.data_dir:
            raise UserError("PROFILE=paper: set MODEL to a Llama-2-7B checkpoint folder and DATA_DIR to the datasets "
                            "folder (e.g. MODEL=/models/Llama-2-7b-hf DATA_DIR=/data)")
        c.seeds, c.lrs = _words(g("SEEDS", "0 1 2")), _words(g("LRS", "1e-6 5e-6 1e-5 1.5e-5 2e-5"))
        c.main_lr, c.steps = g("MAIN_LR", "1e-5"), g("STEPS", "100")
        c.eval_limit, c.val_limit = g("EVAL_LIMIT"), g("VAL_LIMIT")
        c.curv_samples = g("CURV_SAMPLES", "50")
        c.first_lr_chains = _words(s("FIRST_LR_CHAINS", "toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa "
                                                        "bbq-csqa2 arc-toxigen"))  # arc-toxigen: Figure 8a
        c.second_lr_chains = _words(s("SECOND_LR_CHAINS", "toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa "
                                                          "bbq-csqa2 arc-toxigen"))
        c.extra = _words(g("EXTRA", "--bf16"))
        c.gpus_per_stage = _int(env, "GPUS_PER_STAGE", _int(env, "NPROC", 8))
        c.jobs = _int(env, "JOBS", 1)  # raised below to what the GPUs hold when GPUS is known
        c.replay_chains = _words(s("REPLAY_CHAINS", "toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa bbq-csqa2 "
                                                    "saferdialogues-arc saferdialogues-csqa saferdialogues-csqa2"))
        c.mitigation_chains = _words(s("MITIGATION_CHAINS", " ".join(c.replay_chains)))
        c.chains = _words(s("CHAINS", "toxigen-arc-csqa2 arc-toxigen-csqa"))
        c.lr_note = "the paper's learning rates"
        # "batch size of 16, global batch size of 128" (section 3.3): REPLAY_BATCH=16 for a batch of 16
        c.keep_weights, c.replay_batch = g("KEEP_WEIGHTS", "needed"), g("REPLAY_BATCH", "128")
    else:
        raise UserError(f"unknown PROFILE '{profile}'; use tiny, real-tiny or paper")
    c.replay_fractions = g("REPLAY_FRACTIONS", c.get("replay_fractions") or "0,0.01,0.05,0.1,0.2,0.4,0.6,0.8,1")
    c.replay_steps = g("REPLAY_STEPS", c.get("replay_steps") or "0,5,10,20,40,60,80,100")
    c.mitigations = _words(s("MITIGATIONS", "mix0.05 l2_0.01 ewc_100"))
    check_mitigations(c.mitigations)
    c.cap, c.safe = _words(g("CAP", "arc csqa csqa2")), _words(g("SAFE", "toxigen bbq saferdialogues"))
    c.runs, c.redo, c.curvature = g("RUNS", f"runs/{profile}"), g("REDO"), g("CURVATURE", "best")
    if c.redo not in ("", "changed"):
        raise UserError(f"REDO='{c.redo}' is not allowed; use REDO=changed (make again the stages whose output was "
                        "made with other settings) or leave it unset")
    # tasks without official splits (ToxiGen, BBQ): the paper's test set is every example not used for training
    # or validation (tasks.py --test_set rest); the small profiles keep the seeded 30% split
    c.test_set = g("TEST_SET", "rest" if profile == "paper" else "fraction")
    if c.test_set not in ("fraction", "rest"):
        raise UserError(f"TEST_SET='{c.test_set}' is not allowed; use rest (every example not used for training or "
                        "validation: the paper's sizes) or fraction (a seeded 30% test set)")
    c.first_stage = g("FIRST_STAGE", "best")
    if c.first_stage not in ("best", "main"):
        raise UserError(f"FIRST_STAGE='{c.first_stage}' is not allowed; use best (each chain starts from the best "
                        "first-stage model on validation, section 3.1) or main (the one at MAIN_LR, Table 1's caption)")
    if c.first_stage == "main" and c.main_lr not in c.lrs:
        raise UserError(f"FIRST_STAGE=main needs MAIN_LR={c.main_lr} among LRS ({' '.join(c.lrs)})")
    if c.keep_weights not in ("all", "needed"):
        raise UserError(f"KEEP_WEIGHTS='{c.keep_weights}' is not allowed; use all or needed (drop the weights no "
                        "later stage reads, once evaluated)")
    c.executor = g("EXECUTOR", "local")
    if c.executor not in ("local", "slurm"):
        raise UserError(f"EXECUTOR='{c.executor}' is not allowed; use local (a pool on this machine) or slurm")
    for name in ("jobs",):
        if c[name] < 1:
            raise UserError(f"JOBS must be at least 1, got {c[name]}")
    if c.gpus_per_stage < 0:
        raise UserError(f"GPUS_PER_STAGE must be >= 0, got {c.gpus_per_stage}")
    c.eval_gpus = _int(env, "EVAL_GPUS", c.gpus_per_stage)
    c.gpus = [x for x in g("GPUS", env.get("CUDA_VISIBLE_DEVICES", "")).replace(",", " ").split() if x]
    if not c.gpus and c.gpus_per_stage and c.executor == "local" and "GPUS" not in env:
        c.gpus = visible_gpus()
    if c.gpus and len(c.gpus) == 1 and c.gpus[0].isdigit() and "GPUS" in env and "," not in env["GPUS"]:
        c.gpus = [str(i) for i in range(int(c.gpus[0]))]  # GPUS=8: the devices 0..7
    if profile == "paper" and not env.get("JOBS") and c.gpus and c.gpus_per_stage:
        c.jobs = max(1, len(c.gpus) // c.gpus_per_stage)  # 8 GPUs, 4 a stage: two stages side by side
    c.py = env.get("PY") or sys.executable
    c.slurm = Settings(partition=g("SLURM_PARTITION"), account=g("SLURM_ACCOUNT"),
                       time_min=_int(env, "SLURM_TIME", 240),
                       gpus_per_node=_int(env, "SLURM_GPUS_PER_NODE", 8), cpus=_int(env, "SLURM_CPUS_PER_STAGE", 10),
                       extra=g("SLURM_EXTRA"), cluster=g("SLURM_CLUSTER", "slurm"),
                       nodes=_int(env, "SLURM_NODES", 4), poll_s=float(g("SLURM_POLL_S", "30")))
    c.sd_args = _words(g("SD_EVAL_ARGS"))  # e.g. "--classifier PATH --max_new_tokens 64" for evaluate.py
    return c


def visible_gpus():
    """This machine's GPU indices (nvidia-smi), [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


def split_chain(ab):
    """A-B -> (A, B) as run_all.sh split it (${ab%-*}, ${ab#*-})."""
    return ab.rsplit("-", 1)[0], ab.split("-", 1)[1]


def data_args(c):
    """The data options every stage script takes alike (the test set is what the training sample leaves)."""
    return (["--data_dir", c.data_dir] if c.data_dir else []) + (["--test_set", c.test_set]
                                                                  if c.test_set != "fraction" else [])


# --- the graph --------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    kind: str
    out: str                       # its existence marks the stage complete
    cmd: list = None               # None: decided in the driver (a choice) or skipped (skip set)
    after: list = field(default_factory=list)
    reads: list = field(default_factory=list)   # model folders whose weights it reads
    gpus: int = 0
    folder: str = None             # removed on REDO (a replay sweep's folder); default: out
    also: list = field(default_factory=list)    # files removed on REDO (Taylor checks written into chains)
    touch: bool = False            # out is a marker written once cmd succeeds
    skip: tuple = None             # (line to say or None, name for failed.txt): an input is missing
    evals: list = field(default_factory=list)   # the eval files of a training stage's folder
    cost: dict = field(default_factory=dict)    # what the plan needs: task(s), steps, samples
    pending_choice: bool = False   # planned with the main lr standing in for a choice not made yet


class Graph:
    """The stages in the order run_all.sh started them, with the lookups the builder needs."""

    def __init__(self):
        self.stages, self.by_out = {}, {}

    def add(self, st):
        if st.out in self.by_out and st.skip is None:  # a sweep point that is a main chain runs once
            return self.by_out[st.out]
        self.stages.setdefault(st.name, st)
        if st.skip is None:
            self.by_out[st.out] = st
        return st

    def node_of(self, out):
        st = self.by_out.get(out)
        return [st.name] if st else []


def launcher(c, gpus):
    if gpus > 0 and c.profile == "paper":
        return [c.py, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
    return [c.py]


def lr_of(folder):
    return os.path.basename(os.path.dirname(folder))[2:]


class Builder:
    """Builds the graph from the settings, the stages finished in this run and what the runs folder holds;
    called again after every stage, so each choice and each conditional stage (an evaluation a folder
    lacks, a Taylor check a resumed study still needs) appears as soon as it can be decided."""

    def __init__(self, c, finished, plan=False):
        self.c, self.finished, self.plan, self.g = c, finished, plan, Graph()
        self.r = c.runs
        self.best, self.choice_note = {}, {}

    # helpers
    def failed(self, name):
        return self.finished.get(name) in ("failed", "skipped")

    def is_finished(self, names):
        """In a plan (nothing runs), a stage whose output exists counts as finished."""
        return all(n in self.finished or self.plan and n in self.g.stages and (
            self.g.stages[n].cmd is None or os.path.exists(self.g.stages[n].out)) for n in names)

    def s1_dir(self, t, lr, s):
        return f"{self.r}/stage1/{t}/lr{lr}/seed{s}"

    def chain_dir(self, a, b, parent, lrb, s):
        return f"{self.r}/stage2/{a}-{b}/lrA{lr_of(parent)}_lrB{lrb}/seed{s}"

    def main_chain_dir(self, a, b, s):
        p = self.best.get((a, s))
        return self.chain_dir(a, b, p, self.c.main_lr, s) if p else None

    def finetune(self, kind, name, parent, task, lr, s, out, eval_tasks, extra=(), val=False, after=(), cost=None):
        c = self.c
        cmd = launcher(c, c.gpus_per_stage) + [
            "finetune.py", "--model", parent, "--task", task, "--lr", lr, "--seed", s, "--steps", c.steps,
            "--out", out, *data_args(c), *c.extra, *extra]
        if val:
            cmd += ["--eval_val_tasks", task] + (["--eval_val_limit", c.val_limit] if c.val_limit else [])
        cmd += ["--eval_tasks", eval_tasks] + (["--eval_limit", c.eval_limit] if c.eval_limit else [])
        evals = [f"{out}/eval.json"] + ([f"{out}/eval_val.json"] if val else [])
        reads = [parent] if parent.startswith(self.r) else []
        st = self.g.add(Stage(name, kind, out, cmd, list(after), reads, c.gpus_per_stage, evals=evals,
                              cost=dict(cost or {}, train=task, steps=int(c.steps), eval=eval_tasks.split(","),
                                        val=[task] if val else [])))
        if st.name != name:
            return [st.name]
        names = [name]
        # a folder without its evaluation (an interrupted or older study): evaluate.py does the rest
        if os.path.isdir(out) and name not in self.finished or self.finished.get(name) == "done":
            if not os.path.exists(f"{out}/eval.json"):
                names.append(self.evaluate(f"eval-{name}", out, eval_tasks, f"{out}/eval.json", self.eval_limit(),
                                           [name]))
            if val and not os.path.exists(f"{out}/eval_val.json"):
                val_args = ["--split", "validation"] + (["--limit", c.val_limit] if c.val_limit else [])
                names.append(self.evaluate(f"evalval-{name}", out, task, f"{out}/eval_val.json", val_args,
                                           names[-1:]))
        return names

    def eval_limit(self):
        return ["--limit", self.c.eval_limit] if self.c.eval_limit else []

    def evaluate(self, name, model_dir, tasks, out, extra, after):
        c = self.c
        sd = c.sd_args if "saferdialogues" in tasks.split(",") else []
        cmd = launcher(c, c.eval_gpus) + ["evaluate.py", "--model", model_dir, "--tasks", tasks, "--out", out,
                                          *data_args(c), *extra, *sd]
        if any(self.failed(a) for a in after):
            self.g.add(Stage(name, "evaluate", out, skip=(None, None), after=list(after)))
        else:
            self.g.add(Stage(name, "evaluate", out, cmd, list(after), [model_dir], c.eval_gpus,
                             cost={"eval": tasks.split(",") if "validation" not in extra else [],
                                   "val": tasks.split(",") if "validation" in extra else []}))
        return name

    def skip(self, name, kind, say_line, failed_name, after=()):
        self.g.add(Stage(f"skip-{name}", kind, f"(skipped) {name}", skip=(say_line, failed_name), after=list(after)))

    # the steps
    def build(self):
        c = self.c
        tasks = c.cap + c.safe
        for t in tasks:  # 1. first-stage models
            for lr in c.lrs:
                for s in c.seeds:
                    d = self.s1_dir(t, lr, s)
                    self.finetune("first_stage", f"stage1-{t}-lr{lr}-seed{s}", c.model, t, lr, s, d, t, val=True)
        for t in tasks:
            for s in c.seeds:
                self.choose(t, s)
        for s in c.seeds:  # 2. chains
            for cap in c.cap:
                for f in c.safe:
                    self.queue_chain(cap, f, "best", c.main_lr, s)
                    self.queue_chain(f, cap, "best", c.main_lr, s)
            for ab in c.first_lr_chains:
                for lr in c.lrs:
                    self.queue_chain(*split_chain(ab), lr, c.main_lr, s)
            for ab in c.second_lr_chains:
                for lr in c.lrs:
                    self.queue_chain(*split_chain(ab), "best", lr, s)
        for s in c.seeds:  # 3. replay, curvature, mitigation, longer chains
            for ab in c.replay_chains:
                self.replay(*split_chain(ab), s)
            for t in tasks:
                for d in self.curvature_dirs(t, s):
                    self.curv(t, s, d)
            for ab in c.mitigation_chains:
                for m in c.mitigations:
                    self.mitigated(*split_chain(ab), m, s)
            for spec in c.chains:
                self.long_chain(spec, s)
        for s in c.seeds:  # Taylor checks a resumed study still lacks
            for cap in c.cap:
                for f in c.safe:
                    for a, b in ((cap, f), (f, cap)):
                        self.taylor(a, b, s)
        return self.g

    def choose(self, t, s):
        """The choice node: decided once every first-stage stage of (t, s) has finished."""
        c = self.c
        deps = [n for lr in c.lrs for n in (f"stage1-{t}-lr{lr}-seed{s}", f"eval-stage1-{t}-lr{lr}-seed{s}",
                                            f"evalval-stage1-{t}-lr{lr}-seed{s}") if n in self.g.stages]
        name = f"choose-{t}-seed{s}"
        reads = [self.s1_dir(t, lr, s) for lr in c.lrs]
        self.g.add(Stage(name, "choice", f"(choice) {t} seed {s}", after=deps, reads=reads))
        if self.is_finished(deps):
            self.best[(t, s)], self.choice_note[(t, s)] = decide_first_stage(c, t, s)
        elif self.plan:
            # planned with the main lr standing in (a sweep point with that lr is the same chain)
            self.best[(t, s)], self.choice_note[(t, s)] = self.s1_dir(t, c.main_lr, s), "pending"

    def parent(self, a, lra, s):
        """(folder or None, the stages it waits for, pending): None when it cannot exist."""
        if lra == "best":
            name = f"choose-{a}-seed{s}"
            if (a, s) not in self.best:
                return "undecided", [name], True
            d = self.best[(a, s)]
            return d, [name], self.choice_note.get((a, s)) == "pending"
        d = self.s1_dir(a, lra, s)
        node = f"stage1-{a}-lr{lra}-seed{s}"
        return d, ([node] if node in self.g.stages else []), False

    def missing(self, d, deps):
        """An input that is not there and will not come: its stage finished without it."""
        return d is None or (not self.plan and self.is_finished(deps) and not os.path.isdir(d))

    def queue_chain(self, a, b, lra, lrb, s):
        parent, deps, pending = self.parent(a, lra, s)
        if parent == "undecided":
            return
        if self.missing(parent, deps):
            self.skip(f"chain-{a}-{b}-lrA{lra}-lrB{lrb}-seed{s}", "chain",
                      f"skipped: chain {a}-{b} seed {s} (no first-stage model)", f"chain-{a}-{b}-seed{s}", deps)
            return
        lra = lr_of(parent)
        st_name = f"stage2-{a}-{b}-lrA{lra}-lrB{lrb}-seed{s}"
        self.finetune("chain", st_name, parent, b, lrb, s, self.chain_dir(a, b, parent, lrb, s), f"{a},{b}",
                      after=deps)
        if pending:
            self.g.stages[st_name].pending_choice = True

    def main_chain(self, a, b, s):
        """(folder, its stage names) of the Table-1 chain a-b; folder None when a's choice is not made."""
        d = self.main_chain_dir(a, b, s)
        return d, (self.g.node_of(d) if d else [])

    def replay(self, a, b, s):
        c = self.c
        if (a, s) not in self.best:
            return
        d, deps = self.main_chain(a, b, s)
        deps = deps + [f"choose-{a}-seed{s}"]
        if self.missing(d, deps) or self.best[(a, s)] is None:
            self.skip(f"replay-{a}-{b}-seed{s}", "replay", f"skipped: replay {a}-{b} seed {s} (no chain)",
                      f"replay-{a}-{b}-seed{s}", deps)
            return
        out = f"{self.r}/replay/{a}-{b}/seed{s}"
        common = ["replay.py", "--model", d, "--task", a, "--out", out, "--first_stage", self.best[(a, s)],
                  "--lr", c.main_lr, "--seed", s, *data_args(c)]
        if c.eval_limit:
            common += ["--eval_limit", c.eval_limit]
        if c.replay_batch:  # the paper's global batch of 128 in micro-batches of 16
            common += ["--batch_size", c.replay_batch]
            if int(c.replay_batch) > 16:
                common += ["--micro_batch_size", "16"]
        if "--bf16" in c.extra:
            common += ["--bf16"]
        lead = launcher(c, c.gpus_per_stage)
        pending = self.choice_note.get((a, s)) == "pending"
        reads = [d, self.best[(a, s)]]
        cost = {"train": a, "batch": int(c.replay_batch or 16), "eval": [a]}
        f_name, s_name = f"replay-fractions-{a}-{b}-seed{s}", f"replay-steps-{a}-{b}-seed{s}"
        fr = [float(x) for x in c.replay_fractions.split(",") if x]
        sp = [int(x) for x in c.replay_steps.split(",") if x]
        self.g.add(Stage(f_name, "replay", f"{out}/.fractions-{c.replay_fractions}",
                         lead + common + ["--fractions", c.replay_fractions, "--steps", c.steps], deps, reads,
                         c.gpus_per_stage, folder=out, touch=True, pending_choice=pending,
                         cost=dict(cost, steps=int(c.steps) * sum(1 for x in fr if x > 0), points=len(fr))))
        self.g.add(Stage(s_name, "replay", f"{out}/.steps-{c.replay_steps}",
                         lead + common + ["--steps_sweep", c.replay_steps], deps + [f_name], reads,
                         c.gpus_per_stage, folder=out, touch=True, pending_choice=pending,
                         cost=dict(cost, steps=sum(sp), points=len(sp))))

    def curvature_dirs(self, t, s):
        c = self.c
        if c.curvature == "none":
            return []
        if c.curvature == "all":
            dirs = [self.s1_dir(t, lr, s) for lr in c.lrs]
            return dirs + sorted(set(glob.glob(f"{self.r}/stage1/{t}/lr*/seed{s}")) - set(dirs))
        return [self.best[(t, s)]] if self.best.get((t, s)) else []

    def curv(self, t, s, d):
        c = self.c
        lr = lr_of(d)
        node = f"stage1-{t}-lr{lr}-seed{s}"
        deps = [node] if node in self.g.stages else []
        if self.missing(d, deps):
            return
        refs, also, waits = [], [], [f"choose-{t}-seed{s}"] + deps
        if d == self.best.get((t, s)):
            for other in c.cap + c.safe:
                if other == t:
                    continue
                r, nodes = self.main_chain(t, other, s)
                waits += nodes  # one solve checks every main chain from this model
                if r and (os.path.isdir(r) or (self.plan and nodes)):
                    also.append(f"{r}/taylor.json")
                    if not os.path.exists(f"{r}/taylor.json"):
                        refs.append(r)
        out = f"{self.r}/curvature/{t}/lr{lr}/seed{s}/curvature.json"
        taylor = ["--reference", *refs, "--taylor_out", "taylor.json"] if refs else []
        cmd = [c.py, "curvature.py", "--model", d, "--task", t, "--samples", c.curv_samples, "--seed", s, "--out", out,
               *data_args(c), *taylor]
        self.g.add(Stage(f"curvature-{t}-lr{lr}-seed{s}", "curvature", out, cmd, waits, [d] + refs,
                         1 if c.gpus_per_stage else 0, also=also,
                         pending_choice=self.choice_note.get((t, s)) == "pending",
                         cost={"task": t, "samples": int(c.curv_samples), "refs": len(refs)}))

    def mitigated(self, a, b, m, s):
        c = self.c
        if (a, s) not in self.best:
            return
        parent = self.best[(a, s)]
        if parent is None:
            self.skip(f"mitigation-{a}-{b}-{m}-seed{s}", "mitigation", None, f"mitigation-{a}-{b}-{m}-seed{s}")
            return
        if m.startswith("mix"):
            args = ["--replay_task", a, "--replay_fraction", m[3:]]
        elif m.startswith("l2_"):
            args = ["--l2_to_init", m[3:]]
        else:
            args = ["--ewc", m[4:], "--ewc_task", a]
        name = f"mitigation-{a}-{b}-{m}-seed{s}"
        self.finetune("mitigation", name, parent, b, c.main_lr, s, f"{self.r}/mitigation/{a}-{b}/{m}/seed{s}",
                      f"{a},{b}", args, after=[f"choose-{a}-seed{s}"])
        if self.choice_note.get((a, s)) == "pending":
            self.g.stages[name].pending_choice = True

    def long_chain(self, spec, s):
        c = self.c
        tasks = spec.split("-")
        if (tasks[0], s) not in self.best:
            return
        parent = self.best[(tasks[0], s)]
        if parent is None:
            self.skip(f"longchain-{spec}-seed{s}", "longchain", None, f"longchain-{spec}-seed{s}")
            return
        deps = [f"choose-{tasks[0]}-seed{s}"]
        for k, t in enumerate(tasks[1:], start=2):
            if k == 2:
                d, nodes = self.main_chain(tasks[0], t, s)
                if nodes and not self.is_finished(nodes) or self.plan and nodes:
                    parent, deps = d, nodes  # the Table 1 chain is this chain's stage 2
                    continue
                if os.path.isdir(d):
                    parent = d
                    continue
            d = f"{self.r}/longchain/{spec}/seed{s}/{k}-{t}"
            names = self.finetune("longchain", f"longchain-{spec}-{k}-{t}-seed{s}", parent, t, c.main_lr, s, d,
                                  ",".join(tasks), after=deps)
            if self.choice_note.get((tasks[0], s)) == "pending":
                self.g.stages[names[0]].pending_choice = True
            if self.failed(names[0]):
                return
            parent, deps = d, names[:1]

    def taylor(self, a, b, s):
        c = self.c
        parent = self.best.get((a, s))
        if not parent or self.choice_note.get((a, s)) == "pending":
            return
        d = self.main_chain_dir(a, b, s)
        curv = f"{self.r}/curvature/{a}/lr{lr_of(parent)}/seed{s}/curvature.json"
        if not (os.path.isdir(d) and os.path.isfile(curv) and not os.path.exists(f"{d}/taylor.json")):
            return
        if f"curvature-{a}-lr{lr_of(parent)}-seed{s}" in self.g.stages and not self.is_finished(
                [f"curvature-{a}-lr{lr_of(parent)}-seed{s}"]):
            return  # the curvature stage still to run writes it
        self.g.add(Stage(f"taylor-{a}-{b}-seed{s}", "taylor", f"{d}/taylor.json",
                         [c.py, "curvature.py", "--model", parent, "--task", a, "--samples", c.curv_samples,
                          "--seed", s, "--reference", d, "--spectrum_from", curv, "--out", f"{d}/taylor.json",
                          *data_args(c)],
                         self.g.node_of(d), [parent, d], 1 if c.gpus_per_stage else 0,
                         cost={"task": a, "samples": int(c.curv_samples), "refs": 1, "hvp_only": True}))


def val_acc(path):
    try:
        with open(path) as f:
            return next(iter(json.load(f)["tasks"].values()))["acc"]
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def decide_first_stage(c, t, s):
    """(folder or None, note): the first-stage model the chains of (t, s) start from (FIRST_STAGE=best: the
    rule metrics.py applies too; main: the one at MAIN_LR)."""
    folders = {float(lr): f"{c.runs}/stage1/{t}/lr{lr}/seed{s}" for lr in c.lrs}
    if c.first_stage == "main":
        d = folders[float(c.main_lr)]
        return (d if os.path.isdir(d) else None), "FIRST_STAGE=main"
    accs = {lr: val_acc(f"{d}/eval_val.json") for lr, d in folders.items()}
    lr = choose_first_stage(accs, float(c.main_lr))
    names = {float(x): x for x in c.lrs}
    shown = ", ".join(f"lr{names[x]} {'-' if a is None else f'{a:.4f}'}" for x, a in accs.items())
    return (folders[lr] if lr is not None else None), f"validation accuracy {shown}"


def choose_first_stage(val_accs, main_lr):
    from chained_tuning.runs import choose_first_stage as choose  # one rule for the study and for Table 1
    return choose(val_accs, main_lr)


# --- running a stage --------------------------------------------------------------------------------------

def log_path(c, name):
    return f"{c.runs}/logs/{name}.log"


def remove_stale_tmp(st):
    """What a killed stage left: common.atomic_dir's .tmp-<basename>-XXXX beside its output (and, for a
    replay sweep, its points' inside the sweep's folder)."""
    gone = []
    places = [(os.path.dirname(st.out), os.path.basename(st.out))]
    if st.folder:
        places.append((st.folder, ""))
    for parent, base in places:
        for p in glob.glob(os.path.join(glob.escape(parent), f".tmp-{glob.escape(base)}*" if base else ".tmp-*")):
            if base and not os.path.basename(p).startswith(f".tmp-{base}-"):
                continue
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
            gone.append(p)
    return gone


def tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def weights_dropped(folder):
    return os.path.isfile(f"{folder}/run.json") and not glob.glob(f"{folder}/*.safetensors")


class Run:
    """One execution of the study: the graph driven to completion by an executor."""

    def __init__(self, c, executor):
        self.c, self.ex = c, executor
        self.finished, self.mismatch = {}, []
        self.failfile = f"{c.runs}/logs/failed.txt"
        self.mismatch_file = f"{c.runs}/logs/settings_mismatch.txt"
        self.dropped = set()
        self.chosen = set()

    def failed(self, name):
        with open(self.failfile, "a") as f:
            f.write(name + "\n")

    def graph(self):
        return Builder(self.c, self.finished).build()

    def precheck(self, g):
        """Every stage whose output exists is checked before any starts: a mismatch stops the study."""
        if self.c.redo == "changed":
            return
        for st in g.stages.values():
            if st.cmd and os.path.exists(st.out):
                problems, _ = stage_check.check(self.c.runs, st.name, st.out, st.cmd)
                self.mismatch += problems

    def prepare(self, st):
        """'run', 'done' or 'stop' for a stage whose inputs are finished."""
        c = self.c
        if os.path.exists(st.out):
            problems, note = stage_check.check(c.runs, st.name, st.out, st.cmd)
            if not problems:
                say(f"done already: {st.name} ({st.out}){'; ' + note if note else ''}")
                return "done"
            if c.redo != "changed":
                self.mismatch += problems
                return "stop"
            say(f"redo (REDO=changed): {st.name}")
            for p in problems:
                print(f"    {p}", flush=True)
            target = st.folder or st.out
            shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
            for p in [stage_check.record_path(c.runs, st.name), *st.also]:
                if os.path.exists(p):
                    os.remove(p)
        dropped = [d for d in st.reads if weights_dropped(d)]
        if dropped:
            self.failed(st.name)
            say(f"FAILED: {st.name}: its input {dropped[0]} has no weights (dropped by KEEP_WEIGHTS=needed, since no "
                "stage read them then); make that stage again (remove the folder) or use KEEP_WEIGHTS=all")
            return "failed"
        remove_stale_tmp(st)
        return "run"

    def completed(self, st, rc):
        c = self.c
        log = log_path(c, st.name)
        trained = st.evals and os.path.isfile(f"{st.out}/run.json")
        if rc != 0 and trained:  # the checkpoint is in place before its evaluation: only that is left
            say(f"{st.name}: trained, its evaluation failed (log: {log}); evaluate.py makes it next")
        elif rc != 0:
            self.failed(st.name)
            say(f"FAILED: {st.name} (log: {log})")
            for line in tail(log):
                print(f"    {line}", flush=True)
            return "failed"
        if st.touch and not os.path.exists(st.out):
            open(st.out, "w").close()
        try:
            stage_check.record(c.runs, st.name, st.out, st.cmd)
        except (OSError, ValueError) as e:
            self.failed(st.name)
            say(f"FAILED: recording the settings of {st.name}: {e}")
            return "failed"
        return "done"

    def resolve(self, st):
        """A stage without a command: a choice (decided now) or a skip."""
        if st.kind == "choice":
            if st.name not in self.chosen:
                self.chosen.add(st.name)
                t, s = st.name[len("choose-"):].rsplit("-seed", 1)
                d, note = decide_first_stage(self.c, t, s)
                say(f"first-stage model of {t} seed {s}: {'lr' + lr_of(d) if d else 'none'} ({note})")
            return "done"
        line, failed_name = st.skip
        if line:
            say(line)
        if failed_name:
            self.failed(failed_name)
        return "skipped"

    def drop_weights(self, g):
        """KEEP_WEIGHTS=needed: a trained folder that no stage of the graph reads, once evaluated, keeps its
        run.json, evaluations and samples and drops its *.safetensors."""
        if self.c.keep_weights == "all":
            return
        read = {d for st in g.stages.values() if st.cmd for d in st.reads}
        for st in g.stages.values():
            if st.kind not in TRAINING or st.kind == "replay" or st.out in read or st.out in self.dropped:
                continue
            if self.finished.get(st.name) != "done" or not all(os.path.exists(e) for e in st.evals):
                continue
            if st.kind == "first_stage":  # its choice must be made first (it may choose this one)
                t, s = st.name[len("stage1-"):].split("-lr")[0], st.name.rsplit("-seed", 1)[1]
                if self.finished.get(f"choose-{t}-seed{s}") != "done":
                    continue
            for w in glob.glob(f"{st.out}/*.safetensors"):
                os.remove(w)
            self.dropped.add(st.out)

    def run(self):
        g = self.graph()
        self.precheck(g)
        while True:
            if self.mismatch:
                break
            progressed = False
            g = self.graph()
            for st in g.stages.values():
                if st.name in self.finished or self.ex.is_running(st.name):
                    continue
                if not all(a in self.finished for a in st.after):
                    continue
                if st.cmd is None:  # the graph grows with a choice: built again on the next pass
                    self.finished[st.name] = self.resolve(st)
                    progressed = True
                    continue
                if not self.ex.can_start(st):
                    continue
                state = self.ex.attach(st) or self.prepare(st)
                if state == "stop":
                    break
                if state == "run":
                    say(f"{st.name} -> {st.out}")
                    self.ex.start(st, log_path(self.c, st.name))
                elif state in ("done", "failed"):
                    self.finished[st.name] = state
                    progressed = True
            if self.mismatch:
                break
            if progressed:
                continue
            if not self.ex.running():
                break
            for name, st, rc in self.ex.wait():
                self.finished[name] = self.completed(st, rc)
            self.drop_weights(self.graph())
        self.ex.wait_all(lambda name, st, rc: self.finished.__setitem__(name, self.completed(st, rc)))
        g = self.graph()
        self.drop_weights(g)
        if not self.mismatch:  # nothing may be left silently: name what could not start, and why
            for st in g.stages.values():
                if st.name not in self.finished and st.cmd:
                    waits = [a for a in st.after if a not in self.finished]
                    self.failed(st.name)
                    say(f"FAILED: {st.name} never started (it waits for {', '.join(waits) or 'nothing'})")
        return g


# --- executors --------------------------------------------------------------------------------------------

def free_port(taken):
    while True:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        if port not in taken:
            return port


def with_port(cmd, port):
    """A torchrun command with a rendezvous port of its own (stages side by side on one node)."""
    if "torch.distributed.run" not in cmd:
        return cmd
    i = cmd.index("torch.distributed.run") + 1
    return cmd[:i] + [f"--master_port={port}"] + cmd[i:]


class LocalPool:
    """At most JOBS stages at once on this machine; with GPUs, each running stage gets its own devices
    (CUDA_VISIBLE_DEVICES) and its own rendezvous port."""

    def __init__(self, c):
        self.c, self.procs, self.free = c, {}, list(c.gpus)
        need = max([c.gpus_per_stage, c.eval_gpus], default=0)
        if c.gpus and need > len(c.gpus):
            raise UserError(f"GPUS_PER_STAGE={need} but only {len(c.gpus)} GPUs ({','.join(c.gpus)}); lower it")

    def gpus_for(self, st):
        return st.gpus if self.c.gpus else 0

    def can_start(self, st):
        return len(self.procs) < self.c.jobs and self.gpus_for(st) <= len(self.free)

    def attach(self, st):
        return None

    def is_running(self, name):
        return name in self.procs

    def running(self):
        return list(self.procs)

    def start(self, st, log):
        env = dict(os.environ)
        devices = [self.free.pop(0) for _ in range(self.gpus_for(st))]
        if self.c.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        port = free_port({p for _, _, _, p, _ in self.procs.values()})
        cmd = with_port(st.cmd, port)
        f = open(log, "w")
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs[st.name] = (proc, st, f, port, devices)

    def wait(self):
        while True:
            done = [(n, v) for n, v in self.procs.items() if v[0].poll() is not None]
            if done:
                out = []
                for name, (proc, st, f, _, devices) in done:
                    f.close()
                    self.free += devices
                    del self.procs[name]
                    out.append((name, st, proc.returncode))
                return out
            time.sleep(0.05)

    def wait_all(self, on_done):
        while self.procs:
            for name, st, rc in self.wait():
                on_done(name, st, rc)

    def stop(self):
        for proc, *_ in self.procs.values():
            proc.terminate()


def torchrun_across_nodes(cmd, num_nodes, node, host, job_id, gpus_per_node):
    """A stage's torchrun command as node `node` of a job on `num_nodes` nodes runs it (rendezvous on the
    job's first node, a port of the job's own); any other command as it is."""
    if "torch.distributed.run" not in cmd:
        return cmd
    i = cmd.index("torch.distributed.run") + 1
    rest = [a for a in cmd[i:] if not a.startswith("--nproc_per_node")]
    port = 29500 + int("".join(ch for ch in str(job_id).split("_")[0] if ch.isdigit()) or 0) % 2000
    return cmd[:i] + [f"--nnodes={num_nodes}", f"--node_rank={node}", f"--nproc_per_node={gpus_per_node}",
                      f"--master_addr={host}", f"--master_port={port}"] + rest


class StageJob:
    """What a Slurm job runs: the stage's command (under torchrun across the job's nodes when it trains on
    more GPUs than one node has), its output in the stage's log. Checkpointable: a job that runs out of
    time is requeued and starts the stage afresh (its temporary folder removed first)."""

    def __init__(self, cmd, log, out, folder, touch, gpus_per_node):
        self.cmd, self.log, self.out, self.folder, self.touch = cmd, log, out, folder, touch
        self.gpus_per_node = gpus_per_node

    def __call__(self):
        import submitit
        env = submitit.JobEnvironment()
        host = env.hostnames[0] if env.hostnames else "127.0.0.1"
        cmd = torchrun_across_nodes(self.cmd, env.num_nodes, env.node, host, env.job_id, self.gpus_per_node)
        if env.node == 0:
            remove_stale_tmp(Stage("job", "job", self.out, folder=self.folder))
        log = self.log if env.node == 0 else f"{self.log}.node{env.node}"
        with open(log, "w") as f:
            rc = self.run(cmd, f)
        if rc == 0 and self.touch and env.node == 0:
            open(self.out, "w").close()
        return rc

    def run(self, cmd, log_file):
        global _STAGE_PROCESS
        _STAGE_PROCESS = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                          start_new_session=True)
        return _STAGE_PROCESS.wait()

    def checkpoint(self, *args, **kwargs):
        """Out of time: the stage's processes end here (nothing half-written survives them: outputs appear only
        once complete), and the job is requeued to make the stage from the start."""
        import submitit
        if _STAGE_PROCESS is not None and _STAGE_PROCESS.poll() is None:
            os.killpg(_STAGE_PROCESS.pid, signal.SIGTERM)
            try:
                _STAGE_PROCESS.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(_STAGE_PROCESS.pid, signal.SIGKILL)
        return submitit.helpers.DelayedSubmission(StageJob(self.cmd, self.log, self.out, self.folder, self.touch,
                                                           self.gpus_per_node), *args, **kwargs)


_STAGE_PROCESS = None  # the command a StageJob runs now (in the job's process)


class SlurmPool:
    """Each stage a Slurm job through submitit, submitted as soon as its inputs are ready; the job ids in
    $RUNS/slurm/jobs.json, so a driver that was stopped finds its running jobs again instead of
    resubmitting them. SLURM_CLUSTER=local runs the jobs through submitit's local backend (tests)."""

    def __init__(self, c):
        import submitit
        self.submitit, self.c = submitit, c
        self.folder = os.path.abspath(f"{c.runs}/slurm")
        os.makedirs(self.folder, exist_ok=True)
        self.jobs_file = f"{self.folder}/jobs.json"
        self.known = json.load(open(self.jobs_file)) if os.path.isfile(self.jobs_file) else {}
        self.jobs = {}  # name -> (job, stage)
        if c.slurm.cluster == "slurm" and not shutil.which("srun"):
            raise UserError("EXECUTOR=slurm: no srun on this machine; run the study on a Slurm login node (or "
                            "SLURM_CLUSTER=local to try the executor with submitit's local backend)")
        self.ex = submitit.AutoExecutor(folder=f"{self.folder}/%j", cluster=c.slurm.cluster)

    def params(self, st):
        s, gpus = self.c.slurm, st.gpus
        nodes = max(1, math.ceil(gpus / s.gpus_per_node)) if gpus else 1
        extra = {}
        for opt in shlex.split(s.extra):
            k, _, v = opt.lstrip("-").partition("=")
            extra[k.replace("-", "_")] = v or True
        p = dict(timeout_min=s.time_min, nodes=nodes, tasks_per_node=1, cpus_per_task=s.cpus, name=st.name,
                 gpus_per_node=min(gpus, s.gpus_per_node))
        if self.ex.cluster == "slurm":
            p.update(slurm_partition=s.partition or None, slurm_account=s.account or None,
                     slurm_additional_parameters=extra)
            p = {k: v for k, v in p.items() if v is not None}
        else:
            p = {k: v for k, v in p.items() if k in ("timeout_min", "name", "gpus_per_node") and v}
        return p, nodes

    def can_start(self, st):
        return True

    def is_running(self, name):
        return name in self.jobs

    def running(self):
        return list(self.jobs)

    def job(self, job_id):
        if self.ex.cluster == "slurm":
            return self.submitit.SlurmJob(self.folder + "/%j", job_id)
        return self.submitit.local.local.LocalJob(self.folder + "/%j", job_id)

    def alive(self, job):
        if job.paths.result_pickle.exists():
            return False
        if self.ex.cluster == "slurm":
            return job.state in ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING",
                                 "SUSPENDED", "RESIZING", "UNKNOWN")
        proc = getattr(job, "_process", None)
        if proc is not None:  # submitted by this driver
            return proc.poll() is None
        try:  # submitted by a driver that was stopped: its controller process, if it still runs
            os.kill(int(job.job_id), 0)
            return True
        except (OSError, ValueError):
            return False

    def attach(self, st):
        """'running' when a job of an earlier driver still runs this stage (or has just finished it)."""
        rec = self.known.get(st.name)
        if not rec or rec.get("cmd") != st.cmd:
            return None
        job = self.job(rec["job_id"])
        if self.alive(job) or job.paths.result_pickle.exists():
            say(f"still running: {st.name} (Slurm job {rec['job_id']}; log: {log_path(self.c, st.name)})")
            self.jobs[st.name] = (job, st)
            return "running"
        return None

    def start(self, st, log):
        p, nodes = self.params(st)
        self.ex.update_parameters(**p)
        gpn = min(st.gpus, self.c.slurm.gpus_per_node) if st.gpus else 0
        job = self.ex.submit(StageJob(st.cmd, os.path.abspath(log), os.path.abspath(st.out),
                                      os.path.abspath(st.folder) if st.folder else None, st.touch, gpn))
        self.jobs[st.name] = (job, st)
        self.known[st.name] = {"job_id": str(job.job_id), "cmd": st.cmd, "nodes": nodes}
        write_json_atomic(self.jobs_file, self.known)

    def finished(self, job):
        if job.paths.result_pickle.exists():
            return True
        return not self.alive(job)

    def outcome(self, name, job):
        try:
            return int(job.result())
        except Exception as e:  # noqa: BLE001  a failed job: its error and where its logs are
            say(f"FAILED: Slurm job {job.job_id} of {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                f"(job log: {job.paths.stderr})")
            return 1

    def wait(self):
        while True:
            done = [(n, j, st) for n, (j, st) in self.jobs.items() if self.finished(j)]
            if done:
                out = []
                for name, job, st in done:
                    del self.jobs[name]
                    out.append((name, st, self.outcome(name, job)))
                    self.known.pop(name, None)
                write_json_atomic(self.jobs_file, self.known)
                return out
            time.sleep(self.c.slurm.poll_s)

    def wait_all(self, on_done):
        while self.jobs:
            for name, st, rc in self.wait():
                on_done(name, st, rc)

    def stop(self):
        pass  # the jobs go on; a rerun of the driver finds them


def make_executor(c):
    return SlurmPool(c) if c.executor == "slurm" else LocalPool(c)


# --- the plan ---------------------------------------------------------------------------------------------

def model_shape(c):
    """(cost_model shape dict, n_params, where from) from the model's config.json; no weights are read."""
    from chained_tuning.study import cost_model
    if c.model == "tiny":
        from chained_tuning.data import tiny_base
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
        from chained_tuning.study import cost_model
        self.c, self.max_length, self.cache = c, max_length, {}
        path = None
        if c.model == "tiny":
            from chained_tuning.data import tiny_base
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
            from chained_tuning.data.tasks import load_task
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


def stage_gpu_seconds(st, train_tokens, scored_tokens, generated_tokens, n_params, shape, dtype):
    """GPU-seconds of one stage from cost_model.py (its ASSUMPTIONS are printed with the plan): start-up,
    the checkpoint read, training, the new checkpoint written, the scored tokens; a curvature solve as
    CURVATURE_PRODUCTS HVPs over its samples plus one per Taylor check, a Taylor check alone as one."""
    from chained_tuning.study import cost_model as cm
    gpus = max(1, st.gpus)
    secs = (cm.STAGE_STARTUP_S + cm.io_seconds(n_params, dtype, write=False)) * gpus
    if st.kind in ("curvature", "taylor"):
        products = (0 if st.cost.get("hvp_only") else CURVATURE_PRODUCTS) + st.cost.get("refs", 0)
        return secs + cm.stage_gpu_seconds("hvp", scored_tokens * max(1, products), n_params, gpus, shape=shape)
    if train_tokens:
        secs += cm.stage_gpu_seconds("train", train_tokens, n_params, gpus, shape=shape)
        if st.kind != "replay":  # replay points keep no checkpoint
            secs += cm.io_seconds(n_params, dtype, write=True) * gpus
    if scored_tokens:
        secs += cm.stage_gpu_seconds("eval_forward", scored_tokens, n_params, gpus, shape=shape)
    if generated_tokens:
        secs += cm.stage_gpu_seconds("generate", generated_tokens, n_params, gpus, shape=shape)
    return secs


def checkpoint_bytes(n_params, dtype):
    from chained_tuning.study import cost_model
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


def plan(c):
    """The graph with every choice the runs folder cannot decide yet planned at the main lr."""
    g = Builder(c, {}, plan=True).build()
    stages = [st for st in g.stages.values() if st.kind != "choice" and st.skip is None]
    from chained_tuning.study import cost_model
    shape, n_params, src = model_shape(c)
    tc = TokenCounter(c)
    per_kind, hours, rows = {}, {}, []
    tokens_total, disk = 0.0, 0
    dtype = "bfloat16" if "--bf16" in c.extra else "float32"
    ckpt = checkpoint_bytes(n_params, dtype)
    read = {d for st in stages for d in st.reads}
    for st in stages:
        state = state_of(c, st)
        k = per_kind.setdefault(st.kind, {"stages": 0, "done": 0})
        k["stages"] += 1
        k["done"] += state == "done"
        train, scored, generated = stage_tokens(st, tc)
        secs = stage_gpu_seconds(st, train, scored, generated, n_params, shape, dtype)
        hours[st.name] = 0.0 if state == "done" else secs / 3600 / max(1, st.gpus)  # wall hours on its GPUs
        tokens_total += train + scored + generated
        if st.kind in TRAINING and st.kind != "replay" and (c.keep_weights == "all" or st.out in read):
            disk += ckpt
        rows.append({"name": st.name, "kind": st.kind, "gpus": st.gpus, "after": st.after, "done": state == "done",
                     "state": state, "out": st.out, "cmd": shlex.join(st.cmd),
                     "tokens": round(train + scored + generated),
                     "gpu_hours": round(secs / 3600, 4),
                     "pending_choice": st.pending_choice})
    disk += ckpt * c.jobs  # checkpoints of the stages running at once, before their weights are dropped
    gpu_hours = sum(hours[st.name] * max(1, st.gpus) for st in stages)  # still to run
    n_local = len(c.gpus) or 8
    choices = {st.name: st.after for st in g.stages.values() if st.kind == "choice"}
    local_wall = makespan(stages, hours, n_local, choices)
    slurm_wall = makespan(stages, hours, c.slurm.nodes * c.slurm.gpus_per_node, choices)
    return {"profile": c.profile, "runs": c.runs, "model": c.model, "n_params": n_params, "model_config": src,
            "tokens": round(tokens_total), "tokens_how": tc.how, "cost_assumptions": list(cost_model.ASSUMPTIONS) + [
                f"a curvature solve: {CURVATURE_PRODUCTS} HVPs over its samples (+1 a Taylor check)",
            f"a SaFeRDialogues evaluation: {GENERATED_TOKENS} new tokens a test example (decoding, memory-bound)"],
            "checkpoint_bytes": ckpt, "keep_weights": c.keep_weights,
            "stages": rows + [{"name": n, "kind": "summary", "gpus": 0, "after": [r["name"] for r in rows],
                               "done": False, "state": "always run"} for n in ("order", "metrics")],
            "choices": [{"name": st.name, "after": st.after} for st in g.stages.values() if st.kind == "choice"],
            "totals": {"gpu_hours": round(gpu_hours, 2), "disk_bytes": int(disk),
                       "stages": {k: v["stages"] for k, v in per_kind.items()},
                       "done": {k: v["done"] for k, v in per_kind.items()},
                       "wall_hours": {f"local pool, {n_local} GPUs": round(local_wall, 2),
                                      f"slurm, {c.slurm.nodes} nodes x {c.slurm.gpus_per_node} GPUs":
                                          round(slurm_wall, 2)},
                       "gpus_per_stage": c.gpus_per_stage}}


def print_plan(p):
    t = p["totals"]
    print(f"plan of profile {p['profile']} -> {p['runs']}/plan.json")
    print(f"  model {p['model']}: {p['n_params'] or 0:,} parameters ({p['model_config']}); tokens {p['tokens_how']}")
    for k, n in t["stages"].items():
        print(f"  {k:12s} {n:5d} stages, {t['done'][k]:5d} done")
    print(f"  tokens: {p['tokens']:,}")
    print(f"  GPU-hours still to run: {t['gpu_hours']:,} ({t['gpus_per_stage']} GPUs a training stage)")
    for where, h in t["wall_hours"].items():
        print(f"  wall hours on {where}: {h:,}")
    print(f"  disk: {t['disk_bytes'] / 1e9:,.1f} GB (checkpoints of {p['checkpoint_bytes'] / 1e9:.2f} GB; "
          f"KEEP_WEIGHTS={p['keep_weights']})")
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

def write_study_json(c):
    write_json_atomic(f"{c.runs}/study.json", {
        "profile": c.profile, "model": c.model, "data_dir": c.data_dir or "synthetic", "seeds": c.seeds,
        "lrs": [float(x) for x in c.lrs], "main_lr": float(c.main_lr), "lr": float(c.main_lr), "steps": int(c.steps),
        "eval_limit": c.eval_limit or None, "val_limit": c.val_limit or None, "curvature_samples": int(c.curv_samples),
        "replay_fractions": [float(x) for x in c.replay_fractions.split(",") if x],
        "replay_steps": [int(x) for x in c.replay_steps.split(",") if x], "extra_args": " ".join(c.extra),
        "capability_tasks": c.cap, "safety_tasks": c.safe, "lr_note": c.lr_note,
        "units": "replay_fractions: fractions of the first task's training set",
        "settings_records": "logs/<stage>.settings.json: the settings each stage's output was made with",
        "first_stage": c.first_stage, "replay_batch_size": int(c.replay_batch) if c.replay_batch else None,
        "keep_weights": c.keep_weights, "test_set": c.test_set})


def summary_step(c, name, cmd, out_line):
    say(out_line)
    log = f"{c.runs}/logs/{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return rc, log


def run_study(c):
    t0 = time.time()
    os.makedirs(f"{c.runs}/logs", exist_ok=True)
    open(f"{c.runs}/logs/failed.txt", "w").close()
    open(f"{c.runs}/logs/settings_mismatch.txt", "w").close()
    if c.jobs > 1:  # small models gain nothing from a second thread: run JOBS stages side by side instead
        os.environ["OMP_NUM_THREADS"] = "1"
    say(f"study: profile {c.profile}, model {c.model}, data {c.data_dir or 'synthetic'}, seeds [{' '.join(c.seeds)}], "
        f"lrs [{' '.join(c.lrs)}] (main {c.main_lr}; {c.lr_note}) -> {c.runs}")
    if c.model == "tiny":
        from chained_tuning.data import tiny_base
        say(f"base: tiny Llama (built once, then cached) -> {tiny_base.tiny_base_path()}")
        with open(f"{c.runs}/logs/base-tiny.log", "w") as f:
            if subprocess.run([c.py, "-m", "chained_tuning.data.tiny_base"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
                say(f"FAILED: base (log: {c.runs}/logs/base-tiny.log)")
                return 1
    elif c.profile == "paper":
        try:
            p = plan(c)
            say(f"disk this study will need: {p['totals']['disk_bytes'] / 1e9:,.1f} GB "
                f"(KEEP_WEIGHTS={c.keep_weights}); "
                f"{p['totals']['gpu_hours']:,} GPU-hours still to run (python study.py --dry_run: the plan)")
        except UserError as e:
            say(f"disk this study will need: unknown ({e})")
    ex = make_executor(c)
    run = Run(c, ex)

    def stop(signum, frame):
        ex.stop()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    try:
        run.run()
    except KeyboardInterrupt:
        ex.stop()
        say(f"interrupted: run the study again to go on (finished stages are kept; {c.runs})")
        return 130
    if run.mismatch:
        with open(run.mismatch_file, "w") as f:
            f.write("".join(p + "\n" for p in run.mismatch))
        say(f"STOPPED: outputs in {c.runs} were made with other settings than this study asks for:")
        for p in run.mismatch:
            print(f"    {p}", flush=True)
        say(STOP_HINT.format(runs=c.runs))
        return 2
    write_study_json(c)
    failfile = run.failfile
    if os.path.isdir(f"{c.runs}/curvature"):  # curvature-guided order, checked against the measured chains
        os.makedirs(f"{c.runs}/results", exist_ok=True)
        rc, log = summary_step(c, "order", [c.py, "order.py", "--tasks", ",".join(c.cap + c.safe), "--curvature",
                                            f"{c.runs}/curvature", "--runs", c.runs, "--out",
                                            f"{c.runs}/results/order.json"], f"order -> {c.runs}/results/order.json")
        if rc:
            run.failed("order")
            say(f"FAILED: order (log: {log})")
    rc, log = summary_step(c, "metrics", [c.py, "metrics.py", "--runs", c.runs, "--out", f"{c.runs}/results",
                                          "--profile", c.profile], f"metrics -> {c.runs}/results")
    if rc:
        run.failed("metrics")
        say(f"FAILED: metrics (log: {log})")
        for line in tail(log):
            print(f"    {line}", flush=True)
    say(f"study finished in {int(time.time() - t0)}s; report: {c.runs}/results/report.md")
    failed = open(failfile).read().split("\n")[:-1]
    if failed:
        say(f"{len(failed)} stage(s) failed or were skipped: {' '.join(failed)} ")
        return 1
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Settings: environment variables (README: The study).")
    p.add_argument("profile", nargs="?", default=None, help="tiny, real-tiny or paper (or PROFILE=...)")
    p.add_argument("--dry_run", action="store_true", help="print the plan and write $RUNS/plan.json; runs nothing")
    p.add_argument("--status", action="store_true", help="print the graph and each stage's state; runs nothing")
    args = p.parse_args(argv)

    def go():
        c = settings(os.environ, args.profile)
        if args.dry_run:
            pl = plan(c)
            os.makedirs(c.runs, exist_ok=True)
            write_json_atomic(f"{c.runs}/plan.json", pl)
            print_plan(pl)
            return 0
        if args.status:
            return status(c)
        return run_study(c)
    return die_on_user_error(go)


if __name__ == "__main__":
    sys.exit(main())
