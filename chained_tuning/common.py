"""The small helpers every stage shares, each in one place (a leaf: it imports nothing of the project, and torch
only inside functions): user errors and the one CLI handler, argument checks, atomic writes, the id hash, seeded
draws with named streams, torchrun set-up, run metadata, progress lines.

    from chained_tuning.common import UserError, die_on_user_error, write_json_atomic
    die_on_user_error(lambda: write_json_atomic("out.json", {"a": 1}))   # a UserError: one `error:` line, exit 2
"""
import argparse
import contextlib
import fractions
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np


class UserError(Exception):
    """Bad input from the user: scripts print the message (no traceback) and exit 2."""


def die_on_user_error(main):
    """Run main(); turn a UserError into one `error:` line and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Argument checks, made before any data or model is loaded. A rule is (predicate, what is allowed); each
# script lists its numeric options in one table {option: rule}; None (an optional left unset) passes.

POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")


def in_range(lo, hi, open_lo=False, open_hi=False):
    """A rule for lo <= v <= hi (either end open on request), e.g. in_range(0, 1, open_lo=True): (0, 1]."""
    def ok(v):
        return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)
    return ok, f"in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"


def check_args(values, rules):
    """Refuse the first value that breaks its rule: UserError naming --option, the value and what is
    allowed. NaN and infinities are refused by every rule (a NaN compares false, an infinite lr trains)."""
    for name, (ok, allowed) in rules.items():
        v = values.get(name)
        if v is None:
            continue
        if not (math.isfinite(v) and ok(v)):
            raise UserError(f"--{name} must be {allowed}, got {v if isinstance(v, int) else f'{v:g}'}")


def check_device(name, flag="--device"):
    """The torch.device for --device: cpu, cuda or cuda:N, checked against this torch and machine (None:
    cuda when available, else cpu). An unusable one is a UserError here, not an error deep in a load."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not m:
        raise UserError(f"{flag} {name!r} is not a device; use cpu, cuda or cuda:N")
    if name != "cpu":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"{flag} {name}: {why}; use {flag} cpu")
        n = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise UserError(f"{flag} {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return torch.device(name)


def check_out(path, overwrite, flag="--out", kind="file", example="eval.json"):
    """The one overwrite rule: an existing output is refused unless --overwrite; a file where a folder is
    wanted (or the reverse) is refused either way. Called before anything is loaded."""
    if not os.path.lexists(path):
        if kind == "file" and path.endswith(("/", os.sep)):
            raise UserError(f"{flag} {path} ends with a slash; give a file path")
        return
    if kind == "file" and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file path (e.g. {os.path.join(path, example)})")
    if kind == "dir" and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a folder")
    if not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another {flag}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default; an option whose default is None says in its help what unset means."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def write_text_atomic(path, text, suffix=".tmp", mode=None):
    """Write `text` (or bytes) to a temporary name beside `path`, then rename: readers never see half a file,
    and a failed write leaves nothing. mode: the file's permissions (default: mkstemp's, owner only)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    """JSON (indent 2, a final newline), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", suffix=".json")


def write_jsonl_atomic(path, rows):
    """One JSON object a line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows), suffix=".jsonl")


def read_json(path):
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(final_dir, overwrite=False):
    """Yield a temporary folder beside `final_dir`; rename it into place only if the block succeeds.

    A crashed or interrupted run leaves no `final_dir`, so "the folder exists" means "the stage is
    complete" (run_all.sh relies on that to resume)."""
    final_dir = os.path.abspath(final_dir)
    if os.path.exists(final_dir) and not overwrite:
        raise UserError(f"{final_dir} already exists; pass --overwrite to replace it or choose another --out")
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(final_dir)}-")
    try:
        yield tmp
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ids_sha256(ids):
    """The hash that names an example set in every record: sha256 of its ids, one a line, in order."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


# -----------------------------------------------------------------------------
# Seeded draws. Each use of a run's seed draws from its own numpy stream, default_rng([seed, k]) (the batch
# order: default_rng(seed)), so adding a draw never moves another. The numbers are part of every run_id's
# data: never renumber one.
STREAMS = {"batch_order": None, "replay": 1, "mix_positions": 2, "ewc": 3, "train_fraction": 5}


def seeded_rng(seed, stream):
    """The numpy generator of the named stream (see STREAMS) for this seed."""
    k = STREAMS[stream]
    return np.random.default_rng(seed if k is None else [seed, k])


def seeded_samples(items, n, seed, stream):
    """The first n items of a permutation drawn from the named stream (all of them if fewer), in their
    original order. Subsets of one seed and stream are nested: the first n lie inside the first n + 1."""
    keep = sorted(seeded_rng(seed, stream).permutation(len(items))[:n].tolist())
    return [items[i] for i in keep]


def exact(x):
    """A float read as the decimal it prints as (0.05 -> 1/20), so proportions round exactly."""
    return fractions.Fraction(str(x))


def round_half_up(q):
    return math.floor(q + fractions.Fraction(1, 2))


def sample_indices(n_items, n, seed):
    """Sorted indices of n of n_items (all of them if fewer), chosen by random.Random(seed): curvature.py's
    sample of training examples (its own scheme, kept: changing it changes every curvature result)."""
    return sorted(random.Random(seed).sample(range(n_items), min(n, n_items)))


# -----------------------------------------------------------------------------
# Processes under torchrun


# A 13 GB checkpoint written by process 0 while the others wait: NCCL's 10-minute default is too short.
DEFAULT_TIMEOUT_MIN = 60.0


def under_torchrun():
    return int(os.environ.get("RANK", -1)) != -1


def torchrun_rank_world():
    """(rank, number of processes) under torchrun; (0, 1) in a plain process."""
    if not under_torchrun():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def setup_process_group(device, timeout=None):
    """Under torchrun: this process's device (cuda:LOCAL_RANK when `device` is a cuda device) and the process
    group (nccl on cuda, gloo on cpu), unless one is already set up (a caller may hold one across several
    stages). Returns (device, whether this call set the group up: then the caller destroys it)."""
    import torch
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device, True


def end_process_group(owned, finished):
    """Tear down a process group this stage set up (owned). finished: the stage ran to its end here, so every
    process first waits for the others (one process destroying gloo while another still wrote its files aborted
    at exit: "terminate called without an active exception"); after an error none waits (the others may never
    come)."""
    import torch.distributed as dist
    if not owned or not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata():
    import torch
    import transformers
    return {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__},
            "git_commit": git_commit()}


def progress(iterable, desc, total=None, disable=False, every_s=30.0, min_s=1.0, file=None, **tqdm_kwargs):
    """A progress bar for a loop: tqdm when stderr is a terminal; anywhere else (a log file: a bar there is
    one long line of carriage returns) a plain line `desc: k/n (p%) elapsed ..., eta ...` each time the
    loop passes another 10% of `total` (len(iterable) if it has one) and min_s seconds have passed since
    the last line (a loop of a few seconds gives a few lines), or every `every_s` seconds, and at the end.
    Both support .set_postfix(**values). TQDM_DISABLE=1 in the environment silences both."""
    file = sys.stderr if file is None else file
    disable = disable or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    if not disable and getattr(file, "isatty", lambda: False)():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, file=file, **tqdm_kwargs)
    return LogProgress(iterable, desc, total, file, every_s, min_s, disable)


def _duration(s):
    return f"{s:.1f}s" if s < 60 else f"{int(s) // 60}m{int(s) % 60:02d}s"


class LogProgress:
    """progress() off a terminal: whole lines, one per tenth of the loop (at most one per min_s seconds) or
    per every_s seconds."""

    def __init__(self, iterable, desc, total, file, every_s=30.0, min_s=1.0, quiet=False):
        self.iterable, self.desc, self.file, self.quiet = iterable, desc, file, quiet
        self.every_s, self.min_s = every_s, min_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, k, elapsed):
        if self.total:
            eta = elapsed / k * (self.total - k) if k else 0.0
            head = f"{self.desc}: {k}/{self.total} ({100 * k / self.total:.0f}%) elapsed {_duration(elapsed)}, " \
                   f"eta {_duration(eta)}"
        else:
            head = f"{self.desc}: {k} elapsed {_duration(elapsed)}"
        print(head + (f", {self.postfix}" if self.postfix else ""), file=self.file, flush=True)

    def __iter__(self):
        import time
        t0 = last = time.monotonic()
        k = shown = 0
        for item in self.iterable:
            yield item  # item k+1 is done once the loop asks for the next one
            k += 1
            if self.quiet:
                continue
            now = time.monotonic()
            tenth = self.total and 10 * k // self.total > 10 * shown // self.total
            if (tenth and now - last >= self.min_s) or now - last >= self.every_s:
                self._line(k, now - t0)
                shown, last = k, now
        if not self.quiet and k != shown:
            self._line(k, time.monotonic() - t0)
