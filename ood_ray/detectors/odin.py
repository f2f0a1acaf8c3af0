"""ODIN (Liang, Li, Srikant, "Enhancing the Reliability of Out-of-Distribution Image Detection in
Neural Networks", ICLR 2018): temperature scaling plus input perturbation.

With ŷ the class the model predicts for the unperturbed input and S = softmax(f(x)/T),
``x̃ = x − ε·sign(−∇_x log S_ŷ(x))`` and the score is ``max_c softmax(f(x̃)/T)_c``. Unlike OpenOOD,
which divides the gradient sign by the normalisation std per channel, x̃ is formed directly in the
model's input space (ε is in the units of the model's input). A zero gradient leaves that input
value unchanged (``torch.sign(0) = 0``). With ε = 0 no gradient pass is made (temperature-scaled
MSP). ``fit`` needs ``model=`` (images -> logits, in eval mode); ``score`` takes images, enables
autograd itself and takes gradients w.r.t. the input only (the model's parameter grads are untouched).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Detector, _describe


class ODIN(Detector):
    name = "odin"
    defaults = {"temperature": 1000.0, "epsilon": 0.0014}
    needs_model = True
    grid_values = {"temperature": [1.0, 10.0, 100.0, 1000.0], "epsilon": [0.0, 0.0007, 0.0014, 0.0028]}

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["temperature"] <= 0:
            raise cls.bad("temperature", params["temperature"], "must be > 0")
        if params["epsilon"] < 0:
            raise cls.bad("epsilon", params["epsilon"], "must be >= 0")

    def _check_inputs(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise self.error(f"score needs images as a tensor N×C×H×W (the model's input), got {_describe(x)}")
        if not x.dtype.is_floating_point:
            raise self.error(f"score needs floating-point images, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise self.error("score got non-finite images (NaN or inf)")
        return x

    def _model_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise self.error(f"the model must return logits N×K, got {_describe(out)} for images {tuple(x.shape)}")
        return out

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        t, eps = self.params["temperature"], self.params["epsilon"]
        if eps > 0:
            with torch.inference_mode(False), torch.enable_grad():  # also inside inference_mode
                x_in = x.detach().clone().requires_grad_(True)
                logits = self._model_logits(x_in)
                pred = logits.detach().argmax(dim=1, keepdim=True)
                log_s = torch.log_softmax(logits / t, dim=1).gather(1, pred).sum()
                (grad,) = torch.autograd.grad(log_s, x_in)
            x = x.detach() + eps * torch.sign(grad)  # = x − ε·sign(−∇ log S_ŷ)
        logits = self._model_logits(x).detach().to(torch.float64)
        return torch.softmax(logits / t, dim=1).amax(dim=1)
