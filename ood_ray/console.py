"""The console of the commands: the project's progress lines, without Ray's, Tune's and MLflow's
messages that are noise for this use (``ood-ray -v`` keeps all of them).

Each is turned off through its library's own setting, before Ray starts, and only where the project
already says the same thing or the message has no action for the user:

* Tune's "Experiment state snapshotting has been triggered multiple times": sweeps snapshot every
  second on purpose (``ray_compat.set_experiment_snapshot_interval``), so the warning fires on every
  sweep (Tune's documented switch, set in ``ray_compat.quiet_tune_console``).
* Tune's experiment box, "View detailed results" and TensorBoard hints: the sweep prints its folder
  and MLflow run itself (Tune's legacy reporter, silent at ``verbose=0``; ``ray_compat``).
* Tune's "Wrote the latest version of all result files" and Ray's "Started a local Ray instance"
  (INFO): the project prints the dashboard address itself (``ray_dashboard_line``).
* Ray's notice that token authentication is on: it stays on, only the notice is hidden.
* MLflow's "Creating initial MLflow database tables" (INFO) and its note that a pyfunc model is
  serialised with CloudPickle: the project's own serving model, which ``ood_ray.serving`` loads.
* Trial processes' per-epoch lines: the driver prints each trial's epochs itself (the sweep
  recorder), so trials do not echo theirs (``echo_epochs``; Ray would show them again deduplicated).

Warnings and errors are otherwise untouched: a failing trial's error, Tune's ERROR logs and Ray's
warnings about resources or dead nodes still reach the console.
"""

from __future__ import annotations

import logging
import os

#: True after ``quiet(True)``: trial processes (started afterwards, they inherit it) echo epochs.
VERBOSE_ENV = "OOD_RAY_VERBOSE"

_INFO_LOGGERS = ("ray.tune.tune", "mlflow.store.db.utils", "alembic.runtime.migration")
_NOTICES = {
    "ray-auth": "Token authentication is enabled for this Ray cluster",  # ray_compat.AUTH_NOTICE_LOGGER
    "mlflow.pyfunc": "Passing a Python object as `python_model` causes it to be serialized using CloudPickle",
}


class _Drop(logging.Filter):
    """Drops the records of one logger that start with ``prefix``; keeps every other one."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def quiet(verbose: bool = False) -> None:
    """Set the libraries' own switches for a quiet console (see the module docstring); with
    ``verbose`` nothing is changed and trial processes echo their epochs too."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    from . import ray_compat

    ray_compat.quiet_tune_console()
    for name in _INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, prefix in _NOTICES.items():
        logger = logging.getLogger(ray_compat.AUTH_NOTICE_LOGGER if name == "ray-auth" else name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))


def is_quiet() -> bool:
    """Whether the console is quiet: trial processes then leave their epoch lines to the driver."""
    return os.environ.get(VERBOSE_ENV) != "1"


def ray_logging_level() -> int:
    """``ray.init``'s ``logging_level``: WARNING on a quiet console (Ray's INFO start-up lines)."""
    return logging.WARNING if is_quiet() else logging.INFO
