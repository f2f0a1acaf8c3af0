"""Every private Ray API and undocumented Ray setting this package relies on, in one place.

Checked against Ray 2.60 (``SUPPORTED``); ``check_version`` warns once on another version, which
is when each entry here needs a look. Entries:

* ``tune_session``: the Tune session of a trial process (``ray.train._internal.session``), for
  the stop event (``trial_stopped``) and the report queues (``wait_for_forwarded_reports``);
* ``quiet_report_log`` / ``quiet_checkpoint_log``: loggers named after Ray's internal files;
* ``SweepSearch``: ``OptunaSearch`` reading its private ``_ot_trials``, ``_ot_study`` and
  ``_completed_trials``; ``SweepPBT``: ``PopulationBasedTraining`` reading its ``_trial_state`` and
  ``_time_attr`` and standing in for the controller's ``_schedule_trial_save``;
* environment settings Ray reads but does not document: the Train controller's poll interval,
  the preemption watcher, Tune's experiment-state snapshot interval and its function-trial
  reuse timeout (``set_*`` functions; a value already in the environment always wins);
* ``stop_orphaned_agents``: the process titles of a Ray node's agents, and that the raylet
  (process name ``raylet``) is their parent.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

SUPPORTED = "2.60."
_warned = False


def check_version() -> None:
    """Warn once when the installed Ray is not the version the private APIs here were checked on."""
    global _warned
    import ray

    if not _warned and not ray.__version__.startswith(SUPPORTED):
        _warned = True
        warnings.warn(f"ood_ray was checked against Ray {SUPPORTED}x, this is Ray {ray.__version__}: see ood_ray/ray_compat.py for the private APIs it uses", stacklevel=2)


def tune_session():
    """The Ray Tune session of this trial process, or None (private Ray 2.60 API, read only here)."""
    try:
        from ray.train._internal.session import get_session

        return get_session()
    except Exception:  # noqa: BLE001 - private API: callers go on without it
        return None


def trial_stopped() -> bool:
    """Whether Tune has stopped this function trial (its session's stop event is set).

    Tune takes a function trial's report and lets it train on at once, so a trial that ASHA stops
    is already in its next epoch; Ray 2.60 has no public API to notice it before the next report.
    """
    stop = getattr(tune_session(), "stop_event", None)
    return stop is not None and stop.is_set()


def quiet_report_log() -> None:
    """Ray 2.60 logs every report, metrics and all, under a logger named after its file."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def quiet_checkpoint_log() -> None:
    """Tune logs a line for every checkpoint a function trial persists."""
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


def quiet_restore_log() -> None:
    """Tune logs "Restored on <ip> from checkpoint: ..." each time a function trial starts from a
    checkpoint: a retry, or every turn of a PBT trial (the sweep's driver says so itself)."""
    logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.WARNING)


def set_train_poll_interval(seconds: float = 0.25) -> None:
    """Ray Train's controller polls its workers every 2 s by default, so each report waited up to
    2 s before Tune/MLflow saw it and a finished run up to 2 s before it ended. A poll is one small
    RPC per worker. Read where ``fit()`` runs, which passes it on to the controller."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(seconds))


def disable_preemption_watcher() -> None:
    """One local node: a preemption would take the driver with it, so Ray Train's preemption
    watcher (one more actor process per Train run, i.e. per sweep trial) has nothing to do.
    Must be set before ``ray.init`` so every Ray process inherits it."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


#: The logger of Ray's notice that a new local cluster has token authentication on (private module).
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_tune_console() -> None:
    """Tune's console settings for a quiet driver (``ood_ray.console``), kept when the user set them:
    no "snapshotting has been triggered multiple times" warning (sweeps snapshot every second on
    purpose, ``set_experiment_snapshot_interval``) and Tune's legacy reporter, silent at
    ``verbose=0`` (the new one prints its experiment box and result-folder hints at any level)."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def set_experiment_snapshot_interval(seconds: float = 1) -> None:
    """Tune saves its experiment state at most this often (default: >= 10 s); what a killed
    driver leaves behind is at most this old, so ``--resume`` loses at most this much."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(seconds))


