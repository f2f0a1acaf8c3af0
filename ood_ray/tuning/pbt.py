"""Population Based Training for a sweep (``--scheduler pbt`` or ``pb2``): the population, the
mutations, the scheduler and what MLflow records of each exploit.

* The initial population: the untuned default point (``include_default``), the given
  ``points_to_evaluate``, then random draws (Tune's ``BasicVariantGenerator``, seeded with the
  sweep's seed) from the sweep's search space, converted from its Optuna distributions. No Optuna
  study: Ray's PBT refuses a searcher (``SearchGenerator``), and a define-by-run suggestion would be
  stale as soon as PBT changes the trial's values.
* What PBT changes: the learning rate (in the space's range) and the method's ``pbt_params``
  (``Method`` contract: by default every float of its ``search_space`` that does not only seed its
  ``initial_state``); a perturbed value (x0.8 or x1.2) is clipped into its range. PB2
  (``--scheduler pb2``, Ray's ``PB2``) changes the same values within the same ranges, chosen by a
  GP bandit fitted to the population's reward changes per epoch (on a linear scale, also for the
  learning rate). Until the donor has two reports with the same values the GP has no data, and
  PB2 copies the donor's values unchanged.
* The exploit restarts the trial from the donor's latest checkpoint through Tune
  (``tune.get_checkpoint``); the loop reads whose checkpoint it got and reports it
  (``engine.loop.adopted``), and ``PBTRecorder`` writes that to the trial's MLflow run.

Module level throughout: Tune pickles the scheduler and the callbacks with the experiment state.
"""

from __future__ import annotations

import json
import math

from ray import tune
from ray.tune.search import BasicVariantGenerator

from .. import ray_compat
from ..methods import METHODS
from ..progress import say
from ..tracking.recorder import SweepRecorder
from ..tracking.store import log_metrics, set_tag
from .config import SweepConfig
from .space import SearchSpace, default_point

EXPLOIT_TAG = "ood_ray.pbt.exploit"  # ood_ray.pbt.exploit.<n>: the n-th exploit of a trial (JSON)


def space_distributions(method: str, lr: float) -> dict:
    """The sweep's search space as Optuna distributions by flat name (read off a recording trial).

    PBT needs a fixed set of parameters: a space whose parameters depend on earlier suggestions
    would be read along one branch only.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    SearchSpace(method, lr)(trial)
    return dict(trial.distributions)


def tune_domain(dist):
    """A Tune search-space domain equivalent to an Optuna distribution."""
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return tune.choice(list(dist.choices))
    if isinstance(dist, od.IntDistribution):
        if dist.log:
            return tune.lograndint(dist.low, dist.high + 1)
        return tune.qrandint(dist.low, dist.high, dist.step) if dist.step and dist.step > 1 else tune.randint(dist.low, dist.high + 1)
    if dist.log:
        return tune.loguniform(dist.low, dist.high)
    return tune.quniform(dist.low, dist.high, dist.step) if dist.step else tune.uniform(dist.low, dist.high)


def mutable_params(method: str, dists: dict) -> list[str]:
    """The method parameters PBT may change: its ``pbt_params``, or the derived default."""
    import optuna.distributions as od

    cls = METHODS[method]
    if cls.pbt_params is not None:
        return list(cls.pbt_params)
    seeds = set(cls().initial_state())  # read once, at the start: changing them later does nothing
    own = [k for k in dists if k not in ("lr", "weight_decay")]
    return [k for k in own if isinstance(dists[k], od.FloatDistribution) and k not in seeds]


def nested(flat: dict) -> dict:
    """A point in flat Optuna names as a trial config: ``lr``, ``weight_decay``, ``method_params``."""
    return {
        **{k: flat[k] for k in ("lr", "weight_decay") if k in flat},
        "method_params": {k: v for k, v in flat.items() if k not in ("lr", "weight_decay")},
    }


class Clip:
    """PBT's ``custom_explore_fn``: puts each mutated value back into its range (x1.2 may leave it)."""

    def __init__(self, bounds: dict[str, tuple[float, float]]):
        self.bounds = bounds  # flat name -> (low, high)

    def __call__(self, config: dict) -> dict:
        for name, (low, high) in self.bounds.items():
            holder = config if name == "lr" else config["method_params"]
            holder[name] = float(min(max(holder[name], low), high))
        return config


def pbt_plan(sweep: SweepConfig) -> dict:
    """What a PBT sweep mutates and within which ranges (recorded in the sweep's parent run)."""
    base = sweep.base
    dists = space_distributions(sweep.method, base.lr)
    names = ["lr", *mutable_params(sweep.method, dists)]
    return {"scheduler": sweep.scheduler_kind, "interval": sweep.pbt_interval, "mutated": {k: [dists[k].low, dists[k].high, bool(dists[k].log)] for k in names}}


