r"""The saliency-penalised training loss of "Trustworthy Convolutional Neural Networks" (``papers/002``).

The paper's equations 4-7 were lost in the text copy; these are the formulas implemented here,
each read from the prose around it. For example ``i`` of a batch of ``N``, with ``K`` classes,
label ``y_i``, logits ``z_i``, prediction ``p_i = argmax_c z_ic`` and ``S_i`` the saliency map of
``p_i`` computed differentiably in the training forward pass:

- Map scale: ``T_i = |S_i| / max_u |S_iu|`` (``normalise=True``, the default) or ``T_i = |S_i|``.
  The paper allows any saliency method "provided the generated output when averaged is between
  zero and one" (3.2). Dividing by each map's maximum, as the usual Grad-CAM display does,
  guarantees that for every method, NormGrad included (its raw scale is that of the loss
  gradient). ``|.|`` only matters for Guided Grad-CAM, the one signed map.
- Eq. 4, "we average the predicted saliency map across all dimensions ... to gauge the confidence
  of the predicted saliency map": ``m_i = mean T_i`` over channels and locations.
- Eq. 5, "large gradient saliency maps with corresponding incorrect predicted labels are
  penalized": ``P5_i = [p_i != y_i] * m_i``.
- Eq. 6, "along with small gradient saliency maps with corresponding correct predicted labels":
  ``P6_i = [p_i == y_i] * max(1 - m_i, 0)``. In the paper's range ``m_i <= 1`` this is
  ``1 - m_i``; the ``max`` only keeps a raw map (``normalise=False``) from lowering the loss
  without bound by growing.
- Eq. 7, "a scalar lambda to establish a dependence between [eq. 4] and the cross entropy"; its
  footnote brings eq. 1 and eq. 4 into ``[0, 1]`` "when each term is divided by the number of
  classes K" (eqs. 5 and 6 are in ``[0, 1]`` already), and "equation 5 and 6 are added":

      L = mean_i [ (1 - lambda) CE_i / K  +  lambda m_i / K  +  w5 P5_i  +  w6 P6_i ]

  with ``w5 = w6 = 1`` in the paper; the paper's ablation sets one of them to 0 (5.3).

Why the predicted class: the terms judge the map a user is shown with the prediction; with the
true label's map, eq. 5 would suppress the evidence for the right class. The prediction and the
indicators are constants of the step, as in the paper's case analysis.

What the terms do to normalised maps: ``m_i`` is then the map's extent, so eqs. 4 and 5 make maps
compact and eq. 6 makes the maps of correct predictions broad; ``right_weight=0`` keeps only the
compacting terms. A Grad-CAM map can also satisfy eqs. 4-5 by vanishing altogether (its ReLU cuts
every location), after which it passes no gradient: watch ``confidence`` for zeros.

The paper trains one layer with all others frozen, or a newly added layer (transfer learning);
:func:`~captum_normgrad.training.train_only` sets that up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_normgrad.losses import class_labels
from captum_normgrad.training.saliency_maps import DifferentiableSaliency

__all__ = ["SaliencyPenalisedLoss", "SaliencyPenaltyTerms"]


@dataclass
class SaliencyPenaltyTerms:
    """The loss of one batch and its parts (per-example parts are ``(N,)``).

    Attributes:
        loss: the scalar to backpropagate (eq. 7).
        outputs: the logits of the forward pass.
        maps: the raw saliency maps of ``predictions``.
        predictions: ``p_i``.
        correct: ``[p_i == y_i]`` as ``0.0`` / ``1.0``.
        cross_entropy: ``CE_i`` (eq. 1, not divided by ``K``).
        confidence: ``m_i`` (eq. 4).
        wrong_penalty: ``P5_i`` (eq. 5).
        right_penalty: ``P6_i`` (eq. 6).
        saliency_penalty: the saliency part of eq. 7, ``lambda m_i / K + w5 P5_i + w6 P6_i``.
    """

    loss: Tensor
    outputs: Tensor
    maps: Tensor
    predictions: Tensor
    correct: Tensor
    cross_entropy: Tensor
    confidence: Tensor
    wrong_penalty: Tensor
    right_penalty: Tensor
    saliency_penalty: Tensor


class SaliencyPenalisedLoss:
    r"""Cross-entropy plus penalties on the saliency maps of the training forward pass (eq. 7).

    The formulas, and why, are in the module docstring:
    ``L = mean_i[(1 - lambda) CE_i / K + lambda m_i / K + w5 [p_i != y_i] m_i
    + w6 [p_i == y_i] max(1 - m_i, 0)]`` with ``m_i`` the mean of the normalised magnitude of
    the map of the prediction.

    Args:
        saliency: how maps are computed, e.g. ``DifferentiableGradCam(model, layer)``,
            ``DifferentiableGuidedGradCam(model, layer)`` (the paper's two) or
            ``DifferentiableNormGrad(model, layer)``.
        lam: ``lambda`` in ``[0, 1]``, trading the confidence penalty against the cross-entropy.
        wrong_weight: ``w5``, the weight of eq. 5.
        right_weight: ``w6``, the weight of eq. 6.
        normalise: divide each map by its maximum so ``m_i`` lies in ``[0, 1]`` (the map's
            extent); ``False`` uses the raw magnitude (the map's strength), meaningful only for a
            method whose maps average below 1, as the paper assumes.

    Example:
        >>> model = torchvision.models.vgg16(num_classes=10)
        >>> layer = model.features[28]
        >>> loss_fn = SaliencyPenalisedLoss(DifferentiableGradCam(model, layer), lam=0.5)
        >>> with train_only(model, layer) as trainable:
        ...     optimiser = torch.optim.SGD(trainable, lr=1e-3)
        ...     terms = loss_fn(images, labels)
        ...     optimiser.zero_grad()
        ...     terms.loss.backward()
        ...     optimiser.step()
    """

    def __init__(
        self,
        saliency: DifferentiableSaliency,
        lam: float = 0.5,
        wrong_weight: float = 1.0,
        right_weight: float = 1.0,
        normalise: bool = True,
    ) -> None:
        if not isinstance(saliency, DifferentiableSaliency):
            raise TypeError(
                "saliency must be a DifferentiableSaliency, e.g. DifferentiableGradCam(model, layer)"
            )
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        for name, weight in (("wrong_weight", wrong_weight), ("right_weight", right_weight)):
            if not weight >= 0.0:
                raise ValueError(f"{name} must be a non-negative number, got {weight}")
        self.saliency = saliency
        self.lam = float(lam)
        self.wrong_weight = float(wrong_weight)
        self.right_weight = float(right_weight)
        self.normalise = normalise

    def __call__(self, inputs: Tensor, labels: Tensor) -> SaliencyPenaltyTerms:
        """Run the training forward pass on ``inputs`` and return eq. 7 with its parts.

        Args:
            inputs: an image batch ``(N, C, H, W)``.
            labels: ``(N,)`` true class indices.

        Returns:
            A :class:`SaliencyPenaltyTerms`; call ``.loss.backward()``.
        """
        if labels is None:
            raise ValueError("labels are required: eqs. 5-6 compare the prediction with them")
        forward = self.saliency(inputs)
        outputs = forward.outputs
        labels = class_labels(outputs, labels)
        num_classes = outputs.shape[1]
        predictions = forward.classes
        correct = (predictions == labels).to(outputs.dtype)
        confidence = self._confidence(forward.maps)
        cross_entropy = F.cross_entropy(outputs, labels, reduction="none")
        wrong_penalty = (1 - correct) * confidence
        right_penalty = correct * (1 - confidence).clamp_min(0)
        saliency_penalty = (
            self.lam * confidence / num_classes
            + self.wrong_weight * wrong_penalty
            + self.right_weight * right_penalty
        )
        per_example = (1 - self.lam) * cross_entropy / num_classes + saliency_penalty
        return SaliencyPenaltyTerms(
            loss=per_example.mean(),
            outputs=outputs,
            maps=forward.maps,
            predictions=predictions,
            correct=correct,
            cross_entropy=cross_entropy,
            confidence=confidence,
            wrong_penalty=wrong_penalty,
            right_penalty=right_penalty,
            saliency_penalty=saliency_penalty,
        )

    def _confidence(self, maps: Tensor) -> Tensor:
        """``m_i``, eq. 4: the mean of each example's (normalised) map magnitude."""
        magnitude = maps.abs().flatten(1)
        if self.normalise:
            peak = magnitude.amax(dim=1, keepdim=True)
            # An all-zero map (Grad-CAM's ReLU can cut everything) stays zero instead of 0 / 0.
            magnitude = magnitude / peak.clamp_min(torch.finfo(magnitude.dtype).tiny)
        return magnitude.mean(dim=1)
