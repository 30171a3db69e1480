"""Shared fixtures: the repo on sys.path, the tiny base (built once, cached), a tuned checkpoint,
and a helper that runs a script as a user would (subprocess, exit code, output)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"real datasets not found at {DATA} (../shared/data)")


def run_script(*args, env=None, timeout=600):
    """Run `python <script> args...` from the repo root; returns CompletedProcess (text)."""
    e = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=e, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_path():
    from chained_tuning.data.tiny_base import ensure_tiny_base
    return ensure_tiny_base()


@pytest.fixture(scope="session")
def tuned_toxigen(tiny_path, tmp_path_factory):
    """A first-stage toxigen model (40 steps): its answer loss is far below the base's (not its accuracy)."""
    from finetune import train_stage
    out = str(tmp_path_factory.mktemp("ckpt") / "toxigen")
    train_stage({"model": "tiny", "task": "toxigen", "out": out, "steps": 40, "train_size": 640})
    return out
