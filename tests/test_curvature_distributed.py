"""curvature.py under torchrun: two gloo processes (samples split across them, solver vectors sharded) against
one process and against the dense float64 Hessian.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_curvature_distributed.py
This file is also the two processes' script: `python -m torch.distributed.run --nproc_per_node=2
tests/test_curvature_distributed.py OUT.json` writes what rank 0 computed.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curvature as C  # noqa: E402
from test_curvature import batches, dense_hessian, make_batch, tiny_llama  # noqa: E402

KEYS = ("lambda_max", "lambda_min", "rho")


def many():
    return [make_batch(3, 10, s) for s in range(4)]  # 12 samples: the subsample warm start is the default


def delta_for(model):
    g = torch.Generator().manual_seed(7)
    return [1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def compute():
    """What both sides compute: a tight solve of batches() (both ends), the default solve of many(), and the
    quadratic form of a fixed direction through the default solve's operator."""
    model = tiny_llama()
    tight = C.hessian_spectrum(model, batches(), rtol=1e-9, max_iter=400, stop="both")
    layerwise = C.hessian_spectrum(model, batches(), rtol=1e-9, max_iter=400, stop="both",
                                   gradient_checkpointing="on")  # every HVP one decoder layer at a time
    default, op = C.hessian_spectrum(model, many(), return_operator=True)
    d = delta_for(model)
    d = op.local(d) if isinstance(op, C.ShardedOperator) else d
    quad = op.dot(d, op.hvp(d))
    pick = lambda r: {k: r[k] for k in KEYS + ("hvp_count", "sub_hvp_count", "loss", "error_bound",  # noqa: E731
                                               "distributed", "settings")}
    return {"tight": pick(tight), "layerwise": pick(layerwise), "default": pick(default), "quad": quad}


def cli_args(ref):
    return ["--model", "tiny", "--task", "arc", "--samples", "6", "--micro_batch_size", "3", "--reference", str(ref),
            "--device", "cpu"]


def worker(out, ref, cli_out):
    """compute() and then the command line's run_cli on the same process group (one torchrun start for both)."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    res = compute()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    C.run_cli(C.build_parser().parse_args(cli_args(ref) + ["--out", cli_out]))
    assert dist.is_initialized()  # run_cli leaves a group it did not set up
    dist.destroy_process_group()


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def perturbed_tiny(path):
    from chained_tuning import checkpoint

    model, tok = checkpoint.load_model_and_tokenizer("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def two(tmp):
    out, ref = tmp / "two.json", perturbed_tiny(tmp / "theta_ab")
    p = torchrun(os.path.abspath(__file__), str(out), str(ref), str(tmp / "cli_two.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("curvature: -> ") == 1  # progress lines from rank 0 only
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one():
    return compute()


def rel(a, b):
    return abs(a - b) / abs(b)


def test_two_processes_equal_one(one, two):
    for case in ("tight", "layerwise", "default"):
        a, b = one[case], two[case]
        assert b["distributed"]["world_size"] == 2 and a["distributed"] is None
        assert sum(b["distributed"]["samples_per_rank"]) == (12 if case == "default" else 5)
        assert a["settings"]["start_vector"] == b["settings"]["start_vector"]
        assert a["hvp_count"] == b["hvp_count"] and a["sub_hvp_count"] == b["sub_hvp_count"]
        for k in KEYS:
            assert rel(b[k], a[k]) <= 1e-6, (case, k, a[k], b[k])
        assert rel(b["loss"], a["loss"]) <= 1e-6  # HF's RMSNorm computes in float32
    assert two["default"]["settings"]["start_vector"] == "subsample"
    assert rel(two["quad"], one["quad"]) <= 1e-6


def test_both_match_the_dense_hessian(one, two):
    d = dense_hessian(tiny_llama(), batches())
    for r in (one["tight"], two["tight"], one["layerwise"], two["layerwise"]):
        assert rel(r["lambda_max"], d["lmax"]) <= 1e-5
        assert rel(r["lambda_min"], d["lmin"]) <= 1e-5
        assert rel(r["rho"], d["rho"]) <= 1e-5


def test_cli_under_torchrun_with_a_taylor_check(two, tmp):
    """The command line on two processes (sharded Taylor delta): the same spectrum and Taylor terms as in
    one, the files written once."""
    a = C.run_cli(C.build_parser().parse_args(cli_args(tmp / "theta_ab") + ["--out", str(tmp / "one.json")]))
    b = json.loads((tmp / "cli_two.json").read_text())
    assert b["distributed"]["world_size"] == 2 and b["hvp_count"] == a["hvp_count"]
    for k in KEYS:
        assert rel(b[k], a[k]) <= 1e-5  # float32 model: HVP sums in another order
    for k in ("delta_sq_norm", "quadratic_term", "actual_loss_change"):
        assert b["reference"][k] == pytest.approx(a["reference"][k], rel=1e-4)


if __name__ == "__main__":
    worker(*sys.argv[1:4])
