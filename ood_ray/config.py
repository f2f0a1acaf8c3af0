"""One typed configuration for training, shared by the CLI, the jobs and the Ray workers.

Values are checked when the config is built (``TrainConfig.from_dict`` / ``validate``), before any
Ray work starts, and every error names the offending field and value. Paths are made absolute at
that point, because Ray changes the working directory of its processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RESULTS_ENV = "OOD_RAY_RESULTS"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names the URI."""


_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*):[^/\s@'\"]*@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<head>[?&;][A-Za-z0-9_.-]*(?:password|passwd|pwd|token|secret|signature|sig|credential|key|auth)=)[^&\s'\"#]+"
)


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and the value of every
    secret-looking query parameter (``?password=``, ``&token=``, ``X-Amz-Signature=``...) replaced by
    ``***``. Applied to everything ood_ray records or prints: MLflow params and tags, config.json,
    sweep artifacts, progress lines and error messages."""
    return _SECRET_QUERY.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>:***@", text))


def redacted(obj):
    """``obj`` (dicts, lists, strings, ...) with ``redact`` applied to every string in it."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redacted(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redacted(v) for v in obj)
    return obj


def results_dir() -> Path:
    """Where results go by default: ``$OOD_RAY_RESULTS`` or ``./ood-ray-results`` (made absolute)."""
    return Path(os.environ.get(RESULTS_ENV, "ood-ray-results")).expanduser().resolve()


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a sqlite file in the results directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_dir() / 'mlflow.db'}"


#: Upper bounds of integer fields (seeds: what numpy and scikit-learn accept).
LIMITS = {
    "epochs": 100_000,
    "batch_size": 1 << 20,
    "eval_batch_size": 1 << 20,
    "num_workers": 4096,
    "augment_pad": 1024,
    "loader_workers": 256,
    "shuffle_buffer": 10_000_000,
    "max_failures": 1000,
    "seed": 2**32 - 1,
    "data_seed": 2**32 - 1,
    "input_size": 4096,
}


