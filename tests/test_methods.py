"""LoRA against full fine-tuning (metrics.py --methods): the paired sign-flip test by hand, its error rate on null
data, the verdicts on hand-built halves, and the refusals of halves that do not compare."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from chained_tuning.statistics import paired_sign_flip_test

CHAINS = [("toxigen", "arc"), ("toxigen", "csqa"), ("toxigen", "csqa2"), ("bbq", "arc"), ("bbq", "csqa"),
          ("bbq", "csqa2"), ("arc", "toxigen")]
STUDY = {"profile": "tiny", "model": "tiny", "data_dir": "synthetic", "seeds": ["0"], "steps": 100,
         "eval_limit": "200", "capability_tasks": ["arc", "csqa", "csqa2"], "safety_tasks": ["toxigen", "bbq"],
         "first_stage": "best", "test_set": "fraction", "lrs": [0.001]}


def test_sign_flip_p_by_hand():
    # |d| = 3, 1.5, 2, 0.5: sums at or below the observed -6 are -7 and -6: 2 of the 16 sign patterns
    t = paired_sign_flip_test([-3.0, -1.5, -2.0, 0.5])
    assert t["exact"] and t["n"] == 4 and t["mean"] == -1.5 and t["p_value"] == pytest.approx(2 / 16)
    assert paired_sign_flip_test([-1.0] * 5)["p_value"] == pytest.approx(1 / 32)
    assert paired_sign_flip_test([1.0, float("nan"), 2.0])["p_value"] == 1.0  # nan left out; mean above 0
    assert np.isnan(paired_sign_flip_test([-1.0])["p_value"])
    sampled = paired_sign_flip_test([-1.0] * 20, n_permutations=999, seed=3)
    assert not sampled["exact"] and sampled["p_value"] == pytest.approx(1 / 1000)


def test_sign_flip_holds_its_level_on_null_differences():
    """200 seeded sets of 10 differences symmetric about 0: rejections at 0.05 at most 0.05 + a binomial margin."""
    rng = np.random.default_rng(0)
    rejections = sum(paired_sign_flip_test(rng.normal(0, 3, 10))["p_value"] < 0.05 for _ in range(200))
    assert rejections / 200 <= 0.05 + 0.04
    shifted = sum(paired_sign_flip_test(rng.normal(-3, 1, 10))["p_value"] < 0.05 for _ in range(50))
    assert shifted == 50


def half(root, method, forgetting, variance, study=None):
    d = root / method
    (d / "results").mkdir(parents=True)
    (d / "study.json").write_text(json.dumps({**STUDY, "method": method, **(study or {})}))
    rows = [{"first_task": a, "second_task": b, "forgetting (%)": f, "group_variance_pts2": v}
            for (a, b), f, v in zip(CHAINS, forgetting, variance)]
    pd.DataFrame(rows).to_csv(d / "results" / "biased_forgetting.csv", index=False)
    return str(d)


def metrics(*args):
    return subprocess.run([sys.executable, "metrics.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_lora_forgetting_less_in_every_chain_is_reproduced_and_three_groups_are_not_testable(tmp_path):
    full = half(tmp_path, "full", [50, 40, 30, 20, 25, 35, 10], [120, 80, 60, "n/a", "n/a", "n/a", "n/a"])
    lora = half(tmp_path, "lora", [45, 30, 28, 10, 20, 30, 8], [100, 90, 30, "n/a", "n/a", "n/a", "n/a"])
    out = tmp_path / "results"
    r = metrics("--methods", f"full={full},lora={lora}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(out / "methods.csv")
    assert list(rows["forgetting_difference (%)"]) == [-5, -10, -2, -10, -5, -5, -2]
    f = pd.read_csv(out / "methods_findings.csv")
    # 7 differences all below 0: exact p = 1 / 2^7
    assert f.verdict[0] == "reproduced" and "p = 0.00781" in f.evidence[0] and "7 comparisons" in f.evidence[0]
    assert f.evidence[0].startswith("Rule: paired sign-flip permutation test")
    # the variance: 3 grouped chains, smallest attainable p 1/8 > 0.05
    assert f.verdict[1] == "not testable here" and "0.125" in f.evidence[1]
    assert (out / "figure_methods.png").stat().st_size > 0 and (out / "figure_methods.csv").is_file()
    assert "LoRA forgets the first task less than full fine-tuning: reproduced" in r.stdout
    assert "## Findings" in (out / "methods.md").read_text()


def test_mixed_differences_are_not_reproduced(tmp_path):
    full = half(tmp_path, "full", [50, 40, 30, 20, 25, 35, 10], ["n/a"] * 7)
    lora = half(tmp_path, "lora", [55, 30, 35, 10, 30, 30, 12], ["n/a"] * 7)
    r = metrics("--methods", f"full={full},lora={lora}", "--out", str(tmp_path / "results"))
    assert r.returncode == 0, r.stderr
    f = pd.read_csv(tmp_path / "results" / "methods_findings.csv")
    assert f.verdict[0] == "not reproduced" and f.verdict[1] == "not testable here"


@pytest.mark.parametrize("what, study, message", [
    ("seeds", {"seeds": ["0", "1"]}, "seeds: full ['0'], lora ['0', '1']"),
    ("method", {"method": "full"}, "its study.json says METHOD=full"),
])
def test_halves_that_do_not_compare_are_refused_by_name(tmp_path, what, study, message):
    full = half(tmp_path, "full", [50] * 7, ["n/a"] * 7)
    lora = half(tmp_path, "lora", [40] * 7, ["n/a"] * 7, study=study)
    out = tmp_path / "results"
    r = metrics("--methods", f"full={full},lora={lora}", "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_methods_flag_errors(tmp_path):
    r = metrics("--methods", "full=a,lora", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "give full=RUNS_DIR,lora=RUNS_DIR" in r.stderr
    r = metrics("--methods", f"full={tmp_path},lora={tmp_path}", "--runs", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "give --runs RUNS_DIR" in r.stderr
    r = metrics("--methods", f"full={tmp_path / 'x'},lora={tmp_path / 'y'}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and os.path.join(str(tmp_path / "x"), "study.json") in r.stderr
