"""The scorer as a copy unit: chained_tuning/scorer.py copied alone into an empty folder scores a tiny random
Llama there (python -E: nothing of the repository on the path), its fast and kv scorers giving the naive
scorer's log-likelihoods, with both attention kernels that take a tree mask (sdpa, eager)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

USE = r'''
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import scorer

results = {}
for impl in ("sdpa", "eager"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         attn_implementation=impl)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(4, 64, (n,), generator=g).tolist()
    reqs = []
    for e in range(9):  # options of 1-3 own tokens after 0-2 shared ones; prompts long enough to be cut
        prompt, shared = ids(3 + e), ids(e % 3)
        reqs.append([scorer.request(prompt, shared + ids(1 + (i + e) % 3), 12) for i in range(2 + e % 3)])
    results[impl] = {name: fn(model, reqs, 4, 0, "cpu") for name, fn in scorer.SCORERS.items()}
    results[impl]["lengths"] = [[len(seq) for seq, _ in opts] for opts in reqs]
records = [{"correct": c, "label": 0, "logliks": [-2.0, -1.0], "n_tokens": [2, 1], "group": g}
           for c, g in ((True, "a"), (False, "a"), (True, "b"))]
results["summary"] = scorer.summarize("arc", records, "random", "test")
results["project_modules"] = sorted(m for m in sys.modules if m.startswith("chained_tuning"))
print(json.dumps(results))
'''


def test_scorer_copied_alone_scores_a_random_llama(tmp_path):
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(os.path.join(ROOT, "chained_tuning", "scorer.py"), folder / "scorer.py")  # the stated copy set
    (folder / "use_scorer.py").write_text(USE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-E", "use_scorer.py"], cwd=folder, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["project_modules"] == []
    for impl in ("sdpa", "eager"):
        scores, lengths = res[impl], res[impl]["lengths"]
        assert max(n for opts in lengths for n in opts) == 12  # the cut prompts: at most max_length tokens
        for e, naive in enumerate(scores["naive"]):
            for name in ("fast", "kv"):
                assert scores[name][e] == pytest.approx(naive, abs=1e-4), (impl, name, e)
                assert max(range(len(naive)), key=naive.__getitem__) == max(
                    range(len(naive)), key=scores[name][e].__getitem__)
    s = res["summary"]
    assert s["acc"] == pytest.approx(2 / 3) and s["n"] == 3 and s["loss"] == pytest.approx(6 / 6)
    assert s["groups"] == {"a": {"acc": 0.5, "n": 2}, "b": {"acc": 1.0, "n": 1}}