@dataclass
class TrainConfig:
    # what to train
    method: str = "softmax"
    backbone: str = "small_cnn"
    data: str | None = None  # benchmark.json (or its folder); None = the embedded digits-ood
    data_seed: int = 0  # seed of the embedded benchmark (only when data is None)
    method_params: dict = field(default_factory=dict)  # method hyperparameters (see the method registry)
    init_checkpoint: str | None = None  # fine-tune: start from this checkpoint's weights (e.g. OE from a baseline)
    pretrained: str | None = None  # backbone weights: "imagenet" (torchvision:/timm: backbones) or a weights FILE (docs/finetune.md)
    input_size: int | None = None  # the network's input size (pixels); None = the backbone's own (224 for torchvision/timm) or the stored size
    # fine-tuning
    freeze_backbone: bool = False  # train the head only (a linear probe); the backbone also keeps its BatchNorm statistics
    backbone_lr_scale: float = 1.0  # the backbone's learning rate is lr x this (0 = frozen weights, BatchNorm statistics still adapt)
    warmup_epochs: float = 0.0  # linear learning-rate warm-up from lr/100 over this many epochs, then the schedule
    head_pooling: str = "avg"  # avg | avgmax (global max and average pooling concatenated, the OE article's MobileNetV2 head)
    head_dropout: float = 0.0  # dropout on the features before the head while training (the OE article: 0.5)
    # optimisation
    epochs: int = 15
    batch_size: int = 32  # global batch: split evenly over the workers
    optimizer: str = "sgd"  # sgd | adam | adamw (momentum and nesterov apply to sgd only)
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step (per step) | none
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    step_gamma: float = 0.1
    # data pipeline
    augment_pad: int = 1  # random-crop padding in pixels (0 = off)
    hflip: bool = False  # digits must not be flipped; turn on for natural images
    shuffle_buffer: int = 1000
    decoded_cache_mb: float = 64.0  # per process: a set whose decoded images fit is decoded once and served from memory (0 = always stream)
    loader_workers: int = 0  # DataLoader processes per worker
    eval_batch_size: int = 256
    skip_bad_samples: bool = False  # skip (and count) undecodable samples and unreadable shard tails instead of failing
    # speed (GPU): bf16 autocast and channels-last memory format
    precision: str = "fp32"  # fp32 | bf16 (autocast; on CPU too, where it is rarely faster)
    channels_last: bool = False
    # evaluation and post-hoc choices (the tuner turns these on)
    evaluate_test: bool = True  # evaluate the test split after the last epoch (tuning trials: off)
    posthoc_search: bool = False  # try the method's post-hoc grid (ε, calibration) on val after training
    delta_tpr: float | None = None  # set δ on val so that this fraction of val ID is accepted (e.g. 0.95)
    detectors: list[str] = field(default_factory=list)  # post-hoc detectors to choose from on val after training ("all" = every one that fits the head); [] = the method's own scores
    detector_fit_samples: int = 50_000  # train samples the detectors are fitted on (at most this many, evenly spread over the train split)
    objective: str = "auroc"  # the validation objective reported as `objective` (see ood_ray.objective)
    min_val_acc: float = 0.0  # accuracy guard of the objective (0 = no guard)
    # Ray Train
    num_workers: int = 2
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    seed: int = 0
    # results
    storage_path: str | None = None  # Ray checkpoints; default <results>/ray
    mlflow_uri: str | None = None  # default $MLFLOW_TRACKING_URI or sqlite:///<results>/mlflow.db
    experiment: str = "ood-ray"
    run_name: str | None = None

    def validate(self) -> TrainConfig:
        from .methods import METHODS
        from .models import check_backbone_name

        def bad(name, why):
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        import math
        import numbers
        import types
        import typing

        def is_kind(value, hint) -> bool:
            if typing.get_origin(hint) in (types.UnionType, typing.Union):
                return any(is_kind(value, a) for a in typing.get_args(hint))
            if hint is type(None):
                return value is None
            if hint is bool:
                return isinstance(value, bool)
            if hint is int:
                return isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if hint is float:
                return isinstance(value, numbers.Real) and not isinstance(value, bool)
            if hint is str:
                return isinstance(value, str)
            if typing.get_origin(hint) is list:
                return isinstance(value, list | tuple) and all(is_kind(v, typing.get_args(hint)[0]) for v in value)
            if hint is dict or typing.get_origin(hint) is dict:
                return isinstance(value, dict)
            return True

        def describe(hint) -> str:
            if typing.get_origin(hint) in (types.UnionType, typing.Union):
                return " or ".join(describe(a) for a in typing.get_args(hint))
            if typing.get_origin(hint) is list:
                return f"a list of {describe(typing.get_args(hint)[0])[2:]}s"
            words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
            return words.get(hint, getattr(hint, "__name__", str(hint)))

        # types first (from YAML/JSON anything can arrive), then finite numbers, then the ranges
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not is_kind(value, hints[f.name]):
                bad(f.name, f"must be {describe(hints[f.name])}")
            if isinstance(value, numbers.Integral) and not isinstance(value, int | bool):
                setattr(self, f.name, int(value))  # numpy integers
            elif isinstance(value, tuple):
                setattr(self, f.name, list(value))
            elif isinstance(value, str) and "\x00" in value:
                bad(f.name, "must not contain NUL characters")
            nums = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in nums):
                bad(f.name, "must be finite")
        if self.method not in METHODS:
            bad("method", f"unknown method; choose one of: {', '.join(sorted(METHODS))}")
        try:
            check_backbone_name(self.backbone)
        except ValueError as e:
            bad("backbone", str(e))
        for name in ("epochs", "batch_size", "num_workers", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        if self.batch_size % self.num_workers:
            bad("batch_size", f"must be divisible by num_workers={self.num_workers} (it is the global batch)")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            bad("optimizer", "choose sgd, adam or adamw")
        if self.head_pooling not in ("avg", "avgmax"):
            bad("head_pooling", "choose avg or avgmax")
        if not 0.0 <= self.head_dropout < 1.0:
            bad("head_dropout", "must lie in [0, 1)")
        if self.backbone_lr_scale < 0:
            bad("backbone_lr_scale", "must be >= 0 (0 leaves the backbone's weights as they start)")
        if not 0.0 <= self.warmup_epochs < self.epochs:
            bad("warmup_epochs", f"must lie in [0, epochs={self.epochs})")
        if self.input_size is not None and self.input_size < 8:
            bad("input_size", "must be >= 8 pixels (or null for the backbone's own)")
        if self.precision not in ("fp32", "bf16"):
            bad("precision", "choose fp32 or bf16")
        if self.schedule not in ("cosine", "step", "none"):
            bad("schedule", "choose cosine, step or none")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not all(0 < m < 1 for m in self.step_milestones):
            bad("step_milestones", "fractions of training strictly between 0 and 1")
        for name in ("augment_pad", "loader_workers", "max_failures", "shuffle_buffer", "seed", "data_seed"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        # sane upper bounds, checked here rather than failing (or stalling) inside the workers
        for name, most in LIMITS.items():
            if getattr(self, name) is not None and getattr(self, name) > most:
                bad(name, f"must be <= {most}")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "must lie in [0, 1)")
        if not self.step_gamma > 0:
            bad("step_gamma", "must be > 0")
        if not self.experiment.strip():
            bad("experiment", "must be a non-empty name")
        from .objective import OBJECTIVES

        if self.objective not in OBJECTIVES:
            bad("objective", f"unknown objective; choose one of: {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.min_val_acc <= 1.0:
            bad("min_val_acc", "must lie in [0, 1]")
        if self.delta_tpr is not None and not 0.0 < self.delta_tpr < 1.0:
            bad("delta_tpr", "a fraction of val ID to accept, strictly between 0 and 1 (e.g. 0.95)")
        if not 0 <= self.decoded_cache_mb <= 1 << 20:
            bad("decoded_cache_mb", "must lie in [0, 1048576] (MiB; 0 streams every set from its shards)")
        if not self.cpus_per_worker > 0:
            bad("cpus_per_worker", "must be > 0 (fractions such as 0.5 are fine)")
        method = METHODS[self.method]
        try:
            method.check_params(self.method_params)
        except ValueError as e:
            raise ConfigError(f"method_params={self.method_params!r}: {e}") from None
        if method.needs_outliers and method(self.method_params).outlier_batch(self.per_worker_batch) < 1:
            given = ", ".join(f"{k}={v!r}" for k, v in self.method_params.items()) or "the defaults"
            bad("method_params", f"{given} with a per-worker batch of {self.per_worker_batch} gives no outlier images per step")
        check_detectors(self.method, self.method_params, self.detectors)  # "all" stays: expanded per method when used
        self.detectors = list(dict.fromkeys(self.detectors))
        if self.detector_fit_samples < 1:
            bad("detector_fit_samples", "must be an integer >= 1")

        def absolute(name):
            try:
                return str(Path(getattr(self, name)).expanduser().resolve())
            except (OSError, RuntimeError, ValueError) as e:
                bad(name, f"not a usable path ({type(e).__name__}: {e})")

        if self.data is not None:
            self.data = absolute("data")
        if self.init_checkpoint is not None:
            self.init_checkpoint = absolute("init_checkpoint")
            from .checkpoint import STATE_FILE, is_checkpoint

            if not is_checkpoint(self.init_checkpoint):
                bad("init_checkpoint", f"not a checkpoint folder (no {STATE_FILE} in it)")
        if self.pretrained is not None:
            if self.pretrained.strip() == "":
                bad("pretrained", "must be 'imagenet' or a weights file")
            if self.pretrained.startswith("imagenet:") and not self.backbone.startswith("torchvision:"):
                bad("pretrained", "imagenet:<weights> names torchvision weights; use it with a torchvision:<name> backbone")
            if self.pretrained != "imagenet" and not self.pretrained.startswith("imagenet:"):
                self.pretrained = absolute("pretrained")
                p = Path(self.pretrained)
                if not (p.is_file() or (p / "state.pt").is_file()):
                    bad("pretrained", "no such weights file (or checkpoint folder with a state.pt)")
            elif not self.backbone.startswith(("torchvision:", "timm:")):
                bad("pretrained", f"backbone {self.backbone!r} has no published ImageNet weights; use torchvision:<name> or timm:<name>, or a weights file")
        if not self.storage_path:
            self.storage_path = str(results_dir() / "ray")
        elif "://" not in self.storage_path:  # s3://, gs://... pass through untouched
            self.storage_path = absolute("storage_path")
        try:
            self.mlflow_uri = normalize_tracking_uri(self.mlflow_uri or default_tracking_uri())
        except ConfigError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            bad("mlflow_uri", f"not a usable tracking URI ({type(e).__name__}: {e})")
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(names)}")
        return cls(**d).validate()

    @classmethod
    def from_file(cls, path: str | Path, defaults: dict | None = None, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a YAML or JSON config was expected)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML/JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        d = {**(defaults or {}), **d, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(d, where=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(redacted(self.to_dict()), indent=2, sort_keys=True) + "\n")
        return path


def check_detectors(method: str, params: dict, names: list[str]) -> list[str]:
    """The detector names of a config, checked against the registry and the method's head.

    ``["all"]`` expands to every detector the method's head supports (DisMax's prototype head
    has no linear layer, so the detectors that need one are left out); a detector named
    explicitly that needs a linear head the method lacks is an error naming both."""
    from .detectors import DETECTORS
    from .methods import METHODS

    names = list(names)
    if not names:
        return []
    unknown = [n for n in names if n not in DETECTORS and n != "all"]
    if unknown:
        raise ConfigError(f"detectors={names!r}: unknown detector(s) {', '.join(map(repr, unknown))}; choose from: all, {', '.join(DETECTORS)}")
    from torch import nn

    m = METHODS[method](params)
    linear = isinstance(m.class_head(m.make_head(2, 2)), nn.Linear)
    if "all" in names:
        return [n for n, cls in DETECTORS.items() if linear or not cls.needs_linear_head]
    refused = [n for n in names if DETECTORS[n].needs_linear_head and not linear]
    if refused:
        usable = ", ".join(n for n, cls in DETECTORS.items() if not cls.needs_linear_head)
        raise ConfigError(f"detectors={names!r}: {', '.join(refused)} need(s) a linear classification head and method {method!r} has none; usable: {usable}")
    return list(dict.fromkeys(names))


def normalize_tracking_uri(uri: str) -> str:
    """Make sqlite URIs absolute (Ray changes the working directory) and refuse file stores."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        return f"sqlite:///{Path(rel).expanduser().resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"mlflow_uri={uri!r}: MLflow 3.17 no longer writes file stores; use sqlite:////abs/path/mlflow.db "
            "or an http(s):// tracking server"
        )
    return uri
