"""Inner layers of a classifier for detectors that read them (``Detector.needs_layers``).

Which layers (``choose_layers``), for a ``Classifier`` (``.backbone`` -> features, ``.head``):

* the last one is always ``"backbone"``: the backbone's output, the penultimate features;
* the intermediate candidates are, in forward order, the backbone's *stages*: modules whose name
  ends in ``layer<k>`` or ``block<k>`` (the project's ResNet-18 and WRN, torchvision and timm
  ResNets, ResNeXts, RegNets...); without any, the children of its ``features`` ``nn.Sequential``
  (MobileNet, EfficientNet, DenseNet blocks) or, when those are plain conv / norm / activation
  modules (the project's small_cnn, VGG), the activation modules among them;
* the deepest candidate is dropped: pooled, its output is the penultimate layer itself (ResNet's
  layer4, small_cnn's last ReLU, MobileNetV2's last conv);
* ``count`` layers in all: the penultimate plus ``count - 1`` candidates spread evenly over the
  candidates, the deepest one included (all of them when there are fewer). For ResNet-18 and
  ``count = 4``: layer1, layer2, layer3 and the penultimate features, OpenOOD's choice for NAC
  (layer4's pooled output is its ``avgpool``); for small_cnn: its first two ReLUs and the features.

What a probe is (``layer_probes``): for each chosen layer with output a (N×C, N×C×H×W, or N×T×C
tokens) and g = ∂KL(u ‖ softmax(f(x)))/∂a (u uniform over the K classes, f the logits; for each
sample the gradient of its own divergence), the per-neuron product ``mean(a) · sum(g)`` over the
spatial positions (or tokens): N×C, float64. For a 2-D layer it is a ⊙ g. It does not change
when a global average pool is moved in or out of the layer (the mean of a is the pooled value and
the sum of g its gradient), which is why the deepest stage repeats the penultimate layer. A module
called more than once in a forward pass contributes its last output.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

PENULTIMATE = "backbone"
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
PRIMITIVES = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.Linear, *ACTIVATIONS)
_STAGE = re.compile(r"(?:layer|block)\d+")


def candidate_layers(model: nn.Module) -> list[str]:
    """The intermediate layers of ``model.backbone`` the rule above may hook, shallow first."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"needs a classifier with a .backbone module, got {type(model).__name__}")
    stages = [n for n, _ in backbone.named_modules() if n and _STAGE.fullmatch(n.rsplit(".", 1)[-1])]
    if not stages:
        trunk = next(((n, m) for n, m in backbone.named_modules() if n.rsplit(".", 1)[-1] == "features" and isinstance(m, nn.Sequential)), None)
        if trunk is not None:
            children = list(trunk[1].named_children())
            if all(isinstance(m, PRIMITIVES) for _, m in children):
                children = [(n, m) for n, m in children if isinstance(m, ACTIVATIONS)]
            stages = [f"{trunk[0]}.{n}" for n, _ in children]
    return [f"{PENULTIMATE}.{n}" for n in stages[:-1]]


def choose_layers(model: nn.Module, count: int) -> list[str]:
    """``count`` layer names of ``model`` (at most; the penultimate last) by the rule above."""
    candidates = candidate_layers(model)
    k = min(count - 1, len(candidates))
    if k <= 0:
        return [PENULTIMATE]
    if k == len(candidates):
        return [*candidates, PENULTIMATE]
    picks = sorted({int(round(v)) for v in np.linspace(len(candidates) - 1, 0, k)})
    return [*(candidates[i] for i in picks), PENULTIMATE]


def layer_probes(model: nn.Module, x: torch.Tensor, names: list[str], logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{layer: N×C float64}`` probes of images ``x`` (see the module docstring).

    ``logits``: images -> class logits N×K through ``model`` (default ``model(x)``). Runs one
    forward and one backward pass with autograd enabled (also inside ``no_grad`` or
    ``inference_mode``); only the hooked activations get gradients, the parameters' ``.grad``
    are left alone. The model's mode (eval) is the caller's."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the model has no layer {', '.join(missing)}")
    captured: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def hook(_module, _inputs, out):
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"layer {name} returns {type(out).__name__}, not a tensor")
            captured[name] = out

        return hook

    handles = [modules[n].register_forward_hook(keeper(n)) for n in names]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            out = (logits or model)(x_in)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
                raise ValueError(f"the model must return logits N×K, got {type(out).__name__} for images {tuple(x.shape)}")
            # KL(u ‖ softmax(f)) = −log K − mean_k log softmax(f)_k, summed over the batch
            kl = -torch.log_softmax(out, dim=1).mean(dim=1).sum()
            acts = [captured[n] for n in names]
            grads = torch.autograd.grad(kl, acts, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    probes = {}
    for name, a, g in zip(names, acts, grads, strict=True):
        if g is None:
            raise ValueError(f"layer {name} does not lead to the logits (no gradient)")
        probes[name] = pooled_product(a.detach(), g.detach())
    return probes


def pooled_product(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``mean(a) · sum(g)`` per neuron in float64: N×C for N×C, N×C×H×W and N×T×C (tokens)."""
    a, g = a.to(torch.float64), g.to(torch.float64)
    if a.dim() == 2:
        return a * g
    if a.dim() == 4:
        return a.mean(dim=(2, 3)) * g.sum(dim=(2, 3))
    if a.dim() == 3:
        return a.mean(dim=1) * g.sum(dim=1)
    return a.flatten(1) * g.flatten(1)
