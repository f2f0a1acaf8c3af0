"""What a sweep costs besides training: ``run_sweep`` (Ray Tune [+ Train]) against the same trials in-process.

    python bench/tune_overhead.py                       # every side; K = 4 trials of 2 epochs, dismax
    python bench/tune_overhead.py --sides tune1 seq --trials 2 --epochs 1
    python bench/tune_overhead.py --sweep-dir <storage>/<sweep name>    # read a finished sweep's folder

Sides, in the order of ``--sides``, on one local Ray (started by the first):

* ``quickstart``: ``python jobs/tune_dismax.py`` as the README runs it (the CLI's tune defaults:
  8 trials x 8 epochs, one worker each, ASHA), in its own MLflow store;
* ``tune1``: K trials through ``ood_ray.tuning.sweep.run_sweep`` with one worker each (the loop
  runs in the Tune trial); ``train2``: the same K trials with two workers each (a TorchTrainer
  per trial, each worker half the CPUs);
* ``seq``: the same K trials in this process, plain Optuna over ``ood_ray.engine.train_local``.

The K trials are points drawn once from the sweep's search space (seeded); ASHA off, one trial at
a time, nothing registered. Overhead per trial = (sweep wall - its compute - its fixed costs) / K,
minus (wall - compute) / K of ``seq``; compute = Σ ``train_time_s`` + ``eval_time_s`` of the reports.

Timestamps (``--no-instrument``: totals only): a Tune callback added to ``run_sweep``'s
``RunConfig`` sees trials start and end; ``ensure_ray`` and ``finish_sweep`` are timed in
``ood_ray.tuning.sweep``; the trainable (``ood_ray.tuning.sweep.run_trial``, wrapped) records its
process's age, its imports and how long ``ood_ray.tuning.trial.run_trial`` took (for two-worker
trials: building and fitting the TorchTrainer).
A sampler adds up the CPU seconds of Ray's processes by role (process title).
``--env K=V`` is set before Ray starts; ``--tune-config K=V`` overrides a ``tune.TuneConfig`` keyword.
Targets: one-worker <= 3 s and two-worker <= 10 s per trial, fixed <= 12 s, compute fraction >= 0.5.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SIDES = ("quickstart", "tune1", "train2", "seq")
EVENTS: str | None = None  # JSON lines appended by the driver and the trial processes (one machine)


def log(msg: str) -> None:
    C.log(msg, "tune-overhead")


def rec(ev: str, **kw) -> None:
    if EVENTS:
        with open(EVENTS, "a") as f:  # one short O_APPEND write per event
            f.write(json.dumps({"t": kw.pop("t", time.time()), "ev": ev, **kw}) + "\n")


def timed_run_trial(config: dict, **params) -> None:
    """The trainable with timestamps; defined in __main__, so Ray ships it (and ``rec``) by value."""
    t_enter = time.time()
    import psutil
    from ray import tune

    tid = tune.get_context().get_trial_id()
    rec("trial_enter", t=t_enter, trial=tid, proc_created=psutil.Process().create_time())
    t0 = time.time()
    from ood_ray import engine, ray_train  # noqa: F401 - what a trial imports (torch, Ray Train)
    from ood_ray.tuning import trial

    rec("trial_imported", trial=tid, dur=time.time() - t0)
    t0 = time.time()
    trial.run_trial(config, **params)  # "train" trials: make_trainer(...).fit() and the report hand-over
    rec("trial_run", trial=tid, dur=time.time() - t0)  # not reached when Tune stops the trial (ASHA)


@contextlib.contextmanager
def tune_keywords(cls: str, update):
    """``ray.tune.<cls>(...)`` (as ``run_sweep`` calls it) gets ``update(keywords)``; a subclass, so
    Ray's own ``isinstance`` checks still hold."""
    import ray.tune

    orig = getattr(ray.tune, cls)
    setattr(ray.tune, cls, type(cls, (orig,), {"__init__": lambda self, *a, **kw: orig.__init__(self, *a, **update(kw))}))
    try:
        yield
    finally:
        setattr(ray.tune, cls, orig)


def with_trial_times(kw: dict) -> dict:
    callbacks = list(kw.get("callbacks") or [])
    if not any(type(c).__name__ == "TrialTimes" for c in callbacks):  # once, also when Ray copies the config
        callbacks.append(trial_times_callback())
    return {**kw, "callbacks": callbacks}


def instrument_driver() -> None:
    import ood_ray.tuning.sweep as sw

    if getattr(sw, "_bench", False):
        return
    sw._bench = True
    for name in ("ensure_ray", "finish_sweep"):
        orig = getattr(sw, name)

        def timed(*a, _orig=orig, _name=name, **kw):
            rec(_name + "_begin")
            try:
                return _orig(*a, **kw)
            finally:
                rec(_name + "_end")

        setattr(sw, name, timed)
    sw.run_trial = timed_run_trial


