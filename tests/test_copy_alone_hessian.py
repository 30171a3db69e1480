"""The Hessian library as a copy unit (its copy set: chained_tuning/hessian/__init__.py). Exactly the folder
hessian/, copied into an empty folder under its own name and another, gives there, in a fresh interpreter (-E, cwd
that folder), the spectral radius of a small torch model's answer-token loss that the dense Hessian gives, on plain
PyTorch where the C++ library is not beside it; and a copy imported beside the package registers no op twice."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

HESSIAN = os.path.join(ROOT, "chained_tuning", "hessian")

SPECTRUM = """
import json, sys
import torch
import torch.nn.functional as F
from torch.func import functional_call
from {pkg}.spectrum import hessian_spectrum
from {pkg}.measures import MeasureOptions, spectral_measures

VOCAB = 11


class TinyLM(torch.nn.Module):
    # embedding -> tanh layer -> vocabulary: logits at every position, as a causal LM's forward returns them
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 5)
        self.mix = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return (self.head(torch.tanh(self.mix(self.emb(input_ids)))),)


def batch(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, T - 3:] = ids[:, T - 3:]
    return {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}}


torch.manual_seed(0)
model = TinyLM().double()
batches = [batch(3, 7, 1), batch(2, 5, 2)]
names = [n for n, _ in model.named_parameters()]
shapes = [p.shape for p in model.parameters()]
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def loss(x):
    params, off = {{}}, 0
    for n, s in zip(names, shapes):
        params[n] = x[off:off + s.numel()].view(s)
        off += s.numel()
    total = 0
    for b in batches:
        logits = functional_call(model, params, (b["input_ids"],))[0]
        total = total + F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1),
                                        ignore_index=-100, reduction="sum")
    return total / tokens


dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
r, op = hessian_spectrum(model, batches, rtol=1e-9, max_iter=200, stop="both", return_operator=True)
top = spectral_measures(op, ["topk"], MeasureOptions(topk=2, max_steps=200, rtol=1e-10))["topk"]
print(json.dumps({{"rho": r["rho"], "lambda_max": r["lambda_max"], "lambda_min": r["lambda_min"],
                  "dense_rho": float(dense.abs().max()), "dense_max": float(dense[-1]), "dense_min": float(dense[0]),
                  "converged": r["converged"], "backend": r["backend"], "hvp_count": r["hvp_count"],
                  "iterations": r["iterations"], "top": [top["largest"], top["smallest"]],
                  "dense_top": [dense.flip(0)[:2].tolist(), dense[:2].tolist()],
                  "project": sorted(m for m in sys.modules if m.split(".")[0] in ("chained_tuning", "transformers"))}}))
"""


def copy_alone(folder, name):
    folder.mkdir()
    shutil.copytree(HESSIAN, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def run_in(folder, code, **env):
    # -E: no PYTHONPATH, so nothing comes from the repository, only from `folder`
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-E", "-c", code], cwd=folder, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("name", ["hessian", "myhessian"])
def test_the_folder_alone_gives_the_dense_spectral_radius(tmp_path, name):
    folder = copy_alone(tmp_path / "alone", name)
    copied = sorted(os.path.relpath(os.path.join(d, f), folder / name) for d, _, fs in os.walk(folder / name)
                    for f in fs)
    assert copied == sorted(f for f in os.listdir(HESSIAN) if f.endswith(".py"))
    r = run_in(folder, SPECTRUM.format(pkg=name), CURVATURE_EXT="auto")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["project"] == []  # torch (and numpy) only
    assert out["converged"] and out["hvp_count"] == out["iterations"]
    assert abs(out["rho"] - out["dense_rho"]) <= 1e-7 * out["dense_rho"]
    assert abs(out["lambda_max"] - out["dense_max"]) <= 1e-7 * out["dense_rho"]
    assert abs(out["lambda_min"] - out["dense_min"]) <= 1e-7 * out["dense_rho"]
    for got, want in zip(out["top"], out["dense_top"]):  # measures.py travels with the folder
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-7 * out["dense_rho"]
    # no csrc/ beside the copy: plain PyTorch, recorded as such
    assert out["backend"]["extension"] == "none" and out["backend"]["step"] == "torch"
    assert out["backend"]["extension_detail"].startswith("plain PyTorch fallback")


SECOND_COPY = """
import sys, warnings
import torch
sys.path.insert(0, {root!r})
from chained_tuning.hessian import ops
state = ops.load_extension()
if not state["ok"]:
    print("unavailable: " + state["detail"])
    sys.exit(0)
with warnings.catch_warnings(record=True) as caught:  # an op registered twice warns that it overrides the first
    warnings.simplefilter("always")
    from myhessian import ops as copy
    assert copy.load_extension()["name"] == "preloaded"
    copy._register_python_side()
assert not [w for w in caught if "Overrid" in str(w.message)], [str(w.message) for w in caught]
x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
y = torch.tensor([1, -100, 3, 0])
(g,) = torch.autograd.grad(copy.softmax_xent(x, y, -100)[0].sum(), x, create_graph=True)
(h,) = torch.autograd.grad(g.sum(), x)
ref = torch.func.hessian(lambda z: torch.nn.functional.cross_entropy(z, y, ignore_index=-100, reduction="sum"))(x)
assert torch.allclose(h, ref.sum((2, 3)), atol=1e-10)
print("ok")
"""


def test_a_second_copy_registers_nothing_twice(tmp_path):
    folder = copy_alone(tmp_path / "two", "myhessian")
    r = run_in(folder, SECOND_COPY.format(root=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.startswith("unavailable"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.strip() == "ok" and "Overriding" not in r.stderr
