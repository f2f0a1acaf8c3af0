"""Learning Confidence for OOD Detection (DeVries & Taylor, arXiv:1802.04865): loss and helpers.

A second linear head on the penultimate features outputs a scalar confidence logit ``s``; the
confidence is ``c = σ(s)`` and the class probabilities ``p = softmax(z)``, both clamped to
``[1e-12, 1 − 1e-12]``. During training the network may "ask for hints": the prediction is pulled
towards the true label in proportion to ``1 − c``,

    p' = c' · p + (1 − c') · onehot(y),      c' = b · c + (1 − b),

where the per-sample mask ``b`` (``b ~ Bernoulli(u)``, ``u ~ U(0, 1)``) withholds hints from about
half the batch by forcing ``c' = 1``. The loss is ``L_t + λ · L_c`` with ``L_t = mean(−log p'_y)``
and ``L_c = mean(−log c)`` over all samples. After every step λ is adjusted towards the budget β:
``λ ← λ / 1.01`` if ``β > L_c`` else ``λ ← λ / 0.99``.

At test time an input is flagged OOD when ``c < δ`` (as for every method's threshold score). Optional input preprocessing moves the input
one signed-gradient step that increases confidence: ``x̃ = x − ε · sign(∇_x(−log c))``.

Plain torch only: no Ray, MLflow or I/O.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Method, StepResult

EPS = 1e-12


def _as_vector(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``t`` as shape ``N``, accepting ``N`` or ``N × 1``."""
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},) or ({n}, 1), got {tuple(t.shape)}")
    return t


