"""Hyperparameter sweeps: Ray Tune + Optuna over training trials, recorded in MLflow.

Three layers (Ray's Tune-over-Train shape):

1. ``engine.train_loop`` trains one trial and reports each epoch's validation metrics (and
   ``objective``) with a checkpoint: inside the Tune trial (``--trial-runner tune``, one worker) or
   on every Ray Train worker of a ``TorchTrainer`` (``train``).
2. ``trial.run_trial`` is the Tune trainable: the suggested hyperparameters -> a ``TrainConfig``.
3. ``sweep.run_sweep`` builds the ``Tuner`` (``OptunaSearch`` with a seeded TPE sampler and a study
   persisted in sqlite, ``ASHAScheduler`` on the per-epoch objective), or restores it on resume;
   ``report.finish_sweep`` then evaluates the best trial on the test split, writes the plots and
   tables, and registers the best model.

Modules: ``config`` (SweepConfig), ``space`` (search space, default point), ``trial``, ``sweep``,
``report``. This package's ``__init__`` imports nothing, so a trial process that imports
``tuning.trial`` does not import MLflow, Optuna or matplotlib.

Trials see validation data only: they never evaluate the test split (``evaluate_test=False``),
and post-hoc values (ε, calibration settings, δ) are chosen inside each trial on its own
checkpoint. The test split is read once, for the best trial, after the choice is made.
"""
