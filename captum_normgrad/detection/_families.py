"""Which torchvision detector a model is, and what its targets must hold.

One entry per family, read from the model's own modules: the number of classes its classifier
scores, whether label 0 is the background (a box labelled 0 would train the detector to see
nothing there), and whether the targets need instance masks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

__all__ = ["Family", "detector_family"]

SUPPORTED = "Faster R-CNN, Mask R-CNN, RetinaNet, FCOS, SSD or SSDlite"


@dataclass(frozen=True)
class Family:
    """What a detector family needs of its targets.

    Attributes:
        name: the family, for messages.
        num_classes: classes the classifier scores (the background included where it has one);
            ``None`` for a replaced box predictor that does not say.
        background_zero: label 0 is the background class, refused as a target's label.
        needs_masks: targets carry ``"masks"`` of shape ``(N_boxes, H, W)`` (Mask R-CNN).
    """

    name: str
    num_classes: int | None
    background_zero: bool
    needs_masks: bool


def _rcnn_classes(model: FasterRCNN) -> int | None:
    score = getattr(getattr(model.roi_heads, "box_predictor", None), "cls_score", None)
    return score.out_features if isinstance(score, nn.Linear) else None


def detector_family(model: object) -> Family:
    """The family of a torchvision detector.

    Raises:
        TypeError: ``model`` is not one of the supported torchvision detectors (named), or a
            Keypoint R-CNN (its keypoint targets are not supported).
    """
    if isinstance(model, KeypointRCNN):
        raise TypeError(
            "model is a KeypointRCNN, whose loss needs keypoint targets, which are not supported; "
            f"give a {SUPPORTED} model"
        )
    if isinstance(model, MaskRCNN):
        return Family("Mask R-CNN", _rcnn_classes(model), True, True)
    if isinstance(model, FasterRCNN):
        return Family("Faster R-CNN", _rcnn_classes(model), True, False)
    if isinstance(model, (RetinaNet, FCOS)):
        head = model.head.classification_head
        return Family(type(model).__name__, head.num_classes, False, False)
    if isinstance(model, SSD):
        return Family("SSD", model.head.classification_head.num_columns, True, False)
    raise TypeError(
        f"model must be a torchvision detector ({SUPPORTED}), got {type(model).__name__}"
    )