def set_trial_reuse_timeout(seconds: float = 600) -> None:
    """Tune reuses a function trial's process once its loop has ended; a stopped loop ends within
    one training step, but an evaluation in progress finishes first, and Tune's default wait for
    that (2 s) would fail the reuse and so the next trial."""
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(seconds))


#: Process titles of the agents a raylet starts (``ray::<name>``), and the raylet's process name.
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
RAYLET = "raylet"


def stop_orphaned_agents() -> list[int]:
    """SIGKILL this user's Ray node agents whose raylet is gone; their pids.

    When a driver that started a local Ray is killed (SIGKILL), its GCS and raylet die with it, but
    the dashboard agent and the runtime-env agent, once they see their raylet gone, spend 60 s
    trying to report that to the dead GCS (Ray 2.60 ``publish_error_to_driver``; SIGTERM does not
    reach them meanwhile) before they exit. A raylet is the parent of its agents, so an agent whose
    parent is no longer a raylet is orphaned; agents of a live node are never touched.
    """
    import psutil

    killed = []
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmd = p.info["cmdline"] or []
            if not cmd or not cmd[0].startswith(AGENTS) or p.info["uids"].real != os.getuid():
                continue
            parent = p.parent()
            if parent is None or parent.name() != RAYLET:
                p.kill()
                killed.append(p.pid)
        except psutil.Error:
            continue  # gone meanwhile, or not ours to inspect
    return killed


def wait_for_forwarded_reports(session, settle_s: float = 0.2, timeout_s: float = 120.0) -> None:
    """Return only after Tune has taken the Train run's last forwarded report.

    Ray 2.60's Train-to-Tune bridge has a race: TuneReportCallback's last report may still sit in
    the trial's inter-actor queue when ``fit()`` returns; if this function returns first, the
    trainable's main thread later blocks for ever putting that report into a result queue that
    already holds the end-of-trial result, and the sweep hangs (seen under load). The report has
    been handed on when the inter-actor queue and the session's result queue are both empty; the
    check is repeated after ``settle_s`` so a report between the two queues is not missed. (A
    fixed 1 s wait did the same at +0.8 s per trial.)
    """
    queues = (getattr(session, "_inter_actor_queue", None), getattr(session, "result_queue", None))
    if None in queues:  # no session (private API changed) or nothing forwarded: nothing to wait for
        return
    deadline = time.monotonic() + timeout_s
    settled = 0
    while time.monotonic() < deadline and settled < 2:
        if all(q.empty() for q in queues):
            settled += 1
            if settled < 2:
                time.sleep(settle_s)
        else:
            settled = 0
            time.sleep(0.05)


def _sweep_search_class():
    """``SweepSearch``, built on first use: importing Optuna costs a trial process ~0.2 s."""
    from ray.tune.search.optuna import OptunaSearch

    class SweepSearch(OptunaSearch):
        """OptunaSearch that tolerates a resumed trial the study already recorded as finished.

        Tune snapshots its experiment state every few seconds, the Optuna study on every ``tell``.
        A driver killed in between leaves a trial finished in the study but running in Tune's
        snapshot; on ``--resume`` Tune runs it again (Ray Train restores its final checkpoint and
        reports it once more), and stock OptunaSearch would fail reporting to a finished trial.
        """

        def _finished_in_study(self, trial_id: str) -> bool:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None:
                return False
            return self._ot_study.trials[ot_trial.number].state.is_finished()

        def on_trial_result(self, trial_id: str, result: dict):
            if not self._finished_in_study(trial_id):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if self._finished_in_study(trial_id):
                self._completed_trials.add(trial_id)
                return
            if result and result.get("diverged"):  # a NaN/inf loss: FAIL in the study, not PRUNED
                result, error = None, True
            super().on_trial_complete(trial_id, result, error)

    SweepSearch.__module__, SweepSearch.__qualname__ = __name__, "SweepSearch"
    return SweepSearch


