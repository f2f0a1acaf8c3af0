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
    """A training method: subclasses set the class attributes and override the hooks that differ.

    The contract (checked for every registered method by ``tests/test_method_contract.py``):

    Class attributes
        ``name``: the registry name (``ood-ray train --method NAME``, MLflow tags, model names).
        ``defaults``: every hyperparameter and its default; a parameter's type is its default's.
        ``needs_outliers``: training needs the benchmark's auxiliary outlier set; the loop then
        passes ``x_out`` (``outlier_batch(batch)`` images) to ``training_step``.
        ``default_score``: the OOD score reported as the run's AUROC, FPR95, ... (a key of
        ``eval_batch``); higher = more in-distribution.
        ``threshold_score``: the score the "don't know" threshold ``delta`` applies to: an image
        is unknown when it is below δ. ``threshold_range``: the interval its values (and so δ) lie
        in; ``delta`` is checked against it and δ chosen from val ID is clipped to it.
        ``eval_needs_grad``: scoring needs input gradients (input preprocessing).
        ``state_sync_keys``: keys of ``StepResult.logs`` averaged over ranks after every step and
        passed to ``update_state`` (e.g. the confidence λ).
        ``nonnegative`` / ``positive``: parameters that must be >= 0 / > 0.
        ``labels``: names used in error messages, e.g. ``{"budget": "budget (β)"}``.
        ``calibration_keys``: the keys ``calibrate`` may return; they are recorded as metrics of
        every run and sweep trial (returning another key is an error).
        ``exported_output``: one line saying what the exported model (``flat_output``) returns;
        stored in the checkpoint's model.json.
        ``pbt_params``: the parameters Population Based Training may change while a trial trains
        (``ood-ray tune --scheduler pbt``), each within its ``search_space`` range. ``None`` (the
        default): every float ``search_space`` suggests, except those that only seed
        ``initial_state`` (read once, at the start of training). ``()``: none.

    Hooks: ``make_head`` (required), ``training_step`` (required), ``logits``, ``scores``,
    ``eval_batch``, ``score_names``, ``flat_output``, ``initial_state``, ``update_state``,
    ``outlier_batch``, ``calibrate``, ``temperature``, ``search_space``, ``posthoc_grid``,
    ``validate``, ``class_head``; each documents its rule below.

    Registering: one new module in ``ood_ray/methods/`` and one ``"module:Class"`` line in
    ``REGISTRY`` of ``ood_ray/methods/__init__.py``; every command, the tuner and the serving code
    read the rest from the class.
    """

    name: str = ""
    needs_outliers: bool = False
    defaults: dict = {}
    default_score: str = "msp"
    eval_needs_grad: bool = False  # True when scoring needs input gradients (input preprocessing)
    threshold_score: str = "msp"  # the score the "don't know" threshold δ applies to
    threshold_range: tuple[float, float] = (0.0, 1.0)  # where the threshold score (and δ) lies
    state_sync_keys: tuple[str, ...] = ()  # step logs averaged over ranks and passed to update_state
    nonnegative: tuple[str, ...] = ()  # parameters that must be >= 0
    positive: tuple[str, ...] = ()  # parameters that must be > 0
    labels: dict[str, str] = {}  # names used in error messages, e.g. "budget (β)"
    calibration_keys: tuple[str, ...] = ()  # what calibrate() returns, recorded as metrics
    exported_output: str = "Exported models return the class logits (MLflow needs a single output tensor)."
    pbt_params: tuple[str, ...] | None = None  # what PBT may change mid-training; None = derived (see above)

    def __init__(self, params: dict | None = None):
        self.params = {**self.defaults, **(params or {})}
        self.check_params(self.params)

    @property
    def delta(self) -> float | None:
        """The "don't know" threshold on ``threshold_score`` (None = off)."""
        return self.params.get("delta")

    @classmethod
    def check_params(cls, params: dict) -> None:
        """Raise ValueError naming the parameter and its value unless ``params`` is valid.

        Every parameter must have the type of its default (a real number, not a bool, for numeric
        defaults; a string for string defaults); ``delta`` may also be None (no threshold).
        Numbers must be finite, then the ``nonnegative``/``positive`` bounds and ``delta`` in
        ``threshold_range`` apply, and finally the method's own ``validate``.
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
        low, high = cls.threshold_range
        if delta is not None and not low <= float(delta) <= high:
            what = "a threshold on a probability" if (low, high) == (0.0, 1.0) else f"the range of its threshold score {cls.threshold_score!r}"
            raise ValueError(f"{cls.name}: delta={delta} must lie in [{low:g}, {high:g}] ({what})")
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
        """Post-hoc step after training, on the validation split only; may change ``model``.

        Returns values to log, whose keys must be declared in ``calibration_keys``. Not called
        when a subclass does not override it (no validation pass is spent then).
        """
        return {}

    def temperature(self, model: nn.Module) -> float | None:
        """The calibration temperature the trained ``model``'s logits are divided by, or None.

        Exported with the model (MLflow metadata) and drawn in the reliability diagram. A method
        parameter is never read as a temperature by name: a method with one says so here.
        """
        return None

    def outlier_batch(self, batch_size: int) -> int:
        """Outlier images per step for a per-worker ID batch of ``batch_size`` (``needs_outliers``)."""
        return batch_size if self.needs_outliers else 0

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

    def class_head(self, head: nn.Module) -> nn.Module:
        """The part of the model's head that maps features to class logits (post-hoc detectors fit
        on it): the head itself unless it also returns other outputs (the confidence branch)."""
        return head

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
        """The model's output as one tensor (MLflow needs one); describe it in ``exported_output``."""
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
