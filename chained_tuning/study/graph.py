"""The study's stage graph: every stage (its command, the folders it reads, the output that marks it complete,
the GPUs it needs, the stages it waits for), built from the settings, the stages finished in this run and
what the runs folder holds. One function adds the stages of each kind (add_chain, add_replay, ...); the
Builder holds what they share (the folders, the choices made so far, the finetune and evaluate commands).

The first-stage model a chain starts from is a node of the graph (kind "choice"), decided once its sweep's
validation results exist, by the rule metrics.py applies too (decide_first_stage).
"""
import glob
import json
import os
from dataclasses import dataclass, field

from ..runs import choose_first_stage  # one rule for the study and for Table 1

KINDS = ("first_stage", "evaluate", "choice", "chain", "replay", "mitigation", "longchain", "curvature", "taylor",
         "summary")
TRAINING = ("first_stage", "chain", "mitigation", "longchain", "replay")


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


def split_chain(ab):
    """A-B -> (A, B) as run_all.sh split it (${ab%-*}, ${ab#*-})."""
    return ab.rsplit("-", 1)[0], ab.split("-", 1)[1]


def data_args(c):
    """The data options every stage script takes alike (the test set is what the training sample leaves)."""
    return (["--data_dir", c.data_dir] if c.data_dir else []) + (["--test_set", c.test_set]
                                                                  if c.test_set != "fraction" else [])


class Builder:
    """Builds the graph from the settings, the stages finished in this run and what the runs folder holds;
    called again after every stage, so each choice and each conditional stage (an evaluation a folder
    lacks, a Taylor check a resumed study still needs) appears as soon as it can be decided."""

    def __init__(self, c, finished, plan=False):
        self.c, self.finished, self.plan, self.g = c, finished, plan, Graph()
        self.r = c.runs
        self.best, self.choice_note = {}, {}

    def build(self):
        c = self.c
        tasks = c.cap + c.safe
        for t in tasks:  # 1. first-stage models
            for lr in c.lrs:
                for s in c.seeds:
                    d = self.s1_dir(t, lr, s)
                    self.finetune("first_stage", f"stage1-{t}-lr{lr}-seed{s}", c.model, t, lr, s, d, t, val=True)
        # the base model, evaluated once for every chain; after the first stages (which every later stage waits
        # for) in the order ready stages start, since only the report reads it
        add_base_eval(self)
        for t in tasks:
            for s in c.seeds:
                add_choice(self, t, s)
        for s in c.seeds:  # 2. chains
            for cap in c.cap:
                for f in c.safe:
                    add_chain(self, cap, f, "best", c.main_lr, s)
                    add_chain(self, f, cap, "best", c.main_lr, s)
            for ab in c.first_lr_chains:
                for lr in c.lrs:
                    add_chain(self, *split_chain(ab), lr, c.main_lr, s)
            for ab in c.second_lr_chains:
                for lr in c.lrs:
                    add_chain(self, *split_chain(ab), "best", lr, s)
        for s in c.seeds:  # 3. replay, curvature, mitigation, longer chains
            for ab in c.replay_chains:
                add_replay(self, *split_chain(ab), s)
            for t in tasks:
                for d in curvature_dirs(self, t, s):
                    add_curvature(self, t, s, d)
            for ab in c.mitigation_chains:
                for m in c.mitigations:
                    add_mitigation(self, *split_chain(ab), m, s)
            for spec in c.chains:
                add_long_chain(self, spec, s)
        for s in c.seeds:  # Taylor checks a resumed study still lacks
            for cap in c.cap:
                for f in c.safe:
                    for a, b in ((cap, f), (f, cap)):
                        add_taylor(self, a, b, s)
        return self.g

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

    def main_chain(self, a, b, s):
        """(folder, its stage names) of the Table-1 chain a-b; folder None when a's choice is not made."""
        d = self.main_chain_dir(a, b, s)
        return d, (self.g.node_of(d) if d else [])

    def pending(self, t, s):
        """Whether (t, s)'s first-stage model is the main lr standing in for a choice not made yet (a plan)."""
        return self.choice_note.get((t, s)) == "pending"

    def parent(self, a, lra, s):
        """(folder or None, the stages it waits for, pending): None when it cannot exist."""
        if lra == "best":
            name = f"choose-{a}-seed{s}"
            if (a, s) not in self.best:
                return "undecided", [name], True
            d = self.best[(a, s)]
            return d, [name], self.pending(a, s)
        d = self.s1_dir(a, lra, s)
        node = f"stage1-{a}-lr{lra}-seed{s}"
        return d, ([node] if node in self.g.stages else []), False

    def missing(self, d, deps):
        """An input that is not there and will not come: its stage finished without it."""
        return d is None or (not self.plan and self.is_finished(deps) and not os.path.isdir(d))

    def skip(self, name, kind, say_line, failed_name, after=()):
        self.g.add(Stage(f"skip-{name}", kind, f"(skipped) {name}", skip=(say_line, failed_name), after=list(after)))

    def finetune(self, kind, name, parent, task, lr, s, out, eval_tasks, extra=(), val=False, after=(), cost=None):
        """A finetune.py stage (and, for a folder left without them, the evaluations it still needs)."""
        c = self.c
        cmd = launcher(c, c.gpus_per_stage) + [
            "finetune.py", "--model", parent, "--task", task, "--lr", lr, "--seed", s, "--steps", c.steps,
            "--out", out, *data_args(c), *c.extra, *extra]
        if c.get("lora_args"):  # METHOD=lora: a LoRA stage; from a study stage, that adapter merged first
            cmd += c.lora_args + (["--lora_chain", "merge"] if parent.startswith(self.r) else [])
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


