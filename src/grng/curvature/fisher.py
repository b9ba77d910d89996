"""Monte-Carlo Fisher: the loss of labels sampled from the model's own predictions.

The true Fisher ``F = E_x E_{y~p(y|x,θ)}[∇log p ∇log pᵀ]`` needs output gradients
for labels drawn from the model, not the data labels (which give the empirical
Fisher). :func:`sampled_nll` builds that loss; back-propagating it inside
:meth:`grng.curvature.CurvatureCapture.fisher_pass` feeds the gradient factors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Likelihood = Literal["categorical", "gaussian"]


def sampled_nll(
    outputs: Tensor,
    likelihood: Likelihood = "categorical",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean negative log-likelihood of labels sampled from the model's predictive distribution.

    * ``"categorical"``: ``outputs`` are logits with classes in the last dimension
      (any leading shape, e.g. ``(B, C)`` or ``(B, T, C)``); ``y ~ softmax(outputs)``
      and the loss is the cross-entropy averaged over every leading index, the
      same reduction as ``F.cross_entropy`` on the flattened logits.
    * ``"gaussian"``: unit-variance Gaussian around ``outputs`` of shape ``(B, ...)``;
      ``y = outputs + ε``, ``ε ~ N(0, I)``, and the loss is ``½‖outputs − y‖²``
      summed over the non-batch dimensions and averaged over the batch.

    The samples are drawn without gradient; only the log-likelihood term is
    differentiated, so its gradient is ``∇log p(y|x)`` at the sampled ``y``.
    The loss is a mean of :func:`loss_terms` terms ``ℓ_i``.
    """
    if likelihood == "categorical":
        logits = outputs.reshape(-1, outputs.shape[-1])
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, labels)
    if likelihood == "gaussian":
        with torch.no_grad():
            noise = torch.randn(
                outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype
            )
            targets = outputs + noise
        return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1).mean()
    raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")


def loss_terms(outputs: Tensor, likelihood: Likelihood = "categorical") -> int:
    """``M``, the number of terms :func:`sampled_nll` averages over.

    ``"categorical"``: every leading index (``outputs.numel() / C``);
    ``"gaussian"``: the batch (``outputs.shape[0]``), each term summing over the
    example's other dimensions (positions, pixels, outputs). The gradient factor
    of a Monte-Carlo pass is normalised by it (see :mod:`grng.curvature.capture`).
    """
    if likelihood == "categorical":
        return outputs.numel() // max(1, outputs.shape[-1])
    if likelihood == "gaussian":
        return outputs.shape[0]
    raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
