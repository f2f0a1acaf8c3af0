"""NAC-UE (Liu, Lochman, Zach, "Neuron Activation Coverage: Rethinking Out-of-distribution
Detection and Generalization", ICLR 2024): how far a sample's neuron states lie where the training
data rarely put them.

For each hooked layer ℓ (``detectors.layers``: ResNets layer1..layer3 and the penultimate
features; small_cnn its first two ReLUs and the features; see ``choose_layers``) and neuron c,
with a the layer's output and g = ∂KL(u ‖ softmax(f(x)))/∂a (u uniform; the gradient of the
divergence, not of its negative, as OpenOOD's ``kl_grad``, i.e. of the cross-entropy to uniform
targets), the probe is p = mean_hw(a) · Σ_hw g (a ⊙ g for 2-D layers) and the state is

    s = sigmoid(α_ℓ · p),   α_ℓ = alpha / mean_{train, c} |p|   (this layer's mean |p| on the profiled images).

Fit ("profiling"): the states of at most ``fit_samples`` train images (an evenly spread subset)
are histogrammed per neuron over OpenOOD's edges e (``edges(bins)``: ``bins`` values,
``bins/2`` of them log-spaced in [0, 0.5] mirrored to [0.5, 1], the last moved to 1.01, then
1.2; intervals [e_i, e_{i+1})), so a state in [0, 1] falls in one of ``bins − 2`` intervals
(OpenOOD keeps ``bins − 1`` counters, the last, [1.01, 1.2), always empty; they are dense near
0.5, coarse near 0 and 1). Score: the coverage of a state is min(count of its interval /
(r · N_profiled), 1); a layer's score is the mean over its neurons, the sample's score the mean
over layers (OpenOOD's ``single_ood_test``; pytorch-ood sums them: the same ranking, L times
larger). Higher = more in-distribution.

Defaults from OpenOOD v1.5 (ResNet-18, CIFAR-10): 1,000 profiled train images (``valid_num``),
M = 50 edges, O = 50 (r = O / N = 0.05), layers avgpool, layer3, layer2, layer1, α = 100 on
avgpool, the other layers' α searched per benchmark (``postprocessor_sweep``) with
``sigmoid(o*g_kl)`` states and ``avg`` test method. Differences, all deliberate:

* α is relative to the layer's mean |p| on the profiled images (stored in the state as
  ``scales``): the raw scale of a·g depends on the backbone, the layer and the training, so one
  raw α cannot serve every backbone; OpenOOD's raw α_ℓ is ``alpha / scale_ℓ`` here (default
  ``alpha`` = 1, searched over {0.3, 1, 3}).
* Conv maps: OpenOOD sums a and g over H×W separately (``StatePooling``) and multiplies, which
  is H·W times our p (absorbed in α); pytorch-ood 0.4 averages the product, mean_hw(a ⊙ g), which
  is not a product of pooled terms. For 2-D layers (the penultimate features) all three agree.
* Bins: pytorch-ood 0.4 uses its own symmetric geometric edges, dense near 0 and 1; we use
  OpenOOD's. With those edges and the same α_ℓ and O = r·N, pytorch-ood's ``NACUE`` gives our
  scores times −L (tested).
* OpenOOD profiles a class-balanced random subset; here the subset is the engine's key-hash
  spread subset (every shard and class represented, the same for any number of workers).

Probes are rounded to float32 (as the evaluation arrays hold them) before anything else, so a
detector scores the same numbers in the val search, in ``ood-ray evaluate`` and when serving;
states, counts and coverage are float64. Given plain features N×D instead of probes, NAC reads
the penultimate layer alone, its gradient taken through the head (what ``probe`` computes for that
layer); ``layers`` then only says how many layers ``probe`` hooks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import Detector, Model, _describe
from .layers import choose_layers, layer_probes


def edges(bins: int) -> torch.Tensor:
    """OpenOOD's ``logspace(1e3, bins)`` edges (float64, ``bins`` values, even ``bins`` >= 4)."""
    half = bins // 2
    left = np.log(np.linspace(1.0, math.sqrt(1e3), half)) / math.log(1e3)
    e = np.concatenate([left[:-1], (1.0 - left)[::-1]])
    e[-1] += 1e-2
    return torch.from_numpy(np.append(e, 1.2))


