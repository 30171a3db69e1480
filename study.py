"""The chained-tuning study as a job graph: every stage (its command, the folders it reads, the output
that marks it complete, the GPUs it needs, the stages it waits for), run by a local pool or on Slurm.

    bash run_all.sh                                   # what this runs for you (prepares .venv first)
    python study.py                                   # profile tiny (PROFILE=... or the first argument)
    python study.py --dry_run                         # the plan -> $RUNS/plan.json; nothing trained or loaded
    python study.py --status                          # the graph and each stage's state
    PROFILE=paper MODEL=/models/Llama-2-7b-hf DATA_DIR=/data GPUS_PER_STAGE=4 python study.py
    PROFILE=paper MODEL=... DATA_DIR=... EXECUTOR=slurm SLURM_PARTITION=gpu SLURM_TIME=240 python study.py

Files: this script beside the stage scripts it runs (finetune.py, evaluate.py, replay.py, curvature.py,
order.py, metrics.py) and the package chained_tuning/ (study/: profiles.py the profile table and every
variable, graph.py the stages, executors.py the local pool and Slurm, plan.py --dry_run and --status,
stage_check.py, cost_model.py). The manual: docs/study.md.

Every setting is an environment variable, as run_all.sh has always taken them (docs/study.md).
A stage whose output exists is done (outputs appear only once complete) when it was made with the
settings asked for now (stage_check.py); otherwise the study stops with exit code 2 naming the stage,
the setting and both values, unless REDO=changed. The first-stage model a chain starts from is a node
of the graph (plan.json lists it, "kind": "choice"), decided once its sweep's validation results exist,
by the rule Table 1 uses too (chained_tuning.runs.choose_first_stage, re-exported by metrics.py).
"""
import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

from chained_tuning.common import UserError, die_on_user_error, write_json_atomic
from chained_tuning.data import tiny_base
from chained_tuning.study import stage_check
from chained_tuning.study.executors import (ROOT, LocalPool, SlurmPool, StageJob, free_port, log_path, make_executor,
                                            remove_stale_tmp, say, torchrun_across_nodes, with_port)
from chained_tuning.study.graph import (KINDS, TRAINING, Builder, Graph, Stage, choose_first_stage, data_args,
                                        decide_first_stage, launcher, lr_of, split_chain, val_acc)
from chained_tuning.study.plan import (CURVATURE_PRODUCTS, GENERATED_TOKENS, TokenCounter, checkpoint_bytes,
                                       makespan, model_shape, plan, print_plan, stage_gpu_seconds, stage_tokens,
                                       state_of, status)
from chained_tuning.study.profiles import (PROFILES, Settings, check_mitigations, method_settings, settings,
                                           visible_gpus)

__all__ = [  # what `import study` has always offered, wherever it lives now
    "ROOT", "LocalPool", "SlurmPool", "StageJob", "free_port", "log_path", "make_executor", "remove_stale_tmp", "say",
    "torchrun_across_nodes", "with_port", "KINDS", "TRAINING", "Builder", "Graph", "Stage", "choose_first_stage",
    "data_args", "decide_first_stage", "launcher", "lr_of", "split_chain", "val_acc", "CURVATURE_PRODUCTS",
    "GENERATED_TOKENS", "TokenCounter", "checkpoint_bytes", "makespan", "model_shape", "plan", "print_plan",
    "stage_gpu_seconds", "stage_tokens", "state_of", "status", "PROFILES", "Settings", "check_mitigations",
    "settings", "visible_gpus", "UserError", "STOP_HINT", "tail", "weights_dropped", "Run", "write_study_json",
    "summary_step", "run_study", "main"]

STOP_HINT = ("choose one: another RUNS folder for these settings (RUNS=runs/<new> bash run_all.sh); the settings "
             "those outputs were made with; or REDO=changed to make those stages again in {runs} (the stages "
             "built on them follow). study.json and the results were left as they were.")


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
        "keep_weights": c.keep_weights, "test_set": c.test_set, "method": c.method,
        "lora": " ".join(c.lora_args) or None})


def summary_step(c, name, cmd, out_line):
    say(out_line)
    log = f"{c.runs}/logs/{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return rc, log