def trial_times_callback():
    from ray import tune

    class TrialTimes(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            rec("tune_trial_start", trial=trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            rec("tune_trial_complete", trial=trial.trial_id)

    return TrialTimes()


class CpuSampler(threading.Thread):
    """CPU seconds of every process under this driver since the sampler started, by role."""

    def __init__(self):
        super().__init__(daemon=True)
        self.halt, self.seen = threading.Event(), {}
        self.sample()
        self.base = {pid: cpu for pid, (_, cpu) in self.seen.items()}

    def sample(self) -> None:
        import psutil

        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error, IndexError):  # IndexError: no command line (exiting)
                title = p.cmdline()[0]
                role = title[5:].split(".")[0].split(" ")[0] if title.startswith("ray::") else "ray_daemons"
                if role == "IDLE" and p.pid in self.seen:  # the role it had while working
                    role = self.seen[p.pid][0]
                self.seen[p.pid] = (role, sum(p.cpu_times()[:2]))

    def run(self) -> None:
        while not self.halt.wait(0.5):
            self.sample()

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        self.sample()
        out: dict[str, dict] = {}
        for pid, (role, cpu) in self.seen.items():
            r = out.setdefault(role, {"processes": 0, "cpu_s": 0.0})
            r["processes"] += pid not in self.base
            r["cpu_s"] = round(r["cpu_s"] + cpu - self.base.get(pid, 0.0), 1)
        return out


def compute(reports: list[dict]) -> float:
    return sum(r.get("train_time_s", 0.0) + r.get("eval_time_s", 0.0) for r in reports)


def folder_summary(path: str) -> dict:
    """Per-trial runtime, compute and overhead of a finished sweep, from its Tune folder alone."""
    rows = []
    for f in sorted(Path(path).glob("*/result.json")):
        rs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rs:  # time_total_s: from the trainable's start to this report
            total, c = rs[-1]["time_total_s"], compute(rs)
            rows.append({"trial": rs[0].get("trial_id", f.parent.name), "epochs": len(rs), "runtime_s": round(total, 2), "compute_s": round(c, 2), "overhead_s": round(total - c, 2), "first_report_s": round(rs[0]["time_total_s"] - compute(rs[:1]), 2), "start": rs[0]["timestamp"] - rs[0]["time_total_s"], "end": rs[-1]["timestamp"]})
    if not rows:
        raise SystemExit(f"{path}: no trial result.json files")
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    runtime = sum(r["runtime_s"] for r in rows)
    return {
        "sweep": Path(path).name, "trials": len(rows), "trial_span_s": round(span, 1), "sum_runtime_s": round(runtime, 1),
        "sum_compute_s": round(sum(r["compute_s"] for r in rows), 2), "epochs": sum(r["epochs"] for r in rows),
        "overhead_per_trial_s": round(statistics.mean(r["overhead_s"] for r in rows), 2),
        "startup_per_trial_s": round(statistics.mean(r["first_report_s"] for r in rows), 2),
        "gap_per_trial_s": round((span - runtime) / len(rows), 2),
        "per_trial": [{k: v for k, v in r.items() if k not in ("start", "end")} for r in rows],
    }  # fmt: skip


def breakdown(events: list[dict], compute_s: dict) -> dict:
    def first(ev, **m):
        return next((e for e in events if e["ev"] == ev and all(e.get(k) == v for k, v in m.items())), None)

    def span(a, b):
        return None if a is None or b is None else round(b["t"] - a["t"], 2)

    starts = [e for e in events if e["ev"] == "tune_trial_start"]
    ends = [e for e in events if e["ev"] == "tune_trial_complete"]
    fixed = {
        "driver_setup_s": span(first("run_sweep_begin"), first("ensure_ray_begin")),
        "ray_init_s": span(first("ensure_ray_begin"), first("ensure_ray_end")),
        "ray_to_first_trial_s": span(first("ensure_ray_end"), starts[0] if starts else None),
        "last_trial_to_finish_s": span(ends[-1] if ends else None, first("finish_sweep_begin")),
        "finish_sweep_s": span(first("finish_sweep_begin"), first("finish_sweep_end")),
    }
    fixed["total_fixed_s"] = round(sum(v for v in fixed.values() if v is not None), 2)
    rows = []
    for s in starts:  # gap: from the last trial end before this start (a free slot) to this start
        tid, prev = s["trial"], max((e for e in ends if e["t"] <= s["t"]), key=lambda e: e["t"], default=None)
        end, enter, imp, ran = (first(ev, trial=tid) for ev in ("tune_trial_complete", "trial_enter", "trial_imported", "trial_run"))
        c, total = compute_s.get(tid, 0.0), span(s, end)
        rows.append({
            "trial_id": tid, "gap_before_s": span(prev, s), "tune_start_to_trainable_s": span(s, enter),
            "trial_process_age_s": round(enter["t"] - enter["proc_created"], 2) if enter else None,
            "trial_imports_s": round(imp["dur"], 2) if imp else None, "run_trial_s": round(ran["dur"], 2) if ran else None,
            "compute_s": round(c, 2), "trial_span_s": total, "in_trial_overhead_s": round(total - c, 2) if total is not None else None,
        })  # fmt: skip
    means = {k: round(statistics.mean(v), 2) for k in (rows[0] if rows else {}) if k != "trial_id" and (v := [r[k] for r in rows if isinstance(r[k], int | float)])}
    return {"fixed": fixed, "per_trial_mean": means, "per_trial": rows}


def make_points(method: str, k: int, seed: int) -> list[dict]:
    import optuna

    from ood_ray.tuning.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, study = SearchSpace(method, 0.05), optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(k):
        t = study.ask()
        space(t)
        points.append(dict(t.params))
    return points


def make_sweep(args, tmp: Path, side: str, points: list[dict]):
    from ood_ray.cli import TUNE_DEFAULTS
    from ood_ray.config import TrainConfig
    from ood_ray.tuning.config import SweepConfig

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if side == "quickstart":
        base = TrainConfig.from_dict({**TUNE_DEFAULTS, "storage_path": str(tmp / "ray"), "mlflow_uri": f"sqlite:///{tmp}/quickstart.db"})
        return SweepConfig(method="dismax", base=base, name=f"quickstart-{stamp}").validate()
    runner, workers = ("tune", 1) if side in ("tune1", "seq") else ("train", 2)
    base = TrainConfig(
        epochs=args.epochs, num_workers=workers, cpus_per_worker=args.cpus_per_worker / workers, batch_size=args.batch_size,
        storage_path=str(tmp / "ray"), mlflow_uri=f"sqlite:///{tmp}/mlflow.db", experiment="tune-overhead", delta_tpr=0.95,
    )  # fmt: skip
    return SweepConfig(
        method=args.method, base=base, num_trials=len(points), trial_cpus=args.trial_cpus, trial_runner=runner, concurrency=1,
        name=f"overhead-{side}-{stamp}", seed=args.seed, asha=False, include_default=False, points_to_evaluate=points, register_name="",
    ).validate()  # fmt: skip


def run_sequential(sweep, points: list[dict], tmp: Path) -> dict:
    import optuna

    from ood_ray.engine import train_local
    from ood_ray.tuning.space import SearchSpace
    from ood_ray.tuning.trial import trial_config

    space, base, rows = SearchSpace(sweep.method, sweep.base.lr), sweep.base.to_dict(), []

    def objective(trial) -> float:
        t0 = time.perf_counter()
        reports = train_local(trial_config({"base": base, **space(trial)}), tmp / f"seq-{trial.number}")
        rows.append({"number": trial.number, "wall_s": round(time.perf_counter() - t0, 2), "compute_s": round(compute(reports), 2), "objective": reports[-1]["objective"]})
        log(f"sequential trial {trial.number}: {rows[-1]}")
        return reports[-1]["objective"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=sweep.seed))
    for p in points:
        study.enqueue_trial(p)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=len(points))
    wall = time.perf_counter() - t0
    c = sum(r["compute_s"] for r in rows)
    return {"wall_s": round(wall, 2), "trials": len(rows), "compute_s": round(c, 2), "in_process_overhead_per_trial_s": round((wall - c) / len(rows), 2), "trial_rows": rows}


