"""NormGrad maps of a torchvision detector's own training loss, or of one detection's score."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from captum_normgrad.detection._checks import (
    checked_detections,
    checked_images,
    checked_targets,
)
from captum_normgrad.detection._families import detector_family
from captum_normgrad.detection._forwards import (
    ImageDetectionScore,
    ImageTrainingLoss,
    summed_loss,
)
from captum_normgrad.detection._modes import eval_mode
from captum_normgrad.normgrad import LayerNormGrad
from captum_normgrad.order1 import LayerNormGradOrder1

__all__ = ["DetectorNormGrad"]

# What the explainer sets itself for every image.
_RESERVED = frozenset({"target", "loss", "additional_forward_args", "batch_mode", "chunk_size"})


class DetectorNormGrad:
    r"""NormGrad maps of a torchvision detector, one image at a time.

    With ``targets`` (boxes and labels, as for training), the map of the detector's own training
    loss: torchvision's objective, the sum of the loss dict ``model(images, targets)`` returns,
    in training mode with every BatchNorm (any norm with running statistics) and dropout kept in
    evaluation mode, so that the map explains this network rather than one normalising with the
    image's own statistics. The loss samples anchors and proposals at random; each pass runs with
    the random generators forked and seeded with ``seed``, so two calls give the same maps, order
    1's four passes per image see the same sample, and the caller's generators are not advanced.

    With ``detection=k``, the map of the score of the image's ``k``-th detection (in the order the
    model returns them: by decreasing score in torchvision), in evaluation mode, at order 0.

    Each image is explained alone (a batch of one): its map does not depend on the other images,
    and images may have different sizes. The map is at the layer's resolution of the image the
    detector sees, after its transform (resized to ``min_size`` / ``max_size`` and padded to a
    multiple of 32 at the bottom and right; with several ``min_size`` values, the loss's pass
    draws its scale at random, seeded like the sampling). The model is left as it was, flags
    included.

    Args:
        model: a torchvision Faster R-CNN, Mask R-CNN, RetinaNet, FCOS, SSD or SSDlite.
        layer: a module of the model (``model.backbone.body.layer3``), or a list of them.
        method: the NormGrad class to run: :class:`~captum_normgrad.LayerNormGrad` (default),
            :class:`~captum_normgrad.LayerNormGradSelective`,
            :class:`~captum_normgrad.LayerNormGradOrder1` or
            :class:`~captum_normgrad.LayerNormGradAdversarial` (loss mode only).
        seed: the seed of the loss's sampling.

    Raises:
        TypeError: ``model`` is not a supported detector (named), ``method`` is not a NormGrad
            class.
        ValueError: ``layer`` is not a module of ``model``.

    Example:
        >>> from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
        >>> model = fasterrcnn_mobilenet_v3_large_fpn(
        ...     weights=None, weights_backbone=None, min_size=64, max_size=96)
        >>> explainer = DetectorNormGrad(model, model.backbone.body["13"])
        >>> images = [torch.rand(3, 64, 80), torch.rand(3, 96, 64)]
        >>> targets = [{"boxes": torch.tensor([[4.0, 8.0, 40.0, 50.0]]),
        ...             "labels": torch.tensor([3])}] * 2
        >>> [tuple(m.shape) for m in explainer.attribute(images, targets=targets)]
        [(1, 1, 2, 3), (1, 1, 3, 2)]
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | Sequence[nn.Module],
        method: type[LayerNormGrad] = LayerNormGrad,
        seed: int = 0,
    ) -> None:
        self.family = detector_family(model)
        if not (isinstance(method, type) and issubclass(method, LayerNormGrad)):
            raise TypeError(
                f"method must be a NormGrad class such as LayerNormGrad or LayerNormGradOrder1, "
                f"got {method!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        inside = {id(module) for module in model.modules()}
        for module in layer if isinstance(layer, (list, tuple)) else [layer]:
            if not isinstance(module, nn.Module) or id(module) not in inside:
                raise ValueError(f"layer {type(module).__name__} is not a module of the model")
        self.model = model
        self.layer = layer
        self.method = method
        self.seed = seed

    def attribute(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
        detection: int | Sequence[int] | None = None,
        attribute_to_layer_input: bool = False,
        **method_kwargs: object,
    ) -> list[Tensor] | list[list[Tensor]]:
        r"""One map per image: of the training loss for ``targets``, or of a detection's score.

        Args:
            images: a list of ``(C, H, W)`` images (sizes may differ) or an ``(N, C, H, W)``
                tensor, as the detector takes them.
            targets: one dict per image, as for training: ``"boxes"`` a float ``(N_i, 4)``
                tensor of ``(x1, y1, x2, y2)`` in the image's pixels, ``"labels"`` an int64
                ``(N_i,)`` tensor (Mask R-CNN: also ``"masks"``, ``(N_i, H, W)``).
            detection: instead of ``targets``, the index of the detection whose score is
                explained, one int for every image or a list with one per image.
            attribute_to_layer_input: as for :meth:`~captum_normgrad.LayerNormGrad.attribute`.
            **method_kwargs: passed to the method's ``attribute`` (order 1's ``eps``,
                ``h_scale``, ``hvp``; order 0's ``create_graph``).

        Returns:
            A list with one ``(1, 1, h_i, w_i)`` map per image (a list of them, one per layer,
            when ``layer`` was a list).

        Raises:
            ValueError: naming the argument: no ``targets`` (and no ``detection``), or both;
                images that are not ``(C, H, W)`` float tensors; a target without ``"boxes"`` /
                ``"labels"`` (or ``"masks"``) or of the wrong shape, a box outside its image or
                with ``x2 <= x1``, a label outside the detector's classes; a detection index
                beyond the image's detections; ``detection`` with order 1, which needs a loss to
                descend.
            TypeError: ``images`` or ``targets`` of the wrong type, boxes or labels of the wrong
                dtype, arguments the explainer sets itself (``loss``, ``target``).
            RuntimeError: a layer the loss (or score) does not reach, or one that never ran.
        """
        images = checked_images(images)
        reserved = sorted(_RESERVED & set(method_kwargs))
        if reserved:
            raise TypeError(f"DetectorNormGrad.attribute sets {reserved} itself; do not pass them")
        if detection is not None:
            if targets is not None:
                raise ValueError(
                    "give targets (the training loss) or detection (a score), not both"
                )
            return self._score_maps(images, detection, attribute_to_layer_input, method_kwargs)
        targets = checked_targets(targets, images, self.family)
        if issubclass(self.method, LayerNormGradOrder1):
            # One image per call: the loop's passes, with plain autograd (no vmap of the
            # detector's sampling and data-dependent shapes).
            method_kwargs = {**method_kwargs, "batch_mode": "loop"}
        maps = []
        # Order 1 refuses train-mode dropout on the model it steps; in the passes themselves
        # loss_mode keeps it off, so the call itself runs with the model in evaluation mode.
        with eval_mode(self.model):
            for image, target in zip(images, targets):
                explainer = self.method(
                    ImageTrainingLoss(self.model, target, self.seed), self.layer
                )
                maps.append(
                    explainer.attribute(
                        image[None],
                        loss=summed_loss,
                        attribute_to_layer_input=attribute_to_layer_input,
                        **method_kwargs,
                    )
                )
        return maps

    def _score_maps(
        self,
        images: list[Tensor],
        detection: object,
        attribute_to_layer_input: bool,
        method_kwargs: dict[str, object],
    ) -> list[Tensor] | list[list[Tensor]]:
        if issubclass(self.method, LayerNormGradOrder1):
            raise ValueError(
                f"detection= explains a score at order 0; {self.method.__name__} takes a step on a "
                "training loss, so give targets (the detector's training loss) instead"
            )
        indices = checked_detections(detection, len(images))
        maps = []
        for image_index, (image, index) in enumerate(zip(images, indices)):
            score = ImageDetectionScore(self.model, index, image_index)
            maps.append(
                self.method(score, self.layer).attribute(
                    image[None],
                    target=0,
                    loss="output",
                    attribute_to_layer_input=attribute_to_layer_input,
                    **method_kwargs,
                )
            )
        return maps
