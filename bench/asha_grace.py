"""ASHA's first rung: which grace period finds the better final val objective at equal wall time?

    python bench/asha_grace.py                           # grace 1 vs 2, 3 sweep seeds, 100 s each
    python bench/asha_grace.py --graces 1 2 4 --seeds 0 1 2 3 --budget-s 150
    python bench/asha_grace.py --seeds 0 --epochs 2 --budget-s 30    # a quick check that it runs

Each sweep is the README quickstart (``python jobs/tune_dismax.py``: the CLI's tune defaults,
8 epochs (``--epochs``), ASHA, two one-worker trials at a time on 2 cores) with many trials and a wall-clock
budget for its trials (Tune's ``time_budget_s``), so every grace period gets the same time. A
sweep's result is the val objective of its best trial that completed every epoch (what the sweep
would hand on), never a test metric. The sweep seed (Optuna's TPE sampler) varies; the benchmark
and the trials' own seeds stay fixed.

Prints ONE JSON object: per grace period, the best objective of every seed, their mean, the
trials completed and stopped early, and per seed the paired difference against the first grace
period given.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import capture_stdout, emit, log  # noqa: E402


def run_one(tmp: Path, grace: int, seed: int, budget_s: float, trials: int, epochs: int | None) -> dict:
    import ray.tune

    from ood_ray.cli import TUNE_DEFAULTS
    from ood_ray.config import TrainConfig
    from ood_ray.tuning.config import SweepConfig
    from ood_ray.tuning.sweep import run_sweep

    base = TrainConfig.from_dict({**TUNE_DEFAULTS, **({"epochs": epochs} if epochs else {}), "storage_path": str(tmp / "ray"), "mlflow_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "asha-grace"})
    sweep = SweepConfig(method="dismax", base=base, num_trials=trials, grace_period=grace, seed=seed, name=f"grace{grace}-seed{seed}", register_name="")
    orig = ray.tune.TuneConfig
    ray.tune.TuneConfig = lambda *a, **kw: orig(*a, **{**kw, "time_budget_s": budget_s})
    try:
        t0 = time.perf_counter()
        out = run_sweep(sweep)
        wall = time.perf_counter() - t0
    finally:
        ray.tune.TuneConfig = orig
    done = [t for t in out.trials if t["status"] == "completed"]
    return {
        "grace": grace,
        "seed": seed,
        "best_val_objective": out.best["objective"],
        "best_val_acc": out.best["val_acc"],
        "best_val_auroc": out.best["val_auroc"],
        "trials_started": len(out.trials),
        "trials_completed": len(done),
        "trials_stopped_early": sum(t["status"] == "stopped early" for t in out.trials),
        "epochs_trained": sum(t["epochs"] for t in out.trials),
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graces", nargs="+", type=int, default=[1, 2], help="grace periods to compare (default 1 2; the first is the reference)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sweep seeds (default 0 1 2)")
    p.add_argument("--budget-s", type=float, default=100.0, help="wall-clock budget of each sweep's trials (default 100)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the quickstart's, 8)")
    p.add_argument("--max-trials", type=int, default=1000, help="trials a sweep may start within its budget (default 1000: the budget, not this, ends a sweep)")
    args = p.parse_args(argv)
    capture_stdout()
    runs = []
    with tempfile.TemporaryDirectory(prefix="asha-grace-") as tmp_name:
        import ray

        for seed in args.seeds:
            for grace in args.graces:  # interleaved: load drifts hit both alike
                log(f"grace {grace}, seed {seed}", "asha-grace")
                try:
                    runs.append(run_one(Path(tmp_name), grace, seed, args.budget_s, args.max_trials, args.epochs))
                except Exception as e:  # noqa: BLE001 - e.g. no trial completed within the budget
                    runs.append({"grace": grace, "seed": seed, "error": f"{type(e).__name__}: {str(e)[:500]}"})
                log(str(runs[-1]), "asha-grace")
        with contextlib.suppress(Exception):
            ray.shutdown()
    ok = {(r["grace"], r["seed"]): r["best_val_objective"] for r in runs if "best_val_objective" in r}
    ref, by_grace = args.graces[0], {}
    for g in args.graces:
        rows = [r for r in runs if r["grace"] == g and "best_val_objective" in r]
        vals = [r["best_val_objective"] for r in rows]
        paired = [v - ok[ref, s] for (gg, s), v in ok.items() if gg == g and (ref, s) in ok]
        by_grace[str(g)] = {
            "best_val_objective_per_seed": vals,
            "mean": round(statistics.mean(vals), 4) if vals else None,
            f"mean_difference_vs_grace_{ref}": round(statistics.mean(paired), 4) if paired else None,
            "seeds_better_than_reference": sum(d > 0 for d in paired),
            "seeds_worse_than_reference": sum(d < 0 for d in paired),
            "trials_completed_mean": round(statistics.mean(r["trials_completed"] for r in rows), 1) if rows else None,
            "trials_started_mean": round(statistics.mean(r["trials_started"] for r in rows), 1) if rows else None,
        }
    return {"what": "ASHA grace period vs best completed trial's val objective at equal wall time (quickstart settings)", "settings": vars(args), "by_grace": by_grace, "runs": runs}


if __name__ == "__main__":
    emit(main())