def make_pbt(sweep: SweepConfig, concurrency: int | None = None) -> tuple[object, BasicVariantGenerator, dict]:
    """The scheduler, the initial population's generator and the param-space entries it samples;
    ``concurrency``: trials at once (fewer than the population: they take turns)."""
    base = sweep.base
    dists = space_distributions(sweep.method, base.lr)
    own = mutable_params(sweep.method, dists)
    domain = {k: tune_domain(d) for k, d in dists.items()}
    space = {"lr": domain["lr"], "weight_decay": domain["weight_decay"], "method_params": {k: v for k, v in domain.items() if k not in ("lr", "weight_decay")}}
    mutations = {"lr": domain["lr"]}
    if own:
        mutations["method_params"] = {k: domain[k] for k in own}
    bounds = {k: (dists[k].low, dists[k].high) for k in ("lr", *own)}
    common = dict(
        time_attr="training_iteration",
        metric="objective",
        mode="max",
        perturbation_interval=sweep.pbt_interval,
        custom_explore_fn=Clip(bounds),
        last=base.epochs,
        multiplex=concurrency is None or concurrency < sweep.num_trials,
    )
    if sweep.scheduler_kind == "pb2":  # the same ranges, as [low, high] for PB2's GP (on a linear scale)
        ranges = {"lr": list(bounds["lr"])}
        if own:
            ranges["method_params"] = {k: list(bounds[k]) for k in own}
        scheduler = ray_compat.SweepPB2(hyperparam_bounds=ranges, **common)
    else:
        scheduler = ray_compat.SweepPBT(hyperparam_mutations=mutations, **common)
    points = ([default_point(sweep.method, base)] if sweep.include_default else []) + list(sweep.points_to_evaluate)
    population = BasicVariantGenerator(points_to_evaluate=[nested(p) for p in points] or None, random_state=sweep.seed)
    return scheduler, population, space


class PBTRecorder(SweepRecorder):
    """``SweepRecorder`` plus each exploit, as the trial's loop reported it from the checkpoint it got.

    A trial's run gets, at the first epoch trained on the donor's checkpoint: the metric
    ``pbt_exploits`` (how many so far), the tag ``ood_ray.pbt.exploit.<n>`` (JSON: that epoch, the
    donor trial and its epoch, each changed value as ``[old, new]``), and ``ood_ray.pbt.exploits``
    and ``ood_ray.pbt.donor``. The epochs after an exploit are logged again from where the trial now
    continues (MLflow keeps both values of an epoch trained twice).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exploits: dict[str, int] = {}  # trial id -> exploits so far
        self.events: dict[str, list[tuple[int, int, dict]]] = {}  # trial id -> (epoch, n, record) not yet written

    def on_trial_result(self, iteration, trials, trial, result, **info):
        donor = result.get("exploit_from")
        if isinstance(donor, str):
            tid, epoch = trial.trial_id, int(result.get("epoch", 0))
            n = self.exploits[tid] = self.exploits.get(tid, 0) + 1
            changed = {k.removeprefix("exploit_old_"): [v, result.get("exploit_new_" + k.removeprefix("exploit_old_"))] for k, v in result.items() if k.startswith("exploit_old_")}
            record = {"epoch": epoch, "from_trial": donor, "from_epoch": int(result.get("exploit_from_epoch", 0)), "changed": changed}
            self.events.setdefault(tid, []).append((epoch, n, record))
            self.logged[tid] = min(self.logged.get(tid, 0), epoch - 1)  # the epochs from here on are new
            values = ", ".join(f"{k} {a:.4g} -> {b:.4g}" if isinstance(a, float) and isinstance(b, float) else f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            say(f"trial {tid}: PBT exploit {n}: continues from trial {donor}'s checkpoint of epoch {record['from_epoch']}" + (f" with {values}" if values else ""))
        super().on_trial_result(iteration, trials, trial, result, **info)

    def _sync_trial(self, tid: str) -> None:
        if self.events.get(tid) and (run_id := self.run_of(tid)) is not None:
            while self.events[tid]:
                epoch, n, record = self.events[tid][0]
                log_metrics(self.client, run_id, {"pbt_exploits": n}, epoch)
                set_tag(self.client, run_id, f"{EXPLOIT_TAG}.{n}", json.dumps(record, default=_plain))
                set_tag(self.client, run_id, "ood_ray.pbt.exploits", str(n))
                set_tag(self.client, run_id, "ood_ray.pbt.donor", record["from_trial"])
                self.events[tid].pop(0)
        super()._sync_trial(tid)

    @property
    def unlogged(self) -> int:
        return super().unlogged + sum(len(v) for v in self.events.values())

    def take_over(self, other: PBTRecorder) -> None:
        """Carry the exploits ``other`` (the sweep's live recorder) could not write yet."""
        for tid, events in other.events.items():
            if events:
                self.events.setdefault(tid, []).extend(events)
                self.pending.setdefault(tid, {})  # so that ``sync`` visits the trial


def _plain(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)