def prepare_base(c):
    """The tiny base built (once, then cached), or the paper profile's disk said; False: the base failed."""
    if c.model == "tiny":
        say(f"base: tiny Llama (built once, then cached) -> {tiny_base.tiny_base_path()}")
        with open(f"{c.runs}/logs/base-tiny.log", "w") as f:
            if subprocess.run([c.py, "-m", "chained_tuning.data.tiny_base"], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT).returncode:
                say(f"FAILED: base (log: {c.runs}/logs/base-tiny.log)")
                return False
    elif c.profile == "paper":
        try:
            p = plan(c)
            say(f"disk this study will need: {p['totals']['disk_bytes'] / 1e9:,.1f} GB "
                f"(KEEP_WEIGHTS={c.keep_weights}); "
                f"{p['totals']['gpu_hours']:,} GPU-hours still to run (python study.py --dry_run: the plan)")
        except UserError as e:
            say(f"disk this study will need: unknown ({e})")
    return True


def run_summaries(c, run):
    """order.py (when curvature was measured) and metrics.py: run every time, on everything there is."""
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


def run_study(c):
    t0 = time.time()
    os.makedirs(f"{c.runs}/logs", exist_ok=True)
    open(f"{c.runs}/logs/failed.txt", "w").close()
    open(f"{c.runs}/logs/settings_mismatch.txt", "w").close()
    if c.jobs > 1:  # small models gain nothing from a second thread: run JOBS stages side by side instead
        os.environ["OMP_NUM_THREADS"] = "1"
    say(f"study: profile {c.profile}, model {c.model}, data {c.data_dir or 'synthetic'}, seeds [{' '.join(c.seeds)}], "
        f"lrs [{' '.join(c.lrs)}] (main {c.main_lr}; {c.lr_note}) -> {c.runs}")
    if not prepare_base(c):
        return 1
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
    run_summaries(c, run)
    say(f"study finished in {int(time.time() - t0)}s; report: {c.runs}/results/report.md")
    failed = open(failfile).read().split("\n")[:-1]
    if failed:
        say(f"{len(failed)} stage(s) failed or were skipped: {' '.join(failed)} ")
        return 1
    return 0


def run_methods(c):
    """METHOD=both: the study with full fine-tuning in $RUNS/full, with LoRA in $RUNS/lora, then their comparison
    (metrics.py --methods -> $RUNS/results/methods.md); one method: the study in $RUNS."""
    if c.method != "both":
        return run_study(c)
    halves = method_settings(c)
    rcs = [run_study(cm) for _, cm in halves]
    if max(rcs) in (2, 130):
        return max(rcs)
    os.makedirs(f"{c.runs}/logs", exist_ok=True)
    spec = ",".join(f"{m}={cm.runs}" for m, cm in halves)
    rc, log = summary_step(c, "methods", [c.py, "metrics.py", "--methods", spec, "--out", f"{c.runs}/results"],
                           f"LoRA against full fine-tuning -> {c.runs}/results/methods.md")
    if rc:
        say(f"FAILED: the comparison of the methods (log: {log})")
        for line in tail(log):
            print(f"    {line}", flush=True)
    return max(rcs + [1 if rc else 0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Settings: environment variables. The manual: docs/study.md.")
    p.add_argument("profile", nargs="?", default=None, help="tiny, real-tiny or paper (or PROFILE=...)")
    p.add_argument("--dry_run", action="store_true", help="print the plan and write $RUNS/plan.json; runs nothing")
    p.add_argument("--status", action="store_true", help="print the graph and each stage's state; runs nothing")
    args = p.parse_args(argv)

    def go():
        c = settings(os.environ, args.profile)
        halves = [cm for _, cm in method_settings(c)] if c.method == "both" else [c]
        if args.dry_run:
            for cm in halves:
                pl = plan(cm)
                os.makedirs(cm.runs, exist_ok=True)
                write_json_atomic(f"{cm.runs}/plan.json", pl)
                print_plan(pl)
            return 0
        if args.status:
            return max(status(cm) for cm in halves)
        return run_methods(c)
    return die_on_user_error(go)


if __name__ == "__main__":
    sys.exit(main())