def confidence_loss(
    logits: torch.Tensor,
    confidence_logit: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    hint_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The confidence-branch training loss.

    Args:
        logits: class logits, shape ``N × K``.
        confidence_logit: the confidence branch's pre-sigmoid output, shape ``N`` or ``N × 1``.
        targets: class indices, shape ``N``.
        lam: weight λ ≥ 0 of the confidence term.
        hint_mask: shape ``N``, 1 where the sample may take hints and 0 where its confidence is
            forced to 1 (see :func:`sample_hint_mask`).

    Returns:
        ``(total, task_loss, confidence_loss)`` with ``total = task_loss + lam · confidence_loss``.
    """
    if not lam >= 0:
        raise ValueError(f"confidence loss weight lam must be >= 0, got {lam}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be N × K, got shape {tuple(logits.shape)}")
    n, k = logits.shape
    conf = _as_vector(confidence_logit, n, "confidence_logit")
    if targets.shape != (n,):
        raise ValueError(
            f"targets must have shape ({n},) to match logits, got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    mask = _as_vector(hint_mask, n, "hint_mask").to(logits.dtype)
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.numel():
        raise ValueError(f"hint_mask values must be 0 or 1, got {bad[0].item()}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= k):
        raise ValueError(
            f"targets must lie in [0, {k - 1}], got range [{int(targets.min())}, {int(targets.max())}]"
        )

    p = torch.softmax(logits, dim=1).clamp(EPS, 1 - EPS)
    c = torch.sigmoid(conf).clamp(EPS, 1 - EPS)
    c_hint = mask * c + (1 - mask)
    # p'_{i,y_i} = c'·p_{i,y_i} + (1 − c')·1: the true-class entry of c'·p + (1 − c')·onehot(y).
    p_true = p.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    p_hint_true = c_hint * p_true + (1 - c_hint)
    task = -torch.log(p_hint_true).mean()
    conf_loss = -torch.log(c).mean()
    return task + lam * conf_loss, task, conf_loss


def sample_hint_mask(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample hint mask: ``b_i ~ Bernoulli(u_i)``, ``u_i ~ U(0, 1)``; float 0/1, shape ``n``.

    Marginally ``P(b_i = 1) = 0.5``. A generator, if given, must live on ``device``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    u = torch.rand(n, generator=generator, device=device)
    return torch.bernoulli(u, generator=generator)


def update_lambda(lam: float, confidence_loss_value: float | torch.Tensor, budget: float) -> float:
    """One step of the budget controller: ``lam / 1.01`` if ``budget > L_c`` else ``lam / 0.99``."""
    if not budget > 0:
        raise ValueError(f"β (budget) must be > 0, got {budget}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    lc = float(confidence_loss_value)
    return lam / 1.01 if budget > lc else lam / 0.99


def preprocess_inputs(model: nn.Module, images: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Input preprocessing ``x̃ = x − ε · sign(∇_x mean(−log c))``, a step that raises confidence.

    ``model(x)`` must return ``(logits, confidence_logit)``. The model is used in whatever mode it is
    in (call ``model.eval()`` first); gradients are taken only with respect to a detached copy of
    ``images``, so nothing accumulates in the parameters' ``.grad``. ``epsilon = 0`` returns the
    images unchanged without running the model. Returns a detached tensor.
    """
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    x = images.detach()
    if epsilon == 0:
        return x.clone()
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            got = (
                type(out).__name__
                if not isinstance(out, (tuple, list))
                else f"{type(out).__name__} of {len(out)}"
            )
            raise ValueError(f"confidence model must return (logits, confidence_logit), got {got}")
        c = torch.sigmoid(out[1]).clamp(EPS, 1 - EPS)
        loss = -torch.log(c).mean()
        (grad,) = torch.autograd.grad(loss, x)
    return (images.detach() - epsilon * grad.sign()).detach()


def check_threshold(delta: float) -> None:
    """Validate the OOD threshold δ on the confidence (OOD iff ``c < δ``): ``0 ≤ δ ≤ 1``."""
    if not 0 <= delta <= 1:
        raise ValueError(f"confidence threshold δ must be in [0, 1], got {delta}")


class ConfidenceHead(nn.Module):
    """A class head and a scalar confidence head on the same features."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(num_features, num_classes)
        self.confidence = nn.Linear(num_features, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits N × K, confidence_logit N)``."""
        return self.classifier(features), self.confidence(features).squeeze(-1)


__all__ = [
    "ConfidenceHead",
    "check_threshold",
    "confidence_loss",
    "preprocess_inputs",
    "sample_hint_mask",
    "update_lambda",
]


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero one random ``size``×``size`` square per image (DeVries & Taylor 2017); the square is
    centred anywhere in the image, so it may be partly outside it."""
    n, _, h, w = x.shape
    y0 = torch.randint(0, h, (n, 1, 1)) - size // 2
    x0 = torch.randint(0, w, (n, 1, 1)) - size // 2
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return x * (~inside).unsqueeze(1).to(x.device, x.dtype)


class Confidence(Method):
    """The confidence branch: hints on about half of each batch, λ steered by the budget β."""

    name = "confidence"
    needs_outliers = False
    defaults: dict = {"lam": 0.1, "budget": 0.3, "epsilon": 0.0, "delta": 0.5, "cutout": 0}
    default_score = "confidence"
    threshold_score = "confidence"
    state_sync_keys = ("confidence_loss",)

    def __init__(self, params: dict | None = None):
        super().__init__(params)
        self.eval_needs_grad = float(self.params["epsilon"]) > 0
        if self.eval_needs_grad:  # with input preprocessing, c of the preprocessed input decides
            self.default_score = self.threshold_score = "confidence_pre"

    nonnegative = ("epsilon", "cutout")
    positive = ("lam", "budget")  # λ is adapted by multiplying: from 0 it would stay 0 and ignore β
    labels = {"budget": "budget (β)", "epsilon": "epsilon (ε)"}

    @classmethod
    def validate(cls, params: dict) -> None:
        if not float(params["cutout"]).is_integer():
            raise ValueError(f"confidence: cutout={params['cutout']!r} must be a whole number of pixels (0 = off)")

    @classmethod
    def search_space(cls, trial) -> dict:
        """β (budget), the initial λ and cutout: what changes training."""
        return {
            "budget": trial.suggest_float("budget", 0.05, 1.0, log=True),
            "lam": trial.suggest_float("lam", 0.01, 1.0, log=True),
            "cutout": trial.suggest_categorical("cutout", [0, 2, 4]),
        }

    @classmethod
    def posthoc_grid(cls) -> list[dict]:
        """ε of the input preprocessing, tried on the trained checkpoint (δ is set from val ID)."""
        return [{"epsilon": e} for e in (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01)]

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        return ConfidenceHead(num_features, num_classes)

    def class_head(self, head: nn.Module) -> nn.Module:
        return head.classifier

    def logits(self, output) -> torch.Tensor:
        if not isinstance(output, tuple | list) or len(output) != 2:
            raise ValueError("confidence model must return (logits, confidence_logit)")
        return output[0]

    def initial_state(self) -> dict:
        return {"lam": float(self.params["lam"])}

    exported_output = "Exported models return the K logits followed by the confidence logit (K + 1 columns)."

    def flat_output(self, output) -> torch.Tensor:
        """The K logits followed by the confidence logit (K + 1 columns)."""
        return torch.cat([output[0], output[1].reshape(-1, 1)], dim=1)

    def training_step(self, model, x, y, x_out, state) -> StepResult:
        if int(self.params["cutout"]) > 0:
            x = cutout(x, int(self.params["cutout"]))
        out = model(x)
        self.logits(out)
        hint = sample_hint_mask(len(x), device=x.device)
        total, task, conf = confidence_loss(out[0], out[1], y, state["lam"], hint)
        return StepResult(total, {"task_loss": task.item(), "confidence_loss": conf.item()})

    def update_state(self, state: dict, synced: dict[str, float]) -> None:
        state["lam"] = update_lambda(state["lam"], synced["confidence_loss"], float(self.params["budget"]))

    def scores(self):
        return {"confidence": lambda out: torch.sigmoid(out[1].reshape(-1)), "msp": lambda out: torch.softmax(out[0], 1).max(1).values}

    def eval_batch(self, model, x):
        with torch.no_grad():
            out = model(x)
            res = {"logits": self.logits(out), **{k: fn(out) for k, fn in self.scores().items()}}
        eps = float(self.params["epsilon"])
        if eps > 0:
            x_pre = preprocess_inputs(model, x, eps)
            with torch.no_grad():
                res["confidence_pre"] = torch.sigmoid(model(x_pre)[1].reshape(-1))
        return res

    def score_names(self) -> list[str]:
        return [*self.scores(), *(["confidence_pre"] if float(self.params["epsilon"]) > 0 else [])]