# --- the stages of each kind ---------------------------------------------------------------------------------

def base_tasks(c):
    """Every task the study evaluates a model on: its capability and safety tasks, then the tasks of its long
    chains (CHAINS may name others, e.g. csqa2 in a study of arc and toxigen)."""
    extra = [t for spec in c.chains for t in spec.split("-")]
    return list(dict.fromkeys(c.cap + c.safe + extra))


def add_base_eval(builder):
    """The base model theta_0 (MODEL) evaluated once per study on every task, with the options of every other
    evaluation (the same examples): the accuracy path's first point and the long chains' forward transfer
    (metrics.py finds <runs>/base/eval.json). One node, whatever the number of chains and seeds."""
    builder.evaluate("eval-base", builder.c.model, ",".join(base_tasks(builder.c)), f"{builder.r}/base/eval.json",
                     builder.eval_limit(), [])


def add_choice(builder, t, s):
    """The choice node: decided once every first-stage stage of (t, s) has finished."""
    c = builder.c
    deps = [n for lr in c.lrs for n in (f"stage1-{t}-lr{lr}-seed{s}", f"eval-stage1-{t}-lr{lr}-seed{s}",
                                        f"evalval-stage1-{t}-lr{lr}-seed{s}") if n in builder.g.stages]
    name = f"choose-{t}-seed{s}"
    reads = [builder.s1_dir(t, lr, s) for lr in c.lrs]
    builder.g.add(Stage(name, "choice", f"(choice) {t} seed {s}", after=deps, reads=reads))
    if builder.is_finished(deps):
        builder.best[(t, s)], builder.choice_note[(t, s)] = decide_first_stage(c, t, s)
    elif builder.plan:
        # planned with the main lr standing in (a sweep point with that lr is the same chain)
        builder.best[(t, s)], builder.choice_note[(t, s)] = builder.s1_dir(t, c.main_lr, s), "pending"


def add_chain(builder, a, b, lra, lrb, s):
    """The chain a -> b from a's model at lra ("best": the chosen one), trained on b at lrb."""
    parent, deps, pending = builder.parent(a, lra, s)
    if parent == "undecided":
        return
    if builder.missing(parent, deps):
        builder.skip(f"chain-{a}-{b}-lrA{lra}-lrB{lrb}-seed{s}", "chain",
                     f"skipped: chain {a}-{b} seed {s} (no first-stage model)", f"chain-{a}-{b}-seed{s}", deps)
        return
    lra = lr_of(parent)
    st_name = f"stage2-{a}-{b}-lrA{lra}-lrB{lrb}-seed{s}"
    builder.finetune("chain", st_name, parent, b, lrb, s, builder.chain_dir(a, b, parent, lrb, s), f"{a},{b}",
                     after=deps)
    if pending:
        builder.g.stages[st_name].pending_choice = True


def replay_command(c, a, s, model, out, first_stage):
    """replay.py's options a replay sweep of chain a-B shares (from the chain's model `model`)."""
    common = ["replay.py", "--model", model, "--task", a, "--out", out, "--first_stage", first_stage,
              "--lr", c.main_lr, "--seed", s, *data_args(c)]
    if c.eval_limit:
        common += ["--eval_limit", c.eval_limit]
    if c.replay_batch:  # the paper's global batch of 128 in micro-batches of 16
        common += ["--batch_size", c.replay_batch]
        if int(c.replay_batch) > 16:
            common += ["--micro_batch_size", "16"]
    if "--bf16" in c.extra:
        common += ["--bf16"]
    return common


