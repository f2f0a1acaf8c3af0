"""What a post-hoc OOD detector is: parameters, ``fit`` on train features, ``score``, a saved state.

Detectors are plain torch: no Ray, MLflow or I/O. A detector is fitted on the penultimate features
of the training split (plus the model's classification head) and then scores new samples; scores
are oriented so that higher = more in-distribution and are returned as 1-D **float64** tensors on
the device of the input. Statistics are computed on the device of the features they are fitted on;
``state()`` always returns CPU tensors.

The contract (every registered detector subclasses ``Detector``):

Class attributes
    ``name``: the registry key. ``defaults``: every parameter and its default; a parameter's type
    is its default's (ints must be ints, not bools; floats accept ints; numbers must be finite).
    ``needs_linear_head``: the detector uses the head's weight/bias, so ``fit``/``restore`` refuse
    a head that is not an ``nn.Linear``. ``needs_model``: ``fit`` needs ``model=`` (a callable
    images -> logits) and ``score`` takes images instead of features (ODIN).
    ``fit_split``: the split ``fit`` is given: ``"train"`` (the train features, the default) or
    ``"val"`` (the val ID features, for a statistic fitted where the model did not train, as
    temperature scaling's T). ``grid_values``: the post-hoc search, as candidate values per parameter (``grid()`` is their
    product). ``state_keys``: the fitted statistics ``state()`` returns, each with its shape in
    ``D`` (features), ``K`` (classes) and ``N`` (any size >= 1); ``restore`` refuses a statistic
    of another shape, a non-float one, or one holding NaN or inf. ``fit_params``: the
    parameters those statistics depend on (stored in the state; ``restore`` refuses other values).
    ``needs_layers``: the detector reads inner layers of the model, not only the penultimate
    features (NAC): ``layer_names(model)`` (``model`` the ``nn.Module``, a ``Classifier``) are
    the layers it reads, the penultimate (``"backbone"``, D wide) last, and ``probe(model,
    images, logits, names)`` (``logits``: images -> class logits through it) returns their
    *layer probes*, a dict ``{layer name: N×C float64}`` computed with autograd
    (``detectors.layers``); ``fit``/``score`` take such dicts instead of features. A layer's
    probe does not depend on the other layers probed with it, nor on the parameters outside
    ``probe_params`` (``probe_key()``), so a caller computes each layer once for every grid
    candidate, streaming images batch by batch; a ``fit_samples`` parameter, when the detector
    has one, caps how many train images it is fitted on.

Hooks: ``validate`` (parameter ranges), ``_fit`` (statistics from train features), ``_score``,
``_grid_point`` (adapt or drop one grid candidate given the data's sizes), ``_check_inputs``,
``_fit_inputs`` (checked fit inputs and the N×D features they hold), ``probe``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

Model = Callable[[torch.Tensor], torch.Tensor]

#: Keys every ``state()`` holds besides the detector's own statistics.
COMMON_STATE = ("feature_dim", "num_classes")


class DetectorError(ValueError):
    """A detector was built, fitted or used with invalid parameters or inputs."""


class Detector:
    """A post-hoc OOD detector on penultimate features (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    needs_linear_head: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    needs_layers: ClassVar[bool] = False
    probe_params: ClassVar[tuple[str, ...]] = ()
    fit_split: ClassVar[str] = "train"
    grid_values: ClassVar[dict[str, list]] = {}
    state_keys: ClassVar[dict[str, tuple[str, ...]]] = {}
    fit_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        self.params: dict[str, Any] = self.check_params(params)
        self.head: nn.Module | None = None
        self.model: Model | None = None
        self.feature_dim: int | None = None
        self.num_classes: int | None = None
        self._stats: dict[str, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}
        self._fitted = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- parameters
    @classmethod
    def error(cls, message: str) -> DetectorError:
        """``detector 'knn': <message>``; a sentence (``needs ...``, ``is ...``) follows the name."""
        sep = " " if message.startswith(("needs ", "is ", "was ")) else ": "
        return DetectorError(f"detector {cls.name!r}{sep}{message}")

    @classmethod
    def bad(cls, key: str, value: Any, rule: str) -> DetectorError:
        """The error for one invalid parameter, e.g. ``detector 'knn': k=0 must be >= 1``."""
        return cls.error(f"{key}={value!r} {rule}")

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The full parameter dict (defaults merged, numbers normalised) or a DetectorError."""
        unknown = sorted(str(k) for k in params if k not in cls.defaults)
        if unknown:
            known = ", ".join(cls.defaults) or "none"
            given = ", ".join(f"{k}={params[k]!r}" for k in unknown)
            raise cls.error(f"unknown parameter(s) {given}; its parameters: {known}")
        full: dict[str, Any] = {}
        for key, default in cls.defaults.items():
            value = params.get(key, default)
            if isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise cls.bad(key, value, "must be an int")
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise cls.bad(key, value, "must be a number")
                value = float(value)
                if not math.isfinite(value):
                    raise cls.bad(key, value, "must be finite")
            full[key] = value
        cls.validate(full)
        return full

    @classmethod
    def validate(cls, params: dict[str, Any]) -> None:
        """Detector-specific range checks of the full parameter dict; raise ``cls.bad(...)``."""

    @classmethod
    def grid(
        cls,
        *,
        feature_dim: int | None = None,
        num_classes: int | None = None,
        num_train: int | None = None,
    ) -> list[dict[str, Any]]:
        """Candidate parameter dicts for a post-hoc search on a validation split.

        Without arguments: the product of ``grid_values`` (``[{}]`` when there is nothing to
        choose). The optional sizes make every candidate valid for the data: e.g. GEN's ``top_m``
        is capped at ``num_classes``, KNN drops ``k > num_train``, ViM lists dims below
        ``feature_dim``. Duplicates are removed; the order is stable.
        """
        names = list(cls.grid_values)
        out: list[dict[str, Any]] = []
        for combo in itertools.product(*(cls.grid_values[n] for n in names)):
            point = cls._grid_point(dict(zip(names, combo, strict=True)), feature_dim, num_classes, num_train)
            if point is not None and point not in out:
                out.append(point)
        return out or [{}]

    @classmethod
    def _grid_point(
        cls, point: dict[str, Any], feature_dim: int | None, num_classes: int | None, num_train: int | None
    ) -> dict[str, Any] | None:
        return point

    # ----------------------------------------------------------------- fitting
    def fit(
        self, features: torch.Tensor, labels: torch.Tensor, head: nn.Module, model: Model | None = None
    ) -> Detector:
        """Fit on train-split features (N×D float) and labels (N integer) for ``head``; returns self.

        ``head`` maps features to logits (N×K); ``model`` (images -> logits) only for detectors
        with ``needs_model``. The head and model are kept by reference, never copied or changed.
        """
        self._fitted = False
        self._cache = {}
        self._attach(head, model)
        inputs, z = self._fit_inputs(features)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise self.error(f"labels must be a 1-D tensor, got {_describe(labels)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise self.error(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape[0] != z.shape[0]:
            raise self.error(f"features has {z.shape[0]} rows but labels has {labels.shape[0]}")
        if z.shape[0] < 1:
            raise self.error("fit needs at least 1 training sample, got 0")
        self.feature_dim = int(z.shape[1])
        self.num_classes = self._probe_classes(z)
        y = labels.detach().to(device=z.device, dtype=torch.long)
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_classes:
            raise self.error(f"labels must lie in [0, {self.num_classes - 1}] (the head has {self.num_classes} classes), got [{low}, {high}]")
        with torch.no_grad():
            stats = self._fit(_detached(inputs), y)
        self._stats = {k: v.detach() for k, v in stats.items()}
        self._fitted = True
        return self

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fitted statistics (keys ``state_keys``) from checked train features and labels."""
        return {}

    def fitted(self) -> dict[str, float]:
        """Scalar values ``fit`` found that a user reads beside the chosen parameters (tempscale's
        T); shown in the ``evaluate`` table and logged with the chosen detector. None by default."""
        return {}

    def _fit_inputs(self, features: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs for _fit, the N×D features they hold)``: the checked features twice, by default."""
        z = self._check_features(features, "fit")
        return z, z

    def layer_names(self, model: nn.Module) -> list[str]:
        """``needs_layers`` only: the layers of ``model`` it reads, the penultimate last."""
        raise self.error("does not read the model's layers (needs_layers is False)")

    def probe(self, model: nn.Module, x: torch.Tensor, logits: Model | None = None, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``needs_layers`` only: the probes of layers ``names`` (default ``layer_names``) of images ``x``."""
        raise self.error("does not read the model's layers (needs_layers is False)")

    def probe_key(self) -> tuple:
        """Detectors with equal keys compute equal probes of the same images."""
        return (self.name, *(self.params[k] for k in self.probe_params))

    def _attach(self, head: nn.Module, model: Model | None) -> None:
        if not isinstance(head, nn.Module):
            raise self.error(f"head must be a torch.nn.Module mapping features to logits, got {type(head).__name__}")
        if self.needs_linear_head and not isinstance(head, nn.Linear):
            from . import DETECTORS  # the package registry; imported here, base is imported first

            others = ", ".join(n for n, c in DETECTORS.items() if not c.needs_linear_head)
            raise self.error(
                f"needs a linear classification head (nn.Linear); this model's head is "
                f"{type(head).__name__} — use one of: {others}"
            )
        if self.needs_model and not callable(model):
            raise self.error("needs the model: pass model= (a callable mapping images N×C×H×W to logits N×K)")
        self.head, self.model = head, model

    def _probe_classes(self, z: torch.Tensor) -> int:
        """K, the head's number of classes; checks the head accepts D-dimensional features."""
        head = self.head
        if isinstance(head, nn.Linear):
            if head.in_features != z.shape[1]:
                raise self.error(f"features have D={z.shape[1]} but the head expects in_features={head.in_features}")
            return int(head.out_features)
        with torch.no_grad():
            try:
                logits = self._logits(z[:1])
            except DetectorError:
                raise
            except Exception as exc:  # the head's own error, with the shapes that caused it
                raise self.error(f"the head ({type(head).__name__}) failed on features of shape {tuple(z[:1].shape)}: {exc}") from exc
        return int(logits.shape[1])

    # ----------------------------------------------------------------- scoring
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD scores of ``x`` (features N×D; images for ``needs_model``): float64, higher = ID."""
        if not self._fitted:
            raise self.error("is not fitted: call fit(features, labels, head) first")
        x = self._check_inputs(x)
        first = next(iter(x.values())) if isinstance(x, dict) else x  # layer probes: a dict
        if first.shape[0] == 0:
            return torch.empty(0, dtype=torch.float64, device=first.device)
        with torch.no_grad():
            out = self._score(_detached(x))
        return out.to(torch.float64).reshape(-1)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        z = self._check_features(x, "score")
        if z.shape[1] != self.feature_dim:
            raise self.error(f"was fitted on D={self.feature_dim} features but score got D={z.shape[1]}")
        return z

    def _check_features(self, x: Any, where: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise self.error(f"{where} needs features as a 2-D tensor N×D, got {_describe(x)}")
        if not x.dtype.is_floating_point:
            raise self.error(f"{where} needs floating-point features, got dtype {x.dtype}")
        if x.shape[1] < 1:
            raise self.error(f"{where} needs features with D >= 1 columns, got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise self.error(f"{where} got non-finite features (NaN or inf) in {bad} of {x.shape[0]} rows")
        return x

    # ----------------------------------------------------------------- helpers for subclasses
    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        """``head(z)`` on ``z``'s device, checked to be N×K.

        ``z`` is cast to the head's parameter dtype and device for the call (no-ops when they
        already agree) and the logits are brought back to ``z``'s device.
        """
        param = next(iter(self.head.parameters()), None) if self.head is not None else None
        inputs = z
        if param is not None and param.is_floating_point():
            inputs = z.to(device=param.device, dtype=param.dtype)
        out = self.head(inputs)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != z.shape[0]:
            raise self.error(f"the head must return logits N×K, got {_describe(out)} for input {tuple(z.shape)}")
        if self.num_classes is not None and out.shape[1] != self.num_classes:
            raise self.error(f"the head returns {out.shape[1]} logits but was fitted with {self.num_classes} classes")
        return out.to(z.device)

    def _linear(self, z: torch.Tensor) -> torch.Tensor:
        """Logits W·z + b of the linear head in float64 (for features changed before the head)."""
        weight, bias = self._weight_bias(z.device)
        return F.linear(z.to(torch.float64), weight, bias)

    def _weight_bias(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head
        assert isinstance(head, nn.Linear)
        weight = head.weight.detach().to(device=device, dtype=torch.float64)
        if head.bias is None:
            return weight, torch.zeros(weight.shape[0], dtype=torch.float64, device=device)
        return weight, head.bias.detach().to(device=device, dtype=torch.float64)

    def _stat(self, key: str, device: torch.device) -> torch.Tensor:
        """A fitted statistic on ``device`` (moved once and kept there)."""
        value = self._stats[key]
        if value.device != device:
            value = value.to(device)
            self._stats[key] = value
        return value

    # ----------------------------------------------------------------- saving
    def state(self) -> dict[str, torch.Tensor]:
        """The fitted statistics as CPU tensors (not the head or model); see ``restore``."""
        if not self._fitted:
            raise self.error("is not fitted: call fit(features, labels, head) first")
        out = {k: v.detach().cpu().clone() for k, v in self._stats.items()}
        out["feature_dim"] = torch.tensor(self.feature_dim, dtype=torch.long)
        out["num_classes"] = torch.tensor(self.num_classes, dtype=torch.long)
        for key in self.fit_params:
            value = self.params[key]
            out[f"param.{key}"] = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.long)
        return out

    def restore(
        self, state: dict[str, torch.Tensor], head: nn.Module, model: Model | None = None, *, feature_dim: int | None = None
    ) -> Detector:
        """Rebuild the fitted detector from ``state()`` output plus the head (and model); returns self.

        ``feature_dim``: the model's feature size D, when known (the state must have been fitted
        for it). Every saved value is checked (kind, shape in D and K, finite) before it is kept;
        a DetectorError names the key at fault."""
        self._fitted = False
        self._cache = {}
        if not isinstance(state, dict):
            raise self.error(f"restore needs the dict returned by state(), got {type(state).__name__}")
        needed = (*COMMON_STATE, *self.state_keys, *(f"param.{k}" for k in self.fit_params))
        missing = [k for k in needed if k not in state]
        if missing:
            raise self.error(f"the state to restore lacks {', '.join(missing)} (was it saved by another detector?)")
        scalars = {k: _scalar(state[k]) for k in needed if k not in self.state_keys}
        for key, value in scalars.items():
            if value is None:
                raise self.error(f"state {key} must be a finite number (a one-element tensor), got {_describe(state[key])}")
        for key in ("feature_dim", "num_classes"):
            if scalars[key] != int(scalars[key]) or scalars[key] < 1:
                raise self.error(f"state {key}={scalars[key]!r} must be a whole number >= 1")
        for key in self.fit_params:
            saved = scalars[f"param.{key}"]
            if saved != self.params[key]:
                raise self.error(f"the state was fitted with {key}={saved!r} but this detector has {key}={self.params[key]!r}")
        self._attach(head, model)
        self.feature_dim, self.num_classes = int(scalars["feature_dim"]), int(scalars["num_classes"])
        if feature_dim is not None and self.feature_dim != feature_dim:
            raise self.error(f"state feature_dim={self.feature_dim} but the model has D={feature_dim} features")
        if isinstance(head, nn.Linear):
            if (head.in_features, head.out_features) != (self.feature_dim, self.num_classes):
                raise self.error(
                    f"the state was fitted for D={self.feature_dim}, K={self.num_classes} but the head is "
                    f"nn.Linear({head.in_features}, {head.out_features})"
                )
        elif feature_dim is not None:  # any other head: one probe of zeros checks D in and K out
            self._probe_classes(torch.zeros(1, self.feature_dim))
        for key, shape in self.state_keys.items():
            self._check_stat(key, state[key], shape)
        self._stats = {k: state[k].detach().clone() for k in self.state_keys}
        self._fitted = True
        return self

    def _check_stat(self, key: str, value: Any, shape: tuple[str, ...]) -> None:
        """Refuse a saved statistic that is no float tensor of ``shape`` (in D, K, N) or not finite."""
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise self.error(f"state {key} must be a floating-point tensor, got {_describe(value)}")
        sizes = {"D": self.feature_dim, "K": self.num_classes}
        want = "(" + ", ".join(str(sizes.get(d, d)) for d in shape) + ")"
        if value.dim() != len(shape) or any(
            got != sizes[d] if d in sizes else got < 1 for got, d in zip(value.shape, shape, strict=True)
        ):
            raise self.error(f"state {key} has shape {tuple(value.shape)}, expected {want} for D={self.feature_dim}, K={self.num_classes}")
        if not bool(torch.isfinite(value).all()):
            raise self.error(f"state {key} holds {int((~torch.isfinite(value)).sum())} NaN or infinite value(s)")


def energy(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over classes in float64 (the energy score at temperature 1, higher = ID)."""
    return torch.logsumexp(logits.to(torch.float64), dim=1)


def top_count(dim: int, percentile: float) -> int:
    """How many activations ASH/SCALE keep: ``D − round(D·p/100)`` (NumPy rounding), at least 1."""
    return max(1, dim - int(round(dim * percentile / 100.0)))


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of all entries, linear interpolation (as ``numpy.percentile``).

    Written with a sort because ``torch.quantile`` refuses inputs above 2**24 elements.
    """
    flat = values.reshape(-1).sort().values
    pos = (flat.numel() - 1) * q / 100.0
    lo = int(math.floor(pos))
    low, high = flat[lo].to(torch.float64), flat[min(lo + 1, flat.numel() - 1)].to(torch.float64)
    return low + (high - low) * (pos - lo)


def _scalar(x: Any) -> float | None:
    """The finite number in a one-element real tensor (as ``state()`` saves it), else None."""
    if not isinstance(x, torch.Tensor) or x.numel() != 1 or x.is_complex() or x.dtype == torch.bool:
        return None
    value = x.item()
    return value if math.isfinite(value) else None


def _detached(x: Any) -> Any:
    """A tensor, or each tensor of a dict (layer probes), detached."""
    return {k: v.detach() for k, v in x.items()} if isinstance(x, dict) else x.detach()


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