def run_side(sweep, tmp: Path, instrument: bool) -> dict:
    global EVENTS
    from ood_ray.tuning.sweep import run_sweep

    EVENTS = str(tmp / f"events-{sweep.name}.jsonl") if instrument else None
    if instrument:
        instrument_driver()
    cpu = CpuSampler()
    cpu.start()
    rec("run_sweep_begin")
    t0 = time.perf_counter()
    with tune_keywords("RunConfig", with_trial_times) if instrument else contextlib.nullcontext():
        out = run_sweep(sweep)
    wall = time.perf_counter() - t0
    rec("run_sweep_end")
    folder = folder_summary(out.experiment_path)
    res = {"runner": sweep.runner, "wall_s": round(wall, 2), "trials": folder["trials"], "compute_s": folder["sum_compute_s"], "epochs_trained": folder["epochs"], "tune_folder": folder, "cpu_s_by_process_role": cpu.stop()}
    if EVENTS and Path(EVENTS).exists():
        events = sorted((json.loads(line) for line in Path(EVENTS).read_text().splitlines() if line.strip()), key=lambda e: e["t"])
        res["breakdown"] = breakdown(events, {r["trial"]: r["compute_s"] for r in folder["per_trial"]})
        res["fixed_costs_s"] = res["breakdown"]["fixed"]["total_fixed_s"]
    return res


