"""Deep nearest neighbours (Sun, Ming, Zhu, Li, "Out-of-Distribution Detection with Deep Nearest
Neighbors", ICML 2022).

Train features are L2-normalised (``z / (‖z‖ + 1e-10)``) into a bank; a query is normalised the same
way and scored by −(Euclidean distance to its k-th nearest bank feature). OpenOOD (faiss
``IndexFlatL2``) negates the *squared* distance: the same ranking. Distances are computed in
float64 in chunks of queries so that one chunk's distance matrix stays below 2**25 entries.
The saved bank keeps the features' dtype (at least float32) to keep checkpoints small; scoring keeps
a float64 copy of it in memory.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Detector

EPS = 1e-10
MAX_ENTRIES = 2**25  # distances held at once (256 MiB in float64)


def normalize(z: torch.Tensor) -> torch.Tensor:
    return z / (torch.linalg.vector_norm(z, dim=1, keepdim=True) + EPS)


class NeighbourBank(Detector):
    """A bank of train features searched for the ``k`` nearest of each query (``knn``, ``nnguide``):
    ``k`` >= 1 and at most the bank's size, checked at fit and on restore; the grid drops larger k.
    Subclasses set ``defaults``/``grid_values`` for ``k`` and build the bank with ``_bank``."""

    state_keys = {"bank": ("N", "D")}

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["k"] < 1:
            raise cls.bad("k", params["k"], "must be >= 1")

    @classmethod
    def _grid_point(cls, point: dict[str, Any], feature_dim, num_classes, num_train) -> dict[str, Any] | None:
        return None if num_train is not None and point["k"] > num_train else point

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        k, n = self.params["k"], z.shape[0]
        if n < k:
            raise self.bad("k", k, f"must be <= the number of training samples N={n}")
        dtype = torch.promote_types(z.dtype, torch.float32)  # the saved bank: at least float32
        return {"bank": self._bank(z).to(dtype)}

    def _bank(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def restore(self, state, head, model=None, *, feature_dim=None) -> NeighbourBank:
        super().restore(state, head, model, feature_dim=feature_dim)
        n = self._stats["bank"].shape[0]
        if self.params["k"] > n:
            self._fitted = False
            raise self.bad("k", self.params["k"], f"must be <= the number of training samples N={n}")
        return self

    def _bank64(self, device: torch.device) -> torch.Tensor:
        """A float64 copy of the bank on ``device``, kept while fitted."""
        bank = self._cache.get("bank64")
        if bank is None or bank.device != device:
            bank = self._cache["bank64"] = self._stat("bank", device).to(torch.float64)
        return bank


class KNN(NeighbourBank):
    name = "knn"
    defaults = {"k": 50}
    grid_values = {"k": [1, 5, 10, 50, 100, 200]}

    def _bank(self, z: torch.Tensor) -> torch.Tensor:
        return normalize(z.to(torch.float64))

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        bank = self._bank64(x.device)
        queries = normalize(x.to(torch.float64))
        k = self.params["k"]
        chunk = max(1, min(1024, MAX_ENTRIES // bank.shape[0]))
        out = []
        for start in range(0, queries.shape[0], chunk):
            dist = torch.cdist(queries[start : start + chunk], bank)
            out.append(dist.topk(k, dim=1, largest=False).values[:, -1])
        return -torch.cat(out)
