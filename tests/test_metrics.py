"""Hand-computed checks for ood_ray.metrics (expected values derived in comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ood_ray.metrics import (
    accuracy,
    classification_metrics,
    ece,
    mean_over_sets,
    nll,
    ood_metrics,
    threshold_report,
)

OOD_KEYS = {"auroc", "aupr_in", "aupr_out", "aupr_in_trapz", "aupr_out_trapz", "fpr95", "fpr95_in", "detection_error"}


def assert_metrics(got: dict, expected: dict) -> None:
    """The hand-computed values (the trapezoid AUPRs have their own cases in test_metrics_selective)."""
    assert set(expected) <= set(got) and set(got) - set(expected) <= {"aupr_in_trapz", "aupr_out_trapz"}
    for k, v in expected.items():
        assert isinstance(got[k], float), k
        assert got[k] == pytest.approx(v, abs=1e-12), k


# ---------------------------------------------------------------------------
# ood_metrics: hand cases
# ---------------------------------------------------------------------------


def test_ood_metrics_basic_hand_case():
    # ID 0.9 0.8 0.7 0.6 | OOD 0.65 0.5 0.4 0.3
    # AUROC: 0.9, 0.8, 0.7 beat all 4 OOD (12 pairs), 0.6 beats 3 -> 15/16.
    # AUPR-in, ranking desc: I I I O I O O O; precision at each ID hit 1,1,1,4/5
    #   -> (3 + 4/5)/4 = 19/20. AUPR-out symmetric (ascending: O O O I O ...) -> 19/20.
    # fpr95: flag all 4 OOD needs score <= 0.65 -> ID 0.6 flagged -> 1/4.
    # fpr95_in: accept all 4 ID needs score >= 0.6 -> OOD 0.65 accepted -> 1/4.
    # detection error: at t=0.7 tpr 3/4, fpr 0 -> 1/8 (also t=0.6: 0 + 1/8).
    got = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.65, 0.5, 0.4, 0.3])
    assert_metrics(
        got,
        {
            "auroc": 15 / 16,
            "aupr_in": 19 / 20,
            "aupr_out": 19 / 20,
            "fpr95": 1 / 4,
            "fpr95_in": 1 / 4,
            "detection_error": 1 / 8,
        },
    )


def test_fpr95_conventions_differ():
    # ID 0.9 0.8 0.7 0.6 | OOD 0.75 0.5 0.4 0.3
    # fpr95 (OOD positive): all OOD flagged needs score <= 0.75 -> ID 0.7, 0.6 flagged -> 1/2.
    # fpr95_in (ID positive): all ID accepted needs score >= 0.6 -> OOD 0.75 accepted -> 1/4.
    # AUROC: 0.9, 0.8 beat 4 (8); 0.7, 0.6 beat 3 (6) -> 14/16.
    got = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.75, 0.5, 0.4, 0.3])
    assert got["fpr95"] == pytest.approx(1 / 2, abs=1e-12)
    assert got["fpr95_in"] == pytest.approx(1 / 4, abs=1e-12)
    assert got["auroc"] == pytest.approx(14 / 16, abs=1e-12)
    # detection error: t=0.8: 0.5*(1/2) + 0 = 1/4; t=0.6: 0 + 0.5*(1/4) = 1/8 -> 1/8.
    assert got["detection_error"] == pytest.approx(1 / 8, abs=1e-12)


def test_recall_exactly_095_is_enough():
    # 20 ID scores 1..20; 19 OOD at 0 and one at 10.5.
    # fpr95: flag score <= 0 -> OOD recall 19/20 = 0.95 (>= 0.95 holds) with no ID flagged -> 0.
    #   (if 0.95 exactly did not count, the threshold would be 10.5 -> 10/20.)
    # fpr95_in: ID recall 19/20 at score >= 2 -> OOD accepted: 10.5 only -> 1/20.
    scores_in = np.arange(1, 21, dtype=float)
    scores_out = np.array([0.0] * 19 + [10.5])
    got = ood_metrics(scores_in, scores_out)
    assert got["fpr95"] == 0.0
    assert got["fpr95_in"] == pytest.approx(1 / 20, abs=1e-12)
    # AUROC: OOD 0 loses to all 20 ID (19*20 pairs), 10.5 loses to 11..20 (10) -> 390/400.
    assert got["auroc"] == pytest.approx(390 / 400, abs=1e-12)


def test_fpr95_point_on_collinear_roc_segment():
    # ID 1..20 | OOD 1, 2 and eighteen 0s.
    # fpr95_in: accept score >= 2 -> ID recall 19/20, OOD accepted: the 2 -> 1/20.
    # fpr95: flag score <= 1 -> OOD recall 19/20, ID flagged: the 1 -> 1/20.
    # On both ROC curves the 95% point (1/20, 19/20) lies on the straight line between
    # (0, 18/20) and (2/20, 1); a curve with collinear points dropped would report 2/20.
    scores_in = np.arange(1, 21, dtype=float)
    scores_out = np.array([1.0, 2.0] + [0.0] * 18)
    got = ood_metrics(scores_in, scores_out)
    assert got["fpr95_in"] == pytest.approx(1 / 20, abs=1e-12)
    assert got["fpr95"] == pytest.approx(1 / 20, abs=1e-12)


def test_recall_below_095_not_enough():
    # 10 OOD: 9/10 = 0.9 < 0.95, so all 10 OOD must be flagged.
    # ID 1..10; OOD nine at 0 and one at 5.5 -> flag score <= 5.5 -> ID 1..5 -> 5/10.
    got = ood_metrics(np.arange(1, 11, dtype=float), [0.0] * 9 + [5.5])
    assert got["fpr95"] == pytest.approx(5 / 10, abs=1e-12)


def test_all_scores_equal():
    # One threshold only: everything accepted or everything rejected.
    # AUROC 1/2 (all pairs tied); AP = precision at the only threshold = 3/6 = 1/2.
    # fpr95 = fpr95_in = 1; detection error: (0,0) -> 1/2, (1,1) -> 1/2.
    got = ood_metrics([0.3, 0.3, 0.3], [0.3, 0.3, 0.3])
    assert_metrics(
        got,
        {
            "auroc": 1 / 2,
            "aupr_in": 1 / 2,
            "aupr_out": 1 / 2,
            "fpr95": 1.0,
            "fpr95_in": 1.0,
            "detection_error": 1 / 2,
        },
    )


def test_ties_between_id_and_ood():
    # ID 3 2 2 1 | OOD 2 1 1 0
    # AUROC: ID 3 -> 4; each ID 2 -> 3 wins + 1 tie/2 = 3.5 (x2 = 7);
    #        ID 1 -> 1 win (0) + 2 ties/2 = 2 -> 13/16.
    # ID-positive thresholds (score >= c): c=3 (tpr 1/4, fpr 0), c=2 (3/4, 1/4),
    #   c=1 (1, 3/4), c=0 (1, 1).
    # fpr95_in = 3/4 (first tpr >= .95 at c=1).  detection error: min(1/2, 3/8, 1/4, 3/8, 1/2) = 1/4.
    # OOD-positive (score <= c): c=0 (recall 1/4, fpr 0), c=1 (3/4, 1/4), c=2 (1, 3/4) -> fpr95 = 3/4.
    # AUPR-in: thresholds 3, 2, 1: P = 1, 3/4, 4/7 at R = 1/4, 3/4, 1
    #   -> 1/4*1 + 1/2*3/4 + 1/4*4/7 = 43/56. AUPR-out is the mirror image -> 43/56.
    got = ood_metrics([3, 2, 2, 1], [2, 1, 1, 0])
    assert_metrics(
        got,
        {
            "auroc": 13 / 16,
            "aupr_in": 43 / 56,
            "aupr_out": 43 / 56,
            "fpr95": 3 / 4,
            "fpr95_in": 3 / 4,
            "detection_error": 1 / 4,
        },
    )


def test_perfect_separation():
    got = ood_metrics([3.0, 2.0], [1.0, 0.0])
    assert_metrics(
        got,
        {
            "auroc": 1.0,
            "aupr_in": 1.0,
            "aupr_out": 1.0,
            "fpr95": 0.0,
            "fpr95_in": 0.0,
            "detection_error": 0.0,
        },
    )


def test_reversed_separation():
    # ID 1 0 | OOD 3 2: every pair wrong -> AUROC 0.
    # AUPR-in: ranking O O I I -> precisions 1/3, 2/4 -> (1/3 + 1/2)/2 = 5/12; AUPR-out same.
    # Reaching 95% recall on either side requires accepting/flagging everything -> 1.
    # Detection error: best is the trivial point (0,0) or (1,1) -> 1/2.
    got = ood_metrics([1.0, 0.0], [3.0, 2.0])
    assert_metrics(
        got,
        {
            "auroc": 0.0,
            "aupr_in": 5 / 12,
            "aupr_out": 5 / 12,
            "fpr95": 1.0,
            "fpr95_in": 1.0,
            "detection_error": 1 / 2,
        },
    )


def test_ood_metrics_returns_all_keys_and_accepts_numpy():
    got = ood_metrics(np.array([0.5, 0.7]), np.array([0.1]))
    assert set(got) == OOD_KEYS
    assert all(type(v) is float for v in got.values())


# ---------------------------------------------------------------------------
# ood_metrics: errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores_in, scores_out, match",
    [
        ([], [0.1], r"scores_in is empty"),
        ([0.1], [], r"scores_out is empty"),
        ([0.1, float("nan"), float("nan")], [0.2], r"scores_in contains 2 non-finite"),
        ([0.1], [0.2, float("inf"), 0.3], r"scores_out contains 1 non-finite"),
        ([0.1], [float("-inf")], r"scores_out contains 1 non-finite"),
        ([[0.1, 0.2]], [0.2], r"scores_in must be 1-D"),
    ],
)
def test_ood_metrics_errors(scores_in, scores_out, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(scores_in, scores_out)


def test_threshold_report_errors():
    with pytest.raises(ValueError, match="scores_out is empty"):
        threshold_report([0.1], [], 0.5)
    with pytest.raises(ValueError, match="scores_in contains 1 non-finite"):
        threshold_report([float("nan")], [0.1], 0.5)
    with pytest.raises(ValueError, match="correct_in"):
        threshold_report([0.1, 0.2], [0.1], 0.5, correct_in=[True])


# ---------------------------------------------------------------------------
# randomized cross-check against a brute-force implementation
# ---------------------------------------------------------------------------


def brute_fpr95(s_in, s_out):
    """OOD positive: flag score <= c; smallest c with OOD recall >= .95; fraction of ID flagged."""
    for c in sorted(set(s_in) | set(s_out)):
        recall_out = sum(1 for s in s_out if s <= c) / len(s_out)
        if recall_out >= 0.95:
            return sum(1 for s in s_in if s <= c) / len(s_in)
    raise AssertionError("unreachable: the largest score flags everything")


def brute_fpr95_in(s_in, s_out):
    """ID positive: accept score >= c; largest c with ID recall >= .95; fraction of OOD accepted."""
    for c in sorted(set(s_in) | set(s_out), reverse=True):
        recall_in = sum(1 for s in s_in if s >= c) / len(s_in)
        if recall_in >= 0.95:
            return sum(1 for s in s_out if s >= c) / len(s_out)
    raise AssertionError("unreachable: the smallest score accepts everything")


def brute_detection_error(s_in, s_out):
    best = 0.5  # accept nothing: tpr 0, fpr 0
    for c in set(s_in) | set(s_out):
        tpr = sum(1 for s in s_in if s >= c) / len(s_in)
        fpr = sum(1 for s in s_out if s >= c) / len(s_out)
        best = min(best, 0.5 * (1 - tpr) + 0.5 * fpr)
    return best


def brute_auroc(s_in, s_out):
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in s_in for b in s_out)
    return total / (len(s_in) * len(s_out))


@pytest.mark.parametrize("seed", range(40))
def test_random_crosscheck_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_in = int(rng.choice([5, 10, 20, 37, 40, 60]))
    n_out = int(rng.choice([3, 10, 20, 40, 41, 100]))
    decimals = int(rng.integers(0, 2))  # coarse rounding -> many ID/OOD ties
    s_in = np.round(rng.normal(1.0, 1.0, n_in), decimals)
    s_out = np.round(rng.normal(0.0, 1.0, n_out), decimals)
    got = ood_metrics(s_in, s_out)
    li, lo = s_in.tolist(), s_out.tolist()
    assert abs(got["fpr95"] - brute_fpr95(li, lo)) <= 1e-12
    assert abs(got["fpr95_in"] - brute_fpr95_in(li, lo)) <= 1e-12
    assert abs(got["detection_error"] - brute_detection_error(li, lo)) <= 1e-12
    assert abs(got["auroc"] - brute_auroc(li, lo)) <= 1e-12


# ---------------------------------------------------------------------------
# threshold_report
# ---------------------------------------------------------------------------


def test_threshold_report_hand_case():
    # delta 0.7: rejected = score < 0.7 (0.7 itself is accepted).
    # ID rejected: 0.6 -> 1/4. OOD rejected: all 4 -> 1.
    # Accepted ID 0.9, 0.8, 0.7 with correctness T, F, T -> 2/3.
    got = threshold_report(
        [0.9, 0.8, 0.7, 0.6], [0.65, 0.5, 0.4, 0.3], 0.7, correct_in=[True, False, True, True]
    )
    assert_metrics(
        got, {"abstain_rate_in": 1 / 4, "reject_rate_out": 1.0, "accuracy_accepted_in": 2 / 3}
    )


def test_threshold_report_without_correct_in():
    # delta 0.45: ID none rejected; OOD 0.4, 0.3 rejected -> 2/4.
    got = threshold_report([0.9, 0.8, 0.7, 0.6], [0.65, 0.5, 0.4, 0.3], 0.45)
    assert_metrics(got, {"abstain_rate_in": 0.0, "reject_rate_out": 1 / 2})


def test_threshold_report_nothing_accepted_gives_nan():
    got = threshold_report([0.2, 0.1], [0.0], 1.0, correct_in=np.array([1, 0]))
    assert got["abstain_rate_in"] == 1.0
    assert got["reject_rate_out"] == 1.0
    assert math.isnan(got["accuracy_accepted_in"])


# ---------------------------------------------------------------------------
# classification metrics
# ---------------------------------------------------------------------------


def test_accuracy_hand_case():
    # argmax rows: 1, 0, 2, 0 vs targets 1, 1, 2, 2 -> 2/4.
    logits = [[0.0, 2.0, 1.0], [5.0, -1.0, 0.0], [-3.0, -2.0, -1.0], [1.0, 1.0, 0.0]]
    assert accuracy(logits, [1, 1, 2, 2]) == pytest.approx(1 / 2, abs=1e-12)
    # argmax tie -> first index (class 0): row [1, 1, 0] counts for target 0.
    assert accuracy([[1.0, 1.0, 0.0]], [0]) == 1.0
    assert accuracy([[1.0, 1.0, 0.0]], [1]) == 0.0


def test_nll_hand_case():
    # -log 0.5 - log 0.75 - log(eps=1e-12) averaged over 3 (third prob 0 is clipped to eps).
    probs = [[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]
    expected = (math.log(2) + math.log(4 / 3) + 12 * math.log(10)) / 3
    assert nll(probs, [0, 1, 1]) == pytest.approx(expected, rel=1e-12)
    # custom eps: -log(1e-3) for the third row
    expected_eps = (math.log(2) + math.log(4 / 3) + 3 * math.log(10)) / 3
    assert nll(probs, [0, 1, 1], eps=1e-3) == pytest.approx(expected_eps, rel=1e-12)
    # perfect predictions -> 0
    assert nll([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0


def test_ece_hand_case_with_bin_edges():
    # n_bins = 4: bins (0,.25], (.25,.5], (.5,.75], (.75,1].
    # a conf .50 (edge -> bin 1) correct; b conf .40 bin 1 wrong;
    # c conf .75 (edge -> bin 2) correct; d conf .90 bin 3 correct; e conf 1.0 bin 3 wrong.
    # bin 1: |1 - 0.9| / 5 = 0.02; bin 2: |1 - 0.75| / 5 = 0.05; bin 3: |1 - 1.9| / 5 = 0.18
    # ECE = 0.25. (Left-inclusive bins [b/n, (b+1)/n) would put a alone in bin 2 and c with
    # d, e in bin 3: 0.4/5 + 0.5/5 + |2 - 2.65|/5 = 0.31.)
    probs = [
        [0.5, 0.3, 0.2],
        [0.4, 0.35, 0.25],
        [0.75, 0.125, 0.125],
        [0.1, 0.9, 0.0],
        [1.0, 0.0, 0.0],
    ]
    targets = [0, 1, 0, 1, 2]
    assert ece(probs, targets, n_bins=4) == pytest.approx(0.25, abs=1e-12)


def test_ece_zero_confidence_goes_to_first_bin():
    # row 1: all zeros -> argmax 0 == target (correct), conf 0 -> bin 0: |1 - 0| / 2 = 0.5
    # row 2: conf .9 bin 3, wrong: |0 - 0.9| / 2 = 0.45 -> 0.95.
    # (If conf 0 landed in the last bin it would mix with row 2: |1 - 0.9| / 2 = 0.05.)
    assert ece([[0.0, 0.0], [0.1, 0.9]], [0, 0], n_bins=4) == pytest.approx(0.95, abs=1e-12)


def test_ece_perfectly_calibrated_and_default_bins():
    # conf 1 and correct everywhere -> 0; conf .5 with half correct in one bin -> 0.
    assert ece([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0
    assert ece([[0.5, 0.5], [0.5, 0.5]], [0, 1], n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_classification_metrics():
    probs = [[0.5, 0.5], [0.25, 0.75]]
    # acc: argmax 0, 1 vs targets 0, 0 -> 1/2.  nll: (log 2 + log 4)/2 = 1.5 log 2.
    # ece (2 bins (0, .5], (.5, 1]): conf .5 -> bin 0 (edge, correct), conf .75 -> bin 1 (wrong).
    #   bin 0: |1 - .5|/2 = .25, bin 1: |0 - .75|/2 = .375 -> .625
    got = classification_metrics(probs, [0, 0], n_bins=2)
    assert set(got) == {"acc", "nll", "ece"}
    assert got["acc"] == pytest.approx(1 / 2, abs=1e-12)
    assert got["nll"] == pytest.approx(1.5 * math.log(2), rel=1e-12)
    assert got["ece"] == pytest.approx(0.625, abs=1e-12)


@pytest.mark.parametrize("fn", [accuracy, nll, ece])
@pytest.mark.parametrize(
    "probs, targets, match",
    [
        ([0.5, 0.5], [0], r"must be 2-D"),
        ([[0.5, 0.5]], [[0]], r"targets must be 1-D"),
        ([[0.5, 0.5], [0.2, 0.8]], [0], r"length mismatch"),
        ([[0.5, 0.5]], [2], r"targets must lie in \[0, 2\)"),
        ([[0.5, 0.5]], [-1], r"targets must lie in \[0, 2\)"),
        ([[0.5, 0.5]], [0.5], r"integer"),
        (np.zeros((0, 3)), [], r"empty"),
        ([[float("nan"), 0.5]], [0], r"NaN"),
    ],
)
def test_classification_validation(fn, probs, targets, match):
    with pytest.raises(ValueError, match=match):
        fn(probs, targets)


def test_ece_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        ece([[1.0, 0.0]], [0], n_bins=0)


# ---------------------------------------------------------------------------
# mean_over_sets
# ---------------------------------------------------------------------------


def test_mean_over_sets():
    per_set = {
        "svhn": {"auroc": 0.9, "fpr95": 0.3},
        "lsun": {"auroc": 0.7, "fpr95": 0.5},
        "noise": {"auroc": 0.5, "fpr95": 1.0},
    }
    got = mean_over_sets(per_set)
    assert got == pytest.approx({"auroc": 0.7, "fpr95": 0.6}, abs=1e-12)
    assert all(type(v) is float for v in got.values())


def test_mean_over_sets_errors():
    with pytest.raises(ValueError, match="empty"):
        mean_over_sets({})
    with pytest.raises(ValueError, match="different metric keys"):
        mean_over_sets({"a": {"auroc": 1.0}, "b": {"fpr95": 0.0}})