def add_replay(builder, a, b, s):
    """The replay sweeps of chain a-b: over replay fractions, then over replay steps."""
    c = builder.c
    if (a, s) not in builder.best:
        return
    d, deps = builder.main_chain(a, b, s)
    deps = deps + [f"choose-{a}-seed{s}"]
    if builder.missing(d, deps) or builder.best[(a, s)] is None:
        builder.skip(f"replay-{a}-{b}-seed{s}", "replay", f"skipped: replay {a}-{b} seed {s} (no chain)",
                     f"replay-{a}-{b}-seed{s}", deps)
        return
    out = f"{builder.r}/replay/{a}-{b}/seed{s}"
    common = replay_command(c, a, s, d, out, builder.best[(a, s)])
    lead = launcher(c, c.gpus_per_stage)
    pending = builder.pending(a, s)
    reads = [d, builder.best[(a, s)]]
    cost = {"train": a, "batch": int(c.replay_batch or 16), "eval": [a]}
    f_name, s_name = f"replay-fractions-{a}-{b}-seed{s}", f"replay-steps-{a}-{b}-seed{s}"
    fr = [float(x) for x in c.replay_fractions.split(",") if x]
    sp = [int(x) for x in c.replay_steps.split(",") if x]
    builder.g.add(Stage(f_name, "replay", f"{out}/.fractions-{c.replay_fractions}",
                        lead + common + ["--fractions", c.replay_fractions, "--steps", c.steps], deps, reads,
                        c.gpus_per_stage, folder=out, touch=True, pending_choice=pending,
                        cost=dict(cost, steps=int(c.steps) * sum(1 for x in fr if x > 0), points=len(fr))))
    builder.g.add(Stage(s_name, "replay", f"{out}/.steps-{c.replay_steps}",
                        lead + common + ["--steps_sweep", c.replay_steps], deps + [f_name], reads,
                        c.gpus_per_stage, folder=out, touch=True, pending_choice=pending,
                        cost=dict(cost, steps=sum(sp), points=len(sp))))


def curvature_dirs(builder, t, s):
    """The first-stage models of (t, s) whose curvature CURVATURE asks for (best, all or none)."""
    c = builder.c
    if c.curvature == "none":
        return []
    if c.curvature == "all":
        dirs = [builder.s1_dir(t, lr, s) for lr in c.lrs]
        return dirs + sorted(set(glob.glob(f"{builder.r}/stage1/{t}/lr*/seed{s}")) - set(dirs))
    return [builder.best[(t, s)]] if builder.best.get((t, s)) else []


def add_curvature(builder, t, s, d):
    """The curvature of model d; for the chosen model, with the Taylor check of every main chain from it."""
    c = builder.c
    lr = lr_of(d)
    node = f"stage1-{t}-lr{lr}-seed{s}"
    deps = [node] if node in builder.g.stages else []
    if builder.missing(d, deps):
        return
    refs, also, waits = [], [], [f"choose-{t}-seed{s}"] + deps
    # a LoRA chain merges A's adapter and trains a fresh one: its move lies outside the adapter's parameters that
    # the Hessian is taken over, so no Taylor check (curvature.py refuses one)
    if d == builder.best.get((t, s)) and not c.get("lora_args"):
        for other in c.cap + c.safe:
            if other == t:
                continue
            r, nodes = builder.main_chain(t, other, s)
            waits += nodes  # one solve checks every main chain from this model
            if r and (os.path.isdir(r) or (builder.plan and nodes)):
                also.append(f"{r}/taylor.json")
                if not os.path.exists(f"{r}/taylor.json"):
                    refs.append(r)
    out = f"{builder.r}/curvature/{t}/lr{lr}/seed{s}/curvature.json"
    taylor = ["--reference", *refs, "--taylor_out", "taylor.json"] if refs else []
    measures = (["--measures", c.curv_measures, *c.curv_measure_args] if c.curv_measures != "rho"
                else [])  # CURV_MEASURES, CURV_MEASURE_ARGS
    cmd = [c.py, "curvature.py", "--model", d, "--task", t, "--samples", c.curv_samples, "--seed", s, "--out", out,
           *data_args(c), *measures, *taylor]
    builder.g.add(Stage(f"curvature-{t}-lr{lr}-seed{s}", "curvature", out, cmd, waits, [d] + refs,
                        1 if c.gpus_per_stage else 0, also=also, pending_choice=builder.pending(t, s),
                        cost={"task": t, "samples": int(c.curv_samples), "refs": len(refs),
                              "measures": c.curv_measures.split(",")}))


