"""Evaluating saliency maps: faithfulness, localization, sanity and selectivity, batched.

Pure functions over tensors: maps ``(N, 1, h, w)`` at any resolution (upsampled bilinearly to the
image first), images ``(N, C, H, W)``, and one value per example out. Which direction is better:

=========================  ======================================================  ==========
metric                     what it measures                                        better
=========================  ======================================================  ==========
``deletion_auc``           score left as the most salient pixels are removed        lower
``insertion_auc``          score regained as the most salient pixels are restored   higher
``confidence_drop``        confidence lost on ``image * normalised map``            lower
``confidence_increase``    whether ``image * normalised map`` scores higher         higher
``pointing_game``          the map's maximum lies on (within tolerance of) the GT   higher
``localization_iou``       IoU of the thresholded map's box with the GT box         higher
``model_randomization``    map similarity after randomising the weights             lower
``class_selectivity``      rank correlation of the maps for two classes             lower
=========================  ======================================================  ==========

:func:`evaluate_attributions` runs several methods over a data loader into a :class:`MetricsTable`;
``METRICS`` names the metrics it (and :func:`captum_normgrad.evaluation.evaluate_dataset`)
accepts, with the columns each one fills.
"""

from captum_normgrad._core.metric_names import LOWER_IS_BETTER, METRICS, Metric
from captum_normgrad.metrics.captum_adapter import input_shaped_explanation, to_input_shape
from captum_normgrad.metrics.confidence import (
    confidence_drop,
    confidence_increase,
    explanation_scores,
)
from captum_normgrad.metrics.deletion import (
    area_under_curve,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    substrate_images,
)
from captum_normgrad.metrics.localization import (
    localization_accuracy,
    localization_hits,
    localization_iou,
    saliency_boxes,
)
from captum_normgrad.metrics.pointing import map_maxima, pointing_game, pointing_game_accuracy
from captum_normgrad.metrics.runner import evaluate_attributions
from captum_normgrad.metrics.sanity import (
    RandomizationResult,
    model_randomization,
    randomizable_layers,
)
from captum_normgrad.metrics.similarity import (
    class_selectivity,
    contrast_classes,
    map_ssim,
    spearman_correlation,
)
from captum_normgrad.metrics.table import MetricsTable

__all__ = [
    "LOWER_IS_BETTER",
    "METRICS",
    "Metric",
    "MetricsTable",
    "RandomizationResult",
    "area_under_curve",
    "class_selectivity",
    "confidence_drop",
    "contrast_classes",
    "confidence_increase",
    "deletion_auc",
    "deletion_curve",
    "evaluate_attributions",
    "explanation_scores",
    "input_shaped_explanation",
    "insertion_auc",
    "insertion_curve",
    "localization_accuracy",
    "localization_hits",
    "localization_iou",
    "map_maxima",
    "map_ssim",
    "model_randomization",
    "pointing_game",
    "pointing_game_accuracy",
    "randomizable_layers",
    "saliency_boxes",
    "spearman_correlation",
    "substrate_images",
    "to_input_shape",
]
