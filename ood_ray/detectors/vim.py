"""ViM, virtual-logit matching (Wang, Li, Feng, Zhang, "ViM: Out-Of-Distribution with
Virtual-logit Matching", CVPR 2022), as OpenOOD's ``VIMPostprocessor``.

Origin u = −pinv(W)·b; the principal space is spanned by the top ``dim`` eigenvectors of the
covariance (z − u)ᵀ(z − u)/N of the centred train features and NS by the remaining D − dim;
vlogit(z) = ‖(z − u)·NS‖, α = mean_train(max logit) / mean_train(vlogit) and the score is
logsumexp(logits) − α·vlogit (higher = ID). ``dim = 0`` (default) means automatic: D // 2, close to
the paper's and OpenOOD's choices (256 for D = 512, 1000 for 2048, 512 for 768); an explicit dim
must satisfy 1 <= dim < D. All of it in float64.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Detector, energy


class ViM(Detector):
    name = "vim"
    defaults = {"dim": 0}
    needs_linear_head = True
    state_keys = {"origin": ("D",), "residual": ("D", "N"), "alpha": ()}
    fit_params = ("dim",)
    fractions = (0.25, 0.5, 0.75)  # the grid's principal dims, as fractions of D

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["dim"] < 0:
            raise cls.bad("dim", params["dim"], "must be >= 0 (0 = automatic, D // 2)")

    @classmethod
    def grid(cls, *, feature_dim: int | None = None, num_classes: int | None = None, num_train: int | None = None) -> list[dict[str, Any]]:
        """``[{}]`` (automatic dim) without ``feature_dim``; else dims D/4, D/2, 3D/4 (valid ones)."""
        if feature_dim is None:
            return [{}]
        dims = sorted({int(feature_dim * f) for f in cls.fractions} & set(range(1, feature_dim)))
        return [{"dim": d} for d in dims] or [{}]

    def principal_dim(self, feature_dim: int) -> int:
        """The principal space's dimension for D = ``feature_dim`` features."""
        dim = self.params["dim"]
        if dim == 0:
            if feature_dim < 2:
                raise self.error(f"needs D >= 2 features for a residual space, got D={feature_dim}")
            return feature_dim // 2
        if not 1 <= dim < feature_dim:
            raise self.bad("dim", dim, f"must satisfy 1 <= dim < D with D={feature_dim} feature dimensions")
        return dim

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        dim = self.principal_dim(z.shape[1])
        weight, bias = self._weight_bias(z.device)
        origin = -(torch.linalg.pinv(weight) @ bias)
        centered = z.to(torch.float64) - origin
        cov = centered.T @ centered / z.shape[0]
        values, vectors = torch.linalg.eigh(cov)
        order = torch.argsort(values, descending=True)
        residual = vectors[:, order[dim:]].contiguous()
        vlogit = torch.linalg.vector_norm(centered @ residual, dim=1)
        if float(vlogit.mean()) <= 0:
            raise self.bad("dim", self.params["dim"], f"leaves no train variance in the residual space (principal dim {dim} of D={z.shape[1]}); use a smaller dim")
        alpha = self._linear(z).amax(dim=1).mean() / vlogit.mean()
        return {"origin": origin, "residual": residual, "alpha": alpha}

    def _check_stat(self, key: str, value, shape) -> None:
        super()._check_stat(key, value, shape)
        want = self.feature_dim - self.principal_dim(self.feature_dim)
        if key == "residual" and value.shape[1] != want:
            raise self.error(f"state residual has {value.shape[1]} columns, expected D - dim = {want} for D={self.feature_dim}")

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        origin, residual = self._stat("origin", x.device), self._stat("residual", x.device)
        alpha = self._stat("alpha", x.device)
        vlogit = torch.linalg.vector_norm((x.to(torch.float64) - origin) @ residual, dim=1)
        return energy(self._linear(x)) - alpha * vlogit
