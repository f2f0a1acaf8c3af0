"""Building a run's parts from its config: the benchmark, the model, the optimizer, the schedule."""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, TrainConfig
from ..data.default import ensure_default
from ..data.manifest import Benchmark, DataError
from ..methods import Method, get_method
from ..models import Classifier, build_backbone, model_preprocess
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
    """The backbone (with its pretrained weights when ``cfg.pretrained``), the method's head for
    the benchmark's classes, and the backbone's preprocessing (that of the weights named)."""
    from ..pretrained import imagenet_tag

    try:
        prep = model_preprocess(cfg.backbone, bench.train.channels, bench.train.image_size, cfg.input_size, imagenet_tag(cfg.pretrained) or "DEFAULT")
        backbone = build_backbone(cfg.backbone, prep.channels, prep.input_size(bench.train.image_size), pooling=cfg.head_pooling)
    except ValueError as e:
        raise ConfigError(f"backbone={cfg.backbone!r}: {e}") from None
    model = Classifier(backbone, method.make_head(backbone.num_features, bench.num_classes), preprocess=prep, dropout=cfg.head_dropout)
    if cfg.pretrained:
        from ..pretrained import load_backbone, resolve

        wf = resolve(cfg.backbone, cfg.pretrained, say=say)
        try:
            load_backbone(backbone, wf)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model.weights_record = wf.record()
    if cfg.freeze_backbone:
        backbone.requires_grad_(False)
    return model


def keep_frozen_eval(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """With ``freeze_backbone`` the backbone stays in eval mode (BatchNorm statistics and dropout
    as they were) while the head trains; call after ``model.train()``."""
    if cfg.freeze_backbone:
        getattr(model, "module", model).backbone.eval()


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters: the backbone's at ``lr x backbone_lr_scale``
    (left out when frozen), the rest (head, method parameters) at ``lr``."""
    net = getattr(model, "module", model)
    backbone_ids = {id(p) for p in net.backbone.parameters()}
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in backbone_ids]
    groups = [{"params": rest, "lr": cfg.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale, "name": "backbone"})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, total_steps: int):
    """Step -> the factor of every group's base learning rate: a linear warm-up from 1/100 over
    ``warmup_epochs``, then cosine to 1/1000, steps at ``step_milestones`` or constant."""
    warm = round(total_steps * cfg.warmup_epochs / cfg.epochs)
    rest = max(1, total_steps - warm)
    milestones = sorted({max(1, int(f * rest)) for f in cfg.step_milestones})

    def factor(step: int) -> float:
        if step < warm:
            return 0.01 + 0.99 * step / warm
        t = step - warm
        if cfg.schedule == "cosine":
            return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(t, rest) / rest))
        if cfg.schedule == "step":
            return cfg.step_gamma ** sum(t >= m for m in milestones)
        return 1.0

    return factor


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    """Per-step schedule over the whole run (``lr_factor``), the same for every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))
