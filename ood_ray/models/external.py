"""Backbones from torchvision and timm classifiers: ``torchvision:<name>`` and ``timm:<name>``.

The classifier's last linear layer is removed (replaced by ``nn.Identity``); what fed it, the
penultimate features, is the backbone's output, and its size is found by one forward pass.
``split_classifier`` keeps that linear layer, so a model trained elsewhere can be scored with its
own head (``ood-ray evaluate --model``).

``pooling="avgmax"`` concatenates the global max and the global average of the last feature map
(the Outlier Exposure article's MobileNetV2 head). It needs a convolutional trunk: models with a
``features`` module (MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet...) or ResNet / RegNet
(their children before ``avgpool``); timm models get it from timm (``global_pool="catavgmax"``).

Plain torch (torchvision / timm build the networks); no I/O: weights files are read by
``ood_ray.pretrained``.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import AvgMaxPool

POOLINGS = ("avg", "avgmax")
PREFIXES = ("torchvision:", "timm:")


class ModelSpecError(ValueError):
    """A backbone name or option that cannot be built; the message names it."""


def is_external(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> None:
    """Refuse a ``torchvision:`` / ``timm:`` name that its library does not build, naming close ones."""
    kind, _, model = name.partition(":")
    if not model:
        raise ModelSpecError(f"backbone {name!r}: expected {kind}:<model name>")
    if kind == "torchvision":
        known = _torchvision_names()
        found = model in known
    else:
        timm = import_timm(name)
        known = timm.list_models()
        found = timm.is_model(model)  # also "<arch>.<pretrained tag>", e.g. resnet18.tv_in1k
    if not found:
        import difflib

        near = difflib.get_close_matches(model, known, n=5, cutoff=0.6)
        hint = f"; close: {', '.join(near)}" if near else ""
        where = "torchvision.models.list_models(module=torchvision.models)" if kind == "torchvision" else "timm.list_models()"
        raise ModelSpecError(f"backbone {name!r}: {kind} has no classification model {model!r} (see {where}){hint}")


def import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise ModelSpecError(f"backbone {name!r} needs timm, which is not installed: pip install -e \".[timm]\" (or pip install timm)") from None
    return timm


def full_model(name: str, input_size: int | None = None, pooling: str = "avg", num_classes: int | None = None) -> nn.Module:
    """The whole classifier ``name`` names, randomly initialised (weights are loaded afterwards),
    with ``num_classes`` outputs (default: the library's, 1000 for ImageNet models)."""
    check_name(name)
    kind, _, model = name.partition(":")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if kind == "torchvision":
        import torchvision

        if model.startswith("vit_") and input_size:
            kwargs["image_size"] = input_size
        return torchvision.models.get_model(model, weights=None, **kwargs)
    timm = import_timm(name)
    if input_size and _timm_takes_img_size(timm, model):
        kwargs["img_size"] = input_size
    return timm.create_model(model, pretrained=False, global_pool="catavgmax" if pooling == "avgmax" else "avg", **kwargs)


def classifier_key(name: str) -> str:
    """The state_dict key of the classifier weight of ``name`` (``fc.weight``, ``classifier.1.weight``...)."""
    with torch.device("meta"):
        net = full_model(name)
    if name.startswith("timm:"):
        head = net.get_classifier()
        return next(k for k, m in net.named_modules() if m is head) + ".weight"
    return last_linear(net)[0] + ".weight"


def _timm_takes_img_size(timm, model: str) -> bool:
    """Vision transformers fix their input size; timm builds them at another one when asked."""
    return any(model.startswith(p) for p in ("vit_", "deit", "beit", "eva", "swin", "cait", "xcit"))


def last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    """The dotted name and module of the classifier's last ``nn.Linear``."""
    found = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ModelSpecError(f"{type(net).__name__} has no nn.Linear classifier layer to remove")
    return found[-1]


def _replace(net: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, new)


def split_classifier(net: nn.Module, name: str, pooling: str = "avg") -> tuple[nn.Module, nn.Linear, list[str]]:
    """``net`` without its classifier (the last linear layer becomes ``nn.Identity``), that layer,
    and the state_dict key prefixes that left with it."""
    if name.startswith("timm:"):
        head = net.get_classifier()
        before = set(net.state_dict())
        if not isinstance(head, nn.Linear):
            raise ModelSpecError(f"backbone {name!r}: its classifier is {type(head).__name__}, not nn.Linear")
        head = _copy_linear(head)
        net.reset_classifier(0, "catavgmax" if pooling == "avgmax" else "avg")
        gone = sorted({k.rsplit(".", 1)[0] + "." for k in before - set(net.state_dict())})
        return net, head, gone
    dotted, layer = last_linear(net)
    head = _copy_linear(layer)
    _replace(net, dotted, nn.Identity())
    return net, head, [dotted + "."]


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    new.load_state_dict(layer.state_dict())
    return new


def _trunk_children(net: nn.Module, name: str) -> list[str]:
    """Children of ``net`` that compute its last feature map, in order (for ``avgmax``)."""
    import torchvision

    if isinstance(getattr(net, "features", None), nn.Module):
        return ["features"]
    if isinstance(net, torchvision.models.ResNet | torchvision.models.RegNet):
        names = [n for n, _ in net.named_children()]
        return names[: names.index("avgpool")]
    raise ModelSpecError(
        f"backbone {name!r}: head_pooling 'avgmax' needs a convolutional trunk (a 'features' module, or a ResNet / RegNet); "
        f"use head_pooling 'avg' for {type(net).__name__}"
    )


class ExternalBackbone(nn.Module):
    """A torchvision / timm classifier without its last linear layer: images -> ``N x F`` features.

    ``net`` is the library's model (its state_dict keys are the library's, under ``net.``);
    ``dropped`` the key prefixes of the layers removed from it (the classifier and, with
    ``avgmax`` on torchvision, the layers after the trunk), which a weights file may hold."""

    def __init__(self, name: str, in_channels: int = 3, image_size=(224, 224), *, pooling: str = "avg", net: nn.Module | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelSpecError(f"head_pooling={pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if in_channels != 3:
            raise ModelSpecError(f"backbone {name!r} takes RGB images (3 channels), got in_channels={in_channels}; grayscale images are repeated to RGB by its preprocessing")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.name, self.pooling = name, pooling
        if net is None:
            net = full_model(name, input_size=h if h == w else None, pooling=pooling)
        net, head, self.dropped = split_classifier(net, name, pooling)
        self._removed = [head]  # in a list: not a sub-module, not in the state_dict
        self.net = net
        self.trunk: list[str] = []
        if pooling == "avgmax" and name.startswith("torchvision:"):
            self.trunk = _trunk_children(net, name)
            for child, _ in list(net.named_children()):
                if child not in self.trunk and any(p.numel() for p in net.get_submodule(child).parameters()):
                    self.dropped.append(child + ".")
                    setattr(net, child, nn.Identity())
            self.pool = AvgMaxPool()
        self.num_features = self._probe(h, w)

    @property
    def removed_head(self) -> nn.Linear:
        """The classifier's last linear layer, as it was when the backbone was made from ``net``."""
        return self._removed[0]

    def _probe(self, h: int, w: int) -> int:
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, 3, h, w))
        except Exception as e:  # noqa: BLE001 - the library's own message says what it needs (e.g. ViT's fixed size)
            raise ModelSpecError(f"backbone {self.name!r} cannot take {h}x{w} images ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); try another --input-size") from None
        finally:
            self.train(was)
        if out.dim() != 2:
            raise ModelSpecError(f"backbone {self.name!r}: its penultimate output has shape {list(out.shape)}, expected N x features")
        return int(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trunk:
            for child in self.trunk:
                x = getattr(self.net, child)(x)
            return torch.flatten(self.pool(x), 1)
        out = self.net(x)
        if isinstance(out, tuple):  # GoogLeNet / Inception in training mode: (logits, aux...)
            out = out[0]
        if hasattr(out, "logits"):  # torchvision's InceptionOutputs / GoogLeNetOutputs
            out = out.logits
        return torch.flatten(out, 1) if out.dim() > 2 else out
