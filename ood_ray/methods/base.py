"""What a training method is: a head, a training step, OOD scores and its hyperparameters.

Methods are plain torch: no Ray, MLflow or I/O. The training loop and the tuner read everything
they need from the ``Method`` object registered under the method's name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Scores = dict[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class StepResult:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class; subclasses set the class attributes and override what differs."""

    name: str = ""
    needs_outliers: bool = False
    defaults: dict = {}
    default_score: str = "msp"
    eval_needs_grad: bool = False  # True when scoring needs input gradients (input preprocessing)
    threshold_score: str = "msp"  # the probability-like score the "don't know" threshold δ applies to
    state_sync_keys: tuple[str, ...] = ()  # step logs averaged over ranks and passed to update_state
    nonnegative: tuple[str, ...] = ()  # parameters that must be >= 0
    positive: tuple[str, ...] = ()  # parameters that must be > 0
    labels: dict[str, str] = {}  # names used in error messages, e.g. "budget (β)"

    def __init__(self, params: dict | None = None):
        self.params = {**self.defaults, **(params or {})}
        self.check_params(self.params)

    @classmethod
    def check_params(cls, params: dict) -> None:
        """Raise ValueError naming the parameter and its value unless ``params`` is valid.

        Every parameter must have the type of its default (a real number, not a bool, for numeric
        defaults; a string for string defaults); ``delta`` may also be None (no threshold).
        Numbers must be finite, then the ``nonnegative``/``positive`` bounds and ``delta`` in
        [0, 1] apply, and finally the method's own ``validate``.
        """
        if not isinstance(params, dict):
            raise ValueError(f"method {cls.name!r}: parameters must be a mapping of name to value, got {params!r}")
        unknown = sorted(str(k) for k in set(params) - set(cls.defaults))
        if unknown:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise ValueError(f"method {cls.name!r}: unknown parameter(s) {', '.join(unknown)}; known: {known}")
        full = {**cls.defaults, **params}
        for key, default in cls.defaults.items():
            value, label = full[key], cls.labels.get(key, key)
            if _is_number(default):
                if key == "delta" and value is None:  # None = no "don't know" threshold
                    continue
                if not _is_number(value):
                    raise ValueError(f"{cls.name}: {label}={value!r} must be a number")
            elif isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"{cls.name}: {label}={value!r} must be a string")
        for key in cls.nonnegative + cls.positive:
            ok = float(full[key]) > 0 if key in cls.positive else float(full[key]) >= 0  # NaN fails both
            if not ok:
                bound = "> 0" if key in cls.positive else ">= 0"
                raise ValueError(f"{cls.name}: {cls.labels.get(key, key)}={full[key]} must be {bound}")
        delta = full.get("delta")
        if delta is not None and not 0.0 <= float(delta) <= 1.0:
            raise ValueError(f"{cls.name}: delta={delta} must lie in [0, 1] (a threshold on a probability)")
        for key, value in full.items():
            if _is_number(value) and not math.isfinite(float(value)):
                raise ValueError(f"{cls.name}: {cls.labels.get(key, key)}={value!r} must be finite")
        cls.validate(full)

    @classmethod
    def validate(cls, params: dict) -> None:
        """Method-specific checks of the full parameter dict; raise ValueError naming the value."""

    def update_state(self, state: dict, synced: dict[str, float]) -> None:
        """Called after every optimizer step with ``state_sync_keys`` averaged over all ranks."""

    def calibrate(self, model: nn.Module, val_logits: torch.Tensor, val_labels: torch.Tensor) -> dict[str, float]:
        """Post-hoc step after training on the validation split; returns values to log."""
        return {}

    @classmethod
    def search_space(cls, trial) -> dict:
        """Method hyperparameters suggested on an Optuna trial (define-by-run), for tuning.

        Returns the ``method_params`` of one trial; the base method has none to tune. Only
        parameters that change training belong here: post-hoc ones are in ``posthoc_grid``.
        """
        return {}

    @classmethod
    def posthoc_grid(cls) -> list[dict]:
        """Candidate values of the post-hoc parameters (applied to a trained checkpoint).

        A tuning trial tries each candidate on its own checkpoint with the validation split and
        keeps the best, so these never cost a retraining. ``[{}]``: nothing to choose.
        """
        return [{}]

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def logits(self, output) -> torch.Tensor:
        """Class logits from the model's output (which may carry extra heads)."""
        return output

    def training_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor | None, state: dict) -> StepResult:
        raise NotImplementedError

    def scores(self) -> Scores:
        """OOD scores by name, computed from the model's output; higher = more in-distribution."""
        return {"msp": msp, "energy": energy}

    def eval_batch(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation outputs of one batch: ``logits`` and one entry per score name."""
        logits = self.logits(model(x))
        return {"logits": logits, **{name: fn(logits) for name, fn in self.scores().items()}}

    def flat_output(self, output) -> torch.Tensor:
        """Exported models return the class logits (MLflow needs a single output tensor)."""
        return output

    def score_names(self) -> list[str]:
        """Every score ``eval_batch`` returns."""
        return list(self.scores())

    def initial_state(self) -> dict:
        """Method state that evolves during training and is checkpointed (e.g. an adaptive λ)."""
        return {}


def _is_number(value) -> bool:
    """A real number (Python or numpy), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""
    return torch.softmax(logits, dim=1).max(dim=1).values


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy, logsumexp of the logits (Liu et al. 2020)."""
    return torch.logsumexp(logits, dim=1)