def _sweep_pbt_class(pb2: bool = False):
    """``SweepPBT`` (or ``SweepPB2``: the same on Ray's ``PB2``), built on first use (a sweep's
    driver only): Ray's PBT with its private ``_trial_state``, ``_time_attr`` and the controller's
    ``_schedule_trial_save``."""
    from ray import tune
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    if pb2:
        from ray.tune.schedulers.pb2 import PB2 as Base
    else:
        Base = PopulationBasedTraining

    class SweepPBT(Base):
        """Ray's PBT (or PB2, whose explore step is a GP bandit) with these changes.

        * Nothing at a trial's last epoch: nothing is left to train there, and an exploit would only
          replay the donor's final result under another trial's name.
        * A good trial's checkpoint is the one its report carries. Ray 2.60's PBT asks the controller
          for one more save of it (private ``_schedule_trial_save``); for a function trial that
          registers the reported checkpoint a second time, so it fills two of ``num_to_keep``'s places
          and is deleted twice (``FileNotFoundError`` logged as "Error handling checkpoint", and a
          donor's checkpoint gone sooner than ``num_to_keep`` promises).
        * Every trial's checkpoint at a PBT step is kept as the one to clone, not only a trial's that
          was in the top quantile when it reported: Ray's PBT forgets the checkpoint of a trial that
          reported before the others had scores (the first trials to start, a step ahead), so the
          poor trials had nothing to clone until that trial's next step, or its end.
        * With the whole population running at once (``multiplex=False``), a trial goes on training
          while another is paused for its exploit: Ray's PBT pauses every reporting trial while any is
          paused, so that paused trials get their turn, which only matters when they take turns.
        """

        def __init__(self, *args, last: int, multiplex: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.last, self.multiplex = last, multiplex

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get(self._time_attr, 0) >= self.last:
                return TrialScheduler.CONTINUE
            name, reported = result.get("checkpoint_dir_name"), None
            if isinstance(name, str) and name:
                reported = tune.Checkpoint(f"{trial.path.rstrip('/')}/{name}", filesystem=trial.storage.storage_filesystem)
                tune_controller = ReportedSave(tune_controller, trial, reported)
            decision = super().on_trial_result(tune_controller, trial, result)
            state = self._trial_state[trial]
            stepped = state.last_train_time == result.get(self._time_attr)  # this report was a PBT step
            if reported is not None and stepped and state.last_checkpoint is None and trial.status != Trial.PAUSED:  # paused: exploited
                state.last_checkpoint = reported
            if decision == TrialScheduler.PAUSE and not self.multiplex and trial.status != Trial.PAUSED:
                return TrialScheduler.CONTINUE
            return decision


    class ReportedSave:
        """The Tune controller as PBT sees it: a save of a trial is the checkpoint it just reported."""

        def __init__(self, controller, trial, checkpoint):
            self._controller, self._trial, self._checkpoint = controller, trial, checkpoint

        def _schedule_trial_save(self, trial, result=None):
            if trial is self._trial:
                return self._checkpoint
            return self._controller._schedule_trial_save(trial, result)

        def __getattr__(self, name):
            return getattr(self._controller, name)

    name = "SweepPB2" if pb2 else "SweepPBT"
    SweepPBT.__module__, SweepPBT.__qualname__, SweepPBT.__name__ = __name__, name, name
    return SweepPBT


_lazy: dict = {}
_BUILDERS = {"SweepSearch": _sweep_search_class, "SweepPBT": _sweep_pbt_class, "SweepPB2": lambda: _sweep_pbt_class(pb2=True)}


def __getattr__(name: str):
    """``ray_compat.SweepSearch`` / ``SweepPBT`` / ``SweepPB2`` (also how pickle finds them when Tune restores a sweep)."""
    if name in _BUILDERS:
        if name not in _lazy:
            _lazy[name] = _BUILDERS[name]()
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
