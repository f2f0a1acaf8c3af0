"""The trapezoid AUPRs (OpenOOD's AUPR-In / AUPR-Out) and the risk-coverage metrics of
ood_ray.selective: hand cases, brute-force re-derivations and peer implementations. Pure numpy
(pytorch-ood is a dev dependency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve

from ood_ray import metric_names as names
from ood_ray.compare import MethodResult, tables
from ood_ray.config import TrainConfig
from ood_ray.detector_eval import DetectorTable
from ood_ray.engine.evaluate import split_metrics
from ood_ray.metrics import ood_metrics
from ood_ray.selective import oracle_aurc, oracle_risk, risk_coverage_curve, selective_metrics
from ood_ray.train import TrainOutcome


def random_cases(n_cases=60, seed=0):
    """ID/OOD score pairs: continuous, rounded (many ties), constant, and -0.0 beside 0.0."""
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        a, b = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        s_in, s_out = rng.normal(0.8, 1.0, a), rng.normal(0.0, 1.0, b)
        if i % 3 == 1:
            s_in, s_out = np.round(s_in), np.round(s_out)
        if i % 10 == 2:
            s_in, s_out = np.zeros(a), -np.zeros(b)
        yield s_in, s_out


def openood_auprs(s_in, s_out):
    """OpenOOD v1.5's orientation: AUPR-In with ID positive on the score, AUPR-Out with OOD
    positive on -score, each auc(recall, precision) of precision_recall_curve."""
    is_in = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    p_in, r_in, _ = precision_recall_curve(is_in, s)
    p_out, r_out, _ = precision_recall_curve(1 - is_in, -s)
    return auc(r_in, p_in), auc(r_out, p_out)


# ---------------------------------------------------------------------------
# AUPR: trapezoid beside average precision
# ---------------------------------------------------------------------------


def test_trapezoid_aupr_hand_case():
    # ID 0.9 0.8 0.7 0.6 | OOD 0.65 0.5 0.4 0.3, ranking I I I O I O O O.
    # PR (ID positive): (0, 1) -> recall 3/4 at precision 1, then (3/4, 3/4), then (1, 4/5):
    #   3/4 * 1 + 1/4 * (3/4 + 4/5) / 2 = 3/4 + 31/160 = 151/160 (AP: 19/20).
    got = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.65, 0.5, 0.4, 0.3])
    assert got["aupr_in_trapz"] == pytest.approx(151 / 160, abs=1e-15)
    assert got["aupr_out_trapz"] == pytest.approx(151 / 160, abs=1e-15)  # the mirror image
    assert got["aupr_in"] == pytest.approx(19 / 20, abs=1e-15)


def test_trapezoid_can_be_below_average_precision():
    # ID 3, -1 | OOD 2, 1, 0. PR (ID positive): (1/2, 1), (1/2, 1/2), (1/2, 1/3), (1/2, 1/4), (1, 2/5).
    # trapezoid: 1/2 * 1 + 1/2 * (1/4 + 2/5) / 2 = 0.6625; AP: 1/2 * 1 + 1/2 * 2/5 = 0.7.
    got = ood_metrics([3.0, -1.0], [2.0, 1.0, 0.0])
    assert got["aupr_in_trapz"] == pytest.approx(0.6625, abs=1e-15)
    assert got["aupr_in"] == pytest.approx(0.7, abs=1e-15)


@pytest.mark.parametrize(("n_in", "n_out"), [(3, 2), (1, 9), (10, 10)])
def test_constant_scores_ap_is_the_share_trapezoid_is_one_plus_share_over_two(n_in, n_out):
    got = ood_metrics(np.full(n_in, 0.3), np.full(n_out, 0.3))
    p_in, p_out = n_in / (n_in + n_out), n_out / (n_in + n_out)
    assert got["aupr_in"] == pytest.approx(p_in, abs=1e-15)
    assert got["aupr_out"] == pytest.approx(p_out, abs=1e-15)
    assert got["aupr_in_trapz"] == pytest.approx((1 + p_in) / 2, abs=1e-15)
    assert got["aupr_out_trapz"] == pytest.approx((1 + p_out) / 2, abs=1e-15)


def test_trapezoid_equals_sklearn_auc_of_precision_recall_curve():
    for s_in, s_out in random_cases():
        got = ood_metrics(s_in, s_out)
        want_in, want_out = openood_auprs(s_in, s_out)
        assert got["aupr_in_trapz"] == pytest.approx(want_in, abs=1e-15)
        assert got["aupr_out_trapz"] == pytest.approx(want_out, abs=1e-15)
        # and today's keys stay average precision
        is_in = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
        assert got["aupr_in"] == average_precision_score(is_in, np.r_[s_in, s_out])


@pytest.mark.filterwarnings("ignore:AUTC is undefined")
def test_trapezoid_equals_pytorch_ood():
    import torch
    from pytorch_ood.metrics import OODMetrics  # a dev dependency: the comparison always runs

    worst = 0.0
    for s_in, s_out in random_cases(seed=1):
        # pytorch-ood: outlier scores (higher = more OOD), OOD labelled -1, ID >= 0
        metric = OODMetrics()
        metric.update(torch.tensor(-np.r_[s_in, s_out]), torch.tensor(np.r_[np.zeros(len(s_in)), -np.ones(len(s_out))]).long())
        peer = metric.compute()
        got = ood_metrics(s_in, s_out)
        for ours, theirs in (("aupr_in_trapz", "AUPR-IN"), ("aupr_out_trapz", "AUPR-OUT"), ("auroc", "AUROC")):
            worst = max(worst, abs(got[ours] - peer[theirs]))
    assert worst < 1e-12


def test_names_list_every_metric_ood_metrics_returns():
    assert set(ood_metrics([0.5, 0.7], [0.1])) == set(names.ALL_OOD_METRICS)
    assert set(selective_metrics([0.5, 0.7], [True, False])) == set(names.SELECTIVE_METRICS)
    assert not set(names.ALL_OOD_METRICS) & set(names.SELECTIVE_METRICS)


# ---------------------------------------------------------------------------
# risk-coverage: brute force
# ---------------------------------------------------------------------------


def brute_force(scores, correct, levels=(0.80, 0.90, 0.95)):
    """Every distinct score as a threshold, accepting score >= t; AURC as the mean over samples of
    the risk at the sample's own score (its whole tie group accepted)."""
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    cov, risk = [], []
    for t in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= t
        cov.append(accepted.mean())
        risk.append(1.0 - correct[accepted].mean())
    aurc = float(np.mean([1.0 - correct[scores >= s].mean() for s in scores]))
    acc = {}
    for level in levels:
        for c, r in zip(cov, risk, strict=True):
            if c >= level:
                acc[f"acc_at_cov{round(100 * level)}"] = 1.0 - r
                break
    return np.array(cov), np.array(risk), aurc, acc


