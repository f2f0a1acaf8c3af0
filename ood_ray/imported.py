"""Models trained elsewhere, ready for ``ood-ray evaluate --model``.

``--model`` is one of:

* ``torchvision:<name>`` or ``timm:<name>`` with ``--pretrained imagenet|FILE``: the library's
  classifier with those weights (its own last linear layer is the head) and its preprocessing;
* ``module:function`` (``package.module:function`` importable from the working directory): a
  function of no arguments returning either

  - an ``nn.Module`` classifier whose last ``nn.Linear`` (in ``named_modules`` order) gives the
    logits: what feeds that layer is taken as the penultimate features, as for torchvision; or
  - a tuple ``(backbone, head)``: ``backbone(x)`` gives ``N x F`` features, ``head`` is the
    ``nn.Linear`` that maps them to logits;

  optionally as the first element of a tuple whose last element is a dict of preprocessing
  (``Preprocess`` fields: ``size``, ``resize``, ``mean``, ``std``, ``interpolation``); without it the
  model gets ``x / 127.5 - 1`` at the benchmark's size. ``--pretrained FILE`` is loaded into the
  returned classifier (or, for a tuple, into the backbone).

The model is scored with the softmax method's scores (MSP) and every post-hoc detector its linear
head allows, as ``evaluate --checkpoint``. Its number of classes must be the benchmark's.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import MODE_CHANNELS
from .config import ConfigError
from .data.manifest import Benchmark
from .models import Classifier, ExternalBackbone, Preprocess, is_external, model_preprocess
from .progress import say


def load_factory(spec: str):
    """The callable ``module:function`` names (the working directory is importable)."""
    module, _, func = spec.partition(":")
    if not module or not func or not all(p.isidentifier() for p in module.split(".")) or not func.isidentifier():
        raise ConfigError(f"--model {spec!r}: expected torchvision:<name>, timm:<name> or module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--model {spec!r}: cannot import {module!r} ({e})") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ConfigError(f"--model {spec!r}: {module} has no function {func!r}")
    return fn


def _probe(backbone: nn.Module, channels: int, hw, spec: str) -> int:
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, channels, *hw))
    except Exception as e:  # noqa: BLE001 - the user's model says what it needs
        raise ConfigError(f"--model {spec!r}: its backbone cannot take {channels}x{hw[0]}x{hw[1]} inputs ({type(e).__name__}: {e})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"--model {spec!r}: its backbone returns {getattr(out, 'shape', type(out).__name__)}, expected N x features")
    return int(out.shape[1])


class _Features(nn.Module):
    """A user's backbone module with the ``num_features`` the classifier needs."""

    def __init__(self, net: nn.Module, num_features: int):
        super().__init__()
        self.net, self.num_features = net, num_features

    def forward(self, x):
        return self.net(x)


def build_imported(spec: str, pretrained: str | None, bench: Benchmark, input_size: int | None = None) -> tuple[Classifier, dict]:
    """The model ``spec`` names with its weights, and a ``model.json`` dict describing it for the
    benchmark ``bench`` (softmax scores; class names the benchmark's, whose count must match)."""
    from .pretrained import WeightsFile, imagenet_tag, load_full, resolve

    stored, mode = tuple(bench.train.image_size), bench.train.mode
    wf: WeightsFile | None = None
    if is_external(spec):
        if not pretrained:
            raise ConfigError(f"--model {spec}: pass --pretrained imagenet or --pretrained FILE (a model trained elsewhere is scored with its weights)")
        from .models.external import classifier_key, full_model
        from .pretrained import read_state_dict

        prep = model_preprocess(spec, MODE_CHANNELS[mode], stored, input_size, imagenet_tag(pretrained) or "DEFAULT")
        wf = resolve(spec, pretrained, say=say)
        read = read_state_dict(wf.path)
        w = read[0].get(classifier_key(spec))  # the file's own number of classes
        n = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None
        net = full_model(spec, input_size=prep.size[0] if prep.size else None, num_classes=n)
        try:
            load_full(net, wf, spec, read)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        backbone = ExternalBackbone(spec, 3, prep.input_size(stored), net=net)
        head = backbone.removed_head
    else:
        made = load_factory(spec)()
        extra = made[-1] if isinstance(made, tuple) and isinstance(made[-1], dict) else None
        if extra is not None:
            made = made[:-1] if len(made) > 2 else made[0]
            if input_size:  # the flag wins over the factory's size
                extra = {**extra, "size": [input_size, input_size]}
        pair = isinstance(made, tuple) and len(made) == 2 and all(isinstance(m, nn.Module) for m in made)
        if not (isinstance(made, nn.Module) or pair):
            raise ConfigError(f"--model {spec!r}: the function returned {type(made).__name__}; expected an nn.Module, or (backbone, head) modules, optionally followed by a dict of preprocessing")
        channels = MODE_CHANNELS[mode]
        try:
            c = len(extra.get("mean", [0] * channels)) if extra else channels
            prep = Preprocess.from_dict({"channels": c, "mean": [0.5] * c, "std": [0.5] * c, "source": "given", **extra}, f"--model {spec}: preprocessing") if extra else Preprocess.scaled(channels, (input_size, input_size) if input_size else None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if pretrained:
            wf = resolve(spec, pretrained, say=say)
            target = made if isinstance(made, nn.Module) else made[0]
            try:
                load_full(target, wf, spec)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if isinstance(made, nn.Module):
            from .models.external import ModelSpecError, split_classifier

            try:
                net, head, _ = split_classifier(made, spec)
            except ModelSpecError as e:
                raise ConfigError(f"--model {spec!r}: {e}") from None
            backbone = _Features(net, _probe(net, prep.channels, prep.input_size(stored), spec))
        else:
            net, head = made
            backbone = _Features(net, _probe(net, prep.channels, prep.input_size(stored), spec))
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"--model {spec!r}: its head is {type(head).__name__}, expected nn.Linear")
    if head.in_features != backbone.num_features:
        raise ConfigError(f"--model {spec!r}: the head takes {head.in_features} features, the backbone gives {backbone.num_features}")
    if head.out_features != bench.num_classes:
        named = f" ({len(wf.categories)} named by {wf.weights})" if wf and wf.categories else ""
        raise ConfigError(f"--model {spec!r} has {head.out_features} classes{named}, {bench.path} has {bench.num_classes}: scoring it there would misread its outputs")
    if wf and wf.categories and set(wf.categories) == set(bench.class_names) and list(wf.categories) != list(bench.class_names):
        raise ConfigError(f"--model {spec!r}: the benchmark names the same classes as {wf.weights} in another order; its labels would be misread")
    for name, p in head.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ConfigError(f"--model {spec!r}: head tensor {name} holds NaN or infinite values")
    model = Classifier(backbone, head, preprocess=prep).eval()
    model.weights_record = wf.record() if wf else None
    meta = {
        "method": "softmax",
        "method_params": {},
        "backbone": spec,
        "class_names": list(bench.class_names),
        "image_size": list(stored),
        "mode": mode,
        "default_score": "msp",
        "threshold_score": "msp",
        "delta": None,
        "preprocess": prep.to_dict(),
        "normalization": prep.describe(),
        "imported": True,
    }
    if wf:
        meta["pretrained"] = wf.record()
    say(f"{spec}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {backbone.num_features} features, {head.out_features} classes; input {prep.describe()}")
    return model, meta

