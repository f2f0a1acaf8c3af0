"""Pretrained weights: ``--pretrained imagenet`` or ``--pretrained FILE``, found, checked, loaded.

* ``imagenet`` with ``torchvision:<name>``: the default ``Weights`` of that model
  (``torchvision.models.get_model_weights(name).DEFAULT``; ``imagenet:IMAGENET1K_V1`` names
  another entry of that enum), read from torch's cache
  (``$TORCH_HOME/hub/checkpoints/<file>``, the file name torchvision publishes, which carries the
  first hex digits of its sha256) or downloaded there when the network allows. A cached file whose
  sha256 does not start with those digits is refused.
* ``imagenet`` with ``timm:<name>``: the model's default pretrained tag from the Hugging Face hub
  (``model.safetensors`` in ``$HF_HOME``), cached or downloaded by ``huggingface_hub``.
* ``FILE``: a state_dict in torchvision's or timm's layout (``.pth`` / ``.pt`` / ``.bin`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``), optionally wrapped as
  ``{"state_dict": ...}`` or saved from ``DataParallel`` (``module.`` keys); or an ood_ray
  checkpoint (its folder or its ``state.pt``), whose backbone is taken.

Every key of the backbone must be in the file with its shape and finite values; keys of the layers
the backbone removed (the classifier) may be there too; anything else is an error naming the file
and the tensor. The file's sha256 is recorded with the run (``WeightsFile.record``).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import ConfigError
from .models.external import ExternalBackbone

HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torchvision's file names: resnet18-f37072fd.pth


@dataclass
class WeightsFile:
    path: Path
    sha256: str
    source: str  # "imagenet" or "file"
    weights: str | None = None  # e.g. ResNet18_Weights.IMAGENET1K_V1, timm/resnet18.a1_in1k
    categories: list[str] = field(default_factory=list)  # the weights' class names, when they name them

    def record(self) -> dict:
        """What ``model.json`` and the MLflow run keep of the weights a model started from."""
        return {"source": self.source, "weights": self.weights, "path": str(self.path), "sha256": self.sha256}


def imagenet_tag(pretrained: str | None) -> str | None:
    """The torchvision weights entry ``pretrained`` names: ``DEFAULT`` for ``imagenet``, ``X`` for
    ``imagenet:X``; None when it names a file (or nothing)."""
    if pretrained == "imagenet":
        return "DEFAULT"
    if pretrained and pretrained.startswith("imagenet:"):
        return pretrained.partition(":")[2]
    return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(backbone: str, pretrained: str, *, say=print) -> WeightsFile:
    """The weights file ``pretrained`` names for ``backbone`` (downloading ImageNet weights into the
    cache when they are not there and the network allows); errors name the file looked for."""
    tag = imagenet_tag(pretrained)
    if tag is not None:
        if backbone.startswith("torchvision:"):
            return _torchvision_imagenet(backbone, say, tag or "DEFAULT")
        if backbone.startswith("timm:"):
            return _timm_imagenet(backbone)
        raise ConfigError(f"pretrained='imagenet': backbone {backbone!r} has no published ImageNet weights; use torchvision:<name> or timm:<name>, or pass --pretrained FILE")
    path = Path(pretrained).expanduser()
    if path.is_dir():
        path = path / "state.pt"
    if not path.is_file():
        raise ConfigError(f"pretrained={pretrained!r}: no such weights file ({path})")
    return WeightsFile(path.resolve(), sha256_of(path), "file")


def _torchvision_imagenet(backbone: str, say, tag: str = "DEFAULT") -> WeightsFile:
    from torchvision.models import get_model_weights

    name = backbone.partition(":")[2]
    enum = get_model_weights(name)
    try:
        weights = enum[tag]
    except KeyError:
        raise ConfigError(f"pretrained='imagenet:{tag}': {enum.__name__} has {', '.join(['DEFAULT', *enum.__members__])}") from None
    url = weights.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cache.is_file():
        _download(url, cache, backbone, say)
    digest = sha256_of(cache)
    m = HASH_IN_NAME.search(cache.name)
    if m and not digest.startswith(m.group(1)):
        raise ConfigError(f"{cache}: its sha256 {digest[:16]}... does not start with {m.group(1)}, as the published {weights} file's does; delete it and download it again ({url})")
    return WeightsFile(cache, digest, "imagenet", f"{type(weights).__name__}.{weights.name}", list(weights.meta.get("categories", [])))


def _download(url: str, dest: Path, backbone: str, say) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:  # noqa: S310 - torchvision's https URL
            total, got, shown, t0 = int(r.headers.get("Content-Length") or 0), 0, -1, time.time()
            say(f"downloading {url} to {dest}" + (f" ({total / 2**20:.0f} MiB)" if total else ""))
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                got += len(chunk)
                step = int(10 * got / total) if total else -1
                if step > shown and step < 10:
                    shown = step
                    say(f"  {got / 2**20:.0f} MiB of {total / 2**20:.0f} ({time.time() - t0:.0f}s)")
        os.replace(part, dest)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise ConfigError(
            f"{backbone} --pretrained imagenet: no cached weights at {dest}, and they cannot be downloaded from {url} "
            f"({getattr(e, 'reason', None) or e}); on a machine with internet access download that file into {dest.parent} "
            "(or set TORCH_HOME to a folder that has it), or pass --pretrained FILE"
        ) from None


def _timm_imagenet(backbone: str) -> WeightsFile:
    from .models.external import import_timm

    timm = import_timm(backbone)
    name = backbone.partition(":")[2]
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    hub = cfg.get("hf_hub_id")
    if not hub:
        raise ConfigError(f"{backbone}: timm names no Hugging Face hub file for its default weights; pass --pretrained FILE")
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = Path(hf_hub_download(hub, filename))
        except Exception as e:  # noqa: BLE001 - offline, missing file, hub errors: all mean "not available here"
            errors.append(f"{filename}: {type(e).__name__}")
            continue
        return WeightsFile(path, sha256_of(path), "imagenet", f"{hub}", list(cfg.get("label_names") or []))
    raise ConfigError(
        f"{backbone} --pretrained imagenet: the weights {hub} are neither in the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
        f"nor downloadable ({'; '.join(errors)}); on a machine with internet access run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` (or copy its cache), or pass --pretrained FILE"
    )


def read_state_dict(path: Path) -> tuple[dict, bool]:
    """The tensors of a weights file and whether it is an ood_ray checkpoint (keys under ``backbone.``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for a bad file
        raise ConfigError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and any(str(k).startswith("backbone.") for k in state["model"]):
        return {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")}, True
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"{path}: expected a state_dict (tensor names to tensors), got {type(state).__name__}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, False


def load_backbone(backbone: torch.nn.Module, wf: WeightsFile) -> None:
    """Load ``wf`` into ``backbone``: all of its tensors, checked; the removed classifier's are ignored."""
    from .checkpoint import check_weights

    state, ours = read_state_dict(wf.path)
    if isinstance(backbone, ExternalBackbone) and not ours:  # the library's layout: checked in its own key names
        dropped = tuple(backbone.dropped)
        state = {k: v for k, v in state.items() if not k.startswith(dropped)}
        check_weights(state, backbone.net.state_dict(), wf.path, _described(backbone))
        backbone.net.load_state_dict(state)
        return
    check_weights(state, backbone.state_dict(), wf.path, _described(backbone))
    backbone.load_state_dict(state)


def load_full(net: torch.nn.Module, wf: WeightsFile, name: str, read: tuple[dict, bool] | None = None) -> None:
    """Load ``wf`` into a whole classifier ``net`` (its own head included), checked like
    ``load_backbone``; ``read``: the file's ``read_state_dict`` when the caller has it already."""
    from .checkpoint import check_weights

    state, ours = read or read_state_dict(wf.path)
    if ours:
        raise ConfigError(f"{wf.path}: an ood_ray checkpoint; score it with ood-ray evaluate --checkpoint {wf.path.parent}")
    check_weights(state, net.state_dict(), wf.path, f"{name} (with its classifier)")
    net.load_state_dict(state)


def _described(backbone) -> str:
    return f"backbone {backbone.name}" if isinstance(backbone, ExternalBackbone) else f"backbone {type(backbone).__name__}"

