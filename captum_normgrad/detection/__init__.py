"""NormGrad for torchvision detectors: maps of the detector's own training loss for given boxes,
or of one detection's score (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS, SSD, SSDlite).

- :class:`DetectorNormGrad`: any NormGrad method (order 0, selective, order 1, adversarial) on
  one image at a time, with the detector's BatchNorm frozen and its sampling seeded.
"""

from captum_normgrad.detection.explainer import DetectorNormGrad

__all__ = ["DetectorNormGrad"]
