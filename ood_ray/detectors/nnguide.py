"""Nearest-neighbour guidance (Park, Jung, Teoh, "Nearest Neighbor Guidance for Out-of-Distribution
Detection", ICCV 2023; OpenOOD's ``nnguide``).

Energy E(z) = logsumexp(head(z)) (temperature 1). The bank holds every train feature
L2-normalised (``z / (‖z‖ + 1e-10)``, as ``knn``) and multiplied by its own energy: b_i = E(z_i)·ẑ_i.
A query is normalised the same way; its guidance is the mean of its k largest inner products
⟨ẑ, b_i⟩ with the bank, and

    score = E(z) · guidance(z)      (higher = ID)

The head may be any module (only its logits are used). Inner products are computed in float64 in
chunks of queries so that one chunk's matrix stays below 2**25 entries; the saved bank keeps the
features' dtype (at least float32), scoring keeps a float64 copy of it in memory.

Other implementations: OpenOOD v1.5 (``NNGuidePostprocessor``, k = 100, a sweep of [100] only,
faiss inner-product search; our grid searches k on val) builds the bank from the first fraction
``alpha`` of the train loader (0.01 by default); here the bank is the whole fit set, which the
pipeline already caps at ``detector_fit_samples`` (subsampled evenly), so fitting on a subset is
how to get a smaller bank. OpenOOD normalises as ``z / ‖z‖ + 1e-10`` (the constant added to every
entry), pytorch-ood 0.4.0 (``NNGuide``, default k = 10) as ``z / max(‖z‖, 1e-12)``: both differ
from ours only for a zero feature. pytorch-ood returns the negated score (an outlier score); the
values are otherwise the same (float32 there).
"""

from __future__ import annotations

import torch

from .base import energy
from .knn import NeighbourBank, normalize

MAX_ENTRIES = 2**25  # inner products held at once (256 MiB in float64)


class NNGuide(NeighbourBank):
    name = "nnguide"
    defaults = {"k": 100}
    grid_values = {"k": [1, 10, 50, 100, 200, 500, 1000]}

    def _bank(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        step = max(1, MAX_ENTRIES // max(1, self.num_classes))  # logits of one chunk stay bounded too
        parts = []
        for start in range(0, n, step):
            chunk = z[start : start + step]
            parts.append(normalize(chunk.to(torch.float64)) * energy(self._logits(chunk)).unsqueeze(1))
        return torch.cat(parts)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        bank = self._bank64(x.device)
        k = self.params["k"]
        chunk = max(1, min(1024, MAX_ENTRIES // bank.shape[0]))
        out = []
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk]
            sims = normalize(part.to(torch.float64)) @ bank.T
            guidance = sims.topk(k, dim=1).values.mean(dim=1)
            out.append(energy(self._logits(part)) * guidance)
        return torch.cat(out)
