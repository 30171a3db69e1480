"""chained_tuning/statistics.py: the corrections against values by hand, the permutation test of uneven forgetting
on tables built by hand, and Kendall's tau summary. Fast (numpy only, no runs)."""
import numpy as np
import pytest
from pytest import approx
from scipy import stats as scipy_stats

from chained_tuning import statistics as st
from chained_tuning.report.findings import finding_kendall


def test_holm_by_hand():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> raised to 0.06 (monotone)
    assert list(st.holm([0.01, 0.04, 0.03])) == approx([0.03, 0.06, 0.06])
    assert list(st.holm([0.5, 0.9])) == approx([1.0, 1.0])  # capped at 1
    out = st.holm([0.02, float("nan"), 0.01])  # nan is not a comparison: m = 2
    assert out[0] == approx(0.02) and np.isnan(out[1]) and out[2] == approx(0.02)


def test_bh_by_hand_and_scipy():
    # sorted 0.01, 0.03, 0.04 (m = 3): 0.03, 0.045, 0.04 -> step-up min from the top: 0.03, 0.04, 0.04
    assert list(st.benjamini_hochberg([0.01, 0.04, 0.03])) == approx([0.03, 0.04, 0.04])
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random(rng.integers(1, 30)) ** 3
        assert list(st.adjust(p, "bh")) == approx(list(scipy_stats.false_discovery_control(p, method="bh")))
    with pytest.raises(ValueError):
        st.adjust([0.1], "bonferroni")


def test_permutation_p_plus_one():
    assert st.permutation_p([0.1, 0.2, 0.3], 0.5) == approx(1 / 4)
    assert st.permutation_p([0.1, 0.2, 0.3], 0.2) == approx(3 / 4)


def _even_table(rng, n_groups=6, per_group=60):
    """Every example forgets with the same chance whatever its group: forgetting is even by construction."""
    n = n_groups * per_group
    first = (rng.random(n) < 0.8).astype(float)
    chained = first * (rng.random(n) < 0.7)
    groups = [f"g{i % n_groups}" for i in range(n)]
    return first, chained, groups


def test_even_groups_false_positive_rate():
    rng = np.random.default_rng(2026)
    hits = 0
    for seed in range(200):
        first, chained, groups = _even_table(rng)
        res = st.group_permutation_test(first, chained, groups, n_permutations=199, seed=seed)
        hits += res["p_value"] < 0.05
    assert hits / 200 <= 0.10


def test_one_worse_group_detected():
    rng = np.random.default_rng(7)
    first, chained, groups = _even_table(rng)
    worse = np.array([g == "g3" for g in groups])
    chained[worse] = 0.0  # group g3 forgets everything it knew
    res = st.group_permutation_test(first, chained, groups, n_permutations=500, seed=0)
    assert res["p_value"] < 0.01 and res["variance_excess"] > 0 and res["variance_ratio"] > 2
    adj = st.holm([res["groups"][g]["p_value"] for g in sorted(res["groups"])])
    assert adj[sorted(res["groups"]).index("g3")] < 0.05 and res["groups"]["g3"]["gap"] > 0


def test_permutation_by_hand_and_seeded():
    # groups a: forgets 1, 1; b: 0, 0 -> per-group forgetting 1 and 0, variance 0.25, range 1
    res = st.group_permutation_test([1, 1, 1, 1], [0, 0, 1, 1], ["a", "a", "b", "b"], n_permutations=100, seed=3)
    assert res["variance"] == approx(0.25) and res["range"] == approx(1.0) and res["n_groups"] == 2
    # 6 labellings, 2 of them as extreme as the observed one: p near (100 / 3 + 1) / 101
    assert 0.2 < res["p_value"] < 0.5
    again = st.group_permutation_test([1, 1, 1, 1], [0, 0, 1, 1], ["a", "a", "b", "b"], n_permutations=100, seed=3)
    assert again["p_value"] == res["p_value"]
    one = st.group_permutation_test([1, 1], [0, 1], ["a", "a"], n_permutations=50)
    assert np.isnan(one["p_value"])  # one group: nothing to compare


def test_constant_rankings_not_testable():
    s = st.tau_summary([float("nan"), float("nan"), 0.6], [float("nan"), float("nan"), 0.01])
    assert s["n_undefined"] == 2 and s["n_defined"] == 1 and not s["testable"]
    ok = st.tau_summary([0.8, 0.7], [0.01, 0.02])
    assert ok["testable"] and ok["consistent"] and list(ok["p_adjusted"]) == approx([0.02, 0.02])
    csv = ("first_task,second_task_1,second_task_2,n_groups,tau_b,p_value\n"
           "bbq,arc,csqa,3,n/a,n/a\nbbq,arc,csqa2,3,n/a,n/a\nbbq,csqa,csqa2,3,0.59,0.028\n")
    claim, verdict, detail = finding_kendall({"kendall_tau.csv": csv}, 0.05)
    assert verdict == "not testable here"
    assert "2 of 3 undefined" in detail and "Holm" in detail and "threshold" in detail


def test_correction_flag_checked_before_any_work(tmp_path, capsys):
    import metrics
    with pytest.raises(SystemExit) as e:  # argparse refuses it before the runs folder is read
        metrics.main(["--runs", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), "--correction", "bonf"])
    assert e.value.code == 2 and "--correction" in capsys.readouterr().err
    opts = metrics.build_parser().parse_args(["--runs", "r", "--out", "o"])
    assert opts.correction == "holm" and opts.n_perm == 2000
    assert metrics.build_parser().parse_args(["--runs", "r", "--out", "o", "--correction", "bh"]).correction == "bh"
