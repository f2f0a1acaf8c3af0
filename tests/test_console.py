"""The commands' quiet console: which library messages it turns off, through which switch, and that
``-v`` (before or after the command) keeps them. A failing trial's error reaching the quiet console
is tested with a real sweep in tests/test_tune.py (test_failed_trial_is_recorded_as_failed)."""

from __future__ import annotations

import logging

import pytest

from ood_ray import console
from ood_ray.cli import build_parser


@pytest.fixture()
def clean_env(monkeypatch):
    for key in ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "RAY_AIR_NEW_OUTPUT", console.VERBOSE_ENV):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch


def test_quiet_sets_the_libraries_switches_and_drops_only_the_notices(clean_env, caplog):
    import os

    clean_env.setenv("RAY_AIR_NEW_OUTPUT", "1")  # a user's own setting is kept
    console.quiet()
    assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert console.is_quiet() and console.ray_logging_level() == logging.WARNING
    from ood_ray.ray_compat import AUTH_NOTICE_LOGGER

    auth = logging.getLogger(AUTH_NOTICE_LOGGER)
    with caplog.at_level(logging.WARNING):
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        logging.getLogger("mlflow.pyfunc").warning("Passing a Python object as `python_model` causes it to be serialized using CloudPickle, ...")
        logging.getLogger("mlflow.pyfunc").warning("another pyfunc warning")
    kept = [r.getMessage() for r in caplog.records]
    assert kept == ["Token authentication is disabled for this Ray cluster. Anyone with network access ...", "another pyfunc warning"]
    assert logging.getLogger("mlflow.store.db.utils").getEffectiveLevel() == logging.WARNING
    console.quiet()  # twice: one filter per logger, not two
    assert sum(isinstance(f, console._Drop) for f in auth.filters) == 1


def test_verbose_changes_nothing_and_reaches_trial_processes(clean_env):
    import os

    console.quiet(verbose=True)
    assert os.environ[console.VERBOSE_ENV] == "1" and not console.is_quiet()
    assert "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S" not in os.environ
    assert console.ray_logging_level() == logging.INFO


@pytest.mark.parametrize("argv", [["-v", "tune"], ["tune", "-v"], ["tune", "--verbose"]])
def test_verbose_flag_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_quiet_by_default():
    assert build_parser().parse_args(["tune"]).verbose is False
