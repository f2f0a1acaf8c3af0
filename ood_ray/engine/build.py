"""Building a run's parts from its config: the benchmark, the model, the optimizer, the schedule."""

from __future__ import annotations

import torch

from ..config import ConfigError, TrainConfig
from ..data.default import ensure_default
from ..data.manifest import Benchmark, DataError
from ..methods import Method, get_method
from ..models import Classifier, build_backbone
from ..progress import say


def benchmark_path(cfg: TrainConfig) -> str:
    return cfg.data if cfg.data else str(ensure_default(seed=cfg.data_seed))


def load_benchmark(cfg: TrainConfig, verify: bool = False) -> Benchmark:
    """The benchmark of ``cfg``; ``verify`` checks every local shard's sha256 and warns when the
    train shards are class-sorted (``data.mixing``).

    With ``skip_bad_samples`` a damaged shard is reported and training goes on (its bad samples
    are skipped and counted when read); without it the first mismatch is an error.
    """
    bench = Benchmark.load(benchmark_path(cfg), verify=verify and not cfg.skip_bad_samples)
    if verify and cfg.skip_bad_samples:
        for m in bench.all_manifests():
            try:
                m.verify()
            except DataError as e:
                say(f"warning: {e}; skip_bad_samples is on, so its unreadable samples will be skipped and counted")
    if verify:
        from ..data.mixing import class_sorted_shards, sorted_warning

        found = class_sorted_shards(bench.train)
        if found:
            say(f"warning: {sorted_warning(bench.train, found)}")
    method = get_method(cfg.method, cfg.method_params)
    if method.needs_outliers and bench.outlier is None:
        raise ConfigError(f"method {cfg.method!r} needs an outlier set, but {bench.path} has no 'outlier' entry")
    return bench


def build_model(cfg: TrainConfig, method: Method, bench: Benchmark) -> Classifier:
    backbone = build_backbone(cfg.backbone, bench.train.channels, bench.train.image_size)
    return Classifier(backbone, method.make_head(backbone.num_features, bench.num_classes))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    """Per-step schedule over the whole run."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.lr * 1e-3)
    if cfg.schedule == "step":
        milestones = sorted({max(1, int(f * total_steps)) for f in cfg.step_milestones})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
