"""The search space of a sweep (define-by-run, for Optuna) and its untuned default point.

Module level, because ``OptunaSearch`` pickles the space with plain pickle.
"""

from __future__ import annotations

from ..config import TrainConfig
from ..methods import METHODS

LR_BELOW, LR_ABOVE = 10.0, 4.0  # the learning rate is searched in [lr / 10, 4 * lr]
WD_RANGE = (1e-5, 1e-3)


class SearchSpace:
    """Define-by-run space: learning rate and weight decay, then the method's own parameters.

    The learning rate is searched log-uniformly in [lr/10, 4·lr] around the base config's
    ``lr`` (0.005–0.2 for the default 0.05), so the range suits SGD and AdamW alike.
    """

    def __init__(self, method: str, lr: float = 0.05):
        self.method = method
        self.lr = lr

    def __call__(self, trial) -> dict:
        lr = trial.suggest_float("lr", self.lr / LR_BELOW, self.lr * LR_ABOVE, log=True)
        wd = trial.suggest_float("weight_decay", *WD_RANGE, log=True)
        return {"lr": lr, "weight_decay": wd, "method_params": METHODS[self.method].search_space(trial)}

    def describe(self) -> dict:
        """The space as a plain dict (for the parent run), read off a recording Optuna trial."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        trial = study.ask()
        self(trial)
        return {name: repr(dist) for name, dist in trial.distributions.items()}


def default_point(method: str, base: TrainConfig) -> dict:
    """The untuned default configuration, in the space's flat parameter names."""
    import optuna

    trial = optuna.create_study().ask()
    keys = set(SearchSpace(method, base.lr)(trial)["method_params"])
    defaults = {**METHODS[method].defaults, **base.method_params}
    return {"lr": base.lr, "weight_decay": base.weight_decay, **{k: defaults[k] for k in keys}}


def flat_point(config: dict, like: dict) -> dict:
    """A trial's TrainConfig dict in the flat names of ``like`` (a point of the space)."""
    return {k: config[k] if k in ("lr", "weight_decay") else config["method_params"].get(k) for k in like}