def add_mitigation(builder, a, b, m, s):
    """Chain a-b from a's chosen model with mitigation m (mix<F>, l2_<LAMBDA> or ewc_<LAMBDA>)."""
    c = builder.c
    if (a, s) not in builder.best:
        return
    parent = builder.best[(a, s)]
    if parent is None:
        builder.skip(f"mitigation-{a}-{b}-{m}-seed{s}", "mitigation", None, f"mitigation-{a}-{b}-{m}-seed{s}")
        return
    if m.startswith("mix"):
        args = ["--replay_task", a, "--replay_fraction", m[3:]]
    elif m.startswith("l2_"):
        args = ["--l2_to_init", m[3:]]
    else:
        args = ["--ewc", m[4:], "--ewc_task", a]
    name = f"mitigation-{a}-{b}-{m}-seed{s}"
    builder.finetune("mitigation", name, parent, b, c.main_lr, s, f"{builder.r}/mitigation/{a}-{b}/{m}/seed{s}",
                     f"{a},{b}", args, after=[f"choose-{a}-seed{s}"])
    if builder.pending(a, s):
        builder.g.stages[name].pending_choice = True


def add_long_chain(builder, spec, s):
    """The chain A-B-C...: its stage 2 is the Table-1 chain A-B where that is (to be) made."""
    c = builder.c
    tasks = spec.split("-")
    if (tasks[0], s) not in builder.best:
        return
    parent = builder.best[(tasks[0], s)]
    if parent is None:
        builder.skip(f"longchain-{spec}-seed{s}", "longchain", None, f"longchain-{spec}-seed{s}")
        return
    deps = [f"choose-{tasks[0]}-seed{s}"]
    add_chain_eval(builder, spec, s, 1, parent, deps)
    for k, t in enumerate(tasks[1:], start=2):
        if k == 2:
            d, nodes = builder.main_chain(tasks[0], t, s)
            if nodes and not builder.is_finished(nodes) or builder.plan and nodes:
                parent, deps = d, nodes  # the Table 1 chain is this chain's stage 2
                add_chain_eval(builder, spec, s, 2, parent, deps)
                continue
            if os.path.isdir(d):
                parent = d
                add_chain_eval(builder, spec, s, 2, parent, [])
                continue
        d = f"{builder.r}/longchain/{spec}/seed{s}/{k}-{t}"
        names = builder.finetune("longchain", f"longchain-{spec}-{k}-{t}-seed{s}", parent, t, c.main_lr, s, d,
                                 ",".join(tasks), after=deps)
        if builder.pending(tasks[0], s):
            builder.g.stages[names[0]].pending_choice = True
        if builder.failed(names[0]):
            return
        parent, deps = d, names[:1]


def add_chain_eval(builder, spec, s, k, model_dir, after):
    """A stage a long chain shares with the study (stage 1, and stage 2 when it is the Table-1 chain) was evaluated
    on its own tasks only: evaluate.py scores it on the chain's later tasks too, into the long chain's folder (no
    run.json there: metrics.py pairs it with the stage by the run_id eval.json records), so the accuracy matrix has
    R[k][j] for j > k (forward transfer needs R[j-1][j])."""
    tasks = spec.split("-")
    later = [t for t in dict.fromkeys(tasks[k:]) if t not in tasks[:k]]
    if later:
        builder.evaluate(f"evalchain-{spec}-{k}-{tasks[k - 1]}-seed{s}", model_dir, ",".join(later),
                         f"{builder.r}/longchain/{spec}/seed{s}/{k}-{tasks[k - 1]}/eval.json", builder.eval_limit(),
                         list(after))


def add_taylor(builder, a, b, s):
    """The Taylor check of main chain a-b that a resumed study lacks while a's curvature is already there."""
    c = builder.c
    parent = builder.best.get((a, s))
    if not parent or builder.pending(a, s) or c.get("lora_args"):
        return
    d = builder.main_chain_dir(a, b, s)
    curv = f"{builder.r}/curvature/{a}/lr{lr_of(parent)}/seed{s}/curvature.json"
    if not (os.path.isdir(d) and os.path.isfile(curv) and not os.path.exists(f"{d}/taylor.json")):
        return
    if f"curvature-{a}-lr{lr_of(parent)}-seed{s}" in builder.g.stages and not builder.is_finished(
            [f"curvature-{a}-lr{lr_of(parent)}-seed{s}"]):
        return  # the curvature stage still to run writes it
    builder.g.add(Stage(f"taylor-{a}-{b}-seed{s}", "taylor", f"{d}/taylor.json",
                        [c.py, "curvature.py", "--model", parent, "--task", a, "--samples", c.curv_samples,
                         "--seed", s, "--reference", d, "--spectrum_from", curv, "--out", f"{d}/taylor.json",
                         *data_args(c)],
                        builder.g.node_of(d), [parent, d], 1 if c.gpus_per_stage else 0,
                        cost={"task": a, "samples": int(c.curv_samples), "refs": 1, "hvp_only": True}))


# --- the first-stage choice ------------------------------------------------------------------------------------

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