class NAC(Detector):
    name = "nac"
    defaults = {"layers": 4, "alpha": 1.0, "bins": 50, "r": 0.05, "fit_samples": 1000}
    needs_layers = True
    grid_values = {"layers": [4, 1], "alpha": [0.3, 1.0, 3.0], "r": [0.01, 0.05]}
    state_keys = {"counts": ("N", "N"), "sizes": ("N",), "scales": ("N",), "num_profiled": ()}
    fit_params = ("layers", "alpha", "bins")

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["layers"] < 1:
            raise cls.bad("layers", params["layers"], "must be >= 1")
        if params["alpha"] <= 0:
            raise cls.bad("alpha", params["alpha"], "must be > 0")
        if params["bins"] < 4 or params["bins"] % 2:
            raise cls.bad("bins", params["bins"], "must be an even number >= 4")
        if not 0 < params["r"] <= 1:
            raise cls.bad("r", params["r"], "must be in (0, 1]")
        if params["fit_samples"] < 1:
            raise cls.bad("fit_samples", params["fit_samples"], "must be >= 1")

    # ----------------------------------------------------------------- probes
    def layer_names(self, model) -> list[str]:
        """The layers ``probe`` hooks in ``model`` (``detectors.layers.choose_layers``)."""
        return choose_layers(model, self.params["layers"])

    def probe(self, model, x: torch.Tensor, logits: Model | None = None, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        try:
            return layer_probes(model, x, self.layer_names(model) if names is None else list(names), logits)
        except ValueError as e:
            raise self.error(str(e)) from None

    def _penultimate(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plain features: the penultimate probe z ⊙ ∂KL/∂z through the head."""
        with torch.inference_mode(False), torch.enable_grad():
            zz = z.detach().clone().requires_grad_(True)
            kl = -torch.log_softmax(self._logits(zz), dim=1).mean(dim=1).sum()
            (g,) = torch.autograd.grad(kl, zz)
        return {"backbone": z.detach().to(torch.float64) * g.to(torch.float64)}

    def _as_probes(self, x: Any, where: str) -> dict[str, torch.Tensor]:
        if isinstance(x, torch.Tensor):
            z = self._check_features(x, where)
            if self.feature_dim is not None and z.shape[1] != self.feature_dim:
                raise self.error(f"was fitted on D={self.feature_dim} features but {where} got D={z.shape[1]}")
            x = self._penultimate(z)
        if not isinstance(x, dict) or not x:
            raise self.error(f"{where} needs layer probes (a dict layer -> N×C tensor, from probe()) or features N×D, got {_describe(x)}")
        out = {}
        for name, v in x.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 2 or not v.is_floating_point() or v.shape[1] < 1:
                raise self.error(f"{where}: probe {name} must be a floating-point N×C tensor, got {_describe(v)}")
            if v.shape[0] != next(iter(x.values())).shape[0]:
                raise self.error(f"{where}: the probes have different numbers of rows")
            if not bool(torch.isfinite(v).all()):
                raise self.error(f"{where}: probe {name} holds NaN or inf")
            out[name] = v.detach().to(torch.float32).to(torch.float64)
        return out

    def _fit_inputs(self, features: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        probes = self._as_probes(features, "fit")
        if isinstance(features, torch.Tensor):
            return probes, features
        return probes, list(probes.values())[-1]  # the penultimate layer: D wide, what the head takes

    def _check_inputs(self, x: Any) -> dict[str, torch.Tensor]:
        probes = self._as_probes(x, "score")
        sizes = [int(s) for s in self._stats["sizes"].tolist()]
        got = [v.shape[1] for v in probes.values()]
        if got != sizes:
            raise self.error(f"was fitted on layers of sizes {sizes} but score got probes of sizes {got}")
        return probes

    # ----------------------------------------------------------------- fit / score
    def _states(self, p: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.sigmoid(p * (self.params["alpha"] / scale))

    def _bins(self, s: torch.Tensor) -> torch.Tensor:
        e = edges(self.params["bins"]).to(s.device)
        return (torch.searchsorted(e, s.contiguous(), right=True) - 1).clamp_(0, self.params["bins"] - 3)

    def _fit(self, probes: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        width = self.params["bins"] - 2
        counts, scales = [], []
        for p in probes.values():
            scale = float(p.abs().mean())
            scale = scale if scale > 0 and math.isfinite(scale) else 1.0
            idx = self._bins(self._states(p, scale))  # N×C
            flat = (idx + torch.arange(p.shape[1], device=p.device) * width).reshape(-1)
            c = torch.zeros(p.shape[1] * width, dtype=torch.float64, device=p.device)
            c.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64, device=p.device))
            counts.append(c.reshape(p.shape[1], width))
            scales.append(scale)
        dev = counts[0].device
        return {
            "counts": torch.cat(counts),
            "sizes": torch.tensor([float(p.shape[1]) for p in probes.values()], dtype=torch.float64, device=dev),
            "scales": torch.tensor(scales, dtype=torch.float64, device=dev),
            "num_profiled": torch.tensor(float(y.shape[0]), dtype=torch.float64, device=dev),
        }

    def _score(self, probes: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = next(iter(probes.values())).device
        counts = self._stat("counts", dev)
        scales = self._stats["scales"].tolist()
        denom = self.params["r"] * float(self._stats["num_profiled"])
        total, start = 0.0, 0
        for p, scale in zip(probes.values(), scales, strict=True):
            idx = self._bins(self._states(p, scale))  # N×C
            layer = counts[start : start + p.shape[1]]  # C×bins
            hit = layer.t().gather(0, idx)  # N×C: the count of each state's interval
            total = total + (hit / denom).clamp(max=1.0).mean(dim=1)
            start += p.shape[1]
        return total / len(scales)

    def restore(self, state, head, model=None, *, feature_dim=None):
        super().restore(state, head, model, feature_dim=feature_dim)
        try:
            self._check_saved()
        except Exception:
            self._fitted, self._stats = False, {}
            raise
        return self

    def _check_saved(self) -> None:
        counts, sizes, scales, n = (self._stats[k] for k in ("counts", "sizes", "scales", "num_profiled"))
        if bool((sizes != sizes.round()).any()) or bool((sizes < 1).any()):
            raise self.error(f"state sizes={sizes.tolist()} must be whole numbers >= 1")
        if int(sizes.sum()) != counts.shape[0] or scales.shape[0] != sizes.shape[0]:
            raise self.error(f"state counts has {counts.shape[0]} rows and scales {scales.shape[0]} entries, but sizes {sizes.tolist()} sum to {int(sizes.sum())} over {sizes.shape[0]} layers")
        if int(sizes[-1]) != self.feature_dim:
            raise self.error(f"state sizes end with {int(sizes[-1])}, but the penultimate layer has D={self.feature_dim}")
        if counts.shape[1] != self.params["bins"] - 2:
            raise self.error(f"state counts has {counts.shape[1]} columns, expected bins - 2 = {self.params['bins'] - 2}")
        if bool((counts < 0).any()) or bool((counts != counts.round()).any()) or bool((scales <= 0).any()):
            raise self.error("state counts must be whole numbers >= 0 and scales > 0")
        if float(n) < 1 or float(n) != round(float(n)) or bool((counts.sum(dim=1) != n).any()):
            raise self.error(f"state num_profiled={float(n)!r} must be a whole number >= 1 that every neuron's counts sum to")
