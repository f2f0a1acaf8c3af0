"""ood_ray.plots on seeded random scores/probabilities and small real Optuna studies."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest

from ood_ray import plots
from ood_ray.metrics import ece, ood_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    assert isinstance(path, Path)
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))


@pytest.fixture(autouse=True)
def no_leaked_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@pytest.fixture()
def closed(monkeypatch):
    """Every figure that ood_ray.plots closes, kept for inspection after the call."""
    figs = []
    real_close = plt.close

    def spy(fig=None):
        figs.append(fig)
        real_close(fig)

    monkeypatch.setattr(plots.plt, "close", spy)
    return figs


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    id_scores = rng.normal(1.0, 1.0, 300)
    ood = {
        "near": rng.normal(0.6, 1.0, 250),
        "far": rng.normal(-2.0, 0.7, 150),
        "noise": rng.uniform(-3.0, 3.0, 200),
        "ties": np.round(rng.normal(0.0, 1.0, 120)),
    }
    return id_scores, ood


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(1)
    n, k = 600, 5
    labels = rng.integers(0, k, n)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), labels] += 1.2
    probs = {
        "before calibration (T=1)": _softmax(logits * 4.0),
        "after calibration (T=4)": _softmax(logits),
    }
    return probs, labels


# ---------------------------------------------------------------------------
# ROC curves and histograms
# ---------------------------------------------------------------------------


def test_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def test_roc_curves_writes_png(tmp_path, scores):
    id_scores, ood = scores
    target = tmp_path / "a" / "b" / "roc.png"
    got = plots.roc_curves(id_scores, ood, str(target), title="best trial")
    assert got == target
    assert_png(got)


def test_roc_legend_auroc_matches_metrics(tmp_path, scores, closed):
    id_scores, ood = scores
    plots.roc_curves(id_scores, ood, tmp_path / "roc.png")
    (fig,) = closed
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    expected = [
        f"{name} (AUROC {ood_metrics(id_scores, s)['auroc']:.3f})" for name, s in ood.items()
    ]
    assert labels == expected + ["chance"]
    assert ax.get_xlabel() == "false positive rate (ID flagged OOD)"
    assert ax.get_ylabel() == "true positive rate (OOD detected)"
    # OOD far below ID: detected almost perfectly, so its curve hugs the top-left corner
    far = ax.get_lines()[1]
    assert far.get_xdata()[0] == 0.0 and far.get_ydata()[-1] == 1.0
    assert float(labels[1].split("AUROC ")[1][:-1]) > 0.95


def test_roc_perfectly_separated_sets_give_auroc_one(tmp_path, closed):
    plots.roc_curves(
        [3.0, 4.0, 5.0], {"low": np.array([0.0, 1.0]), "high": np.array([9.0])}, tmp_path / "r.png"
    )
    labels = [t.get_text() for t in closed[0].axes[0].get_legend().get_texts()]
    assert labels[:2] == ["low (AUROC 1.000)", "high (AUROC 0.000)"]


def test_score_histograms_grid(tmp_path, scores, closed):
    id_scores, ood = scores
    got = plots.score_histograms(
        id_scores, ood, tmp_path / "hist" / "scores.png", title="best trial", bins=25
    )
    assert got == tmp_path / "hist" / "scores.png"
    assert_png(got)
    (fig,) = closed
    assert len(fig.axes) == 6  # 4 sets on a 2 x 3 grid, the last two panels hidden
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4
    for ax, (name, s) in zip(visible, ood.items(), strict=True):
        assert ax.get_title().startswith(f"ID vs {name} (AUROC ")
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            f"ID (n={id_scores.size})",
            f"{name} (n={s.size})",
        ]
        bars = ax.patches
        assert len(bars) == 2 * 25
        id_bars, ood_bars = bars[:25], bars[25:]
        # shared edges over ID ∪ set, densities integrate to 1
        assert [b.get_x() for b in id_bars] == [b.get_x() for b in ood_bars]
        assert id_bars[0].get_x() == pytest.approx(min(id_scores.min(), s.min()))
        for group in (id_bars, ood_bars):
            assert sum(b.get_height() * b.get_width() for b in group) == pytest.approx(1.0)
            assert group[0].get_alpha() < 1.0


def test_score_histograms_single_set_and_constant_scores(tmp_path):
    got = plots.score_histograms(np.ones(10), {"same": np.ones(5)}, tmp_path / "h.png", bins=3)
    assert_png(got, min_bytes=2000)


# ---------------------------------------------------------------------------
# reliability diagram
# ---------------------------------------------------------------------------


def test_reliability_diagram(tmp_path, calib, closed):
    probs, labels = calib
    got = plots.reliability_diagram(probs, labels, str(tmp_path / "rel" / "reliability.png"))
    assert got == tmp_path / "rel" / "reliability.png"
    assert_png(got)
    (fig,) = closed
    top, bottom = fig.axes
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend[0] == "perfect calibration"
    eces = [ece(p, labels, n_bins=15) for p in probs.values()]
    assert legend[1:] == [f"{name} (ECE {e:.4f})" for name, e in zip(probs, eces, strict=True)]
    assert eces[0] > eces[1]  # sharpened logits are the over-confident ones
    # lower panel: per curve 15 bars holding fractions of the N samples
    assert len(bottom.patches) == 2 * 15
    for j in range(2):
        assert sum(b.get_height() for b in bottom.patches[15 * j : 15 * (j + 1)]) == pytest.approx(
            1.0
        )
    # upper panel: one point per non-empty bin, accuracy within [0, 1]
    for line in top.get_lines()[1:]:
        assert 1 <= len(line.get_xdata()) <= 15
        assert np.all((line.get_ydata() >= 0) & (line.get_ydata() <= 1))


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_calibration_bins_match_metrics_ece(calib, n_bins):
    probs, labels = calib
    for p in probs.values():
        stats = plots._calibration_bins(p, labels, n_bins)
        assert stats["ece"] == pytest.approx(ece(p, labels, n_bins=n_bins), abs=1e-12)
        assert stats["count"].sum() == labels.size


def test_reliability_diagram_exact_bin_edges(tmp_path, closed):
    # confidences exactly on edges 0.5 and 1.0 fall into the bins that end there (right-inclusive)
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.75, 0.25]])
    plots.reliability_diagram({"edges": p}, [0, 0, 0, 0], tmp_path / "e.png", n_bins=4)
    bottom = closed[0].axes[1]
    assert [b.get_height() for b in bottom.patches] == [0.0, 0.25, 0.25, 0.5]


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

ID = np.linspace(0.0, 1.0, 20)
P = np.full((4, 2), 0.5)
L = np.array([0, 1, 0, 1])


BAD_INPUTS = [
    (lambda p: plots.roc_curves([], {"a": ID}, p), ["id_scores", "(0,)"]),
    (lambda p: plots.roc_curves(np.ones((2, 2)), {"a": ID}, p), ["id_scores", "(2, 2)"]),
    (
        lambda p: plots.roc_curves(ID, {"svhn": [1.0, np.nan]}, p),
        ["ood_scores['svhn']", "non-finite", "nan"],
    ),
    (
        lambda p: plots.roc_curves(ID, {"lsun": [1.0, np.inf, 2.0]}, p),
        ["ood_scores['lsun']", "inf", "index 1"],
    ),
    (lambda p: plots.roc_curves(ID, {"svhn": []}, p), ["ood_scores['svhn']", "empty"]),
    (lambda p: plots.roc_curves(ID, {}, p), ["ood_scores", "empty"]),
    (lambda p: plots.roc_curves(ID, [ID], p), ["ood_scores", "dict", "list"]),
    (lambda p: plots.roc_curves(ID, {"a": ["x", "y"]}, p), ["ood_scores['a']", "numeric"]),
    (lambda p: plots.roc_curves(ID, {"a": ID}, None), ["path", "None"]),
    (lambda p: plots.score_histograms(ID, {"a": ID}, p, bins=0), ["bins", "0"]),
    (lambda p: plots.score_histograms(ID, {"a": ID}, p, bins=2.5), ["bins", "2.5"]),
    (lambda p: plots.score_histograms([np.nan], {"a": ID}, p), ["id_scores", "non-finite"]),
    (lambda p: plots.reliability_diagram({"a": P[0]}, L, p), ["probs['a']", "2-D", "(2,)"]),
    (
        lambda p: plots.reliability_diagram({"a": P}, L[:3], p),
        ["probs['a']", "labels", "4 rows", "3 entries"],
    ),
    (
        lambda p: plots.reliability_diagram({"ok": P, "after": P * 0.9}, L, p),
        ["probs['after']", "sum to 1", "0.9"],
    ),
    (
        lambda p: plots.reliability_diagram({"a": P + [[0.6, -0.6]] * 4}, L, p),
        ["probs['a']", "[0, 1]"],
    ),
    (
        lambda p: plots.reliability_diagram({"a": np.full((4, 2), np.nan)}, L, p),
        ["probs['a']", "non-finite"],
    ),
    (
        lambda p: plots.reliability_diagram({"a": P}, [0, 1, 2, 0], p),
        ["labels", "[0, 2)", "max 2"],
    ),
    (lambda p: plots.reliability_diagram({"a": P}, [0, 1.5, 0, 1], p), ["labels", "integer"]),
    (lambda p: plots.reliability_diagram({"a": P}, [], p), ["labels", "(0,)"]),
    (lambda p: plots.reliability_diagram({}, L, p), ["probs", "empty"]),
    (lambda p: plots.reliability_diagram({"a": P}, L, p, n_bins=0), ["n_bins", "0"]),
    (lambda p: plots.reliability_diagram({"a": P}, L, p, n_bins=True), ["n_bins", "True"]),
]


@pytest.mark.parametrize(
    ("call", "needles"),
    [
        pytest.param(call, needles, id=f"{i:02d}-{needles[0]}")
        for i, (call, needles) in enumerate(BAD_INPUTS)
    ],
)
def test_bad_input_raises_value_error_naming_it(tmp_path, call, needles):
    target = tmp_path / "out" / "x.png"
    with pytest.raises(ValueError) as err:
        call(target)
    message = str(err.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert not target.parent.exists()


def test_rows_within_tolerance_are_accepted(tmp_path):
    p = P + np.array([[4e-4, 0.0]] * 4)
    assert_png(plots.reliability_diagram({"a": p}, L, tmp_path / "r.png"), min_bytes=2000)


# ---------------------------------------------------------------------------
# Optuna
# ---------------------------------------------------------------------------


def _toy(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    return (x - 1.0) ** 2 + 0.1 * math.log10(lr) ** 2


def _toy_two(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    width = trial.suggest_int("width", 8, 64)
    return 1.0 - (x - 0.7) ** 2, x * width / 64.0


@pytest.fixture(scope="module")
def study():
    s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    s.optimize(_toy, n_trials=6)
    return s


@pytest.fixture(scope="module")
def multi_study():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        s = optuna.create_study(
            directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=0)
        )
        s.set_metric_names(["auroc", "fpr95"])
    s.optimize(_toy_two, n_trials=6)
    return s


def test_optuna_plots_single_objective(tmp_path, study):
    style_before = dict(matplotlib.rcParams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = plots.optuna_plots(study, tmp_path / "optuna")
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert got == {
        "optimization_history": tmp_path / "optuna" / "optimization_history.png",
        "param_importances": tmp_path / "optuna" / "param_importances.png",
    }
    for path in got.values():
        assert_png(path)
    # optuna's plt.style.use("ggplot") does not leak into later figures
    assert dict(matplotlib.rcParams) == style_before


def test_optuna_plots_multi_objective(tmp_path, multi_study, monkeypatch):
    from optuna.visualization import matplotlib as ovm

    seen = {}
    real = ovm.plot_param_importances

    def spy(study, **kwargs):
        seen.update(kwargs)
        return real(study, **kwargs)

    monkeypatch.setattr(ovm, "plot_param_importances", spy)
    got = plots.optuna_plots(multi_study, str(tmp_path))
    assert set(got) == {"optimization_history", "param_importances", "pareto_front"}
    for key, path in got.items():
        assert path == tmp_path / f"{key}.png"
        assert_png(path)
    # importances of the first objective, negated because it is maximized (PED-ANOVA minimizes)
    assert seen["target_name"] == "auroc"
    trial = multi_study.best_trials[0]
    assert seen["target"](trial) == -trial.values[0]


def test_optuna_importances_need_two_trials(tmp_path):
    s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    s.optimize(_toy, n_trials=1)
    got = plots.optuna_plots(s, tmp_path)
    assert_png(got["optimization_history"])
    reason = got["param_importances"]
    assert isinstance(reason, str) and "at least 2 complete trials" in reason
    assert not (tmp_path / "param_importances.png").exists()


def test_optuna_importances_need_a_varying_parameter(tmp_path):
    s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    s.optimize(lambda t: float(t.suggest_categorical("arch", ["resnet"]) == "resnet"), n_trials=3)
    got = plots.optuna_plots(s, tmp_path)
    assert isinstance(got["optimization_history"], Path)
    assert isinstance(got["param_importances"], str) and "varies" in got["param_importances"]
    assert "arch" in got["param_importances"]


def test_optuna_empty_and_failed_studies_give_reasons(tmp_path):
    empty = optuna.create_study()
    got = plots.optuna_plots(empty, tmp_path / "empty")
    assert set(got) == {"optimization_history", "param_importances"}
    assert all(isinstance(v, str) and "no complete trial" in v for v in got.values())
    assert not (tmp_path / "empty").exists()

    def boom(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise RuntimeError("diverged")

    failed = optuna.create_study(directions=["maximize", "minimize"])
    failed.optimize(boom, n_trials=2, catch=(RuntimeError,))
    got = plots.optuna_plots(failed, tmp_path / "failed")
    assert set(got) == {"optimization_history", "param_importances", "pareto_front"}
    assert all(isinstance(v, str) and "2 trial(s)" in v for v in got.values())


def test_optuna_plots_ignore_nonfinite_trials(tmp_path):
    s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    s.optimize(_toy, n_trials=1)
    s.enqueue_trial({"x": 0.0, "lr": 0.01})
    s.optimize(lambda t: _toy(t) + float("inf"), n_trials=1)
    got = plots.optuna_plots(s, tmp_path)
    assert isinstance(got["optimization_history"], Path)
    assert re.search(r"has 1$", got["param_importances"])


# ---------------------------------------------------------------------------
# risk-coverage
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selective():
    rng = np.random.default_rng(2)
    correct = rng.random(400) < 0.8
    good = correct + rng.normal(0.0, 0.6, 400)
    return {"msp": good, "energy": np.round(good + rng.normal(0.0, 0.5, 400), 1), "random": rng.normal(size=400)}, correct


def test_risk_coverage_writes_png(tmp_path, selective):
    scores, correct = selective
    target = tmp_path / "x" / "rc.png"
    assert plots.risk_coverage(scores, correct, str(target), title="best trial") == target
    assert_png(target)


def test_risk_coverage_legend_and_curves_match_selective_metrics(tmp_path, selective, closed):
    from ood_ray.selective import oracle_aurc, risk_coverage_curve, selective_metrics

    scores, correct = selective
    plots.risk_coverage(scores, correct.astype(int), tmp_path / "rc.png")
    (fig,) = closed
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    r = 1.0 - correct.mean()
    assert labels == [f"{n} (AURC {selective_metrics(s, correct)['aurc']:.4f})" for n, s in scores.items()] + [f"oracle (AURC {oracle_aurc(r):.4f})"]
    lines = ax.get_lines()
    assert [ln.get_linestyle() for ln in lines] == ["-", "-", "-", "--"]
    for line, s in zip(lines, scores.values(), strict=False):
        cov, risk, _ = risk_coverage_curve(s, correct)
        x, y = line.get_xdata(), line.get_ydata()
        np.testing.assert_allclose(x[1:], cov)
        np.testing.assert_allclose(y[1:], risk)
        assert line.get_drawstyle() == "steps-pre" and x[0] == 0.0 and x[-1] == 1.0
        assert y[-1] == pytest.approx(r)  # every curve ends at the error rate of all ID
    oracle = lines[-1]
    assert oracle.get_ydata()[np.searchsorted(oracle.get_xdata(), 1.0 - r) - 1] == 0.0 and oracle.get_ydata()[-1] == pytest.approx(r)


@pytest.mark.parametrize(
    ("call", "needles"),
    [
        (lambda p: plots.risk_coverage({}, [True], p), ["scores", "empty"]),
        (lambda p: plots.risk_coverage({"a": [1.0, 2.0], "b": [1.0]}, [True, False], p), ["sizes", "[1, 2]"]),
        (lambda p: plots.risk_coverage({"a": [1.0, np.nan]}, [True, False], p), ["scores['a']", "non-finite"]),
        (lambda p: plots.risk_coverage({"a": [1.0, 2.0]}, [True], p), ["correct", "(1,)"]),
        (lambda p: plots.risk_coverage({"a": [1.0, 2.0]}, [0.5, 1.0], p), ["correct", "boolean"]),
    ],
)
def test_risk_coverage_bad_input_names_it(tmp_path, call, needles):
    target = tmp_path / "out" / "rc.png"
    with pytest.raises(ValueError) as err:
        call(target)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not target.parent.exists()