def selective_cases(seed=0):
    rng = np.random.default_rng(seed)
    for i in range(40):
        n = int(rng.integers(1, 80))
        scores = rng.normal(size=n)
        if i % 3 == 1:
            scores = np.round(scores, 1)
        if i % 8 == 3:
            scores = np.zeros(n)
        correct = rng.random(n) < rng.uniform(0.3, 0.95)
        yield scores, correct


def test_curve_aurc_and_accuracy_match_a_brute_force_loop():
    for scores, correct in selective_cases():
        cov, risk, thresholds = risk_coverage_curve(scores, correct)
        b_cov, b_risk, b_aurc, b_acc = brute_force(scores, correct)
        np.testing.assert_allclose(cov, b_cov, rtol=0, atol=1e-15)
        np.testing.assert_allclose(risk, b_risk, rtol=0, atol=1e-15)
        assert np.all(np.diff(thresholds) < 0)
        got = selective_metrics(scores, correct)
        assert got["aurc"] == pytest.approx(b_aurc, abs=1e-14)
        assert got["eaurc"] == pytest.approx(b_aurc - oracle_aurc(1.0 - correct.mean()), abs=1e-14)
        for k, v in b_acc.items():
            assert got[k] == pytest.approx(v, abs=1e-15), k


def test_without_ties_aurc_is_the_mean_risk_over_the_top_k():
    # Geifman, Uziel & El-Yaniv's estimator: (1/n) sum_k risk of the k highest scores
    rng = np.random.default_rng(3)
    scores, correct = rng.permutation(200).astype(float), rng.random(200) < 0.8
    order = np.argsort(-scores)
    top_k = np.cumsum(~correct[order]) / np.arange(1, 201)
    assert selective_metrics(scores, correct)["aurc"] == pytest.approx(top_k.mean(), abs=1e-15)


# ---------------------------------------------------------------------------
# risk-coverage: hand cases
# ---------------------------------------------------------------------------


