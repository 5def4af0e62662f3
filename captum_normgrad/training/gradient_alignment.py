r"""Guided-gradient alignment: train the plain input gradient to look like guided backpropagation.

``papers/004`` (abstract only) introduces "a regularization loss such that the gradient with
respect to the input image obtained by standard backpropagation is similar to the gradient obtained
by guided backpropagation", making plain gradients less noisy. For example ``i`` with label
``y_i`` and class score (logit) ``s_i = z_{i y_i}``:

- plain gradient ``P_i = d s_i / d x_i``, kept in the graph (``create_graph=True``) so the term
  trains the weights by double backpropagation;
- guided gradient ``G_i``, the same derivative through guided ReLUs (negative gradients stopped,
  :func:`~captum_normgrad.training.guided_relus`), detached: a fixed target for this step;
- alignment ``A_i = 1 - cos(P_i, G_i)``, the cosine over all input dimensions, in ``[0, 2]``;
- loss ``L = mean_i [ CE_i + weight * A_i ]``.

Why the cosine: "similar" is about the pattern of the gradient. Guided backpropagation drops every
negative contribution, so its scale differs from the plain gradient's by construction; a squared
error would also push the gradient's magnitude (hence the logits' sensitivity) toward that
arbitrary scale, which the cosine leaves alone. Why the label's logit: it is the quantity whose
input gradient is displayed as the saliency map of the class. One forward pass serves the logits,
``P`` and ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_normgrad._core.pause import monitor_paused
from captum_normgrad.losses import class_labels
from captum_normgrad.training.guided import guided_relus

__all__ = ["AlignmentTerms", "GuidedGradientAlignment", "gradient_alignment"]


def gradient_alignment(plain_gradient: Tensor, guided_gradient: Tensor) -> Tensor:
    """``1 - cos(P_i, G_i)`` per example, ``G`` a fixed target (detached): ``(N, ...) -> (N,)``.

    A zero gradient has no direction: its cosine counts as 0 (alignment 1), with no gradient.
    """
    if plain_gradient.shape != guided_gradient.shape:
        raise ValueError(
            f"gradients of shapes {tuple(plain_gradient.shape)} and "
            f"{tuple(guided_gradient.shape)} cannot be compared"
        )
    plain = plain_gradient.flatten(1)
    guided = guided_gradient.detach().flatten(1)
    plain_norm = torch.linalg.vector_norm(plain, dim=1)
    guided_norm = torch.linalg.vector_norm(guided, dim=1)
    defined = (plain_norm > 0) & (guided_norm > 0)
    # Not F.cosine_similarity: its eps turns a zero gradient into a huge, meaningless gradient.
    denominator = torch.where(defined, plain_norm * guided_norm, torch.ones_like(plain_norm))
    cosine = torch.where(defined, (plain * guided).sum(dim=1) / denominator, 0.0)
    return 1 - cosine


@dataclass
class AlignmentTerms:
    """The loss of one batch and its parts.

    Attributes:
        loss: the scalar to backpropagate, ``mean_i [CE_i + weight * A_i]``.
        outputs: the logits of the forward pass.
        cross_entropy: ``CE_i``, ``(N,)``.
        alignment: ``A_i``, ``(N,)``.
        plain_gradient: ``P``, like the inputs, in the graph.
        guided_gradient: ``G``, like the inputs, detached.
    """

    loss: Tensor
    outputs: Tensor
    cross_entropy: Tensor
    alignment: Tensor
    plain_gradient: Tensor
    guided_gradient: Tensor


class GuidedGradientAlignment:
    """Cross-entropy plus the guided-gradient alignment term (see the module docstring).

    Args:
        model: a classifier with ``nn.ReLU`` modules (functional ReLUs cannot be guided). It is
            not changed: hooks exist only inside each call.
        weight: the weight of the alignment term.

    Example:
        >>> loss_fn = GuidedGradientAlignment(model, weight=1.0)
        >>> terms = loss_fn(images, labels)
        >>> optimiser.zero_grad()
        >>> terms.loss.backward()      # double backpropagation through P
        >>> optimiser.step()
    """

    def __init__(self, model: nn.Module, weight: float = 1.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not weight >= 0.0:
            raise ValueError(f"weight must be a non-negative number, got {weight}")
        self.model = model
        self.weight = float(weight)

    def __call__(self, inputs: Tensor, labels: Tensor) -> AlignmentTerms:
        """One forward pass, the guided and the plain input gradients, and the loss.

        Args:
            inputs: a batch ``(N, ...)``, the model's only input.
            labels: ``(N,)`` class indices.
        """
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError("inputs must be a floating-point tensor")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or infinite values")
        if labels is None:
            raise ValueError("labels are required: the term aligns the gradients of the true class")
        inputs = inputs.detach().requires_grad_()
        with torch.enable_grad(), guided_relus(self.model) as guide:
            outputs = self.model(inputs)
            if not isinstance(outputs, Tensor):
                raise TypeError(f"the model returned {type(outputs).__name__}, not logits")
            labels = class_labels(outputs, labels)
            scores = outputs.gather(1, labels[:, None]).sum()
            with monitor_paused():
                with guide.on():
                    (guided,) = torch.autograd.grad(scores, inputs, retain_graph=True)
                (plain,) = torch.autograd.grad(scores, inputs, create_graph=True)
        alignment = gradient_alignment(plain, guided)
        cross_entropy = F.cross_entropy(outputs, labels, reduction="none")
        return AlignmentTerms(
            loss=(cross_entropy + self.weight * alignment).mean(),
            outputs=outputs,
            cross_entropy=cross_entropy,
            alignment=alignment,
            plain_gradient=plain,
            guided_gradient=guided.detach(),
        )