def overhead(side: dict, seq: dict) -> dict:
    seq_other = seq["wall_s"] - seq["compute_s"]
    other = side["wall_s"] - side["compute_s"]
    out = {"overhead_per_trial_incl_fixed_s": round((other - seq_other) / side["trials"], 2)}
    if side.get("fixed_costs_s") is not None:
        out["overhead_per_trial_s"] = round((other - side["fixed_costs_s"] - seq_other) / side["trials"], 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="what to run, in this order (default all)")
    p.add_argument("--trials", type=int, default=4, help="K: trials of each overhead side (default 4)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial of the overhead sides (default 2)")
    p.add_argument("--method", default="dismax")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of a trial's worker(s): a two-worker trial gives each half")
    p.add_argument("--trial-cpus", type=float, default=0.5, help="CPUs of a two-worker trial's Tune trial (the SweepConfig default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-config", action="append", default=[], metavar="KEY=JSON", help="override a tune.TuneConfig keyword (e.g. reuse_actors=false); repeatable")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set before Ray starts (repeatable)")
    p.add_argument("--no-instrument", action="store_true", help="totals only, no timestamps")
    p.add_argument("--sweep-dir", help="only read a finished sweep's folder: per-trial runtime, compute and overhead")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp folder)")
    args = p.parse_args(argv)
    if args.sweep_dir:
        return folder_summary(args.sweep_dir)
    # Ray gives its workers OMP_NUM_THREADS = their CPUs: the in-process side must match
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(args.cpus_per_worker))))
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.update(kv.split("=", 1) for kv in args.env)
    C.capture_stdout()
    overrides = {k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.tune_config)}
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        import ray

        import ood_ray.engine  # noqa: F401 - imported before any side's clock starts
        import ood_ray.tuning.sweep  # noqa: F401

        points = make_points(args.method, args.trials, args.seed)
        out: dict = {"settings": {k: v for k, v in vars(args).items() if k != "keep"} | {"points": points, "driver_import_s": round(time.perf_counter() - t, 2)}, "machine": C.machine_info()}
        sides: dict = {}
        for side in args.sides:
            try:
                log(f"side {side}")
                if side == "seq":
                    sides[side] = run_sequential(make_sweep(args, tmp, side, points), points, tmp)
                else:
                    with tune_keywords("TuneConfig", lambda kw: {**kw, **overrides}) if overrides else contextlib.nullcontext():
                        sides[side] = run_side(make_sweep(args, tmp, side, points), tmp, not args.no_instrument)
                log(f"{side}: {sides[side]['wall_s']:.1f} s")
            except Exception as e:  # noqa: BLE001 - keep what the other sides measured, and why this one failed
                log(f"{side} failed: {type(e).__name__}: {e}")
                out[f"{side}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        for side, label in (("seq", "sequential"), ("quickstart", "quickstart"), ("tune1", "one_worker"), ("train2", "two_worker")):
            if side in sides:
                out[label] = sides[side] | (overhead(sides[side], sides["seq"]) if side in ("tune1", "train2") and "seq" in sides else {})
        if "quickstart" in out:
            out["quickstart"]["compute_fraction"] = round(out["quickstart"]["compute_s"] / out["quickstart"]["wall_s"], 3)
        out["figures"] = {
            "one_worker_overhead_per_trial_s": out.get("one_worker", {}).get("overhead_per_trial_s"),
            "two_worker_overhead_per_trial_s": out.get("two_worker", {}).get("overhead_per_trial_s"),
            "fixed_per_sweep_s": (out.get("quickstart") or out.get("one_worker") or {}).get("fixed_costs_s"),
            "quickstart_compute_fraction": out.get("quickstart", {}).get("compute_fraction"),
        }
        out["targets"] = {"one_worker_overhead_per_trial_s": "<= 3", "two_worker_overhead_per_trial_s": "<= 10", "fixed_per_sweep_s": "<= 12", "quickstart_compute_fraction": ">= 0.5"}
        out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        if ray.is_initialized():
            ray.shutdown()
    return out


if __name__ == "__main__":
    C.emit(main())