def test_hand_case_four_samples():
    # scores 4 3 2 1, correct T F T F: risks 0, 1/2, 1/3, 1/2 at coverage 1/4 .. 1
    # AURC = (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3; r = 1/2 -> AURC* = 1/2 + 1/2 ln(1/2)
    cov, risk, thr = risk_coverage_curve([4, 3, 2, 1], [True, False, True, False])
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    np.testing.assert_array_equal(thr, [4, 3, 2, 1])
    got = selective_metrics([4, 3, 2, 1], [True, False, True, False])
    assert got["aurc"] == pytest.approx(1 / 3, abs=1e-15)
    assert got["eaurc"] == pytest.approx(1 / 3 - (0.5 + 0.5 * math.log(0.5)), abs=1e-15)
    assert got["acc_at_cov80"] == got["acc_at_cov90"] == got["acc_at_cov95"] == 0.5  # only full coverage reaches 0.8


def test_hand_case_ten_samples_coverage_levels():
    # the one error has the lowest score: 8 and 9 accepted are all right, the 10th brings 1/10
    correct = [True] * 9 + [False]
    got = selective_metrics(np.arange(10, 0, -1), correct)
    assert got["acc_at_cov80"] == 1.0 and got["acc_at_cov90"] == 1.0
    assert got["acc_at_cov95"] == pytest.approx(0.9, abs=1e-15)
    assert got["aurc"] == pytest.approx(0.1 / 10, abs=1e-15)  # risk 0 until the last step, 1/10 there


def test_ties_are_accepted_together():
    # scores 3 | 2 2 2 | 1: the tie group moves coverage from 1/5 to 4/5 at once
    correct = [True, False, True, True, False]
    cov, risk, _ = risk_coverage_curve([3, 2, 2, 2, 1], correct)
    np.testing.assert_allclose(cov, [0.2, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.25, 0.4])
    got = selective_metrics([3, 2, 2, 2, 1], correct)
    assert got["aurc"] == pytest.approx(0.2 * 0 + 0.6 * 0.25 + 0.2 * 0.4, abs=1e-15)
    assert got["acc_at_cov80"] == pytest.approx(0.75)  # 4/5 reached exactly by the tie group
    assert got["acc_at_cov90"] == pytest.approx(0.6)
    # the order of the samples within a tie does not matter
    assert selective_metrics([2, 3, 2, 1, 2], [False, True, True, False, True]) == got


def test_constant_scores_accept_everything_at_once():
    correct = np.array([True, True, False, True])
    got = selective_metrics(np.full(4, 0.7), correct)
    assert got["aurc"] == pytest.approx(0.25) and all(got[f"acc_at_cov{p}"] == 0.75 for p in (80, 90, 95))


def test_all_right_and_all_wrong():
    assert selective_metrics([1.0, 2.0, 3.0], [True] * 3) == {"aurc": 0.0, "eaurc": 0.0, "acc_at_cov80": 1.0, "acc_at_cov90": 1.0, "acc_at_cov95": 1.0}
    wrong = selective_metrics([1.0, 2.0, 3.0], [False] * 3)
    assert wrong["aurc"] == 1.0 and wrong["eaurc"] == 0.0 and wrong["acc_at_cov95"] == 0.0


# ---------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.0, 0.03, 0.2, 0.5, 0.9, 1.0])
def test_oracle_closed_form_is_the_integral_of_its_curve(r):
    grid = np.unique(np.r_[np.linspace(0.0, 1.0, 200_001), 1.0 - r])
    # (the grid's first step, at coverage 0, where the oracle accepts nothing, costs up to 5e-6)
    assert oracle_aurc(r) == pytest.approx(np.trapezoid(oracle_risk(grid, r), grid), abs=1e-5)


@pytest.mark.parametrize(("n", "m"), [(10, 9), (100, 80), (1000, 500), (5000, 4900)])
def test_a_perfect_ranking_has_a_small_positive_eaurc(n, m):
    # correct predictions ranked first; the step sum (1/n) sum_k max(0, k - m) / k exceeds the
    # closed form by about r / (2n)
    correct = np.arange(n) < m
    scores = -np.arange(n, dtype=float)
    got = selective_metrics(scores, correct)
    k = np.arange(1, n + 1)
    assert got["aurc"] == pytest.approx(np.mean(np.maximum(0, k - m) / k), abs=1e-15)
    r = 1 - m / n
    assert 0.0 < got["eaurc"] <= r / (2 * n) + 1e-12
    assert got["eaurc"] == pytest.approx(r / (2 * n), rel=0.2)


