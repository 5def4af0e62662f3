"""Saliency during training: NormGrad maps from the training step itself, and two saliency losses.

- :class:`NormGradMonitor`: order-0 NormGrad maps read from the training step's own forward and
  backward passes (no extra pass), every ``k`` steps, to a callback or a bounded history.
- :class:`SaliencyPenalisedLoss`: the loss of "Trustworthy CNNs" (``papers/002``), with maps from
  :class:`DifferentiableGradCam`, :class:`DifferentiableGuidedGradCam` or
  :class:`DifferentiableNormGrad`; :func:`train_only` freezes all but the layer(s) to train.
- :class:`GuidedGradientAlignment`: plain input gradients trained toward guided backpropagation
  (``papers/004``), by double backpropagation.
"""

from captum_normgrad.training.freezing import train_only
from captum_normgrad.training.gradient_alignment import (
    AlignmentTerms,
    GuidedGradientAlignment,
    gradient_alignment,
)
from captum_normgrad.training.guided import GuidedSwitch, guided_relus
from captum_normgrad.training.monitor import MonitoredStep, NormGradMonitor, monitor_paused
from captum_normgrad.training.saliency_maps import (
    DifferentiableGradCam,
    DifferentiableGuidedGradCam,
    DifferentiableNormGrad,
    DifferentiableSaliency,
    SaliencyForward,
)
from captum_normgrad.training.saliency_penalty import SaliencyPenalisedLoss, SaliencyPenaltyTerms

__all__ = [
    "AlignmentTerms",
    "DifferentiableGradCam",
    "DifferentiableGuidedGradCam",
    "DifferentiableNormGrad",
    "DifferentiableSaliency",
    "GuidedGradientAlignment",
    "GuidedSwitch",
    "MonitoredStep",
    "NormGradMonitor",
    "SaliencyForward",
    "SaliencyPenalisedLoss",
    "SaliencyPenaltyTerms",
    "gradient_alignment",
    "guided_relus",
    "monitor_paused",
    "train_only",
]
