"""Where the study's stages run: a local pool of JOBS stages on this machine (each with GPUS_PER_STAGE
devices and a rendezvous port of its own), or Slurm through submitit (each stage a job, on as many nodes
as its GPUs need; the job ids kept in $RUNS/slurm/jobs.json so a driver run again finds its jobs).

An executor answers can_start, attach (a job of an earlier driver), start, is_running, running, wait,
wait_all and stop; study.py's driver calls nothing else.
"""
import glob
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

from ..common import UserError, write_json_atomic
from .graph import Stage

# The folder of the stage scripts (finetune.py, ...): every stage's command runs there
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
        # a job unpickles its StageJob by value: it imports nothing of this package, so it starts in any folder
        # (as when the class lived in study.py, pickled from __main__)
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__.partition(".")[0]])

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