def test_random_scores_give_about_the_error_rate_and_reversed_ones_more():
    rng = np.random.default_rng(5)
    correct = rng.random(20_000) < 0.85
    r = 1 - correct.mean()
    assert selective_metrics(rng.normal(size=20_000), correct)["aurc"] == pytest.approx(r, abs=0.01)
    good = correct + rng.normal(0, 0.5, 20_000)
    assert selective_metrics(good, correct)["aurc"] < r < selective_metrics(-good, correct)["aurc"]


@pytest.mark.parametrize(
    ("scores", "correct", "match"),
    [
        ([], [], "non-empty"),
        ([1.0, np.nan], [True, False], "non-finite"),
        ([1.0, 2.0], [True], "shape"),
        ([1.0, 2.0], [0.5, 1.0], "boolean"),
        ([[1.0, 2.0]], [[True, False]], "1-D"),
    ],
)
def test_bad_input_raises(scores, correct, match):
    with pytest.raises(ValueError, match=match):
        selective_metrics(scores, correct)


def test_oracle_refuses_an_error_rate_outside_zero_one():
    with pytest.raises(ValueError, match="error_rate"):
        oracle_aurc(1.5)


# ---------------------------------------------------------------------------
# where the metrics are recorded and shown
# ---------------------------------------------------------------------------

SETS = {"ood_faces": "far", "near_letters": "near"}


def outputs(seed=0, shift=1.0, n=60):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 1.0
    id_out = {"logits": logits, "labels": labels, "msp": logits.max(1) + shift, "energy": rng.normal(shift, 1, n)}
    ood = {s: {"logits": rng.normal(size=(40, 3)), "msp": rng.normal(0, 1, 40), "energy": rng.normal(0, 1, 40)} for s in SETS}
    return id_out, ood


def test_split_metrics_records_every_score_s_selective_and_trapezoid_metrics():
    id_out, ood = outputs()
    m = split_metrics("test", id_out, ood, SETS, ["msp", "energy"], "msp")
    correct = id_out["logits"].argmax(1) == id_out["labels"]
    for score, tag in (("msp", None), ("energy", "energy")):
        want = selective_metrics(id_out[score], correct)
        for k in names.SELECTIVE_METRICS:
            assert m[names.selective_key("test", k, tag)] == want[k]
        for k in ("aupr_in_trapz", "aupr_out_trapz"):
            assert names.set_key("test", "ood_faces", k, tag) in m and names.mean_key("test", k, "near", tag) in m
    assert "test_aurc" in m and "test_energy_eaurc" in m and "test_energy_acc_at_cov95" in m
    # ID only: recorded without OOD sets too
    assert "val_aurc" in split_metrics("val", id_out, {}, {}, ["msp"], "msp")


def test_detector_table_shows_openood_aupr_in_and_aurc():
    id_out, ood = outputs()
    metrics = split_metrics("test", id_out, ood, SETS, ["msp", "energy"], "")
    table = DetectorTable(checkpoint="ck", method="softmax", rows=["msp", "energy"], val_auroc={"msp": 0.7, "energy": 0.8}, metrics=metrics, ood_sets=list(SETS), groups=SETS)
    text = table.markdown()
    assert "AURC ↓" in text and "lower FPR95 and AURC are better" in text and "trapezoid" in text
    row = next(line for line in text.splitlines() if line.startswith("| energy |"))
    assert f"| {metrics['test_energy_aurc']:.4f} |" in row
    cell = " / ".join(f"{metrics[names.set_key('test', 'ood_faces', k, 'energy')]:.3f}" for k in ("auroc", "fpr95", "aupr_in_trapz"))
    assert cell in row


def test_comparison_table_has_an_aurc_column():
    results = {}
    for method in ("softmax", "logitnorm"):
        r = results[method] = MethodResult(method, TrainConfig(method=method))
        for seed in range(2):
            id_out, ood = outputs(seed)
            m = {**split_metrics("test", id_out, ood, SETS, ["msp"], "msp"), "seed": seed}
            r.runs.append(TrainOutcome("run", m, "", "", "", 0.0, list(SETS)))
    text = tables(results, list(SETS))
    head = text.splitlines()[0]
    assert head.rstrip(" |").endswith("AURC ↓")
    row = next(line for line in text.splitlines() if line.startswith("| logitnorm |"))
    mean = np.mean([o.metrics["test_aurc"] for o in results["logitnorm"].runs])
    assert row.rstrip(" |").split("|")[-1].strip().startswith(f"{mean:.3f}")
